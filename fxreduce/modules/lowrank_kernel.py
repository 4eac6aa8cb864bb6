"""LowRankLinear's product ``(x V^T) U^T + b`` as one native op, ``torch.ops.fxreduce.lowrank_linear``.

Two stock GEMMs write the (rows, r) intermediate out and read it back, each packs its weight operand, and the
bias is one more pass over the output. The op (C++ in fxreduce/csrc/lowrank_*) packs V^T once, computes each
block of rows' intermediate into a per-thread buffer that stays in L1/L2, and has each U^T panel packed by
the thread that consumes it and run over that block at once, its accumulators starting from the bias: the
output is written once. Its backward stays on torch's GEMMs and recomputes the intermediate (one GEMM of the
forward's first, smaller half).

Where it serves (:func:`fused_serves`): inference (no operand needs a gradient) on CPU float32/float64 with
the native layer loaded, outside graph capture, from :data:`MIN_ROWS` rows, where it was measured faster
than the two GEMMs. With fewer rows the per-call packing of U^T
costs about what the fusion saves, and a training step was measured slower with the fused forward, its
backward recomputing the intermediate (docs/benchmarks.md, "Fused low-rank product"). Everything else
(training, CUDA, float16/bfloat16, no extension) runs the torch reference, :func:`lowrank_linear_reference`.

AntMan's grouped forms (GroupLinear, and SparseLowRankLinear's sparse_lr, lr_sparse and grouped_shuffle) run
``torch.ops.fxreduce.grouped_lowrank_linear`` the same way, in inference from :data:`GROUPED_MIN_ROWS` rows: their
block-diagonal factors in GroupLinear's (groups, out / groups, in / groups) layout, every panel packed once per
call, the intermediate of each block of rows (its columns interleaved for grouped_shuffle) kept in cache and
consumed at once by the second factor's panels, whose accumulators start from the bias. Stock kernels run
each form as a batched GEMM per factor plus a shuffle copy; at ViT-B's MLP shape the fused op was faster from 8
rows on. Its reference is :func:`grouped_lowrank_linear_reference`; it has no backward (training keeps the
modules' own batched GEMMs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .. import native
from ..errors import InputError

# Rows (the product of the input's leading dimensions) from which LowRankLinear takes the fused op: with 2 threads
# it was faster than two MKL GEMMs from there (benchmarks/bench_lowrank_kernel.py, docs/benchmarks.md "Fused
# low-rank product"); with 1 thread it is at parity from 64 to 96 rows and faster above.
MIN_ROWS = 64
# Rows from which the grouped forms take the fused op (benchmarks/bench_sparse_lowrank.py measured it faster than
# the batched GEMMs from 8 rows at ViT-B's MLP shape with 2 threads).
GROUPED_MIN_ROWS = 8


def lowrank_linear_reference(x: Tensor, first: Tensor, second: Tensor, bias: Tensor | None) -> Tensor:
    """The op's definition: two GEMMs through the rank-r intermediate."""
    return F.linear(F.linear(x, first), second, bias)


def grouped_lowrank_linear_reference(x: Tensor, first: Tensor | None, second: Tensor, bias: Tensor | None,
                                     shuffle: bool) -> Tensor:
    """The grouped op's definition: t = blockdiag(first) x (group j's output k at column k * g1 + j when
    ``shuffle``), then blockdiag(second) t + bias; without ``first``, blockdiag(second) x + bias."""
    rows = x.reshape(-1, x.shape[-1])
    if first is not None:
        t = torch.einsum("mgk,grk->mgr", rows.view(rows.shape[0], first.shape[0], -1), first)
        rows = (t.transpose(1, 2) if shuffle else t).reshape(rows.shape[0], -1)
    y = torch.einsum("mgk,gnk->mgn", rows.view(rows.shape[0], second.shape[0], -1), second).reshape(rows.shape[0], -1)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], y.shape[-1])


def _op_loaded(name: str = "lowrank_linear") -> bool:
    return native.available() and hasattr(torch.ops.fxreduce, name)


def fused_serves(x: Tensor, first: Tensor | None, second: Tensor, bias: Tensor | None, *,
                 op: str = "lowrank_linear", min_rows: int = MIN_ROWS) -> bool:
    """Whether the fused kernel ``op`` runs on these operands (see the module docstring)."""
    operands = (x, first, second, bias)
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in operands)
    return (not training and _op_loaded(op) and native.serves_eagerly(*operands) and x.dim() >= 1
            and math.prod(x.shape[:-1]) >= min_rows)


