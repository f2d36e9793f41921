"""The README's layout section names every module of the package, so it cannot fall behind the tree."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_readme_layout_names_every_module() -> None:
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("### Layout") :]
    layout = layout[: layout.index("\n## ")]
    named = set(re.findall(r"[\w]+\.py", layout))
    modules = {path.name for path in (ROOT / "proxy").rglob("*.py") if path.name not in {"__init__.py", "__main__.py"}}
    assert modules - named == set(), "modules the README's layout section does not name"
