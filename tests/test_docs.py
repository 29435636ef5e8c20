"""The documents the code points users to: every repository path named in a string in src/ exists,
and docs/sweep.md's key tables are the spec schema's own (`reference()`)."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

from loraplan.sweeps.spec import reference

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "loraplan"
# a path inside the repository: docs/…, benchmarks/…, examples/… (a folder ends with '/')
REPO_PATH = re.compile(r"(?<![\w./-])((?:docs|benchmarks|examples)/[\w./-]*[\w/])")
BEGIN, END = "<!-- generated: loraplan.sweeps.spec.reference() -->\n", "<!-- end generated -->\n"


def named_paths() -> dict[str, list[str]]:
    """{path: [where]} for every repository path in a string constant (messages, help, docstrings)."""
    found: dict[str, list[str]] = {}
    for file in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for path in REPO_PATH.findall(node.value):
                    found.setdefault(path, []).append(f"{file.relative_to(ROOT)}:{node.lineno}")
    return found


def test_every_path_named_in_src_exists():
    found = named_paths()
    assert "docs/sweep.md" in found and "docs/sweep-dir.md" in found  # the scan sees messages and docstrings
    missing = {p: where for p, where in found.items() if not (ROOT / p).exists()}
    assert not missing, f"paths named in src/ that are not in the repository: {missing}"


def test_sweep_reference_is_the_schema():
    doc = ROOT / "docs" / "sweep.md"
    text = doc.read_text()
    head, begin, rest = text.partition(BEGIN)
    block, end, tail = rest.partition(END)
    assert begin and end, f"{doc} lost its generated block markers"
    if os.environ.get("LORAPLAN_WRITE_DOCS") and block != reference():
        doc.write_text(head + BEGIN + reference() + END + tail)
        block = reference()
    assert block == reference(), ("docs/sweep.md is out of date with the spec schema: "
                                  "LORAPLAN_WRITE_DOCS=1 pytest tests/test_docs.py rewrites it")
