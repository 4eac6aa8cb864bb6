"""Calibration data for passes that read real inputs (lower_int8's activation ranges, sparse_lowrank's
whitening): how it is given (a torch.save file, tensors, the CLI's ``--calibration``), how it is run
through a graph, and the streaming second moment X X^T of a layer's inputs.

A second moment is accumulated batch by batch in float64 (never holding the activations: memory is
in^2 per layer whatever the set's size), and refuses non-finite inputs with the layer and batch named.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import Tensor

from .meta import set_mode
from .errors import InputError
from .files import load_tensors
from .text import error_summary


class CalibrationData:
    """Calibration batches given as tensors (Python API): a list of input tuples, shown briefly in reports."""

    def __init__(self, batches: list[tuple]):
        self.batches = batches

    def __repr__(self) -> str:
        shapes = ", ".join(str(tuple(t.shape)) for t in self.batches[0] if isinstance(t, Tensor))
        return f"<{len(self.batches)} calibration batch(es) of shape {shapes}>"


def calibration_batches(data: Any, where: str) -> list[tuple]:
    """Tensor -> one batch of one input; tuple of tensors -> one batch; list -> several batches."""
    if isinstance(data, CalibrationData):
        return data.batches
    if isinstance(data, Tensor):
        return [(data,)]
    if isinstance(data, tuple) and data and all(isinstance(t, Tensor) for t in data):
        return [data]
    if isinstance(data, list) and data:
        return [batch for item in data for batch in calibration_batches(item, where)]
    raise InputError(f"calibration data must be a tensor, a tuple of input tensors or a list of those, got "
                     f"{type(data).__name__}", where=where,
                     fix="torch.save(batch_tensor, 'calibration.pt') for a model with one input")


def is_calibration(value: Any) -> bool:
    return value is None or isinstance(value, (str, Tensor, tuple, list, CalibrationData))


def as_calibration(value: Any, where: str) -> Any:
    """An option's value as given (None, a file path) or its tensors wrapped as :class:`CalibrationData`."""
    if value is None or isinstance(value, (str, CalibrationData)):
        return value
    return CalibrationData(calibration_batches(value, where))


def load_calibration(data: str | CalibrationData, where: str, missing_fix: str) -> tuple[list[tuple], str]:
    """The batches of a calibration option (file path or tensors) and a short description of their source."""
    if isinstance(data, str):
        loaded = load_tensors(data, error=InputError, what="calibration file",
                              fix=missing_fix if not os.path.isfile(data) else
                              "write it with torch.save(tensor_or_tuple_of_tensors, path)")
        batches = calibration_batches(loaded, data)
        return batches, f"calibration file {data} ({len(batches)} batch(es))"
    return data.batches, f"{len(data.batches)} given calibration batch(es)"


class _Watcher(fx.Interpreter):
    """Runs a graph and hands the value of each watched node to ``on_value(node, value)``."""

    def __init__(self, gm: fx.GraphModule, watched: set[fx.Node], on_value: Callable[[fx.Node, Any], None]):
        super().__init__(gm)
        self.watched, self.on_value = watched, on_value

    def run_node(self, node: fx.Node) -> Any:
        out = super().run_node(node)
        if node in self.watched:
            self.on_value(node, out)
        return out


def run_calibration(gm: fx.GraphModule, batches: list[tuple], source: str, watched: set[fx.Node],
                    on_value: Callable[[fx.Node, Any, int], None]) -> None:
    """Run every batch through ``gm`` in eval mode without gradients; ``on_value(node, value, batch_index)``
    sees each watched node's value in graph order. A batch the model does not take is an InputError naming
    its shapes."""
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    for index, batch in enumerate(batches):
        if len(batch) != len(placeholders):
            raise InputError(f"calibration batch {index} holds {len(batch)} input(s), the model takes "
                             f"{len(placeholders)}", where=source, fix="save one tensor per model input")
        watcher = _Watcher(gm, watched, lambda node, value, index=index: on_value(node, value, index))
        was_training = gm.training
        set_mode(gm, False)
        try:
            with torch.no_grad():
                watcher.run(*batch)
        except InputError:
            raise
        except Exception as error:
            shapes = ", ".join(str(tuple(t.shape)) for t in batch if isinstance(t, Tensor))
            raise InputError(f"the model does not run on calibration inputs of shape {shapes}: "
                             f"{error_summary(error)}",
                             where=source, fix="give inputs of the shape and dtype the model expects") from None
        finally:
            set_mode(gm, was_training)


class SecondMoment:
    """Streaming C = X X^T (float64) of one layer's inputs, rows of (..., features) tensors."""

    def __init__(self, features: int, where: str):
        self.features, self.where = features, where
        self.gram = torch.zeros(features, features, dtype=torch.float64)
        self.rows = 0

    def add(self, x: Tensor, batch: int) -> None:
        if x.shape[-1] != self.features:
            raise InputError(f"calibration batch {batch} reaches {self.where} with {x.shape[-1]} features, the "
                             f"layer takes {self.features}", where=self.where,
                             fix="give calibration inputs of the shape the model was traced with")
        rows = x.detach().reshape(-1, self.features).double().cpu()
        if not bool(torch.isfinite(rows).all()):
            bad = int((~torch.isfinite(rows)).any(1).sum())
            raise InputError(f"calibration batch {batch} gives {bad} input row(s) with NaN or Inf at {self.where}",
                             where=self.where, fix="remove non-finite values from the calibration data (or the "
                                                   "model's weights) before compressing")
        self.gram.addmm_(rows.T, rows)
        self.rows += rows.shape[0]
