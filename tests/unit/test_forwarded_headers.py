"""What the shape stage forwards of a request's headers (`shape.forward_headers`, which remembers its verdict on each
name): the same as judging every header afresh, whatever the names, their order and their Connection header."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from poolgate.api.http import header_text
from poolgate.lifecycle.shape import DROPPED, DROPPED_PREFIXES, forward_headers

NAMES = [
    b"x-api-key",
    b"x_api_key",
    b"authorization",
    b"anthropic-version",
    b"anthropic-beta",
    b"x-claude-code-session-id",
    b"x-forwarded-for",
    b"x_forwarded_user",
    b"x-poolgate-cost",
    b"connection",
    b"keep-alive",
    b"x-custom",
    b"x_custom",
    b"cookie",
    b"user-agent",
]


def judged_afresh(headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """Every header judged on its own: dropped if its name, `_` read as `-`, is a dropped one, starts with a dropped
    prefix, or is listed by the request's Connection header."""
    listed = {
        token.strip().lower().replace(b"_", b"-")
        for name, value in headers
        if name == b"connection"
        for token in value.split(b",")
    }
    return [
        (name.decode("latin-1"), header_text(value))
        for name, value in headers
        if (alias := name.replace(b"_", b"-")) not in DROPPED
        and alias not in listed
        and not alias.startswith(DROPPED_PREFIXES)
    ]


values = st.one_of(
    st.sampled_from([b"keep-alive", b"x-custom, X_Custom", b"close", b"user-agent", b"1"]),
    st.binary(max_size=6),
)


@example([(b"x_custom", b"1"), (b"connection", b"keep-alive, X_Custom"), (b"user-agent", b"claude-cli")])
@given(st.lists(st.tuples(st.one_of(st.sampled_from(NAMES), st.binary(min_size=1, max_size=6)), values), max_size=10))
def test_headers_are_forwarded_as_if_each_were_judged_afresh(headers: list[tuple[bytes, bytes]]) -> None:
    assert forward_headers(headers) == judged_afresh(headers)
    assert forward_headers(headers) == judged_afresh(headers)  # with every name remembered
