"""The package layout is the architecture: arrows point down only, and nothing below the
application imports the demo zoo (every import counts, including those inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "rankdown"

# Bottom to top; a module may import its own level or any level below.
LEVELS = [
    {"errors", "progress", "storage", "probe", "surgery", "decompose"},
    {"layers"},
    {"methods"},
    {"models"},
    {"data"},
    {"measurement"},
    {"fitting"},
    {"planning"},
    {"training"},
    {"deployment"},
    {"workload"},
    {"app", "zoo"},
]
LEVEL = {unit: i for i, units in enumerate(LEVELS) for unit in units}


def unit_of(module: str) -> str | None:
    """``rankdown.planning.plan`` → ``planning``; the top-level facade is ``None``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "rankdown" else None


def rankdown_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "rankdown":  # from rankdown import decompose
                found += [f"rankdown.{a.name}" for a in node.names if a.name != "__version__"]
            elif node.module.startswith("rankdown."):
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("rankdown.")]
    return found


MODULES = sorted(p for p in SRC.rglob("*.py") if p.parent != SRC or p.name not in ("__init__.py", "__main__.py"))


def test_every_unit_has_a_level():
    units = {unit_of("rankdown." + ".".join(p.relative_to(SRC).with_suffix("").parts)) for p in MODULES}
    assert units <= set(LEVEL), units - set(LEVEL)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down(path):
    own = unit_of("rankdown." + ".".join(path.relative_to(SRC).with_suffix("").parts))
    assert own is not None
    for target in rankdown_imports(path):
        unit = unit_of(target)
        assert unit in LEVEL, f"{path.name} imports {target}, which has no level"
        if unit == own:
            continue
        assert LEVEL[unit] <= LEVEL[own], f"{path.relative_to(SRC)} ({own}) imports {target} ({unit}): an arrow up"
        if own != "app":
            assert unit != "zoo", f"{path.relative_to(SRC)} imports the demo zoo ({target})"
        assert unit != "app" or own == "app", f"{path.relative_to(SRC)} imports the application ({target})"
