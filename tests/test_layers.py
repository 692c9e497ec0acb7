"""Imports go one way, flows -> tasks -> phases, storage, so each layer stays testable alone; phases never
import Prefect."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _imports(package: str) -> dict[str, set[str]]:
    out = {}
    for path in (REPO / package).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(REPO))] = names
    return out


@pytest.mark.parametrize(
    "package,forbidden",
    [("phases", {"prefect", "flows", "tasks", "wandb"}), ("storage", {"prefect", "flows", "tasks", "phases", "torch"}),
     ("tasks", {"flows"})],
)
def test_imports_go_one_way(package, forbidden):
    files = _imports(package)
    assert files, f"no modules found in {package}"
    bad = {f: sorted(n & forbidden) for f, n in files.items() if n & forbidden}
    assert not bad, f"{package} imports what it must not: {bad}"


def _is_call(node: ast.AST, module: str, attr: str) -> bool:
    f = getattr(node, "func", None)
    return isinstance(node, ast.Call) and isinstance(f, ast.Attribute) and f.attr == attr \
        and isinstance(f.value, ast.Name) and f.value.id == module


def test_no_pickle_loading_from_disk():
    checked = 0
    for pkg in ("flows", "tasks", "phases", "storage", "bench"):
        for path in (REPO / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                assert not _is_call(node, "pickle", "load") and not _is_call(node, "pickle", "loads"), path
                if _is_call(node, "torch", "load"):
                    checked += 1
                    safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords)
                    assert safe, f"{path}:{node.lineno}: load without weights_only=True"
    assert checked >= 1  # the checkpoint loader is among them: the check looks at real calls


def test_phases_common_sits_below_every_phase_and_the_pipeline_config():
    """phases/common is the floor: a phase may import it, never the other way round (imports under
    ``if TYPE_CHECKING:`` never run and do not count)."""
    from tasks.code_version import SourceTree

    tree = SourceTree(REPO)
    above = ("phases.config", "phases.data", "phases.cognate", "phases.evomerge", "phases.quietstar", "phases.bitnet")
    for module in tree.package_modules("phases.common"):
        bad = sorted(m for m in tree.imports(module) if m.startswith(above))
        assert not bad, f"{module} imports {bad}"
