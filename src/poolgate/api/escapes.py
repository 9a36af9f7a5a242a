"""Names and values hidden behind JSON escapes from a scan of a body's raw bytes."""

from __future__ import annotations

import re

__all__ = ["hides_words", "words_hidden"]

# An ASCII letter, digit or underscore written as a `\u00XX` escape: valid JSON that no encoder writes (they
# escape quotes, backslashes and control characters, some also `<>&'`), and all it takes to hide a name or a
# value from a scan of the raw bytes (`"cache_\u0063ontrol"`, `"\u0031h"`, `"web\u005fsearch_…"`), which the
# upstream reads as plain as any other.
_ESCAPED_WORD_CHAR = re.compile(rb"\\u00(?:3[0-9]|[46][1-9a-fA-F]|5[0-9aAfF]|7[0-9aA])")


def hides_words(data: bytes) -> bool:
    """Whether `data` spells some letter, digit or underscore as an escape: a raw-byte scan of it for a name
    may miss one. Cost estimates then assume the worst (a budget must not be slipped past that way)."""
    # A backslash first: one memchr, where most bodies of plain text end the search. Then the pattern, whose
    # literal prefix the regex engine finds twice as fast as `data.find(b"\\u00")` does in a screenshot's base64.
    # (`find`, not `in`: on bytes, `in` first tries its operand as an integer and raises and clears a TypeError.)
    if data.find(b"\\") < 0 or _ESCAPED_WORD_CHAR.search(data) is None:
        return False
    # The backslash of a match may be the second of an escaped one (text reading `\u0041`). Escaped backslashes
    # blanked out (not removed: `\u00` and `41` must not meet), what is left of the pattern is an escape: in C,
    # where checking each match (and the run of backslashes before it) in Python held the event loop for a
    # second on 30 MB of such text. (A lookbehind in the pattern made the search 20 times slower.)
    return _ESCAPED_WORD_CHAR.search(data.replace(b"\\\\", b"  ")) is not None


def words_hidden(data: bytes) -> int:
    """How many letters, digits or underscores `data` spells as escapes (see `hides_words`): counted in C, and
    without a list of them (a body of millions would make one)."""
    if not hides_words(data):
        return 0
    return _ESCAPED_WORD_CHAR.subn(b"", data.replace(b"\\\\", b"  "))[1]
