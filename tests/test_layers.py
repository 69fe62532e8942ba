"""The import contract of the package: its layers, no cycles, and a light ``import sparta``.

Every import statement of every module of ``src/sparta`` counts, wherever it stands: at the
top, inside a function, under ``if TYPE_CHECKING:`` or in a ``try``; relative or absolute. A
unit (a subpackage, a top-level module, or ``sparta`` itself: its ``__init__``, the public API)
may import only units in lower layers. The units of one layer are independent of each other.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
import textwrap
import types
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

#: Top to bottom. ``sparta`` is the root package's ``__init__`` (the public API): the
#: applications may use it, the library below it may not.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("__main__",),
    ("cli",),
    ("app",),
    (
        "integrations",
    ),  # trainer callbacks: beside train in purpose, above it to use its DDP helpers
    ("train",),
    ("config",),
    ("sparta",),
    ("tasks",),
    ("pruning", "runtime"),
    ("measure", "wrapping"),
    ("heads", "masks"),
    ("adapters", "models", "data"),
    ("inputs", "io", "utils", "registry", "devices", "onnx_session", "outputs"),
    ("errors",),
)
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}

#: Third-party packages ``import sparta`` must not load (each is needed by some feature only,
#: and imported where that feature runs). True when this contract was written.
HEAVY = (
    "torch_pruning", "zennit", "transformers", "timm", "onnx", "onnxruntime", "onnxscript",
    "matplotlib", "sklearn", "typer", "rich", "tensorboard", "torchvision", "yaml",
    "lightning", "accelerate",
)  # fmt: skip


@dataclass(frozen=True)
class Import:
    path: str  # relative to src/, e.g. "sparta/pruning/pruner.py"
    line: int
    source: str  # importing module, dotted
    target: str  # imported module, dotted (the deepest that exists)

    @property
    def where(self) -> str:
        return f"src/{self.path}:{self.line}"


def _root() -> Path:
    spec = importlib.util.find_spec("sparta")  # finds it without importing it
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).parent


def _modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """``{dotted name: (file, is a package)}`` of every module of the package."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        if package:
            parts.pop()
        out[".".join(parts)] = (path, package)
    return out


def _targets(node: ast.AST, package: list[str], modules: dict) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = ".".join(package[: len(package) - node.level + 1])
        name = f"{base}.{node.module}" if node.module else base
    else:
        name = node.module or ""
    # ``from pkg import name``: the submodule pkg.name if there is one, else pkg itself
    return [f"{name}.{a.name}" if f"{name}.{a.name}" in modules else name for a in node.names]


def _deepest(name: str, modules: dict) -> str:
    while name not in modules and "." in name:
        name = name.rpartition(".")[0]
    return name


def imports_in(tree: ast.AST, name: str, is_package: bool, modules: dict, path: str):
    """Every import of ``sparta`` in ``tree`` (module ``name``), at any depth."""
    package = name.split(".") if is_package else name.split(".")[:-1]
    for node in ast.walk(tree):  # every statement, at any depth
        for target in _targets(node, package, modules):
            if target == "sparta" or target.startswith("sparta."):
                yield Import(path, node.lineno, name, _deepest(target, modules))


def package_imports() -> list[Import]:
    root = _root()
    modules = _modules(root)
    found = []
    for name, (path, is_package) in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        rel = path.relative_to(root.parent).as_posix()
        found += imports_in(tree, name, is_package, modules, rel)
    return list(dict.fromkeys(found))  # one per statement and target


