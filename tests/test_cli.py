"""The `fxreduce` command: each subcommand's output, and every user error as one line with exit status 2.

Commands run in-process through fxreduce.cli.main (fast, and the traceback of a real bug shows up in
pytest); one test runs the installed console script to check the entry point and the exit status.
"""

from __future__ import annotations

import json
import operator
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sympy
import torch
from torch import nn

from fxreduce.cli import DEMO_PIPELINE, main
from fxreduce.errors import InputError
from fxreduce.models import DemoNet, load_model, parse_input_shape
from fxreduce.passes import REGISTRY, Contract, Pass, Rewrite
from fxreduce.serialization import build, load_export

SMALL = "N,3,H=32,W=32"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """The demo model rewritten by the demo pipeline and saved by `fxreduce apply -o`."""
    path = tmp_path_factory.mktemp("saved") / "demo.pt"
    assert main(["apply", "default", "--pipeline", DEMO_PIPELINE, "--input-shape", SMALL, "-o", str(path)]) == 0
    return path


def test_passes_lists_every_pass_with_contract_and_options(capsys):
    status, out, _ = run(capsys, "passes")
    assert status == 0
    for name, cls in REGISTRY.items():
        assert f"{name}: {cls.summary}" in out
        assert str(cls.contract) in out
    status, out, _ = run(capsys, "passes", "--format", "json")
    listed = {entry["name"]: entry for entry in json.loads(out)}
    assert set(listed) == set(REGISTRY)
    for entry in listed.values():
        assert {"summary", "contract", "exports", "options"} <= set(entry)
        for option in entry["options"]:
            assert {"name", "default", "help", "range"} == set(option)


def test_cost_of_resnet50_matches_torch_flop_counter(capsys):
    status, out, _ = run(capsys, "cost", "torchvision:resnet50", "--input-shape", "N,3,H,W", "--format", "json")
    assert status == 0
    document = json.loads(out)
    # Parse with the dims as plain symbols: "N" alone would be sympy's N() function.
    formula = sympy.sympify(document["symbolic"]["flops"],
                            locals={name: sympy.Symbol(name) for name in document["symbolic_dims"]})
    assert {s.name for s in formula.free_symbols} == {"N", "H", "W"}
    assert document["at"] == {"N": 1, "H": 224, "W": 224}
    model = load_model("torchvision:resnet50")
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    expected = counter.get_total_flops()
    assert document["values"]["flops"] == expected
    assert formula.subs({s: {"N": 1, "H": 224, "W": 224}[s.name] for s in formula.free_symbols}) == expected


def test_cost_table_shows_formulas_numbers_and_specialised_dims(capsys, tmp_path):
    status, out, _ = run(capsys, "cost", "default", "--input-shape", SMALL, "--at", "N=4,H=64")
    assert status == 0
    assert "symbolic totals (in N, H, W)" in out and "at N=4, H=64, W=32" in out
    assert "MACs float32:" in out and "specialised dims: none" in out
    # A Linear over the last axis fixes W: the table says so, and evaluates at N and H only.
    (tmp_path / "rows.py").write_text("from torch import nn\n\ndef build():\n    return nn.Linear(8, 4)\n")
    status, out, _ = run(capsys, "cost", f"{tmp_path / 'rows.py'}:build", "--input-shape", "N,3,H=8,W=8")
    assert status == 0
    assert "symbolic totals (in N, H)" in out and "at N=1, H=8\n" in out
    assert "specialised dims: W (fixed by the model to 8" in out


def test_apply_prints_the_report_and_certificates(capsys):
    status, out, _ = run(capsys, "apply", "default", "--pipeline", DEMO_PIPELINE, "--input-shape", SMALL)
    assert status == 0
    assert "fold_batchnorm" in out and "BatchNorm folded" in out and "at N=1, H=32, W=32" in out
    assert "certificate (FLOPs): proven" in out and "certificate (other ops):" in out
    assert "measured on the example input (2x3x32x32), eval mode" in out
    assert "output error: max |after - before|" in out and "latency:" in out and "interleaved runs" in out
    status, out, _ = run(capsys, "apply", "default", "--pipeline", DEMO_PIPELINE, "--input-shape", SMALL,
                         "--no-measure")
    assert status == 0 and "measured on" not in out and "interleaved runs" not in out


