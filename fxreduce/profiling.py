"""Measuring this machine for the latency model: ``fxreduce calibrate`` / ``fr.calibrate()``.

Micro-benchmarks of the kernels graphs call, each timed in blocks long enough to swamp the clock and
summarised by the median block: float32 GEMM (F.linear) over an (M, N, K) grid; convolutions of four
classes (pointwise, spatial, strided, depthwise) over a grid of their implicit-GEMM sizes; fxreduce's
int8 Linear and Conv2d (fbgemm); memory bandwidth of an elementwise op at sizes from L1 to DRAM; the
overheads of a Python call, an aten dispatch and an nn.Module call; and, for nn.Linear and AntMan's
factorised modules, the Python work of one call beyond the kernels it runs. The result is a
:class:`~fxreduce.cost_models.latency.Profile`, written atomically as versioned JSON.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import itertools
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .cost_models.latency import (Grid, Machine, Profile, default_profile_path, module_class_name, module_seconds,
                                  monotone_grid)
from .measurement import keep_freed_memory
from .modules.factorized import factorize
from .modules.int8 import Int8Conv2d, Int8Linear


@dataclass(frozen=True)
class Plan:
    """What to measure: grid axes and the time each measurement aims for."""

    gemm_ms: tuple[int, ...]
    gemm_ns: tuple[int, ...]
    gemm_ks: tuple[int, ...]
    int8_ms: tuple[int, ...]
    int8_ns: tuple[int, ...]
    conv_batches: tuple[int, ...]
    conv_channels: tuple[int, ...]
    conv_sizes: tuple[int, ...]
    bandwidth_elements: tuple[int, ...]
    block_seconds: float
    blocks: int


FULL = Plan(gemm_ms=(1, 8, 32, 128, 512, 2048), gemm_ns=(16, 64, 256, 1024, 4096), gemm_ks=(16, 64, 256, 1024, 4096),
            int8_ms=(1, 8, 64, 512), int8_ns=(64, 256, 1024, 4096), conv_batches=(1, 8),
            conv_channels=(16, 64, 256), conv_sizes=(7, 14, 28, 56),
            bandwidth_elements=(1 << 10, 1 << 13, 1 << 16, 1 << 19, 1 << 22, 1 << 24), block_seconds=0.01, blocks=3)
TINY = Plan(gemm_ms=(1, 16), gemm_ns=(8, 32), gemm_ks=(8, 32), int8_ms=(1, 16), int8_ns=(16, 32),
            conv_batches=(1,), conv_channels=(4, 8), conv_sizes=(4, 8), bandwidth_elements=(1 << 8, 1 << 12),
            block_seconds=0.0005, blocks=2)


def _seconds_per_call(fn: Callable[[], object], plan: Plan) -> float:
    """Median over ``plan.blocks`` blocks of the mean seconds per call, each block ~``plan.block_seconds``."""
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    calls = max(1, min(10_000, math.ceil(plan.block_seconds / once)))
    means = []
    for _ in range(plan.blocks):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        means.append((time.perf_counter() - start) / calls)
    return statistics.median(means)


def _gemm_grid(ms, ns, ks, make: Callable[[int, int, int], Callable[[], object]], plan: Plan,
               step: Callable[[], None]) -> Grid:
    seconds = []
    for m in ms:
        rows = []
        for n in ns:
            cells = []
            for k in ks:
                cells.append(_seconds_per_call(make(m, n, k), plan))
                step()
            rows.append(tuple(cells))
        seconds.append(tuple(rows))
    return Grid(tuple(ms), tuple(ns), tuple(ks), monotone_grid(seconds))


def _linear(m: int, n: int, k: int) -> Callable[[], object]:
    x, layer = torch.randn(m, k), nn.Linear(k, n)
    return lambda: F.linear(x, layer.weight, layer.bias)


def _int8_weight(*shape: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(-127, 128, shape, dtype=torch.int8), torch.full((shape[0],), 0.01)


def _int8_linear(m: int, n: int, k: int) -> Callable[[], object]:
    x, layer = torch.randn(m, k), Int8Linear.from_int8(*_int8_weight(n, k), torch.zeros(n))
    return lambda: layer(x)


_CONV_KINDS = {  # class -> (kernel, stride, depthwise)
    "conv_pointwise": (1, 1, False), "conv_spatial": (3, 1, False), "conv_strided": (3, 2, False),
    "conv_depthwise": (3, 1, True), "int8_conv": (3, 1, False),
}


def _conv_grid(kind: str, plan: Plan, step: Callable[[], None]) -> Grid:
    """A conv class measured over batch x channels x size, stored on its implicit-GEMM (M, N, K) axes.

    Channels in = channels out, so N and K move together; the grid's cells are the measured shapes, the
    cells between them interpolated like any other grid.
    """
    kernel, stride, depthwise = _CONV_KINDS[kind]
    measured: dict[tuple[int, int, int], float] = {}
    for batch, channels, size in itertools.product(plan.conv_batches, plan.conv_channels, plan.conv_sizes):
        groups = channels if depthwise else 1
        conv: nn.Module = nn.Conv2d(channels, channels, kernel, stride, kernel // 2, groups=groups)
        if kind == "int8_conv":
            conv = Int8Conv2d.from_int8(*_int8_weight(channels, channels // groups, kernel, kernel),
                                        torch.zeros(channels), stride=(stride, stride), padding=(kernel // 2,) * 2,
                                        dilation=(1, 1), groups=groups, input_range=(-3.0, 3.0),
                                        output_range=(-3.0, 3.0))
        x = torch.randn(batch, channels, size, size)
        out = (size + 2 * (kernel // 2) - kernel) // stride + 1
        m = batch * out * out * groups
        key = (m, channels // groups, (channels // groups) * kernel * kernel)
        with torch.no_grad():
            measured[key] = _seconds_per_call(lambda: conv(x), plan)
        step()
    return _grid_from_points(measured)


def _grid_from_points(points: dict[tuple[int, int, int], float]) -> Grid:
    """A full (M, N, K) grid from scattered measurements: each cell takes the throughput of the nearest
    measured point in log space, so interpolation never leaves what was measured."""
    ms, ns, ks = (tuple(sorted({key[axis] for key in points})) for axis in range(3))
    rates = {key: key[0] * key[1] * key[2] / seconds for key, seconds in points.items()}

    def nearest(m: int, n: int, k: int) -> tuple[int, int, int]:
        return min(points, key=lambda key: sum((math.log(a) - math.log(b)) ** 2 for a, b in zip(key, (m, n, k))))

    return Grid(ms, ns, ks, monotone_grid([[[m * n * k / rates[nearest(m, n, k)] for k in ks] for n in ns]
                                           for m in ms]))


def _bandwidth(plan: Plan, step: Callable[[], None]) -> tuple[tuple[int, float], ...]:
    pairs = []
    for elements in plan.bandwidth_elements:
        a, b = torch.randn(elements), torch.randn(elements)
        pairs.append((3 * elements * a.element_size(), _seconds_per_call(lambda: torch.add(a, b), plan)))
        step()
    return tuple((size, min(seconds for _, seconds in pairs[index:])) for index, (size, _) in enumerate(pairs))


def _runtime_modules() -> list[tuple[nn.Module, tuple[int, ...]]]:
    """A small instance of each module class rewrites put in graphs whose own Python work per call is not one
    of the measured kernels: nn.Linear (the GEMM grid times F.linear) and AntMan's factorised forms."""
    torch.manual_seed(0)
    dense = nn.Linear(64, 64)
    forms = [factorize(dense, "lr", 8), factorize(dense, "group", groups=4)]
    forms += [factorize(dense, form, 8, 4) for form in ("sparse_lr", "lr_sparse", "grouped_shuffle")]
    return [(module, (4, 64)) for module in [dense] + forms]


