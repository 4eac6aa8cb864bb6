"""Structured dropout (Sarma et al., NeurIPS 2021): dropout masks shared by the whole batch, so training
GEMMs skip the dropped units' weight columns forward and backward.

``StructuredDropoutLSTM`` is the decomposed :class:`~fxreduce.modules.lstm.LSTM` drawing its keep sets
itself at every training forward: on each layer's input (the dropout that fed the LSTM, and nn.LSTM's
between-layer dropout) and, with ``recurrent``, on the state h feeding W_hh. ``StructuredDropoutLinear``
is a Dropout -> Linear chain (e.g. a decoder) in one module that multiplies only the kept input columns.
Both compute exactly the original modules in eval mode and keep their parameter names.

Mask modes: ``per_step`` (the paper's case) draws an independent uniform k-subset at every time step;
``per_sequence`` one k-subset for all steps (variational dropout, but shared by the batch);
``per_step_window`` a per-sequence random permutation of the units and, per step, a random cyclic
window of k units in it: every unit is still kept with probability exactly k/H at each step and the sets
change every step, but they are not uniform over all k-subsets (units next to each other in the
permutation are kept together), in exchange for weight columns read as slices instead of gathered per step.
With ``offsets=m`` the windows start at one of m evenly spaced offsets only (still kept with probability
k/H, as the permutation is uniform): the steps that share an offset share their kept columns, so the
input, decoder and weight-gradient GEMMs run once per offset over all those steps' rows instead of once
per step.

Masks come from a generator seeded by ``(seed, number of training forwards so far)``: a run is reproducible
from the seed, and data-parallel ranks that start from the same seed draw the same masks at every step
without communicating.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake

from .. import native
from ..errors import OptionError
from .lstm import DecomposedLSTM, KeepSet, input_projection

MODES = ("per_step", "per_sequence", "per_step_window")


def keep_count(p: float, width: int) -> int:
    """k = round((1 - p) * width), at least one unit, so shapes stay static whatever the draw."""
    return max(1, round((1 - p) * width))


def check_settings(p: float, mode: str, where: str, offsets: int | None = None) -> None:
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 <= p < 1:
        raise OptionError(f"dropout p must be a number in [0, 1), got {p!r}", where=where,
                          fix="p=1 would drop every unit; use 0 <= p < 1")
    if mode not in MODES:
        raise OptionError(f"mode must be one of {', '.join(MODES)}, got {mode!r}", where=where)
    if offsets is not None and (not isinstance(offsets, int) or isinstance(offsets, bool) or offsets < 1):
        raise OptionError(f"offsets must be None or an int >= 1, got {offsets!r}", where=where,
                          fix="None lets a window start anywhere; m lets it start at m evenly spaced places")
    if offsets is not None and mode != "per_step_window":
        raise OptionError(f"offsets applies to mode='per_step_window' only, not {mode!r}", where=where,
                          fix="drop offsets or use mode='per_step_window'")


class MaskDraws:
    """Keep sets drawn reproducibly: the n-th training forward uses a generator seeded from (seed, n)."""

    def __init__(self, seed: int):
        self.seed, self.draws = int(seed), 0

    def next_generator(self) -> torch.Generator:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.draws) % (1 << 63))
        self.draws += 1
        return generator


def draw_keep_set(generator: torch.Generator, width: int, k: int, scale: float, steps: int | None,
                  mode: str, offsets: int | None = None) -> KeepSet:
    """A batch-shared keep set of k of ``width`` units: (k,) for a sequence, (steps, k) per step.

    ``offsets`` (per_step_window): None lets each step's window start anywhere in the permutation; m, at
    one of m evenly spaced starts.
    """
    if mode == "per_sequence" or steps is None:
        return KeepSet(torch.randperm(width, generator=generator)[:k].sort().values, scale)
    if mode == "per_step":
        return KeepSet(native.smallest_k(torch.rand(steps, width, generator=generator), k), scale)
    order = torch.randperm(width, generator=generator)
    if offsets is None:
        starts = torch.randint(0, width, (steps,), generator=generator)
    else:
        choices = torch.tensor(sorted({j * width // offsets for j in range(offsets)}))
        starts = choices[torch.randint(0, len(choices), (steps,), generator=generator)]
    return KeepSet.windows(order, starts, k, scale)


def stand_in_keep_set(width: int, k: int, scale: float, steps: int | None, mode: str) -> KeepSet:
    """A fake run's keep set: the first k units, no draw used up. Shape and cost propagation take one set for
    the sequence; the latency model's run (:func:`fxreduce.native.fake_runs_as_eager`) takes a draw's shape,
    one row per step in the per-step modes, so that it prices the kernels a training step runs."""
    index = torch.arange(k)
    if steps is None or mode == "per_sequence" or not native.in_fake_eager_run():
        return KeepSet(index, scale)
    return KeepSet(index.expand(steps, k).contiguous(), scale)


def stored_transposed(weight: Tensor) -> nn.Parameter:
    """``weight``'s values as a Parameter laid out as its transpose in memory: it still reads (out, in), but a
    kept unit is one contiguous row of W^T in place, and the native kernels' gradients come back in that
    layout, so a training step copies no weight either way. (State_dict tensors are then transposed views:
    torch.save keeps them; safetensors wants ``{k: v.contiguous() for k, v in sd.items()}``.)"""
    return nn.Parameter(weight.detach().t().contiguous().t(), weight.requires_grad)


class StructuredDropoutLSTM(DecomposedLSTM):
    """The decomposed LSTM with batch-shared dropout drawn at every training forward.

    ``mask_input``: drop units of layer 0's input (the dropout that fed the LSTM); layers above 0 are
    masked when the LSTM had between-layer dropout; ``recurrent``: also the state h feeding W_hh. Every
    mask drops with probability ``p`` and scales kept units by 1/(1 - p). ``reference = True`` computes
    the same masked step densely (a plain autograd loop) — the contract the fast path is checked against.
    """

    def __init__(self, *args, p: float = 0.5, mode: str = "per_step", recurrent: bool = False,
                 mask_input: bool = False, seed: int = 0, offsets: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._configure(p, mode, recurrent, mask_input, seed, offsets)
        self.reference = False

    def _configure(self, p: float, mode: str, recurrent: bool, mask_input: bool, seed: int,
                   offsets: int | None) -> None:
        check_settings(p, mode, "StructuredDropoutLSTM", offsets)
        self.p, self.mode, self.recurrent, self.mask_input = float(p), mode, bool(recurrent), bool(mask_input)
        self.offsets = offsets
        self.masks = MaskDraws(seed)

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM, *, p: float, mode: str, recurrent: bool, mask_input: bool,
                  seed: int, offsets: int | None = None) -> "StructuredDropoutLSTM":
        """A copy of ``lstm`` (weights copied) dropping as configured; nn.LSTM's state_dict loads into it."""
        new = cls.from_torch(lstm)
        new._configure(p, mode, recurrent, mask_input, seed, offsets)
        new._store_weights_transposed()
        return new

    def _store_weights_transposed(self) -> None:
        for name, param in list(self._parameters.items()):
            if name.startswith("weight_") and param is not None:
                self.register_parameter(name, stored_transposed(param))

    def mask_widths(self) -> dict[int, tuple[int | None, int | None]]:
        """Per layer, the widths of the (input, hidden) tensors this module masks (None: not masked)."""
        widths = {}
        for layer in range(self.num_layers):
            masked_input = self.mask_input if layer == 0 else self.dropout > 0
            widths[layer] = (self._in_features("ih", layer) if masked_input else None,
                             self.hidden_size if self.recurrent else None)
        return widths

    def _draw(self, steps: int, like: Tensor) -> dict[int, tuple[KeepSet | None, KeepSet | None]]:
        if is_fake(like):  # shape, cost and latency propagation: sets of the right size, no draw used up
            return self._stand_in_sets(steps)
        scale = 1.0 / (1.0 - self.p)
        generator = self.masks.next_generator()
        return {layer: tuple(None if w is None else
                             draw_keep_set(generator, w, keep_count(self.p, w), scale, steps, self.mode,
                                           self.offsets)
                             for w in widths) for layer, widths in self.mask_widths().items()}

    def cost_keep_sets(self) -> dict[int, tuple[KeepSet | None, KeepSet | None]]:
        """Keep sets of the right sizes (the first k units), for shapes and costs."""
        return self._stand_in_sets(None)

    def _stand_in_sets(self, steps: int | None) -> dict[int, tuple[KeepSet | None, KeepSet | None]]:
        scale = 1.0 / (1.0 - self.p)
        return {layer: tuple(None if w is None else stand_in_keep_set(w, keep_count(self.p, w), scale, steps, self.mode)
                             for w in widths) for layer, widths in self.mask_widths().items()}

    @property
    def last_keep_sets(self) -> dict[int, tuple[KeepSet | None, KeepSet | None]]:
        """The (input, hidden) keep sets per layer of the latest training forward."""
        return dict(self._keep_sets)

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None):
        if not self.training:
            return super().forward(input, hx)
        steps = input.shape[1] if input.dim() == 3 and self.batch_first else input.shape[0]
        previous, self._keep_sets = self._keep_sets, self._draw(steps, input)
        try:
            if self.reference:
                return masked_lstm_reference(self, input, hx, self._keep_sets)
            return super().forward(input, hx)
        finally:
            if is_fake(input):  # a fake run's stand-in sets last one call: no fake tensor outlives the run
                self._keep_sets = previous

    def extra_repr(self) -> str:
        offsets = "" if self.offsets is None else f", offsets={self.offsets}"
        return (super().extra_repr() + f", p={self.p:g}, mode={self.mode}{offsets}, recurrent={self.recurrent}, "
                f"mask_input={self.mask_input}")


