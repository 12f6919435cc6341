"""A builtin English corpus that every Python install carries: the language reference
topics (pydoc_data) and the docstrings of the standard library. No download needed."""

from __future__ import annotations

import ast
import json
import os
import sysconfig
from pathlib import Path

_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo"}


def python_docs() -> list[str]:
    """Documents (>= 200 characters each) in a fixed, machine-independent order."""
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if _SKIP_DIRS & set(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree] + [
            n for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        ]
        text = "\n\n".join(d for n in nodes if (d := ast.get_docstring(n)))
        docs.append(text)
    return [d for d in docs if len(d) >= 200]


def write_python_docs_jsonl(path: str) -> str:
    """Write the builtin corpus as JSON lines {"text": ...} to `path` (atomically)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in python_docs():
            f.write(json.dumps({"text": doc}) + "\n")
    os.replace(tmp, path)
    return path
