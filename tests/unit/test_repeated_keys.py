"""A body's top level naming a key twice is found (`repeated_key`), whatever the spacing, the values and the
keys below the top level; and a body too large to walk is looked through for the keys the gateway reads."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolgate.api.anthropic import WALKED_BYTES, decode_request, repeated_key
from poolgate.api.errors import ApiError

SPACE = st.sampled_from(["", " ", "\n  ", "\t", "\r\n"])
KEYS = st.sampled_from(["model", "messages", "stream", "a", "é", 'q"uote', "mod\\el", ""])
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=8,
)


def spelt(key: str, escaped: bool) -> str:
    """A key as JSON text; `escaped`: its first character as a `\\u` escape, as a client may write it."""
    text = orjson.dumps(key).decode()
    if escaped and key:
        text = '"' + f"\\u{ord(key[0]):04x}" + text[2:]
    return text


@given(st.lists(st.tuples(KEYS, VALUES, st.booleans(), SPACE, SPACE), max_size=6), SPACE)
def test_a_repeated_top_level_key_is_found_however_the_body_is_written(
    pairs: list[tuple[str, object, bool, str, str]], end: str
) -> None:
    body = (
        "{"
        + ",".join(
            f"{before}{spelt(key, escaped)}{after}:{after}{orjson.dumps(value).decode()}{before}"
            for key, value, escaped, before, after in pairs
        )
        + end
        + "}"
    ).encode()
    keys = [key for key, *_ in pairs]
    repeated = {key for key in keys if keys.count(key) > 1}
    found = repeated_key(body)
    assert (found is None) == (not repeated)
    assert found is None or found in repeated


def test_the_same_key_below_the_top_level_is_no_repeat() -> None:
    body = b'{"tools": [{"model": 1}], "model": "m", "messages": [{"model": {"model": 2}}], "x": "model"}'
    assert repeated_key(body) is None


def messages_body(*extra: bytes) -> bytes:
    return b'{"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]' + b"".join(extra) + b"}"


# Over `WALKED_BYTES` of top-level keys the gateway does not read: thousands of them, not walked one by one.
MANY_KEYS = b"".join(b', "k%d": 0' % n for n in range(WALKED_BYTES // 8))


@pytest.mark.parametrize(
    ("extra", "refused"),
    [
        ((MANY_KEYS,), False),
        ((MANY_KEYS, b', "model": "m2"'), True),
        ((MANY_KEYS, b', "mod\\u0065l": "m2"'), True),  # may spell `model`: refused unchecked
        ((MANY_KEYS, b', "tools": [{"input_schema": {"model": {}}}]'), False),  # within a value read
        ((MANY_KEYS, b', "k0": 1'), False),  # not a key the gateway reads: not looked for
    ],
)
def test_a_body_too_large_to_walk_is_looked_through_for_the_keys_the_gateway_reads(
    extra: tuple[bytes, ...], refused: bool
) -> None:
    body = messages_body(*extra)
    if not refused:
        assert decode_request("messages", "req", "/v1/messages", b"", [], body).model == "m"
        return
    with pytest.raises(ApiError) as refusal:
        decode_request("messages", "req", "/v1/messages", b"", [], body)
    assert refusal.value.status == 400 and "more than once" in refusal.value.message
