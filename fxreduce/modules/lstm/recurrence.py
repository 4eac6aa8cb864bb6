"""The LSTM recurrence over a whole sequence: per step one small GEMM with the recurrent weights and the
fused cell, as one autograd Function with a hand-written backward; on the native time loop where it
serves, on torch's kernels otherwise (the reference)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ... import native
from .onednn import StepMatmul, mm_t
from .step_projection import StepRows, steps_at_once, window_of


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
    if steps_at_once(xp):
        return _forward_every_step(xp, factors, reverse, index, scale, step_rows)
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
    mats = [None if per_step and j == 0 else StepMatmul(w, rows) for j, w in enumerate(factors)]
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
        c, h = _cell(z, c, a_t[s], (i_t[s], f_t[s], g_t[s], o_t[s]), cs_t[s], tcs_t[s], hs_t[t], minus_one)
    return hs, c.clone(), acts, cs, tcs, inner


def _cell(z, c, acts, gates, c_out, tanh_c_out, h_out, minus_one):
    """The LSTM cell on the gate pre-activations ``z`` (..., 4H), which it overwrites: the gate activations
    into ``acts`` (whose views are ``gates``: i, f, g, o), the new cell state, its tanh and the hidden state
    into the ``*_out`` buffers from the state ``c``. Returns (cell state, hidden state).

    tanh(x) = 2 sigmoid(2x) - 1, in place and without Python scalars: torch's CPU sigmoid is much faster than
    its tanh, and a scalar operand costs a tensor conversion per call."""
    i, f, g, o = gates
    hidden = z.shape[-1] // 4
    z_g = z.narrow(-1, 2 * hidden, hidden)
    z_g.add_(z_g)
    torch.sigmoid(z, out=acts)
    torch.add(minus_one, g, alpha=2, out=g)
    c = torch.mul(f, c, out=c_out).addcmul_(i, g)
    tanh_c = torch.add(c, c, out=tanh_c_out).sigmoid_()
    torch.add(minus_one, tanh_c, alpha=2, out=tanh_c)
    return c, torch.mul(o, tanh_c, out=h_out)


def _forward_every_step(xp, factors, reverse, index, scale, step_rows):
    """:func:`_recurrence_forward` (saving) with every step at once (see :func:`steps_at_once`): each op of
    a step over all steps; the states entering the steps are stand-ins of their shape."""
    steps, rows, width = xp.shape
    hidden = width // 4
    hs, cs, tcs = (xp.new_empty(steps, rows, hidden) for _ in range(3))
    acts = xp.new_empty(steps, rows, width)
    z = hs
    if index is not None and index.dim() == 2:
        z = torch.gather(hs, 2, index[:, None, :].expand(steps, rows, -1)).mul_(scale)
    elif index is not None:
        z = hs.index_select(2, index)
    inner = [xp.new_empty(steps, rows, w.shape[0]) for w in factors[:-1]]
    last = len(factors) - 1
    for j, w in enumerate(factors):
        add = xp if j == last else None
        if j == 0 and step_rows is not None:
            z = step_rows.times_every_step(z, add)
        else:
            z = StepMatmul(w, steps * rows)(z.flatten(0, 1), None if add is None else add.flatten(0, 1))
            z = z.unflatten(0, (steps, rows))
        if j < last:
            inner[j].copy_(z)
    c, _ = _cell(z, cs, acts, acts.chunk(4, 2), cs, tcs, hs, xp.new_full((), -1.0))
    return hs, c[0 if reverse else -1].clone(), acts, cs, tcs, inner


class _Recurrence(torch.autograd.Function):
    """The LSTM recurrence over a whole sequence with a hand-written backward.

    Inputs: ``xp`` (T, N, 4H) input projections with all biases, ``h0``, ``c0`` (N, H), the direction,
    an optional hidden keep index ((k,): columns of ``factors[0]`` already gathered and scaled; (T, k):
    selected here per step through ``step_rows``, a :class:`StepRows` of ``factors[0]``) with its scale,
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
        steps, rows, _ = acts.shape
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

        dinner = [torch.empty_like(z) for z in inner]
        steps_of = _backward_every_step if steps_at_once(dgates) else _backward_steps
        dh, dc = steps_of(dhs, dc, dc_from_h, f, dgates, factors, dinner, index, scale, ctx.step_rows, reverse)

        last = len(factors) - 1
        grads = []
        for j, w in enumerate(factors):
            if not ctx.needs_input_grad[7 + j]:
                grads.append(None)
                continue
            dout = (dgates if j == last else dinner[j]).flatten(0, 1)
            if j > 0:
                grads.append(mm_t(dout.t(), inner[j - 1].flatten(0, 1).t()))
                continue
            h_prev = _shifted(hs, h0, reverse)
            if per_step:
                z = torch.gather(h_prev, 2, index[:, None, :].expand(steps, rows, -1)).mul_(scale)
                grads.append(ctx.step_rows.weight_grad(z, dout.view(steps, rows, -1)))
            else:
                z = h_prev if index is None else h_prev.index_select(2, index)
                grads.append(mm_t(dout.t(), z.flatten(0, 1).t()))
        return (dgates, dh, dc, None, None, None, None, *grads)


