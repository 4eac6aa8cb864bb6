"""Counting the arithmetic of a fake-tensor run and attributing it to fx nodes.

A TorchDispatchMode sees every aten op the run executes. Matrix products and convolutions are counted
with torch.utils.flop_counter's own per-op formulas (torch counts FLOPs = 2 x multiply-adds, so we
halve them); attention kernels torch has no formula for (the CPU flash kernel, nn.MultiheadAttention's
fused fast path, the MPS and "overrideable" kernels) with torch's SDPA formula applied to their shapes
(see ATTENTION_FORMULAS); everything else that computes is "other" arithmetic: pointwise ops count one
op per output element, reductions one per input element, attention kernels a few per score. Counts arrive as SymInts (symbolic sizes) and are kept as
sympy expressions. Ops run by autograd in a backward pass are attributed to the fx node whose forward
created the autograd node, found through autograd sequence numbers.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable

import sympy
import torch
import torch._decomp
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten

# Ops that combine many inputs into fewer outputs: one op per element read.
REDUCTIONS = {
    aten.sum, aten.mean, aten.amax, aten.amin, aten.max, aten.min, aten.var, aten.std, aten.var_mean,
    aten.std_mean, aten.norm, aten.linalg_vector_norm, aten.prod, aten.logsumexp, aten.cumsum,
    aten._softmax, aten._log_softmax, aten._softmax_backward_data, aten._log_softmax_backward_data,
    aten.native_batch_norm, aten._native_batch_norm_legit, aten._native_batch_norm_legit_no_training,
    aten._native_batch_norm_legit_functional, aten.native_batch_norm_backward, aten.native_layer_norm,
    aten.native_layer_norm_backward, aten.native_group_norm, aten.native_group_norm_backward,
    aten.avg_pool2d, aten.avg_pool2d_backward, aten.max_pool2d_with_indices,
    aten.max_pool2d_with_indices_backward, aten._adaptive_avg_pool2d, aten._adaptive_avg_pool2d_backward,
    aten.adaptive_max_pool2d, aten.nll_loss_forward, aten.nll_loss_backward, aten._safe_softmax,
    aten._masked_softmax, aten._masked_softmax_backward,
}
# Fused recurrent kernels: torch's counter sees each as one uncounted op, and under fake tensors they
# need concrete sizes. torch.nn's RNN modules call them through torch._VF, before the dispatcher, so a
# TorchFunctionMode swaps in torch's own Python decompositions, whose matmuls torch's formulas count
# (forward and backward). Their loop over time makes the sequence length concrete.
_RECURRENT = {
    torch._VF.lstm: (aten.lstm.input, aten.lstm.data),
    torch._VF.gru: (aten.gru.input, aten.gru.data),
    torch._VF.rnn_tanh: (aten.rnn_tanh.input, aten.rnn_tanh.data),
    torch._VF.rnn_relu: (aten.rnn_relu.input, aten.rnn_relu.data),
}

# F.interpolate's kernels read concrete sizes when they compute the output size, which pins every symbolic
# dim of the input to its example value; torch's Python decompositions of the kernels keep them symbolic
# (and expose the interpolation arithmetic to the counter). Keyed by (mode, antialias, spatial dims).
_INTERPOLATION = {
    ("nearest", False, 1): aten.upsample_nearest1d.vec,
    ("nearest", False, 2): aten.upsample_nearest2d.vec,
    ("nearest", False, 3): aten.upsample_nearest3d.vec,
    ("nearest-exact", False, 1): aten._upsample_nearest_exact1d.vec,
    ("nearest-exact", False, 2): aten._upsample_nearest_exact2d.vec,
    ("nearest-exact", False, 3): aten._upsample_nearest_exact3d.vec,
    ("linear", False, 1): aten.upsample_linear1d.vec,
    ("bilinear", False, 2): aten.upsample_bilinear2d.vec,
    ("bicubic", False, 2): aten.upsample_bicubic2d.vec,
    ("trilinear", False, 3): aten.upsample_trilinear3d.vec,
    ("bilinear", True, 2): aten._upsample_bilinear2d_aa.vec,
    ("bicubic", True, 2): aten._upsample_bicubic2d_aa.vec,
}


def _interpolate_to_size(input, size=None, scale_factor=None, mode="nearest", align_corners=None,
                         recompute_scale_factor=None, antialias=False):
    """F.interpolate to a given output size through torch's decomposition; None for the other cases."""
    if size is None or scale_factor is not None or not isinstance(input, torch.Tensor):
        return None
    spatial = input.dim() - 2
    overload = _INTERPOLATION.get((mode, bool(antialias), spatial))
    decomposition = torch._decomp.decomposition_table.get(overload)
    if decomposition is None:
        return None
    size = [size] * spatial if isinstance(size, int) else list(size)
    if mode.startswith("nearest"):
        return decomposition(input, size, None)
    return decomposition(input, size, bool(align_corners), None)


