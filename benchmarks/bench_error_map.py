"""Error map pruning: backward time of pruned convolutions vs dense, and whole training steps with EMP + EIF.

1. Every distinct conv shape of ResNet-18 (224x224 input, batch 8): the time of the backward (input- and
   weight-gradient convolutions) of ErrorMapConv2d at keep 0.5 / 0.3 / 0.1 against the dense conv's,
   beside the FLOP ratio, and against the plain custom-autograd version (two torch.nn.grad calls,
   conv2d_input and conv2d_weight, on the kept slices).
2. The whole backward of four 128-channel 3x3 convs with ReLUs at 28x28, batch 8 (the configuration the
   issue quotes for the plain version).
3. A whole training step (forward, backward, SGD step) of ResNet-18 at 64x64, batch 32: plain vs
   error_map_pruning vs instance_filter vs both, beside the counted FLOP ratio.

Run it on a quiet machine under OpenMP's default wait policy (what a training job gets): with
OMP_WAIT_POLICY=PASSIVE every small parallel op of the pruned backward waits for sleeping workers to
wake (measured, the four-conv chain at keep 0.5: 1.61x with the default, 1.47x passive).

    python benchmarks/bench_error_map.py           # full run, writes its section of docs/benchmarks.md
    python benchmarks/bench_error_map.py --quick   # a few shapes, writes nothing
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxreduce as fr
from _common import fix_threads, markdown_table, time_side_by_side, write_section
from fxreduce.modules.error_map import ErrorMapConv2d
from fxreduce.training.on_device import OnDeviceTrainer

KEEPS = (0.5, 0.3, 0.1)
# Kept counts as asked (1), and rounded up to oneDNN's 16-channel block on AVX-512, which costs no time.
MULTIPLES = (1, 16)
# The score the plain version ranks by (error-map norms only): ours with it is the like-for-like comparison.
ERROR_MAP_ONLY = (0.0, 1.0)
# (layer, in channels, out channels, kernel, stride, input size) of ResNet-18 at 224x224.
RESNET18_CONVS = [
    ("conv1 7x7/2", 3, 64, 7, 2, 224),
    ("layer1 3x3", 64, 64, 3, 1, 56),
    ("layer2.0.conv1 3x3/2", 64, 128, 3, 2, 56),
    ("layer2.0.downsample 1x1/2", 64, 128, 1, 2, 56),
    ("layer2 3x3", 128, 128, 3, 1, 28),
    ("layer3.0.conv1 3x3/2", 128, 256, 3, 2, 28),
    ("layer3.0.downsample 1x1/2", 128, 256, 1, 2, 28),
    ("layer3 3x3", 256, 256, 3, 1, 14),
    ("layer4.0.conv1 3x3/2", 256, 512, 3, 2, 14),
    ("layer4.0.downsample 1x1/2", 256, 512, 1, 2, 14),
    ("layer4 3x3", 512, 512, 3, 1, 7),
]
QUICK_CONVS = ["layer2 3x3", "layer3 3x3"]


class PlainPrunedConv(torch.autograd.Function):
    """The plain custom-autograd version the issue quotes: conv2d_input and conv2d_weight on the kept slices."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, kept):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.kept = stride, padding, kept
        return F.conv2d(x, weight, None, stride, padding)

    @staticmethod
    def backward(ctx, delta):
        x, weight = ctx.saved_tensors
        kept = torch.linalg.vector_norm(delta, 1, dim=(0, 2, 3)).topk(ctx.kept).indices
        delta_kept, weight_kept = delta.index_select(1, kept), weight.index_select(0, kept)
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input = torch.nn.grad.conv2d_input(x.shape, weight_kept, delta_kept, ctx.stride, ctx.padding)
        grad_kept = torch.nn.grad.conv2d_weight(x, weight_kept.shape, delta_kept, ctx.stride, ctx.padding)
        return grad_input, torch.zeros_like(weight).index_copy_(0, kept, grad_kept), None, None, None


def _backward_timer(forward, x, weight):
    """A callable running only the backward of ``forward(x, weight)`` (the forward is run once, kept)."""
    out = forward(x, weight)
    delta = torch.randn_like(out)
    wanted = [t for t in (x, weight) if t.requires_grad]
    return lambda: torch.autograd.grad(out, wanted, delta, retain_graph=True)


