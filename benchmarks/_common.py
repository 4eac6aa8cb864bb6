"""Shared benchmark plumbing: fixed threads, side-by-side timing, and docs/benchmarks.md sections.

Every benchmark script measures its candidates in one run (interleaved, so machine noise hits all of
them alike), reports ratios, and rewrites only its own section of docs/benchmarks.md, atomically.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from fxreduce import native
from fxreduce.measurement import keep_freed_memory, shuffled_rounds, time_side_by_side  # noqa: F401 (re-exported)
from fxreduce.serialization import write_markdown_section

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
THREADS = 2
HEADER = (
    "# Benchmarks\n\nEach section is rewritten by the command it names. The candidates of a table run in one "
    "process, interleaved in a freshly shuffled order every round (medians reported), with torch's threads fixed. "
    'Sections whose "Measured on" line says "glibc malloc keeping freed memory" ran with '
    "`fxreduce.measurement.keep_freed_memory()`: freed tensors stay with the process instead of being "
    "page-faulted in afresh on the next call (PyTorch's CPU tuning guide gets the same by swapping in jemalloc "
    "or tcmalloc); it applies to every candidate alike. Sections titled \"(AVX-512 kernels)\" or \"(AVX2 kernels)\" "
    "hold fxreduce's native kernels' figures on a machine with that vector ISA: machines of this project's kind "
    "come with either, and the same kernels run at different speeds on them."
)
_allocator = {"keeps freed memory": False}
ISA_NAMES = {"avx512": "AVX-512", "avx2": "AVX2", "portable": "portable C++"}


def fix_threads(threads: int = THREADS) -> int:
    """Pin torch's intra-op threads and keep freed memory in the process (:func:`keep_freed_memory`), so
    figures are comparable between runs and machines and do not depend on what ran before in the process."""
    torch.set_num_threads(threads)
    _allocator["keeps freed memory"] = keep_freed_memory()
    return threads


def time_warm(candidates: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call, round-robin like :func:`time_side_by_side`, but each timed call follows an
    untimed call of the same candidate.

    Plain interleaving times each layer right after another candidate whose weights flushed the cache:
    measured, the kernel placed after fp32 Linear ran up to 1.5x slower than the same kernel elsewhere.
    A single layer's benchmark should compare kernels in steady state; whole models use the plain helper.
    """
    return time_steady(candidates, repeats, block_seconds=0.0)


def time_steady(candidates: dict, repeats: int, block_seconds: float = 0.02) -> dict[str, float]:
    """Median seconds per call in steady state: round-robin like :func:`time_side_by_side`, each turn an untimed
    call then a timed block of back-to-back calls of one candidate (at least ``block_seconds``, one call at 0),
    as ``fxreduce calibrate`` times its kernels.

    One untimed call does not restore a layer's steady state after another candidate streamed its weights
    through the cache: measured on the AVX2 machine, a 9 MB low-rank layer ran in 0.30 ms back to back, but
    0.84-1.0 ms right after the 36 MB dense layer it replaces, even with one to three warm calls between."""
    calls = {}
    for name, fn in candidates.items():
        fn()
        start = time.perf_counter()
        fn()
        calls[name] = max(1, math.ceil(block_seconds / max(time.perf_counter() - start, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for order in shuffled_rounds(list(candidates), repeats):
        for name in order:
            candidates[name]()
            start = time.perf_counter()
            for _ in range(calls[name]):
                candidates[name]()
            samples[name].append((time.perf_counter() - start) / calls[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def machine_line() -> str:
    """One line naming what the figures were measured on: the machines of this project's kind differ in their
    vector units (AVX-512 on some, AVX2 only on others), which moves every kernel's figures."""
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.backends.cpu.get_cpu_capability()} (fxreduce kernels: {native.active_isa() or 'torch path'}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, Python {platform.python_version()}"
        + (", glibc malloc keeping freed memory" if _allocator["keeps freed memory"] else "")
    )


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(title: str, body: str, command: str | None = None, path: Path = DOCS, per_isa: bool = False) -> None:
    """Replace (or append) the ``## title`` section of docs/benchmarks.md, headed by the command and machine.

    per_isa: the figures are the native kernels' own, so an AVX2 machine's run gets a section of its own beside
    an AVX-512 machine's instead of replacing it (the title names the kernels' ISA)."""
    if per_isa:
        isa = ISA_NAMES.get(native.active_isa())
        title += f" ({isa} kernels)" if isa else " (torch path)"
    command = command or "python " + " ".join([os.path.relpath(sys.argv[0], path.parent.parent), *sys.argv[1:]])
    body = f"Command: `{command}`  \nMeasured on: {machine_line()}, {time.strftime('%Y-%m-%d')}\n\n{body.strip()}"
    write_markdown_section(path, title, body, HEADER)
