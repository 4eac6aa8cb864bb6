"""The docs' examples run as written: the pass of docs/writing-a-pass.md, from its files, on the CLI."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def saved_files(page: str) -> dict[str, str]:
    """The files a page tells the reader to save: "... `name.py`:" followed by a python block."""
    return dict(re.findall(r"`(\w+\.py)`:\n\n```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S))


def fxreduce(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fxreduce", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture
def newcomer(tmp_path):
    files = saved_files("writing-a-pass.md")
    assert set(files) == {"lowrank_pass.py", "my_models.py"}
    for name, code in files.items():
        (tmp_path / name).write_text(code)
    return tmp_path


@pytest.mark.slow
def test_the_pass_written_from_the_guide_runs_from_the_cli(newcomer):
    listed = fxreduce(newcomer, "--import", "lowrank_pass.py", "passes")
    assert listed.returncode == 0, listed.stderr
    assert "lowrank_linear: replace each Linear by its rank-r truncated SVD" in listed.stdout
    spec = "lowrank_linear(rank=8)"
    applied = fxreduce(newcomer, "--import", "lowrank_pass.py", "apply", "my_models.py:mlp", "--input-shape", "N,64",
                       "--pipeline", spec, "--no-measure")
    assert applied.returncode == 0, applied.stderr
    guide = (DOCS / "writing-a-pass.md").read_text()
    for line in applied.stdout.splitlines():
        if "rewrite(s)" in line or "->" in line or "left alone" in line:
            assert line in guide, line
    verified = fxreduce(newcomer, "--import", "lowrank_pass.py", "verify", "my_models.py:mlp", "--input-shape",
                        "N,64", "--pipeline", spec)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "every contract holds" in verified.stdout


def test_without_the_import_the_cli_names_the_unknown_pass(newcomer):
    result = fxreduce(newcomer, "apply", "my_models.py:mlp", "--input-shape", "N,64", "--pipeline", "lowrank_linear")
    assert result.returncode == 2
    assert "unknown pass 'lowrank_linear'" in result.stderr


def test_an_import_that_does_not_exist_is_a_clear_error(newcomer):
    result = fxreduce(newcomer, "--import", "no_such_file.py", "passes")
    assert result.returncode == 2
    assert "no such file 'no_such_file.py' at --import" in result.stderr