def masked_lstm_reference(lstm: DecomposedLSTM, input: Tensor, hx, keep_sets) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """nn.LSTM's training forward with explicit 0/scale masks, densely, autograd through a per-step loop."""
    unbatched = input.dim() == 2
    x = input.unsqueeze(1) if unbatched else input.transpose(0, 1) if lstm.batch_first else input
    directions = (False, True) if lstm.bidirectional else (False,)
    slots = lstm.num_layers * len(directions)
    if hx is None:
        h0 = c0 = x.new_zeros(slots, x.shape[1], lstm.hidden_size)
    else:
        h0, c0 = (s.unsqueeze(1) for s in hx) if unbatched else hx
    hn, cn = [], []
    for layer in range(lstm.num_layers):
        keep_in, keep_hidden = keep_sets.get(layer, (None, None))
        if keep_in is not None:
            x = x * keep_in.mask(x.shape[-1], x)
        mask_h = None if keep_hidden is None else keep_hidden.mask(lstm.hidden_size, x)
        outputs = []
        for reverse in directions:
            slot = layer * len(directions) + int(reverse)
            ih, hh = lstm.projection("ih", layer, reverse), lstm.projection("hh", layer, reverse)
            h, c = h0[slot], c0[slot]
            states = [None] * x.shape[0]
            steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
            for t in steps:
                z = h if mask_h is None else h * (mask_h[t] if keep_hidden.per_step else mask_h)
                i, f, g, o = (ih(x[t]) + hh(z)).chunk(4, 1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                states[t] = h
            outputs.append(torch.stack(states))
            hn.append(h)
            cn.append(c)
        x = outputs[0] if len(outputs) == 1 else torch.cat(outputs, 2)
    h_n, c_n = torch.stack(hn), torch.stack(cn)
    if unbatched:
        return x.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
    return (x.transpose(0, 1) if lstm.batch_first else x), (h_n, c_n)


class StructuredDropoutLinear(nn.Linear):
    """Dropout -> Linear in one module: in training batch-shared keep sets of input units, and the GEMMs
    (forward, input and weight gradients) run over the k kept columns only.

    With ``time_dim`` (the sequence axis of a 3-D input, e.g. a decoder after an LSTM) and a per-step
    ``mode``, each time step draws its own set, shared by the batch (the paper's case): T GEMMs of N rows,
    the LSTM's per-step kernels. Otherwise one set serves every row of the call. Per-step sets keep the
    decoder close to ordinary dropout's accuracy, where one set per call does not (docs/structured-dropout.md):
    the decoder sees a different half of the units at every step. Eval mode is the plain Linear.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, p: float = 0.5, seed: int = 0,
                 mode: str = "per_sequence", time_dim: int | None = None, offsets: int | None = None, device=None,
                 dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        check_settings(p, mode, "StructuredDropoutLinear", offsets)
        self.p, self.mode, self.time_dim, self.offsets = float(p), mode, time_dim, offsets
        self.masks = MaskDraws(seed)
        self.reference = False
        self.last_keep_set: KeepSet | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, p: float, seed: int, mode: str = "per_sequence",
                    time_dim: int | None = None, offsets: int | None = None,
                    store_transposed: bool = False) -> "StructuredDropoutLinear":
        """A module sharing ``linear``'s parameters, or with ``store_transposed`` (a weight no other layer
        shares) its weight's values laid out as :func:`stored_transposed`."""
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, p=p, seed=seed, mode=mode,
                  time_dim=time_dim, offsets=offsets, device="meta", dtype=linear.weight.dtype)
        new.weight = stored_transposed(linear.weight) if store_transposed else linear.weight
        new.bias = linear.bias
        return new.train(linear.training)

    @property
    def kept(self) -> int:
        return keep_count(self.p, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return F.linear(x, self.weight, self.bias)
        scale = 1.0 / (1.0 - self.p)
        per_step = self.mode != "per_sequence" and self.time_dim is not None and x.dim() == 3
        if is_fake(x):  # shape, cost and latency propagation: a set of the right size, no draw used up
            keep = stand_in_keep_set(self.in_features, self.kept, scale, x.shape[self.time_dim] if per_step else None,
                                     self.mode)
            per_step = keep.per_step
        else:
            steps = x.shape[self.time_dim] if per_step else None
            keep = draw_keep_set(self.masks.next_generator(), self.in_features, self.kept, scale, steps, self.mode,
                                 self.offsets)
        if not is_fake(x):  # a fake run's stand-in set is not kept: no fake tensor outlives the run
            self.last_keep_set = keep
        if per_step:
            steps_first = x.movedim(self.time_dim, 0)
            if self.reference:
                out = F.linear(steps_first * keep.mask(self.in_features, x), self.weight, self.bias)
            else:
                out = input_projection(steps_first.contiguous(), [self.weight], self.bias, keep)
            return out.movedim(0, self.time_dim)
        index = keep.index.to(x.device)
        if self.reference:
            return F.linear(x * keep.mask(self.in_features, x), self.weight, self.bias)
        return F.linear(x.index_select(-1, index), self.weight.index_select(1, index) * scale, self.bias)

    def fxreduce_macs(self, input_shapes, training: bool = False) -> dict[str, object]:
        """rows * in * out forward; a training step's three GEMMs (forward, dx, dW) over the k kept columns."""
        rows = 1
        for size in input_shapes[0][:-1]:
            rows = rows * size
        if training:
            return {"linear": 3 * rows * self.kept * self.out_features}
        return {"linear": rows * self.in_features * self.out_features}

    def extra_repr(self) -> str:
        sets = f"a set per step along dim {self.time_dim}" if self.mode != "per_sequence" and self.time_dim is not None \
            else "one set per call"
        return super().extra_repr() + f", p={self.p:g} (structured: {self.kept} of {self.in_features} kept, {sets})"
