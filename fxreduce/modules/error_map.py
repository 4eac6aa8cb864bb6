"""Conv2d and Linear layers whose backward prunes the error map channel-wise (error map pruning, EMP).

From Wu, Wang, Shi, Hu, "Enabling on-device CNN training by self-supervised instance filtering and
error map pruning" (arXiv 2007.03213). The forward is the layer's own. In the backward, the gradient
with respect to the output (the error map, delta) keeps only the top ``keep`` fraction of output
channels, the same channels for the whole batch, ranked by

    score_j = g1 * ||W_j||_1 / sum_i ||W_i||_1  +  g2 * sum_batch ||delta_j||_1 / sum_i sum_batch ||delta_i||_1

(the paper's g1 * ||W_j||_1 + g2 * ||delta_j||_1 with each term divided by its total over channels, so
g1 and g2 weigh two shares and do not depend on the scale of weights or gradients; a common positive
factor does not change a ranking, so this is the paper's score with per-layer rescaled g1, g2).

Why a custom backward rather than a hook that zeroes the pruned channels: zeroing gives the same
numbers but the input- and weight-gradient convolutions still run on every channel. Here they run on
the kept slice only, as one ``aten.convolution_backward`` call on the sliced weight and error map (one
call computes both gradients, sharing oneDNN's layout conversions of the error map; two separate
``torch.nn.grad.conv2d_input`` / ``conv2d_weight`` calls do that twice), with the kept indices sorted
so the gathers and the scatter of the weight gradient walk memory in order. The backward's multiply-adds
scale with the kept fraction. Pruned channels get zero weight and bias gradients.

Under torch.distributed the per-channel scores are all-reduced before ranking, so every rank prunes
the same channels (and DDP averages gradients of the same channels).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .. import native
from ..errors import OptionError

aten = torch.ops.aten


def check_keep(keep: float, where: str) -> float:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise OptionError(f"keep={keep!r} must be a fraction in (0, 1]", where=where,
                          fix="keep=0.3 keeps the error maps of 30% of the output channels; 1 keeps all")
    return float(keep)


def check_score(score: Sequence[float], where: str) -> tuple[float, float]:
    if (not isinstance(score, (tuple, list)) or len(score) != 2
            or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and s >= 0 for s in score)
            or not any(s > 0 for s in score)):
        raise OptionError(f"score={score!r} must be two non-negative weights (g1, g2), not both 0", where=where,
                          fix="g1 weighs the channel's weight norm, g2 its error-map norm; e.g. score=(1.0, 1.0)")
    return float(score[0]), float(score[1])


def kept_count(channels: int, keep: float, multiple: int = 1) -> int:
    """Channels kept out of ``channels``: ceil(keep * channels), rounded up to ``multiple``, at most all."""
    count = max(1, math.ceil(keep * channels - 1e-9))
    if multiple > 1:
        count = -(-count // multiple) * multiple
    return min(channels, count)


def _is_fake(tensor: Tensor) -> bool:
    return torch._subclasses.fake_tensor.is_fake(tensor)


def l1_norms(tensor: Tensor, dims: tuple[int, ...]) -> Tensor:
    """L1 norms over ``dims``. ``abs().sum()`` rather than ``linalg.vector_norm(ord=1)``, whose reduction is
    not vectorised on torch's CPU build (docs/benchmarks.md, "Design measurements")."""
    return tensor.abs().sum(dim=dims)


def channel_sums(delta: Tensor, channel_dim: int) -> tuple[Tensor, Tensor]:
    """(sum |delta|, sum delta) over every dim but ``channel_dim``: the error map's per-channel scores and its
    bias gradient, in one read of it on the native kernel where the channels are dim 1 of a batch (the
    pruned backward and its reference score alike, so both keep the same channels)."""
    channel_dim %= delta.dim()
    if channel_dim == 1 and delta.dim() > 2:
        return native.channel_sums(delta)
    dims = tuple(d for d in range(delta.dim()) if d != channel_dim)
    return l1_norms(delta, dims), delta.sum(dim=dims)


_ROW_BLOCK_BYTES = 1 << 20


