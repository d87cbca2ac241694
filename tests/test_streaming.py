import random

import pytest

from patchwork.engines.generation import StopMatcher
from patchwork.engines.utf8 import Utf8Chunker, incomplete_tail

TEXT = "plain ascii, ñandú, 日本語, emoji 🎉🧵 and more: ∑ x² — done".encode()


@pytest.mark.parametrize("seed", range(20))
def test_chunks_never_split_a_character(seed):
    rng = random.Random(seed)
    chunker, chunks, at = Utf8Chunker(), [], 0
    while at < len(TEXT):
        step = rng.randint(1, 4)
        chunk = chunker.push(TEXT[at : at + step])
        at += step
        if chunk:
            chunks.append(chunk)
    chunks.append(chunker.flush())
    assert b"".join(chunks) == TEXT
    for chunk in chunks:
        chunk.decode("utf-8")  # each chunk is valid on its own


def test_byte_by_byte_holds_only_incomplete_characters():
    chunker = Utf8Chunker()
    emoji = "🎉".encode()
    assert [chunker.push(emoji[i : i + 1]) for i in range(4)] == [b"", b"", b"", emoji]


def test_invalid_bytes_are_passed_through():
    chunker = Utf8Chunker()
    assert chunker.push(b"\xff\xfe") == b"\xff\xfe"  # can never become valid
    assert chunker.push(b"a\xe6") == b"a"  # the lead byte waits
    assert chunker.push(b"A") == b"\xe6A"  # ... and is released once it cannot complete
    assert chunker.push(b"\xe6\x97") == b""
    assert chunker.flush() == b"\xe6\x97"


def test_incomplete_tail_lengths():
    assert incomplete_tail(b"abc") == 0
    assert incomplete_tail("é".encode()[:1]) == 1
    assert incomplete_tail("日".encode()[:2]) == 2
    assert incomplete_tail("🎉".encode()[:3]) == 3
    assert incomplete_tail("🎉".encode()) == 0
    assert incomplete_tail(b"\x80\x80\x80\x80") == 0


def feed(matcher: StopMatcher, data: bytes) -> bytes:
    released = b""
    for i in range(len(data)):
        released += matcher.push(data[i : i + 1])
        if matcher.stopped:
            break
    return released + matcher.finish()


def test_stop_sequence_is_removed_and_never_emitted():
    matcher = StopMatcher((b"\n\n", b"END"))
    released = b""
    for byte in b"line one\nline two\n\nmore":
        released += matcher.push(bytes([byte]))
        assert b"\n\n" not in released
        if matcher.stopped:
            break
    released += matcher.finish()
    assert matcher.stopped and released == matcher.text == b"line one\nline two"


def test_partial_stop_is_held_back_then_released():
    matcher = StopMatcher((b"END",))
    assert matcher.push(b"the E") == b"the "
    assert matcher.push(b"N") == b""
    assert matcher.push(b"D") == b""
    assert matcher.stopped and matcher.text == b"the "
    other = StopMatcher((b"END",))
    assert feed(other, b"the ENemy") == b"the ENemy" and not other.stopped


def test_earliest_stop_wins_when_several_match():
    matcher = StopMatcher((b"cd", b"bcde"))
    assert feed(matcher, b"abcdef") == b"ab"
