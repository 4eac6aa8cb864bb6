"""Structured dropout: one training step of a 2-layer LSTM language model, side by side in one run.

Workload: examples/word_lm.py's WordLanguageModel (Embedding(2000) -> Dropout -> 2-layer LSTM with
between-layer dropout -> Dropout -> Linear decoder -> cross-entropy) at the PTB small / medium / large
sizes H = 200 / 650 / 1500 (embedding = H), T=35, batch 20, dropout p = 0.5 (and 0.65 at H=1500).
A step is zero_grad + forward + backward + SGD step. Candidates: torch.nn.LSTM with ordinary dropout
(the baseline), our decomposed LSTM with ordinary dropout ("ours dense"), and the structured_dropout
pass's output in each mask mode, with recurrent masks off and on. "certified" is the training-step MAC
reduction the cost model proves for that rewrite (before / after); a speedup can approach it only as
far as the GEMMs dominate the step.

    python benchmarks/bench_structured_dropout.py          # full run, rewrites its docs/benchmarks.md section
    python benchmarks/bench_structured_dropout.py --quick  # smoke run at H=200, prints only
    python benchmarks/bench_structured_dropout.py --masks per_step --configs 650:0.5  # some rows only

The LSTMs run on fxreduce's native kernels where they are built (fxreduce doctor says which).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from _common import fix_threads, markdown_table, time_side_by_side, write_section
from bench_lstm import train_step

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import fxreduce  # noqa: E402
from fxreduce import native  # noqa: E402
from fxreduce.modules.lstm import DecomposedLSTM  # noqa: E402
from structured_dropout_lm import MASKS, OFFSETS  # noqa: E402  (the example's mask variants, measured here)
from word_lm import WordLanguageModel  # noqa: E402

VOCAB, STEPS, BATCH = 2000, 35, 20
CONFIGS = ((200, 0.5), (650, 0.5), (1500, 0.5), (1500, 0.65))


def baseline(hidden: int, p: float) -> WordLanguageModel:
    torch.manual_seed(0)
    return WordLanguageModel(VOCAB, hidden, hidden, 2, p)


def ours_dense(model: WordLanguageModel) -> nn.Module:
    """The same model (same weights) with the LSTM swapped for our decomposed one, ordinary dropout."""
    dense = WordLanguageModel(VOCAB, model.lstm.hidden_size, model.lstm.hidden_size, 2, model.lstm.dropout)
    dense.load_state_dict(model.state_dict())
    dense.lstm = DecomposedLSTM.from_torch(model.lstm)
    return dense


def structured(traced, p: float, masks: str, recurrent: bool):
    """The pass's output and the certified ratio of training-step MACs (before / after)."""
    result = fxreduce.apply(traced, f"structured_dropout(p={p}, {masks}, recurrent={recurrent})")
    gm = result.graph_module
    before, after = fxreduce.cost(traced, training=True), fxreduce.cost(gm, training=True)
    certificate = fxreduce.certify(before, after, metric="macs")
    assert certificate.proven, certificate
    return gm, certificate.ratio_at(N=BATCH, T=STEPS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="H=200 only, few repeats, no docs written")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 is steadier on a loaded machine)")
    parser.add_argument("--masks", default=",".join(MASKS), help=f"comma-separated mask modes of {', '.join(MASKS)}")
    parser.add_argument("--configs", default=",".join(f"{h}:{p}" for h, p in CONFIGS),
                        help="comma-separated H:p pairs")
    args = parser.parse_args()
    masks = {label: MASKS[label] for label in args.masks.split(",")}
    configs = [(int(h), float(p)) for h, p in (pair.split(":") for pair in args.configs.split(","))]
    fix_threads(args.threads)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (BATCH, STEPS), generator=generator)
    targets = torch.randint(0, VOCAB, (BATCH, STEPS), generator=generator)
    rows = []
    load_before = os.getloadavg()[0]
    for hidden, p in tqdm(configs[:1] if args.quick else configs, desc="configurations"):
        model = baseline(hidden, p)
        traced = fxreduce.trace(model, (tokens,), {"N": (0, 0), "T": (0, 1)})
        candidates = {"nn.LSTM": model, "ours dense": ours_dense(model)}
        certified = {}
        for recurrent in (False, True):
            for label, mask in masks.items():
                name = f"{label}{' +h' if recurrent else ''}"
                candidates[name], certified[name] = structured(traced, p, mask, recurrent)
        repeats = 3 if args.quick else 9 if hidden < 1000 else 5
        times = time_side_by_side({name: train_step(m, tokens, targets) for name, m in candidates.items()},
                                  repeats=repeats, warmup=1)
        for name, ratio in certified.items():
            rows.append([hidden, p, name, f"{times[name]:.3f}", f"{times['nn.LSTM']:.3f}", f"{times['ours dense']:.3f}",
                         f"{times['nn.LSTM'] / times[name]:.2f}x", f"{times['ours dense'] / times[name]:.2f}x",
                         f"{ratio:.2f}x"])
    table = markdown_table(["H", "p", "masks (+h: recurrent)", "structured s", "nn.LSTM s", "ours dense s",
                            "speedup vs nn.LSTM", "speedup vs ours dense", "certified MAC reduction"], rows)
    print(table)
    if not args.quick:
        note = (
            f"One training step (zero_grad + forward + backward + SGD) of examples/word_lm.py's 2-layer LSTM LM, "
            f"vocabulary {VOCAB}, embedding = H, T={STEPS}, batch {BATCH}, float32, {args.threads} thread(s), "
            f"kernels: {'native ' + native.active_isa() if native.available() else 'torch path'}; median seconds, "
            "all candidates of a row interleaved in one run. Masks: per_sequence = one batch-shared set per "
            "sequence; per_step = a uniform set per time step (the paper's case); per_step_window = per step a "
            "random cyclic window in a per-sequence permutation (not uniform over subsets, see "
            f"docs/structured-dropout.md); per_step_window/{OFFSETS} = the same with windows starting at one of "
            f"{OFFSETS} evenly spaced offsets (offsets={OFFSETS}), so the steps sharing an offset run their input, "
            "decoder and weight-gradient GEMMs together. The certified reduction counts GEMM multiply-adds only "
            "(forward + both gradients). 1-minute load average before / after: "
            f"{load_before:.1f} / {os.getloadavg()[0]:.1f} (above 0.5, other jobs shared the cores and the "
            "figures are noisy)."
        )
        write_section("Structured dropout: LSTM LM training step", note + "\n\n" + table, per_isa=True)


if __name__ == "__main__":
    main()
