"""Streaming bytes without splitting a UTF-8 character across messages."""

from __future__ import annotations


def _sequence_length(lead: int) -> int:
    """Bytes in the UTF-8 sequence that ``lead`` begins (1 for ASCII and for
    bytes that cannot begin a multi-byte sequence)."""
    if 0xC0 <= lead < 0xE0:
        return 2
    if 0xE0 <= lead < 0xF0:
        return 3
    if 0xF0 <= lead < 0xF8:
        return 4
    return 1


def incomplete_tail(data: bytes | bytearray) -> int:
    """How many trailing bytes form the start of a UTF-8 character that is not
    complete yet (0 to 3). Invalid bytes are never held: they cannot be
    completed by anything that follows."""
    for back in range(1, min(3, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:  # continuation byte: keep looking for the lead
            continue
        return back if _sequence_length(byte) > back else 0
    return 0


class Utf8Chunker:
    """Turns a stream of byte deltas into chunks that end on character boundaries."""

    def __init__(self) -> None:
        self._pending = bytearray()

    def push(self, data: bytes) -> bytes:
        self._pending += data
        cut = len(self._pending) - incomplete_tail(self._pending)
        chunk = bytes(self._pending[:cut])
        del self._pending[:cut]
        return chunk

    def flush(self) -> bytes:
        """The rest, complete or not: called when the stream ends."""
        chunk = bytes(self._pending)
        self._pending.clear()
        return chunk
