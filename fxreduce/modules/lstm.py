"""A decomposed ``torch.nn.LSTM``: nn.LSTM's numbers, replaceable projections, keep sets, fast CPU kernels.

Why it exists: nn.LSTM is one opaque fused op, so a compression pass cannot swap its gate matrices for
low-rank or grouped modules (AntMan), and structured dropout cannot skip the dropped columns of its
GEMMs. This module keeps nn.LSTM's constructor, forward, results and (while dense) parameter names, but
computes every layer and direction as

1. one big GEMM for the input projections of all time steps (autograd gives its backward as big GEMMs);
2. a recurrence written as one ``autograd.Function`` over the whole sequence: per step one small GEMM
   with the recurrent weights (forward ``h @ W_hh^T``, backward ``dgates @ W_hh``) and a few fused
   in-place gate operations; the recurrent weight gradient is one big GEMM over all steps at the end.

On CPU in float32 the GEMMs run on oneDNN, the per-step ones with weights packed once per sequence
(for the small batch of a recurrence up to 2x faster than ``addmm``; nn.LSTM's own oneDNN kernel relies
on the same). Other devices and dtypes use ``addmm``.

Keep sets: per-sequence sets gather k weight columns once and keep every GEMM whole. Per-step sets run
the input projection as T GEMMs of N rows over each step's kept columns; uniform sets gather those
columns per step, window sets (:meth:`KeepSet.windows`) read them as slices of the weight permuted once
per sequence. Measured on 1 core of a loaded 2-core machine, 2 layers, H=650, T=35, batch 20, p=0.5 on
layer inputs (and states: +h), training forward + backward of the LSTM alone, dense = 1: per-sequence
1.3x (+h 1.75x), per-step window 1.1x (+h 1.3x), per-step uniform 0.75x (+h 0.6x). At batch 20 the
T small GEMMs run well below the speed of one big GEMM, which bounds both per-step modes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake
from torch.autograd.function import once_differentiable
from torch.nn.utils.rnn import PackedSequence

from ..errors import CostError, InputError, OptionError, UnsupportedError

KINDS = ("ih", "hh")


@dataclass(frozen=True)
class KeepSet:
    """The units a batch-shared dropout mask keeps: the same for every sample of the batch.

    ``index`` holds the kept unit numbers, shape ``(k,)`` for one set per sequence or ``(T, k)`` for a
    set per time step (row t applies to the step that reads ``x[t]``); kept units are multiplied by
    ``scale`` (1/(1-p)), all others by 0. Indices must be distinct within a set.
    """

    index: Tensor
    scale: float = 1.0
    order: Tensor | None = None
    offsets: Tensor | None = None

    @classmethod
    def windows(cls, order: Tensor, offsets: Tensor, k: int, scale: float = 1.0) -> "KeepSet":
        """Per-step sets that are cyclic windows of k units in one ordering of the units: row t keeps
        ``order[(offsets[t] + j) % width]`` for j < k. The fast path then reads each step's weight columns
        as a slice of the weight permuted once, instead of gathering them per step."""
        doubled = torch.cat([order, order[: k - 1]])
        index = doubled[offsets[:, None] + torch.arange(k)]
        return cls(index, scale, doubled, offsets)

    @property
    def per_step(self) -> bool:
        return self.index.dim() == 2

    @property
    def size(self) -> int:
        """k, the number of kept units (per step for per-step sets)."""
        return self.index.shape[-1]

    def mask(self, width: int, like: Tensor) -> Tensor:
        """The dense 0/scale mask this set stands for: ``(width,)``, or ``(T, 1, width)`` per step."""
        index = self.index.to(like.device)
        if self.per_step:
            mask = like.new_zeros(index.shape[0], width)
            return mask.scatter_(1, index, self.scale).unsqueeze(1)
        return like.new_zeros(width).index_fill_(0, index, self.scale)


def gemm_factors(module: nn.Module) -> tuple[list[Tensor], Tensor | None] | None:
    """The GEMM operands of a projection, or None when it is opaque.

    Protocol (duck-typed): a module may define ``gemm_factors() -> (weights, bias)`` with weights
    ``[W1, W2, ..., Wm]`` (``Wj`` of shape ``(out_j, in_j)``, autograd-connected to its parameters) and
    ``bias`` of shape ``(out_m,)`` or None, such that ``module(x) == x @ W1^T @ W2^T ... @ Wm^T + bias``.
    A plain ``nn.Linear`` is the one-factor case.
    """
    if type(module) is nn.Linear:
        return [module.weight], module.bias
    method = getattr(module, "gemm_factors", None)
    if method is None:
        return None
    weights, bias = method()
    return list(weights), bias


try:  # oneDNN's linear, as torch's CPU inductor backend uses it; resolved once (a lookup costs ~8 us).
    _DNN_LINEAR = torch.ops.mkldnn._linear_pointwise.default
    _DNN_LINEAR_ADD = torch.ops.mkldnn._linear_pointwise.binary
    _DNN_PACK = torch.ops.mkldnn._reorder_linear_weight.default
except (AttributeError, RuntimeError):
    _DNN_LINEAR = None

# A dense LSTM with hidden_size below this runs torch's fused LSTM kernel; at and above it the decomposed
# recurrence is faster (measured at H = 200 / 650 / 1500, batch 20, 2 threads, training and inference).
TORCH_KERNEL_MAX_HIDDEN = 1024

# Below this many weight elements a per-step GEMM is faster through addmm: oneDNN's call costs ~14 us
# more, which its faster kernel only wins back from H ~ 200 on (measured, batch 20, 1 and 2 threads).
_STEP_DNN_MIN_WEIGHTS = 1 << 17

# From this many rows and (out x k) weights a window's weight gradient is faster as a oneDNN GEMM plus an add
# into the gradient's columns than as one addmm_ into them (measured, 2 threads; out x k x rows: 2600x325x20
# 0.21 vs 0.16 ms, x40 0.27 vs 0.32, x88 0.51 vs 0.72; 2000x100x88 0.20 vs 0.18, 1600x200x88 0.23 vs 0.27).
_WINDOW_DNN_MIN_ROWS = 32
_WINDOW_DNN_MIN_WEIGHTS = 1 << 18


def _onednn_ok(tensor: Tensor) -> bool:
    """oneDNN's kernels for real CPU float32 tensors; fake tensors (costing, torch.export) take torch.mm."""
    return (
        _DNN_LINEAR is not None
        and not is_fake(tensor)
        and tensor.device.type == "cpu"
        and tensor.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
    )


