"""Measure a rewrite where it runs: output error and eval latency of the original and the rewritten model,
side by side on the same inputs.

Passes never time anything (a pass is deterministic; its report gives proven costs). What a rewrite buys
in wall-clock on this machine, and what it changes in the outputs, is measured here after the fact:
``fxreduce apply`` prints it, and the benchmarks time their candidates with the same interleaving.
"""

from __future__ import annotations

import ctypes
import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import torch


_GLIBC_TRIM_THRESHOLD, _GLIBC_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers, from glibc's malloc.h
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse (up to 32 MiB blocks) instead of returning it to the
    OS; returns False where the C library has no ``mallopt`` (not glibc), changing nothing.

    By default glibc hands large freed blocks back to the OS (unmapping those above its mmap threshold,
    trimming the heap's free top above its trim threshold; both thresholds move with what the process
    allocated before), and the next tensor is page-faulted in afresh (the kernel zeroes every page): a
    cost per call proportional to the output size, not to the arithmetic, so it falls hardest on layers
    rewritten to compute less, and it changes with what ran earlier in the process. Measured for
    ViT-B's fc1 at 197 tokens: the dense layer 5.4 -> 4.6 ms, the 12x factorised forms 0.60-0.86 ->
    0.79-0.89 of their MAC reduction. PyTorch's CPU performance guide gets the same effect by swapping in
    jemalloc or tcmalloc; this is the in-process equivalent the benchmarks use, for every candidate alike.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # no mallopt (macOS), no CDLL(None) (Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_GLIBC_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_GLIBC_TRIM_THRESHOLD, 1 << 30))


def shuffled_rounds(names: list[str], repeats: int) -> list[list[str]]:
    """The candidates' order in each round, shuffled (seeded) every round, so that no candidate always runs
    right after the same other one. Measured at 32x4096x4096: the same int8 kernel ran 20% slower placed
    after fp32 Linear every round than after another int8 kernel; a fixed or rotated order hands that
    penalty to one candidate, a shuffled one spreads it over all and the median drops it."""
    generator = random.Random(0)
    return [generator.sample(names, len(names)) for _ in range(repeats)]


def time_side_by_side(
    candidates: Mapping[str, Callable[[], object]], *, repeats: int = 7, warmup: int = 2
) -> dict[str, float]:
    """Median seconds per call of each candidate, measured round-robin in the same run (see :func:`shuffled_rounds`)."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for order in shuffled_rounds(list(candidates), repeats):
        for name in order:
            start = time.perf_counter()
            candidates[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


@dataclass(frozen=True)
class Measurement:
    """Eval outputs and latency of a rewritten model against its original, on the same inputs."""

    max_error: float  # max |after - before| over every output element
    max_output: float  # max |before|, the scale the error is read against
    before_seconds: float
    after_seconds: float
    repeats: int
    threads: int
    input_shapes: tuple[tuple[int, ...], ...]

    @property
    def speedup(self) -> float:
        return self.before_seconds / self.after_seconds

    def lines(self) -> list[str]:
        shapes = ", ".join("x".join(map(str, shape)) for shape in self.input_shapes)
        relative = (f" ({100 * self.max_error / self.max_output:.3g}% of max |output|)" if self.max_output else
                    " (every output of the original is 0 on this input, so this compares nothing: an untrained "
                    "model with a zero-initialised last layer does that)")
        return [f"measured on the example input ({shapes}), eval mode, {self.threads} thread(s):",
                f"  output error: max |after - before| {self.max_error:.3g}{relative}",
                f"  latency: {self.before_seconds * 1e3:.3g} ms -> {self.after_seconds * 1e3:.3g} ms, "
                f"{self.speedup:.2f}x (median of {self.repeats} interleaved runs)"]


def _eval_call(model: torch.nn.Module, inputs: tuple) -> Callable[[], object]:
    def call() -> object:
        with torch.no_grad():
            return model(*inputs)
    return call


def measure(before: torch.nn.Module, after: torch.nn.Module, inputs: tuple, repeats: int = 10) -> Measurement:
    """Both models in eval mode on ``inputs``: the largest output difference and the median latency of each,
    timed interleaved. Each model's train/eval mode is restored afterwards."""
    modes = [(module, module.training) for model in (before, after) for module in model.modules()]
    try:
        for model in (before, after):
            try:
                model.eval()
            except NotImplementedError:  # torch.export graphs bake their mode in
                pass
        calls = {"before": _eval_call(before, inputs), "after": _eval_call(after, inputs)}
        expected, actual = calls["before"](), calls["after"]()
        pairs = [(e, a) for e, a in zip(torch.utils._pytree.tree_leaves(expected),
                                        torch.utils._pytree.tree_leaves(actual))
                 if isinstance(e, torch.Tensor) and isinstance(a, torch.Tensor) and e.shape == a.shape and e.numel()]
        max_error = max(((e.double() - a.double()).abs().max().item() for e, a in pairs), default=0.0)
        max_output = max((e.double().abs().max().item() for e, _ in pairs), default=0.0)
        times = time_side_by_side(calls, repeats=repeats)
    finally:
        for module, training in modes:
            module.training = training
    shapes = tuple(tuple(x.shape) for x in inputs if isinstance(x, torch.Tensor))
    return Measurement(max_error, max_output, times["before"], times["after"], repeats, torch.get_num_threads(),
                       shapes)


__all__ = ["Measurement", "measure", "shuffled_rounds", "time_side_by_side"]
