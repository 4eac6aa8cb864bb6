"""Data-aware low rank on two language models trained here: plain SVD vs whitened truncation vs whitened +
global or sensitivity rank allocation, at 4x, 10x and 30x fewer whole-model MACs, before and after distillation.

Models (pydoc_data.topics text, examples/word_lm.py's corpus): the word LSTM LM of examples/antman_lm.py
(Embedding -> LSTM(2 x 200) -> Linear(2000)) and a small GPT-style transformer (causal self-attention with
nn.Linear projections, 2 blocks, d=192), each trained once per seed and reused by every method and cut.
``sparse_lowrank(model_flop_reduction=k)`` compresses the whole model k-fold by the cost model, with
- ``svd, even``: plain truncated SVD, one per-layer reduction for every layer;
- ``whitened, even``: truncation whitened by each layer's input statistics on calibration batches;
- ``whitened, global``: the same, ranks allocated over layers to minimise the summed truncation error;
- ``whitened, sensitivity``: ranks allocated to minimise the summed KL divergence of the model's next-word
  distribution that each layer's truncation alone causes on the calibration batches (kept only where the
  joint divergence beats even ranks').
Each student is measured as it comes and after the same distillation budget from its teacher.
Results (mean +- std over seeds) go to docs/antman.md, one section per model ("Data-aware low rank: LSTM
LM", "... GPT-style LM"), plots to docs/images/antman_whitened_<model>.png. Each teacher is traced once;
the first seed's students go through ``fr.apply`` (whole-model MACs by the cost model, the report), later
seeds' through the pass alone (the same budget; the decomposed LSTM's shape propagation is slow).

    python examples/whitened_lowrank_lm.py            # full run (3 seeds, both models), writes docs/antman.md
    python examples/whitened_lowrank_lm.py --models gpt --threads 1   # one model per process
    python examples/whitened_lowrank_lm.py --quick    # smoke run on small models; writes only --output
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from word_lm import WordLanguageModel, batches, load_corpus, perplexity, train_epoch  # noqa: E402

import fxreduce as fr  # noqa: E402
from fxreduce.serialization import write_markdown_section  # noqa: E402
from fxreduce.training.distillation import DistillationLoss, distill  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "antman.md"
SECTION = "Data-aware low rank"
TITLES = {"lstm": "LSTM LM", "gpt": "GPT-style LM"}
BATCH, STEPS = 20, 35
METHODS = {"svd, even": ("svd", "even"), "whitened, even": ("whitened", "even"),
           "whitened, global": ("whitened", "global"), "whitened, sensitivity": ("whitened", "sensitivity")}
COLOURS = {"svd, even": "#cc6666", "whitened, even": "#6688cc", "whitened, global": "#44aa66",
           "whitened, sensitivity": "#aa66aa"}
RANKS = re.compile(r"(?:([a-z]{2}_l\d+(?:_reverse)?) )?lr r=(\d+): .*?r=\d+ \(even: r=(\w+)\)(?: alone causes output "
                   r"divergence \(kl\) ([0-9.e+-]+))?(?: \(even rank alone: ([0-9.e+-]+)\))?")
JOINT = re.compile(r"(even ranks kept|sensitivity allocation): joint output divergence \(kl\)[^;]*")


class Block(nn.Module):
    """Pre-norm transformer block; attention written with nn.Linear projections the pass can factorise."""

    def __init__(self, width: int, heads: int, context: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.drop = nn.Dropout(dropout)
        self.register_buffer("causal", torch.ones(context, context, dtype=torch.bool).triu(1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, t, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(width // self.heads)
        attention = scores.masked_fill(self.causal[:t, :t], float("-inf")).softmax(-1)
        x = x + self.drop(self.proj((attention @ v).transpose(1, 2).reshape(n, t, width)))
        return x + self.drop(self.fc2(nn.functional.gelu(self.fc1(self.norm2(x)))))


class TinyGPT(nn.Module):
    def __init__(self, vocabulary: int, width: int = 192, layers: int = 2, heads: int = 4, context: int = STEPS,
                 dropout: float = 0.1):
        super().__init__()
        self.embed, self.position = nn.Embedding(vocabulary, width), nn.Embedding(context, width)
        self.blocks = nn.Sequential(*(Block(width, heads, context, dropout) for _ in range(layers)))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocabulary)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position.weight[: tokens.shape[1]]
        return self.head(self.norm(self.blocks(x)))


def build(kind: str, args) -> nn.Module:
    if kind == "lstm":
        return WordLanguageModel(args.vocabulary, args.hidden, args.hidden, 2, 0.3)
    return TinyGPT(args.vocabulary, args.width)


def train_teacher(kind: str, corpus, args, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = build(kind, args)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr[kind])
    for epoch in range(args.epochs):
        train_epoch(model, corpus.train, optimizer, batch_size=BATCH, steps=STEPS, seed=seed * 1000 + epoch,
                    description=f"{kind} teacher seed {seed} epoch {epoch + 1}")
    return model.eval()


def compress(gm: torch.fx.GraphModule, cut: float, method: str, allocation: str, calibration: list,
             measure: bool) -> tuple:
    """The student and, when ``measure``, its whole-model MAC reduction by the cost model and the report."""
    options = {"model_flop_reduction": cut, "method": method, "allocation": allocation}
    if method == "whitened":
        options["calibration"] = calibration
    if allocation == "sensitivity":
        options["divergence"] = "kl"  # the models return next-word logits
    pass_ = fr.get_pass("sparse_lowrank")(**options)
    if not measure:
        return pass_.run(gm).graph_module, None, None
    result = fr.apply(gm, pass_)
    reduction = float(fr.cost(gm).at(N=BATCH).macs) / float(fr.cost(result.graph_module).at(N=BATCH).macs)
    return result.graph_module, reduction, result.report


def fine_tune(student: nn.Module, teacher: nn.Module, corpus, args, seed: int, kind: str) -> None:
    optimizer = torch.optim.Adam(student.parameters(), lr=args.finetune_lr[kind])
    distill(student, teacher, lambda epoch: batches(corpus.train, BATCH, STEPS,
                                                    torch.Generator().manual_seed(seed * 1000 + 500 + epoch)),
            optimizer, loss=DistillationLoss(0.5, 0.5, 0.0, 2.0), epochs=args.finetune_epochs, clip=0.25,
            progress=False)


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"


def plot(results: dict, kind: str, cuts: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    teacher = statistics.mean(results[kind]["teacher"])
    ax.axhline(teacher, color="#555555", lw=1, label="dense teacher")
    for name, colour in COLOURS.items():
        for stage, style in (("before", "--"), ("after", "-")):
            means = [statistics.mean(results[kind][(cut, name, stage)]) for cut in cuts]
            ax.plot(cuts, means, style, marker="o", color=colour,
                    label=f"{name}, {'as rewritten' if stage == 'before' else 'distilled'}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.minorticks_off()
    ax.set_xticks(cuts, [f"{cut:g}x" for cut in cuts])
    ax.set_xlabel("whole-model MAC reduction")
    ax.set_ylabel("test perplexity")
    ax.set_title(TITLES[kind], fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def goals(results: dict, kind: str, cuts: list[float]) -> list[str]:
    """The issue's goals for each whitened method, each with the measured figure."""
    teacher = statistics.mean(results[kind]["teacher"])
    lines = []
    for cut in cuts:
        plain = statistics.mean(results[kind][(cut, "svd, even", "before")])
        allowed = {4: 2, 10: 3, 30: 10}.get(int(cut))
        for method in METHODS:
            before = statistics.mean(results[kind][(cut, method, "before")])
            after = statistics.mean(results[kind][(cut, method, "after")])
            text = f"{cut:g}x, {method}:"
            if method != "svd, even":
                recovered = (plain - before) / (plain - teacher) if plain > teacher else float("nan")
                text += f" recovers {100 * recovered:.0f}% of the perplexity plain SVD loses"
                if int(cut) in (4, 10):
                    text += " (goal >= 50%: " + ("met" if recovered >= 0.5 else "missed") + ")"
                text += ";"
            gap = 100 * (after / teacher - 1)
            text += f" after distillation {gap:+.1f}% from the teacher"
            if allowed is not None:
                text += f" (goal within {allowed}%: " + ("met" if gap <= allowed else "missed") + ")"
            lines.append(text)
    return lines


