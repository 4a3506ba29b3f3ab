"""The layering contract: imports inside `healer/` point only down the layers of ARCHITECTURE.md."""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from itertools import permutations
from pathlib import Path

import pytest

import healer

PACKAGE_DIR = Path(healer.__file__).resolve().parent

# Each row: a module prefix and its layer; a module takes the row of its longest matching prefix.
LAYERS: dict[int, tuple[str, tuple[str, ...]]] = {
    0: (
        "foundations",
        # healer.http: error bodies and request parsing that every route module shares; healer.auth: access
        # control, whose identity every route module that records who acted reads; healer.limits: the request
        # limits, whose body reader the webhook uses.
        (
            "healer",
            "healer.durations",
            "healer.types",
            "healer.matchers",
            "healer.logs",
            "healer.config",
            "healer.http",
            "healer.auth",
            "healer.limits",
        ),
    ),
    1: (
        "domain",
        (
            "healer.healing.model",
            "healer.healing.rules",
            "healer.healing.payload",
            "healer.planner.model",
            "healer.optimizer.model",
        ),
    ),
    2: ("storage", ("healer.storage",)),
    3: (
        "clients and actions",
        (
            "healer.promql",
            "healer.alertmanager",
            "healer.annotations",
            "healer.upstreams",
            "healer.exporter",
            "healer.strategies",
            "healer.cycles",
        ),
    ),
    4: ("healing", ("healer.healing",)),
    5: ("goals and optimisation", ("healer.planner", "healer.optimizer")),
    6: ("serving", ("healer.status", "healer.server", "healer.console")),
    7: ("entry points", ("healer.cli", "healer.demo", "healer.__main__")),
}
# The row `healer` stands for the package's __init__ alone, not for everything below it.
ONLY_ITSELF = frozenset({"healer"})
# Independent of each other in both directions, whatever the layers of their modules.
SIBLINGS = ("healer.planner", "healer.optimizer")
# Only storage speaks to a database.
DATABASE_DRIVERS = ("sqlite3", "psycopg", "psycopg2", "asyncpg", "aiosqlite")
STORAGE = "healer.storage"


@dataclass(frozen=True)
class Module:
    """One module's source; `is_package` when it is a package's `__init__`."""

    name: str
    source: str
    is_package: bool = False


def _within(name: str, prefix: str) -> bool:
    return name == prefix or (prefix not in ONLY_ITSELF and name.startswith(prefix + "."))


def layer_of(name: str) -> int | None:
    """The layer of the longest prefix in LAYERS that covers `name`, or None when no row does."""
    matches = [
        (len(prefix), layer) for layer, (_, prefixes) in LAYERS.items() for prefix in prefixes if _within(name, prefix)
    ]
    return max(matches)[1] if matches else None


def _describe(name: str, layer: int) -> str:
    return f"{name} ({layer} {LAYERS[layer][0]})"