def _mm_t(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b^T``. On CPU float32 through oneDNN: MKL's sgemm on this AMD CPU reaches 60-90% of
    oneDNN's speed on the big GEMMs here, least with the transposed operands of the backward (measured)."""
    if _onednn_ok(a):
        return _DNN_LINEAR(a, b, None, "none", [], "")
    return torch.mm(a, b.t())


class _Linear(torch.autograd.Function):
    """``x @ W^T + b`` over all time steps, with the forward, input- and weight-gradient GEMMs on oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        y = _DNN_LINEAR(x.flatten(0, -2), weight, bias, "none", [], "")
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy = dy.flatten(0, -2)
        dx = _mm_t(dy, weight.t()).view(x.shape) if ctx.needs_input_grad[0] else None
        dw = _mm_t(dy.t(), x.flatten(0, -2).t()) if ctx.needs_input_grad[1] else None
        db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return _Linear.apply(x, weight, bias) if _onednn_ok(x) else F.linear(x, weight, bias)


class _StepMatmul:
    """``z @ weight^T (+ add)`` repeated at every time step with the same weight.

    For the small batch of a recurrence, oneDNN with the weight packed once for that batch size runs
    2x faster than ``addmm`` at H=650 and 1500 (measured, batch 20); nn.LSTM's oneDNN kernel relies on
    the same. Small weights stay on ``addmm``.
    """

    def __init__(self, weight: Tensor, rows: int):
        self.weight = weight
        use_dnn = _onednn_ok(weight) and weight.numel() >= _STEP_DNN_MIN_WEIGHTS
        self.packed = _DNN_PACK(weight.contiguous(), rows) if use_dnn else None

    def __call__(self, z: Tensor, add: Tensor | None = None) -> Tensor:
        if self.packed is None:
            return torch.mm(z, self.weight.t()) if add is None else torch.addmm(add, z, self.weight.t())
        if add is None:
            return _DNN_LINEAR(z, self.packed, None, "none", [], "")
        return _DNN_LINEAR_ADD(z, add, self.packed, None, "add")


class _StepRows:
    """The rows of ``W^T`` (W's input columns) that each step's keep set selects, for per-step sets.

    Uniform sets gather k rows per step. Window sets (:meth:`KeepSet.windows`) permute ``W^T`` once and
    read each step's rows as a contiguous slice of it: no per-step copy, and the weight gradient is
    accumulated into column windows of one buffer instead of T gathered copies.
    """

    def __init__(self, weight: Tensor, index: Tensor, window: tuple[Tensor, list[int]] | None):
        self.index, self.width, self.k = index, weight.shape[1], index.shape[1]
        self.order, self.starts = window if window is not None else (None, None)
        # The weight's gradient comes from weight_grad, so the copy is made outside autograd; gathering the
        # rows of a contiguous copy reads contiguous memory (3x faster than gathering from weight.t()).
        self.rows = weight.detach().t().contiguous()
        if window is not None:
            self.rows = self.rows.index_select(0, self.order)
            self.unpermute = torch.argsort(self.order[: self.width])

    def groups(self) -> list[tuple[int, Tensor | None]]:
        """The steps that read the same rows, together: (one of them, all of them or None for that one alone).

        Window sets whose steps share an offset (``per_step_window`` with ``offsets=m`` draws from m evenly
        spaced ones) then run one GEMM of (steps x N) rows per offset instead of one of N rows per step.
        """
        if self.starts is None:
            return [(t, None) for t in range(self.index.shape[0])]
        by_start: dict[int, list[int]] = {}
        for t, start in enumerate(self.starts):
            by_start.setdefault(start, []).append(t)
        return [(steps[0], None if len(steps) == 1 else torch.tensor(steps)) for steps in by_start.values()]

    def __call__(self, t: int) -> Tensor:
        if self.starts is None:
            return self.rows.index_select(0, self.index[t])
        start = self.starts[t]
        return self.rows[start : start + self.k]

    def times(self, z: Tensor, t: int, add: Tensor | None = None) -> Tensor:
        """``z @ rows_t (+ add)``: on oneDNN where it applies, which takes the slice as a transposed weight
        without copying it and runs these N-row GEMMs 1.3x faster than ``mm`` (measured, H=650, N=20)."""
        rows = self(t)
        if _onednn_ok(z):
            out = _DNN_LINEAR(z, rows.t(), None, "none", [], "")
            return out if add is None else out.add_(add)
        return torch.mm(z, rows) if add is None else torch.addmm(add, z, rows)

    def times_t(self, dz: Tensor, t: int) -> Tensor:
        """``dz @ rows_t^T``, the input gradient of :meth:`times`."""
        rows = self(t)
        return _DNN_LINEAR(dz, rows, None, "none", [], "") if _onednn_ok(dz) else torch.mm(dz, rows.t())

    def weight_grad(self, z: Tensor, dout: Tensor) -> Tensor:
        """dL/dW (out, in) from the kept, scaled inputs ``z`` (T, N, k) and output gradients (T, N, out)."""
        if self.starts is None:
            per_t = torch.bmm(z.transpose(1, 2), dout)
            full = z.new_zeros(self.width, dout.shape[-1])
            return full.index_add_(0, self.index.flatten(), per_t.flatten(0, 1)).t()
        # In W's own (out, in) layout with the input columns in the permuted order: un-permuting is then one
        # gather of columns, and the result already has the parameter's layout (a transposed gradient is
        # copied once more by autograd). A window that runs past the last column wraps to the first.
        permuted = dout.new_zeros(dout.shape[-1], self.width)
        for t, steps in self.groups():
            start = self.starts[t]
            inputs, grads = (z[t], dout[t]) if steps is None else (z[steps].flatten(0, 1), dout[steps].flatten(0, 1))
            head = min(self.k, self.width - start)
            parts = [(permuted[:, start : start + head], slice(0, head))]
            if head < self.k:
                parts.append((permuted[:, : self.k - head], slice(head, self.k)))
            large = inputs.shape[0] >= _WINDOW_DNN_MIN_ROWS and grads.shape[1] * self.k >= _WINDOW_DNN_MIN_WEIGHTS
            if large and _onednn_ok(inputs):
                window = _mm_t(grads.t(), inputs.t())
                for columns, part in parts:
                    columns += window[:, part]
            else:
                for columns, part in parts:
                    columns.addmm_(grads.t(), inputs[:, part])
        return permuted.index_select(1, self.unpermute)


def _window(keep: KeepSet, device) -> tuple[Tensor, list[int]] | None:
    return None if keep.order is None else (keep.order.to(device), keep.offsets.tolist())


def _by_group(step_rows: _StepRows, inputs: Tensor, out: Tensor, product) -> Tensor:
    """``out[t] = product(inputs[t], t)`` for every step, one call per group of steps reading the same rows."""
    for t, steps in step_rows.groups():
        if steps is None:
            out[t] = product(inputs[t], t)
        else:
            result = product(inputs[steps].flatten(0, 1), t)
            out.index_copy_(0, steps, result.view(len(steps), *out.shape[1:]))
    return out


class _StepProjection(torch.autograd.Function):
    """``x[t][:, K_t] * scale @ W[:, K_t]^T (+ b)`` for every step t of a per-step keep set: forward and
    both gradients over the k kept columns only (T GEMMs of N rows each; one per group of steps that share
    their kept columns)."""

    @staticmethod
    def forward(ctx, x, weight, bias, index, scale, window):
        steps, rows, _ = x.shape
        xk = torch.gather(x, 2, index[:, None, :].expand(steps, rows, -1)).mul_(scale)
        step_rows = _StepRows(weight, index, window)
        out = _by_group(step_rows, xk, x.new_empty(steps, rows, weight.shape[0]),
                        lambda z, t: step_rows.times(z, t, bias))
        ctx.save_for_backward(xk, index)
        ctx.step_rows, ctx.scale, ctx.x_shape, ctx.has_bias = step_rows, scale, x.shape, bias is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        xk, index = ctx.saved_tensors
        step_rows = ctx.step_rows
        dout = dout.contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dxk = _by_group(step_rows, dout, torch.empty_like(xk), step_rows.times_t)
            kept = index[:, None, :].expand(-1, xk.shape[1], -1)
            dx = xk.new_zeros(ctx.x_shape).scatter_(2, kept, dxk.mul_(ctx.scale))
        if ctx.needs_input_grad[1]:
            dw = step_rows.weight_grad(xk, dout)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dout.sum((0, 1))
        return dx, dw, db, None, None, None


def _order(steps: int, reverse: bool) -> range:
    return range(steps - 1, -1, -1) if reverse else range(steps)


def _shifted(seq: Tensor, first: Tensor, reverse: bool) -> Tensor:
    """The state entering each step: ``first`` for the first step processed, then ``seq`` shifted by one."""
    return torch.cat([seq[1:], first[None]]) if reverse else torch.cat([first[None], seq[:-1]])


def _recurrence_forward(xp, h0, c0, factors, reverse, index, scale, step_rows, save):
    """Run the cell over all steps. ``xp`` (T, N, 4H) holds the input projections plus every bias.

    With ``save`` the per-step activations, cell states and factor outputs are kept for the backward;
    without it every buffer holds one step only, so inference keeps nothing but the output.
    """
    steps, rows, width = xp.shape
    hidden = width // 4
    kept = steps if save else 1
    hs = xp.new_empty(steps, rows, hidden)
    acts = xp.new_empty(kept, rows, width)
    cs = xp.new_empty(kept, rows, hidden)
    tcs = xp.new_empty(kept, rows, hidden)
    inner = [xp.new_empty(kept, rows, w.shape[0]) for w in factors[:-1]]
    per_step = index is not None and index.dim() == 2
    first_rows = step_rows
    mats = [None if per_step and j == 0 else _StepMatmul(w, rows) for j, w in enumerate(factors)]
    last = len(factors) - 1
    # Per-step views made once (unbind is one call) instead of ~10 Python-level slices per step.
    xp_t, hs_t, a_t, cs_t, tcs_t = (v.unbind(0) for v in (xp, hs, acts, cs, tcs))
    i_t, f_t, g_t, o_t = (v.unbind(0) for v in acts.chunk(4, 2))
    inner_t = [v.unbind(0) for v in inner]
    minus_one = xp.new_full((), -1.0)
    h, c = h0, c0
    for t in _order(steps, reverse):
        s = t if save else 0
        z = h
        if per_step:
            z = h.index_select(1, index[t]).mul_(scale)
        elif index is not None:
            z = h.index_select(1, index)
        for j, mat in enumerate(mats):
            add = xp_t[t] if j == last else None
            if mat is None:
                z = first_rows.times(z, t, add)
            else:
                z = mat(z, add)
            if j < last and save:
                inner_t[j][s].copy_(z)
        # tanh(x) = 2 sigmoid(2x) - 1, in place and without Python scalars: torch's CPU sigmoid is 4x
        # faster than its tanh, and a scalar operand costs a tensor conversion per call.
        z_g = z.narrow(1, 2 * hidden, hidden)
        z_g.add_(z_g)
        torch.sigmoid(z, out=a_t[s])
        torch.add(minus_one, g_t[s], alpha=2, out=g_t[s])
        c = torch.mul(f_t[s], c, out=cs_t[s]).addcmul_(i_t[s], g_t[s])
        tanh_c = torch.add(c, c, out=tcs_t[s]).sigmoid_()
        torch.add(minus_one, tanh_c, alpha=2, out=tanh_c)
        h = torch.mul(o_t[s], tanh_c, out=hs_t[t])
    return hs, c.clone(), acts, cs, tcs, inner


class _Recurrence(torch.autograd.Function):
    """The LSTM recurrence over a whole sequence with a hand-written backward.

    Inputs: ``xp`` (T, N, 4H) input projections with all biases, ``h0``, ``c0`` (N, H), the direction,
    an optional hidden keep index ((k,): columns of ``factors[0]`` already gathered and scaled; (T, k):
    selected here per step through ``step_rows``, a :class:`_StepRows` of ``factors[0]``) with its scale,
    then the recurrent GEMM factors. Outputs: all hidden
    states (T, N, H) and the last cell state (N, H). Saved: gate activations, cell states and their
    tanh, the factor outputs of multi-factor projections; not ``xp``.
    """

    @staticmethod
    def forward(ctx, xp, h0, c0, reverse, index, scale, step_rows, *factors):
        hs, c_last, acts, cs, tcs, inner = _recurrence_forward(xp, h0, c0, factors, reverse, index, scale, step_rows,
                                                               True)
        ctx.reverse, ctx.scale, ctx.step_rows, ctx.count = reverse, scale, step_rows, len(factors)
        ctx.save_for_backward(acts, cs, tcs, hs, h0, c0, index, *factors, *inner)
        return hs, c_last

    @staticmethod
    @once_differentiable
    def backward(ctx, dhs, dc):
        acts, cs, tcs, hs, h0, c0, index, *rest = ctx.saved_tensors
        factors, inner = rest[: ctx.count], rest[ctx.count :]
        reverse, scale = ctx.reverse, ctx.scale
        steps, rows, width = acts.shape
        hidden = width // 4
        per_step = index is not None and index.dim() == 2
        dhs = dhs.contiguous()

        # Everything that does not depend on the incoming gradient, for all steps at once:
        # dgates = [dc*g*i(1-i), dc*c_prev*f(1-f), dc*i*(1-g^2), dh*tanh(c)*o(1-o)], dc += dh*o*(1-tanh(c)^2).
        i, f, g, o = acts.chunk(4, 2)
        dgates = torch.addcmul(acts, acts, acts, value=-1)
        gi, gf, gg, go = dgates.chunk(4, 2)
        gi.mul_(g)
        gf.mul_(_shifted(cs, c0, reverse))
        torch.addcmul(i, i, torch.mul(g, g, out=gg), value=-1, out=gg)
        go.mul_(tcs)
        dc_from_h = torch.mul(tcs, tcs)
        torch.addcmul(o, o, dc_from_h, value=-1, out=dc_from_h)

        first_rows = ctx.step_rows
        last = len(factors) - 1
        back = [None if per_step and j == 0 else _StepMatmul(w.t(), rows) for j, w in enumerate(factors)]
        dinner = [torch.empty_like(z) for z in inner]
        order = _order(steps, not reverse)
        dh_t, kc_t, f_t, dg_t, do_t = (v.unbind(0) for v in (dhs, dc_from_h, f, dgates, go))
        difg_t = dgates.narrow(2, 0, 3 * hidden).unflatten(2, (3, hidden)).unbind(0)
        dinner_t = [v.unbind(0) for v in dinner]
        dh = dh_t[order[0]]
        for n, t in enumerate(order):
            dc = torch.addcmul(dc, dh, kc_t[t])
            difg_t[t].mul_(dc.unsqueeze(1))
            do_t[t].mul_(dh)
            dc = dc.mul_(f_t[t])
            nxt = dh_t[order[n + 1]] if n + 1 < steps else None
            dz = dg_t[t]
            for j in range(last, -1, -1):
                add = nxt if j == 0 and index is None else None
                if back[j] is None:
                    dz = first_rows.times_t(dz, t)
                else:
                    dz = back[j](dz, add)
                if j > 0:
                    dinner_t[j - 1][t].copy_(dz)
            if index is None:
                dh = dz
            else:
                base = nxt if nxt is not None else dz.new_zeros(rows, hidden)
                dh = torch.index_add(base, 1, index[t] if per_step else index, dz, alpha=scale if per_step else 1)

        grads = []
        for j, w in enumerate(factors):
            if not ctx.needs_input_grad[7 + j]:
                grads.append(None)
                continue
            dout = (dgates if j == last else dinner[j]).flatten(0, 1)
            if j > 0:
                grads.append(_mm_t(dout.t(), inner[j - 1].flatten(0, 1).t()))
                continue
            h_prev = _shifted(hs, h0, reverse)
            if per_step:
                z = torch.gather(h_prev, 2, index[:, None, :].expand(steps, rows, -1)).mul_(scale)
                grads.append(first_rows.weight_grad(z, dout.view(steps, rows, -1)))
            else:
                z = h_prev if index is None else h_prev.index_select(2, index)
                grads.append(_mm_t(dout.t(), z.flatten(0, 1).t()))
        return (dgates, dh, dc, None, None, None, None, *grads)


def _input_projection(x: Tensor, weights: list[Tensor], bias: Tensor | None, keep: KeepSet | None) -> Tensor:
    """``x @ W1^T ... @ Wm^T + bias`` for all steps at once; a keep set shrinks the first GEMM to k columns.

    Per sequence: one gather of k columns of W1, then one GEMM. Per step: T GEMMs of N rows
    (:class:`_StepProjection`); uniform sets gather each step's k columns of W1 (T*k*out1 weights
    copied: 118 MB for W (2600, 650), k=325, T=35, float32), window sets read slices of W1 permuted once.
    """
    if keep is None:
        z = x
        for w in weights[:-1]:
            z = _linear(z, w)
        return _linear(z, weights[-1], bias)
    index = keep.index.to(x.device)
    if not keep.per_step:
        first = weights[0].index_select(1, index) * keep.scale
        return _input_projection(x.index_select(2, index), [first, *weights[1:]], bias, None)
    window = _window(keep, x.device)
    if len(weights) == 1:
        return _StepProjection.apply(x, weights[0], bias, index, keep.scale, window)
    return _input_projection(_StepProjection.apply(x, weights[0], None, index, keep.scale, window), weights[1:],
                             bias, None)


def _fast_recurrence(xp, h0, c0, factors, reverse, keep):
    if torch.compiler.is_compiling():
        # torch.export / torch.compile capture: the in-place kernels below would be recorded as out= ops,
        # which fail once the captured graph runs with autograd on; the plain loop captures cleanly.
        return _autograd_recurrence(xp, h0, c0, _chain(factors), reverse, keep)
    index, scale, step_rows = None, 1.0, None
    if keep is not None:
        index, scale = keep.index.to(xp.device), keep.scale
        if keep.per_step:
            step_rows = _StepRows(factors[0], index, _window(keep, xp.device))
        else:
            factors = [factors[0].index_select(1, index) * scale, *factors[1:]]
    tensors = (xp, h0, c0, *factors)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _Recurrence.apply(xp, h0, c0, reverse, index, scale, step_rows, *factors)
    with torch.no_grad():
        return _recurrence_forward(xp, h0, c0, factors, reverse, index, scale, step_rows, False)[:2]


def _chain(factors: list[Tensor]):
    """``z @ W1^T @ ... @ Wm^T`` as a function of z."""
    def project(z: Tensor) -> Tensor:
        for w in factors:
            z = z @ w.t()
        return z
    return project


def _autograd_recurrence(xp, h0, c0, module, reverse, keep):
    """The plain per-step loop for opaque recurrent projections; autograd does the backward."""
    mask = None if keep is None else keep.mask(h0.shape[-1], xp)
    outputs: list[Tensor | None] = [None] * xp.shape[0]
    h, c = h0, c0
    for t in _order(xp.shape[0], reverse):
        z = h if mask is None else h * (mask[t] if keep.per_step else mask)
        i, f, g, o = (xp[t] + module(z)).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outputs[t] = h
    return torch.stack(outputs), c


def _suffix(kind: str, layer: int, reverse: bool) -> str:
    return f"{kind}_l{layer}{'_reverse' if reverse else ''}"


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a + b


class LSTM(nn.Module):
    """Drop-in ``torch.nn.LSTM`` (no ``proj_size``, no PackedSequence) with replaceable projections.

    Each layer and direction has an input-to-hidden projection (``"ih"``, in -> 4H) and a
    hidden-to-hidden one (``"hh"``, H -> 4H), gates in nn.LSTM's order i, f, g, o. While dense they are
    the parameters ``weight_ih_l0``, ``bias_ih_l0``, ... exactly as in nn.LSTM, so state dicts load
    both ways; :meth:`set_projection` swaps one for any module (registered as ``proj_ih_l0`` etc.).
    Projections exposing ``gemm_factors()`` run on the fast kernels; others run per step by autograd.
    Keep sets (:meth:`set_keep_sets`) apply batch-shared dropout in training mode and shrink the GEMMs.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if proj_size != 0:
            raise UnsupportedError(
                f"LSTM proj_size={proj_size} is unsupported",
                where="fxreduce.modules.LSTM",
                fix="use proj_size=0 (for a cheaper recurrence, swap the hh projection for a low-rank module)",
            )
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise OptionError(f"LSTM {name} must be a positive int, got {value!r}", where="fxreduce.modules.LSTM")
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
            raise OptionError(f"LSTM dropout must be a number in [0, 1], got {dropout!r}", where="fxreduce.modules.LSTM")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size = bidirectional, 0
        self._keep_sets: dict[int, tuple[KeepSet | None, KeepSet | None]] = {}
        factory = {"device": device, "dtype": dtype}
        gates = 4 * hidden_size
        for layer in range(num_layers):
            for reverse in self._directions():
                in_features = self._in_features("ih", layer)
                shapes = [("weight_ih", (gates, in_features)), ("weight_hh", (gates, hidden_size))]
                if bias:
                    shapes += [("bias_ih", (gates,)), ("bias_hh", (gates,))]
                for prefix, shape in shapes:
                    name = f"{prefix}_l{layer}{'_reverse' if reverse else ''}"
                    self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.LSTM's initialisation of the dense projections, drawing in its order (same seed, same weights)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for parameter in self._parameters.values():
            nn.init.uniform_(parameter, -bound, bound)

    def _directions(self) -> tuple[bool, ...]:
        return (False, True) if self.bidirectional else (False,)

    def _in_features(self, kind: str, layer: int) -> int:
        if kind == "hh":
            return self.hidden_size
        return self.input_size if layer == 0 else self.hidden_size * len(self._directions())

    def _slot(self, kind: str, layer: int, reverse: bool) -> str:
        if kind not in KINDS:
            raise OptionError(f"projection kind must be 'ih' or 'hh', got {kind!r}", where="fxreduce.modules.LSTM")
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise OptionError(
                f"layer {layer!r} out of range for an LSTM of {self.num_layers} layers", where="fxreduce.modules.LSTM"
            )
        if reverse and not self.bidirectional:
            raise OptionError("reverse=True needs a bidirectional LSTM", where="fxreduce.modules.LSTM")
        return _suffix(kind, layer, bool(reverse))

    def projection(self, kind: str, layer: int, reverse: bool = False) -> nn.Module:
        """The projection module of one layer/direction; a dense one comes back as an ``nn.Linear``
        sharing this LSTM's parameters (editing it edits the LSTM)."""
        name = self._slot(kind, layer, reverse)
        module = self._modules.get("proj_" + name)
        if module is not None:
            return module
        linear = nn.Linear(self._in_features(kind, layer), 4 * self.hidden_size, bias=self.bias, device="meta")
        linear.weight = self._parameters["weight_" + name]
        if self.bias:
            linear.bias = self._parameters["bias_" + name]
        return linear

    def set_projection(self, kind: str, layer: int, reverse: bool, module: nn.Module) -> None:
        """Replace one projection by ``module`` mapping (..., in) -> (..., 4H).

        The dense ``weight_*``/``bias_*`` parameters of that slot disappear and the module's parameters
        appear as ``proj_<kind>_l<layer>[_reverse].*``; an ``nn.Linear`` with this LSTM's bias setting
        is stored back under nn.LSTM's names instead, so ``set_projection(..., lstm.projection(...))``
        round-trips.
        """
        name = self._slot(kind, layer, reverse)
        if not isinstance(module, nn.Module):
            raise OptionError(f"a projection must be an nn.Module, got {type(module).__name__}", where=f"LSTM {name}")
        self._check_factors(name, module, self._in_features(kind, layer))
        for attr in ("weight_" + name, "bias_" + name, "proj_" + name):
            if attr in self._parameters or attr in self._modules:
                delattr(self, attr)
        if type(module) is nn.Linear and (module.bias is not None) == self.bias:
            self.register_parameter("weight_" + name, module.weight)
            if self.bias:
                self.register_parameter("bias_" + name, module.bias)
        else:
            self.add_module("proj_" + name, module)

    def _check_factors(self, name: str, module: nn.Module, in_features: int) -> None:
        factors = gemm_factors(module)
        if factors is None:
            return
        weights, bias = factors
        expected = in_features
        for w in weights:
            if w.dim() != 2 or w.shape[1] != expected:
                raise OptionError(
                    f"gemm_factors() of {type(module).__name__} chain {[tuple(w.shape) for w in weights]} "
                    f"does not map {in_features} -> {4 * self.hidden_size}",
                    where=f"LSTM {name}",
                    fix="return weights [W1, ..., Wm] with W1 (r1, in), ..., Wm (4*hidden_size, r_m-1)",
                )
            expected = w.shape[0]
        if expected != 4 * self.hidden_size or (bias is not None and tuple(bias.shape) != (expected,)):
            raise OptionError(
                f"{type(module).__name__} maps to {expected} features (bias "
                f"{None if bias is None else tuple(bias.shape)}), the gates need {4 * self.hidden_size}",
                where=f"LSTM {name}",
            )

    def _factors(self, kind: str, layer: int, reverse: bool) -> tuple[list[Tensor], Tensor | None] | None:
        name = _suffix(kind, layer, reverse)
        module = self._modules.get("proj_" + name)
        if module is not None:
            return gemm_factors(module)
        return [self._parameters["weight_" + name]], self._parameters.get("bias_" + name)

    def set_keep_sets(self, layer: int, input: KeepSet | None = None, hidden: KeepSet | None = None) -> None:
        """Set (or, with None, remove) layer ``layer``'s keep sets; they apply in training mode only.

        ``input`` acts on the layer's input (units of x feeding W_ih) and replaces nn.LSTM's random
        between-layer dropout there; ``hidden`` acts on the recurrent state h feeding W_hh (not on the
        output), with the same set for both directions. Equivalent to multiplying that tensor by the
        set's 0/scale mask, but the fast path only multiplies and differentiates the kept columns.
        """
        self._slot("ih", layer, False)
        for what, keep, width in (
            ("input", input, self._in_features("ih", layer)),
            ("hidden", hidden, self.hidden_size),
        ):
            if keep is not None:
                self._check_keep(what, layer, keep, width)
        if input is None and hidden is None:
            self._keep_sets.pop(layer, None)
        else:
            self._keep_sets[layer] = (input, hidden)

    def _check_keep(self, what: str, layer: int, keep: KeepSet, width: int) -> None:
        where = f"LSTM layer {layer} {what} keep set"
        if not isinstance(keep, KeepSet):
            raise OptionError(f"expected a KeepSet, got {type(keep).__name__}", where=where)
        index = keep.index
        if index.dtype != torch.long or index.dim() not in (1, 2) or index.shape[-1] == 0:
            raise OptionError(
                f"index must be a non-empty int64 tensor of shape (k,) or (T, k), got {index.dtype} {tuple(index.shape)}",
                where=where,
            )
        if int(index.min()) < 0 or int(index.max()) >= width:
            raise OptionError(f"index values must lie in [0, {width})", where=where)
        ordered = index.sort(-1).values
        if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
            raise OptionError("index repeats a unit", where=where, fix="keep each unit at most once per set")
        if not keep.scale > 0:
            raise OptionError(f"scale must be positive, got {keep.scale}", where=where)

    def keep_sets(self, layer: int) -> tuple[KeepSet | None, KeepSet | None]:
        """Layer ``layer``'s (input, hidden) keep sets."""
        self._slot("ih", layer, False)
        return self._keep_sets.get(layer, (None, None))

    def clear_keep_sets(self) -> None:
        self._keep_sets.clear()

    def cost_keep_sets(self) -> dict[int, tuple[KeepSet | None, KeepSet | None]]:
        """The keep sets a training step's cost counts: the ones set (a subclass drawing them per step
        returns sets of the sizes it draws)."""
        return self._keep_sets

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None):
        """nn.LSTM's forward: ``(output, (h_n, c_n))`` for (T, N, in), (N, T, in) or unbatched (T, in)."""
        if isinstance(input, PackedSequence):
            raise UnsupportedError(
                "PackedSequence input is unsupported", where="fxreduce.modules.LSTM", fix="pad the sequences"
            )
        if input.dim() not in (2, 3) or input.shape[-1] != self.input_size:
            raise InputError(
                f"LSTM expects input (T, N, {self.input_size}) or (T, {self.input_size}), got {tuple(input.shape)}",
                where="fxreduce.modules.LSTM",
            )
        unbatched = input.dim() == 2
        x = input.unsqueeze(1) if unbatched else input.transpose(0, 1) if self.batch_first else input
        x = x.contiguous()
        h0, c0 = self._initial_state(x, hx, unbatched)
        if self._torch_kernel_serves(x):
            output, h_n, c_n = torch._VF.lstm(x, (h0, c0), self._flat_weights(), self.bias, self.num_layers,
                                              self.dropout, self.training, self.bidirectional, False)
        else:
            output, h_n, c_n = self._decomposed(x, h0, c0)
        if unbatched:
            return output.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        return (output.transpose(0, 1) if self.batch_first else output), (h_n, c_n)

    def _torch_kernel_serves(self, x: Tensor) -> bool:
        """A dense LSTM (no replaced projections, no keep sets in use) below TORCH_KERNEL_MAX_HIDDEN runs
        nn.LSTM's own fused kernel: there it is faster than the decomposed recurrence (measured), and the
        numbers are nn.LSTM's exactly. Shape propagation and graph capture always see the decomposition."""
        if self.hidden_size >= TORCH_KERNEL_MAX_HIDDEN or (self.training and self._keep_sets):
            return False
        if any(name.startswith("proj_") for name in self._modules):
            return False
        return not (torch.compiler.is_compiling() or is_fake(x)) and x.device.type == "cpu"

    def _flat_weights(self) -> list[Tensor]:
        """The parameters in nn.LSTM's flat order: per layer and direction w_ih, w_hh[, b_ih, b_hh]."""
        kinds = ("weight_ih", "weight_hh", "bias_ih", "bias_hh") if self.bias else ("weight_ih", "weight_hh")
        return [self._parameters[f"{kind}_l{layer}{'_reverse' if reverse else ''}"]
                for layer in range(self.num_layers) for reverse in self._directions() for kind in kinds]

    def _decomposed(self, x: Tensor, h0: Tensor, c0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """All layers and directions on the decomposed kernels (keep sets, replaced projections)."""
        keep_sets = self._keep_sets if self.training else {}
        hn, cn = [], []
        for layer in range(self.num_layers):
            keep_in, keep_hidden = keep_sets.get(layer, (None, None))
            for keep in (keep_in, keep_hidden):
                if keep is not None and keep.per_step and keep.index.shape[0] != x.shape[0]:
                    raise InputError(
                        f"a per-step keep set of layer {layer} has {keep.index.shape[0]} steps, the input {x.shape[0]}",
                        where="fxreduce.modules.LSTM",
                        fix="give the index one row per time step",
                    )
            if layer > 0 and self.dropout > 0 and self.training and keep_in is None:
                x = F.dropout(x, self.dropout, True)
            outputs = []
            for reverse in self._directions():
                slot = layer * len(self._directions()) + int(reverse)
                hs, c = self._direction(x, h0[slot], c0[slot], layer, reverse, keep_in, keep_hidden)
                outputs.append(hs)
                hn.append(hs[0] if reverse else hs[-1])
                cn.append(c)
            x = outputs[0] if len(outputs) == 1 else torch.cat(outputs, 2)
        return x, torch.stack(hn), torch.stack(cn)

    def _initial_state(self, x: Tensor, hx, unbatched: bool) -> tuple[Tensor, Tensor]:
        shape = (self.num_layers * len(self._directions()), x.shape[1], self.hidden_size)
        if hx is None:
            zeros = x.new_zeros(shape)
            return zeros, zeros
        h0, c0 = hx
        if unbatched:
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        for name, state in (("h0", h0), ("c0", c0)):
            if tuple(state.shape) != shape:
                expected = (shape[0], shape[2]) if unbatched else shape
                raise InputError(f"LSTM {name} must have shape {expected}", where="fxreduce.modules.LSTM")
        return h0, c0

    def _direction(self, x, h0, c0, layer, reverse, keep_in, keep_hidden) -> tuple[Tensor, Tensor]:
        ih = self._factors("ih", layer, reverse)
        hh = self._factors("hh", layer, reverse)
        hh_bias = None if hh is None else hh[1]
        if ih is not None:
            xp = _input_projection(x, ih[0], _add(ih[1], hh_bias), keep_in)
        else:
            module = self._modules["proj_" + _suffix("ih", layer, reverse)]
            xp = module(x if keep_in is None else x * keep_in.mask(x.shape[-1], x))
            if hh_bias is not None:
                xp = xp + hh_bias
        if hh is not None:
            return _fast_recurrence(xp, h0, c0, hh[0], reverse, keep_hidden)
        module = self._modules["proj_" + _suffix("hh", layer, reverse)]
        return _autograd_recurrence(xp, h0, c0, module, reverse, keep_hidden)

    def fxreduce_macs(self, input_shapes, training: bool = False) -> dict[str, object]:
        """Multiply-adds of each projection (keys ``ih_l0``, ``hh_l0``, ``ih_l0_reverse``, ...).

        ``input_shapes[0]`` is the input's shape (ints or sympy expressions). A dense GEMM over the
        T*N rows costs rows*in*out forward; ``training`` adds the input- and weight-gradient GEMMs (3x).
        Projections with their own ``fxreduce_macs`` are asked with shape (T*N, in). With ``training``,
        keep sets count k instead of the full width where the fast path uses them.
        """
        shape = input_shapes[0]
        rows = shape[0] if len(shape) == 2 else shape[0] * shape[1]
        macs: dict[str, object] = {}
        keep_sets = self.cost_keep_sets() if training else {}
        for layer in range(self.num_layers):
            keep_in, keep_hidden = keep_sets.get(layer, (None, None))
            for reverse in self._directions():
                for kind, keep in (("ih", keep_in), ("hh", keep_hidden)):
                    macs[_suffix(kind, layer, reverse)] = self._projection_macs(kind, layer, reverse, rows, keep, training)
        return macs

    def _projection_macs(self, kind, layer, reverse, rows, keep, training):
        name = _suffix(kind, layer, reverse)
        in_features = self._in_features(kind, layer)
        module = self._modules.get("proj_" + name)
        factors = self._factors(kind, layer, reverse)
        own = getattr(module, "fxreduce_macs", None)
        if own is not None and (keep is None or factors is None):
            result = own(((rows, in_features),), training)
            return sum(result.values()) if isinstance(result, dict) else result
        if factors is None:
            raise CostError(
                f"the {type(module).__name__} projection declares no cost",
                where=f"LSTM {name}",
                fix="give it fxreduce_macs(input_shapes, training) or gemm_factors()",
            )
        width = in_features if keep is None else keep.size
        total = 0
        for w in factors[0]:
            total = total + rows * width * w.shape[0]
            width = w.shape[0]
        return total * 3 if training else total

    @classmethod
    def from_torch(cls, lstm: nn.LSTM) -> "LSTM":
        """A copy of ``lstm`` (weights copied, ``lstm`` untouched), in the same train/eval mode."""
        if not isinstance(lstm, nn.LSTM):
            raise OptionError(f"from_torch expects a torch.nn.LSTM, got {type(lstm).__name__}")
        if lstm.proj_size:
            raise UnsupportedError(
                f"nn.LSTM with proj_size={lstm.proj_size} is unsupported",
                where="LSTM.from_torch",
                fix="convert an LSTM without projections",
            )
        weight = lstm.weight_ih_l0
        new = cls(
            lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.bias, lstm.batch_first,
            float(lstm.dropout), lstm.bidirectional, device="meta", dtype=weight.dtype,
        )
        new.to_empty(device=weight.device)
        new.load_state_dict(lstm.state_dict())
        return new.train(lstm.training)

    def to_torch(self) -> nn.LSTM:
        """An equivalent ``torch.nn.LSTM`` (factorised projections multiplied out; keep sets dropped)."""
        slots = [(kind, layer, reverse) for layer in range(self.num_layers) for reverse in self._directions() for kind in KINDS]
        dense = {}
        for kind, layer, reverse in slots:
            factors = self._factors(kind, layer, reverse)
            if factors is None:
                raise UnsupportedError(
                    f"projection {_suffix(kind, layer, reverse)} has no gemm_factors(), so no dense equivalent",
                    where="LSTM.to_torch",
                    fix="give the module gemm_factors() or keep using fxreduce.modules.LSTM",
                )
            dense[_suffix(kind, layer, reverse)] = factors
        weight = dense["ih_l0"][0][0]
        has_bias = any(bias is not None for _, bias in dense.values())
        lstm = nn.LSTM(
            self.input_size, self.hidden_size, self.num_layers, has_bias, self.batch_first, self.dropout,
            self.bidirectional, device="meta", dtype=weight.dtype,
        )
        lstm.to_empty(device=weight.device)
        with torch.no_grad():
            for name, (weights, bias) in dense.items():
                product = weights[0]
                for w in weights[1:]:
                    product = w @ product
                getattr(lstm, "weight_" + name).copy_(product)
                if has_bias:
                    getattr(lstm, "bias_" + name).copy_(bias if bias is not None else torch.zeros_like(product[:, 0]))
        return lstm.train(self.training)

    def extra_repr(self) -> str:
        text = f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"
        for name, default in (("bias", True), ("batch_first", False), ("dropout", 0.0), ("bidirectional", False)):
            if getattr(self, name) != default:
                text += f", {name}={getattr(self, name)}"
        return text
