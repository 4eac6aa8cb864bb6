"""Every torchvision classification model: traces, and its symbolic cost equals torch's FLOP count
(with torch's SDPA formula counted on the CPU attention kernel, as fxreduce counts it).

The whole zoo takes minutes, so it is marked slow and runs as its own CI step (`pytest -m slow`); a
representative subset runs in the quick suite: a CNN, a mobile net, ViT (which fixes its image size)
and Swin (whose window attention needs concrete sizes, so H and W fall back to concrete values).
"""

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import fxreduce as fr
from fxreduce.cost_models import graph_info
from fxreduce.cost_models.counting import ATTENTION_FORMULAS

ALL_MODELS = torchvision.models.list_models(module=torchvision.models)
QUICK = ["resnet18", "mobilenet_v3_small", "vit_b_16", "swin_t"]


def image_size(name: str) -> int:
    return 299 if name.startswith("inception") else 224


def torch_count(model: torch.nn.Module, x: torch.Tensor) -> int:
    """torch's count, with torch's SDPA formula on the CPU attention kernels it has no formula for (ViT)."""
    with FlopCounterMode(display=False, custom_mapping=ATTENTION_FORMULAS) as counter:
        model(x)
    return counter.get_total_flops()


def check_model(name: str) -> None:
    size = image_size(name)
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    gm = fr.trace(model, (torch.randn(2, 3, size, size),), {"N": (0, 0), "H": (0, 2), "W": (0, 3)}, time_limit=20)
    info = graph_info(gm)
    expected = torch_count(model, torch.randn(1, 3, size, size))
    cost = fr.cost(gm)
    point = {"N": 1, "H": size, "W": size}
    if "N" in info.symbolic and all(d in info.symbolic or info.fixed[d] == size for d in ("H", "W")):
        assert cost.at(**point).flops == expected, (name, cost.flops)
    else:
        # A dim fell back to its example size: the report names it, and a concrete trace still matches.
        assert all(info.specialised[d] for d in "NHW" if d not in info.symbolic)
        concrete = fr.trace(model, (torch.randn(1, 3, size, size),), time_limit=20)
        assert fr.cost(concrete).flops == expected, name
    for dim in info.specialised:
        assert dim in str(cost) and info.specialised[dim] in str(cost)


@pytest.mark.parametrize("name", QUICK)
def test_representative_models(name):
    check_model(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_torchvision_classification_model(name):
    check_model(name)