class SymbolicDecompositions(TorchFunctionMode):
    """Runs calls whose kernels cannot take symbolic sizes as torch's Python decompositions: torch._VF
    recurrent kernels (see _RECURRENT) and F.interpolate to a given size (see _INTERPOLATION)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        variants = _RECURRENT.get(func)
        if variants is not None:
            packed = len(args) == 9 and isinstance(args[1], torch.Tensor)
            return torch._decomp.decomposition_table[variants[1] if packed else variants[0]](*args, **kwargs)
        if func is torch.nn.functional.interpolate:
            out = _interpolate_to_size(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


# Shape bookkeeping that the flop counter also ignores.
_IGNORED = {
    aten.sym_size, aten.sym_stride, aten.sym_numel, aten.sym_storage_offset, aten.size, aten.stride,
    aten.numel, aten.dim, aten.is_contiguous, aten.sym_is_contiguous,
}


# Attention. torch's flop counter has formulas for the CUDA kernels (flash, memory-efficient, cuDNN) but
# none for the kernels other devices run, so on CPU F.scaled_dot_product_attention counted 0 and a
# transformer's cost was linear in the sequence length. Those kernels get torch's own SDPA formula
# (sdpa_flop_count / sdpa_backward_flop_count: Q K^T plus P V, forward; the five backward products) on
# their shapes. Like torch, the formula counts the full S_q x S_k score matrix whatever the mask: a causal
# or padding mask does not lower the count (docs/cost-model.md says why). The math backend and attention
# written as explicit matmuls need nothing here: their bmm / matmul ops are counted as they run.


def _heads_layout(shape: Any) -> tuple:
    """A query / key / value shape as torch's SDPA formula takes it, (batch, heads, sequence, features):
    F.scaled_dot_product_attention also takes (N, L, E), (L, E) and extra leading batch dims."""
    shape = tuple(shape)
    if len(shape) == 4:
        return shape
    if len(shape) < 4:
        return (1,) * (4 - len(shape)) + shape
    return (math.prod(shape[:-3]),) + shape[-3:]


def _sdpa_flops(query, key, value, *args, out_val=None, **kwargs) -> Any:
    return sdpa_flop_count(_heads_layout(query.shape), _heads_layout(key.shape), _heads_layout(value.shape))


def _sdpa_backward_flops(grad_out, query, key, value, *args, out_val=None, **kwargs) -> Any:
    return sdpa_backward_flop_count(_heads_layout(grad_out.shape), _heads_layout(query.shape),
                                    _heads_layout(key.shape), _heads_layout(value.shape))


def _multi_head_attention_flops(query, key, value, embed_dim, num_head, *args, out_val=None, **kwargs) -> Any:
    """torch._native_multi_head_attention, nn.MultiheadAttention's fused inference path: the q, k, v and
    output projections (E x E each) around SDPA with ``num_head`` heads of E / num_head features."""
    batch = math.prod(tuple(query.shape)[:-2])
    target, source = query.shape[-2], key.shape[-2]
    head = embed_dim // num_head
    projections = 2 * batch * embed_dim * embed_dim * (2 * target + 2 * source)
    return projections + sdpa_flop_count((batch, num_head, target, head), (batch, num_head, source, head),
                                         (batch, num_head, source, head))


ATTENTION_FORMULAS: dict[Any, Callable[..., Any]] = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_flops,
    aten._scaled_dot_product_fused_attention_overrideable: _sdpa_flops,
    aten._scaled_dot_product_fused_attention_overrideable_backward: _sdpa_backward_flops,
    aten._scaled_dot_product_attention_math_for_mps: _sdpa_flops,
    aten._native_multi_head_attention: _multi_head_attention_flops,
}
"""Our formulas (FLOPs, as torch's registry returns them) for attention kernels torch has none for. They take
the op's own arguments, so torch's counter takes them too: ``FlopCounterMode(custom_mapping=ATTENTION_FORMULAS)``
counts an eager model as fxreduce does."""
for _formula in set(ATTENTION_FORMULAS.values()):
    _formula._get_raw = True  # FlopCounterMode: pass the arguments, not their shapes



def formula_of(packet: Any) -> Callable[..., Any] | None:
    """The formula the counter uses for an op overload packet: torch's registry (read at each call, since
    formulas are registered later too, e.g. for fxreduce's int8 ops), then ours."""
    return flop_registry.get(packet) or ATTENTION_FORMULAS.get(packet)

_SDPA_FORWARD = {
    aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_fused_attention_overrideable,
    aten._scaled_dot_product_attention_math_for_mps, aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_cudnn_attention,
}
_SDPA_BACKWARD = {
    aten._scaled_dot_product_flash_attention_for_cpu_backward,
    aten._scaled_dot_product_fused_attention_overrideable_backward,
    aten._scaled_dot_product_flash_attention_backward, aten._scaled_dot_product_efficient_attention_backward,
    aten._scaled_dot_product_cudnn_attention_backward,
}


def attention_other(func: Any, args: tuple, kwargs: dict) -> sympy.Expr | None:
    """The "other" arithmetic of a fused attention kernel, None for other ops: per element of the score
    matrix, one op for the scale and one for the softmax (forward) or its backward, plus one for a mask
    or bias and one for dropout where the call has them; the fast MHA path adds its projections' biases."""
    packet = func._overloadpacket
    if packet not in _SDPA_FORWARD and packet not in _SDPA_BACKWARD and packet is not aten._native_multi_head_attention:
        return None
    bound = dict(zip((a.name for a in func._schema.arguments), args))
    bound.update(kwargs)
    query, key = bound["query"], bound["key"]
    q, k = _heads_layout(query.shape), _heads_layout(key.shape)
    if packet is aten._native_multi_head_attention:
        batch, heads = math.prod(tuple(query.shape)[:-2]), bound["num_head"]
        scores = to_sympy(batch * heads * query.shape[-2] * key.shape[-2])
        biases = to_sympy(batch * bound["embed_dim"] * (2 * query.shape[-2] + 2 * key.shape[-2]))
        return scores * (2 + (bound.get("mask") is not None)) + biases
    scores = to_sympy(q[0] * q[1] * q[2] * k[2])
    mask = bound.get("attn_mask", bound.get("attn_bias"))
    dropout = bound.get("dropout_p", 0.0) or 0.0
    per_score = 2 + (packet in _SDPA_FORWARD and isinstance(mask, torch.Tensor)) + (dropout > 0)
    return scores * per_score


def fused_epilogue_other(func: Any, args: tuple, kwargs: dict, out: Any) -> sympy.Expr | None:
    """The "other" arithmetic fxreduce's own kernels run after their products, None where there is none: a fused
    ReLU (the op's bool argument ``relu``) counts one op per output element and a fused max pool (its int argument
    ``pool``) one per element its windows read, pool^2 per output element, as the unfused ReLU and max pool count."""
    if getattr(func, "namespace", None) != "fxreduce":
        return None
    bound = dict(zip((a.name for a in func._schema.arguments), args))
    bound.update(kwargs)
    relu, pool = bool(bound.get("relu", False)), int(bound.get("pool", 1))
    if not relu and pool == 1:
        return None
    outputs = sum((numel(t) for t in _tensors(out)), sympy.Integer(0))
    return outputs * ((pool * pool if pool > 1 else 0) + relu)


def to_sympy(value: Any) -> sympy.Expr:
    """A SymInt / int / float count as a sympy expression."""
    if isinstance(value, (torch.SymInt, torch.SymFloat)):
        return value.node.expr
    return sympy.Integer(value) if isinstance(value, int) else sympy.sympify(value)


def numel(tensor: torch.Tensor) -> sympy.Expr:
    return to_sympy(tensor.numel())


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class NodeCounts:
    """Raw counts of one fx node: multiply-adds by dtype and other arithmetic, forward and backward."""

    __slots__ = ("macs", "other", "backward_macs", "backward_other")

    def __init__(self) -> None:
        self.macs: dict[str, sympy.Expr] = defaultdict(lambda: sympy.Integer(0))
        self.other: sympy.Expr = sympy.Integer(0)
        self.backward_macs: dict[str, sympy.Expr] = defaultdict(lambda: sympy.Integer(0))
        self.backward_other: sympy.Expr = sympy.Integer(0)


class OpCounter(TorchDispatchMode):
    """Counts each aten op of a run into ``counts[key]``; ``current`` is the fx node being run.

    For backward attribution call :meth:`claim_autograd_nodes` after each fx node's forward: it maps
    the autograd nodes that fx node created (by sequence number) to it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current: str | None = None
        self.counts: dict[str | None, NodeCounts] = defaultdict(NodeCounts)
        self._owner_by_sequence: dict[int, str] = {}

    def claim_autograd_nodes(self, output: Any) -> None:
        """Record the autograd graph created since the last claim as belonging to ``current``."""
        stack = [t.grad_fn for t in _tensors(output) if t.grad_fn is not None]
        while stack:
            grad_fn = stack.pop()
            sequence = grad_fn._sequence_nr()
            if sequence in self._owner_by_sequence:
                continue
            self._owner_by_sequence[sequence] = self.current
            stack.extend(fn for fn, _ in grad_fn.next_functions if fn is not None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if packet in _IGNORED:
            return func(*args, **kwargs)
        if (formula_of(packet) is None and packet not in REDUCTIONS and func is not torch.ops.prim.device.default
                and torch.Tag.pointwise not in func.tags):
            # As torch's FlopCounterMode does: count what an op decomposes into, where it does.
            with self:
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
        out = func(*args, **kwargs)
        autograd_node = torch._C._current_autograd_node()
        if autograd_node is None:
            counts, backward = self.counts[self.current], False
        else:
            owner = self._owner_by_sequence.get(autograd_node._sequence_nr(), self.current)
            counts, backward = self.counts[owner], True
        formula = formula_of(packet)
        if formula is not None:
            macs = to_sympy(formula(*args, **kwargs, out_val=out)) / 2
            dtype = dtype_name(_operand_dtype(args))
            target = counts.backward_macs if backward else counts.macs
            target[dtype] = target[dtype] + macs
            other = attention_other(func, args, kwargs)
            if other is None:
                other = fused_epilogue_other(func, args, kwargs, out)
            if other is None:
                return out
        elif packet in REDUCTIONS:
            other = numel(_first_tensor(args))
        elif torch.Tag.pointwise in func.tags:
            other = sum((numel(t) for t in _tensors(out)), sympy.Integer(0))
        else:
            return out
        if backward:
            counts.backward_other += other
        else:
            counts.other += other
        return out


def _tensors(value: Any) -> list[torch.Tensor]:
    return [leaf for leaf in torch.utils._pytree.tree_leaves(value) if isinstance(leaf, torch.Tensor)]


def _first_tensor(args: Any) -> torch.Tensor:
    return _tensors(args)[0]


def _operand_dtype(args: Any) -> torch.dtype:
    """The dtype a multiply-add runs in: the narrower of the first two operands (activation and weight), so
    a mixed kernel such as fxreduce's int8 ops (float32 activations, int8 weights) counts as int8."""
    return min((t.dtype for t in _tensors(args)[:2]), key=lambda dtype: dtype.itemsize)
