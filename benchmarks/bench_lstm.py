"""fxreduce.modules.DecomposedLSTM vs torch.nn.LSTM (oneDNN on CPU), side by side in one run.

Workload: a 2-layer word-level language model (Embedding(2000) -> LSTM -> Linear decoder ->
cross-entropy), T=35, batch 20, at H = 200 / 650 / 1500. "train step" is zero_grad + forward +
backward + SGD step; "inference" is the eval-mode forward under no_grad. Both models hold the same
weights; the ratio nn/ours > 1 means ours is faster. Ours runs fxreduce's native LSTM loop where it is
built (fxreduce doctor says which kernels are active), else the torch path.

    python benchmarks/bench_lstm.py            # full run, rewrites its section of docs/benchmarks.md
    python benchmarks/bench_lstm.py --quick    # smoke run, prints only
    python benchmarks/bench_lstm.py --sizes 650  # some sizes only
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn
from tqdm import tqdm

from _common import fix_threads, markdown_table, time_side_by_side, write_section
from fxreduce import native
from fxreduce.modules.lstm import DecomposedLSTM

VOCAB, STEPS, BATCH, LAYERS = 2000, 35, 20, 2


class LanguageModel(nn.Module):
    def __init__(self, lstm: nn.Module, hidden: int):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, hidden)
        self.lstm = lstm
        self.decoder = nn.Linear(hidden, VOCAB)

    def forward(self, tokens):
        output, _ = self.lstm(self.embedding(tokens))
        return self.decoder(output)


def models(hidden: int) -> dict[str, LanguageModel]:
    """Both language models with identical weights."""
    torch.manual_seed(0)
    reference = LanguageModel(nn.LSTM(hidden, hidden, LAYERS), hidden)
    ours = LanguageModel(DecomposedLSTM.from_torch(reference.lstm), hidden)
    ours.embedding.load_state_dict(reference.embedding.state_dict())
    ours.decoder.load_state_dict(reference.decoder.state_dict())
    return {"nn.LSTM": reference, "ours": ours}


def train_step(model: LanguageModel, tokens, targets):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()

    return step


def inference(model: LanguageModel, tokens):
    def run():
        with torch.no_grad():
            model.eval()(tokens)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="H=200 only, few repeats, no docs written")
    parser.add_argument("--sizes", default="200,650,1500", help="comma-separated hidden sizes")
    args = parser.parse_args()
    fix_threads(2)
    sizes = (200,) if args.quick else tuple(int(size) for size in args.sizes.split(","))
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (STEPS, BATCH), generator=generator)
    targets = torch.randint(0, VOCAB, (STEPS, BATCH), generator=generator)
    rows = []
    load_before = os.getloadavg()[0]
    for hidden in tqdm(sizes, desc="LSTM sizes"):
        pair = models(hidden)
        with torch.no_grad():
            expected, actual = (m.eval()(tokens) for m in pair.values())
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
        repeats = 3 if args.quick else 15 if hidden < 1000 else 7
        for mode, make in (("train step", lambda m: train_step(m, tokens, targets)), ("inference", lambda m: inference(m, tokens))):
            times = time_side_by_side({name: make(m) for name, m in pair.items()}, repeats=repeats, warmup=1 if args.quick else 2)
            reference, ours = times["nn.LSTM"], times["ours"]
            rows.append([hidden, mode, f"{reference:.4f}", f"{ours:.4f}", f"{reference / ours:.2f}x"])
    table = markdown_table(["H", "mode", "nn.LSTM s", "ours s", "speed ratio (nn/ours)"], rows)
    print(table)
    if not args.quick:
        note = (
            f"2-layer LM (Embedding({VOCAB}) -> LSTM -> Linear -> cross-entropy), T={STEPS}, batch {BATCH}, "
            f"float32, kernels: {'native ' + native.active_isa() if native.available() else 'torch path'}. "
            "Train step = zero_grad + forward + backward + SGD step; inference = eval forward under "
            "no_grad. Median seconds per call, candidates interleaved in one run. 1-minute load average "
            f"before / after the run: {load_before:.1f} / {os.getloadavg()[0]:.1f} (above 0.5, other jobs "
            "shared the cores and the figures are noisy)."
        )
        write_section("Decomposed LSTM vs torch.nn.LSTM", note + "\n\n" + table, per_isa=True)


if __name__ == "__main__":
    main()