def test_saved_file_loads_in_a_fresh_process_with_equal_outputs(saved, tmp_path):
    x = torch.randn(3, 3, 40, 24)
    torch.save(x, tmp_path / "x.pt")
    script = ("import sys, torch; from fxreduce.serialization import load; "
              "gm = load(sys.argv[1]).graph_module; "
              "torch.save(gm(torch.load(sys.argv[2])), sys.argv[3])")
    subprocess.run([sys.executable, "-c", script, str(saved), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   check=True, capture_output=True, timeout=120)
    expected = build("default", SMALL, DEMO_PIPELINE, 0).graph_module(x)
    assert torch.equal(torch.load(tmp_path / "y.pt"), expected)


def test_export_route_round_trips_with_dynamic_dims(capsys, tmp_path):
    path = tmp_path / "demo.pt2"
    status, out, _ = run(capsys, "apply", "default", "--pipeline", DEMO_PIPELINE, "--input-shape", SMALL,
                         "-o", str(path))
    assert status == 0 and f"wrote {path}" in out
    loaded = load_export(path, trusted=True)
    assert loaded.manifest.model == "default"
    x = torch.randn(3, 3, 40, 24)
    torch.testing.assert_close(loaded.graph_module(x), build("default", SMALL, DEMO_PIPELINE, 0).graph_module(x))
    status, _, err = run(capsys, "inspect", str(path))
    assert status == 2 and "--trust" in err
    status, out, _ = run(capsys, "inspect", str(path), "--trust")
    assert status == 0 and "graph " in out


def test_inspect_saved_file_in_every_format(saved, capsys, tmp_path):
    status, out, err = run(capsys, "inspect", str(saved))
    assert status == 0
    assert "model:       default" in err and "pipeline:    fold_batchnorm" in err
    assert "totals" in out and "stage1_conv1" in out
    status, out, _ = run(capsys, "inspect", str(saved), "--format", "json")
    assert json.loads(out)["kind"] == "graph"
    status, out, _ = run(capsys, "inspect", str(saved), "--format", "dot")
    assert out.startswith("digraph")
    status, out, _ = run(capsys, "inspect", str(saved), "-o", str(tmp_path / "graph.svg"))
    assert status == 0 and "<svg" in (tmp_path / "graph.svg").read_text()


def test_inspect_diff_against_the_saved_original_and_a_named_model(saved, capsys):
    status, out, _ = run(capsys, "inspect", str(saved), "--diff")
    assert status == 0
    assert out.startswith("diff ") and "removed" in out and "stage1_bn1" in out
    status, out, _ = run(capsys, "inspect", str(saved), "--diff", "default", "--format", "json")
    document = json.loads(out)
    assert document["kind"] == "diff"
    status, out, _ = run(capsys, "inspect", "default", "--input-shape", SMALL, "--at", "N=2")
    assert status == 0 and "values at N=2, H=32, W=32" in out


def test_verify_passes_on_the_demo_model(capsys):
    status, out, _ = run(capsys, "verify", "default", "--pipeline", DEMO_PIPELINE, "--input-shape", "N,3,H=16,W=16")
    assert status == 0
    assert out.count("holds on") == 3 and "every contract holds" in out


class _DoublesOutput(Pass):
    """Claims to be exact but doubles the model's output: verify must catch it."""

    name = "doubles_output"
    summary = "a broken pass for testing"
    contract = Contract("exact", "outputs equal the original's")

    def rewrite(self, gm, outcome):
        output = next(node for node in gm.graph.nodes if node.op == "output")
        with gm.graph.inserting_before(output):
            doubled = gm.graph.call_function(operator.mul, (output.args[0], 2))
        output.args = (doubled,)
        outcome.rewrites.append(Rewrite([], [doubled.name], "doubles the output", self.contract))


def test_verify_exits_1_when_a_contract_breaks(capsys, monkeypatch):
    monkeypatch.setitem(REGISTRY, _DoublesOutput.name, _DoublesOutput)
    status, out, _ = run(capsys, "verify", "default", "--pipeline", "doubles_output", "--input-shape", "N,3,H=16,W=16")
    assert status == 1
    assert "BROKEN" in out


@pytest.fixture
def evil(tmp_path) -> tuple[Path, Path]:
    """A .pt whose unpickling would run a shell command that creates a marker file."""
    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):
            return os.system, (f"echo pwned > {marker}",)

    path = tmp_path / "evil.pt"
    torch.save({"format": "fxreduce.rewritten-graph", "payload": Payload()}, path)
    return path, marker


def _truncated(saved: Path, tmp_path: Path) -> str:
    path = tmp_path / "truncated.pt"
    path.write_bytes(saved.read_bytes()[:2000])
    return str(path)


