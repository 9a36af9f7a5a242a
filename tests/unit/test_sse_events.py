"""Where whole SSE events end in what a stream has sent so far (the relay holds back the rest)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from poolgate.lifecycle.sse import first_event, whole_events

LINE_ENDS = st.sampled_from([b"\n", b"\r\n", b"\r"])
FIELD = st.binary(max_size=30).map(lambda b: b"data: " + b.replace(b"\r", b"").replace(b"\n", b""))


@st.composite
def sse_streams(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    """A stream of events (one line-end style each) and the offsets where its events end."""
    data, ends = b"", []
    for _ in range(draw(st.integers(1, 6))):
        end = draw(LINE_ENDS)
        lines = draw(st.lists(FIELD, min_size=1, max_size=3))
        data += b"".join(line + end for line in lines) + end
        ends.append(len(data))
    return data, ends


@given(sse_streams(), st.data())
def test_only_whole_events_are_counted(stream: tuple[bytes, list[int]], data: st.DataObject) -> None:
    events, ends = stream
    cut = data.draw(st.integers(0, len(events)))
    expected = max([0, *(end for end in ends if end <= cut)])
    # Told that no event ends within its first `since` bytes (what was held back before), it finds the same.
    first_end = min([end for end in ends if end <= cut], default=cut + 1)
    since = data.draw(st.integers(0, max(0, first_end - 1)))
    assert whole_events(events[:cut], since) == whole_events(events[:cut])
    if events[:cut].endswith(b"\r"):
        # A CR at the very end may be the first half of a CRLF: an event may be taken to end one byte early
        # (its LF then goes out with the next one), never late.
        assert expected <= whole_events(events[:cut]) <= cut
    else:
        assert whole_events(events[:cut]) == expected


def test_the_first_event_is_the_first_block_that_dispatches_one() -> None:
    error = b'event: error\ndata: {"type":"error"}\n\n'
    assert first_event(error) == (b"error", b'{"type":"error"}')
    assert first_event(b"\xef\xbb\xbf: keepalive\n\n\n" + error.replace(b"\n", b"\r\n")) == (
        b"error",
        b'{"type":"error"}',
    )
    assert first_event(error[:-1]) is None and first_event(b": keepalive\n\n") is None and first_event(b"") is None
