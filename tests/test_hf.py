"""Hugging Face transformers models as they ship, from small configs (no weights downloaded).

A matrix over the families (GPT-2 base and LM head, BERT, Llama with GQA and RoPE, untied and tied, ViT,
DistilBERT) x (capture, cost, sparse_lowrank, lower_int8, `fxreduce verify`), then saving, the command
line, and the inputs that must fail clearly.
"""

from __future__ import annotations

import pytest
import sympy
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import fxreduce as fr
from fxreduce import hf
from fxreduce.cli import main
from fxreduce.cost_models import graph_info, symbol
from fxreduce.errors import InputError, TraceError
from fxreduce.testing import run_eval
from fxreduce.serialization import build, export, load, load_export, save
from fxreduce.testing.contracts import random_inputs

transformers = pytest.importorskip("transformers")
N, T = symbol("N"), symbol("T")

# family -> (layers, query heads, key/value heads, head size, tokens (None: T), pixel input)
FAMILIES = {
    "gpt2": (2, 4, 4, 16, None, False),
    "gpt2_lm": (2, 4, 4, 16, None, False),
    "bert": (2, 4, 4, 16, None, False),
    "llama": (2, 4, 2, 16, None, False),
    "llama_tied": (2, 4, 2, 16, None, False),
    "vit": (2, 4, 4, 16, 17, True),  # 16 patches and the class token
    "distilbert": (2, 4, 4, 16, None, False),
}
CACHED = {"gpt2", "gpt2_lm", "llama", "llama_tied"}
# Projections each pass rewrites: GPT-2 4 per block (c_attn, c_proj, c_fc, mlp c_proj), Llama 7 per block
# (q, k, v, o, gate, up, down) and its untied head, BERT / ViT 6 per layer and the pooler, DistilBERT 6 per
# layer; lower_int8 also runs ViT's patch-embedding convolution in int8. A tied head is left alone.
REWRITES = {"gpt2": 8, "gpt2_lm": 8, "bert": 13, "llama": 15, "llama_tied": 14, "vit": 13, "distilbert": 12}
TIED_HEAD = {"gpt2_lm", "llama_tied"}


