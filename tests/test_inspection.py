"""fxreduce.inspect: tables match the cost model, diffs find exactly what a rewrite changed, and every
rendering (table, JSON, DOT, SVG, files) is well-formed and scales to large graphs."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess

import pytest
import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F
import torchvision
from torch import nn

import fxreduce as fr
from fxreduce import meta
from fxreduce.cost_models import GraphInfo, InputSpec, NodeCost, NodeInfo, graph_info, propagate, symbol
from fxreduce.errors import CostError, FxReduceError, RenderError
from fxreduce.inspection import COLLAPSE_ABOVE, HIGHLIGHT_COLOR, inspect
from fxreduce.inspection.page import view_model
from fxreduce.text import formula

N, H, W = symbol("N"), symbol("H"), symbol("W")
DIMS = {"N": (0, 0), "H": (0, 2), "W": (0, 3)}
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz dot is not installed")


@pytest.fixture(scope="module")
def resnet():
    return fr.trace(torchvision.models.resnet18().eval(), (torch.randn(2, 3, 64, 64),), DIMS)


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.drop(self.relu(self.conv(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.fixture(scope="module")
def rewrite():
    """Head, and a hand-rewritten copy: dropout removed, fc factorised into fc_u (added) and a smaller fc."""
    before = fr.trace(Head().eval(), (torch.randn(2, 3, 8, 8),), DIMS)
    after = copy.deepcopy(before)
    graph = after.graph
    nodes = {node.name: node for node in graph.nodes}
    nodes["drop"].replace_all_uses_with(nodes["relu"])
    graph.erase_node(nodes["drop"])
    after.fc_u, after.fc = nn.Linear(16, 4, bias=False), nn.Linear(4, 10)
    with graph.inserting_before(nodes["fc"]):
        factor = graph.call_module("fc_u", (nodes["flatten"],))
    nodes["fc"].args = (factor,)
    meta.mark_rewritten(factor, "low_rank")
    meta.mark_rewritten(nodes["fc"], "low_rank")
    after.recompile()
    propagate(after, graph_info(before).spec)
    return before, after


def synthetic(size: int) -> fx.GraphModule:
    """A chain of ``size`` relu/add nodes with hand-written costs: large graphs without tracing one."""
    graph = fx.Graph()
    chain = [graph.placeholder("x")]
    for i in range(size):
        args = (chain[-1], chain[max(0, len(chain) - 3)]) if i % 2 else (chain[-1],)
        chain.append(graph.call_function(torch.add if i % 2 else torch.relu, args))
    graph.output(chain[-1])
    gm = fx.GraphModule(nn.Module(), graph)
    for i, node in enumerate(gm.graph.nodes):
        height, width = (sympy.floor((d - 1) / 2 ** (i % 5)) + 1 for d in (H, W))
        elements = 64 * N * height * width
        node.meta[meta.INFO] = NodeInfo(shape=(N, 64, height, width), dtype=torch.float32, cost=NodeCost(
            macs={"float32": (i % 7) * elements}, other=elements, params=sympy.Integer(i % 3),
            bytes_read=4 * elements, bytes_written=4 * elements))
    spec = InputSpec((torch.zeros(2, 64, 32, 32),), DIMS)
    gm.meta[meta.INFO] = GraphInfo(spec=spec, method="synthetic", symbolic=("N", "H", "W"), specialised={},
                                    fixed={}, constraints={})
    return gm


def test_table_shows_symbolic_conv_costs_and_the_cost_models_totals(resnet):
    inspection = inspect(resnet)
    cost = fr.cost(resnet)
    for key, total in cost.summary().items():
        assert sympy.expand(inspection.before.totals[key] - total) == 0, key
    conv1 = inspection.before.rows["conv1"]
    assert conv1.metrics["flops"].free_symbols == {N, H, W}
    table = inspection.to_table()
    conv1_line = next(line for line in table.splitlines() if line.startswith("conv1 "))
    assert "Conv2d" in conv1_line and all(name in conv1_line for name in "NHW")
    assert "values at N=2, H=64, W=64 (example inputs)" in table
    assert str(inspection) == table and inspection.render() == table
    assert inspection.value(inspection.before.totals["flops"]) == cost.at(N=2, H=64, W=64).flops


def test_costs_are_evaluated_at_the_given_dims(resnet):
    inspection = inspect(resnet, at={"N": 1, "H": 224, "W": 224})
    assert "values at N=1, H=224, W=224 (given)" in inspection.to_table()
    assert inspection.value(inspection.before.totals["flops"]) == fr.cost(resnet).at(N=1, H=224, W=224).flops
    partial = inspect(resnet, at={"H": 32})
    assert partial.at == {"N": 2, "H": 32, "W": 64}


def test_bad_dims_formats_and_graphs_raise_errors_that_say_how_to_fix_them(resnet):
    with pytest.raises(CostError, match="unknown dim name.*symbolic dims of this graph are: H, N, W"):
        inspect(resnet, at={"C": 3})
    with pytest.raises(CostError, match="positive integer"):
        inspect(resnet, at={"N": 0})
    with pytest.raises(RenderError, match="use one of table, json, dot, svg"):
        inspect(resnet, format="png")
    with pytest.raises(CostError, match="fxreduce.trace"):
        inspect(fx.symbolic_trace(nn.ReLU()))
    with pytest.raises(RenderError, match="one graph, not a rewrite"):
        inspect(resnet).delta()


def test_targets_are_short_and_tuple_shapes_nest():
    class Functional(nn.Module):
        def forward(self, x):
            return F.relu(x), torch.add(x, 1).flatten(1)

    gm = fr.trace(Functional(), (torch.randn(2, 4, 3),), {"N": (0, 0)})
    rows = inspect(gm).before.rows
    assert {rows[name].target for name in ("relu", "add", "flatten")} == {"F.relu", "torch.add", ".flatten()"}
    output = next(line for line in inspect(gm).to_table().splitlines() if line.startswith("output "))
    assert "((N, 4, 3), (N, 12))" in output


def test_diff_lists_removed_added_and_changed_nodes_and_the_total_delta(rewrite):
    before, after = rewrite
    inspection = inspect(before, after)
    assert [c.name for c in inspection.removed] == ["drop"]
    assert [c.name for c in inspection.added] == ["fc_u"]
    assert [c.name for c in inspection.changed] == ["fc"]
    assert inspection.changed[0].reasons == ("cost", "rewritten by low_rank")
    assert inspection.added[0].reasons == ("added by low_rank",)
    # fc: 16*10 MACs per sample become 16*4 + 4*10; dropout (eval) computes nothing.
    assert inspection.delta("flops") == 2 * N * (16 * 4 + 4 * 10 - 16 * 10)
    assert inspection.delta("params") == (16 * 4 + 4 * 10 + 10) - (16 * 10 + 10)
    assert inspection.delta("flops") == sympy.expand(fr.cost(after).flops - fr.cost(before).flops)
    assert inspection.changed[0].delta("flops") == 2 * N * (4 * 10 - 16 * 10)
    old, new = (inspection.value(view.totals["flops"]) for view in (inspection.before, inspection.after))
    assert inspection.reduction("flops") == pytest.approx(100 * (old - new) / old)

    table = inspection.to_table()
    for heading in ("removed (1)", "added (1)", "changed (1)"):
        assert heading in table
    assert "rewritten by low_rank" in table
    assert f"flops before: {formula(fr.cost(before).flops)}" in table


def test_json_parses_and_round_trips_expressions_and_numbers(rewrite):
    before, after = rewrite
    inspection = inspect(before, after, at={"N": 3, "H": 8, "W": 8})
    document = json.loads(inspection.to_json())
    assert document["kind"] == "diff" and document["at"] == {"N": 3, "H": 8, "W": 8}
    totals = document["diff"]["totals"]
    symbols = {"N": N, "H": H, "W": W}
    for key, total in fr.cost(after).summary().items():
        entry = document["after"]["totals"][key]
        assert sympy.sympify(entry["expr"], locals=symbols) == total
        assert entry["value"] == int(total.subs({N: 3, H: 8, W: 8}))
    assert totals["flops"]["delta"] == {"expr": str(-112 * N), "value": -336}
    assert totals["flops"]["reduction_pct"] == pytest.approx(inspection.reduction("flops"))
    assert [c["name"] for c in document["diff"]["removed"]] == ["drop"]
    fc = document["diff"]["changed"][0]
    assert fc["delta"]["params"]["value"] == -120 and fc["reduction_pct"]["flops"] == pytest.approx(75.0)
    nodes = {node["name"]: node for node in document["after"]["nodes"]}
    assert list(nodes) == [node.name for node in after.graph.nodes]
    assert nodes["conv"]["shape"] == ["N", "16", "H", "W"] and nodes["conv"]["shape_value"] == [3, 16, 8, 8]
    assert nodes["fc_u"]["rewritten_by"] == "low_rank" and nodes["conv"]["dtype"] == "float32"

    single = json.loads(inspect(before).to_json(indent=2))
    assert single["kind"] == "graph" and len(single["graph"]["nodes"]) == len(before.graph.nodes)


def test_dot_marks_added_rewritten_and_removed_nodes(rewrite):
    inspection = inspect(*rewrite)
    graph = inspection.graph
    assert {n: d["status"] for n, d in graph.nodes(data=True) if d["status"] != "same"} == {
        "drop": "removed", "fc_u": "added", "fc": "changed"}
    assert graph.edges["relu", "pool"]["removed"] is False and graph.edges["drop", "pool"]["removed"] is True
    dot = inspection.to_dot()
    assert "cluster_removed" not in dot and '{rank=same; "relu"; "drop";}' in dot  # beside what replaced it
    assert dot.count(f'fillcolor="{HIGHLIGHT_COLOR}"') == 3  # fc_u, fc and the legend
    assert "legend" in dot and "low_rank" in inspection.headline() and "FLOPs" in inspection.headline()


@needs_dot
def test_dot_parses_and_svg_shows_the_highlight_colour(rewrite, resnet):
    for inspection in (inspect(*rewrite), inspect(resnet)):
        subprocess.run(["dot", "-Tcanon"], input=inspection.to_dot(), text=True, check=True, capture_output=True)
    svg = inspect(*rewrite).render("svg")
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    assert HIGHLIGHT_COLOR in svg and ">drop<" in svg


def test_svg_without_graphviz_says_how_to_get_it(rewrite, monkeypatch):
    monkeypatch.setattr("fxreduce.inspection.dot.shutil.which", lambda name: None)
    with pytest.raises(RenderError, match=r"install graphviz \(apt-get install graphviz\) or use format=dot") as error:
        inspect(*rewrite).to_svg()
    assert isinstance(error.value, FxReduceError)


def test_write_infers_the_format_and_leaves_no_temporary_files(rewrite, tmp_path):
    inspection = inspect(*rewrite, format="json")
    assert json.loads(inspection.write(tmp_path / "diff.json").read_text())["kind"] == "diff"
    assert inspection.write(tmp_path / "diff.dot").read_text().startswith("digraph")
    assert inspection.write(tmp_path / "diff.txt").read_text() == inspection.to_table()
    assert json.loads((inspection.write(tmp_path / "diff")).read_text())["kind"] == "diff"
    assert inspection.write(tmp_path / "diff.json", format="table").read_text() == inspection.to_table()
    with pytest.raises(RenderError, match="suffix"):
        inspection.write(tmp_path / "diff.png")
    with pytest.raises(RenderError, match="directory exists"):
        inspection.write(tmp_path / "missing" / "diff.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diff", "diff.dot", "diff.json", "diff.txt"]


@pytest.mark.slow
def test_large_graphs_render_every_format_with_cut_formulas():
    gm = synthetic(2000)
    inspection = inspect(gm)
    table = inspection.to_table(width=30)
    assert len(table.splitlines()) > 2000
    assert " ..." in table
    assert max(len(line) for line in table.splitlines()) < 400
    edges = sum(len(node.all_input_nodes) for node in gm.graph.nodes)
    assert inspection.to_dot().count(" -> ") == inspection.graph.number_of_edges() == edges
    assert len(json.loads(inspection.to_json())["graph"]["nodes"]) == 2002
    changed = synthetic(2000)
    for node in list(changed.graph.nodes)[1:-1:2]:
        node.meta[meta.INFO] = NodeInfo(meta.shape(node), torch.float32, NodeCost())
        meta.mark_rewritten(node, "zero")
    diff = inspect(gm, changed)
    assert len(diff.changed) == 1000
    assert diff.to_table() and diff.to_dot() and json.loads(diff.to_json())["diff"]["changed"]


@pytest.fixture(scope="module")
def resnet_rewrite():
    gm = fr.trace(torchvision.models.resnet18().eval(), (torch.randn(2, 3, 64, 64),), DIMS)
    result = fr.apply(gm, "fold_batchnorm,sparse_lowrank")
    return gm, result


def test_removed_nodes_sit_beside_their_replacements(resnet_rewrite):
    gm, result = resnet_rewrite
    inspection = inspect(gm, result.graph_module, report=result.report)
    assert inspection.passes == ("fold_batchnorm", "sparse_lowrank")
    assert "fold_batchnorm, sparse_lowrank: FLOPs" in inspection.headline()
    anchors = inspection.anchors
    assert anchors["bn1"] == "conv1_1" and anchors["layer3_0_bn1"] == "layer3_0_conv1_1"
    assert anchors["fc"] == "fc_1"
    dot = inspection.to_dot()
    assert '{rank=same; "conv1_1"; "bn1";}' in dot and '{rank=same; "fc_1"; "fc";}' in dot
    made = inspection.made_by["fc_1"]
    assert [r.pass_name for r in made] == ["sparse_lowrank"] and "contract" not in (made[0].what or "")
    assert made[0].contract.startswith("bounded")


def test_html_page_is_self_contained_and_carries_the_view_model(resnet_rewrite, tmp_path):
    gm, result = resnet_rewrite
    inspection = inspect(gm, result.graph_module, report=result.report, at={"N": 1})
    page = inspection.write(tmp_path / "diff.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "<script>" in page and "<style>" in page
    for external in ("<script src", "<link", "url(http", "@import", "fetch("):
        assert external not in page
    model = view_model(inspection)
    nodes = {node["name"]: node for node in model["nodes"]}
    conv = nodes["layer3_0_conv1_1"]
    assert conv["module"] and conv["flops_formula"] == formula(inspection.after.rows["layer3_0_conv1_1"].metrics["flops"])
    assert "ceil(H/16)" in conv["shape"] and "layer3.0.conv1" in conv["replaces"]
    assert [model["rewrites"][i]["pass"] for i in conv["rewrites"]] == ["fold_batchnorm"]
    assert any("pipeline: FLOPs" in line for line in model["report"])
    assert model["totals"][0]["metric"] == "FLOPs" and model["totals"][0]["before"] > model["totals"][0]["after"]
    assert fr.inspect(gm).to_html().count("<svg") >= 1  # one graph, no diff, renders too


def test_large_graphs_collapse_unchanged_runs():
    gm = synthetic(1500)
    changed = synthetic(1500)
    for node in list(changed.graph.nodes)[100:1400:200]:
        meta.mark_rewritten(node, "zero")
        node.meta[meta.INFO] = NodeInfo(meta.shape(node), torch.float32, NodeCost())
    inspection = inspect(gm, changed)
    groups = inspection.collapsed
    members = [name for names in groups.values() for name in names]
    assert len(gm.graph.nodes) > COLLAPSE_ABOVE and len(members) == len(set(members)) > 1000
    assert not {c.name for c in inspection.changes} & set(members)
    dot = inspection.to_dot()
    assert dot.count("unchanged nodes") == len(groups) and dot.count("[label=") < 400
    assert len(inspect(*[synthetic(50)] * 2).collapsed) == 0


def test_the_command_writes_the_html_diff_of_a_saved_rewrite(tmp_path, capsys):
    from fxreduce.cli import main

    saved, page = tmp_path / "int8.pt", tmp_path / "diff.html"
    shape = "N,3,H=32,W=32"
    assert main(["apply", "default", "--pipeline", "fold_batchnorm,lower_int8", "--input-shape", shape,
                 "--no-measure", "-o", str(saved)]) == 0
    assert main(["inspect", str(saved), "--diff", "--format", "html", "-o", str(page)]) == 0
    assert f"wrote {page}" in capsys.readouterr().out
    text = page.read_text()
    assert "fold_batchnorm, lower_int8: FLOPs" in text and "BatchNorm folded" in text  # the saved report's reasons
