"""The early instance filter (EIF): a small net that drops low-loss instances before the main forward.

From Wu, Wang, Shi, Hu (arXiv 2007.03213). In training, a small network sees the raw batch and
predicts for each instance whether the main model's loss on it will be High or Low; only the instances
predicted High (plus the uncertain ones, whose prediction entropy is high, so the filter learns their
labels too) reach the main model, which then computes forward and backward on that subset only. In
eval the filter is bypassed: the module returns its inputs. The filter learns from the main model's
losses (fxreduce.training.on_device): this module only predicts, chooses and records.

After a training forward: ``kept`` holds the batch indices that went on, ``predicted_high`` the (N,)
mask of instances predicted High, ``logits`` the filter's (N, 2) logits (Low, High) with their
autograd graph, ``forced`` whether the filter predicted every
instance Low (then only uncertainty sampling, or at least the ``min_keep`` most likely High, went on).

Two ways to choose the predicted-Low instances that also go on (``selection``):

* ``"uncertainty"`` (the paper's): those with the highest prediction entropy. The main model then trains
  on a set rich in high-loss instances, a biased sample of the batch (hard-example mining).
* ``"unbiased"``: a uniformly random sample of them, each kept instance's loss weighted by the inverse of
  its keep probability (1 for predicted High, #Low / #sampled for the rest), and the weighted sum divided
  by the whole batch's size (:meth:`InstanceFilter.batch_loss`). Over the sampling, its expectation is
  the whole batch's mean loss, so the expected gradient is the full batch's: the importance-sampling
  estimator of Katharopoulos & Fleuret (2018), with the filter's High prediction as a stratum kept whole.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import InputError, UnsupportedError

_WIDTHS = (4, 8, 16, 32)
SELECTIONS = ("uncertainty", "unbiased")


def _conv_filter(channels: int, width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(32 * width, 2),
    )


def _conv_filter_macs(channels: int, height: int, width: int, filters: int) -> int:
    h1, w1 = (height + 1) // 2, (width + 1) // 2
    h2, w2 = (h1 + 1) // 2, (w1 + 1) // 2
    return h1 * w1 * 9 * channels * filters + h2 * w2 * 9 * filters * 2 * filters + 64 * filters


def default_filter(instance_shape: Sequence[int], budget_macs: float | None = None) -> nn.Module:
    """A small filter net for instances of ``instance_shape``: (C, H, W) images or (F,) feature vectors.

    Images get two stride-2 3x3 convolutions (width w, 2w), a 4x4 average pool and a Linear to two
    logits; vectors a two-layer MLP. The width is the largest of 4, 8, 16, 32 (hidden 8w for vectors)
    whose forward multiply-adds per instance stay within ``budget_macs`` (the smallest if none does).
    """
    shape = tuple(int(s) for s in instance_shape)
    if len(shape) == 3:
        fits = [w for w in _WIDTHS if budget_macs is None or _conv_filter_macs(*shape, w) <= budget_macs]
        return _conv_filter(shape[0], fits[-1] if fits else _WIDTHS[0])
    if len(shape) == 1:
        fits = [w for w in _WIDTHS if budget_macs is None or shape[0] * 8 * w + 16 * w <= budget_macs]
        hidden = 8 * (fits[-1] if fits else _WIDTHS[0])
        return nn.Sequential(nn.Linear(shape[0], hidden), nn.ReLU(), nn.Linear(hidden, 2))
    raise UnsupportedError(f"no default filter for instances of shape {shape}", where="instance_filter",
                           fix="pass filter=<an nn.Module mapping a batch to (N, 2) logits>")


def _is_fake(tensor: Tensor) -> bool:
    return torch._subclasses.fake_tensor.is_fake(tensor)


class InstanceFilter(nn.Module):
    """The filter branch at a graph's input: ``forward(*inputs)`` returns the inputs, in training restricted
    to the kept instances along axis 0 (those flagged in ``batched``).

    ``net`` maps input 0 (the first argument) to (N, 2) logits (Low, High). An instance is kept when
    P(High) >= 0.5; uncertainty sampling adds the ceil(``uncertainty`` x N) predicted-Low instances
    whose prediction entropy is highest, so the filter keeps learning their labels. ``target_high_ratio``
    (R_set) is the share of High instances the training helper's adaptive threshold aims at; it is kept
    here so the rewritten model carries its configuration. ``selection`` says how the predicted-Low
    instances are picked (module docstring); ``"unbiased"`` needs ``uncertainty`` > 0, since a
    predicted-Low instance that can never be kept cannot be stood for.
    ``instance_shape`` is the shape of one instance of input 0 (for the cost declaration).
    """

    def __init__(self, net: nn.Module, batched: Sequence[bool], instance_shape: Sequence[int], *,
                 target_high_ratio: float = 0.1, uncertainty: float = 0.2, min_keep: int = 1,
                 selection: str = "uncertainty"):
        super().__init__()
        if not 0 < target_high_ratio < 1:
            raise InputError(f"target_high_ratio={target_high_ratio!r} must be in (0, 1)", where="InstanceFilter")
        if not 0 <= uncertainty <= 1:
            raise InputError(f"uncertainty={uncertainty!r} must be in [0, 1]", where="InstanceFilter")
        if selection not in SELECTIONS:
            raise InputError(f"selection={selection!r} is not one of {', '.join(map(repr, SELECTIONS))}",
                             where="InstanceFilter")
        if selection == "unbiased" and uncertainty == 0:
            raise InputError("selection='unbiased' with uncertainty=0 never keeps a predicted-Low instance, so its "
                             "loss cannot be stood for", where="InstanceFilter", fix="give uncertainty > 0")
        self.selection = selection
        # The unbiased sample draws from its own generator (seeded from torch's global one), so adding the
        # filter leaves the model's own random ops (dropout) on the stream they would have had.
        self.sampler = (torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
                        if selection == "unbiased" else None)
        self.net = net
        self.batched = tuple(bool(b) for b in batched)
        self.instance_shape = tuple(int(s) for s in instance_shape)
        self.target_high_ratio, self.uncertainty = float(target_high_ratio), float(uncertainty)
        self.min_keep = int(min_keep)
        self.kept: Tensor | None = None
        self.predicted_high: Tensor | None = None
        self.logits: Tensor | None = None
        self.forced = False
        self._macs: tuple[int, int] | None = None

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        if not self.training or _is_fake(inputs[0]):
            return tuple(inputs)
        logits = self.net(inputs[0])
        batch = inputs[0].shape[0]
        if not (isinstance(logits, Tensor) and tuple(logits.shape) == (batch, 2)):
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise InputError(f"the filter net returned {got}, not one (Low, High) logit pair per instance "
                             f"({batch}, 2)", where="InstanceFilter.net", fix="end the filter with nn.Linear(..., 2)")
        self.kept, self.predicted_high = self.choose(logits.detach())
        self.forced = not bool(self.predicted_high.any())
        self.logits = logits
        return tuple(x.index_select(0, self.kept) if flag else x for x, flag in zip(inputs, self.batched))

    def choose(self, logits: Tensor, order: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(sorted kept indices, the (N,) mask of instances predicted High).

        Kept: the predicted-High instances and ceil(uncertainty x N) of the predicted-Low ones: with
        ``selection="uncertainty"`` those of highest prediction entropy, and, if that is fewer than
        ``min_keep``, the most likely High ones; with ``"unbiased"`` the first of ``order`` (a permutation
        of the predicted-Low instances; default a random one from ``sampler``), at least as many as
        ``min_keep`` asks.
        """
        log_probs = logits.float().log_softmax(dim=1)
        high = log_probs[:, 1] >= math.log(0.5)
        chosen = high.clone()
        low = (~high).nonzero().squeeze(1)
        share = math.ceil(self.uncertainty * logits.shape[0] - 1e-9)
        if self.selection == "unbiased":
            sampled = min(low.numel(), max(share, self.min_keep - int(high.sum())))
            order = torch.randperm(low.numel(), generator=self.sampler) if order is None else order
            chosen[low[order[:sampled].to(low.device)]] = True
            return chosen.nonzero().squeeze(1), high
        sampled = min(low.numel(), share)
        if sampled:
            entropy = -(log_probs[low].exp() * log_probs[low]).sum(dim=1)
            chosen[low[entropy.topk(sampled).indices]] = True
        missing = min(self.min_keep, logits.shape[0]) - int(chosen.sum())
        if missing > 0:
            likely = log_probs[:, 1].masked_fill(chosen, -math.inf).topk(missing).indices
            chosen[likely] = True
        return chosen.nonzero().squeeze(1), high

    def importance(self, kept: Tensor | None = None, predicted_high: Tensor | None = None) -> Tensor | None:
        """The inverse keep probability of each kept instance under ``selection="unbiased"`` (None otherwise).

        Predicted High are always kept (1); the predicted-Low ones kept are a uniform sample of the
        batch's #Low, each kept with probability #sampled / #Low. Defaults: the last training forward's.
        """
        if self.selection != "unbiased":
            return None
        kept = self.kept if kept is None else kept
        predicted_high = self.predicted_high if predicted_high is None else predicted_high
        kept_high = predicted_high.index_select(0, kept)
        sampled = int((~kept_high).sum())
        low = int((~predicted_high).sum())
        weights = torch.ones(kept.numel(), dtype=torch.float64, device=kept.device)
        return weights.masked_fill(~kept_high, low / sampled) if sampled else weights

    def batch_loss(self, losses: Tensor, kept: Tensor | None = None,
                   predicted_high: Tensor | None = None) -> Tensor:
        """The step's main loss from the per-instance losses of the kept instances.

        ``"uncertainty"``: their mean. ``"unbiased"``: the importance-weighted sum over the whole batch's
        size, whose expectation over the sampling is the whole batch's mean loss. Defaults: the last
        training forward's kept instances and predictions.
        """
        weights = self.importance(kept, predicted_high)
        if weights is None:
            return losses.mean()
        batch = (self.predicted_high if predicted_high is None else predicted_high).numel()
        return (losses * weights.to(losses.dtype)).sum() / batch

    def per_instance_macs(self) -> tuple[int, int]:
        """(forward, backward) multiply-adds of the filter net per instance, counted once by torch's counter.

        The backward is the weight-gradient pass of training the filter (its input needs no gradient).
        """
        if self._macs is None:
            reference = next(iter(self.net.parameters()), None)
            example = torch.zeros((2,) + self.instance_shape, dtype=reference.dtype if reference is not None else None,
                                  device=reference.device if reference is not None else None)
            was_training = self.net.training
            self.net.eval()
            try:
                with FlopCounterMode(display=False) as counter:
                    logits = self.net(example)
                    forward = counter.get_total_flops()
                    trainable = [p for p in self.net.parameters() if p.requires_grad]
                    if trainable:
                        torch.autograd.grad(logits.sum(), trainable, allow_unused=True)
                    backward = counter.get_total_flops() - forward
            finally:
                self.net.train(was_training)
            self._macs = (forward // 4, backward // 4)
        return self._macs

    def fxreduce_macs(self, input_shapes, training: bool = False) -> dict[str, object]:
        """The filter's inference on the whole batch, and with ``training`` its training on the whole batch.

        A forward count in eval mode is zero: eval bypasses the filter. (A training step trains the filter
        only on the instances that reached the main model; fxreduce.training.on_device counts that.)
        """
        batch = input_shapes[0][0]
        forward, backward = self.per_instance_macs()
        if training:
            return {"filter_forward": forward * batch, "filter_backward": backward * batch}
        return {"filter_forward": forward * batch if self.training else 0}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["logits"] = None
        return state

    def extra_repr(self) -> str:
        return (f"instance_shape={self.instance_shape}, batched={self.batched}, "
                f"target_high_ratio={self.target_high_ratio:g}, "
                f"uncertainty={self.uncertainty:g}, min_keep={self.min_keep}, selection={self.selection!r}")


__all__ = ["SELECTIONS", "InstanceFilter", "default_filter"]
