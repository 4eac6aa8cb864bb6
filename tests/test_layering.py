"""The architecture's rules, checked on the source: private names stay private, meta keys have one home."""

import ast
import re
from pathlib import Path

import fxreduce

PACKAGE = Path(fxreduce.__file__).parent
SOURCES = sorted(PACKAGE.rglob("*.py"))
EXTENSIONS = {"_C"}  # compiled modules are imported by their (underscored) module name


def test_no_module_imports_a_private_name_from_another():
    imports = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            internal = node.level > 0 or (node.module or "").startswith("fxreduce")
            for alias in node.names:
                private = alias.name.startswith("_") and not alias.name.endswith("__")
                if internal and private and alias.name not in EXTENSIONS:
                    imports.append(f"{path.relative_to(PACKAGE)}:{node.lineno} imports {alias.name}")
    assert imports == []


def test_the_node_meta_key_is_spelled_only_in_its_home():
    spelled = re.compile(r"""meta\s*(\[|\.get\(|\.setdefault\(|\.pop\()\s*["']fxreduce|["']fxreduce_(rewritten|replaced|details|removed)""")
    found = [f"{path.relative_to(PACKAGE)}:{number}" for path in SOURCES if path.name != "meta.py"
             for number, line in enumerate(path.read_text().splitlines(), 1) if spelled.search(line)]
    assert found == []


def test_the_check_above_sees_a_literal_key():
    line = 'shape = node.meta.get("fxreduce").shape'
    assert re.search(r"""meta\s*(\[|\.get\()\s*["']fxreduce""", line)
