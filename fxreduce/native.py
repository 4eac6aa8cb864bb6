"""fxreduce's native CPU kernels (``fxreduce._C``), their torch references, and which of the two serves.

The ops (``torch.ops.fxreduce.*``, C++ under fxreduce/csrc/):

- ``gather_matmul(x, wt, index, bias=None)``: ``out[g] = x[g] @ wt[index[g]] (+ bias)`` for x (G, N, k),
  wt (in, out) and an index (G, k), (k,) or None: the indirect-K GEMM, reading each kept unit as one
  contiguous row of W^T.
- ``gather_matmul_input_grad`` / ``gather_matmul_weight_grad``: its two gradients (the weight gradient
  scatter-adds into the kept rows).
- ``lstm_layer`` / ``lstm_layer_backward``: one LSTM layer and direction over the whole sequence, the
  per-step recurrent GEMM on the transposed weight (optionally over a keep set of the state) and the
  fused cell, forward and backward, in one call each.
- ``transposed(x)``: ``x.t().contiguous()`` in register tiles (differentiable): the W^T the indirect-K GEMMs
  read, and its gradient back in W's layout, where ATen's strided copy is an order of magnitude slower.
- ``smallest_k(keys, k)``: per row, the positions of its k smallest keys in increasing order: a uniform
  k-subset per row from i.i.d. keys (structured dropout's per-step keep sets), without a full sort.

Each has a fake implementation (tracing, torch.export, the fake-tensor cost model), an autograd formula
and a FLOP formula (the cost model counts them). The torch implementations here are the reference the
tests hold the kernels to, and the fallback: when the extension is missing (no compiler at install, a
failed build) every caller runs them, after one :class:`NativeFallbackWarning` naming what is missing.
``FXREDUCE_ISA=avx512|avx2|portable`` picks the kernels' ISA instead of the best the CPU has;
``FXREDUCE_REQUIRE_NATIVE=1`` (CI) makes a missing extension an error. ``fxreduce doctor`` reports.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterator, Mapping

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.utils.flop_counter import register_flop_formula

from .errors import OptionError, UnsupportedError

ISA_VARIABLE = "FXREDUCE_ISA"
REQUIRE_VARIABLE = "FXREDUCE_REQUIRE_NATIVE"
OPS = ("gather_matmul", "gather_matmul_input_grad", "gather_matmul_weight_grad", "lstm_layer", "lstm_layer_backward",
       "transposed", "smallest_k")
DTYPES = (torch.float32, torch.float64)


class NativeFallbackWarning(UserWarning):
    """The native kernels are unavailable; the torch reference implementations serve."""


def _load():
    try:
        from . import _C
    except ImportError as error:
        return None, f"fxreduce._C could not be imported ({error})"
    return _C, None


_C, MISSING = _load()


def _select_isa() -> None:
    wanted = os.environ.get(ISA_VARIABLE)
    if _C is None or not wanted:
        return
    if wanted not in _C.supported_isas():
        raise OptionError(
            f"{ISA_VARIABLE}={wanted} is not available; this CPU and build run {', '.join(_C.supported_isas())}",
            where="fxreduce.native", fix=f"unset {ISA_VARIABLE} or set it to one of those")
    _C.set_isa(wanted)


_select_isa()

if _C is None:
    if os.environ.get(REQUIRE_VARIABLE) == "1":
        raise UnsupportedError(MISSING, where="fxreduce.native",
                               fix=f"build it with `pip install --no-build-isolation -e .` or unset {REQUIRE_VARIABLE}")
    warnings.warn(f"{MISSING}: fxreduce runs its torch reference kernels (slower, same results). Install a C++ "
                  "compiler and reinstall with `pip install --no-build-isolation -e .`", NativeFallbackWarning,
                  stacklevel=2)


def available() -> bool:
    """True when the native kernels are loaded."""
    return _C is not None


def active_isa() -> str | None:
    """The ISA the native kernels run on (avx512, avx2, portable), None without them."""
    return None if _C is None else _C.isa()


def sources_digest() -> str | None:
    """A digest of the kernel sources this build compiled (setup.py), None without the native layer: two builds
    with the same digest run the same code, so a latency profile measured on one prices the other."""
    return None if _C is None else _C.sources_digest()


def supported_isas() -> list[str]:
    return [] if _C is None else list(_C.supported_isas())


@contextlib.contextmanager
def forced_isa(name: str) -> Iterator[None]:
    """Run the kernels on ``name`` inside the block (tests cover every ISA the machine has this way)."""
    if name not in supported_isas():
        raise OptionError(f"ISA {name!r} is not available here (available: {supported_isas()})",
                          where="fxreduce.native.forced_isa")
    previous = _C.isa()
    _C.set_isa(name)
    try:
        yield
    finally:
        _C.set_isa(previous)


_DISABLED = [False]


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the torch reference everywhere inside the block (tests of the torch path, side-by-side benchmarks)."""
    previous = _DISABLED[0]
    _DISABLED[0] = True
    try:
        yield
    finally:
        _DISABLED[0] = previous


