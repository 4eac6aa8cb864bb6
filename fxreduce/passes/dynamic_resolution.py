"""dynamic_resolution: DRNet (Zhu et al., NeurIPS 2021) -- a predictor picks the input resolution per image.

The traced classifier becomes the backbone of a dispatch leaf; at the graph's input the pass inserts
``resize -> predictor -> choice -> dispatch``, so the rewritten graph shows the predictor branch and
the dispatch as nodes. Every BatchNorm of the backbone becomes a resolution-aware BatchNorm (one set
per resolution, each starting as the original); convolutions and the classifier stay shared. The
backbone keeps its own fxreduce meta, with the image height and width symbolic, so its FLOPs at each
resolution C_r come from the symbolic cost model by substituting r, and the dispatch declares the
expected cost  N * (C_base + sum_r p_r (C_r - C_base))  in the shares p_r of images at each smaller
resolution. The grouping is data-dependent, so the output does not export.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import sympy
import torch
import torch.fx as fx
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .. import meta
from ..cost_models import (
    GraphInfo,
    InputSpec,
    graph_cost,
    graph_info,
    propagate,
    symbol,
)
from ..cost_models.propagation import LocatingInterpreter, NodeFailure
from ..errors import OptionError, UnsupportedError
from ..graph import Layer, find_layers, replace_layer, unique_name
from ..modules.dynamic_resolution import (
    MobileNetPredictor,
    Resize,
    ResNet10Predictor,
    ResolutionAwareBatchNorm,
    ResolutionChoice,
    ResolutionDispatch,
    force_resolution,
    resize,
)
from ..text import count, error_summary
from ..testing.kit import compare_outputs, run_eval
from .base import Contract, Pass, PassOutcome, Rewrite, Skipped, option, register

PREDICTORS = ("resnet10", "mobilenet")
DRNET_PREDICTOR_INPUT = 128 / 224  # DRNet fed its predictor a 128 px image for a 224 px backbone


def _descending(values: tuple) -> bool:
    return (len(values) >= 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
            and all(a > b for a, b in zip(values, values[1:])))


@dataclass
class DynamicResolutionOptions:
    resolutions: tuple = option((224, 168, 112), "candidate square input sizes, the base (largest) first",
                                check=("at least two positive integers in strictly descending order", _descending))
    predictor: object = option(None, "'resnet10' (DRNet's, the default), 'mobilenet', or an nn.Module mapping "
                                     "(N, C, p, p) images to (N, number of resolutions) logits",
                               check=("'resnet10', 'mobilenet' or an nn.Module",
                                      lambda v: isinstance(v, nn.Module) or v in PREDICTORS))
    predictor_input: int = option(None, "side p of the image the predictor sees; default: 128/224 of the base "
                                        "resolution, as DRNet", check=("a positive integer", lambda v: v > 0))
    predictor_width: float = option(1.0, "channel multiplier of a built-in predictor (1.0 = DRNet's widths)",
                                    check=("a positive number", lambda v: v > 0))
    per_resolution_bn: bool = option(True, "give every backbone BatchNorm its own statistics and affine per "
                                           "resolution (DRNet); False shares them")
    temperature: float = option(1.0, "Gumbel-softmax temperature of the training-time choice",
                                check=("a positive number", lambda v: v > 0))


@register
class DynamicResolution(Pass):
    name = "dynamic_resolution"
    summary = "DRNet: a small predictor picks each image's input resolution; the backbone runs once per choice"
    contract = Contract("exact", "with the choice forced to resolution r, outputs equal the original model "
                                 "(BatchNorm set r) on resize(x, r) in eval mode; forced to the base resolution "
                                 "on base-size images they equal the original's; per-sample choices keep the "
                                 "batch order", tolerance=1e-5)
    Options = DynamicResolutionOptions
    invalidates = frozenset({"batchnorm"})
    provides = frozenset({"dynamic_resolution"})
    exports = False

    def __repr__(self) -> str:
        predictor = self.options.predictor
        if isinstance(predictor, nn.Module):
            return super().__repr__().replace(repr(predictor), f"<{type(predictor).__name__}>")
        return super().__repr__()

    def rewrite(self, gm: fx.GraphModule, outcome: PassOutcome) -> None:
        resolutions = self.options.resolutions
        info = graph_info(gm)
        image, example = _image_input(gm)
        predictor_input = self.options.predictor_input or max(8, round(resolutions[0] * DRNET_PREDICTOR_INPUT))
        predictor, predictor_macs = self._predictor(example.shape[1], predictor_input, gm.training)

        replaced = [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
        backbone = _detach_backbone(gm)
        norms = self._resolution_aware_norms(backbone, outcome) if self.options.per_resolution_bn else 0
        output_shapes = {r: _run_at(backbone, example, r) for r in resolutions}
        backbone_macs = _per_resolution_macs(backbone, info, resolutions, output_shapes)

        dispatch = ResolutionDispatch(backbone, resolutions)
        dispatch.training = gm.training
        dispatch.backbone_macs = backbone_macs
        dispatch.predictor_macs = predictor_macs
        dispatch.share_symbols = tuple(share_symbol(r) for r in resolutions[1:])
        choice = ResolutionChoice(resolutions, self.options.temperature)
        choice.training = gm.training
        resizer = Resize(predictor_input)
        resizer.training = gm.training
        added = _insert_branch(gm, image, [("resolution_resize", resizer), ("resolution_predictor", predictor),
                                           ("resolution_choice", choice), ("resolution_dispatch", dispatch)])
        outcome.rewrites.append(Rewrite(replaced, added, _summary(resolutions, backbone_macs, predictor_macs, norms),
                                        self.contract))

    def _predictor(self, channels: int, size: int, training: bool) -> tuple[nn.Module, int]:
        """The predictor (a private copy of the user's), checked to give one logit per resolution; and
        its multiply-adds per image."""
        count, choice = len(self.options.resolutions), self.options.predictor
        if isinstance(choice, nn.Module):
            predictor = copy.deepcopy(choice)
        elif choice == "mobilenet":
            predictor = MobileNetPredictor(channels, count, width=self.options.predictor_width)
        else:
            width = max(4, round(64 * self.options.predictor_width))
            predictor = ResNet10Predictor(channels, count, width)
        meta.set_mode(predictor, False)
        try:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                logits = predictor(torch.zeros(1, channels, size, size))
        except Exception as error:
            raise OptionError(f"the predictor fails on a (1, {channels}, {size}, {size}) image: "
                              f"{error_summary(error)}",
                              where=f"dynamic_resolution(predictor={type(predictor).__name__})",
                              fix="pass a module that takes (N, C, p, p) images, p = predictor_input") from error
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (1, count):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise OptionError(f"the predictor maps a (1, {channels}, {size}, {size}) image to {shape}, but there are "
                              f"{count} candidate resolutions", where=f"dynamic_resolution(predictor="
                              f"{type(predictor).__name__})", fix=f"give its last layer {count} outputs, one logit "
                                                                  "per resolution")
        meta.set_mode(predictor, training)
        return predictor, counter.get_total_flops() // 2

    def _resolution_aware_norms(self, backbone: fx.GraphModule, outcome: PassOutcome) -> int:
        """Every BatchNorm of the backbone -> a ResolutionAwareBatchNorm; returns how many."""
        count = 0
        for layer in find_layers(backbone, ["batchnorm"]):
            norm, reason = _norm_module(layer)
            if norm is None:
                outcome.skipped.append(Skipped(f"resolution_dispatch.backbone.{layer.node.name}", reason))
                continue
            aware = ResolutionAwareBatchNorm(norm, len(self.options.resolutions))
            aware.training = norm.training
            replace_layer(backbone, layer, aware, pass_name=self.name)
            count += 1
        backbone.graph.lint()
        backbone.recompile()
        return count

    def check(self, before: fx.GraphModule, after: fx.GraphModule, inputs: tuple) -> str | None:
        """Each resolution forced in turn, then random per-sample choices, against the original model
        on the resized images (the BatchNorm sets are still the original's right after the pass)."""
        x = inputs[0]
        for r in self.options.resolutions:
            with force_resolution(after, r):
                got = run_eval(after, inputs)
            failure = compare_outputs(run_eval(before, (resize(x, r),)), got, self.contract.tolerance)
            if failure:
                return f"forced to {r}: {failure}"
        generator = torch.Generator().manual_seed(x.shape[0])
        indices = torch.randint(len(self.options.resolutions), (x.shape[0],), generator=generator)
        with force_resolution(after, indices):
            got = run_eval(after, inputs)
        expected = torch.cat([run_eval(before, (resize(x[i:i + 1], self.options.resolutions[j]),))
                              for i, j in enumerate(indices.tolist())])
        failure = compare_outputs(expected, got, self.contract.tolerance)
        return f"per-sample choices {indices.tolist()}: {failure}" if failure else None


def share_symbol(resolution: int) -> sympy.Symbol:
    """The share of images the predictor sends to ``resolution`` (a number in [0, 1])."""
    return sympy.Symbol(f"p_{resolution}", nonnegative=True)


def _image_input(gm: fx.GraphModule) -> tuple[fx.Node, torch.Tensor]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    examples = graph_info(gm).spec.example_inputs
    if len(placeholders) != 1 or len(examples) != 1 or not isinstance(examples[0], torch.Tensor) \
            or examples[0].dim() != 4:
        shapes = ", ".join(str(tuple(e.shape)) if isinstance(e, torch.Tensor) else type(e).__name__ for e in examples)
        raise UnsupportedError(f"dynamic_resolution needs an image classifier with one (N, C, H, W) input; this "
                               f"graph takes {shapes}", where=f"inputs {', '.join(p.name for p in placeholders)}",
                               fix="trace the model on one batch of images")
    return placeholders[0], examples[0]


SIZE_FIX = ("end the feature extractor with global/adaptive pooling (e.g. nn.AdaptiveAvgPool2d(1)) before the "
            "classifier so that any input size fits, or choose resolutions the model accepts")


def _run_at(gm: fx.GraphModule, example: torch.Tensor, r: int) -> tuple:
    """The output shape of ``gm`` on one r x r image in eval mode; a failure names the node that fails."""
    modes = {module: module.training for module in gm.modules()}
    meta.set_mode(gm, False)
    try:
        with torch.no_grad():
            out = LocatingInterpreter(gm).run(torch.randn(1, example.shape[1], r, r, dtype=example.dtype))
    except NodeFailure as failure:
        node, error = failure.node, failure.error
        fed_by = ", ".join(n.name for n in node.all_input_nodes)
        raise UnsupportedError(
            f"the model does not accept a {r}x{r} input: node {node.name} ({node.op} {_target(node)}) fails with "
            f"{error_summary(error)}",
            where=f"node {node.name}" + (f" (fed by {fed_by})" if fed_by else ""), fix=SIZE_FIX) from error
    finally:
        for module, training in modes.items():
            module.training = training
    if not isinstance(out, torch.Tensor):
        raise UnsupportedError(f"dynamic_resolution needs a model that returns one tensor, this one returns "
                               f"{type(out).__name__}", where="the graph's output",
                               fix="wrap the model so that it returns the logits only")
    return tuple(out.shape)


def _target(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{node.target}: {type(node.graph.owning_module.get_submodule(node.target)).__name__}"
    return getattr(node.target, "__name__", str(node.target))


def _detach_backbone(gm: fx.GraphModule) -> fx.GraphModule:
    """The graph's computation as its own GraphModule (sharing the modules); gm keeps only its input."""
    backbone = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=f"{type(gm).__name__}Backbone")
    backbone.training = gm.training
    output = next(n for n in gm.graph.nodes if n.op == "output")
    image = next(n for n in gm.graph.nodes if n.op == "placeholder")
    output.args = (image,)
    for node in reversed(list(gm.graph.nodes)):
        if node.op not in ("placeholder", "output"):
            gm.graph.erase_node(node)
    for name in [*gm._modules, *gm._parameters, *gm._buffers]:
        delattr(gm, name)
    for name in [n for n in vars(gm) if isinstance(getattr(gm, n), torch.Tensor)]:
        delattr(gm, name)
    return backbone


def _norm_module(layer: Layer) -> tuple[nn.Module | None, str]:
    """The layer as a BatchNorm module to copy per resolution, or None and why not."""
    if layer.module is not None:
        return layer.module, ""
    mean, var = layer.attrs["running_mean"], layer.attrs["running_var"]
    if mean is None or var is None:
        return None, "a functional BatchNorm without running statistics stays shared across resolutions"
    if any(n is not layer.input and n.op != "get_attr" for n in layer.node.all_input_nodes):
        return None, "a BatchNorm whose affine weights are computed in the graph stays shared across resolutions"
    shape = meta.shape(layer.input)
    kind = nn.BatchNorm2d if shape is not None and len(shape) == 4 else nn.BatchNorm1d
    norm = kind(mean.shape[0], eps=layer.attrs["eps"], affine=layer.weight is not None,
                dtype=mean.dtype, device=mean.device)
    with torch.no_grad():
        norm.running_mean.copy_(mean)
        norm.running_var.copy_(var)
        if layer.weight is not None:
            norm.weight.copy_(layer.weight)
            norm.bias.copy_(layer.bias if layer.bias is not None else torch.zeros_like(mean))
    norm.train(layer.attrs["training"])
    return norm, ""


def _per_resolution_macs(backbone: fx.GraphModule, original: GraphInfo, resolutions: tuple,
                         output_shapes: dict[int, tuple]) -> tuple:
    """Annotate the backbone with its own meta, image height and width symbolic; return its multiply-adds
    per image at each resolution: the symbolic cost with H = W = r."""
    by_axis = {position: name for name, position in original.spec.dims.items()}
    dims = dict(original.spec.dims)
    height = by_axis.get((0, 2)) or _fresh("H", dims)
    dims[height] = (0, 2)
    width = by_axis.get((0, 3)) or _fresh("W", dims)
    dims[width] = (0, 3)
    info = propagate(backbone, InputSpec(original.spec.example_inputs, dims), method=original.method,
                     source=f"{original.source} backbone")
    result = next(n for n in backbone.graph.nodes if n.op == "output").args[0]
    shape = meta.shape(result)
    sizes = {symbol(height), symbol(width)}
    if len(set(output_shapes.values())) > 1 or any(isinstance(d, sympy.Basic) and d.free_symbols & sizes
                                                   for d in shape or ()):
        shapes = ", ".join(f"{s} at {r}x{r}" for r, s in output_shapes.items())
        raise UnsupportedError(f"the model's output shape depends on its input size ({shapes}; symbolically {shape})",
                               where=f"node {getattr(result, 'name', result)}", fix=SIZE_FIX)
    fixed = [name for name in (height, width) if name not in info.symbolic]
    if fixed:
        raise UnsupportedError(f"the model's cost cannot be stated for any image size: {info.specialised[fixed[0]]}",
                               where=f"image dim {fixed[0]}", fix=SIZE_FIX)
    cost = graph_cost(backbone)
    batch = by_axis.get((0, 0))
    images = 1 if batch in info.symbolic else original.spec.example_inputs[0].shape[0]
    per_batch = {batch: 1} if batch in info.symbolic else {}
    return tuple(cost.at(**per_batch, **{height: r, width: r}).macs / images for r in resolutions)


def _fresh(stem: str, dims: dict) -> str:
    name = stem
    while name in dims:
        name += "_image"
    return name


def _insert_branch(gm: fx.GraphModule, image: fx.Node, modules: list[tuple[str, nn.Module]]) -> list[str]:
    """image -> resize -> predictor -> choice, then dispatch(image, choice) as the graph's output."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    names, previous = [], image
    with gm.graph.inserting_before(output):
        for index, (stem, module) in enumerate(modules):
            target = unique_name(gm, stem)
            gm.add_submodule(target, module)
            args = (image, previous) if index == len(modules) - 1 else (previous,)
            previous = gm.graph.call_module(target, args)
            meta.mark_rewritten(previous, DynamicResolution.name)
            names.append(previous.name)
    output.args = (previous,)
    return names


def _summary(resolutions: tuple, backbone_macs: tuple, predictor_macs: int, norms: int) -> str:
    """What the rewrite did, its expected FLOPs per image and when they are below the original's."""
    base = backbone_macs[0]
    flops = lambda macs: count(float(2 * macs))  # noqa: E731 -- FLOPs = 2 x multiply-adds
    terms = " + ".join(f"{flops(base - c)}*p_{r}" for r, c in zip(resolutions[1:], backbone_macs[1:]))
    per_resolution = ", ".join(f"{r}: {flops(c)}" for r, c in zip(resolutions, backbone_macs))
    return (f"predictor ({flops(predictor_macs)} FLOPs/image) picks one of {resolutions} per image; the backbone "
            f"runs once per chosen resolution ({per_resolution} FLOPs/image) with {norms} resolution-aware "
            f"BatchNorm(s); expected FLOPs/image {flops(predictor_macs + base)} - ({terms}), below the original's at "
            f"{resolutions[0]}x{resolutions[0]} iff {terms} > {flops(predictor_macs)}")
