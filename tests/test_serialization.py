"""Saved rewrites: plain data only, written atomically, shown before anything is imported, rebuilt exactly,
and every bad file (missing, corrupt, foreign, tampered, code-running) refused with a LoadError."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import pytest
import torch

from fxreduce.errors import InputError, LoadError
from fxreduce.serialization import FORMAT, Manifest, build, export, load, load_export, save

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
    assert data["format"] == FORMAT and data["version"] == 1
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
    data = torch.load(saved, weights_only=True)
    data.update(changes)
    torch.save(data, path)
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
        (tmp_path / "missing.pt", "no such file"),
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
