"""Which project files each stage script runs: the script and the ``common/`` modules it imports,
directly or through other modules (imports inside functions included). The Makefile reruns a
stage when one of them changes, so ``make all`` after a code edit never keeps artifacts made by
the old code. Standard library only: it runs before the virtual environment exists.

``python -m common.deps --out .make/deps.mk`` writes ``CODE_00 := 00_clean_data.py common/...``
lines, one per stage.
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "common"


def imported_modules(path: Path) -> set[str]:
    """Names of the ``common`` modules a file imports anywhere in it.

    >>> import tempfile; p = Path(tempfile.mkdtemp()) / "s.py"
    >>> _ = p.write_text("from common.io import x\\nimport common.paths, os\\ndef f():\\n    from common import tables\\n")
    >>> sorted(imported_modules(p))
    ['io', 'paths', 'tables']
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    in_package = path.parent.name == PACKAGE
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith(PACKAGE + ".")}
        elif isinstance(node, ast.ImportFrom):
            relative = node.level == 1 and in_package
            if node.module == PACKAGE or (relative and node.module is None):
                out |= {a.name for a in node.names}               # from common import tables
            elif node.module and (node.module.startswith(PACKAGE + ".") or relative):
                out.add(node.module.split(".")[-1 if relative else 1])  # from common.io / from .io import x
    return out


def closure(script: Path) -> list[str]:
    """The script and every ``common/`` file it reaches through imports, as paths relative to ROOT."""
    seen, todo = set(), [script]
    while todo:
        path = todo.pop()
        for name in imported_modules(path):
            mod = ROOT / PACKAGE / f"{name}.py"
            if mod.exists() and mod not in seen:
                seen.add(mod)
                todo.append(mod)
    init = ROOT / PACKAGE / "__init__.py"
    files = [script, *sorted(seen | ({init} if init.exists() else set()))]
    return [str(p.relative_to(ROOT)) for p in files]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="makefile fragment to write")
    args = ap.parse_args(argv)
    lines = ["# written by python -m common.deps; one line per stage: the files whose change reruns it"]
    for script in sorted(ROOT.glob("[0-9][0-9]_*.py")):
        lines.append(f"CODE_{script.name[:2]} := {' '.join(closure(script))}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
