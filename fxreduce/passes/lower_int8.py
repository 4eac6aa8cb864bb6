"""lower_int8: Linear and Conv2d -> int8 modules that run real int8 kernels on the CPU.

Weights that already lie on a symmetric grid {k * q : |k| <= 127} (ADMM's quantized weights, or any
model quantized that way) are lowered exactly: the int8 values times the scale reproduce every weight
bit for bit. Other weights are rounded here, per output channel by default, and the report gives the
weight error. Linear layers quantize their input per call; Conv2d layers use static activation scales
from a calibration run, on the data the user gives or on random inputs shaped like the example inputs
(the report says which). A ReLU that is a layer's only user is fused into the int8 kernel, and so is a
max_pool2d (window = stride, no padding) that follows a sparse int8 conv: the kernel pools its int32 sums, so
the conv's full-size output is never written.

Pruned layers (ADMM's) run on fxreduce's sparse int8 kernels (SparseInt8Linear / SparseInt8Conv2d: only the
stored non-zeros multiplied, the int32 sums equal to the dense kernel's) where their density is at most
``sparse_density``, else on the dense int8 kernel; the report says which and why. torch's own CSR matmul
is no alternative: 0.97-1.6x fp32 at 2-5% density at LeNet's fc1 shape, below dense int8's 2.9x.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor

from .. import meta
from ..calibration import as_calibration, is_calibration, load_calibration, run_calibration
from ..cost_models import graph_info
from ..cost_models.latency import Profile, example_shape, module_seconds
from ..graph import Layer, find_layers, only_user, replace_layer
from .. import native
from ..modules.int8 import MAX_WEIGHT_LEVEL, Int8Conv2d, Int8Linear
from ..modules.sparse_int8 import MAX_POOL, SparseInt8Conv2d, SparseInt8Linear
from ..testing.kit import capture_calls
from .base import Contract, LatencyObjective, LayerSelection, Pass, PassOutcome, Rewrite, Skipped, option, register

# The sparse int8 kernel's crossover with the dense one (docs/benchmarks.md, "Sparse int8 kernels", has the
# sweep): about 5% non-zeros on Linear 800-1024 wide and Conv2d 64->64 3x3 (5-12% measured); four times that for
# convs whose dense reduction (in_channels x kh x kw) is at most SHORT_REDUCTION long, where fbgemm's fixed costs
# weigh more (20->50 5x5: 20-25%); and only with at least 16 outputs per pixel: with fewer (LeNet's 10-way head)
# the dense GEMM is cheap and the sparse kernel's transposed input costs more than it saves.
SPARSE_DENSITY = 0.05
SHORT_REDUCTION = 512
SHORT_REDUCTION_FACTOR = 4
SPARSE_MIN_OUTPUTS = 16
_RELU_FUNCTIONS = {torch.relu, torch.relu_, F.relu, torch.ops.aten.relu.default, torch.ops.aten.relu_.default}
_MAX_POOL_FUNCTIONS = {F.max_pool2d, torch.max_pool2d, torch.ops.aten.max_pool2d.default}
_MAX_POOL_PARAMETERS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")


def find_grid(values: Tensor) -> float | None:
    """The scale q with every value == k * q exactly in float32 for integers |k| <= 127, or None.

    The smallest non-zero magnitude is k0 * q for some k0, so the candidates are it / k0 (and one ulp
    either side, for grids whose products were rounded); the coarsest candidate that reproduces every
    distinct magnitude bit for bit wins. A grid has at most 127 distinct magnitudes, so this is cheap.
    """
    magnitudes = values.detach().abs().flatten().float().unique()
    magnitudes = magnitudes[magnitudes > 0]
    if magnitudes.numel() == 0:
        return 1.0
    if magnitudes.numel() > MAX_WEIGHT_LEVEL or not bool(torch.isfinite(magnitudes).all()):
        return None
    steps = magnitudes[0] / torch.arange(1, MAX_WEIGHT_LEVEL + 1, dtype=torch.float32)
    candidates = torch.stack([steps, torch.nextafter(steps, torch.zeros(())),
                              torch.nextafter(steps, torch.full((), float("inf")))], dim=1).flatten()
    levels = torch.round(magnitudes[None, :] / candidates[:, None])
    exact = (levels <= MAX_WEIGHT_LEVEL).all(1) & (levels * candidates[:, None] == magnitudes[None, :]).all(1)
    found = torch.nonzero(exact).flatten()
    return float(candidates[found[0]]) if found.numel() else None


@dataclass
class Int8Weights:
    """A layer's weights as int8 values and per-channel scales, and how far they are from the originals."""

    values: Tensor
    scales: Tensor
    exact: bool
    error: float
    grid: str


