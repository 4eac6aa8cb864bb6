"""models.py: model references, input-shape text, importing a user's code."""

import pytest
import torch

from fxreduce.errors import InputError
from fxreduce.models import default_example_size, import_code, load_model, parse_input_shape, ref_kind


@pytest.mark.parametrize("ref, kind", [("default", "demo"), ("torchvision:resnet18", "torchvision"),
                                       ("pkg.mod:make", "module"), ("models/net.py:make", "path"),
                                       ("net.py:make", "path")])
def test_references_are_told_apart(ref, kind):
    assert ref_kind(ref) == kind


@pytest.mark.parametrize("ref, match", [("no_colon", "malformed model reference"), ("pkg.mod:", "malformed"),
                                        ("1pkg:make", "is not a module name"),
                                        ("no_such_package_xyz:make", "cannot import module"),
                                        ("missing.py:make", "no such file")])
def test_bad_references_say_what_to_write(ref, match):
    with pytest.raises(InputError, match=match):
        load_model(ref)


def test_a_file_reference_loads_its_factory_once_and_a_saved_file_may_not_name_one(tmp_path):
    path = tmp_path / "nets.py"
    path.write_text("import torch\nCALLS = []\n\ndef small():\n    CALLS.append(1)\n"
                    "    return torch.nn.Linear(3, 2)\n")
    model = load_model(f"{path}:small", seed=0)
    assert isinstance(model, torch.nn.Linear) and not model.training
    assert import_code(str(path)) is import_code(str(path))
    assert torch.equal(load_model(f"{path}:small", seed=0).weight, model.weight)
    with pytest.raises(InputError, match="is a file path, which is not allowed here"):
        load_model(f"{path}:small", allow_path=False)
    with pytest.raises(InputError, match="has no attribute 'smal'"):
        load_model(f"{path}:smal")


def test_input_shapes_name_dims_fix_sizes_and_set_dtypes():
    shape = parse_input_shape("N,3,H=32,W", default_size=16)
    (images,) = shape.inputs
    assert images.shape == (2, 3, 32, 16) and shape.dims == {"N": (0, 0), "H": (0, 2), "W": (0, 3)}
    assert shape.default_at() == {"N": 1, "H": 32, "W": 16}
    (tokens,) = parse_input_shape("B,T:long").inputs
    assert tokens.dtype == torch.long
    with pytest.raises(InputError, match="unknown dtype 'half8'"):
        parse_input_shape("N,4:half8")
    assert default_example_size("torchvision:inception_v3") == 299
