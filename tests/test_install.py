"""pyproject declares the torch range the suite runs on, so installing fxreduce beside a torch in that range
keeps it: pip's resolver (a dry run, nothing installed) plans to install fxreduce alone."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(importlib.util.find_spec("pip") is None or importlib.util.find_spec("setuptools") is None,
                    reason="pip and setuptools are needed to resolve the install")
def test_installing_beside_this_torch_downloads_no_other_torch(tmp_path):
    report = tmp_path / "report.json"
    subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-build-isolation", "--no-index",
                    "--quiet", "--report", str(report), f"{ROOT}[test]"], check=True, capture_output=True, text=True)
    planned = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert planned == {"fxreduce"}, planned