def serves(*tensors: Tensor | None) -> bool:
    """Whether the native kernels take these operands: loaded, CPU, float32/float64, one dtype.
    Everything else (CUDA, float16/bfloat16, no extension) takes the torch reference."""
    if _C is None or _DISABLED[0]:
        return False
    dtype = None  # one loop, no device objects: it runs on every eager call of every native module
    for t in tensors:
        if t is None or not t.is_floating_point():
            continue
        if not t.is_cpu or t.dtype not in DTYPES or (dtype is not None and t.dtype != dtype):
            return False
        dtype = t.dtype
    return True


def serves_eagerly(*tensors: Tensor | None) -> bool:
    """:func:`serves` for real tensors outside graph capture. Fake tensors (the cost model, shape
    propagation) and torch.export / torch.compile see the torch path, the decomposition graphs record;
    inside :func:`fake_runs_as_eager`, fake tensors take the kernels real ones would."""
    return (serves(*tensors) and not torch.compiler.is_compiling()
            and (_FAKE_AS_EAGER[0] or not any(t is not None and is_fake(t) for t in tensors)))


_FAKE_AS_EAGER = [False]
_FAKE_DATA_VALUES: list[Mapping[str, float]] = [{}]


@contextlib.contextmanager
def fake_runs_as_eager(data_values: Mapping[str, float] | None = None) -> Iterator[None]:
    """Inside the block a fake run dispatches the native kernels where an eager run would: the latency model
    prices what runs, not the decomposition a captured graph records (every native op has a fake kernel).

    ``data_values`` stands in for what an eager run reads from the data and a fake tensor does not hold,
    by the name of the cost model's symbol for it (DRNet's share of images at each resolution, ``p_<size>``):
    a module whose work depends on such a value asks :func:`fake_data_value`."""
    previous = _FAKE_AS_EAGER[0], _FAKE_DATA_VALUES[0]
    _FAKE_AS_EAGER[0], _FAKE_DATA_VALUES[0] = True, dict(data_values or {})
    try:
        yield
    finally:
        _FAKE_AS_EAGER[0], _FAKE_DATA_VALUES[0] = previous


def in_fake_eager_run() -> bool:
    """Whether a fake run is inside :func:`fake_runs_as_eager`: a module then builds what an eager call would
    (a training step's per-step keep sets), where shape propagation takes the simplest stand-in."""
    return _FAKE_AS_EAGER[0]


def fake_data_value(name: str) -> float | None:
    """The value given for the data-decided quantity ``name`` to the enclosing :func:`fake_runs_as_eager`
    (None outside one, or where it gave none)."""
    return _FAKE_DATA_VALUES[0].get(name) if _FAKE_AS_EAGER[0] else None


