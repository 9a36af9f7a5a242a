"""The build: pyproject.toml holds the project; this adds the modules compiled to C with mypyc.

The per-request decisions of admission and pricing (budgets, quotas, prices) are plain Python whose cost is
mostly the interpreter's: compiled, the same source adds a third fewer instructions to a request (bench/RESULTS.md,
"Instructions per request"). The modules are listed in pyproject.toml (`[tool.poolgate] compiled`).
Compiling needs a C compiler and Python's headers; without them, or with POOLGATE_PURE_PYTHON=1 set, the
build installs the same modules as Python and says so.

A compiled module holds no msgspec Struct or pydantic model: mypyc drops a class's options (`frozen`,
`gc=False`, `omit_defaults`) and its field types, which msgspec decodes by. And an editable install
(`pip install -e .`) places the compiled modules next to their sources, where they take precedence: after
editing one, install again (the tests refuse to run on a compiled module older than its source).
"""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

COMPILED: list[str] = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["poolgate"]["compiled"]


class _OptionalBuildExt(build_ext):
    """Builds the compiled modules, or none of them: a failed compile leaves the pure-Python install."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as error:  # any compiler or linker failure means "install as Python"
            for output in self.get_outputs():
                if os.path.exists(output):
                    os.remove(output)
            print(f"poolgate: compiling failed ({error}); installing the pure-Python modules", file=sys.stderr)


def _ext_modules() -> list[Any]:
    if os.environ.get("POOLGATE_PURE_PYTHON") == "1":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("poolgate: mypyc is not installed; installing the pure-Python modules", file=sys.stderr)
        return []
    # The build environment holds only the libraries whose types the compiled modules depend on
    # (pyproject.toml's build requirements): others they import through the package are taken as `Any`, which
    # mypyc compiles to the same dynamic operations as Python's.
    options = ["--ignore-missing-imports", "--follow-imports=silent"]
    try:
        return mypycify([*options, *(f"src/{path}" for path in COMPILED)], opt_level="3", group_name="poolgate")
    except (Exception, SystemExit) as error:  # mypyc exits on a type error
        print(f"poolgate: mypyc refused the modules ({error}); installing the pure-Python modules", file=sys.stderr)
        return []


setup(ext_modules=_ext_modules(), cmdclass={"build_ext": _OptionalBuildExt})
