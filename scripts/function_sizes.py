"""Print every function in mlx_grpo/ longer than a limit (default 60 lines), longest first.

    uv run python scripts/function_sizes.py            # functions over 60 lines
    uv run python scripts/function_sizes.py --max 80   # exit status 1 if any is over 80

A function's length counts from its `def` line (decorators excluded) to its last line, so its
docstring and comments count too; nested functions count within their parent and on their own.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "mlx_grpo"


def function_sizes(root: Path) -> list[tuple[int, str]]:
    """(lines, "path:line name") of every function and method under root."""
    sizes = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                sizes.append((lines, f"{path.relative_to(root.parent)}:{node.lineno} {node.name}"))
    return sorted(sizes, reverse=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--over", type=int, default=60, help="List functions longer than this many lines.")
    parser.add_argument("--max", type=int, default=0, help="Exit with status 1 if any function is longer (0: never).")
    args = parser.parse_args(argv)
    sizes = function_sizes(ROOT)
    for lines, where in sizes:
        if lines > args.over:
            print(f"{lines:4d}  {where}")
    too_long = [where for lines, where in sizes if args.max and lines > args.max]
    if too_long:
        print(f"{len(too_long)} function(s) over {args.max} lines", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