def _candidates(convs: list[nn.Conv2d], build, stride: int, padding: int) -> dict[str, object]:
    """Backward timers: dense, ours at each keep (multiple 1 and 16), plain at each keep."""
    candidates = {"dense": build(convs)}
    for keep in KEEPS:
        for multiple in MULTIPLES:
            candidates[f"ours {keep} {multiple}"] = build(
                [ErrorMapConv2d.from_conv(c, keep=keep, multiple=multiple).train() for c in convs])
        candidates[f"ours error-map score {keep}"] = build(
            [ErrorMapConv2d.from_conv(c, keep=keep, score=ERROR_MAP_ONLY).train() for c in convs])
        kept = ErrorMapConv2d.from_conv(convs[0], keep=keep).kept_channels
        candidates[f"plain {keep}"] = build(
            [lambda t, c=c, k=kept: PlainPrunedConv.apply(t, c.weight, stride, padding, k) for c in convs])
    return candidates


def _kernel_alone(conv: nn.Conv2d, x: torch.Tensor, kept: int):
    """The convolution backward alone on an already sliced error map and weight: no scoring, no gathers, no
    autograd. What ``kept`` channels can gain at best with oneDNN's kernel, to show where the rest goes."""
    with torch.no_grad():
        shape = conv(x[:1]).shape[2:]
    delta = torch.randn(x.shape[0], kept, *shape)
    weight = conv.weight.detach()[:kept].contiguous()
    source = x.detach()
    mask = (x.requires_grad, True, False)
    return lambda: torch.ops.aten.convolution_backward(delta, source, weight, None, conv.stride, conv.padding,
                                                       conv.dilation, False, [0, 0], conv.groups, mask)


def _rows(prefix: list[object], conv: nn.Conv2d, times: dict[str, float]) -> list[list[object]]:
    """One row per keep and multiple; a layer's rows (timed with ``kernel`` candidates) end with the kernel-alone column."""
    rows = []
    for keep in KEEPS:
        for multiple in MULTIPLES:
            kept = ErrorMapConv2d.from_conv(conv, keep=keep, multiple=multiple).kept_channels
            flop_ratio = conv.out_channels / kept
            ours = times["dense"] / times[f"ours {keep} {multiple}"]
            by_error_map = times["dense"] / times[f"ours error-map score {keep}"]
            like_plain = f"{by_error_map:.2f}x ({by_error_map / flop_ratio:.2f})" if multiple == 1 else ""
            plain = f"{times['dense'] / times[f'plain {keep}']:.2f}x" if multiple == 1 else ""
            row = prefix + [keep, multiple, f"{kept}/{conv.out_channels}", f"{times['dense'] * 1e3:.1f}",
                            f"{flop_ratio:.2f}x", f"{ours:.2f}x", f"{ours / flop_ratio:.2f}", like_plain, plain]
            if f"kernel {keep}" in times:
                alone = times["dense"] / times[f"kernel {keep}"]
                row.append(f"{alone:.2f}x ({alone / flop_ratio:.2f})" if multiple == 1 else "")
            rows.append(row)
    return rows


