"""The modules setup.py compiles with mypyc: each can be, and an install compiles them all or none."""

from __future__ import annotations

import ast
import importlib
import tomllib
from pathlib import Path

import pytest

from poolgate.compiled import compiled_modules

ROOT = Path(__file__).parents[2]
LISTED: list[str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["poolgate"]["compiled"]
MODULES = sorted(path.removesuffix(".py").replace("/", ".") for path in LISTED)


@pytest.mark.parametrize("name", MODULES)
def test_a_compiled_module_defines_no_class_whose_options_mypyc_would_drop(name: str) -> None:
    # Compiled, a msgspec Struct lost `frozen=True` (unhashable, mutable), `gc=False` and `omit_defaults` (a
    # routing trace grew every default), and its field types (a tools list decoded to no web search): mypyc
    # keeps neither class keywords nor the annotations such a class is read by.
    source = ast.parse((ROOT / "src" / name.replace(".", "/")).with_suffix(".py").read_text())
    with_options = [node.name for node in ast.walk(source) if isinstance(node, ast.ClassDef) and node.keywords]
    assert with_options == []
    module = importlib.import_module(name)
    defined = [value for value in vars(module).values() if isinstance(value, type) and value.__module__ == name]
    # Every class the source defines at its top is looked at (a module may define none).
    assert {cls.__name__ for cls in defined} >= {node.name for node in source.body if isinstance(node, ast.ClassDef)}
    plain = ("type", "ABCMeta", "_ProtocolMeta")  # (pydantic's metaclass derives from ABCMeta: named, not tested by)
    assert [cls.__name__ for cls in defined if type(cls).__name__ not in plain] == []


def test_an_install_compiles_every_listed_module_or_none() -> None:
    # Half a build (a module listed but not compiled, or one compiled but no longer listed) is a build nobody
    # measured: setup.py's fallback leaves all of them as Python.
    assert compiled_modules() in ([], MODULES)