def layer_ranks(report) -> tuple[dict[str, tuple], str]:
    """Per rewritten weight (rank, even rank, KL alone, even rank's KL alone) read from a report's rewrite
    lines, and its summary of the joint divergences (sensitivity allocation; empty otherwise)."""
    ranks, summary = {}, ""
    for rewrite in report.steps[0].rewrites:
        for match in RANKS.finditer(rewrite.rewrite.what):
            name = rewrite.replaced[0] + (f".{match[1]}" if match[1] else "")
            ranks[name] = (match[2], match[3], match[4], match[5])
        joint = JOINT.search(rewrite.rewrite.what)
        summary = joint[0] if joint else summary
    return ranks, summary


def rank_table(reports: dict, kind: str, cuts: list[float]) -> str:
    """Markdown: each weight's rank under even, global and sensitivity allocation at every cut (first seed),
    with the KL each sensitivity rank and even rank cause alone, then the joint KLs behind the choice."""
    header = "| weight | " + " | ".join(f"{cut:g}x even / global / sensitivity (KL alone: sens. / even)"
                                         for cut in cuts) + " |"
    rows, joints = {}, []
    for cut in cuts:
        global_ranks, _ = layer_ranks(reports[(kind, cut, "whitened, global")])
        sensitivity, joint = layer_ranks(reports[(kind, cut, "whitened, sensitivity")])
        joints.append(f"- {cut:g}x: {joint}")
        for name, (rank, even, alone, even_alone) in sensitivity.items():
            kl = " / ".join("-" if value is None else f"{float(value):.3g}" for value in (alone, even_alone))
            rows.setdefault(name, []).append(f"{even} / {global_ranks.get(name, ('-',))[0]} / {rank} ({kl})")
    lines = [header, "|---|" + "---|" * len(cuts)] + [f"| {name} | " + " | ".join(cells) + " |"
                                                      for name, cells in rows.items()]
    return "\n".join(lines + [""] + joints)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run; writes only --output if given")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--models", default="lstm,gpt", help="comma-separated: lstm, gpt")
    parser.add_argument("--cuts", default="4,10,30", help="whole-model MAC reductions")
    parser.add_argument("--epochs", type=int, default=6, help="teacher training epochs")
    parser.add_argument("--finetune-epochs", type=int, default=4, help="distillation epochs for every student")
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=200)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--vocabulary", type=int, default=2000)
    parser.add_argument("--output", type=Path, default=None, help=f"markdown file (default: {DOC.relative_to(ROOT)})")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: 2, 1 with --quick)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or (1 if args.quick else 2))
    args.lr = {"lstm": 3e-3, "gpt": 1e-3}
    args.finetune_lr = {"lstm": 2e-3, "gpt": 5e-4}
    kinds = [kind.strip() for kind in args.models.split(",")]
    cuts = [float(cut) for cut in args.cuts.split(",")]
    if args.quick:
        args.seeds, args.epochs, args.hidden, args.width, args.vocabulary = 1, 1, 32, 64, 300
        args.calibration_batches = 2
    output = args.output or (None if args.quick else DOC)
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    corpus = load_corpus(args.vocabulary)
    if args.quick:
        corpus.train, corpus.valid, corpus.test = corpus.train[:8000], corpus.valid[:2000], corpus.test[:2000]
    results: dict = {kind: {"teacher": []} for kind in kinds}
    results["corpus"] = f"{corpus.train.numel()} / {corpus.test.numel()} train / test words"
    reductions: dict = {}
    reports: dict = {}
    progress = tqdm(total=args.seeds * len(kinds) * len(cuts) * len(METHODS), desc="students", unit="student")
    for seed in range(args.seeds):
        calibration = [inputs for inputs, _ in batches(corpus.train, BATCH, STEPS,
                                                        torch.Generator().manual_seed(seed))][:args.calibration_batches]
        for kind in kinds:
            teacher = train_teacher(kind, corpus, args, seed)
            results[kind]["teacher"].append(perplexity(teacher, corpus.test))
            gm = fr.trace(teacher, (torch.zeros(BATCH, STEPS, dtype=torch.long),), dynamic={"N": (0, 0)})
            for cut in cuts:
                for name, (method, allocation) in METHODS.items():
                    student, reduction, report = compress(gm, cut, method, allocation, calibration, seed == 0)
                    if seed == 0:
                        reductions[(kind, cut, name)], reports[(kind, cut, name)] = reduction, report
                    results[kind].setdefault((cut, name, "before"), []).append(perplexity(student, corpus.test))
                    fine_tune(student, teacher, corpus, args, seed, kind)
                    results[kind].setdefault((cut, name, "after"), []).append(perplexity(student, corpus.test))
                    progress.update()
            print(f"seed {seed} {kind}: teacher {results[kind]['teacher'][-1]:.2f}, " + ", ".join(
                f"{cut:g}x {name} {results[kind][(cut, name, 'before')][-1]:.2f} -> "
                f"{results[kind][(cut, name, 'after')][-1]:.2f}" for cut in cuts for name in METHODS), flush=True)
        record(args, kinds, cuts, results, reductions, reports, seed + 1, started, load_before, argv, output)
    progress.close()
    return results


