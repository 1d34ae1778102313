"""Count the assertions in the test suite, so a reorganisation can show it lost none.

An assertion is an ``assert`` statement, a call of a function whose name starts with ``assert`` (numpy's
``assert_allclose``, our own ``assert_*`` helpers), or a ``pytest.raises`` / ``pytest.warns`` check.
Usage: ``python tools/count_assertions.py [TESTS_DIR]`` prints the total and the count per file.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def _call_name(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return ""


def count_file(path: Path) -> int:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    n = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert):
            n += 1
        elif isinstance(node, ast.Call):
            name = _call_name(node)
            if name.startswith("assert") or name in ("raises", "warns"):
                n += 1
    return n


def count_tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): count_file(p) for p in sorted(root.rglob("*.py"))}


def main(argv: list[str]) -> int:
    root = Path(argv[1] if len(argv) > 1 else Path(__file__).resolve().parents[1] / "tests")
    counts = count_tree(root)
    for name, n in counts.items():
        if n:
            print(f"{n:6d}  {name}")
    print(f"{sum(counts.values()):6d}  total")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
