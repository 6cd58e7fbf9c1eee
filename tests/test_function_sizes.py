"""scripts/function_sizes.py: long functions are found, measured from `def` to their last line."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import function_sizes  # noqa: E402


def test_long_functions_and_methods_are_measured(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    body = "\n".join(f"    x{i} = {i}" for i in range(70))
    (package / "a.py").write_text(f"def long():\n{body}\n\n\ndef short():\n    return 1\n")
    (package / "sub" / "b.py").write_text("class C:\n    async def method(self):\n        pass\n")
    sizes = dict((where, lines) for lines, where in function_sizes.function_sizes(package))
    assert sizes == {"pkg/a.py:1 long": 71, "pkg/a.py:74 short": 2, "pkg/sub/b.py:2 method": 2}


def test_the_limit_sets_the_exit_status(tmp_path, monkeypatch, capsys):
    package = tmp_path / "pkg"
    package.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(90))
    (package / "a.py").write_text(f"def long():\n{body}\n")
    monkeypatch.setattr(function_sizes, "ROOT", package)
    assert function_sizes.main(["--max", "80"]) == 1
    out = capsys.readouterr()
    assert "  91  pkg/a.py:1 long" in out.out and "1 function(s) over 80 lines" in out.err
    assert function_sizes.main(["--max", "100"]) == 0
