"""cost_models/counting.py: every attention kernel costed by formula, forward and backward, in every dim."""

import pytest
import sympy
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import fxreduce as fr
from fxreduce.cost_models import symbol

N, H, W, R = (symbol(s) for s in ("N", "H", "W", "R"))


# Attention ------------------------------------------------------------------------------------------------

T = symbol("T")


class Attention(torch.nn.Module):
    """F.scaled_dot_product_attention on q, k, v given as inputs, with the call's options."""

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, **self.options)


class AttentionWithMask(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _qkv(n, heads, t, d, kv_heads=None, leading=()):
    kv_heads = kv_heads or heads
    return (torch.randn(*leading, n, heads, t, d), torch.randn(*leading, n, kv_heads, t, d),
            torch.randn(*leading, n, kv_heads, t, d))


TIED_QKV = {"N": [(0, 0), (1, 0), (2, 0)], "T": [(0, 2), (1, 2), (2, 2)]}


@pytest.mark.parametrize("options, kv_heads", [
    ({}, None), ({"is_causal": True}, None), ({"scale": 0.5}, None), ({"enable_gqa": True}, 2),
    ({"dropout_p": 0.1}, None),  # the math backend: its two bmm are counted as they run
])
def test_every_sdpa_call_counts_torchs_sdpa_formula_and_is_quadratic_in_T(options, kv_heads):
    gm = fr.trace(Attention(**options), _qkv(2, 4, 10, 8, kv_heads), TIED_QKV)
    cost = fr.cost(gm)
    assert cost.specialised == {}
    assert sympy.degree(sympy.Poly(cost.flops, T)) == 2
    for n, t in ((1, 7), (3, 33)):
        expected = sdpa_flop_count((n, 4, t, 8), (n, kv_heads or 4, t, 8), (n, kv_heads or 4, t, 8))
        assert cost.at(N=n, T=t).flops == expected


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_masked_sdpa_counts_the_full_score_matrix_and_the_mask(dtype):
    mask = torch.ones(10, 10, dtype=torch.bool).tril()
    mask = mask if dtype is torch.bool else torch.zeros(10, 10).masked_fill(~mask, float("-inf"))
    dims = {"N": [(0, 0), (1, 0), (2, 0)], "T": [(0, 2), (1, 2), (2, 2), (3, 0), (3, 1)]}
    gm = fr.trace(AttentionWithMask(), _qkv(2, 4, 10, 8) + (mask,), dims)
    node = fr.cost(gm).at(N=2, T=10).nodes["scaled_dot_product_attention"]
    assert 2 * sum(node.macs.values()) == sdpa_flop_count((2, 4, 10, 8), (2, 4, 10, 8), (2, 4, 10, 8))
    converted = 10 * 10 if dtype is torch.bool else 0  # torch turns a bool mask into an additive one first
    assert node.other == 2 * 4 * 10 * 10 * 3 + converted  # scale, softmax and mask, per score


def test_sdpa_on_three_and_five_dimensional_inputs():
    three = fr.trace(Attention(), tuple(torch.randn(2, 10, 8) for _ in range(3)), {"T": [(0, 1), (1, 1), (2, 1)]})
    assert fr.cost(three).at(T=10).flops == sdpa_flop_count((2, 1, 10, 8), (2, 1, 10, 8), (2, 1, 10, 8))
    five = fr.trace(Attention(), _qkv(2, 4, 10, 8, leading=(3,)), {})
    assert fr.cost(five).flops == sdpa_flop_count((6, 4, 10, 8), (6, 4, 10, 8), (6, 4, 10, 8))


def test_sdpa_bytes_are_its_inputs_and_output():
    gm = fr.trace(Attention(), _qkv(2, 4, 10, 8), TIED_QKV)
    node = fr.cost(gm).nodes["scaled_dot_product_attention"]
    assert sympy.expand(node.bytes_read - 3 * N * 4 * T * 8 * 4) == 0
    assert sympy.expand(node.bytes_written - N * 4 * T * 8 * 4) == 0


class SelfAttention(torch.nn.Module):
    """Projections and SDPA: the training step runs the attention kernel's backward."""

    def __init__(self, width=32, heads=4, explicit=False):
        super().__init__()
        self.qkv, self.out = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)
        self.heads, self.explicit = heads, explicit

    def forward(self, x):
        n, t, width = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        if self.explicit:  # attention written out, as GPT-2's "eager" implementation does
            scores = torch.matmul(q, k.transpose(-1, -2)) / (width // self.heads) ** 0.5
            y = torch.matmul(torch.softmax(scores, dim=-1), v)
        else:
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(n, t, width))


def test_explicit_matmul_attention_costs_what_sdpa_costs():
    x = torch.randn(2, 10, 32)
    fused = fr.cost(fr.trace(SelfAttention(), (x,), {"N": (0, 0), "T": (0, 1)}))
    explicit = fr.cost(fr.trace(SelfAttention(explicit=True), (x,), {"N": (0, 0), "T": (0, 1)}))
    assert sympy.expand(fused.flops - explicit.flops) == 0
    assert sympy.expand(fused.flops - (2 * N * T * 32 * 128 + sdpa_flop_count((N, 4, T, 8), (N, 4, T, 8),
                                                                                (N, 4, T, 8)))) == 0


