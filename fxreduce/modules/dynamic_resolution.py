"""Runtime parts of DRNet (Zhu et al., NeurIPS 2021): a cheap predictor picks one input resolution per image.

The rewritten graph reads ``resize -> predictor -> ResolutionChoice -> ResolutionDispatch``. The
dispatch wraps the original network (the backbone, itself a GraphModule) and runs it ONCE per group of
images that chose the same resolution, at that resolution and with that resolution's BatchNorm set,
then puts the results back in the batch's order: the saving is real, nothing runs at a resolution no
image chose. Training uses a straight-through Gumbel-softmax so the predictor learns through the hard
choice. The choice can be forced (base resolution, a given resolution, per-sample indices, random) for
contracts and ablations with :func:`force_resolution`.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import native
from ..errors import CostError, InputError
from ..blocks import BasicBlock


def resize(x: Tensor, size: int) -> Tensor:
    """``x`` (N, C, H, W) bilinearly resized to size x size with antialiasing (as an image loader would
    shrink a picture); the identity when it already has that size."""
    if statically_known_true(x.shape[-2] == size) and statically_known_true(x.shape[-1] == size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class Resize(nn.Module):
    """:func:`resize` as a graph node (the predictor's input)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x: Tensor) -> Tensor:
        return resize(x, self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}"


class ResolutionAwareBatchNorm(nn.Module):
    """One BatchNorm per candidate resolution (own statistics, own affine), selected by ``index``.

    Statistics of a feature map change with the input's scale, so sharing one BatchNorm across
    resolutions hurts all of them (DRNet §3.2). Every set starts as a copy of the original, so set 0
    (the base resolution) computes exactly what the original did. The dispatch sets ``index``.
    """

    def __init__(self, norm: nn.Module, count: int):
        super().__init__()
        if count < 1:
            raise InputError(f"a resolution-aware BatchNorm needs at least one set, got {count}",
                             where="ResolutionAwareBatchNorm", fix="pass the number of candidate resolutions")
        self.norms = nn.ModuleList(copy.deepcopy(norm) for _ in range(count))
        self.index = 0

    def forward(self, x: Tensor) -> Tensor:
        return self.norms[self.index](x)

    def extra_repr(self) -> str:
        return f"sets={len(self.norms)}, active={self.index}"


class ResolutionChoice(nn.Module):
    """Predictor logits (N, m) -> a one-hot choice of resolution per image (N, m).

    Evaluation: argmax, deterministic (the public port drew Gumbel noise at test time). Training:
    straight-through Gumbel-softmax, so the one-hot is exact in the forward pass and the predictor
    gets the softmax's gradient. ``forced`` overrides both (see :func:`force_resolution`).
    """

    def __init__(self, resolutions: Sequence[int], temperature: float = 1.0):
        super().__init__()
        self.resolutions = tuple(int(r) for r in resolutions)
        self.temperature = temperature
        self.forced: int | Tensor | None = None
        self.random_probabilities: Tensor | None = None

    def forward(self, logits: Tensor) -> Tensor:
        count = len(self.resolutions)
        if logits.dim() != 2 or logits.shape[1] != count:
            raise InputError(f"the predictor gives logits of shape {tuple(logits.shape)}, expected (N, {count})",
                             where="ResolutionChoice", fix=f"its last layer needs {count} outputs, one per resolution")
        indices = self._forced_indices(logits)
        if indices is None and self.training:
            return F.gumbel_softmax(logits, tau=self.temperature, hard=True)
        if indices is None:
            indices = logits.argmax(1)
        return torch.zeros_like(logits).scatter_(1, indices.unsqueeze(1), 1.0)

    def _forced_indices(self, logits: Tensor) -> Tensor | None:
        forced, n = self.forced, logits.shape[0]
        if forced is None:
            return None
        if isinstance(forced, str):
            probabilities = self.random_probabilities
            if probabilities is None:
                probabilities = torch.full((len(self.resolutions),), 1.0 / len(self.resolutions))
            return torch.multinomial(probabilities, n, replacement=True).to(logits.device)
        if isinstance(forced, Tensor):
            if forced.shape != (n,):
                raise InputError(f"forced per-sample choices have shape {tuple(forced.shape)}, the batch has {n} "
                                 "images", where="force_resolution", fix="pass one resolution index per image")
            return forced.to(device=logits.device, dtype=torch.long)
        return torch.full((n,), forced, dtype=torch.long, device=logits.device)

    def extra_repr(self) -> str:
        forced = "" if self.forced is None else f", forced={self.forced if not isinstance(self.forced, Tensor) else 'per-sample'}"
        return f"resolutions={self.resolutions}, temperature={self.temperature}{forced}"


class ResolutionDispatch(nn.Module):
    """Runs the backbone per group of images that chose the same resolution; results in batch order.

    ``backbone`` is the original network as a GraphModule with its own fxreduce meta, so
    ``fxreduce.cost(dispatch.backbone)`` and ``fxreduce.inspect(dispatch.backbone)`` work on it.
    The pass fills ``backbone_macs`` (multiply-adds per image at each resolution, from the symbolic cost
    model) and ``share_symbols`` (the fraction of images at each non-base resolution; the base
    resolution takes the rest), which make the declared cost a formula in the choice probabilities,
    and ``predictor_macs`` (the predictor's multiply-adds per image, for reports and training targets).
    """

    def __init__(self, backbone: nn.Module, resolutions: Sequence[int]):
        super().__init__()
        self.backbone = backbone
        self.resolutions = tuple(int(r) for r in resolutions)
        self.backbone_macs: tuple | None = None
        self.share_symbols: tuple | None = None
        self.predictor_macs: int | None = None

    def forward(self, x: Tensor, choice: Tensor) -> Tensor:
        if isinstance(x, FakeTensor):
            # Shape propagation: the grouping depends on values a fake tensor does not have, and the
            # output shape does not depend on the resolution. The MACs come from fxreduce_macs. The
            # latency model's fake run may give the shares of images per resolution; it is then grouped
            # as an eager run with those shares would be.
            sizes = self.fake_group_sizes(x.shape[0])
            if sizes is None:
                return self.run_at(x, 0)
            starts = [sum(sizes[:j]) for j in range(len(sizes))]
            return self.run_groups(x, [(j, torch.arange(start, start + size, device=x.device))
                                       for j, (start, size) in enumerate(zip(starts, sizes)) if size])
        if self.training:
            # Straight-through: the predictor's gradient needs the backbone's output at every resolution,
            # and every BatchNorm set sees the whole batch; the hard one-hot makes the forward value
            # exactly the chosen resolution's output.
            outputs = [self.run_at(x, j) for j in range(len(self.resolutions))]
            return sum(choice[:, j].reshape(-1, *[1] * (out.dim() - 1)) * out for j, out in enumerate(outputs))
        return self.run_grouped(x, choice.argmax(1))

    def run_grouped(self, x: Tensor, indices: Tensor) -> Tensor:
        """The backbone once per distinct resolution index in ``indices`` (N,), outputs in input order."""
        if x.shape[0] == 0:
            return self.run_at(x, 0)
        return self.run_groups(x, [(j, (indices == j).nonzero().squeeze(1)) for j in torch.unique(indices).tolist()])

    def run_groups(self, x: Tensor, groups: list[tuple[int, Tensor]]) -> Tensor:
        """The backbone once per (resolution index, rows of ``x``) group, outputs in input order."""
        output = None
        for j, rows in groups:
            if rows.numel() == x.shape[0]:
                return self.run_at(x, j)
            part = self.run_at(x.index_select(0, rows), j)
            if output is None:
                output = part.new_empty((x.shape[0], *part.shape[1:]))
            output = output.index_copy(0, rows, part)
        return output

    def fake_group_sizes(self, batch: int) -> list[int] | None:
        """Images per resolution in a batch of ``batch``, from the shares a fake run was given
        (:func:`fxreduce.native.fake_data_value`, by the names of ``share_symbols``; the base resolution takes
        the rest), rounded to whole images by largest remainder; None where any share is missing."""
        if not self.share_symbols:
            return None
        given = [native.fake_data_value(str(name)) for name in self.share_symbols]
        if any(value is None for value in given):
            return None
        shares = [1.0 - sum(given), *given]
        if any(not (-1e-9 <= share <= 1 + 1e-9) for share in shares):
            names = ", ".join(f"{name}={value}" for name, value in zip(self.share_symbols, given))
            raise InputError(f"resolution shares {names} are not fractions of the batch summing to at most 1",
                             where="ResolutionDispatch",
                             fix="give each p_<resolution> in [0, 1], their sum at most 1 (the base takes the rest)")
        exact = [max(share, 0.0) * int(batch) for share in shares]
        sizes = [math.floor(value) for value in exact]
        by_remainder = sorted(range(len(exact)), key=lambda j: sizes[j] - exact[j])
        for j in by_remainder[:int(batch) - sum(sizes)]:
            sizes[j] += 1
        return sizes

    def run_at(self, x: Tensor, index: int) -> Tensor:
        """The backbone on ``x`` resized to resolution ``index``, with that resolution's BatchNorm set."""
        with self.resolution(index):
            return self.backbone(resize(x, self.resolutions[index]))

    @contextlib.contextmanager
    def resolution(self, index: int) -> Iterator[None]:
        """Select BatchNorm set ``index`` in every resolution-aware BatchNorm of the backbone."""
        norms = [m for m in self.backbone.modules() if isinstance(m, ResolutionAwareBatchNorm)]
        previous = [norm.index for norm in norms]
        for norm in norms:
            norm.index = index
        try:
            yield
        finally:
            for norm, old in zip(norms, previous):
                norm.index = old

    def fxreduce_macs(self, input_shapes, training: bool = False) -> dict[str, object]:
        """Backbone multiply-adds per resolution: ``N * share_r * C_r`` in evaluation, where share_r is
        the fraction of images that chose r; a training step runs every resolution (straight-through)
        forward and backward, counted as 3 x forward."""
        if self.backbone_macs is None or self.share_symbols is None:
            raise CostError("this dispatch has no per-resolution costs", where="ResolutionDispatch",
                            fix="build it with the dynamic_resolution pass, which derives them from the cost model")
        n = input_shapes[0][0]
        if training:
            return {f"backbone@{r}": 3 * n * c for r, c in zip(self.resolutions, self.backbone_macs)}
        shares = (1 - sum(self.share_symbols), *self.share_symbols)
        return {f"backbone@{r}": n * share * c for r, share, c in zip(self.resolutions, shares, self.backbone_macs)}

    def extra_repr(self) -> str:
        return f"resolutions={self.resolutions}"


class ResNet10Predictor(nn.Module):
    """DRNet's predictor: a ResNet with one BasicBlock in each of 4 stages ("ResNet-10").

    At width 64 on a 128x128 input it is DRNet's ~0.29 GMACs, 4.9M-parameter predictor; ``width``
    scales every stage (width, 2w, 4w, 8w) for small images. ``stem_stride`` 4 is ResNet's 7x7/2 conv
    and 3x3/2 max-pool; 1 is a 3x3 conv without pooling, for thumbnails such as MNIST digits.
    """

    def __init__(self, in_channels: int, outputs: int, width: int = 64, stem_stride: int = 4):
        super().__init__()
        if stem_stride == 4:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, stem_stride, 1, bias=False),
                                      nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        channels = [width, 2 * width, 4 * width, 8 * width]
        self.stages = nn.Sequential(*(BasicBlock(c_in, c_out, 1 if i == 0 else 2)
                                      for i, (c_in, c_out) in enumerate(zip([width] + channels[:-1], channels))))
        self.fc = nn.Linear(channels[-1], outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion, 3x3 depthwise, linear 1x1 projection (+ residual)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int = 6):
        super().__init__()
        hidden = in_channels * expansion
        self.residual = stride == 1 and in_channels == out_channels
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        return x + out if self.residual else out