def _inputs(family: str, n: int = 2, t: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    if FAMILIES[family][5]:
        return {"pixel_values": torch.randn(n, 3, 32, 32, generator=generator)}
    mask = torch.ones(n, t, dtype=torch.long)
    mask[0, t - 3:] = 0  # padding in the first sequence
    return {"input_ids": torch.randint(0, 512, (n, t), generator=generator), "attention_mask": mask}


def _dims(family: str) -> dict:
    if FAMILIES[family][5]:
        return {"N": ("pixel_values", 0)}
    return {"N": ("input_ids", 0), "T": ("input_ids", 1)}  # attention_mask shares them


_TRACED: dict[str, tuple[torch.nn.Module, torch.fx.GraphModule]] = {}


def traced(family: str) -> tuple[torch.nn.Module, torch.fx.GraphModule]:
    """The model with its default config and the graph captured from keyword inputs, once per session."""
    if family not in _TRACED:
        model = hf.FACTORIES[family]()
        _TRACED[family] = model, fr.trace(model, _inputs(family), _dims(family))
    return _TRACED[family]


_APPLIED: dict[tuple[str, str], fr.PipelineResult] = {}


def applied(family: str, spec: str) -> fr.PipelineResult:
    if (family, spec) not in _APPLIED:
        _APPLIED[family, spec] = fr.apply(traced(family)[1], spec)
    return _APPLIED[family, spec]


# Capture -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_as_shipped_with_symbolic_dims_and_the_cache(family):
    model, gm = traced(family)
    info = graph_info(gm)
    assert info.method == "torch.export" and info.specialised == {} and info.notes == ()
    assert info.symbolic == (("N",) if FAMILIES[family][5] else ("N", "T"))
    assert family not in CACHED or model.config.use_cache  # the default config: cache on
    for inputs in (_inputs(family), _inputs(family, n=3, t=9, seed=1)):
        with torch.no_grad():
            expected, actual = model(**inputs), gm(*inputs.values())
        assert type(actual) is type(expected)
        leaves = torch.utils._pytree.tree_leaves
        assert len(leaves(actual)) == len(leaves(expected))
        for e, a in zip(leaves(expected), leaves(actual)):
            torch.testing.assert_close(a, e)
        if family in CACHED:  # the cache, as the model builds it: keys and values of every layer
            cache = actual.past_key_values
            assert type(cache).__name__ == "DynamicCache" and len(cache.layers) == FAMILIES[family][0]
            torch.testing.assert_close(cache.layers[0].keys, expected.past_key_values.layers[0].keys)


def test_positional_input_ids_alone_capture_too():
    model = hf.gpt2()
    gm = fr.trace(model, (torch.randint(0, 512, (2, 12)),), {"N": (0, 0), "T": (0, 1)})
    assert graph_info(gm).symbolic == ("N", "T") and graph_info(gm).spec.names == ("input_ids",)


def test_a_cache_that_cannot_be_exported_is_dropped_with_a_note(monkeypatch):
    """As with a transformers version that cannot register its cache classes for torch.export."""
    from transformers.cache_utils import DynamicCache

    monkeypatch.setattr(hf, "register_caches", lambda model: "pretend the helper is missing")
    monkeypatch.delitem(torch.utils._pytree.SUPPORTED_NODES, DynamicCache, raising=False)
    model = hf.llama()
    gm = fr.trace(model, _inputs("llama"), _dims("llama"))
    info = graph_info(gm)
    assert len(info.notes) == 1 and "use_cache=False" in info.notes[0] and "pretend" in info.notes[0]
    assert info.symbolic == ("N", "T")
    out = gm(*_inputs("llama").values())
    assert getattr(out, "past_key_values", None) is None
    torch.testing.assert_close(out.logits, model(**_inputs("llama")).logits)
    rewritten = fr.apply(gm, "sparse_lowrank").graph_module
    assert graph_info(rewritten).notes == info.notes  # a rewrite keeps the capture's notes


# Cost ----------------------------------------------------------------------------------------------------


def _attention_flops(family: str, n: int, t: int) -> int:
    layers, heads, kv_heads, head, tokens, _ = FAMILIES[family]
    t = tokens or t
    return layers * sdpa_flop_count((n, heads, t, head), (n, kv_heads, t, head), (n, kv_heads, t, head))


@pytest.mark.parametrize("family", FAMILIES)
def test_cost_is_torchs_count_plus_torchs_sdpa_formula_and_quadratic_in_T(family):
    """On CPU torch counts the projections but not the attention kernel: fxreduce adds torch's own SDPA
    formula on the same shapes, once per layer; in T the cost is quadratic."""
    model, gm = traced(family)
    cost = fr.cost(gm)
    n, t = 3, 9
    inputs = _inputs(family, n=n, t=t, seed=2)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs)
    point = {"N": n} if FAMILIES[family][5] else {"N": n, "T": t}
    assert cost.at(**point).flops == counter.get_total_flops() + _attention_flops(family, n, t)
    if not FAMILIES[family][5]:
        layers, heads, _, head, _, _ = FAMILIES[family]
        assert sympy.Poly(cost.flops, T).degree() == 2
        assert sympy.expand(sympy.Poly(cost.flops, T).coeff_monomial(T ** 2) - layers * heads * 4 * head * N) == 0


def test_eager_matmul_attention_costs_what_sdpa_costs():
    sdpa = traced("gpt2")[1]
    model = hf.gpt2()
    model.set_attn_implementation("eager")
    eager = fr.trace(model, _inputs("gpt2"), _dims("gpt2"))
    assert sympy.expand(fr.cost(eager).flops - fr.cost(sdpa).flops) == 0


# The passes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["sparse_lowrank", "lower_int8"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_projection_is_rewritten_and_contracts_hold(family, spec):
    result = applied(family, spec)
    step = result.report.steps[0]
    expected = REWRITES[family] + (spec == "lower_int8" and family == "vit")
    assert len(step.rewrites) == expected, [r.rewrite.what for r in step.rewrites]
    tied = [s for s in step.skipped if "tied" in s.reason]
    assert len(tied) == (family in TIED_HEAD)
    before, after = traced(family)[1], result.graph_module
    for sample in random_inputs(before, trials=1, seed=3):
        assert step.pass_.check(before, after, sample) is None
    out = run_eval(after, _inputs(family, n=3, t=7, seed=4).values())
    assert all(torch.isfinite(x).all() for x in torch.utils._pytree.tree_leaves(out) if x.is_floating_point())


@pytest.mark.parametrize("family, shape, pipeline", [
    ("gpt2", "N,T=12:long", "sparse_lowrank"), ("bert", "N,T=12:long", "sparse_lowrank"),
    ("llama", "N,T=12:long", "sparse_lowrank"), ("vit", "N,3,32,32", "sparse_lowrank,lower_int8"),
    ("distilbert", "N,T=12:long", "sparse_lowrank")])
def test_fxreduce_verify_on_every_family(family, shape, pipeline, capsys):
    """sparse_lowrank factorises every Linear of the text models, so lower_int8 after it would find none (the
    order check refuses that); ViT keeps its patch convolution for lower_int8."""
    status = main(["verify", f"fxreduce.hf:{family}", "--pipeline", pipeline, "--input-shape", shape,
                   "--trials", "1"])
    out = capsys.readouterr().out
    assert status == 0 and "every contract holds" in out


