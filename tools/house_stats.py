"""The shape of the house: largest files and functions, and the imports between the top-level
packages (each edge with how many modules make it). Reads the sources with `ast`; imports nothing.

  python tools/house_stats.py [--top 10]
"""

from __future__ import annotations

import argparse
import ast
import collections
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("contract", "models", "runtime_py", "verify", "export")


def sources():
    for pkg in PACKAGES:
        base = ROOT / pkg
        if base.is_dir():
            yield from sorted(base.rglob("*.py"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args(argv)
    files, functions, edges = [], [], collections.defaultdict(set)
    for path in sources():
        rel = path.relative_to(ROOT)
        text = path.read_text()
        tree = ast.parse(text)
        files.append((len(text.splitlines()), str(rel)))
        here = rel.parts[0]
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{rel}::{node.name}"))
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in PACKAGES and top != here:
                    edges[(here, top)].add(str(rel))
    print(f"{'lines':>6}  largest files")
    for n, name in sorted(files, reverse=True)[:args.top]:
        print(f"{n:>6}  {name}")
    print(f"\n{'lines':>6}  largest functions")
    for n, name in sorted(functions, reverse=True)[:args.top]:
        print(f"{n:>6}  {name}")
    print(f"\n{'from':<11} {'imports':<11} modules")
    for (a, b), mods in sorted(edges.items()):
        print(f"{a:<11} {b:<11} {len(mods)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