def report() -> list[str]:
    """Lines saying which kernels run, for ``fxreduce doctor``."""
    if _C is None:
        return [f"native kernels: unavailable, {MISSING}", "every op runs its torch reference implementation"]
    chosen = os.environ.get(ISA_VARIABLE)
    how = f"set by {ISA_VARIABLE}" if chosen else "the best this CPU supports"
    lines = [f"native kernels: fxreduce._C, ISA {_C.isa()} ({how}; available: {', '.join(_C.supported_isas())}), "
             f"sources {_C.sources_digest()}",
             f"threads: {torch.get_num_threads()} (torch.set_num_threads)"]
    lines += [f"  torch.ops.fxreduce.{name}: native on CPU float32/float64, torch reference otherwise" for name in OPS]
    lines += [f"  torch.ops.fxreduce.{name}: native on CPU, torch reference otherwise"
              for name in ("sparse_int8_linear", "sparse_int8_conv2d")]
    lines += ["  torch.ops.fxreduce.lowrank_linear: LowRankLinear's forward in CPU float32/float64 inference from "
              "lowrank_kernel.MIN_ROWS rows, torch reference otherwise",
              "  torch.ops.fxreduce.grouped_lowrank_linear: the grouped forms' forward (GroupLinear, "
              "SparseLowRankLinear) in CPU float32/float64 inference from lowrank_kernel.GROUPED_MIN_ROWS rows, "
              "their batched GEMMs otherwise"]
    return lines


# ---------------------------------------------------------------------------------------------------------
# The torch references: the ops' definitions, and what runs where the kernels do not.
def _rows(wt: Tensor, index: Tensor | None, groups: int) -> Tensor:
    """wt's rows each group reads: (G, k, out)."""
    if index is None:
        return wt.expand(groups, *wt.shape)
    return wt[index] if index.dim() == 2 else wt[index].expand(groups, -1, -1)


def gather_matmul_reference(x: Tensor, wt: Tensor, index: Tensor | None, bias: Tensor | None = None) -> Tensor:
    out = torch.bmm(x, _rows(wt, index, x.shape[0]))
    return out if bias is None else out + bias


def gather_matmul_input_grad_reference(dout: Tensor, wt: Tensor, index: Tensor | None, k: int) -> Tensor:
    return torch.bmm(dout, _rows(wt, index, dout.shape[0]).transpose(1, 2))


def gather_matmul_weight_grad_reference(x: Tensor, dout: Tensor, index: Tensor | None, rows: int) -> Tensor:
    per_group = torch.bmm(x.transpose(1, 2), dout)  # (G, k, out)
    full = dout.new_zeros(rows, dout.shape[-1])
    if index is None:
        return full + per_group.sum(0)
    flat = index.flatten() if index.dim() == 2 else index.repeat(x.shape[0])
    return full.index_add_(0, flat, per_group.flatten(0, 1))


def _masked_state(h: Tensor, index: Tensor | None, scale: float, t: int) -> Tensor:
    if index is None:
        return h
    kept = index[t] if index.dim() == 2 else index
    return h.index_select(1, kept) * scale


