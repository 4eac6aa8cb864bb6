"""Per-step keep sets on a projection's input: T GEMMs of N rows over each step's kept columns, forward and
both gradients; on the native indirect-K kernels where they serve, on torch's GEMMs otherwise."""

from __future__ import annotations

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.autograd.function import once_differentiable

from ... import native
from .keep_sets import KeepSet
from .onednn import DNN_LINEAR, WINDOW_DNN_MIN_ROWS, WINDOW_DNN_MIN_WEIGHTS, linear, mm_t, onednn_ok


def steps_at_once(tensor: Tensor) -> bool:
    """Whether per-step work runs all its steps at once, one op each: in shape propagation (a fake run outside
    :func:`native.fake_runs_as_eager`, not graph capture) nothing has values, so no step waits for the one
    before it. The ops and their counts are the loop's in T-fold larger calls: T times fewer fake ops
    (each costs milliseconds with symbolic sizes), and no loop pins the sequence length to its example."""
    return is_fake(tensor) and not native.in_fake_eager_run() and not torch.compiler.is_compiling()


class StepRows:
    """The rows of ``W^T`` (W's input columns) that each step's keep set selects, for per-step sets.

    Uniform sets gather k rows per step. Window sets (:meth:`KeepSet.windows`) permute ``W^T`` once and
    read each step's rows as a contiguous slice of it: no per-step copy, and the weight gradient is
    accumulated into column windows of one buffer instead of T gathered copies.
    """

    def __init__(self, weight: Tensor, index: Tensor, window: tuple[Tensor, list[int]] | None):
        self.index, self.width, self.k = index, weight.shape[1], index.shape[1]
        self.order, self.starts = window if window is not None else (None, None)
        # The weight's gradient comes from weight_grad, so the copy is made outside autograd; gathering the
        # rows of a contiguous copy reads contiguous memory, where gathering from weight.t() strides across it.
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

    def every_step(self) -> Tensor:
        """Every step's rows at once, (T, k, out)."""
        if self.starts is None:
            return self.rows.index_select(0, self.index.flatten()).unflatten(0, self.index.shape)
        windows = self.rows.unfold(0, self.k, 1)  # (positions, out, k): the k rows from each position
        return windows.index_select(0, torch.tensor(self.starts)).transpose(1, 2)

    def times_every_step(self, z: Tensor, add: Tensor | None = None) -> Tensor:
        """:meth:`times` for all steps of ``z`` (T, N, k) at once (see :func:`steps_at_once`)."""
        rows = self.every_step()
        return torch.bmm(z, rows) if add is None else torch.baddbmm(add, z, rows)

    def times_t_every_step(self, dz: Tensor) -> Tensor:
        """:meth:`times_t` for all steps of ``dz`` (T, N, out) at once."""
        return torch.bmm(dz, self.every_step().transpose(1, 2))

    def times(self, z: Tensor, t: int, add: Tensor | None = None) -> Tensor:
        """``z @ rows_t (+ add)``: on oneDNN where it applies, which takes the slice as a transposed weight
        without copying it and runs these N-row GEMMs faster than ``mm``."""
        rows = self(t)
        if onednn_ok(z):
            out = DNN_LINEAR(z, rows.t(), None, "none", [], "")
            return out if add is None else out.add_(add)
        return torch.mm(z, rows) if add is None else torch.addmm(add, z, rows)

    def times_t(self, dz: Tensor, t: int) -> Tensor:
        """``dz @ rows_t^T``, the input gradient of :meth:`times`."""
        rows = self(t)
        return DNN_LINEAR(dz, rows, None, "none", [], "") if onednn_ok(dz) else torch.mm(dz, rows.t())

    def weight_grad(self, z: Tensor, dout: Tensor) -> Tensor:
        """dL/dW (out, in) from the kept, scaled inputs ``z`` (T, N, k) and output gradients (T, N, out)."""
        if self.starts is None or steps_at_once(z):
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
            large = inputs.shape[0] >= WINDOW_DNN_MIN_ROWS and grads.shape[1] * self.k >= WINDOW_DNN_MIN_WEIGHTS
            if large and onednn_ok(inputs):
                window = mm_t(grads.t(), inputs.t())
                for columns, part in parts:
                    columns += window[:, part]
            else:
                for columns, part in parts:
                    # addmm's out= form rather than addmm_: torch's FLOP counter has a formula for the one only.
                    torch.addmm(columns, grads.t(), inputs[:, part], out=columns)
        return permuted.index_select(1, self.unpermute)


def window_of(keep: KeepSet, device) -> tuple[Tensor, list[int]] | None:
    return None if keep.order is None else (keep.order.to(device), keep.offsets.tolist())


def _by_group(step_rows: StepRows, inputs: Tensor, out: Tensor, product) -> Tensor:
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
        step_rows = StepRows(weight, index, window)
        if steps_at_once(xk):
            out = step_rows.times_every_step(xk, bias)
        else:
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
            if steps_at_once(dout):
                dxk = step_rows.times_t_every_step(dout)
            else:
                dxk = _by_group(step_rows, dout, torch.empty_like(xk), step_rows.times_t)
            kept = index[:, None, :].expand(-1, xk.shape[1], -1)
            dx = xk.new_zeros(ctx.x_shape).scatter_(2, kept, dxk.mul_(ctx.scale))
        if ctx.needs_input_grad[1]:
            dw = step_rows.weight_grad(xk, dout)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dout.sum((0, 1))
        return dx, dw, db, None, None, None


def input_projection(x: Tensor, weights: list[Tensor], bias: Tensor | None, keep: KeepSet | None) -> Tensor:
    """``x @ W1^T ... @ Wm^T + bias`` for all steps at once; a keep set shrinks the first GEMM to k columns.

    Per sequence: one gather of k columns of W1, then one GEMM. Per step, on the native kernels: one
    indirect-K GEMM over all steps; on the torch path T GEMMs of N rows (:class:`_StepProjection`); uniform sets gather each step's k columns of W1 (T*k*out1 weights
    copied: 118 MB for W (2600, 650), k=325, T=35, float32), window sets read slices of W1 permuted once.
    """
    if keep is None:
        z = x
        for w in weights[:-1]:
            z = linear(z, w)
        return linear(z, weights[-1], bias)
    index = keep.index.to(x.device)
    if not keep.per_step:
        first = weights[0].index_select(1, index) * keep.scale
        return input_projection(x.index_select(2, index), [first, *weights[1:]], bias, None)
    if native.serves_eagerly(x, weights[0], bias):
        # Indirect-K: each step's kept units read as rows of W1^T (in place where W1 is stored transposed,
        # else transposed once); no weight gathered.
        steps, rows, _ = x.shape
        xk = torch.gather(x, 2, index[:, None, :].expand(steps, rows, -1)) * keep.scale
        wt = weights[0].t()
        wt = wt if wt.is_contiguous() else native.transposed(weights[0])
        if len(weights) == 1:
            return native.gather_matmul(xk, wt, index, bias)
        return input_projection(native.gather_matmul(xk, wt, index), weights[1:], bias, None)
    window = window_of(keep, x.device)
    if len(weights) == 1:
        return _StepProjection.apply(x, weights[0], bias, index, keep.scale, window)
    return input_projection(_StepProjection.apply(x, weights[0], None, index, keep.scale, window), weights[1:],
                             bias, None)