def _backward_steps(dhs, dc, dc_from_h, f, dgates, factors, dinner, index, scale, first_rows, reverse):
    """The backward's loop over steps, latest first: completes ``dgates`` (the gate gradients) and ``dinner``
    (the factor outputs' gradients) in place; returns the gradients of h0 and c0."""
    steps, rows, width = dgates.shape
    hidden = width // 4
    per_step = index is not None and index.dim() == 2
    last = len(factors) - 1
    back = [None if per_step and j == 0 else StepMatmul(w.t(), rows) for j, w in enumerate(factors)]
    go = dgates.narrow(2, 3 * hidden, hidden)
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
    return dh, dc


def _backward_every_step(dhs, dc, dc_from_h, f, dgates, factors, dinner, index, scale, first_rows, reverse):
    """:func:`_backward_steps` with every step at once (see :func:`steps_at_once`): each op of a step over all
    steps, the gradients entering the steps standing in for the ones a step would pass on."""
    steps, rows, width = dgates.shape
    hidden = width // 4
    dc = torch.addcmul(dc.expand(steps, rows, hidden), dhs, dc_from_h)
    dgates.narrow(2, 0, 3 * hidden).unflatten(2, (3, hidden)).mul_(dc.unsqueeze(2))
    dgates.narrow(2, 3 * hidden, hidden).mul_(dhs)
    dc.mul_(f)
    dz = dgates
    for j in range(len(factors) - 1, -1, -1):
        if j == 0 and first_rows is not None:
            dz = first_rows.times_t_every_step(dz)
        else:
            add = dhs.flatten(0, 1) if j == 0 and index is None else None
            dz = StepMatmul(factors[j].t(), steps * rows)(dz.flatten(0, 1), add).unflatten(0, (steps, rows))
        if j > 0:
            dinner[j - 1].copy_(dz)
    if index is not None and index.dim() == 2:
        dz = dhs.scatter_add(2, index[:, None, :].expand(steps, rows, -1), dz)
    elif index is not None:
        dz = dhs.index_add(2, index, dz)
    first = steps - 1 if reverse else 0
    return dz[first], dc[first]


def fast_recurrence(xp, h0, c0, factors, reverse, keep):
    if torch.compiler.is_compiling():
        # torch.export / torch.compile capture: the in-place kernels below would be recorded as out= ops,
        # which fail once the captured graph runs with autograd on; the plain loop captures cleanly.
        return autograd_recurrence(xp, h0, c0, _chain(factors), reverse, keep)
    if len(factors) == 1 and native.serves_eagerly(xp, h0, c0, factors[0]):
        # The C++ time loop, on W_hh^T as a view: the kernel packs it once per call for the per-step GEMMs
        # and returns its gradient in W_hh's layout, so neither direction copies the weight here.
        index = None if keep is None else keep.index.to(xp.device)
        return native.lstm_layer(xp, h0, c0, factors[0].t(), index, 1.0 if keep is None else keep.scale, reverse)
    index, scale, step_rows = None, 1.0, None
    if keep is not None:
        index, scale = keep.index.to(xp.device), keep.scale
        if keep.per_step:
            step_rows = StepRows(factors[0], index, window_of(keep, xp.device))
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


def autograd_recurrence(xp, h0, c0, module, reverse, keep):
    """The plain per-step loop for opaque recurrent projections; autograd does the backward. Shape propagation
    runs it step by step too: autograd's gradient sums across steps (the projection's weights, each state's two
    readers) count as the eager run does."""
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
