"""An artifact's code version, derived from the source that builds it.

``code_version("phases.cognate")`` hashes every module of the package plus every module of this repo
that they import, transitively (within ``phases`` and ``storage``: what tasks and flows add is
orchestration, and the store's recipe already names its inputs and config). Each module counts by its
syntax tree with docstrings dropped, so whitespace, comments and docs never change an id, while any
change to what the code does does.

Why the import closure and not a fixed list of folders: it follows the code. Quiet-STaR's thoughts run
through the Cognate model, so a change in ``phases/cognate`` gives Quiet-STaR's artifacts new ids too;
a change in ``phases/quietstar`` leaves Cognate's untouched, because Cognate imports none of it.
Descendants change anyway, since a recipe's key contains its inputs' ids. Imports under
``if TYPE_CHECKING:`` never run, so they do not count.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterator
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OWN_PACKAGES = ("phases", "storage")


def _executed(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node but the bodies of ``if TYPE_CHECKING:`` blocks."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            for child in node.orelse:
                yield child
                yield from _executed(child)
            continue
        yield node
        yield from _executed(node)


def _without_docstrings(tree: ast.Module) -> ast.Module:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


class SourceTree:
    """The own modules under ``root`` and the imports between them."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def file(self, module: str) -> Path | None:
        base = self.root.joinpath(*module.split("."))
        for path in (base.with_suffix(".py"), base / "__init__.py"):
            if path.is_file():
                return path
        return None

    def package_modules(self, package: str) -> list[str]:
        directory = self.root.joinpath(*package.split("."))
        if not directory.is_dir():
            return [package] if self.file(package) else []
        return sorted(".".join(p.relative_to(self.root).with_suffix("").parts).removesuffix(".__init__")
                      for p in directory.rglob("*.py"))

    def imports(self, module: str) -> set[str]:
        """Own modules that ``module`` imports (``from a.b import c`` may name module a.b.c or a name in a.b)."""
        path = self.file(module)
        if path is None:
            return set()
        package_parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        found: set[str] = set()
        for node in _executed(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                parts = package_parts[: len(package_parts) - node.level + 1] if node.level else []
                base = ".".join(parts + ([node.module] if node.module else []))
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
        modules = {m for m in found if m.split(".")[0] in OWN_PACKAGES and self.file(m) is not None}
        # importing a.b.c runs a/__init__.py and a/b/__init__.py first
        return modules | {".".join(m.split(".")[:i]) for m in modules for i in range(1, m.count(".") + 1)}

    def closure(self, package: str) -> list[str]:
        """Every own module that building with ``package`` may execute, sorted."""
        todo = self.package_modules(package) + [".".join(package.split(".")[:i]) for i in range(1, package.count(".") + 1)]
        seen: set[str] = set()
        while todo:
            m = todo.pop()
            if m in seen or self.file(m) is None:
                continue
            seen.add(m)
            todo.extend(self.imports(m) - seen)
        return sorted(seen)

    def version(self, package: str) -> str:
        """A 16-hex-digit digest of the normalised source of ``closure(package)``."""
        h = hashlib.sha256()
        for module in self.closure(package):
            path = self.file(module)
            tree = _without_docstrings(ast.parse(path.read_text(), filename=str(path)))
            h.update(module.encode() + b"\0" + ast.dump(tree, annotate_fields=False).encode() + b"\0")
        return h.hexdigest()[:16]


@cache
def code_version(package: str) -> str:
    """This checkout's code version of ``package`` (computed once per process)."""
    return SourceTree(ROOT).version(package)