def test_attention_training_step_counts_torchs_backward_formula():
    gm = fr.trace(SelfAttention(), (torch.randn(2, 10, 32),), {"N": (0, 0), "T": (0, 1)})
    node = fr.cost(gm, training=True).at(N=2, T=10).nodes["scaled_dot_product_attention"]
    shape = (2, 4, 10, 8)
    assert 2 * node.macs["float32"] == sdpa_flop_count(shape, shape, shape)
    assert 2 * node.backward_macs["float32"] == sdpa_backward_flop_count(shape, shape, shape, shape)


class MultiheadSelfAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


def _mha_flops(n, t, width=32, heads=4):
    head = width // heads
    return 2 * n * t * width * width * 4 + sdpa_flop_count((n, heads, t, head), (n, heads, t, head),
                                                           (n, heads, t, head))


@pytest.mark.parametrize("context", [torch.enable_grad, torch.no_grad, torch.inference_mode])
def test_multihead_attention_counts_the_same_under_no_grad_and_inference_mode(context):
    model = MultiheadSelfAttention().eval()
    with context():
        gm = fr.trace(model, (torch.randn(2, 10, 32),), {"N": (0, 0), "T": (0, 1)})
        forward, step = fr.cost(gm), fr.cost(gm, training=True)
    assert forward.at(N=3, T=17).flops == _mha_flops(3, 17)
    assert sympy.degree(sympy.Poly(forward.flops, T)) == 2
    assert step.at(N=3, T=17).flops > 2 * _mha_flops(3, 17)  # the backward ran


class FastPathAttention(torch.nn.Module):
    """nn.MultiheadAttention's fused inference kernel, called as the module calls it on its fast path."""

    def __init__(self):
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x):
        mha = self.mha
        return torch._native_multi_head_attention(x, x, x, 32, 4, mha.in_proj_weight, mha.in_proj_bias,
                                                  mha.out_proj.weight, mha.out_proj.bias, None, False)[0]


def test_multihead_attention_fast_path_kernel_counts_projections_and_attention():
    model = FastPathAttention().eval()
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), model.mha(x, x, x, need_weights=False)[0], atol=1e-5)
    gm = fr.trace(model, (x,), {"N": (0, 0), "T": (0, 1)})
    assert fr.cost(gm).at(N=3, T=17).flops == _mha_flops(3, 17)


@pytest.mark.skipif(not torch.backends.cuda.is_built(), reason="fake CUDA tensors need a CUDA build of torch")
@pytest.mark.parametrize("kernel", ["efficient", "flash", "cudnn"])
def test_cuda_attention_kernels_count_what_torchs_counter_counts(kernel):
    """The CUDA kernels, on fake CUDA tensors (no GPU needed): counted with torch's own formulas, forward
    and backward, exactly as FlopCounterMode counts them."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from fxreduce.cost_models.counting import OpCounter

    aten = torch.ops.aten
    with FakeTensorMode():
        q, k, v = (torch.empty(2, 4, 64, 16, device="cuda", dtype=torch.float16) for _ in range(3))
        grad = torch.empty_like(q)

        def run():
            if kernel == "efficient":
                out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(q, k, v, None, True)
                aten._scaled_dot_product_efficient_attention_backward(grad, q, k, v, None, out, lse, seed, offset,
                                                                      0.0, [True, True, True, False])
            elif kernel == "flash":
                out, lse, cq, ck, mq, mk, seed, offset, _ = aten._scaled_dot_product_flash_attention(q, k, v)
                aten._scaled_dot_product_flash_attention_backward(grad, q, k, v, out, lse, cq, ck, mq, mk, 0.0,
                                                                  False, seed, offset)
            else:
                out, lse, cq, ck, mq, mk, seed, offset, _ = aten._scaled_dot_product_cudnn_attention(
                    q, k, v, None, True)
                aten._scaled_dot_product_cudnn_attention_backward(grad, q, k, v, out, lse, seed, offset, None,
                                                                  cq, ck, mq, mk, 0.0, False)

        with FlopCounterMode(display=False) as torch_counter:
            run()
        counter = OpCounter()
        with counter:
            run()
    ours = 2 * sum(counter.counts[None].macs.values())
    assert ours == torch_counter.get_total_flops() > 0
    assert ours == sdpa_flop_count(q.shape, k.shape, v.shape) + sdpa_backward_flop_count(q.shape, q.shape, k.shape,
                                                                                          v.shape)


def test_torchs_counter_with_fxreduces_attention_formulas_counts_what_fxreduce_counts():
    from fxreduce.cost_models.counting import ATTENTION_FORMULAS

    model = SelfAttention().eval()
    gm = fr.trace(model, (torch.randn(2, 10, 32),), {"N": (0, 0), "T": (0, 1)})
    x = torch.randn(3, 17, 32)
    with FlopCounterMode(display=False) as plain:
        model(x)
    with FlopCounterMode(display=False, custom_mapping=ATTENTION_FORMULAS) as counter:
        model(x)
    assert fr.cost(gm).at(N=3, T=17).flops == counter.get_total_flops() > plain.get_total_flops()
