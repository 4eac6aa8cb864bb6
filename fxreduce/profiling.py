"""Measuring this machine for the latency model: ``fxreduce calibrate`` / ``fr.calibrate()``.

Micro-benchmarks of the kernels graphs call, each timed in blocks long enough to swamp the clock and
summarised by the median block: float32 GEMM (F.linear) over an (M, N, K) grid; convolutions of four
classes (pointwise, spatial, strided, depthwise) over a grid of their implicit-GEMM sizes; fxreduce's
int8 Linear and Conv2d (fbgemm); memory bandwidth of an elementwise op at sizes from L1 to DRAM; max and
average pooling by window reads; one-row products streaming weights of 1-128 MB; the overheads of a
Python call, an aten dispatch and an nn.Module call; each kernel class's fixed cost per call; and, for
torch.nn's common layers and AntMan's factorised modules, the Python work of one call beyond the kernels
it runs. The grids are swept twice, each cell keeping its faster sweep. The result is a
:class:`~fxreduce.cost_models.latency.Profile`, written atomically as versioned JSON.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import itertools
import math
import os
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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
    pooling_shapes: tuple[tuple[int, int, int, int], ...]
    stream_widths: tuple[int, ...]
    block_seconds: float
    blocks: int
    passes: int


FULL = Plan(gemm_ms=(1, 4, 8, 16, 64, 256, 1024), gemm_ns=(16, 64, 256, 512, 1024, 2048, 4096),
            gemm_ks=(16, 64, 256, 512, 1024, 2048, 4096), int8_ms=(1, 8, 64, 512), int8_ns=(64, 256, 1024, 4096),
            conv_batches=(1, 8), conv_channels=(16, 64, 256), conv_sizes=(7, 14, 28, 56),
            bandwidth_elements=(1 << 10, 1 << 13, 1 << 16, 1 << 19, 1 << 22, 1 << 24),
            pooling_shapes=((1, 16, 8, 8), (1, 32, 28, 28), (1, 64, 56, 56), (8, 64, 56, 56), (8, 64, 112, 112)),
            stream_widths=(512, 1024, 2048, 2896, 4096, 5792), block_seconds=0.005, blocks=3, passes=2)
TINY = Plan(gemm_ms=(1, 16), gemm_ns=(8, 32), gemm_ks=(8, 32), int8_ms=(1, 16), int8_ns=(16, 32),
            conv_batches=(1,), conv_channels=(4, 8), conv_sizes=(4, 8), bandwidth_elements=(1 << 8, 1 << 12),
            pooling_shapes=((1, 4, 8, 8), (1, 8, 16, 16)), stream_widths=(64, 128), block_seconds=0.0005, blocks=2,
            passes=1)


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


def _sweep(cells: dict[Any, Callable[[], Callable[[], object]]], plan: Plan,
           step: Callable[[], None]) -> dict[Any, float]:
    """Seconds per call of every cell (a key and a maker of its call), the fastest of ``plan.passes`` sweeps
    over all of them: on a shared machine a neighbour's burst can slow one measurement by half, and sweeps
    tens of seconds apart rarely meet the same burst."""
    fastest: dict[Any, float] = {}
    for _ in range(plan.passes):
        for key, make in cells.items():
            fastest[key] = min(_seconds_per_call(make(), plan), fastest.get(key, math.inf))
            step()
    return fastest


def _gemm_cells(name: str, ms, ns, ks, make: Callable[[int, int, int], Callable[[], object]]) -> dict:
    return {(name, m, n, k): functools.partial(make, m, n, k) for m in ms for n in ns for k in ks}


def _gemm_grid(name: str, ms, ns, ks, measured: dict) -> Grid:
    seconds = [[[measured[(name, m, n, k)] for k in ks] for n in ns] for m in ms]
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


def _conv_shape(kind: str, channels: int, size: int) -> tuple[int, int, int, int]:
    """A conv of class ``kind`` on ``channels`` x ``size`` x ``size``: (groups, out size, and its implicit
    GEMM's N and K)."""
    kernel, stride, depthwise = _CONV_KINDS[kind]
    groups = channels if depthwise else 1
    out = (size + 2 * (kernel // 2) - kernel) // stride + 1
    return groups, out, channels // groups, (channels // groups) * kernel ** 2


def _conv(kind: str, batch: int, channels: int, size: int) -> Callable[[], object]:
    kernel, stride, _ = _CONV_KINDS[kind]
    groups = _conv_shape(kind, channels, size)[0]
    conv: nn.Module = nn.Conv2d(channels, channels, kernel, stride, kernel // 2, groups=groups)
    if kind == "int8_conv":
        conv = Int8Conv2d.from_int8(*_int8_weight(channels, channels // groups, kernel, kernel),
                                    torch.zeros(channels), stride=(stride, stride), padding=(kernel // 2,) * 2,
                                    dilation=(1, 1), groups=groups, input_range=(-3.0, 3.0),
                                    output_range=(-3.0, 3.0))
    x = torch.randn(batch, channels, size, size)
    return lambda: conv(x)


def _conv_cells(plan: Plan) -> dict:
    return {(kind, batch, channels, size): functools.partial(_conv, kind, batch, channels, size)
            for kind in _CONV_KINDS
            for batch, channels, size in itertools.product(plan.conv_batches, plan.conv_channels, plan.conv_sizes)}


def _conv_grid(kind: str, measured: dict) -> Grid:
    """A conv class measured over batch x channels x size, stored on its implicit-GEMM (M, N, K) axes.

    Channels in = channels out, so N and K move together; the grid's cells are the measured shapes, the
    cells between them interpolated like any other grid.
    """
    points = {}
    for (name, batch, channels, size), seconds in measured.items():
        if name == kind:
            groups, out, n, k = _conv_shape(kind, channels, size)
            points[(batch * out * out * groups, n, k)] = seconds
    return _grid_from_points(points)


def _with_fixed_cost(grid: Grid, overheads: float) -> Grid:
    """``grid`` with its kernel's fixed cost per call: its smallest measurement (whose arithmetic is a few
    hundred multiply-adds at most) less the Python call and dispatch every op is charged anyway."""
    return dataclasses.replace(grid, fixed=max(grid.seconds[0][0][0] - overheads, 0.0))


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
    return _running_minimum(pairs)


def _pooling(plan: Plan, step: Callable[[], None]) -> dict[str, tuple[tuple[int, float], ...]]:
    """Seconds of 3x3 / stride-2 max and average pooling by window elements read (outputs x 9): torch's
    CPU pooling runs far below the memory bandwidth, so the bytes it moves do not price it."""
    tables = {}
    for kind, pool in (("max_pool", F.max_pool2d), ("avg_pool", F.avg_pool2d)):
        pairs = []
        for shape in plan.pooling_shapes:
            x = torch.randn(shape)
            reads = pool(x, 3, 2, 1).numel() * 9
            pairs.append((reads, _seconds_per_call(lambda: pool(x, 3, 2, 1), plan)))
            step()
        tables[kind] = _running_minimum(pairs)
    return tables


def _weight_stream(plan: Plan, step: Callable[[], None]) -> tuple[tuple[int, float], ...]:
    """Seconds of a one-row float32 product by its (square) weight's bytes, 1 MB to 128 MB: how fast a weight
    streams from L2, the last-level cache or memory, the floor under every product's time."""
    pairs = []
    for width in plan.stream_widths:
        x, layer = torch.randn(1, width), nn.Linear(width, width, bias=False)
        pairs.append((4 * width * width, _seconds_per_call(lambda: F.linear(x, layer.weight), plan)))
        step()
    return _running_minimum(pairs)


def _running_minimum(pairs: list[tuple[int, float]]) -> tuple[tuple[int, float], ...]:
    """(size, seconds) pairs with each time lowered to the fastest larger size's: times never fall as sizes grow."""
    return tuple((size, min(seconds for _, seconds in pairs[index:])) for index, (size, _) in enumerate(pairs))


def _runtime_modules() -> list[tuple[nn.Module, tuple[int, ...]]]:
    """A small instance of each module class graphs call whose Python work per call is not one of the
    measured kernels: torch.nn's common layers (BatchNorm's forward alone does a dozen checks in Python) and
    AntMan's factorised forms."""
    torch.manual_seed(0)
    dense = nn.Linear(64, 64)
    forms = [factorize(dense, "lr", 8), factorize(dense, "group", groups=4)]
    forms += [factorize(dense, form, 8, 4) for form in ("sparse_lr", "lr_sparse", "grouped_shuffle")]
    rows = [(module, (4, 64)) for module in [dense] + forms]
    rows += [(module, (4, 64)) for module in (nn.LayerNorm(64), nn.GELU(), nn.Dropout(), nn.Softmax(-1), nn.Tanh())]
    images = [nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, 2, 1), nn.BatchNorm2d(8),
              nn.ReLU(inplace=True), nn.ReLU(), nn.ReLU6(inplace=True), nn.SiLU(inplace=True), nn.Hardswish(),
              nn.Hardsigmoid(), nn.Sigmoid(), nn.MaxPool2d(3, 2, 1), nn.AvgPool2d(3, 2, 1), nn.AdaptiveAvgPool2d(1),
              nn.Flatten(), nn.Identity()]
    return rows + [(module.eval(), (1, 8, 4, 4)) for module in images]


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


BUSY_CORES_LIMIT = 0.5  # other processes' load above which calibrate warns that its timings are unreliable


def busy_cores(seconds: float = 0.25) -> float | None:
    """Cores the machine kept busy over ``seconds`` while this process slept: other processes' load (Linux's
    /proc/stat; None where it cannot be read)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(value) for value in stat.readline().split()[1:9]]
        return sum(fields) - fields[3] - fields[4], sum(fields)  # all but idle and iowait, all

    try:
        busy_before, total_before = sample()
        time.sleep(seconds)
        busy_after, total_after = sample()
    except (OSError, ValueError):
        return None
    return (busy_after - busy_before) / max(total_after - total_before, 1) * (os.cpu_count() or 1)


def _warn_if_busy() -> None:
    """Timings taken while other processes run are slow and uneven (a multi-threaded op waits for its
    descheduled threads), and the profile cannot tell afterwards: say so before measuring."""
    busy = busy_cores()
    if busy is not None and busy > BUSY_CORES_LIMIT:
        warnings.warn(f"fxreduce calibrate: other processes kept {busy:.1f} of {os.cpu_count()} cores busy as it "
                      "started; kernels timed under load run slower and more unevenly than on an idle machine, "
                      "and the profile will predict that. Calibrate again when the machine is idle.", stacklevel=3)


def calibrate(path: str | Path | None = None, *, quick: bool = False, threads: int | None = None,
              progress: bool = True) -> Profile:
    """Measure this machine and write its latency profile to ``path`` (default: the user's cache directory).

    ``quick`` measures a tiny grid (seconds; for tests). ``threads`` sets torch's thread count for the
    measurements, which the profile records (default: the current count).
    """
    plan = TINY if quick else FULL
    _warn_if_busy()
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    keep_freed_memory()
    cells = {**_gemm_cells("gemm", plan.gemm_ms, plan.gemm_ns, plan.gemm_ks, _linear),
             **_gemm_cells("int8_gemm", plan.int8_ms, plan.int8_ns, plan.int8_ns, _int8_linear), **_conv_cells(plan)}
    total = (plan.passes * len(cells) + len(plan.bandwidth_elements) + 2 * len(plan.pooling_shapes)
             + len(plan.stream_widths) + len(_runtime_modules()))
    try:
        with torch.no_grad(), tqdm(total=total, desc="fxreduce calibrate", unit="kernel", disable=not progress,
                                   leave=False) as bar:
            step = functools.partial(bar.update, 1)
            call, dispatch, module = _overheads(plan)
            measured = _sweep(cells, plan, step)
            grids = {"gemm": _gemm_grid("gemm", plan.gemm_ms, plan.gemm_ns, plan.gemm_ks, measured),
                     "int8_gemm": _gemm_grid("int8_gemm", plan.int8_ms, plan.int8_ns, plan.int8_ns, measured),
                     **{kind: _conv_grid(kind, measured) for kind in _CONV_KINDS}}
            grids = {name: _with_fixed_cost(grid, call + dispatch) for name, grid in grids.items()}
            bandwidth = _bandwidth(plan, step)
            profile = Profile(Machine.current(), call, dispatch, module, bandwidth, grids,
                              datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              pooling=_pooling(plan, step), weight_stream=_weight_stream(plan, step))
            profile = dataclasses.replace(profile, module_calls=_module_calls(profile, plan, step))
        profile.validate()
        profile.save(path if path is not None else default_profile_path())
        return profile
    finally:
        torch.set_num_threads(previous)
