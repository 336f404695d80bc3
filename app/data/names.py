"""The one rule for the file names that thresher's artifacts hold.

A name is used when it is valid UTF-8, holds no control character (U+0000-U+001F, U+007F-U+009F)
and no line or paragraph separator (U+2028, U+2029), and is a plain relative path (no empty, `.`
or `..` part). Such a name fits on one line of every .txt list and in one field of every CSV
(the csv module quotes commas and quotes), and every reader gives it back unchanged.

Any other name is not used: it goes to `filenames/unused_filenames.txt` with the reason, written
by `escape_name`, so that it stays on one line and cannot pass for another name.
"""
from __future__ import annotations

import re
from typing import Optional

# Python decodes a file name's undecodable bytes to lone surrogates (surrogateescape).
_REFUSED = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_ESCAPED = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_SHORT = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape_char(char: str) -> str:
    code = ord(char)
    if char in _SHORT:
        return _SHORT[char]
    if code < 0x80:
        return f"\\x{code:02x}"
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}"


def escape_name(name: str) -> str:
    """`name` on one line, unambiguously: a backslash is doubled; \\n, \\t, \\r and \\xNN stand for
    those bytes (NN >= 80: a byte that is not UTF-8), \\uNNNN for that character."""
    return _ESCAPED.sub(lambda match: _escape_char(match.group()), name)


def name_problem(name: str) -> Optional[str]:
    """Why the rule refuses `name` (a path relative to the input), or None when it is used."""
    match = _REFUSED.search(name)
    if match:
        char = match.group()
        if "\ud800" <= char <= "\udfff":
            return "name is not valid UTF-8"
        what = {"\n": "a newline", "\t": "a tab", "\r": "a carriage return", "\u2028": "a line separator",
                "\u2029": "a paragraph separator"}.get(char, "a control character")
        return f"name holds {what} ({_escape_char(char)})"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "name is not a plain relative path (an empty, '.' or '..' part)"
    return None


def one_line(reason: str) -> str:
    """A reason (often an exception's message) made fit for a `name<TAB>reason` line."""
    return _REFUSED.sub(" ", reason)
