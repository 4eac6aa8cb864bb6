"""LowRankLinear's fused native product against its two torch GEMMs and the dense Linear, side by side.

For each shape (rows, in -> out) and rank: the fused op (``torch.ops.fxreduce.lowrank_linear``), the
two-GEMM reference (``F.linear(F.linear(x, V), U, b)``, MKL) and the dense ``nn.Linear``, timed round-robin
in one process (each timed call after an untimed call of the same candidate, ``time_warm``), inference,
float32, threads fixed; then a training step (forward + backward) with each. Efficiency = (dense time /
candidate time) / MAC reduction. The rows sweep at ViT-B's fc1 rank-51 shape is what LowRankLinear's
dispatch threshold (``lowrank_kernel.MIN_ROWS``) is read from; the must-show rows (issue 21):
ViT-B MLP fc1 (768 -> 3072, 197 rows) at 12x >= 0.8 efficiency, LSTM gates (1500 -> 6000) at >= 4x and
>= 20 rows >= 0.8.

    python benchmarks/bench_lowrank_kernel.py           # full run, rewrites its section of docs/benchmarks.md
    python benchmarks/bench_lowrank_kernel.py --threads 1   # the same on one thread (a section of its own)
    python benchmarks/bench_lowrank_kernel.py --quick   # two small shapes, writes nothing
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import fix_threads, markdown_table, time_warm, write_section  # noqa: E402

from fxreduce import native  # noqa: E402
from fxreduce.modules.lowrank_kernel import MIN_ROWS  # noqa: E402

TITLE = "Fused low-rank product (lowrank_linear), {threads} thread(s)"
REPEATS = 31
# (label, rows, in, out, rank): ranks as bench_sparse_lowrank sizes the "lr" form for 4x and 12x.
SHAPES = [("ViT-B MLP fc1 12x", rows, 768, 3072, 51) for rows in (1, 8, 12, 16, 32, 48, 64, 96, 128, 197)] + [
    ("ViT-B MLP fc1 4x", 197, 768, 3072, 153),
    *[("LSTM gates H=1500 12x", rows, 1500, 6000, 100) for rows in (1, 20, 64, 256)],
    *[("LSTM gates H=1500 4x", rows, 1500, 6000, 300) for rows in (1, 20, 64, 256)],
]
QUICK_SHAPES = [("small", 20, 384, 1536, 32), ("small", 128, 384, 1536, 32)]
TRAINING_SHAPES = [("ViT-B MLP fc1 12x", 197, 768, 3072, 51), ("LSTM gates H=1500 12x", 256, 1500, 6000, 100)]


def bench(shapes, repeats: int) -> tuple[list[list[object]], list[str]]:
    rows, misses = [], []
    for label, batch, n, m, rank in shapes:
        torch.manual_seed(0)
        dense = nn.Linear(n, m).eval()
        first, second = torch.randn(rank, n) / n ** 0.5, torch.randn(m, rank) / rank ** 0.5
        bias = dense.bias.detach()
        x = torch.randn(batch, n)
        candidates = {
            "fused": lambda: torch.ops.fxreduce.lowrank_linear(x, first, second, bias),
            "two GEMMs": lambda: F.linear(F.linear(x, first), second, bias),
            "dense": lambda: dense(x),
        }
        with torch.no_grad():
            times = time_warm(candidates, repeats)
        reduction = n * m / (rank * (n + m))
        eff = {name: times["dense"] / times[name] / reduction for name in ("fused", "two GEMMs")}
        chosen = "fused" if batch >= MIN_ROWS else "two GEMMs"
        rows.append([label, f"{n} -> {rank} -> {m}", batch, f"{reduction:.2f}x", f"{1e6 * times['fused']:.0f}",
                     f"{1e6 * times['two GEMMs']:.0f}", f"{1e6 * times['dense']:.0f}",
                     f"{times['two GEMMs'] / times['fused']:.2f}x", f"{eff['fused']:.2f}", f"{eff['two GEMMs']:.2f}",
                     chosen])
        if reduction >= 4 and batch >= 20 and eff[chosen] < 0.8:
            misses.append(f"{label} rows {batch}: LowRankLinear's path ({chosen}) efficiency {eff[chosen]:.2f}")
    return rows, misses


def bench_training(shapes, repeats: int) -> list[list[object]]:
    """A training step (forward + backward into x and the factors) with the fused forward, whose backward
    recomputes the intermediate, against torch's two GEMMs: why LowRankLinear keeps the fused op to inference."""
    rows = []
    for label, batch, n, m, rank in shapes:
        torch.manual_seed(0)
        operands = [torch.randn(*shape, requires_grad=True) for shape in ((batch, n), (rank, n), (m, rank), (m,))]
        grad = torch.randn(batch, m)

        def step(forward):
            for t in operands:
                t.grad = None
            forward(*operands).backward(grad)

        times = time_warm({"fused": lambda: step(torch.ops.fxreduce.lowrank_linear),
                           "two GEMMs": lambda: step(lambda x, v, u, b: F.linear(F.linear(x, v), u, b))}, repeats)
        rows.append([label, f"{n} -> {rank} -> {m}", batch, f"{1e6 * times['fused']:.0f}",
                     f"{1e6 * times['two GEMMs']:.0f}", f"{times['two GEMMs'] / times['fused']:.2f}x"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two small shapes, few repeats, no docs written")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2, as every benchmark)")
    args = parser.parse_args()
    if not native.available() or not hasattr(torch.ops.fxreduce, "lowrank_linear"):
        sys.exit(f"the native kernels are not built ({native.MISSING}); nothing to compare")
    fix_threads(args.threads)
    load_before = os.getloadavg()[0]
    rows, misses = bench(QUICK_SHAPES if args.quick else SHAPES, 3 if args.quick else REPEATS)
    training = bench_training(QUICK_SHAPES[1:] if args.quick else TRAINING_SHAPES, 3 if args.quick else REPEATS)
    load_after = os.getloadavg()[0]
    load = f"1-minute load average before / after: {load_before:.1f} / {load_after:.1f}" + (
        " (other jobs shared the cores: the figures are noisy)." if max(load_before, load_after) > 0.5 else ".")
    header = ["layer", "shape", "rows", "MAC reduction", "fused us", "two GEMMs us", "dense us", "fused speedup",
              "fused efficiency", "two-GEMM efficiency", f"LowRankLinear runs (from {MIN_ROWS} rows)"]
    table = markdown_table(header, rows)
    training_table = markdown_table(["layer", "shape", "rows", "fused step us", "two-GEMM step us", "fused speedup"],
                                    training)
    print(table + "\n\n" + training_table)
    goal = ("Goal met: every row at >= 4x and >= 20 rows reaches >= 0.8 efficiency on LowRankLinear's path."
            if not misses else "Below the goal: " + "; ".join(misses) + ".")
    print(goal)
    if not args.quick:
        note = (f"Inference, float32, ISA {native.active_isa()}, {args.threads} threads, median of "
                f"{REPEATS} steady-state calls per candidate, round-robin. {load} " + goal)
        training_note = "Training step (forward + backward, float32), same round-robin timing:"
        write_section(TITLE.format(threads=args.threads),
                      "\n\n".join([note, table, training_note, training_table]))


if __name__ == "__main__":
    main()