def to_int8(weight: Tensor, per_channel: bool = True) -> Int8Weights:
    """Exact int8 form of on-grid weights (one grid, else one per channel); else rounded and the error given."""
    weight = weight.detach().float()
    channels = weight.shape[0]
    rows = weight.reshape(channels, -1)
    shared = find_grid(weight)
    if shared is not None:
        scales, grid = torch.full((channels,), shared), "one grid"
    else:
        grids = [find_grid(row) for row in rows] if per_channel else [None]
        if all(g is not None for g in grids):
            scales, grid = torch.tensor(grids, dtype=torch.float32), "a grid per channel"
        elif per_channel:
            scales, grid = rows.abs().amax(1) / MAX_WEIGHT_LEVEL, "rounded per channel"
        else:
            scales, grid = rows.abs().amax().expand(channels) / MAX_WEIGHT_LEVEL, "rounded per tensor"
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    shape = (channels,) + (1,) * (weight.dim() - 1)
    values = torch.round(weight / scales.reshape(shape)).clamp(-MAX_WEIGHT_LEVEL, MAX_WEIGHT_LEVEL).to(torch.int8)
    error = float((values.float() * scales.reshape(shape) - weight).abs().max()) if weight.numel() else 0.0
    return Int8Weights(values, scales.contiguous(), error == 0.0, error, grid)


@dataclass
class LowerInt8Options(LatencyObjective, LayerSelection):
    per_channel: bool = option(True, "weights off any grid are rounded with one scale per output channel "
                                     "(False: one per layer)")
    calibration: Any = option(None, "inputs that set Conv2d activation scales: a file saved with torch.save "
                                    "(a tensor or a tuple of input tensors), or tensors in Python; None: random "
                                    "inputs shaped like the example inputs",
                              check=("a file path, tensors, or None", is_calibration))
    calibration_batches: int = option(4, "random calibration batches when no calibration data is given",
                                      check=("1..64", lambda value: 1 <= value <= 64))
    fuse_relu: bool = option(True, "fuse a ReLU that is the layer's only user into the int8 kernel")
    fuse_pool: bool = option(True, f"fuse a max_pool2d (square window 2..{MAX_POOL} = stride, no padding, floor "
                                   "mode) that is a sparse int8 conv's only user into its kernel")
    sparse_density: float = option(SPARSE_DENSITY, "layers with at most this fraction of non-zero weights run on "
                                                   "the sparse int8 kernel (0: never)",
                                   check=("a fraction in [0, 1]", lambda value: 0 <= value <= 1))

    def __post_init__(self) -> None:
        self.calibration = as_calibration(self.calibration, "lower_int8(calibration=...)")


def _why_not(layer: Layer) -> str | None:
    if layer.weight is None:
        return "its weight is computed in the graph; only parameter weights lower to int8"
    if layer.why_shared():
        return layer.why_shared()
    if layer.weight.dtype != torch.float32:
        return f"its weight is {layer.weight.dtype}; the int8 kernels replace float32 layers"
    shape = meta.shape(layer.input)
    dims = len(shape) if isinstance(shape, tuple) else None
    if layer.kind == "linear" and dims is not None and dims < 2:
        return "a 1-D (unbatched) input; the int8 Linear takes (..., in_features)"
    if layer.kind == "conv2d":
        padding = layer.attrs["padding"]
        if isinstance(padding, str) or layer.attrs["padding_mode"] != "zeros":
            return f"padding={padding!r}, padding_mode={layer.attrs['padding_mode']!r}; int8 conv pads with zeros only"
        if dims is not None and dims != 4:
            return "an unbatched (3-D) input; the int8 Conv2d takes (N, C, H, W)"
    return None


