"""The contract kit: what a pass's ``check`` and a user's own contract test are built from.

Passes import it (it depends on torch only), and :mod:`fxreduce.testing` exports it, so a pass written
from docs/writing-a-pass.md checks its contract with the same functions the shipped passes use.
"""

from __future__ import annotations

from typing import Hashable, Mapping

import torch
from torch import nn

from ..meta import set_mode

__all__ = ["capture_calls", "compare_outputs", "run_eval", "seeded_forward", "seeded_gradients"]


def run_eval(model: nn.Module, inputs: tuple) -> object:
    """Outputs of ``model`` in eval mode without gradients; the module's mode is restored afterwards."""
    was_training = model.training
    set_mode(model, False)
    try:
        with torch.no_grad():
            return model(*inputs)
    finally:
        set_mode(model, was_training)


def compare_outputs(expected: object, actual: object, tolerance: float) -> str | None:
    """None if every tensor of ``actual`` equals ``expected`` within a relative ``tolerance``, else what differs."""
    expected_leaves = torch.utils._pytree.tree_leaves(expected)
    actual_leaves = torch.utils._pytree.tree_leaves(actual)
    if len(expected_leaves) != len(actual_leaves):
        return f"output structure changed: {len(expected_leaves)} leaves before, {len(actual_leaves)} after"
    for index, (e, a) in enumerate(zip(expected_leaves, actual_leaves)):
        if not isinstance(e, torch.Tensor):
            if e != a:
                return f"output {index} changed: {e!r} -> {a!r}"
            continue
        if e.shape != a.shape:
            return f"output {index} shape changed: {tuple(e.shape)} -> {tuple(a.shape)}"
        scale = e.abs().max().item() if e.numel() else 0.0
        error = (e.double() - a.double()).abs().max().item() if e.numel() else 0.0
        if not error <= tolerance * max(scale, 1.0):
            return f"output {index} differs by {error:.3g} (allowed {tolerance:g} x max(|output|, 1) = " \
                   f"{tolerance * max(scale, 1.0):.3g})"
    return None


def capture_calls(model: nn.Module, modules: Mapping[Hashable, nn.Module],
                  inputs: tuple) -> dict[Hashable, tuple[tuple, object]]:
    """Run ``model`` once in eval mode and return, per key of ``modules``, the positional arguments and the
    output of that submodule's first call (keys of submodules the run never calls are absent)."""
    seen: dict[Hashable, tuple[tuple, object]] = {}

    def recorder(key: Hashable):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            seen.setdefault(key, (args, output))
        return hook

    handles = [module.register_forward_hook(recorder(key)) for key, module in modules.items()]
    try:
        run_eval(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def seeded_forward(model: nn.Module, inputs: tuple, seed: int) -> object:
    """A training-mode forward of ``model`` with every random op seeded by ``seed`` (the mode is restored):
    two models run this way draw the same dropout masks."""
    was_training = model.training
    set_mode(model, True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return model(*inputs)
    finally:
        set_mode(model, was_training)


def seeded_gradients(model: nn.Module, inputs: tuple, seed: int) -> tuple[object, dict[str, torch.Tensor]]:
    """:func:`seeded_forward` and its backward: the outputs and each trainable parameter's gradient (zeros
    where none flows).

    The loss mixes every differentiable output with fixed random weights drawn from ``seed`` (so error
    maps are uneven, as in real training). This is how a training-time rewrite is compared with its
    dense reference: both see the same masks and the same loss.
    """
    outputs = seeded_forward(model, inputs, seed)
    leaves = [t for t in torch.utils._pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.requires_grad]
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    grads: tuple = (None,) * len(trainable)
    if leaves and trainable:
        generator = torch.Generator().manual_seed(seed)
        loss = sum((t * torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)).sum() for t in leaves)
        grads = torch.autograd.grad(loss, [p for _, p in trainable], allow_unused=True)
    return outputs, {name: torch.zeros_like(p) if g is None else g for (name, p), g in zip(trainable, grads)}
