"""The Models API's paging: a `limit` is read as the API (pydantic-core) reads a query integer, and the pages
of a list, forwards or backwards, are the list."""

from __future__ import annotations

import re
import sys
import unicodedata

from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from poolgate.api.model_pages import PageWindow, page_window, query_int

PYDANTIC_INT = TypeAdapter(int)


def pydantic_int(text: str) -> int | None:
    """What pydantic's lax int parsing, which the API uses for its query parameters, reads `text` as."""
    try:
        return PYDANTIC_INT.validate_python(text)
    except ValidationError:
        return None


def test_the_whitespace_around_a_limit_is_pydantics() -> None:
    """Every character that could pass for whitespace (a separator, a control or a format character, or
    `str.isspace()`): trimmed from around a number exactly when pydantic trims it. (Not the unassigned,
    private-use and surrogate points, also category C: a million of them, none whitespace.)"""
    candidates = (
        chr(point)
        for point in range(sys.maxunicode + 1)
        if chr(point).isspace() or unicodedata.category(chr(point)) in ("Zs", "Zl", "Zp", "Cc", "Cf")
    )
    for char in candidates:
        assert query_int(f"{char}5{char}") == pydantic_int(f"{char}5{char}"), hex(ord(char))


def test_other_scripts_digits_are_not_a_limit() -> None:
    """Python's `int()` reads every Unicode decimal digit; the API only ASCII ones."""
    foreign = [chr(p) for p in range(128, sys.maxunicode + 1) if unicodedata.decimal(chr(p), None) is not None]
    assert foreign and all(int(digit) >= 0 for digit in foreign)
    assert [digit for digit in foreign if query_int(digit) is not None] == []


# Strings near integers: digits (ASCII and other scripts'), signs, what `int()` or pydantic also take
# (underscores, a decimal point), and whitespace some readers trim and others do not.
NEAR_INTEGERS = st.text(alphabet="0123456789+-_. \t\n\xa0\u3000\x1c\u200b１٣", max_size=12)


@given(NEAR_INTEGERS)
@example("0-5\n")  # pydantic strips the newline; the exception's pattern must span it
def test_a_limit_the_parser_reads_pydantic_reads_the_same(text: str) -> None:
    """Whatever is read, pydantic reads as the same number; whatever is refused, pydantic refuses too, but
    for the underscores and decimal point it takes ("1_0", "5.0") and the API does not, and for a sign after
    leading zeros: pydantic-core drops the zeros first and reads "0-5" as -5, no page size either (a 400
    both ways, in other words)."""
    parsed = query_int(text)
    if parsed is not None:
        assert pydantic_int(text) == parsed
    elif "_" not in text and "." not in text:
        read = pydantic_int(text)
        assert read is None or (read <= 0 and re.fullmatch(r"\s*0+[+-].*", text, re.DOTALL)), read


@given(st.integers(), st.sampled_from(["", "+"]), st.integers(0, 3), st.sampled_from(["", " ", "\t", "\u3000"]))
def test_a_signed_ascii_integer_is_read_as_itself(number: int, plus: str, zeros: int, space: str) -> None:
    sign = "-" if number < 0 else plus
    assert query_int(f"{space}{sign}{'0' * zeros}{abs(number)}{space}") == number


def test_a_run_of_leading_zeros_longer_than_int_converts_is_still_a_number() -> None:
    """`int()` refuses more than 4300 digits, leading zeros counted; the API reads them."""
    text = "0" * 5000 + "7"
    assert query_int(text) == pydantic_int(text) == 7


@given(st.integers(0, 30), st.integers(1, 8))
def test_paging_forwards_or_backwards_walks_the_whole_list(size: int, limit: int) -> None:
    ids = [f"model-{n}" for n in range(size)]
    forwards: list[str] = []
    after: str | None = None
    while True:
        window = page_window(ids, str(limit), after, None)
        assert not isinstance(window, str)
        forwards += ids[window.start : window.end]
        if not window.has_more:
            break
        after = ids[window.end - 1]
    assert forwards == ids
    backwards: list[str] = []
    before = ids[-1] if ids else None
    while before is not None:
        window = page_window(ids, str(limit), None, before)
        assert not isinstance(window, str)
        backwards = ids[window.start : window.end] + backwards
        before = ids[window.start] if window.has_more else None
    assert backwards == ids[:-1]


def test_a_cursor_not_in_the_list_is_named() -> None:
    assert page_window(["a", "b"], "5", "c", None) == "after_id: no model 'c' in the list"
    assert page_window(["a", "b"], "5", None, "c") == "before_id: no model 'c' in the list"


def test_a_limit_is_refused_in_the_apis_words_and_none_is_the_default_page() -> None:
    ids = [f"m{n}" for n in range(30)]
    assert page_window(ids, "ten", None, None) == "limit: Input should be a valid integer"
    assert page_window(ids, "0", None, None) == "limit: Input should be between 1 and 1000"
    assert page_window(ids, "1001", None, None) == "limit: Input should be between 1 and 1000"
    assert page_window(ids, None, None, None) == PageWindow(0, 20, True)
