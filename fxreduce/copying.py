"""Copy a user's model before capturing it, so capture never changes the model it was given.

``copy.deepcopy`` refuses tensors that carry autograd history ("Only Tensors created explicitly by the
user (graph leaves) support the deepcopy protocol"). Models hold such tensors as plain attributes
after a forward pass with gradients on: RAFT keeps its correlation pyramid (``corr_block.corr_pyramid``),
weight-normed layers keep the computed ``weight``. Every forward recomputes them, so the copy holds them
detached; a copy that still fails raises a TraceError naming the attribute and the fix.
"""

from __future__ import annotations

import copy
from typing import Any, Iterator

import torch

from .errors import TraceError
from .text import first_line


def _tensors(value: Any, path: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _tensors(item, f"{path}[{index}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{path}[{key!r}]")


def with_history(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Tensors stored as plain module attributes (not parameters or buffers) that carry autograd history."""
    found = []
    for prefix, module in model.named_modules():
        for name, value in vars(module).items():
            if name.startswith("_"):
                continue
            for path, tensor in _tensors(value, f"{prefix + '.' if prefix else ''}{name}"):
                if tensor.grad_fn is not None or (tensor.requires_grad and not tensor.is_leaf):
                    found.append((path, tensor))
    return found


def copy_model(model: torch.nn.Module, where: str) -> torch.nn.Module:
    """A deep copy of ``model``; attribute tensors left over from a forward pass are copied detached."""
    stale = with_history(model)
    memo = {id(tensor): tensor.detach().clone() for _, tensor in stale}
    try:
        return copy.deepcopy(model, memo)
    except RuntimeError as error:
        if "deepcopy" not in str(error):
            raise
        names = ", ".join(path for path, _ in stale) or "a tensor attribute with autograd history"
        raise TraceError(f"cannot copy {type(model).__name__} before capture: {names} holds tensors computed "
                         f"with gradients on, which copy.deepcopy refuses ({first_line(error)})",
                         where=where, fix="run the model under torch.no_grad() before capture, or delete those "
                                          "attributes (they are recomputed by each forward)") from None
