"""The decomposed LSTM module: nn.LSTM's constructor, parameters, forward and results."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake
from torch.nn.utils.rnn import PackedSequence

from ... import native
from ...errors import CostError, InputError, OptionError, UnsupportedError
from .factors import gemm_factors
from .keep_sets import KeepSet
from .recurrence import autograd_recurrence, fast_recurrence
from .step_projection import input_projection

PROJECTIONS = ("ih", "hh")

# Without the native kernels, a dense LSTM with hidden_size below this runs torch's fused LSTM kernel; at and
# above it the decomposed recurrence is faster (docs/benchmarks.md, "Design measurements").
TORCH_KERNEL_MAX_HIDDEN = 1024


def _suffix(kind: str, layer: int, reverse: bool) -> str:
    return f"{kind}_l{layer}{'_reverse' if reverse else ''}"


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a + b


class DecomposedLSTM(nn.Module):
    """Drop-in ``torch.nn.LSTM`` (no ``proj_size``, no PackedSequence) with replaceable projections.

    Each layer and direction has an input-to-hidden projection (``"ih"``, in -> 4H) and a
    hidden-to-hidden one (``"hh"``, H -> 4H), gates in nn.LSTM's order i, f, g, o. While dense they are
    the parameters ``weight_ih_l0``, ``bias_ih_l0``, ... exactly as in nn.LSTM, so state dicts load
    both ways; :meth:`set_projection` swaps one for any module (registered as ``proj_ih_l0`` etc.).
    Projections exposing ``gemm_factors()`` run on the fast kernels; others run per step by autograd.
    Keep sets (:meth:`set_keep_sets`) apply batch-shared dropout in training mode and shrink the GEMMs.
    Graph queries see it as an "lstm" layer (``fxreduce_kind``), so passes rewrite it as they do nn.LSTM.
    """

    fxreduce_kind = "lstm"

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
                where="fxreduce.modules.DecomposedLSTM",
                fix="use proj_size=0 (for a cheaper recurrence, swap the hh projection for a low-rank module)",
            )
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise OptionError(f"LSTM {name} must be a positive int, got {value!r}", where="fxreduce.modules.DecomposedLSTM")
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
            raise OptionError(f"LSTM dropout must be a number in [0, 1], got {dropout!r}", where="fxreduce.modules.DecomposedLSTM")
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
        if kind not in PROJECTIONS:
            raise OptionError(f"projection kind must be 'ih' or 'hh', got {kind!r}", where="fxreduce.modules.DecomposedLSTM")
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise OptionError(
                f"layer {layer!r} out of range for an LSTM of {self.num_layers} layers", where="fxreduce.modules.DecomposedLSTM"
            )
        if reverse and not self.bidirectional:
            raise OptionError("reverse=True needs a bidirectional LSTM", where="fxreduce.modules.DecomposedLSTM")
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
                "PackedSequence input is unsupported", where="fxreduce.modules.DecomposedLSTM", fix="pad the sequences"
            )
        if input.dim() not in (2, 3) or input.shape[-1] != self.input_size:
            raise InputError(
                f"LSTM expects input (T, N, {self.input_size}) or (T, {self.input_size}), got {tuple(input.shape)}",
                where="fxreduce.modules.DecomposedLSTM",
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
        """Without the native kernels, a dense LSTM (no replaced projections, no keep sets in use) below
        TORCH_KERNEL_MAX_HIDDEN runs nn.LSTM's own fused kernel: there it is faster than the torch path's
        decomposed recurrence, and the numbers are nn.LSTM's exactly. The native time loop
        serves every size. Shape propagation and graph capture always see the decomposition."""
        if self.hidden_size >= TORCH_KERNEL_MAX_HIDDEN or (self.training and self._keep_sets):
            return False
        if native.serves_eagerly(x, self._parameters.get("weight_hh_l0")):
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
                        where="fxreduce.modules.DecomposedLSTM",
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
                raise InputError(f"LSTM {name} must have shape {expected}", where="fxreduce.modules.DecomposedLSTM")
        return h0, c0

    def _direction(self, x, h0, c0, layer, reverse, keep_in, keep_hidden) -> tuple[Tensor, Tensor]:
        ih = self._factors("ih", layer, reverse)
        hh = self._factors("hh", layer, reverse)
        hh_bias = None if hh is None else hh[1]
        if ih is not None:
            xp = input_projection(x, ih[0], _add(ih[1], hh_bias), keep_in)
        else:
            module = self._modules["proj_" + _suffix("ih", layer, reverse)]
            xp = module(x if keep_in is None else x * keep_in.mask(x.shape[-1], x))
            if hh_bias is not None:
                xp = xp + hh_bias
        if hh is not None:
            return fast_recurrence(xp, h0, c0, hh[0], reverse, keep_hidden)
        module = self._modules["proj_" + _suffix("hh", layer, reverse)]
        return autograd_recurrence(xp, h0, c0, module, reverse, keep_hidden)

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
    def from_torch(cls, lstm: nn.LSTM) -> "DecomposedLSTM":
        """A copy of ``lstm`` (weights copied, ``lstm`` untouched), in the same train/eval mode."""
        if not isinstance(lstm, nn.LSTM):
            raise OptionError(f"from_torch expects a torch.nn.LSTM, got {type(lstm).__name__}")
        if lstm.proj_size:
            raise UnsupportedError(
                f"nn.LSTM with proj_size={lstm.proj_size} is unsupported",
                where="DecomposedLSTM.from_torch",
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
        slots = [(kind, layer, reverse) for layer in range(self.num_layers) for reverse in self._directions() for kind in PROJECTIONS]
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