def _module_calls(profile: Profile, plan: Plan, step: Callable[[], None]) -> dict[str, float]:
    """Each module class's cost per call beyond its priced aten ops, measured at a size where the kernels cost
    almost nothing (the median over the instances of a class)."""
    extra: dict[str, list[float]] = {}
    for module, shape in _runtime_modules():
        x = torch.randn(shape)
        measured = _seconds_per_call(lambda: module(x), plan)
        priced = module_seconds(profile, module, shape) - profile.module_call(module)
        extra.setdefault(module_class_name(module), []).append(max(measured - priced, 0.0))
        step()
    return {name: statistics.median(values) for name, values in extra.items()}


def _overheads(plan: Plan) -> tuple[float, float, float]:
    """(Python call, aten dispatch, nn.Module call) seconds: a one-element add from Python, the extra cost of
    a second aten op inside one call, and an identity module's call."""
    x, y = torch.randn(1), torch.randn(1)
    one = _seconds_per_call(lambda: torch.add(x, y), plan)
    two = _seconds_per_call(lambda: torch.addcmul(x, x, y), plan)
    identity = nn.Identity()
    module = _seconds_per_call(lambda: identity(x), plan)
    dispatch = max(min(two - one, one / 2), one / 10)
    return max(one - dispatch, 0.0), dispatch, module


def calibrate(path: str | Path | None = None, *, quick: bool = False, threads: int | None = None,
              progress: bool = True) -> Profile:
    """Measure this machine and write its latency profile to ``path`` (default: the user's cache directory).

    ``quick`` measures a tiny grid (seconds; for tests). ``threads`` sets torch's thread count for the
    measurements, which the profile records (default: the current count).
    """
    plan = TINY if quick else FULL
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    keep_freed_memory()
    total = (len(plan.gemm_ms) * len(plan.gemm_ns) * len(plan.gemm_ks) + len(plan.int8_ms) * len(plan.int8_ns) ** 2
             + len(_CONV_KINDS) * len(plan.conv_batches) * len(plan.conv_channels) * len(plan.conv_sizes)
             + len(plan.bandwidth_elements) + len(_runtime_modules()))
    try:
        with torch.no_grad(), tqdm(total=total, desc="fxreduce calibrate", unit="kernel", disable=not progress,
                                   leave=False) as bar:
            step = functools.partial(bar.update, 1)
            call, dispatch, module = _overheads(plan)
            grids = {"gemm": _gemm_grid(plan.gemm_ms, plan.gemm_ns, plan.gemm_ks, _linear, plan, step),
                     "int8_gemm": _gemm_grid(plan.int8_ms, plan.int8_ns, plan.int8_ns, _int8_linear, plan, step)}
            for kind in _CONV_KINDS:
                grids[kind] = _conv_grid(kind, plan, step)
            bandwidth = _bandwidth(plan, step)
            profile = Profile(Machine.current(), call, dispatch, module, bandwidth, grids,
                              datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
            profile = dataclasses.replace(profile, module_calls=_module_calls(profile, plan, step))
        profile.validate()
        profile.save(path if path is not None else default_profile_path())
        return profile
    finally:
        torch.set_num_threads(previous)
