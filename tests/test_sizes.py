"""Size limits (issue 10): no class in proxy/ spans more than 250 lines and no module more than 500,
so that each stays one concern a reviewer can hold in mind. Split along a real seam when this fails.

Run as a script for the table of the largest: ``.venv/bin/python tests/test_sizes.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

PROXY = Path(__file__).resolve().parent.parent / "proxy"
MAX_CLASS_LINES = 250
MAX_MODULE_LINES = 500

# Over the limit for now, each with its owner and its next seam; remove the line with the split.
ALLOWED = {
    # 282 lines: the protocol over the package's parts (260 after the split, then room for spools
    # and the reserve); the access-time writer (into eviction.py) is the next seam.
    "proxy/tiers/disk/tier.py:DiskTier": "disk: the protocol over the package's parts",
    # Both grew past 250 with coalescing across instances (fleet); the Redis claim and wait could
    # move into a module of their own beside fill_locks.py.
    "proxy/store/composite.py:Composite": "fleet: 260 lines with the shared-cache wiring",
    "proxy/store/fills.py:Fills": "fleet: 265 lines with the cross-instance claim and spool room",
}


def sizes(package: Path = PROXY) -> dict[str, int]:
    """Lines per module ("proxy/x.py") and per class ("proxy/x.py:Class", nested ones too)."""
    found: dict[str, int] = {}
    for path in sorted(package.rglob("*.py")):
        name = path.relative_to(package.parent).as_posix()
        source = path.read_text()
        found[name] = len(source.splitlines())
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                # From the first decorator: a dataclass's decorator is part of what one reads.
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                found[f"{name}:{node.name}"] = node.end_lineno - first + 1
    return found


def over(found: dict[str, int]) -> dict[str, int]:
    return {
        name: lines for name, lines in found.items() if lines > (MAX_CLASS_LINES if ":" in name else MAX_MODULE_LINES)
    }


def test_no_class_over_250_lines_and_no_module_over_500() -> None:
    found = sizes()
    assert len(found) > 50 and any(":" in name for name in found)  # it did read the package
    assert {name: lines for name, lines in over(found).items() if name not in ALLOWED} == {}


def test_every_allowance_is_still_needed() -> None:
    """An allowance outliving its split would let the next growth pass unseen."""
    assert sorted(set(ALLOWED) - set(over(sizes()))) == []


def test_the_limits_catch_a_long_class_and_module(tmp_path: Path) -> None:
    package = tmp_path / "proxy"
    (package / "sub").mkdir(parents=True)
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_CLASS_LINES - 2))
    (package / "sub" / "short.py").write_text(f"@decorated\nclass Fits:\n{body}\n")  # 250 lines
    nested = "\n".join(f"        x{i} = {i}" for i in range(MAX_CLASS_LINES))
    (package / "long.py").write_text(f"class Outer:\n    class Inner:\n{nested}\n" + "\n" * MAX_MODULE_LINES)
    assert over(sizes(package)) == {
        "proxy/long.py": MAX_CLASS_LINES + 2 + MAX_MODULE_LINES,
        "proxy/long.py:Outer": MAX_CLASS_LINES + 2,
        "proxy/long.py:Inner": MAX_CLASS_LINES + 1,
    }


if __name__ == "__main__":
    for name, lines in sorted(sizes().items(), key=lambda item: -item[1])[:15]:
        print(f"{lines:5}  {name}")
