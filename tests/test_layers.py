"""Imports run downwards only: algorithms < rewards < data_pipelines < train (models < run < workers < the recipes and
train.eval).

Every .py file under the four packages is parsed with ``ast`` (imports inside functions included, and
``importlib.import_module("...")`` with a literal name); an import of a higher layer, or of a sibling recipe of
the same layer, fails with the file, the line and the import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Bottom to top; units in one layer may not import each other (the recipes share code through lower layers).
LAYERS = [
    ("algorithms",),
    ("rewards",),
    ("data_pipelines",),
    ("train.models",),
    ("train.run",),
    ("train.workers",),
    ("train.sft", "train.rl", "train.synthesis", "train.eval"),
    ("train",),  # train/__init__.py, train/__main__.py: the entry point that picks a recipe
]
LAYER_OF = {unit: level for level, units in enumerate(LAYERS) for unit in units}
ORDER = " < ".join("{" + ", ".join(units) + "}" if len(units) > 1 else units[0] for units in LAYERS)


def _unit(module: str) -> str | None:
    """The layer unit a dotted module name belongs to (longest prefix in LAYERS), None outside the packages."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYER_OF:
            return ".".join(parts[:n])
    return None


def _module_of(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _exists(module: str) -> bool:
    base = REPO.joinpath(*module.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _imported(tree: ast.AST, module: str, is_package: bool):
    """(line, imported module) for every import in ``tree`` of the file whose module is ``module``."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's package, one level up per extra dot
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                name = f"{base}.{alias.name}"
                yield node.lineno, name if _exists(name) else base
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            yield node.lineno, node.args[0].value


def _files() -> list[Path]:
    return sorted(p for top in ("algorithms", "rewards", "data_pipelines", "train") for p in (REPO / top).rglob("*.py"))


def upward_imports() -> list[str]:
    problems = []
    for path in _files():
        module = _module_of(path)
        unit = _unit(module)
        rel = path.relative_to(REPO)
        if unit == "train" and path.name not in ("__init__.py", "__main__.py"):
            problems.append(f"{rel}: not in a train/ subpackage of LAYERS (tests/test_layers.py): put it in the "
                            "subpackage of its role, or add a subpackage to LAYERS at its layer")
            continue
        source = path.read_text()
        lines = source.splitlines()
        for lineno, target in _imported(ast.parse(source, str(rel)), module, path.name == "__init__.py"):
            other = _unit(target)
            if other is None or other == unit or unit == "train":
                continue
            if LAYER_OF[other] >= LAYER_OF[unit]:
                kind = "a sibling" if LAYER_OF[other] == LAYER_OF[unit] else "a higher layer"
                problems.append(f"{rel}:{lineno}: `{lines[lineno - 1].strip()}` imports {target} ({kind}: {other}) "
                                f"from {unit}; imports run {ORDER}: move the code that needs it up, or pass it in")
    return problems


def test_every_package_file_is_parsed():
    files = _files()
    assert len(files) > 50 and all(f.suffix == ".py" for f in files)
    assert {_unit(_module_of(f)) for f in files} == set(LAYER_OF)


def test_imports_run_downwards_only():
    problems = upward_imports()
    assert not problems, "upward imports:\n" + "\n".join(problems)


@pytest.mark.parametrize("source, expected", [
    ("def f():\n    from train.models.forward import is_ssm\n", "train.models.forward"),
    ("import importlib\nimportlib.import_module('train.workers.actors')\n", "train.workers.actors"),
    ("from ..arithmetic import FILLER_SENTENCES\n", "data_pipelines.arithmetic"),
])
def test_the_parser_sees_imports_inside_functions_and_by_name(source, expected):
    found = [name for _, name in _imported(ast.parse(source), "data_pipelines.synthesis.stage", False)]
    assert expected in found