def _float_module(layer: Layer) -> torch.nn.Module:
    """The layer as a float32 module to price: itself, or a Linear / Conv2d holding its weights."""
    if layer.kind == "linear":
        return layer.as_linear()
    if layer.module is not None:
        return layer.module
    a, weight = layer.attrs, layer.weight
    conv = torch.nn.Conv2d(weight.shape[1] * a["groups"], weight.shape[0], tuple(weight.shape[2:]), a["stride"],
                           a["padding"], a["dilation"], a["groups"], bias=layer.bias is not None)
    conv.weight = torch.nn.Parameter(weight.detach())
    if layer.bias is not None:
        conv.bias = torch.nn.Parameter(layer.bias.detach())
    return conv


def _int8_predicted_slower(gm: fx.GraphModule, layer: Layer, int8: torch.nn.Module, fused: list[torch.nn.Module],
                           profile: Profile) -> str | None:
    """Why ``layer`` stays in float32 under objective='latency' (int8 predicted no faster), or None. ``fused``:
    the float modules the int8 kernel also runs (a ReLU, a max pool)."""
    shape = example_shape(gm, layer.input)
    if shape is None:
        return None
    float_layer = _float_module(layer)
    with torch.no_grad():
        fast = module_seconds(profile, torch.nn.Sequential(float_layer, *fused) if fused else float_layer, shape)
        quantized = module_seconds(profile, int8, shape)
    if quantized < fast:
        return None
    return (f"int8 predicted no faster on this machine: {quantized * 1e6:.3g} us against {fast * 1e6:.3g} us in "
            f"float32 on input {'x'.join(map(str, shape))} (latency profile; objective='latency' keeps it in float)")


def _max_pool_user(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, int] | None:
    """The max_pool2d that is ``node``'s only user and its window side, where the sparse conv kernel runs it: a
    square window of 2..MAX_POOL, stride = window (or left default), no padding, dilation 1, floor mode, no
    indices."""
    user = only_user(node)
    if user is None or user.args[:1] != (node,):
        return None
    if user.op == "call_module" and isinstance(gm.get_submodule(user.target), torch.nn.MaxPool2d):
        pool = gm.get_submodule(user.target)
        params = {name: getattr(pool, name) for name in _MAX_POOL_PARAMETERS}
    elif user.op == "call_function" and user.target in _MAX_POOL_FUNCTIONS:
        params = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False,
                  **dict(zip(_MAX_POOL_PARAMETERS, user.args[1:])), **user.kwargs}
    else:
        return None

    def pair(value: Any) -> tuple:
        return tuple(value) if isinstance(value, (tuple, list)) else (value, value)

    window = pair(params["kernel_size"])
    stride = window if params["stride"] is None or pair(params["stride"]) == () else pair(params["stride"])
    if (window[0] != window[1] or not isinstance(window[0], int) or not 2 <= window[0] <= MAX_POOL
            or stride != window or pair(params["padding"]) != (0, 0) or pair(params["dilation"]) != (1, 1)
            or params["ceil_mode"] or params["return_indices"]):
        return None
    return user, window[0]


