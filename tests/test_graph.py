"""graph.py: one layer view over call_module, functional and aten forms; networkx queries."""

import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from transformers.pytorch_utils import Conv1D

import fxreduce as fr
from fxreduce.graph import dominators, find_chains, find_layers, region_between
from fxreduce.modules import DecomposedLSTM
from fxreduce.testing.contracts import check_contract


class Mixed(torch.nn.Module):
    """The same layer kinds as modules and as functions."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.weight = torch.nn.Parameter(torch.randn(5, 4))
        self.drop = torch.nn.Dropout(0.2)

    def forward(self, x):
        y = self.bn(self.conv(x))
        y = F.conv2d(y, self.conv.weight.new_ones(4, 4, 1, 1)) + y
        y = F.dropout(y.mean((2, 3)), 0.1, self.training)
        return F.linear(self.drop(y), self.weight)


def test_layers_found_in_every_dialect():
    model = Mixed().eval()
    x = torch.randn(2, 3, 8, 8)
    fx_graph = fr.trace(model, (x,), method="fx")
    aten_graph = fr.trace(model, (x,), method="export")
    for gm, dialects in ((fx_graph, {"module", "function"}), (aten_graph, {"aten"})):
        layers = find_layers(gm)
        kinds = sorted(layer.kind for layer in layers)
        assert kinds == ["batchnorm", "conv2d", "conv2d", "dropout", "dropout", "linear"], kinds
        assert {layer.dialect for layer in layers} == dialects
        linear = next(layer for layer in layers if layer.kind == "linear")
        assert torch.equal(linear.weight, model.weight)
        assert all(not layer.attrs["training"] for layer in layers if layer.kind in ("dropout", "batchnorm"))
        assert [[layer.kind for layer in chain] for chain in find_chains(gm, ("conv2d", "batchnorm"))] == \
            [["conv2d", "batchnorm"]]


def test_shipped_passes_rewrite_both_dialects_the_same():
    model = Mixed().eval()
    x = torch.randn(2, 3, 8, 8)
    for method in ("fx", "export"):
        gm = fr.trace(model, (x,), {"N": (0, 0)}, method=method)
        result = fr.apply(gm, "fold_batchnorm,remove_dropout,eliminate_dead_code")
        assert [len(step.rewrites) > 0 for step in result.report.steps[:2]] == [True, True], method
        torch.testing.assert_close(result.graph_module(x), model(x))
        assert not find_layers(result.graph_module, ["dropout", "batchnorm"])


def test_region_and_dominators():
    gm = fr.trace(Mixed().eval(), (torch.randn(2, 3, 8, 8),))
    nodes = {n.name: n for n in gm.graph.nodes}
    region = region_between(gm, nodes["conv"], nodes["add"])
    assert {"conv", "bn", "conv2d", "add"} <= region and "linear" not in region
    idom = dominators(gm)
    assert idom["add"] == "bn" and idom["bn"] == "conv"


# One linear view: every spelling of x W^T + b with a constant W is Layer(kind="linear").

SPELLINGS = ("module", "conv1d", "functional", "addmm_transposed", "mm", "matmul", "at_transposed")


class Affine(torch.nn.Module):
    """One affine map spelled one way; ``weight_out_in`` is W (out, in) whatever the storage."""

    def __init__(self, spelling: str, features_in: int, features_out: int):
        super().__init__()
        self.spelling = spelling
        if spelling == "module":
            self.inner = torch.nn.Linear(features_in, features_out)
        elif spelling == "conv1d":
            self.inner = Conv1D(features_out, features_in)
            torch.nn.init.normal_(self.inner.bias)
        else:
            stored_in_out = spelling in ("mm", "matmul")
            shape = (features_in, features_out) if stored_in_out else (features_out, features_in)
            self.weight = torch.nn.Parameter(torch.randn(shape) / features_in ** 0.5)
            self.bias = torch.nn.Parameter(torch.randn(features_out)) if spelling != "mm" else None

    def weight_out_in(self) -> torch.Tensor:
        if self.spelling == "module":
            return self.inner.weight
        if self.spelling == "conv1d":
            return self.inner.weight.t()
        return self.weight.t() if self.spelling in ("mm", "matmul") else self.weight

    def forward(self, x):
        if self.spelling in ("module", "conv1d"):
            return self.inner(x)
        if self.spelling == "functional":
            return F.linear(x, self.weight, self.bias)
        if self.spelling == "addmm_transposed":
            return torch.addmm(self.bias, x, self.weight.t())
        if self.spelling == "mm":
            return torch.mm(x, self.weight)
        if self.spelling == "matmul":
            return torch.matmul(x, self.weight) + self.bias
        return x @ self.weight.T + self.bias


class Chain(torch.nn.Module):
    def __init__(self, spellings, widths):
        super().__init__()
        self.layers = torch.nn.ModuleList(Affine(s, a, b) for s, a, b in zip(spellings, widths, widths[1:]))

    def forward(self, x):
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = torch.tanh(x)
        return x


def test_every_linear_spelling_is_one_layer_view():
    model = Chain(SPELLINGS, [6, 7, 8, 9, 10, 11, 12, 5]).eval()
    x = torch.randn(4, 6)
    for method in ("fx", "export"):
        gm = fr.trace(model, (x,), method=method)
        layers = find_layers(gm, ["linear"])
        assert len(layers) == len(SPELLINGS), (method, [layer.describe() for layer in layers])
        for layer, affine in zip(layers, model.layers):
            torch.testing.assert_close(layer.weight, affine.weight_out_in(), msg=f"{method} {affine.spelling}")
            assert layer.tied_with == ()
            assert layer.input.meta["fxreduce"].shape[-1] == layer.weight.shape[1]
        conv1d = next(layer for layer, affine in zip(layers, model.layers) if affine.spelling == "conv1d")
        assert conv1d.parameter is not None and conv1d.parameter.shape == (7, 8)  # stored (in, out)
        assert conv1d.name == "layers.1.inner"


def test_a_product_that_is_not_an_affine_map_is_no_layer():
    class NotLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(4, 4))

        def forward(self, x, y):
            return torch.mm(self.weight, x) + torch.mm(x, y) + torch.addmm(x, x, self.weight, beta=2.0)

    gm = fr.trace(NotLinear(), (torch.randn(4, 4), torch.randn(4, 4)), method="fx")
    assert find_layers(gm, ["linear"]) == []


@st.composite
def spelled_chains(draw):
    count = draw(st.integers(1, 4))
    spellings = draw(st.lists(st.sampled_from(SPELLINGS), min_size=count, max_size=count))
    widths = draw(st.lists(st.integers(8, 20), min_size=count + 1, max_size=count + 1))
    return spellings, widths, draw(st.sampled_from(("fx", "export"))), draw(st.integers(0, 2 ** 16))


@given(spelled_chains())
def test_linear_view_rewrites_every_spelling_within_each_contract(case):
    spellings, widths, method, seed = case
    torch.manual_seed(seed)
    model = Chain(spellings, widths).eval()
    x = torch.randn(5, widths[0])
    gm = fr.trace(model, (x,), {"N": (0, 0)}, method=method)
    for spec in ("sparse_lowrank(rank=2)", "lower_int8"):
        result = fr.apply(gm, spec)
        assert len(result.report.steps[0].rewrites) == len(spellings), (spec, str(result.report))
        assert not find_layers(result.graph_module, ["linear"])
        checked = check_contract(spec, gm, trials=2)
        assert checked.ok, (spec, spellings, method, str(checked))
        assert result.graph_module(x).shape == model(x).shape


def test_rewrites_drop_the_replaced_constants():
    model = Chain(["conv1d", "mm", "addmm_transposed"], [8, 9, 10, 11]).eval()
    gm = fr.trace(model, (torch.randn(3, 8),), method="fx")
    rewritten = fr.apply(gm, "sparse_lowrank(rank=2)").graph_module
    names = [name for name, _ in rewritten.named_parameters()]
    assert not any(name.startswith("layers.") for name in names), names
    assert sum(p.numel() for p in rewritten.parameters()) < sum(p.numel() for p in model.parameters())


def _gpt2(tied: bool):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32, use_cache=False,
                        bos_token_id=0, eos_token_id=0, tie_word_embeddings=tied)
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 64, (2, 8))
    return model, ids, fr.trace(model, (ids,), method="export")


def test_gpt2_projections_are_linear_layers_and_a_tied_head_is_left_alone_with_the_reason():
    model, ids, gm = _gpt2(tied=True)
    layers = find_layers(gm, ["linear"])
    names = [layer.name for layer in layers]
    assert names[:4] == [f"transformer.h.0.{p}" for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert len(layers) == 9 and layers[-1].tied_with and not any(layer.tied_with for layer in layers[:-1])
    head = layers[-1]
    assert head.why_shared() and "tie_word_embeddings=False" in head.why_shared()
    for spec in ("sparse_lowrank(rank=4)", "lower_int8"):
        step = fr.apply(gm, spec).report.steps[0]
        assert len(step.rewrites) == 8, spec
        assert [(s.node, "tied" in s.reason) for s in step.skipped] == [(head.name, True)], spec
    asked = fr.apply(gm, f"sparse_lowrank(rank=4, layers={head.name!r})")
    assert not asked.report.steps[0].rewrites and "left alone" in str(asked.report) and "tied" in str(asked.report)
    rewritten = fr.apply(gm, "lower_int8").graph_module
    assert [layer.tied_with for layer in find_layers(rewritten, ["linear"])] == [head.tied_with]  # still tied
    torch.testing.assert_close(rewritten(ids).logits, model(ids).logits, atol=0.05, rtol=0.05)


def test_gpt2_untied_head_is_rewritten_and_contracts_hold():
    model, ids, gm = _gpt2(tied=False)
    for spec in ("sparse_lowrank(rank=4)", "lower_int8"):
        result = fr.apply(gm, spec)
        assert len(result.report.steps[0].rewrites) == 9 and not result.report.steps[0].skipped, spec
        assert not find_layers(result.graph_module, ["linear"])
        checked = check_contract(spec, gm, trials=1)
        assert checked.ok, str(checked)
        assert result.graph_module(ids).logits.shape == model(ids).logits.shape


def test_admm_constrains_conv1d_and_transposed_weights_in_their_stored_layout():
    from fxreduce.training.admm import ADMM
    model = Chain(["conv1d", "addmm_transposed", "module"], [8, 9, 10, 11])
    admm = ADMM(model, prune=0.5)
    assert [w.layer for w in admm.weights] == ["layers.0.inner", "layers.1", "layers.2.inner"]
    assert admm.weights[0].parameter is model.layers[0].inner.weight


def test_fxreduces_decomposed_lstm_is_an_lstm_layer_and_the_skip_reasons_are_one():
    class Stacked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.torch_lstm = torch.nn.LSTM(4, 6)
            self.ours = DecomposedLSTM(6, 6)
            self.projected = torch.nn.LSTM(6, 8, proj_size=3)

        def forward(self, x):
            return self.projected(self.ours(self.torch_lstm(x)[0])[0])[0]

    gm = fr.trace(Stacked(), (torch.randn(5, 2, 4),))
    layers = find_layers(gm, ["lstm"])
    assert [(layer.name, type(layer.module).__name__) for layer in layers] == [
        ("torch_lstm", "LSTM"), ("ours", "DecomposedLSTM"), ("projected", "LSTM")]
    assert [layer.why_not_decomposable() for layer in layers[:2]] == [None, None]
    assert "proj_size is unsupported" in layers[2].why_not_decomposable()
    exported = fr.trace(torch.nn.LSTM(4, 6), (torch.randn(5, 2, 4),), method="export")
    (aten,) = find_layers(exported, ["lstm"])
    assert aten.dialect == "aten" and "capture with method='fx'" in aten.why_not_decomposable()
    reports = [str(fr.apply(exported, spec).report) for spec in ("decompose_lstm", "structured_dropout",
                                                                  "sparse_lowrank(rank=2)")]
    assert all("an aten-level lstm (torch.export graph) has no module to rewrite" in text for text in reports)
