"""A/B of fxreduce's GEMM kernels: a git revision's fxreduce/csrc against the working tree's, in one process.

On a shared machine the same build runs at different speeds for tens of seconds at a time (docs/cost-model.md),
so two builds timed in turns of whole processes need many turns and still mislead. This compiles both versions
of kernels_impl.h into one binary (each in a namespace of its own), times them call by call on the same
operands (benchmarks/ab_kernels_driver.cpp: an LSTM input projection's indirect-K forward, weight gradient and
input gradient, T=35 steps of 20 rows, in = H, out = 4H; and the dense weight gradient over all steps' rows) and
reports the median of the pairs' time ratios.
One thread (the driver calls a kernel table directly); the machine's ISA unless --isa names another.

    python benchmarks/ab_kernels.py                                  # HEAD vs the working tree
    python benchmarks/ab_kernels.py --base HEAD~3 --shapes 200:0.5,650:1.0 --pairs 60
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import tempfile
from pathlib import Path

from tqdm import tqdm

from _common import markdown_table

ROOT = Path(__file__).resolve().parent.parent
CSRC = "fxreduce/csrc"
OPS = ("forward", "weight_gradient", "input_gradient", "dense_weight_gradient")


def isa_flags() -> dict[str, list[str]]:
    """The -m flags setup.py compiles each kernels_<isa>.cpp with (read from setup.py, not repeated here)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "ISA_FLAGS":
            table = ast.literal_eval(node.value.body if isinstance(node.value, ast.IfExp) else node.value)
            flags = {name[len("kernels_"):-len(".cpp")]: value for name, value in table.items()
                     if name.startswith("kernels_")}
            return {**flags, "portable": []}
    raise SystemExit("setup.py has no ISA_FLAGS table")


def unit_source(csrc: Path, isa: str, name: str) -> str:
    """kernels_<isa>.cpp of one tree, its namespace and table renamed to ab_<name>."""
    text = (csrc / f"kernels_{isa}.cpp").read_text()
    text = re.sub(r"#define FXR_ISA \w+", f"#define FXR_ISA ab_{name}", text)
    return re.sub(r"#define FXR_TABLE \w+", f"#define FXR_TABLE ab_{name}_table", text)


def build(base: str, isa: str, workdir: Path) -> Path:
    base_root = workdir / "base"
    base_root.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", base, CSRC], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(base_root)], input=archive, check=True)
    trees = {"base": base_root / CSRC, "work": ROOT / CSRC}
    if (trees["base"] / "kernels.h").read_text() != (trees["work"] / "kernels.h").read_text():
        raise SystemExit(f"kernels.h differs between {base} and the working tree: the driver can only call one "
                         "interface; compare revisions that share it")
    flags = ["-O3", "-std=c++17", "-Wno-psabi"]
    objects = []
    for name, csrc in trees.items():
        unit = workdir / f"unit_{name}.cpp"
        unit.write_text(unit_source(csrc, isa, name))
        objects.append(workdir / f"unit_{name}.o")
        subprocess.run(["g++", *flags, *isa_flags()[isa], "-I", str(csrc), "-c", str(unit), "-o", str(objects[-1])],
                       check=True)
    binary = workdir / "ab_kernels"
    subprocess.run(["g++", *flags, "-I", str(trees["work"]), str(ROOT / "benchmarks" / "ab_kernels_driver.cpp"),
                    *map(str, objects), "-o", str(binary)], check=True)
    return binary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="HEAD", help="the git revision to compare against (default HEAD)")
    parser.add_argument("--isa", help="kernels_<isa>.cpp to build (default: the one fxreduce picks on this CPU)")
    parser.add_argument("--shapes", default="200:1.0,200:0.5,200:0.3,650:0.5,650:1.0", help="H:keep pairs")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated of {', '.join(OPS)}")
    parser.add_argument("--pairs", type=int, default=30, help="timed calls of each build per op and shape")
    args = parser.parse_args()
    isa = args.isa
    if isa is None:
        from fxreduce import native

        isa = native.active_isa() or os.environ.get(native.ISA_VARIABLE) or "portable"
    if isa not in isa_flags():
        raise SystemExit(f"unknown ISA {isa!r}: setup.py builds {', '.join(isa_flags())}")
    ops = [op for op in args.ops.split(",") if op]
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise SystemExit(f"unknown ops {unknown}: choose from {', '.join(OPS)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="fxreduce-ab-") as workdir:
        binary = build(args.base, isa, Path(workdir))
        for shape in tqdm(args.shapes.split(","), desc="shapes"):
            hidden, keep = shape.split(":")
            for op in ops:
                line = subprocess.run([str(binary), hidden, keep, str(args.pairs), op], capture_output=True, text=True,
                                      check=True).stdout.split()
                base_min, base_median, work_min, work_median, ratio = map(float, line[3:])
                rows.append([hidden, keep, op, f"{base_min:.3f} / {base_median:.3f}",
                             f"{work_min:.3f} / {work_median:.3f}", f"{ratio:.3f}"])
    print(f"{isa} kernels, 1 thread, {args.pairs} interleaved pairs; base = {args.base}, work = the working tree")
    print(markdown_table(["H", "keep", "op", "base ms (min / median)", "work ms (min / median)",
                          "work / base time (median of pairs)"], rows))


if __name__ == "__main__":
    main()