def _imports(module: Module, known: frozenset[str]) -> Iterator[tuple[int, str]]:
    """Every module `module` imports, with its line, at any depth (functions, TYPE_CHECKING blocks)."""
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    for node in ast.walk(ast.parse(module.source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # `from . import x` is relative to the package; each further dot climbs one level.
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            for alias in node.names:
                # `from healer.healing import engine` imports the submodule; `from healer.config import X` a name.
                submodule = f"{source}.{alias.name}"
                yield node.lineno, submodule if submodule in known else source


def _importer_layer(module: Module, layer: int, names: frozenset[str]) -> int:
    """A package's __init__ runs whenever any module below it is imported, so it answers to the lowest of them."""
    if not module.is_package:
        return layer
    below = [layer_of(name) for name in names if name.startswith(module.name + ".")]
    return min([layer, *(found for found in below if found is not None)])


def violations(modules: Mapping[str, Module]) -> list[str]:
    """Every breach of the contract in `modules`: one line per unplaced module and per offending import."""
    names = frozenset(modules)
    found: list[str] = []
    for name in sorted(names):
        module = modules[name]
        own = layer_of(name)
        if own is None:
            found.append(f"{name}: no row of LAYERS covers this module; place it in a layer")
            continue
        importer = _importer_layer(module, own, names)
        for line, target in sorted(set(_imports(module, names))):
            where = f"{name}:{line}"
            if target.split(".")[0] in DATABASE_DRIVERS and not _within(name, STORAGE):
                found.append(f"{where}: imports the database driver {target}; only {STORAGE} may")
            if target.split(".")[0] != "healer":
                continue
            target_layer = layer_of(target)
            if target_layer is not None and target_layer > importer:
                found.append(
                    f"{where}: {_describe(name, importer)} imports {_describe(target, target_layer)}, a higher layer"
                )
            if any(_within(name, one) and _within(target, other) for one, other in permutations(SIBLINGS, 2)):
                found.append(f"{where}: {name} imports {target}; {' and '.join(SIBLINGS)} are independent")
    return found


def tree_modules(root: Path = PACKAGE_DIR) -> dict[str, Module]:
    """Every module of the `healer` package on disk, by dotted name."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        modules[name] = Module(name, path.read_text(), is_package)
    return modules


def test_healer_imports_point_only_down_the_layers() -> None:
    """Every module of healer/ has a layer and imports nothing above it, nor its sibling, nor a database driver."""
    found = violations(tree_modules())
    assert not found, "layering violations:\n" + "\n".join(found)


def synthetic(**sources: str) -> dict[str, Module]:
    """Modules from keyword arguments: `healer__x=...` is module healer.x; `__init` marks a package's __init__."""
    modules = {}
    for key, source in sources.items():
        is_package = key.endswith("__init")
        name = key.removesuffix("__init").replace("__", ".")
        modules[name] = Module(name, source, is_package)
    return modules


@pytest.mark.parametrize(
    ("modules", "expected"),
    [
        pytest.param(
            synthetic(healer__config="import healer.healing.engine\n", healer__healing__engine=""),
            [
                "healer.config:1: healer.config (0 foundations) imports healer.healing.engine (4 healing),"
                " a higher layer"
            ],
            id="upward",
        ),
        pytest.param(
            synthetic(
                healer__healing__model=(
                    "from typing import TYPE_CHECKING\n"
                    "def f() -> None:\n"
                    "    if TYPE_CHECKING:\n"
                    "        from .engine import Engine\n"
                ),
                healer__healing__engine="from healer.healing.model import f\nfrom healer.config import HealerConfig\n",
            ),
            [
                "healer.healing.model:4: healer.healing.model (1 domain) imports healer.healing.engine (4 healing),"
                " a higher layer"
            ],
            id="relative-in-function-under-type-checking",
        ),
        pytest.param(
            synthetic(
                healer__healing__init="from healer.healing import engine\n",
                healer__healing__engine="",
                healer__healing__model="",
            ),
            ["healer.healing:1: healer.healing (1 domain) imports healer.healing.engine (4 healing), a higher layer"],
            id="package-init-answers-to-its-lowest-module",
        ),
        pytest.param(
            synthetic(healer__planner__planner="from healer.optimizer.model import Trial\n"),
            [
                "healer.planner.planner:1: healer.planner.planner imports healer.optimizer.model;"
                " healer.planner and healer.optimizer are independent"
            ],
            id="siblings",
        ),
        pytest.param(
            synthetic(healer__healing__engine="import sqlite3\n", healer__storage__sqlite="import sqlite3\n"),
            ["healer.healing.engine:1: imports the database driver sqlite3; only healer.storage may"],
            id="database-driver",
        ),
        pytest.param(
            synthetic(
                healer__gadgets="", healer__cli="from healer.server import serve\nfrom healer import __version__\n"
            ),
            ["healer.gadgets: no row of LAYERS covers this module; place it in a layer"],
            id="unplaced-module",
        ),
    ],
)
def test_checker_reports_each_kind_of_breach(modules: dict[str, Module], expected: list[str]) -> None:
    """The checker reports exactly the breach planted in a small in-memory set of modules, and nothing else."""
    assert violations(modules) == expected