@pytest.mark.parametrize("argv, message", [
    (["apply", "default", "--pipeline", "fold_batchnrm"], "did you mean 'fold_batchnorm'"),
    (["apply", "default", "--pipeline", "fold_batchnorm(layerz='*')"], "has no option 'layerz'"),
    (["apply", "default", "--pipeline", "fold_batchnorm(layers='')"], "out of range"),
    (["apply", "default", "--pipeline", "fold_batchnorm("], "cannot parse pipeline spec"),
    (["apply", "default", "--pipeline", "remove_dropout", "-o", "/no/such/dir/out.pt"], "does not exist"),
    (["cost", "torchvision:resnt50"], "did you mean torchvision:resnet50"),
    (["cost", "nomodel"], "malformed model reference"),
    (["cost", "default", "--input-shape", "N,4,H,W"], "does not run on example inputs"),
    (["cost", "default", "--input-shape", "N,3,H=x,W"], "cannot read 'H=x'"),
    (["cost", "default", "--at", "Q=3"], "dim 'Q' is not named"),
    (["cost"], "required: MODEL"),
    (["cost", "default", "--bogus"], "unrecognized arguments"),
    (["inspect", "missing.pt"], "no such fxreduce save"),
    (["inspect", "default", "--diff"], "needs a saved file"),
])
def test_user_errors_print_one_line_and_exit_2(capsys, argv, message):
    status, out, err = run(capsys, *argv)
    assert status == 2
    assert err.startswith("fxreduce: error: ") and err.count("\n") == 1 and message in err
    assert "Traceback" not in out + err


def test_corrupt_and_code_running_files_are_refused(saved, evil, capsys, tmp_path):
    path, marker = evil
    for argv, message in [(["inspect", _truncated(saved, tmp_path)], "corrupt or truncated"),
                          (["inspect", str(path)], "refusing to load"),
                          (["inspect", str(path), "--diff"], "refusing to load")]:
        status, out, err = run(capsys, *argv)
        assert status == 2 and err.startswith("fxreduce: error: ") and err.count("\n") == 1 and message in err
        assert "Traceback" not in out + err
    assert not marker.exists()


def test_console_script_reports_an_error_in_one_line(tmp_path):
    script = Path(sys.executable).parent / "fxreduce"
    if not script.exists():
        pytest.skip("the fxreduce console script is not installed next to this Python")
    result = subprocess.run([str(script), "apply", "default", "--pipeline", "fold_batchnrm"], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("fxreduce: error: unknown pass 'fold_batchnrm'") and "did you mean 'fold_batchnorm'" in line


def test_model_references_resolve_or_explain(tmp_path):
    assert isinstance(load_model("default"), DemoNet) and not load_model("fxreduce:demo").training
    assert isinstance(load_model("fxreduce.models:demo"), DemoNet)
    (tmp_path / "mine.py").write_text("import torch\n\ndef build():\n    return torch.nn.Linear(2, 3)\n\n"
                                      "def not_a_model():\n    return 42\n\ndef sized(width):\n    return torch.nn.Linear(width, 3)\n")
    assert isinstance(load_model(f"{tmp_path / 'mine.py'}:build"), nn.Linear)
    for ref, message in [("resnet", "malformed model reference"), ("torchvision:resnt18", "torchvision:resnet18"),
                         ("no_such_package.models:build", "cannot import module"),
                         ("fxreduce.models:dmeo", "did you mean 'demo'"),
                         (f"{tmp_path / 'mine.py'}:not_a_model", "not a torch.nn.Module"),
                         (f"{tmp_path / 'mine.py'}:sized", r"needs arguments \(width\)"),
                         (f"{tmp_path / 'missing.py'}:build", "no such file")]:
        with pytest.raises(InputError, match=message):
            load_model(ref)
    with pytest.raises(InputError, match="file path"):
        load_model(f"{tmp_path / 'mine.py'}:build", allow_path=False)


def test_input_shapes_name_symbolic_dims_with_example_sizes():
    shape = parse_input_shape("N,3,H,W=40;N2,T=7:long", default_size=64)
    assert [tuple(x.shape) for x in shape.inputs] == [(2, 3, 64, 40), (2, 7)]
    assert shape.inputs[1].dtype == torch.int64
    assert shape.dims == {"N": (0, 0), "H": (0, 2), "W": (0, 3), "N2": (1, 0), "T": (1, 1)}
    assert shape.text == "N=2,3,H=64,W=40;N2=2,T=7:int64"
    assert parse_input_shape(shape.text).text == shape.text
    assert shape.default_at() == {"N": 1, "H": 64, "W": 40, "N2": 1, "T": 7}
    assert shape.parse_at("H=224, W=224")["H"] == 224
    assert torch.equal(parse_input_shape("N,3").inputs[0], parse_input_shape("N,3").inputs[0])
    for text, message in [("N,3,N", "names two axes"), ("N=1,3", "torch specialises"), ("N,3:complex", "unknown dtype"),
                          ("N,,3", "cannot read")]:
        with pytest.raises(InputError, match=message):
            parse_input_shape(text)
    for text, message in [("Q=3", "not named"), ("N=0", "cannot read"), ("N", "cannot read")]:
        with pytest.raises(InputError, match=message):
            shape.parse_at(text)
