"""AntMan's modules against the dense Linear at real models' shapes, as ratios, threads fixed.

Shapes: an LSTM gate matrix of H=1500 (1500 -> 6000) at batch 1, 20 and 256 (one time step's GEMM), and
ViT-B's MLP (768 -> 3072) at 197 tokens (one image). Each form is sized as the pass sizes it for a
per-layer FLOP reduction (the largest rank that meets it; ``group`` takes g = the reduction), and the
table gives the MAC reduction, the measured speedup, and their ratio, the realised efficiency. Goal
(issue 4): at >= 4x reduction and batch >= 20, speedup >= 0.8x the reduction. Inference (no_grad); each
timed call follows an untimed call of the same module, so a layer is timed in steady state, as a
recurrent layer runs step after step (interleaving would time each right after another's weights
flushed the cache).

    python benchmarks/bench_sparse_lowrank.py           # full run, rewrites its section of docs/benchmarks.md
    python benchmarks/bench_sparse_lowrank.py --quick   # small shapes, writes nothing
"""

from __future__ import annotations

import argparse
import os
import sys

import sympy
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import fix_threads, markdown_table, time_warm, write_section  # noqa: E402

from fxreduce.modules.factorized import factorize, macs_per_row  # noqa: E402

TITLE = "AntMan factorised Linear layers (sparse_lowrank)"
# Steady-state calls timed per module; the median of 15 still moved single rows by ~5% between runs.
REPEATS = 31
SHAPES = [("LSTM gates H=1500", 1500, 6000, 1), ("LSTM gates H=1500", 1500, 6000, 20),
          ("LSTM gates H=1500", 1500, 6000, 256), ("ViT-B MLP fc1", 768, 3072, 197)]
QUICK_SHAPES = [("small", 384, 1536, 20)]
FORMS = [("lr", 1), ("group", None), ("sparse_lr", 4), ("lr_sparse", 4), ("grouped_shuffle", 4)]


def size(form: str, groups: int | None, n: int, m: int, reduction: float) -> tuple[int | None, int]:
    """(rank, groups) as the pass chooses them for a per-layer reduction."""
    if form == "group":
        return None, int(reduction)
    r = sympy.Symbol("r", positive=True)
    bound = float(sympy.solve(sympy.Eq(macs_per_row(form, n, m, r, groups) * reduction, m * n), r)[0])
    return int(bound // groups) * groups, groups


def bench(shapes, reductions, repeats: int) -> tuple[list[list[object]], list[str]]:
    rows, misses = [], []
    built: dict[tuple[int, int], tuple[dict, dict]] = {}  # one set of modules per weight shape (SVDs are slow)
    for label, n, m, batch in shapes:
        if (n, m) not in built:
            torch.manual_seed(0)
            dense = nn.Linear(n, m).eval()
            modules, ratios = {"dense": dense}, {}
            for reduction in reductions:
                for form, groups in FORMS:
                    rank, g = size(form, groups, n, m, reduction)
                    name = f"{form} r={rank} g={g}" if rank else f"{form} g={g}"
                    modules[name] = factorize(dense.weight, form, rank, g, dense.bias).eval()
                    ratios[name] = m * n / float(macs_per_row(form, n, m, rank, g))
            built[(n, m)] = modules, ratios
        modules, ratios = built[(n, m)]
        x = torch.randn(batch, n)
        with torch.no_grad():
            times = time_warm({name: (lambda module=module: module(x)) for name, module in modules.items()}, repeats)
        for name, ratio in ratios.items():
            speedup = times["dense"] / times[name]
            efficiency = speedup / ratio
            rows.append([label, f"{n} -> {m}", batch, name, f"{ratio:.2f}x", f"{speedup:.2f}x", f"{efficiency:.2f}",
                         f"{1e6 * times[name]:.0f}", f"{1e6 * times['dense']:.0f}"])
            if ratio >= 4 and batch >= 20 and efficiency < 0.8:
                misses.append(f"{label} batch {batch} {name}: efficiency {efficiency:.2f}")
    return rows, misses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small shape, few repeats, no docs written")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2, as every benchmark)")
    args = parser.parse_args()
    fix_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    load_before = os.getloadavg()[0]
    rows, misses = bench(shapes, (4, 12), 3 if args.quick else REPEATS)
    load = f"1-minute load average before / after: {load_before:.1f} / {os.getloadavg()[0]:.1f}" + (
        " (other jobs shared the cores: the figures are noisy)." if max(load_before, os.getloadavg()[0]) > 0.5 else ".")
    header = ["layer", "shape", "rows", "form", "MAC reduction", "speedup", "efficiency", "us", "dense us"]
    table = markdown_table(header, rows)
    print(table)
    goal = ("Goal met: every form at >= 4x reduction and batch >= 20 reaches >= 0.8x its reduction." if not misses
            else "Below the goal (efficiency < 0.8 at >= 4x, batch >= 20): " + "; ".join(misses) + ".")
    print(goal)
    if not args.quick:
        note = (f"Inference, one call of each module on (rows, in) float32 inputs, median of {REPEATS} steady-state "
                f"calls. Efficiency = speedup / MAC reduction. {load} " + goal)
        write_section(TITLE, note + "\n\n" + table)


if __name__ == "__main__":
    main()
