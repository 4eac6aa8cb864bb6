"""Saved rewrites: plain data only, written atomically, shown before anything is imported, rebuilt exactly,
and every bad file (missing, corrupt, foreign, tampered, code-running) refused with a LoadError."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxreduce.cli import main
from fxreduce.errors import FxReduceError, InputError, LoadError
from fxreduce.files import load_tensors
from fxreduce.serialization import FORMAT, VERSION, Manifest, build, export, load, load_export, save, seal

PIPELINE = "fold_batchnorm,remove_dropout,eliminate_dead_code"
SHAPE = "N,3,H=32,W=32"


@pytest.fixture(scope="module")
def built():
    return build("default", SHAPE, PIPELINE, seed=0)


@pytest.fixture(scope="module")
def saved(built, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("saved") / "demo.pt"
    save(path, built.graph_module, model_ref="default", pipeline_spec=PIPELINE, input_spec_text=built.shape.text,
         seed=0)
    return path


def test_a_save_holds_only_plain_data(saved):
    data = torch.load(saved, weights_only=True)
    assert data["format"] == FORMAT and data["version"] == VERSION
    assert data["model"] == "default" and data["input_shape"] == "N=2,3,H=32,W=32" and data["seed"] == 0
    assert data["pipeline"].startswith("fold_batchnorm(")
    assert all(isinstance(value, torch.Tensor) for value in data["state_dict"].values())


def test_load_rebuilds_the_same_graph_and_weights(built, saved):
    shown = []
    loaded = load(saved, confirm=shown.append)
    assert shown == [loaded.manifest] and loaded.manifest.model == "default"
    x = torch.randn(3, 3, 40, 24)
    assert torch.equal(loaded.graph_module(x), built.graph_module(x))
    assert loaded.built.original is not None and loaded.built.result.report.steps


def test_the_manifest_is_shown_before_the_model_is_imported(tmp_path, monkeypatch, built):
    (tmp_path / "fxr_user_model.py").write_text("from fxreduce.models import demo\n\ndef build():\n"
                                                "    return demo()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "user.pt"
    save(path, built.graph_module, model_ref="fxr_user_model:build", pipeline_spec=PIPELINE,
         input_spec_text=built.shape.text, seed=0)
    monkeypatch.delitem(sys.modules, "fxr_user_model", raising=False)
    imported_when_shown = []

    def confirm(manifest: Manifest) -> bool:
        imported_when_shown.append("fxr_user_model" in sys.modules)
        return manifest.model != "fxr_user_model:build"

    with pytest.raises(LoadError, match="declined"):
        load(path, confirm=confirm)
    assert imported_when_shown == [False] and "fxr_user_model" not in sys.modules
    assert load(path, confirm=lambda manifest: True).manifest.model == "fxr_user_model:build"


def test_the_default_confirmation_prints_the_manifest(saved, capsys):
    load(saved)
    err = capsys.readouterr().err
    assert "model:       default" in err and "seed:        0" in err


def test_save_refuses_a_model_from_a_file_path(built, tmp_path):
    with pytest.raises(InputError, match="installed package"):
        save(tmp_path / "x.pt", built.graph_module, model_ref="models/mine.py:build", pipeline_spec=PIPELINE,
             input_spec_text=SHAPE, seed=0)
    assert not (tmp_path / "x.pt").exists()


def test_save_is_atomic(built, saved, tmp_path, monkeypatch):
    path = tmp_path / "demo.pt"
    path.write_bytes(saved.read_bytes())

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        save(path, built.graph_module, model_ref="default", pipeline_spec=PIPELINE, input_spec_text=SHAPE, seed=1)
    assert path.read_bytes() == saved.read_bytes() and os.listdir(tmp_path) == ["demo.pt"]


def _rewrite(saved: Path, path: Path, **changes) -> Path:
    """A copy of ``saved`` with ``changes``, digests sealed anew: a consistent file that only later checks catch."""
    data = torch.load(saved, weights_only=True)
    data.update(changes)
    torch.save(seal(data) if isinstance(data.get("state_dict"), dict) else data, path)
    return path


def test_bad_files_raise_load_error(saved, tmp_path):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"weight": torch.zeros(2)}, checkpoint)
    state = torch.load(saved, weights_only=True)["state_dict"]
    renamed = {("renamed." + key if i == 0 else key): value for i, (key, value) in enumerate(state.items())}
    resized = {key: (value[:1] if i == 0 else value) for i, (key, value) in enumerate(state.items())}
    cases = [
        (tmp_path / "missing.pt", "no such fxreduce save"),
        (truncated, "corrupt or truncated"),
        (garbage, "corrupt"),
        (checkpoint, "not an fxreduce save"),
        (_rewrite(saved, tmp_path / "newer.pt", version=99), "format version 99"),
        (_rewrite(saved, tmp_path / "damaged.pt", seed="0"), "damaged"),
        (_rewrite(saved, tmp_path / "renamed.pt", state_dict=renamed), "do not fit the rebuilt graph"),
        (_rewrite(saved, tmp_path / "resized.pt", state_dict=resized), "do not fit the rebuilt graph"),
        (_rewrite(saved, tmp_path / "path.pt", model=f"{tmp_path}/evil.py:build"), "file path"),
        (_rewrite(saved, tmp_path / "unknown.pt", model="no_such_package:build"), "cannot rebuild"),
    ]
    for path, message in cases:
        with pytest.raises(LoadError, match=message):
            load(path, confirm=lambda manifest: True)


def test_changed_contents_are_named_by_their_digests(saved, tmp_path):
    data = torch.load(saved, weights_only=True)
    name = next(iter(data["state_dict"]))
    tensor_changed = tmp_path / "tensor.pt"
    torch.save({**data, "state_dict": {**data["state_dict"], name: data["state_dict"][name] + 1}}, tensor_changed)
    manifest_changed = tmp_path / "manifest.pt"
    torch.save({**data, "seed": 1}, manifest_changed)
    old_format = tmp_path / "version1.pt"
    torch.save({key: value for key, value in data.items() if "digest" not in key} | {"version": 1}, old_format)
    for path, message in [(tensor_changed, f"tensor {name!r} differs"), (manifest_changed, "its manifest does not"),
                          (old_format, "version 1, which carries no digests")]:
        with pytest.raises(LoadError, match=message):
            load(path, confirm=lambda manifest: True)


def _damage(data: bytes, draw) -> bytes:
    """``data`` with bytes flipped, cut off, or a run of it copied over another place."""
    how = draw(st.sampled_from(["flip", "truncate", "splice"]))
    damaged = bytearray(data)
    if how == "flip":
        for _ in range(draw(st.integers(1, 20))):
            damaged[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    elif how == "truncate":
        del damaged[draw(st.integers(0, len(data) - 1)):]
    else:
        length = draw(st.integers(1, 4096))
        source, target = (draw(st.integers(0, len(data) - 1)) for _ in range(2))
        damaged[target:target + length] = data[source:source + length]
    return bytes(damaged)


@given(st.data())
def test_a_damaged_save_loads_exactly_or_raises_a_clear_error(saved, tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "damaged.pt"
    path.write_bytes(_damage(saved.read_bytes(), data.draw))
    expected = torch.load(saved, weights_only=True)["state_dict"]
    try:
        loaded = load(path, confirm=lambda manifest: True)
    except FxReduceError:
        return
    state = loaded.graph_module.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[key], expected[key]) for key in state)


@given(st.data())
def test_a_damaged_calibration_file_loads_exactly_or_raises_a_clear_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "calibration.pt"
    batch = (torch.randn(4, 3, 8, 8), torch.randn(4, 10))
    torch.save(batch, path)
    path.write_bytes(_damage(path.read_bytes(), data.draw))
    try:
        loaded = load_tensors(path, error=InputError, what="calibration file", fix="save it again")
    except InputError:
        return
    assert all(torch.equal(a, b) for a, b in zip(loaded, batch, strict=True))


def test_the_cli_reports_a_damaged_save_in_one_line(saved, tmp_path, capsys):
    damaged = bytearray(saved.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    path = tmp_path / "damaged.pt"
    path.write_bytes(bytes(damaged))
    assert main(["inspect", str(path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "damaged" in error[0] and str(path) in error[0]


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"echo pwned > {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "marker"
    through_torch = tmp_path / "torch.pt"
    torch.save({"format": FORMAT, "version": 1, "payload": _Payload(marker)}, through_torch)
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps(_Payload(marker)))
    for path, message in [(through_torch, "would run code"), (plain, "refusing to load")]:
        with pytest.raises(LoadError, match=message):
            load(path, confirm=lambda manifest: True)
    assert not marker.exists()


def test_export_round_trips_and_needs_trust(built, tmp_path):
    path = tmp_path / "demo.pt2"
    manifest = Manifest("default", PIPELINE, built.shape.text, 0)
    export(path, built.graph_module, manifest=manifest)
    with pytest.raises(LoadError, match="may run code"):
        load_export(path)
    loaded = load_export(path, trusted=True, confirm=lambda m: True)
    assert loaded.manifest == manifest
    x = torch.randn(5, 3, 24, 40)
    torch.testing.assert_close(loaded.graph_module(x), built.graph_module(x))
    assert set(loaded.graph_module.meta["fxreduce"].symbolic) == {"N", "H", "W"}
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"not a zip archive")
    with pytest.raises(LoadError, match="not a readable torch.export file"):
        load_export(garbage, trusted=True)


def test_markdown_sections_are_replaced_or_appended_atomically(tmp_path):
    from fxreduce.serialization import write_markdown_section

    doc = tmp_path / "docs" / "results.md"
    write_markdown_section(doc, "A", "first", "# Results")
    write_markdown_section(doc, "B", "second", "# Results")
    write_markdown_section(doc, "A", "replaced\n", "# Results")
    assert doc.read_text() == "# Results\n\n## A\n\nreplaced\n\n## B\n\nsecond\n"
    assert [p.name for p in doc.parent.iterdir()] == ["results.md"]  # no temporary file left behind