def check_operands(x: Tensor, first: Tensor, second: Tensor, bias: Tensor | None) -> None:
    """Shapes the product needs, as a clear error rather than one from deep inside a GEMM."""
    where = "fxreduce.modules.lowrank_kernel.lowrank_linear"
    if first.dim() != 2 or second.dim() != 2 or second.shape[1] != first.shape[0]:
        raise InputError(f"expected first (r, in) and second (out, r), got {tuple(first.shape)} and "
                         f"{tuple(second.shape)}", where=where)
    if x.dim() < 1 or x.shape[-1] != first.shape[1]:
        raise InputError(f"x's last dimension must be in_features = {first.shape[1]}, got shape {tuple(x.shape)}",
                         where=where)
    if bias is not None and tuple(bias.shape) != (second.shape[0],):
        raise InputError(f"bias must have shape ({second.shape[0]},), got {tuple(bias.shape)}", where=where)
    dtypes = {t.dtype for t in (x, first, second, bias) if t is not None}
    if len(dtypes) != 1 or not x.is_floating_point():
        raise InputError(f"the operands must share one floating dtype, got {sorted(map(str, dtypes))}", where=where)


def lowrank_linear(x: Tensor, first: Tensor, second: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(F.linear(x, first), second, bias)``, on the fused kernel where it serves (differentiable).
    An fx Proxy (plain ``torch.fx.symbolic_trace``) records the reference's two linears."""
    if not isinstance(x, Tensor):
        return lowrank_linear_reference(x, first, second, bias)
    check_operands(x, first, second, bias)
    if fused_serves(x, first, second, bias):
        return torch.ops.fxreduce.lowrank_linear(x, first, second, bias)
    return lowrank_linear_reference(x, first, second, bias)


def grouped_serves(x: Tensor, first: Tensor | None, second: Tensor, bias: Tensor | None) -> bool:
    """Whether the grouped forms run ``torch.ops.fxreduce.grouped_lowrank_linear`` on these operands: CPU inference
    from :data:`GROUPED_MIN_ROWS` rows (elsewhere GroupLinear's batched GEMMs run)."""
    return fused_serves(x, first, second, bias, op="grouped_lowrank_linear", min_rows=GROUPED_MIN_ROWS)


if _op_loaded():
    _ops = torch.ops.fxreduce

    @torch.library.register_fake("fxreduce::lowrank_linear")
    def _lowrank_linear_fake(x, first, second, bias):
        return x.new_empty((*x.shape[:-1], second.shape[0]))

    @register_flop_formula(_ops.lowrank_linear)
    def _lowrank_linear_flops(x_shape, first_shape, second_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(x_shape[:-1]) * first_shape[0] * (first_shape[1] + second_shape[0])

    def _setup(ctx, inputs, output):
        x, first, second, bias = inputs
        ctx.save_for_backward(x, first, second)
        ctx.has_bias = bias is not None

    def _backward(ctx, grad):
        """torch's GEMMs on the recomputed intermediate t = x V^T: dU = g^T t, dt = g U, dV = dt^T x,
        dx = dt V, db = sum of g."""
        x, first, second = ctx.saved_tensors
        rows = x.reshape(-1, x.shape[-1])
        g = grad.reshape(-1, second.shape[0])
        need_x, need_first, need_second, need_bias = ctx.needs_input_grad
        dt = g @ second if need_x or need_first else None
        dx = (dt @ first).view(x.shape) if need_x else None
        dfirst = dt.t() @ rows if need_first else None
        dsecond = g.t() @ F.linear(rows, first) if need_second else None
        dbias = g.sum(0) if ctx.has_bias and need_bias else None
        return dx, dfirst, dsecond, dbias

    torch.library.register_autograd("fxreduce::lowrank_linear", _backward, setup_context=_setup)

if _op_loaded("grouped_lowrank_linear"):
    @torch.library.register_fake("fxreduce::grouped_lowrank_linear")
    def _grouped_fake(x, first, second, bias, shuffle):
        return x.new_empty((*x.shape[:-1], second.shape[0] * second.shape[1]))

    @register_flop_formula(torch.ops.fxreduce.grouped_lowrank_linear)
    def _grouped_flops(x_shape, first_shape, second_shape, *args, out_shape=None, **kwargs) -> int:
        blocks = math.prod(second_shape) + (math.prod(first_shape) if first_shape is not None else 0)
        return 2 * math.prod(x_shape[:-1]) * blocks


__all__ = ["GROUPED_MIN_ROWS", "MIN_ROWS", "check_operands", "fused_serves", "grouped_lowrank_linear_reference",
           "grouped_serves", "lowrank_linear", "lowrank_linear_reference"]