# Save, load, export ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, spec", [("gpt2_lm", "sparse_lowrank"),
                                          pytest.param("llama", "lower_int8", marks=pytest.mark.slow)])
def test_rewritten_models_save_load_and_export(family, spec, tmp_path):
    ref, shape = f"fxreduce.hf:{family}", "N,T=12:long"
    built = build(ref, shape, spec)
    ids = torch.randint(0, 512, (3, 9))
    expected = run_eval(built.graph_module, (ids,))
    save(tmp_path / "model.pt", built.graph_module, model_ref=ref, pipeline_spec=spec, input_spec_text=shape, seed=0)
    loaded = load(tmp_path / "model.pt", confirm=lambda manifest: True)
    torch.testing.assert_close(run_eval(loaded.graph_module, (ids,)).logits, expected.logits)
    assert graph_info(loaded.graph_module).symbolic == ("N", "T")
    assert fr.get_pass(spec).exports
    export(tmp_path / "model.pt2", built.graph_module)
    program = load_export(tmp_path / "model.pt2", trusted=True)
    torch.testing.assert_close(run_eval(program.graph_module, (ids,)).logits, expected.logits)
    assert graph_info(program.graph_module).symbolic == ("N", "T")


def test_keyword_inputs_with_a_mask_export_with_tied_dims(tmp_path):
    gm = applied("llama", "sparse_lowrank").graph_module
    export(tmp_path / "llama.pt2", gm)
    loaded = load_export(tmp_path / "llama.pt2", trusted=True).graph_module
    info = graph_info(loaded)
    assert info.symbolic == ("N", "T") and info.spec.positions("T") == ((0, 1), (1, 1))
    inputs = tuple(_inputs("llama", n=3, t=7, seed=5).values())
    torch.testing.assert_close(run_eval(loaded, inputs).logits, run_eval(gm, inputs).logits)


# The command line ------------------------------------------------------------------------------------------


def test_cli_cost_apply_inspect_on_gpt2_with_T_symbolic(tmp_path, capsys):
    assert main(["cost", "fxreduce.hf:gpt2_lm", "--input-shape", "N,T=16:long", "--at", "N=1,T=128"]) == 0
    out = capsys.readouterr().out
    assert "symbolic totals (in N, T)" in out and "N*T**2" in out and "captured with torch.export" in out
    path = tmp_path / "gpt2.pt"
    assert main(["apply", "fxreduce.hf:gpt2_lm", "--pipeline", "sparse_lowrank", "--input-shape", "N,T=16:long",
                 "--no-measure", "-o", str(path)]) == 0
    out = capsys.readouterr().out
    assert "tied" in out and f"wrote {path}" in out
    assert main(["inspect", str(path), "--diff", "--at", "N=1,T=128"]) == 0
    assert "transformer_h_0_attn_c_attn" in capsys.readouterr().out.replace(".", "_")


# Inputs that must fail clearly ------------------------------------------------------------------------------


def test_a_cache_object_passed_as_input_is_refused():
    model = hf.gpt2()
    inputs = _inputs("gpt2")
    with torch.no_grad():
        cache = model(**inputs).past_key_values
    with pytest.raises(InputError, match="DynamicCache.*passed as input 'past_key_values'.*leave past_key_values out"):
        fr.trace(model, {**inputs, "past_key_values": cache}, _dims("gpt2"))
    with pytest.raises(InputError, match="DynamicCache"):
        fr.trace(model, (inputs["input_ids"], cache))


def test_forward_needing_inputs_the_examples_lack():
    with pytest.raises(InputError, match="does not run on example inputs.*input_ids"):
        fr.trace(hf.bert(), {"attention_mask": torch.ones(2, 12, dtype=torch.long)})
    with pytest.raises(InputError, match="takes no argument 'pixel_value'.*did you mean 'pixel_values'"):
        fr.trace(hf.vit(), {"pixel_value": torch.randn(2, 3, 32, 32)})


def test_trace_errors_name_the_transformers_fix():
    with pytest.raises(TraceError, match="not torch.fx-traceable.*method='auto'"):
        fr.trace(hf.gpt2(), _inputs("gpt2"), method="fx")

    class BranchesOnValues(transformers.GPT2Model):
        def forward(self, input_ids, **kwargs):
            if input_ids.sum() > 0:  # data-dependent control flow
                return super().forward(input_ids, **kwargs)
            return super().forward(input_ids[:, :1], **kwargs)

    model = BranchesOnValues(hf.gpt2().config)
    with pytest.raises(TraceError, match="for a transformers model:.*branches on tensor values"):
        fr.trace(model, {"input_ids": _inputs("gpt2")["input_ids"]})