def row_l1_norms(matrix: Tensor) -> Tensor:
    """L1 norm of each row of a 2-D tensor: one read of it on the native kernel where it serves, else a block
    of rows (~1 MiB) at a time so that the ``abs`` temporary stays in cache (a weight-sized temporary costs
    several times the sum itself)."""
    if native.serves_eagerly(matrix):
        return native.channel_sums(matrix.unsqueeze(0))[0]
    rows_per_block = max(1, _ROW_BLOCK_BYTES // max(1, matrix.shape[1] * matrix.element_size()))
    if rows_per_block >= matrix.shape[0]:
        return l1_norms(matrix, (1,))
    return torch.cat([l1_norms(block, (1,)) for block in matrix.split(rows_per_block)])


def select_channels(weight: Tensor, delta_norms: Tensor, groups: int, per_group: int, score: tuple[float, float],
                    sync: bool) -> Tensor:
    """Sorted indices of the kept output channels: the top ``per_group`` of each group by the EMP score.

    ``delta_norms`` holds sum_batch ||delta_j||_1 per output channel. With ``sync`` and an initialised
    process group, weight and error-map norms are summed over the ranks first, so all ranks agree. A
    term weighted 0 is not computed (the weight norms read the whole weight every backward).
    """
    g1, g2 = score
    weight_norms = row_l1_norms(weight.detach().reshape(weight.shape[0], -1)) if g1 else None
    if weight_norms is None:
        norms = delta_norms
    else:
        norms = weight_norms if not g2 else torch.stack([weight_norms.to(delta_norms.dtype), delta_norms])
    if sync and torch.distributed.is_available() and torch.distributed.is_initialized() and not _is_fake(norms):
        torch.distributed.all_reduce(norms)
    if norms.dim() == 2:
        shares = norms / norms.sum(dim=1, keepdim=True).clamp_min(torch.finfo(norms.dtype).tiny)
        scores = shares[0].mul_(g1).add_(shares[1], alpha=g2)
    else:
        scores = norms  # a single term: its weight and its total do not change the ranking
    # Few, small ops: in a backward each runs cache-cold after the convolution and costs several times more
    # than alone.
    if groups == 1:
        return scores.topk(per_group, sorted=False).indices.sort().values
    local = scores.view(groups, -1).topk(per_group, dim=1, sorted=False).indices.sort(dim=1).values
    offsets = torch.arange(0, scores.numel(), scores.numel() // groups, device=local.device).unsqueeze(1)
    return (local + offsets).reshape(-1)


def _scatter_rows(kept: Tensor, values: Tensor, rows: int) -> Tensor:
    full = values.new_zeros((rows,) + tuple(values.shape[1:]))
    return full.index_copy_(0, kept, values)


class _ErrorMapConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        ctx.save_for_backward(x, weight)
        ctx.layer, ctx.has_bias = layer, bias is not None
        return F.conv2d(x, weight, bias, layer.stride, layer.conv_padding, layer.dilation, layer.groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, delta):
        x, weight = ctx.saved_tensors
        layer = ctx.layer
        norms, sums = channel_sums(delta, 1)
        kept = layer.channels_for(weight, norms)
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        source, stride = x, layer.stride
        strided_pointwise = weight.shape[2:] == (1, 1) and tuple(layer.conv_padding) == (0, 0) and tuple(stride) != (1, 1)
        if strided_pointwise:
            # A strided 1x1 conv reads only every stride-th pixel: its backward is the stride-1 backward on the
            # subsampled input, scattered back, which skips the strided kernel's reads of unused pixels.
            source, stride = x[:, :, :: stride[0], :: stride[1]], (1, 1)
        delta_kept = delta.index_select(1, kept)
        grad_input, grad_weight_kept, _ = aten.convolution_backward(
            delta_kept, source, weight.index_select(0, kept), None, stride, layer.conv_padding, layer.dilation,
            False, [0, 0], layer.groups, (needs_input, needs_weight, False))
        if strided_pointwise and needs_input:
            full = x.new_zeros(x.shape)
            full[:, :, :: layer.stride[0], :: layer.stride[1]] = grad_input
            grad_input = full
        grad_weight = _scatter_rows(kept, grad_weight_kept, weight.shape[0]) if needs_weight else None
        grad_bias = None
        if ctx.has_bias and needs_bias:
            grad_bias = _scatter_rows(kept, sums.index_select(0, kept), weight.shape[0])
        return grad_input, grad_weight, grad_bias, None


class _ErrorMapLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        ctx.save_for_backward(x, weight)
        ctx.layer, ctx.has_bias = layer, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, delta):
        x, weight = ctx.saved_tensors
        rows = delta.reshape(-1, delta.shape[-1])
        kept = ctx.layer.channels_for(weight, l1_norms(rows, (0,)))
        delta_kept = rows.index_select(1, kept)
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_input = (delta_kept @ weight.index_select(0, kept)).reshape(x.shape) if needs_input else None
        grad_weight = None
        if needs_weight:
            grad_weight = _scatter_rows(kept, delta_kept.t() @ x.reshape(-1, x.shape[-1]), weight.shape[0])
        grad_bias = _scatter_rows(kept, delta_kept.sum(dim=0), weight.shape[0]) if ctx.has_bias and needs_bias else None
        return grad_input, grad_weight, grad_bias, None


class ErrorMapPruningModule(nn.Module):
    """What the Conv2d and Linear versions share: the keep fraction, the score, the channel choice.

    ``last_kept`` holds the kept output channels (sorted) of the last pruned backward. Setting
    ``fixed_channels`` makes the backward use those channels instead of scoring (for reproducing a run
    or checking it against a reference); ``reference=True`` computes the backward densely from the
    error map zeroed outside the kept channels: the same numbers, no savings (the contract's reference).
    """

    weight: Tensor
    groups: int = 1

    def _setup_pruning(self, keep: float, score: Sequence[float], multiple: int, sync: bool) -> None:
        if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
            raise OptionError(f"multiple={multiple!r} must be an int >= 1", where=type(self).__name__,
                              fix="multiple=1 keeps ceil(keep * channels); 8 rounds that up to a multiple of 8")
        self.score = check_score(score, type(self).__name__)
        self.multiple, self.sync = multiple, bool(sync)
        self.keep = keep
        self.input_grad = True
        self.reference = False
        self.fixed_channels: Tensor | None = None
        self.last_kept: Tensor | None = None

    @property
    def keep(self) -> float:
        return self._keep

    @keep.setter
    def keep(self, value: float) -> None:
        self._keep = check_keep(value, f"{type(self).__name__}.keep")
        per_group = self.weight.shape[0] // self.groups
        self.kept_per_group = kept_count(per_group, self._keep, self.multiple)

    @property
    def kept_channels(self) -> int:
        """Output channels whose error map the backward keeps (all of them when nothing is pruned)."""
        return self.kept_per_group * self.groups

    @property
    def prunes(self) -> bool:
        return self.kept_channels < self.weight.shape[0]

    def _pruned_step(self, x: Tensor) -> bool:
        return (self.training and self.prunes and torch.is_grad_enabled()
                and (x.requires_grad or self.weight.requires_grad))

    def channels_for(self, weight: Tensor, delta_norms: Tensor) -> Tensor:
        """The kept channels for this backward: ``fixed_channels``, else the top scores. Recorded in last_kept."""
        if self.fixed_channels is not None:
            kept = self.fixed_channels.to(delta_norms.device)
        else:
            kept = select_channels(weight, delta_norms, self.groups, self.kept_per_group, self.score, self.sync)
        if not _is_fake(kept):
            self.last_kept = kept
        return kept

    def _mask_error_map(self, output: Tensor, channel_dim: int) -> Tensor:
        """The reference: the dense layer whose error map is zeroed outside the kept channels."""
        def mask(delta: Tensor) -> Tensor:
            kept = self.channels_for(self.weight, channel_sums(delta, channel_dim)[0])
            shape = [1] * delta.dim()
            shape[channel_dim] = -1
            keep = torch.zeros(delta.shape[channel_dim], dtype=delta.dtype, device=delta.device)
            return delta * keep.index_fill_(0, kept, 1).reshape(shape)

        if output.requires_grad:
            output.register_hook(mask)
        return output

    def _pruning_repr(self) -> str:
        text = f", keep={self.keep:g} ({self.kept_channels} of {self.weight.shape[0]} channels), score={self.score}"
        return text + (f", multiple={self.multiple}" if self.multiple > 1 else "")


class ErrorMapConv2d(ErrorMapPruningModule):
    """A Conv2d (same parameters, same forward) whose training backward prunes the error map channel-wise.

    Grouped convolutions keep the same number of channels in every group (the top ones of each group),
    so the sliced backward is still a grouped convolution. Non-zero padding modes and asymmetric "same"
    padding pad the input explicitly first. ``input_grad`` says whether the cost model counts the
    input-gradient convolution (a pass sets it False for a layer no parameter feeds).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *, keep: float = 0.3,
                 score: Sequence[float] = (1.0, 1.0), multiple: int = 1, sync: bool = True, device=None, dtype=None):
        super().__init__()
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
                         device=device, dtype=dtype)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation, self.groups = conv.kernel_size, conv.stride, conv.dilation, groups
        self.padding, self.padding_mode = conv.padding, padding_mode
        self.weight, self.bias = conv.weight, conv.bias
        self.pre_pad, self.conv_padding = self._paddings(conv)
        self._setup_pruning(keep, score, multiple, sync)

    @staticmethod
    def _paddings(conv: nn.Conv2d) -> tuple[tuple[int, int, int, int] | None, list[int]]:
        """(explicit F.pad amounts or None, the padding the convolution itself applies)."""
        if isinstance(conv.padding, str):
            if conv.padding == "valid":
                return None, [0, 0]
            amounts = []
            for d, k in zip(reversed(conv.dilation), reversed(conv.kernel_size)):
                total = d * (k - 1)
                amounts += [total // 2, total - total // 2]
            if conv.padding_mode == "zeros" and amounts[0] == amounts[1] and amounts[2] == amounts[3]:
                return None, [amounts[2], amounts[0]]
            return tuple(amounts), [0, 0]
        if conv.padding_mode != "zeros":
            ph, pw = conv.padding
            return (pw, pw, ph, ph), [0, 0]
        return None, list(conv.padding)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **options) -> "ErrorMapConv2d":
        """The pruning version of ``conv``, sharing its parameters, in its train/eval mode."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, conv.padding_mode, device="meta", **options)
        new.weight, new.bias = conv.weight, conv.bias
        return new.train(conv.training)

    def forward(self, x: Tensor) -> Tensor:
        if self.pre_pad is not None:
            x = F.pad(x, self.pre_pad, mode="constant" if self.padding_mode == "zeros" else self.padding_mode)
        if not self._pruned_step(x):
            return F.conv2d(x, self.weight, self.bias, self.stride, self.conv_padding, self.dilation, self.groups)
        if self.reference:
            output = F.conv2d(x, self.weight, self.bias, self.stride, self.conv_padding, self.dilation, self.groups)
            return self._mask_error_map(output, 1)
        return _ErrorMapConv2d.apply(x, self.weight, self.bias, self)

    def fxreduce_macs(self, input_shapes, training: bool = False, keep=None) -> dict[str, object]:
        """Multiply-adds: the forward convolution; with ``training``, the weight- and input-gradient
        convolutions on the kept channels. ``keep`` (a number or a sympy symbol) replaces the kept count
        by keep x out_channels, for costs as a function of the keep ratio."""
        n, _, h, w = input_shapes[0]
        if self.pre_pad is not None:
            h, w = h + self.pre_pad[2] + self.pre_pad[3], w + self.pre_pad[0] + self.pre_pad[1]
        (kh, kw), (sh, sw), (dh, dw), (ph, pw) = self.kernel_size, self.stride, self.dilation, self.conv_padding
        out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        per_channel = n * out_h * out_w * (self.in_channels // self.groups) * kh * kw
        macs: dict[str, object] = {"forward": per_channel * self.out_channels}
        if training:
            kept = self.kept_channels if keep is None else keep * self.out_channels
            macs["weight_grad"] = per_channel * kept
            macs["input_grad"] = per_channel * kept if self.input_grad else 0
        return macs

    def extra_repr(self) -> str:
        text = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding not in ((0, 0), "valid"):
            text += f", padding={self.padding}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.bias is None:
            text += ", bias=False"
        if self.padding_mode != "zeros":
            text += f", padding_mode={self.padding_mode!r}"
        return text + self._pruning_repr()


class ErrorMapLinear(ErrorMapPruningModule):
    """A Linear (same parameters, same forward) whose training backward prunes the error map per output feature."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, keep: float = 0.3,
                 score: Sequence[float] = (1.0, 1.0), multiple: int = 1, sync: bool = True, device=None, dtype=None):
        super().__init__()
        linear = nn.Linear(in_features, out_features, bias, device=device, dtype=dtype)
        self.in_features, self.out_features = in_features, out_features
        self.weight, self.bias = linear.weight, linear.bias
        self._setup_pruning(keep, score, multiple, sync)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options) -> "ErrorMapLinear":
        """The pruning version of ``linear``, sharing its parameters, in its train/eval mode."""
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta", **options)
        new.weight, new.bias = linear.weight, linear.bias
        return new.train(linear.training)

    def forward(self, x: Tensor) -> Tensor:
        if not self._pruned_step(x):
            return F.linear(x, self.weight, self.bias)
        if self.reference:
            return self._mask_error_map(F.linear(x, self.weight, self.bias), -1)
        return _ErrorMapLinear.apply(x, self.weight, self.bias, self)

    def fxreduce_macs(self, input_shapes, training: bool = False, keep=None) -> dict[str, object]:
        """Multiply-adds of the forward GEMM and, with ``training``, of the two gradient GEMMs on the kept rows."""
        shape = input_shapes[0]
        rows = 1
        for size in shape[:-1]:
            rows = rows * size
        macs: dict[str, object] = {"forward": rows * self.in_features * self.out_features}
        if training:
            kept = self.kept_channels if keep is None else keep * self.out_features
            macs["weight_grad"] = rows * self.in_features * kept
            macs["input_grad"] = rows * self.in_features * kept if self.input_grad else 0
        return macs

    def extra_repr(self) -> str:
        text = f"in_features={self.in_features}, out_features={self.out_features}"
        return text + (", bias=False" if self.bias is None else "") + self._pruning_repr()


__all__ = ["ErrorMapConv2d", "ErrorMapLinear", "kept_count", "row_l1_norms", "select_channels"]