def lstm_layer_reference(xp: Tensor, h0: Tensor, c0: Tensor, wt: Tensor, index: Tensor | None, scale: float,
                         reverse: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The loop the kernel fuses: per step gates = xp[t] + z @ wt[kept], z the (kept, scaled) state."""
    steps = xp.shape[0]
    hs, acts, cs, tcs = (xp.new_empty(steps, *shape) for shape in (h0.shape, xp.shape[1:], h0.shape, h0.shape))
    h, c = h0, c0
    for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
        kept = None if index is None else index[t] if index.dim() == 2 else index
        rows = wt if kept is None else wt.index_select(0, kept)
        gates = xp[t] + _masked_state(h, index, scale, t) @ rows
        i, f, g, o = gates.chunk(4, 1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * c + i * g
        tanh_c = torch.tanh(c)
        h = o * tanh_c
        hs[t], acts[t], cs[t], tcs[t] = h, torch.cat([i, f, g, o], 1), c, tanh_c
    return hs, c.clone(), acts, cs, tcs


def lstm_layer_inference_reference(xp: Tensor, h0: Tensor, c0: Tensor, wt: Tensor, index: Tensor | None,
                                   scale: float, reverse: bool) -> tuple[Tensor, Tensor]:
    return lstm_layer_reference(xp, h0, c0, wt, index, scale, reverse)[:2]


def lstm_layer_backward_reference(dhs, dc_last, acts, cs, tcs, hs, h0, c0, wt, index, scale, reverse):
    """The hand-written backward of :func:`lstm_layer_reference`: (dxp, dh0, dc0, dwt)."""
    steps = hs.shape[0]
    order = list(range(steps - 1, -1, -1)) if reverse else list(range(steps))
    dgates = torch.empty_like(acts)
    dwt = torch.zeros_like(wt)
    dh, dc = torch.zeros_like(h0), dc_last.clone()
    for n in range(steps - 1, -1, -1):
        t = order[n]
        prev = order[n - 1] if n > 0 else None
        c_prev = c0 if prev is None else cs[prev]
        h_prev = h0 if prev is None else hs[prev]
        i, f, g, o = acts[t].chunk(4, 1)
        dh = dh + dhs[t]
        dc = dc + dh * o * (1 - tcs[t] ** 2)
        dgates[t] = torch.cat([dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g * g),
                               dh * tcs[t] * o * (1 - o)], 1)
        dc = dc * f
        kept = None if index is None else index[t] if index.dim() == 2 else index
        z = _masked_state(h_prev, index, scale, t)
        if kept is None:
            dwt += z.t() @ dgates[t]
            dh = dgates[t] @ wt.t()
        else:
            dwt.index_add_(0, kept, z.t() @ dgates[t])
            dh = torch.zeros_like(h0).index_add_(1, kept, dgates[t] @ wt[kept].t() * scale)
    return dgates, dh, dc, dwt


def transposed_reference(x: Tensor) -> Tensor:
    return x.t().contiguous()


def smallest_k_reference(keys: Tensor, k: int) -> Tensor:
    return keys.argsort(dim=1, stable=True)[:, :k].sort(1).values


def channel_sums_reference(x: Tensor) -> tuple[Tensor, Tensor]:
    dims = [d for d in range(x.dim()) if d != 1]
    return x.abs().sum(dim=dims), x.sum(dim=dims)


REFERENCES = {
    "channel_sums": channel_sums_reference,
    "gather_matmul": gather_matmul_reference,
    "gather_matmul_input_grad": gather_matmul_input_grad_reference,
    "gather_matmul_weight_grad": gather_matmul_weight_grad_reference,
    "lstm_layer": lstm_layer_reference,
    "lstm_layer_inference": lstm_layer_inference_reference,
    "lstm_layer_backward": lstm_layer_backward_reference,
    "transposed": transposed_reference,
    "smallest_k": smallest_k_reference,
}


def call(name: str, *args):
    """Op ``name`` on the native kernel where it serves these operands, else its torch reference."""
    if serves(*(a for a in args if isinstance(a, Tensor))):
        return getattr(torch.ops.fxreduce, name)(*args)
    return REFERENCES[name](*args)


def channel_sums(x: Tensor) -> tuple[Tensor, Tensor]:
    """(sum |x|, sum x) over every dim but dim 1 of an (N, C, ...) tensor, in one read of it: error-map pruning's
    channel scores and bias gradient (torch's ``abs().sum((0, 2, 3))`` writes an |x| temporary and reduces
    across strided planes)."""
    return call("channel_sums", x)


def transposed(x: Tensor) -> Tensor:
    """``x.t().contiguous()`` for a 2-d x (differentiable; the gradient comes back contiguous in x's layout)."""
    return call("transposed", x)


def smallest_k(keys: Tensor, k: int) -> Tensor:
    """Per row of ``keys`` (G, width), the positions of its k smallest entries in increasing order (ties to
    the lower position): ``keys.argsort(1, stable=True)[:, :k].sort(1).values`` without the full sort."""
    return call("smallest_k", keys, k)


def gather_matmul(x: Tensor, wt: Tensor, index: Tensor | None, bias: Tensor | None = None) -> Tensor:
    """``x[g] @ wt[index[g]] (+ bias)`` (differentiable in x, wt and bias)."""
    return call("gather_matmul", x, wt, index, bias)


def lstm_layer(xp: Tensor, h0: Tensor, c0: Tensor, wt: Tensor, index: Tensor | None, scale: float,
               reverse: bool) -> tuple[Tensor, Tensor]:
    """All hidden states (T, N, H) and the last cell state of one LSTM layer and direction (differentiable
    in xp, h0, c0 and wt = W_hh^T), on the fused kernel where it serves, else the reference loop. Where no
    gradient is recorded, the kernel keeps no activations for a backward."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (xp, h0, c0, wt)):
        return call("lstm_layer", xp, h0, c0, wt, index, scale, reverse)[:2]
    return call("lstm_layer_inference", xp, h0, c0, wt, index, scale, reverse)


# ---------------------------------------------------------------------------------------------------------
# Fake implementations, autograd and FLOP formulas of the native ops.
if _C is not None:
    lib = torch.ops.fxreduce

    @torch.library.register_fake("fxreduce::channel_sums")
    def _channel_sums_fake(x):
        return x.new_empty(x.shape[1]), x.new_empty(x.shape[1])

    @torch.library.register_fake("fxreduce::gather_matmul")
    def _gather_matmul_fake(x, wt, index, bias=None):
        return x.new_empty(x.shape[0], x.shape[1], wt.shape[1])

    @torch.library.register_fake("fxreduce::gather_matmul_input_grad")
    def _input_grad_fake(dout, wt, index, k):
        return dout.new_empty(dout.shape[0], dout.shape[1], k)

    @torch.library.register_fake("fxreduce::gather_matmul_weight_grad")
    def _weight_grad_fake(x, dout, index, rows):
        return dout.new_empty(rows, dout.shape[2])

    @torch.library.register_fake("fxreduce::lstm_layer")
    def _lstm_layer_fake(xp, h0, c0, wt, index, scale, reverse):
        steps, rows = xp.shape[0], xp.shape[1]
        hidden = h0.shape[1]
        return (xp.new_empty(steps, rows, hidden), c0.new_empty(c0.shape), xp.new_empty(xp.shape),
                xp.new_empty(steps, rows, hidden), xp.new_empty(steps, rows, hidden))

    @torch.library.register_fake("fxreduce::lstm_layer_inference")
    def _lstm_inference_fake(xp, h0, c0, wt, index, scale, reverse):
        return xp.new_empty(xp.shape[0], xp.shape[1], h0.shape[1]), c0.new_empty(c0.shape)

    @torch.library.register_fake("fxreduce::lstm_layer_backward")
    def _lstm_backward_fake(dhs, dc_last, acts, cs, tcs, hs, h0, c0, wt, index, scale, reverse):
        return acts.new_empty(acts.shape), h0.new_empty(h0.shape), c0.new_empty(c0.shape), wt.new_empty(wt.shape)

    @torch.library.register_fake("fxreduce::transposed")
    def _transposed_fake(x):
        return x.new_empty(x.shape[1], x.shape[0])

    @torch.library.register_fake("fxreduce::smallest_k")
    def _smallest_k_fake(keys, k):
        return keys.new_empty(keys.shape[0], k, dtype=torch.long)

    def _transposed_backward(ctx, grad):
        return transposed(grad)

    torch.library.register_autograd("fxreduce::transposed", _transposed_backward)

    def _gather_setup(ctx, inputs, output):
        x, wt, index = inputs[:3]
        ctx.save_for_backward(x, wt, index)

    def _gather_backward(ctx, dout):
        x, wt, index = ctx.saved_tensors
        dout = dout.contiguous()  # once here, not once in each gradient kernel (a transposed logits gradient)
        dx = lib.gather_matmul_input_grad(dout, wt, index, x.shape[2]) if ctx.needs_input_grad[0] else None
        dwt = lib.gather_matmul_weight_grad(x, dout, index, wt.shape[0]) if ctx.needs_input_grad[1] else None
        with_bias = len(ctx.needs_input_grad) > 3  # a call that leaves bias out has three inputs
        dbias = dout.sum((0, 1)) if with_bias and ctx.needs_input_grad[3] else None
        return (dx, dwt, None, dbias) if with_bias else (dx, dwt, None)

    torch.library.register_autograd("fxreduce::gather_matmul", _gather_backward, setup_context=_gather_setup)

    def _lstm_setup(ctx, inputs, output):
        xp, h0, c0, wt, index, scale, reverse = inputs
        hs, _, acts, cs, tcs = output
        ctx.save_for_backward(acts, cs, tcs, hs, h0, c0, wt, index)
        ctx.scale, ctx.reverse = scale, reverse
        # Unused outputs' gradients arrive as None, not as zero tensors filled on every backward: the saved
        # activations alone are six (T, N, H) planes a layer.
        ctx.set_materialize_grads(False)

    def _lstm_backward(ctx, dhs, dc_last, *_saved_outputs_grads):
        """Gradients flow from the hidden states and the last cell state; the saved activations
        (outputs 3-5) are the backward's own inputs and receive none."""
        acts, cs, tcs, hs, h0, c0, wt, index = ctx.saved_tensors
        dhs = torch.zeros_like(hs) if dhs is None else dhs
        dc_last = torch.zeros_like(c0) if dc_last is None else dc_last
        dxp, dh0, dc0, dwt = lib.lstm_layer_backward(dhs, dc_last, acts, cs, tcs, hs, h0, c0, wt, index, ctx.scale,
                                                     ctx.reverse)
        return dxp, dh0, dc0, dwt, None, None, None

    torch.library.register_autograd("fxreduce::lstm_layer", _lstm_backward, setup_context=_lstm_setup)

    def _groups_k_out(x_shape, out_features):
        return x_shape[0] * x_shape[1] * x_shape[2] * out_features

    @register_flop_formula(lib.gather_matmul)
    def _gather_matmul_flops(x_shape, wt_shape, index_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * _groups_k_out(x_shape, wt_shape[1])

    @register_flop_formula(lib.gather_matmul_input_grad)
    def _input_grad_flops(dout_shape, wt_shape, index_shape, k, *args, out_shape=None, **kwargs) -> int:
        return 2 * dout_shape[0] * dout_shape[1] * dout_shape[2] * k

    @register_flop_formula(lib.gather_matmul_weight_grad)
    def _weight_grad_flops(x_shape, dout_shape, index_shape, rows, *args, out_shape=None, **kwargs) -> int:
        return 2 * _groups_k_out(x_shape, dout_shape[2])

    def _recurrent_macs(xp_shape, index_shape) -> int:
        hidden = xp_shape[2] // 4
        kept = hidden if index_shape is None else index_shape[-1]
        return xp_shape[0] * xp_shape[1] * kept * xp_shape[2]

    @register_flop_formula(lib.lstm_layer)
    def _lstm_layer_flops(xp_shape, h0_shape, c0_shape, wt_shape, index_shape, *args, out_shape=None, **kwargs):
        return 2 * _recurrent_macs(xp_shape, index_shape)

    @register_flop_formula(lib.lstm_layer_inference)
    def _lstm_inference_flops(xp_shape, h0_shape, c0_shape, wt_shape, index_shape, *args, out_shape=None, **kwargs):
        return 2 * _recurrent_macs(xp_shape, index_shape)

    @register_flop_formula(lib.lstm_layer_backward)
    def _lstm_backward_flops(dhs_shape, dc_shape, acts_shape, *args, out_shape=None, **kwargs):
        index_shape = args[6]
        return 4 * _recurrent_macs(acts_shape, index_shape)
