"""sparse_lowrank's latency objective against its FLOP objective, at the same MAC budget, side by side.

For each model and MAC reduction, three graphs run interleaved in one process (eval, no_grad): the
dense model, ``sparse_lowrank(flop_reduction=R)`` (form 'lr', the FLOP objective) and
``sparse_lowrank(flop_reduction=R, objective='latency')`` (per layer the form and groups this machine's
profile predicts fastest, or no rewrite where none is predicted faster). The profile is calibrated at the
start. Models: ViT-B/16's MLP blocks (torchvision's vit_b_16, random weights, only its MLP Linears
rewritten) at batch 1 and 8, and a 2-layer word LSTM LM (H=650, V=2000, T=35) at batch 20, its gate
matrices and decoder rewritten. Goal (issue 18): the latency objective's measured speedup >= the FLOP
objective's. Where both objectives choose the same rewrite the graph is timed once: the two speedups are
one measurement, not a race between two runs of the same graph.

    python benchmarks/bench_latency_objective.py           # rewrites its section of docs/benchmarks.md
    python benchmarks/bench_latency_objective.py --quick   # one small case on a tiny grid, writes nothing
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
import torchvision
from torch import nn
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import fix_threads, markdown_table, time_side_by_side, write_section  # noqa: E402
from bench_latency_model import WordLM, eval_call  # noqa: E402

import fxreduce as fr  # noqa: E402
from fxreduce.cost_models.latency import load_profile  # noqa: E402

TITLE = "sparse_lowrank: latency objective vs FLOP objective"


def cases(quick: bool) -> list[tuple[str, nn.Module, tuple, dict, str, float]]:
    """(label, model, inputs, dims, layers glob, reduction) per row."""
    torch.manual_seed(0)
    if quick:
        mlp = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256))
        return [("MLP 256-1024-256, batch 8", mlp, (torch.randn(8, 256),), {"N": (0, 0)}, "*", 4.0)]
    vit = torchvision.models.vit_b_16()
    lm = WordLM()
    tokens = torch.randint(0, 2000, (35, 20))
    rows = []
    for reduction in (2.0, 4.0):
        for batch in (1, 8):
            rows.append((f"ViT-B/16 MLPs, batch {batch}", vit, (torch.randn(batch, 3, 224, 224),), {"N": (0, 0)},
                         "*mlp*", reduction))
        rows.append(("word LSTM LM (H=650), batch 20 x 35", lm, (tokens,), {"N": (0, 1)}, "*", reduction))
    return rows


def _structure(gm: torch.fx.GraphModule) -> list[tuple]:
    """Each submodule's class and parameter shapes: two rewrites with the same structure are the same graph."""
    return [(name, type(module).__name__, [tuple(p.shape) for p in module.parameters(recurse=False)])
            for name, module in gm.named_modules()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small case on a tiny grid; writes nothing")
    parser.add_argument("--profile", help="use this profile instead of calibrating at the start")
    args = parser.parse_args()
    fix_threads()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(args.profile) if args.profile else Path(scratch) / "profile.json"
        if not args.profile:
            fr.calibrate(path, quick=args.quick)
        load_profile(path)
        for label, model, inputs, dims, layers, reduction in tqdm(cases(args.quick), desc="cases", leave=False):
            gm = fr.trace(model.eval(), inputs, dims)
            spec = f"sparse_lowrank(layers={layers!r}, flop_reduction={reduction})"
            flops = fr.apply(gm, spec).graph_module.eval()
            latency_result = fr.apply(gm, spec[:-1] + f", objective='latency', profile={str(path)!r})")
            latency = latency_result.graph_module.eval()
            forms = sorted({r.rewrite.what.split(":")[0] for r in latency_result.report.steps[0].rewrites})
            left = len(latency_result.report.steps[0].skipped)
            same = _structure(flops) == _structure(latency)
            candidates = (("dense", gm.eval()), ("flops", flops)) + (() if same else (("latency", latency),))
            times = time_side_by_side({name: eval_call(g, inputs) for name, g in candidates},
                                      repeats=5 if args.quick else 11)
            by_flops = times["dense"] / times["flops"]
            by_latency = by_flops if same else times["dense"] / times["latency"]
            rows.append([label, f"{reduction:g}x", f"{by_flops:.2f}x", f"{by_latency:.2f}x",
                         "same rewrite" if same else ("yes" if by_latency >= by_flops else "no"),
                         ", ".join(forms) + (f"; {left} left dense" if left else "")])
    met = sum(row[4] != "no" for row in rows)
    body = (f"Measured eval speedup over the dense model; goal: latency objective >= FLOP objective, met in "
            f"{met} of {len(rows)} rows ('same rewrite': both objectives chose the same graph, timed once).\n\n"
            + markdown_table(["model", "MAC reduction", "FLOP objective (lr)", "latency objective", "goal met",
                              "forms the latency objective chose"], rows))
    print(body)
    if not args.quick:
        write_section(TITLE, body)


if __name__ == "__main__":
    main()