def layer_rows(names: list[str], batch: int, repeats: int) -> list[list[object]]:
    rows = []
    for name, cin, cout, kernel, stride, size in RESNET18_CONVS:
        if name not in names:
            continue
        torch.manual_seed(0)
        conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)
        x = torch.randn(batch, cin, size, size, requires_grad=cin > 3)

        def build(layers, x=x, conv=conv):
            return _backward_timer(lambda x, w: layers[0](x), x, conv.weight)

        candidates = _candidates([conv], build, stride, kernel // 2)
        for keep in KEEPS:
            kept = ErrorMapConv2d.from_conv(conv, keep=keep).kept_channels
            candidates[f"kernel {keep}"] = _kernel_alone(conv, x, kept)
        times = time_side_by_side(candidates, repeats=repeats)
        rows += _rows([name, f"{batch}x{cin}x{size}x{size}"], conv, times)
    return rows


def chain_rows(repeats: int) -> list[list[object]]:
    """Whole backward of four 128-channel 3x3 convs with ReLUs at 28x28, batch 8."""
    torch.manual_seed(0)
    convs = [nn.Conv2d(128, 128, 3, padding=1, bias=False) for _ in range(4)]
    x = torch.randn(8, 128, 28, 28, requires_grad=True)

    def build(layers):
        out = x
        for layer in layers:
            out = torch.relu(layer(out))
        delta = torch.randn_like(out)
        wanted = [x] + [conv.weight for conv in convs]
        return lambda: torch.autograd.grad(out, wanted, delta, retain_graph=True)

    times = time_side_by_side(_candidates(convs, build, 1, 1), repeats=repeats)
    return _rows([], convs[0], times)


def step_rows(batch: int, size: int, repeats: int) -> list[list[object]]:
    """A training step of ResNet-18 per variant (SGD, lr=0: the weights and so the kept instances stay fixed)."""
    specs = {"plain": None, "EMP keep 0.3": "error_map_pruning(keep=0.3)", "EIF": "instance_filter",
             "EMP 0.3 + EIF": "error_map_pruning(keep=0.3),instance_filter"}
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    model = torchvision.models.resnet18(num_classes=10).train()
    traced = fr.trace(model, (x,), dynamic={"N": (0, 0)})
    trainers, candidates = {}, {}
    for name, spec in specs.items():
        torch.manual_seed(1)
        gm = fr.apply(traced, spec).graph_module if spec else traced
        trainer = OnDeviceTrainer(gm, torch.optim.SGD(gm.parameters(), lr=0.0))
        trainers[name] = trainer
        candidates[name] = lambda t=trainer: t.step(x, y)
    times = time_side_by_side(candidates, repeats=repeats, warmup=1)
    results = {name: trainer.step(x, y) for name, trainer in trainers.items()}
    rows = []
    for name in specs:
        flop_ratio = results["plain"].flops / results[name].flops
        speedup = times["plain"] / times[name]
        rows.append([name, f"{results[name].kept.numel()}/{batch}", f"{times[name] * 1e3:.0f}", f"{flop_ratio:.2f}x",
                     f"{speedup:.2f}x", f"{speedup / flop_ratio:.2f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two conv shapes, few repeats, no docs")
    args = parser.parse_args()
    threads = fix_threads()
    repeats = 3 if args.quick else 9
    names = QUICK_CONVS if args.quick else [name for name, *_ in RESNET18_CONVS]
    columns = ["keep", "multiple", "kept", "dense backward ms", "FLOP ratio", "ours speedup", "ours / FLOP ratio",
               "ours, error-map score (/ FLOP ratio)", "plain custom-autograd speedup"]
    layers = markdown_table(["layer", "input"] + columns + ["kernel alone on the kept slices (/ FLOP ratio)"],
                            layer_rows(names, 8, repeats))
    chain = markdown_table(columns, chain_rows(repeats))
    steps = markdown_table(["variant", "instances kept", "step ms", "FLOP ratio", "speedup", "speedup / FLOP ratio"],
                           step_rows(8 if args.quick else 32, 32 if args.quick else 64, 3 if args.quick else 7))
    body = (f"Backward (input + weight gradients) of ResNet-18's conv shapes, batch 8, {threads} threads; "
            "speedups are dense time / pruned time, measured side by side (median); the FLOP ratio is dense "
            "backward multiply-adds / pruned ones (= out channels / kept channels). 'plain' is conv2d_input + "
            "conv2d_weight on the kept slices, ranked by error-map norms only; ours is one convolution_backward on "
            "sorted kept slices, ranked by the default score (1, 1), which also reads the whole weight for its "
            "norms every backward, and, like for like with plain, by the error-map score (0, 1). "
            "'kernel alone' times aten.convolution_backward on an error map and weight already sliced to the kept "
            "channels (no scoring, no gathers, no autograd): what the kernel gains at best; the gap to ours is the "
            "method's own reads (every backward scores all channels from the whole error map, then gathers the "
            "kept ones) and the custom autograd function's call. "
            "'multiple' 16 rounds the kept count up to a multiple of 16: oneDNN computes in 16-channel blocks on "
            "AVX-512, so the extra channels cost (almost) no time.\n\n"
            f"{layers}\n\nWhole backward of four 128-channel 3x3 convs + ReLU at 28x28, batch 8:\n\n{chain}\n\n"
            "Whole training step (forward, backward, SGD step) of ResNet-18 at 64x64, batch 32; the FLOP ratio "
            "is counted by fxreduce's cost model and includes the filter's inference and training; the "
            f"instance filter is untrained here, so its kept share is arbitrary:\n\n{steps}\n")
    print(body)
    if not args.quick:
        write_section("On-device training: error map pruning and the instance filter", body)


if __name__ == "__main__":
    main()