def unit(module: str) -> str:
    """``sparta.pruning.pruner`` -> ``pruning``; ``sparta`` (the root package) -> ``sparta``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "sparta"


IMPORTS = package_imports()
UNITS = sorted({unit(i.source) for i in IMPORTS} | {unit(m) for m in _modules(_root())})


def _violations(of_unit: str) -> list[str]:
    out = []
    for imp in IMPORTS:
        src, dst = unit(imp.source), unit(imp.target)
        if src != of_unit or src == dst:
            continue
        if RANK[dst] <= RANK[src]:  # rank 0 is the top layer
            how = "same layer" if RANK[dst] == RANK[src] else "upward"
            out.append(f"{imp.where}: {imp.source} -> {imp.target} ({src} -> {dst}: {how})")
    return list(dict.fromkeys(out))


def test_every_unit_has_a_layer():
    """A new subpackage or top-level module needs a place in LAYERS."""
    missing = [u for u in UNITS if u not in RANK]
    assert not missing, f"units without a layer in tests/test_layers.py LAYERS: {missing}"


@pytest.mark.parametrize("name", [u for u in UNITS if u in RANK])
def test_imports_go_down_the_layers_only(name):
    bad = _violations(name)
    assert not bad, "imports against the layers (tests/test_layers.py LAYERS):\n" + "\n".join(bad)


def test_no_module_imports_its_own_package_api():
    """A subpackage's ``__init__`` sits on top of its modules: it may import them, they may not
    import it (``from . import name`` of a name defined there, ``from sparta.pkg import x``)."""
    modules = _modules(_root())
    bad = [
        f"{i.where}: {i.source} -> {i.target}"
        for i in IMPORTS
        if modules[i.target][1]  # the target is a package's __init__
        and i.target != "sparta"  # the root is a unit of its own (see LAYERS)
        and i.source.startswith(i.target + ".")
    ]
    assert not bad, "modules importing their own package's __init__:\n" + "\n".join(bad)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _where(a: str, b: str, key) -> list[str]:
    return [f"{i.where}: {i.source} -> {i.target}" for i in IMPORTS if key(i) == (a, b)]


def test_no_import_cycle_between_units():
    edges: dict[str, set[str]] = defaultdict(set)
    for i in IMPORTS:
        if unit(i.source) != unit(i.target):
            edges[unit(i.source)].add(unit(i.target))
    cycles = _cycles(edges)
    detail = [
        line
        for comp in cycles
        for a in comp
        for b in comp
        if b in edges[a]
        for line in _where(a, b, lambda i: (unit(i.source), unit(i.target)))
    ]
    assert not cycles, f"import cycles between units {cycles}:\n" + "\n".join(detail)


@pytest.mark.parametrize("name", UNITS)
def test_no_import_cycle_inside_a_unit(name):
    """Modules of one subpackage import each other without cycles too (an import inside a
    function does not hide one: it is counted)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for i in IMPORTS:
        if unit(i.source) == unit(i.target) == name and i.source != i.target:
            edges[i.source].add(i.target)
    cycles = _cycles(edges)
    detail = [
        line
        for comp in cycles
        for a in comp
        for b in comp
        if b in edges[a]
        for line in _where(a, b, lambda i: (i.source, i.target))
    ]
    assert not cycles, f"import cycles in {name}: {cycles}:\n" + "\n".join(detail)


def test_the_walk_sees_imports_everywhere():
    """A check of the checker: imports inside functions, under TYPE_CHECKING, in a try, relative
    and absolute, ``from package import submodule`` and ``from package import name``."""
    source = textwrap.dedent(
        """
        from typing import TYPE_CHECKING
        import torch
        from . import inputs
        if TYPE_CHECKING:
            from .pruning import Pruner
        def f():
            from .masks import alive_units
            import sparta.io
        class C:
            def g(self):
                try:
                    from sparta.pruning.groups import find_groups
                except ImportError:
                    from .wrapping import fuse
        """
    )
    modules = _modules(_root())
    found = list(imports_in(ast.parse(source), "sparta.measure", False, modules, "x.py"))
    assert [(i.line, i.target) for i in found] == [
        (4, "sparta.inputs"),
        (6, "sparta.pruning"),
        (8, "sparta.masks"),
        (9, "sparta.io"),
        (13, "sparta.pruning.groups"),
        (15, "sparta.wrapping"),
    ]
    assert [unit(i.target) for i in found] == [
        "inputs",
        "pruning",
        "masks",
        "io",
        "pruning",
        "wrapping",
    ]
    assert len(IMPORTS) > 200  # the package itself was walked


def test_import_sparta_stays_light():
    """``import sparta`` loads none of the optional or application-only packages."""
    code = "import json, sys, sparta; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    loaded = {name.partition(".")[0] for name in json.loads(out.stdout.splitlines()[-1])}
    heavy = sorted(loaded & set(HEAVY))
    assert not heavy, f"import sparta loads {heavy}: import them where the feature runs"
    apps = sorted(m for m in json.loads(out.stdout.splitlines()[-1]) if m.startswith(
        ("sparta.app", "sparta.cli", "sparta.train")))  # fmt: skip
    assert not apps, f"import sparta loads the applications: {apps}"


def test_no_public_name_shadows_a_module():
    """``sparta.<name>`` is one thing: no function or class of the public API hides a module
    or subpackage of the same name (``sparta.export.apply_task`` once failed so)."""
    import importlib.util

    import sparta

    hidden = [
        name
        for name in dir(sparta)
        if not name.startswith("_")
        and importlib.util.find_spec(f"sparta.{name}") is not None
        and not isinstance(getattr(sparta, name), types.ModuleType)
    ]
    assert not hidden, f"public names that hide a module of the same name: {hidden}"
