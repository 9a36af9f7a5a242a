"""What the mock refuses, as the real API and a careful config reader would: model ids no Claude family
has, and keys (in its config file or admin bodies) that nothing reads, which would otherwise hide a typo."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
from collections.abc import Collection
from functools import lru_cache
from typing import Any, Union, get_args, get_origin, get_type_hints

# Every real Claude model id, old and new naming, and made-up ones that follow it (the mock's own future
# models): claude-3-5-sonnet-20241022, claude-3-haiku-20240307, claude-3-7-sonnet-latest, claude-sonnet-4-5,
# claude-opus-4-1-20250805, claude-haiku-4-5-20251001, claude-opus-4-6-fast, claude-mythos-preview,
# claude-2.1, claude-instant-1.2, claude-1.3-100k, claude-v1. Refused, as the API refuses them: other
# vendors' ids (gpt-4), unknown families (claude-nonexistent-9) and cloud spellings (claude-opus-4-1@20250805).
CLAUDE_MODEL = re.compile(
    r"""claude-(?:
        (?:opus|sonnet|haiku|fable|mythos)          # family first (since the 4 generation)
          (?:(?:-\d{1,2}){1,2}(?:-\d{8})?(?:-(?:latest|preview|fast))? | -preview)
      | 3(?:-\d)?-(?:opus|sonnet|haiku)(?:-\d{8}|-latest)?   # generation first (the 3 generation)
      | (?:instant-)?v?[12](?:\.\d)?(?:-100k)?      # claude-2.1, claude-instant-1.2, claude-v1
    )""",
    re.VERBOSE,
)


@lru_cache(maxsize=4096)  # the hot path sees a handful of ids; bounded, as clients choose the strings
def is_claude_model(model: str) -> bool:
    return CLAUDE_MODEL.fullmatch(model) is not None


def unknown_fields(data: object, cls: type) -> list[str]:
    """The keys in `data` that the dataclass `cls` has no field for, nested dataclasses (also as dict
    values or optional) included, each described by its dotted path. Wrong types are left to the
    converter to report."""
    return _unknown_in_dataclass(data, cls, "")


def unknown_keys(data: dict[str, Any], allowed: Collection[str]) -> list[str]:
    """The keys of a flat JSON object outside `allowed`, described as by `unknown_fields`."""
    return [_describe(str(name), str(name), allowed) for name in data if name not in allowed]


def unknown_message(unknown: list[str], what: str = "field") -> str:
    """One line: "unknown field `stauts` (did you mean `status`?)"."""
    return f"unknown {what}{'s' if len(unknown) > 1 else ''} " + ", ".join(unknown)


def _unknown_in_dataclass(data: object, cls: type, at: str) -> list[str]:
    if not isinstance(data, dict):
        return []
    hints = get_type_hints(cls)
    fields = [field.name for field in dataclasses.fields(cls)]
    found: list[str] = []
    for name, value in data.items():
        if name in hints and name in fields:
            found += _unknown_in(value, hints[name], f"{at}{name}.")
        else:
            found.append(_describe(f"{at}{name}", str(name), fields))
    return found


def _unknown_in(value: object, hint: Any, at: str) -> list[str]:
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _unknown_in_dataclass(value, hint, at)
    origin, args = get_origin(hint), get_args(hint)
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        return [path for key, item in value.items() for path in _unknown_in(item, args[1], f"{at}{key}.")]
    if origin in (Union, types.UnionType):  # e.g. `Fault | None`
        return [path for arg in args for path in _unknown_in(value, arg, at)]
    return []


def _describe(path: str, name: str, known: Collection[str]) -> str:
    # A typo is the usual reason for an unknown key: name the field that was probably meant.
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"`{path}`" + (f" (did you mean `{close[0]}`?)" if close else "")
