"""fxreduce's native kernels alone against dense MKL GEMMs of the full shape, side by side in one run.

Shapes: an LSTM layer's input projection over T=35 steps of batch 20 (in = H, out = 4H), with a keep set
per step of k = keep x H input units. Each indirect-K kernel (forward, input gradient, weight gradient)
does keep x the dense GEMM's work, so its ideal speed ratio over the dense GEMM is 1/keep; the table
gives the measured ratio and its fraction of the ideal. "recurrent step" is one per-step GEMM of the
recurrence (batch 20 rows times W_hh^T) against torch.mm on the same operands.

    python benchmarks/bench_native_kernels.py          # full run, rewrites its docs/benchmarks.md section
    python benchmarks/bench_native_kernels.py --quick  # smoke run, prints only
    python benchmarks/bench_native_kernels.py --threads 1  # its own section: steadier on a shared machine
"""

from __future__ import annotations

import argparse
import os

import torch
from tqdm import tqdm

from _common import fix_threads, markdown_table, time_warm, write_section
from fxreduce import native

STEPS, BATCH = 35, 20
ops = torch.ops.fxreduce


def kernel_pairs(hidden: int, keep: float, generator: torch.Generator) -> dict[str, tuple]:
    """Per kernel: (dense MKL GEMM of the full shape, the native kernel over the kept units)."""
    width, out = hidden, 4 * hidden
    k = max(1, round(keep * width))
    x = torch.randn(STEPS, BATCH, width, generator=generator)
    weight = torch.randn(out, width, generator=generator)
    wt = weight.t().contiguous()
    index = torch.rand(STEPS, width, generator=generator).argsort(1)[:, :k].sort(1).values
    xk = torch.gather(x, 2, index[:, None, :].expand(STEPS, BATCH, k)).contiguous()
    dout = torch.randn(STEPS, BATCH, out, generator=generator)
    flat_x, flat_dout = x.flatten(0, 1), dout.flatten(0, 1)
    return {
        "forward": (lambda: torch.mm(flat_x, wt), lambda: ops.gather_matmul(xk, wt, index)),
        "input gradient": (lambda: torch.mm(flat_dout, weight), lambda: ops.gather_matmul_input_grad(dout, wt, index, k)),
        "weight gradient": (lambda: torch.mm(flat_dout.t(), flat_x),
                            lambda: ops.gather_matmul_weight_grad(xk, dout, index, width)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="H=200 only, few repeats, no docs written")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2, the issue's setting, by default)")
    args = parser.parse_args()
    if not native.available():
        raise SystemExit(f"the native kernels are not built: {native.MISSING}")
    threads = fix_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    sizes = (200,) if args.quick else (200, 650)
    keeps = (0.5,) if args.quick else (1.0, 0.5, 0.3)
    repeats = 3 if args.quick else 15
    rows = []
    load_before = os.getloadavg()[0]
    for hidden in tqdm(sizes, desc="sizes"):
        for keep in keeps:
            pairs = kernel_pairs(hidden, keep, generator)
            candidates = {f"{name} {side}": fn for name, pair in pairs.items() for side, fn in zip(("mkl", "ours"), pair)}
            times = time_warm(candidates, repeats)
            for name in pairs:
                ratio = times[f"{name} mkl"] / times[f"{name} ours"]
                rows.append([hidden, keep, name, f"{times[f'{name} mkl'] * 1e3:.3f}", f"{times[f'{name} ours'] * 1e3:.3f}",
                             f"{ratio:.2f}x", f"{1 / keep:.2f}x", f"{ratio * keep:.2f}"])
        h = torch.randn(BATCH, hidden, generator=generator)
        weight_hh = torch.randn(4 * hidden, hidden, generator=generator)
        wt_hh = weight_hh.t().contiguous()
        times = time_warm({"mm": lambda: torch.mm(h, weight_hh.t()), "ours": lambda: ops.gather_matmul(h[None], wt_hh, None)},
                          repeats * 4)
        rows.append([hidden, 1.0, "recurrent step (20 rows)", f"{times['mm'] * 1e3:.3f}", f"{times['ours'] * 1e3:.3f}",
                     f"{times['mm'] / times['ours']:.2f}x", "1.00x", f"{times['mm'] / times['ours']:.2f}"])
    table = markdown_table(["H", "keep", "kernel", "dense MKL ms", "ours ms", "speed ratio", "ideal", "of ideal"], rows)
    print(table)
    if not args.quick:
        note = (
            f"ISA {native.active_isa()}, {threads} threads, float32. Input projection of an LSTM layer: T={STEPS}, "
            f"batch {BATCH}, in = H, out = 4H, a keep set of keep x H input units per step; the dense GEMM (torch.mm, "
            "MKL) computes the full shape. Median of warm calls (each timed call follows an untimed one), the "
            "candidates interleaved. 1-minute load average before / after: "
            f"{load_before:.1f} / {os.getloadavg()[0]:.1f} (above 0.5, other jobs shared the cores and the "
            "figures are noisy)."
        )
        title = "Native kernels vs dense MKL GEMMs" + ("" if threads == 2 else f", {threads} thread(s)")
        write_section(title, note + "\n\n" + table, per_isa=True)


if __name__ == "__main__":
    main()
