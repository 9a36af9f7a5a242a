"""The API's model ids: the dated model an alias stands for. The API serves (and caches) an alias as that
model, so the gateway's prompt-cache model and the mock upstream both key a prompt by it."""

from __future__ import annotations

# The API's aliases of the models before the 4.6 generation, each for its latest dated snapshot: the API serves
# (and caches) the alias as that model. From 4.6 on an id has no date; it is the model.
_SNAPSHOTS: dict[str, str] = {
    "claude-3-opus-latest": "claude-3-opus-20240229",
    "claude-3-5-sonnet-latest": "claude-3-5-sonnet-20241022",
    "claude-3-5-haiku-latest": "claude-3-5-haiku-20241022",
    "claude-3-7-sonnet-latest": "claude-3-7-sonnet-20250219",
    "claude-sonnet-4-0": "claude-sonnet-4-20250514",
    "claude-opus-4-0": "claude-opus-4-20250514",
    "claude-opus-4-1": "claude-opus-4-1-20250805",
    "claude-sonnet-4-5": "claude-sonnet-4-5-20250929",
    "claude-opus-4-5": "claude-opus-4-5-20251101",
    "claude-haiku-4-5": "claude-haiku-4-5-20251001",
}


def snapshot(model: str) -> str:
    """The model an id names: `claude-sonnet-4-5-20250929` for the alias `claude-sonnet-4-5`, any other id
    itself."""
    return _SNAPSHOTS.get(model, model)
