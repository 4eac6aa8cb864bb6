"""`fxreduce demo`: five sections, each with a proven cost cut, a measured speedup and a checked contract;
every figure is computed from the settings (changing a setting changes it), none is a printed constant."""

from __future__ import annotations

import dataclasses
import math

import pytest

from fxreduce import demo
from fxreduce.cli import main
from fxreduce.errors import InputError

FAST = demo.Settings.fast()
OTHER = dataclasses.replace(
    FAST, mlp_widths=(48, 192, 192, 10), lowrank_spec="sparse_lowrank(flop_reduction=8)", cnn_batch=2,
    lm_hidden=48, dropout_spec="structured_dropout(p=0.3, mode='per_sequence', recurrent=True)",
    on_device_spec="error_map_pruning(keep=0.5),instance_filter", resolution_shares=(0.5, 0.25, 0.25))


@pytest.fixture(scope="module")
def runs() -> tuple[list[demo.Section], list[demo.Section], list[str]]:
    lines: list[str] = []
    return demo.run(settings=FAST, echo=lines.append), demo.run(settings=OTHER, echo=lambda _: None), lines


def test_every_technique_cuts_cost_and_keeps_its_contract(runs):
    sections, _, lines = runs
    assert [s.technique for s in sections] == list(demo.TECHNIQUES)
    for section in sections:
        assert section.proven and 0 < section.cut <= 100, section
        assert section.contract_ok and section.inputs_checked >= 2, section
        assert math.isfinite(section.speedup) and section.speedup > 0, section
        assert section.before_seconds != section.after_seconds
    printed = "\n".join(lines)
    for section in sections:
        assert f"full example: {section.command}" in printed and section.spec in printed


def test_figures_follow_the_settings(runs):
    """Each section's costs change when its workload or its pass options change: nothing is a constant."""
    fast, other, _ = runs
    for a, b in zip(fast, other):
        assert (a.before, a.after) != (b.before, b.after), a.technique
        assert a.before_seconds != b.before_seconds, a.technique
    by_name = {s.technique: s for s in other}
    assert by_name["sparse_lowrank"].cut > 85  # flop_reduction=8 cuts at least 7/8
    assert by_name["structured_dropout"].cut < {s.technique: s for s in fast}["structured_dropout"].cut


def test_the_summary_has_a_row_per_section(runs):
    sections, _, _ = runs
    table = demo.summary(sections, FAST.threads)
    for section in sections:
        row = next(line for line in table if line.startswith(section.technique))
        assert f"{section.speedup:.2f}x" in row and f"-{section.cut:.1f}%" in row and "holds" in row


def test_an_unknown_technique_is_a_user_error():
    with pytest.raises(InputError, match="choose from sparse_lowrank"):
        demo.run(["sparse_lowrank", "pruning"], FAST)


def test_the_command_runs_one_technique_and_writes_its_page(capsys, tmp_path):
    status = main(["demo", "--fast", "--technique", "lower_int8", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0
    assert "== 1. lower_int8" in out and "sparse_lowrank" not in out.split("== summary")[0]
    assert "fold_batchnorm, lower_int8" in (tmp_path / "lower_int8.html").read_text()
    assert main(["demo", "--technique", "pruning"]) == 2
