"""A request's headers are looked up by name in a dict built once (`fields_of`): each lookup must read what a
scan of the header list reads, the first value sent, also when a name repeats (two `x-api-key`s: the first
authenticates, as before)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from poolgate.api.http import fields_of, header

NAMES = [b"x-api-key", b"authorization", b"content-length", b"x-claude-code-session-id", b"origin"]


@given(st.lists(st.tuples(st.sampled_from(NAMES), st.binary(max_size=6)), max_size=8))
def test_a_header_looked_up_by_name_is_its_first_value(headers: list[tuple[bytes, bytes]]) -> None:
    fields = fields_of(headers)
    for name in NAMES:
        assert fields.get(name) == header(headers, name)
    assert (len(fields) != len(headers)) == (len({name for name, _ in headers}) != len(headers))
