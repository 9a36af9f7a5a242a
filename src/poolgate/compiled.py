"""Which of poolgate's modules this install runs compiled (mypyc, see setup.py), and which compiled ones
are older than their source (an editable install whose sources changed since it was built)."""

from __future__ import annotations

from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

PACKAGE = Path(__file__).parent


def _extensions() -> list[tuple[str, Path, Path]]:
    """(module name, compiled file, its source) of every compiled module in the package."""
    found, seen = [], set()
    for suffix in sorted(EXTENSION_SUFFIXES, key=len, reverse=True):  # `.so` ends `.cpython-311-….so` too
        for compiled in PACKAGE.rglob(f"*{suffix}"):
            if compiled in seen:
                continue
            seen.add(compiled)
            source = compiled.with_name(compiled.name.removesuffix(suffix) + ".py")
            parts = source.relative_to(PACKAGE.parent).with_suffix("").parts
            found.append((".".join(parts), compiled, source))
    return sorted(found)


def compiled_modules() -> list[str]:
    return [name for name, _, _ in _extensions()]


def stale_modules() -> list[str]:
    """Compiled modules whose source changed after they were built: Python imports the compiled file, so
    the change does not run until the install is repeated. Only a working tree's (an editable install runs
    `src/` of a checkout): an install from a wheel writes each source after its compiled file."""
    if not (PACKAGE.parent.parent / "pyproject.toml").exists():
        return []
    return [
        name
        for name, compiled, source in _extensions()
        if source.exists() and source.stat().st_mtime > compiled.stat().st_mtime
    ]


def stale_warning() -> str | None:
    """What to say about `stale_modules`, with the way out; None when there are none."""
    stale = stale_modules()
    if not stale:
        return None
    return (
        f"compiled modules older than their source run in place of it: {', '.join(stale)}; build them again"
        " (`pip install -e .`), or delete them to run the sources (`find src -name '*.so' -delete`)"
    )
