"""Document corpora built from text already on the machine, for every family.

The default corpus is the Python standard library: its sources and the
documentation topics that ship with it (``pydoc_data``). ``--data`` takes a
directory (every regular file is a document) or a JSONL file (one document
per line: a JSON string, or an object with a ``text`` field).

Documents are split into training and held-out sets by a hash of their name,
so the split is the same on every machine and for every preset. Each family
turns the documents into what it trains on (BLT: ``training.blt.corpus``).
"""

from __future__ import annotations

import hashlib
import json
import math
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

HELDOUT_PER_MILLE = 50


class DataError(Exception):
    """Input data that cannot be read, naming the file."""


@dataclass
class Documents:
    """The training and held-out documents, and where they came from."""

    train: list[bytes]
    heldout: list[bytes]
    description: dict


def stdlib_documents() -> Iterator[tuple[str, bytes]]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"pydoc_data/{name}", topics[name].encode()
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if relative.parts[0] in ("site-packages", "dist-packages"):
            continue
        yield str(relative), path.read_bytes()


def directory_documents(root: Path) -> Iterator[tuple[str, bytes]]:
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            yield str(path.relative_to(root)), path.read_bytes()
        except OSError as e:
            raise DataError(f"{path}: cannot read: {e}") from None


def jsonl_documents(path: Path) -> Iterator[tuple[str, bytes]]:
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{number}: not valid JSON: {e}") from None
            text = record.get("text") if isinstance(record, dict) else record
            if not isinstance(text, str):
                raise DataError(f"{path}:{number}: expected a JSON string or an object with a string 'text' field")
            yield f"{path.name}:{number}", text.encode()


def documents(data: Path | None) -> tuple[Iterator[tuple[str, bytes]], str]:
    if data is None:
        return stdlib_documents(), "python standard library sources and pydoc topics"
    if data.is_dir():
        return directory_documents(data), f"files under {data.name}/"
    if data.is_file():
        return jsonl_documents(data), f"JSONL file {data.name}"
    raise DataError(f"{data}: no such file or directory")


def _rank(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def build_documents(data: Path | None, max_bytes: int) -> Documents:
    """Reads documents, keeps a hash-ordered selection of about ``max_bytes``,
    and splits it into training and held-out documents."""
    source, what = documents(data)
    selected = sorted(source, key=lambda doc: _rank(doc[0]))
    train, heldout, total = [], [], 0
    for name, text in selected:
        if not text:
            continue
        if total >= max_bytes:
            break
        text = text[: max_bytes - total]
        total += len(text)
        (heldout if _rank(name) % 1000 < HELDOUT_PER_MILLE else train).append(text)
    if not train or not heldout:
        raise DataError(f"{data or what}: too little text for a training and a held-out split ({total} bytes)")
    return Documents(train=train, heldout=heldout, description={
        "source": what,
        "documents": {"train": len(train), "heldout": len(heldout)},
        "bytes": {"train": sum(map(len, train)), "heldout": sum(map(len, heldout))},
        "heldout_rule": f"sha256(name) % 1000 < {HELDOUT_PER_MILLE}",
    })


def random_windows(stream: torch.Tensor, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` windows of ``length`` symbols at random offsets: [batch, length]."""
    starts = torch.randint(0, len(stream) - length, (batch,), generator=generator)
    return torch.stack([stream[s : s + length] for s in starts.tolist()])


def spread_windows(stream: torch.Tensor, length: int, max_windows: int) -> torch.Tensor:
    """Up to ``max_windows`` non-overlapping windows spread evenly over the
    whole stream (so every part of it is represented): [n, length]."""
    n = min(max_windows, len(stream) // length)
    offsets = torch.linspace(0, len(stream) - length, n).long()
    return torch.stack([stream[o : o + length] for o in offsets.tolist()])


def bits(nats: float) -> float:
    return nats / math.log(2)