def _relu_user(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    user = only_user(node)
    if user is None or user.args[:1] != (node,):
        return None
    if user.op == "call_module" and isinstance(gm.get_submodule(user.target), torch.nn.ReLU):
        return user
    if user.op == "call_function" and user.target in _RELU_FUNCTIONS:
        return user
    if user.op == "call_method" and user.target in ("relu", "relu_"):
        return user
    return None


@register
class LowerInt8(Pass):
    name = "lower_int8"
    summary = "run Linear / Conv2d as real int8 CPU kernels (exact for weights on a symmetric grid, e.g. ADMM's)"
    contract = Contract("bounded", "int8 weights x scales equal on-grid weights bit for bit (others are rounded "
                                   "and the report gives the error); each int8 layer's output is within its "
                                   "stated activation-quantization bound (error_bound) of the float layer with "
                                   "those weights")
    Options = LowerInt8Options
    needs = frozenset({"conv2d", "linear"})
    invalidates = frozenset({"conv2d", "linear"})

    def rewrite(self, gm: fx.GraphModule, outcome: PassOutcome) -> None:
        layers = []
        for layer in find_layers(gm, ["linear", "conv2d"]):
            if not self.options.selects(layer):
                continue
            reason = _why_not(layer)
            if reason:
                outcome.skipped.append(Skipped(layer.name, reason))
            else:
                layers.append(layer)
        convs = [layer for layer in layers if layer.kind == "conv2d"]
        ranges, source = self._calibrate(gm, convs) if convs else ({}, "")
        profile = self.options.latency_profile()
        for layer in layers:
            relu = _relu_user(gm, layer.result) if self.options.fuse_relu else None
            weights = to_int8(layer.weight, self.options.per_channel)
            bias = layer.bias.detach().float() if layer.bias is not None else None
            sparse, kernel_text = self._sparse(layer, weights.values)
            pool = None
            if sparse and layer.kind == "conv2d" and self.options.fuse_pool:
                pool = _max_pool_user(gm, relu if relu is not None else layer.result)
            if layer.kind == "linear":
                kind = SparseInt8Linear if sparse else Int8Linear
                module = kind.from_int8(weights.values, weights.scales, bias, relu=relu is not None)
                activations = "input quantized per call (dynamic)"
            else:
                low_in, high_in, low_out, high_out = ranges[layer.node.name]
                a = layer.attrs
                geometry = dict(stride=a["stride"], padding=a["padding"], dilation=a["dilation"], groups=a["groups"],
                                input_range=(low_in, high_in), relu=relu is not None)
                module = (SparseInt8Conv2d.from_int8(weights.values, weights.scales, bias, **geometry,
                                                     pool=pool[1] if pool else 1) if sparse else
                          Int8Conv2d.from_int8(weights.values, weights.scales, bias,
                                               output_range=(low_out, high_out), **geometry))
                activations = f"static activation scales calibrated on {source}"
            fused = ([torch.nn.ReLU()] if relu is not None else []) + ([torch.nn.MaxPool2d(pool[1])] if pool else [])
            slower = _int8_predicted_slower(gm, layer, module, fused, profile) if profile else None
            if slower:
                outcome.skipped.append(Skipped(layer.name, slower))
                continue
            fused_nodes = [node for node in (relu, pool[0] if pool else None) if node is not None]
            replaced = [layer.node.name] + [node.name for node in fused_nodes]
            new = replace_layer(gm, layer, module, pass_name=self.name)
            meta.add_details(new, weight_error=weights.error)
            for node in fused_nodes:
                _remove_fused(gm, node, new)
            if weights.exact:
                weight_text = f"weights exact on {weights.grid}"
            else:
                peak = float(layer.weight.detach().abs().max())
                weight_text = (f"weights {weights.grid}: max |dW| {weights.error:.3g} "
                               f"({100 * weights.error / peak if peak else 0:.2g}% of max |W|)")
            fused_text = "".join([", ReLU fused" if relu is not None else "",
                                  f", max_pool2d({pool[1]}) fused (pooled on the int32 sums)" if pool else ""])
            outcome.rewrites.append(Rewrite(replaced, [new.name], f"int8 {type(module).__name__}{fused_text}; "
                                                                  f"{kernel_text}; {weight_text}; {activations}",
                                            self.contract))

    def _sparse(self, layer: Layer, values: Tensor) -> tuple[bool, str]:
        """Whether ``layer`` runs on the sparse int8 kernel, and the report's reason."""
        density = int((values != 0).sum()) / values.numel() if values.numel() else 1.0
        limit, why = self.options.sparse_density, "sparse_density"
        if layer.kind == "conv2d" and values[0].numel() <= SHORT_REDUCTION:
            limit = SHORT_REDUCTION_FACTOR * limit
            why = (f"{SHORT_REDUCTION_FACTOR} x sparse_density: a conv reducing over {values[0].numel()} <= "
                   f"{SHORT_REDUCTION}")
        if density > limit:
            return False, f"dense kernel: {density:.1%} non-zero > {limit:.0%} ({why})"
        if values.shape[0] < SPARSE_MIN_OUTPUTS:
            return False, (f"dense kernel: {density:.1%} non-zero, but {values.shape[0]} output channels < "
                           f"{SPARSE_MIN_OUTPUTS}, too few for the sparse kernel to pay")
        if layer.kind == "conv2d" and layer.attrs["groups"] != 1:
            return False, f"dense kernel: {density:.1%} non-zero, but the sparse conv runs groups=1 only"
        if not native.available():
            return False, f"dense kernel: {density:.1%} non-zero, but fxreduce's native kernels are not built"
        return True, (f"sparse kernel: {density:.1%} non-zero <= {limit:.0%} ({why}), "
                      f"{1 / max(density, 1e-9):.1f}x fewer multiply-adds")

    def _calibration_inputs(self, gm: fx.GraphModule) -> tuple[list[tuple], str]:
        data = self.options.calibration
        if data is not None:
            return load_calibration(data, "lower_int8(calibration=...)",
                                    "torch.save a batch of real inputs to that path, or leave it out to "
                                    "calibrate on random inputs")
        spec = graph_info(gm).spec
        batches = []
        for _ in range(self.options.calibration_batches):
            batch = []
            for value in spec.example_inputs:
                if isinstance(value, Tensor) and value.is_floating_point():
                    batch.append(torch.randn_like(value))
                else:
                    batch.append(value)
            batches.append(tuple(batch))
        return batches, f"{len(batches)} random batch(es) (no calibration data given)"

    def _calibrate(self, gm: fx.GraphModule, convs: list[Layer]) -> tuple[dict[str, list[float]], str]:
        """min/max of each conv's input and output over the calibration batches."""
        batches, source = self._calibration_inputs(gm)
        inputs = {layer.node: layer.input for layer in convs}
        latest: dict[fx.Node, Tensor] = {}
        ranges: dict[str, list[float]] = {}

        def record(node: fx.Node, value: Any, batch: int) -> None:
            latest[node] = value
            if node in inputs:
                x = latest[inputs[node]]
                seen = [float(x.min()), float(x.max()), float(value.min()), float(value.max())]
                old = ranges.get(node.name)
                ranges[node.name] = seen if old is None else [min(old[0], seen[0]), max(old[1], seen[1]),
                                                              min(old[2], seen[2]), max(old[3], seen[3])]

        run_calibration(gm, batches, source, set(inputs) | set(inputs.values()), record)
        return ranges, source

    def check(self, before: fx.GraphModule, after: fx.GraphModule, inputs: tuple) -> str | None:
        originals = {layer.node.name: layer for layer in find_layers(before, ["linear", "conv2d"])}
        lowered = {node: after.get_submodule(node.target) for node in after.graph.nodes
                   if node.op == "call_module" and "weight_error" in meta.details(node)}
        for node, module in lowered.items():
            original = originals[meta.replaced(node)].weight.detach()
            error = float((module.dequantized_weight() - original).abs().max())
            stated = meta.details(node)["weight_error"]
            if not error <= stated:
                return f"{node.name}: dequantized weights differ by {error:.3g}, the report says {stated:.3g}"
        seen = capture_calls(after, lowered, inputs)
        for node, module in lowered.items():
            if node not in seen:
                continue
            (x, *_), out = seen[node]
            excess = ((out - module.reference(x)).abs() - module.error_bound(x)).max()
            if excess > 0:
                return f"{node.name}: int8 output exceeds its activation-quantization bound by {float(excess):.3g}"
        return None


def _remove_fused(gm: fx.GraphModule, node: fx.Node, fused: fx.Node) -> None:
    """Erase ``node`` (a ReLU or max pool the int8 module now runs), its users reading ``fused`` instead."""
    node.replace_all_uses_with(fused)
    gm.graph.erase_node(node)
    if node.op == "call_module" and not any(n.op == "call_module" and n.target == node.target for n in gm.graph.nodes):
        gm.delete_submodule(node.target)
