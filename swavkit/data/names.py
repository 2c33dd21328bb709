r"""How file names are written where people and programs read them: the terminal, error messages,
``skipped.txt``, the cluster CSV and page.

A POSIX file name is any bytes except "/" and NUL. It need not be UTF-8 (Python holds each undecodable
byte as a lone surrogate, see :func:`os.fsdecode`) and may hold tabs, newlines or terminal escape
sequences. Written raw, such a name crashes a UTF-8 writer, breaks a one-record-per-line file, or drives
the terminal. swavkit writes every name (and every decoder message, which may quote one) in one printable
form that :func:`path_from_printable` turns back into the exact original:

=================  ==========================================================================
``\\``             a backslash
``\t \n \r``       tab, newline, carriage return
``\xHH``           a byte that is not part of valid UTF-8, or an ASCII control character (ESC is
                   ``\x1b``); HH is the byte's value in hex
``\uXXXX``         any other character Python does not call printable (C1 controls, format
                   characters such as U+202E that reverse the text after them, separators other
                   than the space); ``\UXXXXXXXX`` above U+FFFF
=================  ==========================================================================

Everything else (letters of any script, spaces, punctuation) is written as itself, in UTF-8. The file
system encoding is assumed to be UTF-8 (Python's choice on Linux and macOS).

``skipped.txt`` holds one ``<printable path>\t<printable reason>\n`` line per unreadable file. Lines are
appended whole; a line torn by a crash (no final newline) is ignored by the reader and dropped by the
next append.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

_NAMED = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNNAMED = {"t": b"\t", "n": b"\n", "r": b"\r"}
# os.fsdecode holds an undecodable byte 0xHH as the lone surrogate U+DCHH (PEP 383).
_SURROGATE_ESCAPES = range(0xDC80, 0xDD00)
_ESCAPE = re.compile(r"\\(?:(\\)|([tnr])|x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8}))")
# A torn line is shorter than this: a path is at most 4096 bytes, 4 printable characters each.
_LONGEST_LINE_BYTES = 1 << 16


def printable_path(path: str | bytes | os.PathLike) -> str:
    """``path`` (or any text that may quote one) in swavkit's printable form (see the module docstring):
    safe to print on a terminal, to write as UTF-8, and to put on one line; reversible."""
    text = os.fsdecode(path)
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for character in text:
        code = ord(character)
        if character in _NAMED:
            out.append(_NAMED[character])
        elif character.isprintable():
            out.append(character)
        elif code < 0x80:
            out.append(f"\\x{code:02x}")
        elif code in _SURROGATE_ESCAPES:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def path_from_printable(text: str) -> str:
    """Inverse of :func:`printable_path`: the original name (undecodable bytes as surrogates again, ready
    for ``open``). A backslash that starts no escape is kept as it is."""
    raw = bytearray()
    position = 0
    for match in _ESCAPE.finditer(text):
        raw += text[position:match.start()].encode("utf-8", "surrogateescape")
        backslash, named, byte, short, long = match.groups()
        if backslash:
            raw += b"\\"
        elif named:
            raw += _UNNAMED[named]
        elif byte:
            raw.append(int(byte, 16))
        elif int(short or long, 16) <= 0x10FFFF:
            raw += chr(int(short or long, 16)).encode("utf-8", "surrogatepass")
        else:  # not a character: keep the text
            raw += match.group(0).encode("utf-8")
        position = match.end()
    raw += text[position:].encode("utf-8", "surrogateescape")
    return os.fsdecode(bytes(raw))


def skipped_report_text(entries: Iterable[tuple[str, str]]) -> str:
    """The ``skipped.txt`` lines of (path, reason) entries: ``<printable path>\t<printable reason>\n``."""
    return "".join(f"{printable_path(path)}\t{printable_path(reason)}\n" for path, reason in entries)


def append_skipped_report(report_path: str | Path, entries: Iterable[tuple[str, str]]) -> int:
    """Append one ``<printable path>\\t<printable reason>`` line per (path, reason) to ``report_path``
    (created if missing); returns the number of lines written.

    The lines go out in one write and are fsynced, so a crash loses at most the lines being written; a torn
    last line left by an earlier crash is dropped first so it cannot merge with the new lines.
    """
    data = skipped_report_text(entries)
    if not data:
        return 0
    with open(report_path, "a+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size:
            handle.seek(max(0, size - _LONGEST_LINE_BYTES))
            tail = handle.read()
            if not tail.endswith(b"\n"):
                handle.truncate(size - len(tail) + tail.rfind(b"\n") + 1)
        handle.write(data.encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())
    return data.count("\n")


def read_skipped_report(report_path: str | Path) -> list[tuple[str, str]]:
    """[(path, reason)] of a ``skipped.txt`` written by :func:`append_skipped_report`, names exactly as
    the file system gave them; a torn last line is left out."""
    text = Path(report_path).read_bytes().decode("utf-8", "surrogateescape")
    entries = []
    for line in text.split("\n")[:-1]:  # the part after the last newline is empty or torn
        path, _, reason = line.partition("\t")
        entries.append((path_from_printable(path), path_from_printable(reason)))
    return entries