def record(args, kinds: list[str], cuts: list[float], results: dict, reductions: dict, reports: dict, seeds_done: int,
           started: float, load_before: float, argv: list[str] | None, output: Path | None) -> None:
    """Print and (with ``output``) write the table of the seeds run so far: a run stopped early keeps them."""
    minutes = (time.perf_counter() - started) / 60
    command = "python " + shlex.join(["examples/whitened_lowrank_lm.py", *(argv if argv is not None else sys.argv[1:])])
    header = f"""Command: `{command}` ({seeds_done} of {args.seeds} seed(s) done, {minutes:.1f} min on
{torch.get_num_threads()} thread(s), 1-minute load average at start / now {load_before:.1f} / {os.getloadavg()[0]:.1f};
the machine was shared with other jobs). Corpus pydoc_data.topics ({results['corpus']}, {args.vocabulary}-word
vocabulary). Teachers: {args.epochs} epochs of Adam (LSTM lr {args.lr['lstm']}, GPT lr {args.lr['gpt']}).
Calibration: {args.calibration_batches} training batches of {BATCH} x {STEPS} words. Distillation budget, the same
for every student: {args.finetune_epochs} epoch(s), Adam (LSTM lr {args.finetune_lr['lstm']}, GPT lr
{args.finetune_lr['gpt']}), 0.5 CE + 0.5 T^2 KL, T = 2. MACs fewer: the whole model's, by the cost model
(`fr.cost`) at batch {BATCH} x {STEPS}, first seed."""
    for kind in kinds:
        model = {"lstm": f"Embedding({args.vocabulary}, {args.hidden}) -> LSTM({args.hidden}, 2 layers) -> "
                         f"Linear({args.vocabulary})",
                 "gpt": f"2 pre-norm blocks, d={args.width}, 4 heads, context {STEPS}, head "
                        f"Linear({args.vocabulary})"}[kind]
        rows = [f"| dense teacher | - | {mean_std(results[kind]['teacher'])} | - |"]
        for cut in cuts:
            for method in METHODS:
                rows.append(f"| {cut:g}x, {method} | {reductions[(kind, cut, method)]:.2f}x | "
                            f"{mean_std(results[kind][(cut, method, 'before')])} | "
                            f"{mean_std(results[kind][(cut, method, 'after')])} |")
        table = "\n".join(rows)
        goal_lines = "\n".join(f"- {line}" for line in goals(results, kind, cuts))
        image = f"antman_whitened_{kind}.png"
        last = (kind, cuts[-1], "whitened, sensitivity")
        body = f"""{header} Model: {model}.

| student | MACs fewer | test perplexity as rewritten | after distillation |
|---|---|---|---|
{table}

{goal_lines}

![perplexity by method and cut](images/{image})

Ranks per weight (first seed; even, global and sensitivity allocation, with the KL divergence of the
next-word distribution on the calibration batches that the sensitivity rank and the even rank cause
when that weight alone is truncated), and the joint KL of each whole allocation:

{rank_table(reports, kind, cuts)}

The pass's report at {cuts[-1]:g}x, whitened + sensitivity (first seed):

```
{reports[last]}
```
"""
        print(body)
        if output is not None:
            plot(results, kind, cuts, output.parent / "images" / image)
            write_markdown_section(output, f"{SECTION}: {TITLES[kind]}", body, "# AntMan")




if __name__ == "__main__":
    main()