class MobileNetPredictor(nn.Module):
    """DRNet's predictor for MobileNetV2 backbones: a short stack of inverted-residual blocks (DRNet fed
    it a 64x64 image). ``width`` scales the channels (16, 24, 32, 64, 96 at 1.0)."""

    def __init__(self, in_channels: int, outputs: int, width: float = 1.0):
        super().__init__()
        channels = [max(4, int(round(c * width))) for c in (16, 24, 32, 64, 96)]
        stem = channels[0]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem),
                                  nn.ReLU6(inplace=True))
        strides = (1, 2, 2, 2, 1)
        self.blocks = nn.Sequential(*(InvertedResidual(c_in, c_out, s, expansion=1 if i == 0 else 6)
                                      for i, (c_in, c_out, s) in enumerate(zip([stem] + channels[:-1], channels, strides))))
        self.fc = nn.Linear(channels[-1], outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


@dataclass
class DynamicResolutionParts:
    """The DRNet modules of a rewritten graph."""

    predictor: nn.Module
    choice: ResolutionChoice
    dispatch: ResolutionDispatch

    @property
    def resolutions(self) -> tuple[int, ...]:
        return self.dispatch.resolutions


def dynamic_resolution_parts(gm: nn.Module) -> DynamicResolutionParts:
    """The predictor, choice and dispatch modules of a graph rewritten by the dynamic_resolution pass."""
    named = dict(gm.named_modules())
    choices = [m for m in named.values() if isinstance(m, ResolutionChoice)]
    dispatches = [m for m in named.values() if isinstance(m, ResolutionDispatch)]
    predictor = getattr(gm, "resolution_predictor", None)
    if len(choices) != 1 or len(dispatches) != 1 or predictor is None:
        raise InputError("the model holds no (or more than one) DRNet predictor/choice/dispatch",
                         where=type(gm).__name__, fix="rewrite the model with the dynamic_resolution pass first")
    return DynamicResolutionParts(predictor, choices[0], dispatches[0])


@contextlib.contextmanager
def force_resolution(gm: nn.Module, choice: int | str | Tensor | None,
                     probabilities: Sequence[float] | Tensor | None = None) -> Iterator[None]:
    """Override the predictor's choice inside the block (contracts and ablations).

    ``choice``: "base" (the largest resolution), a resolution (e.g. 168), a LongTensor of per-image
    resolution indices, "random" (each image draws a resolution from ``probabilities``, uniform by
    default, using torch's global generator) or None (the predictor decides).
    """
    module = dynamic_resolution_parts(gm).choice
    resolutions = module.resolutions
    if isinstance(choice, Tensor) or choice is None:
        forced = choice
    elif choice in ("base", "random"):
        forced = 0 if choice == "base" else "random"
    elif choice in resolutions:
        forced = resolutions.index(choice)
    else:
        raise InputError(f"forced choice {choice!r} is not a candidate resolution", where="force_resolution",
                         fix=f'use "base", "random", one of {resolutions}, per-sample indices or None')
    weights = None
    if probabilities is not None:
        weights = torch.as_tensor(probabilities, dtype=torch.float)
        if weights.shape != (len(resolutions),) or (weights < 0).any() or weights.sum() <= 0:
            raise InputError(f"random-choice probabilities {probabilities!r} do not fit {len(resolutions)} "
                             "resolutions", where="force_resolution", fix="pass one non-negative weight per resolution")
    previous = module.forced, module.random_probabilities
    module.forced, module.random_probabilities = forced, weights
    try:
        yield
    finally:
        module.forced, module.random_probabilities = previous
