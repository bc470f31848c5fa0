"""The import layers of docs/ARCHITECTURE.md hold: a module imports only from its own layer or
the layers below it. Every import counts, the ones inside functions (lazy, for start-up cost)
and under TYPE_CHECKING included: those are where cycles hide.

Parsed with ast from the source files (nothing is imported), so a module that is not loaded by
any test is checked too. A module that fits no layer fails the test: add it to LAYERS.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rke2certd"

# Top to bottom. Each entry: layer name, then the patterns of the module paths (below
# `rke2certd.`) that belong to it. A pattern names a top-level module or package (`config`
# matches `config.py` and `config/...`); every pattern must match something.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("cli", (r"cli\w*", "__main__")),
    ("daemon", ("daemon",)),
    ("roles", ("roles",)),
    ("commands", ("commands",)),
    ("supervisor", ("supervisor",)),
    ("rollout", ("rollout",)),
    ("node", ("node",)),
    ("datastore", ("datastore",)),
    # the validated config is cached through files/private_cache.py: config sits above files
    ("config", ("config",)),
    ("files", ("files",)),
    # files/exposure.py logs its warning: the logger and its sinks sit below files
    ("log", ("log",)),
    ("plan", ("plan",)),  # the pure core: decisions (no clock, no disk) ...
    ("pki", ("pki",)),  # ... over certificate building blocks
    ("base", ("errors", "clock", "constants", "__init__")),
]


def _layer_of(module: str) -> int | None:
    """The index in LAYERS of `rke2certd.<module...>`, None when no layer claims it."""
    top = module.split(".")[1] if "." in module else "__init__"
    for i, (_, patterns) in enumerate(LAYERS):
        if any(re.fullmatch(p, top) for p in patterns):
            return i
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(dotted: str) -> bool:
    base = ROOT.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every rke2certd import in the file, at any depth."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return _imports(path.read_text(), package)


def _imports(text: str, package: str) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("rke2certd")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("rke2certd"):
                continue
            for alias in node.names:  # `from rke2certd.pki import token`: the submodule
                sub = f"{target}.{alias.name}"
                out.append((node.lineno, sub if _is_module(sub) else target))
    return out


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_has_a_layer() -> None:
    lost = [_module_name(p) for p in _sources() if _layer_of(_module_name(p)) is None]
    assert not lost, f"modules in no layer (add them to LAYERS in {__file__}): {lost}"


def test_every_layer_is_there() -> None:
    """A pattern that matches no module is a layer renamed without the table."""
    tops = {
        _module_name(p).split(".")[1] if "." in _module_name(p) else "__init__" for p in _sources()
    }
    empty = [
        p for _, patterns in LAYERS for p in patterns if not any(re.fullmatch(p, t) for t in tops)
    ]
    assert not empty, f"patterns in LAYERS that match no module: {empty}"


def test_imports_go_down_the_layers() -> None:
    wrong: list[str] = []
    for path in _sources():
        mine = _layer_of(_module_name(path))
        if mine is None:
            continue
        for line, target in imports_of(path):
            theirs = _layer_of(target)
            if target == "rke2certd" or theirs is None:
                theirs = len(LAYERS) - 1  # the package itself: __version__
            if theirs < mine:
                wrong.append(
                    f"{path.relative_to(ROOT)}:{line} ({LAYERS[mine][0]}) imports {target} "
                    f"({LAYERS[theirs][0]})"
                )
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_the_check_sees_lazy_and_relative_imports() -> None:
    """The parser itself: an import inside a function, under TYPE_CHECKING, relative, and a
    submodule named in `from package import module` are all found."""
    text = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from rke2certd.daemon import loop\n"
        "def f():\n    import rke2certd.cli\n    from . import rollout\n"
        "from rke2certd.pki import join_token\n"
    )
    found = {t for _, t in _imports(text, "rke2certd.plan")}
    assert found == {
        "rke2certd.daemon.loop",
        "rke2certd.cli",
        "rke2certd.plan.rollout",
        "rke2certd.pki.join_token",
    }
