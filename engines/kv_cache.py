"""Preallocated key/value caches, one per attention layer, shared by every family.

A cache holds a fixed number of sequence slots. For local (windowed)
attention it is a ring of ``window`` entries per slot, so its memory does not
grow with the sequence; otherwise it holds positions up to ``capacity``,
allocated as they are needed (doubling), so memory follows the longest
sequence in the batch rather than the worst case. Every entry
records its absolute position (-1 when empty), which is all attention masks
need: rotary embeddings are applied before keys are stored, so the order of
entries inside the ring does not matter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


INITIAL_LINEAR_SIZE = 64


class KVCache:
    def __init__(self, slots: int, kv_heads: int, head_dim: int, capacity: int, ring: bool, device, dtype):
        self.capacity, self.ring = capacity, ring
        self.size = capacity if ring else min(capacity, INITIAL_LINEAR_SIZE)
        self.keys = torch.zeros(slots, kv_heads, self.size, head_dim, device=device, dtype=dtype)
        self.values = torch.zeros_like(self.keys)
        self.positions = torch.full((slots, self.size), -1, dtype=torch.long, device=device)

    def bytes_per_position(self) -> int:
        """Bytes one cached position takes in one slot."""
        return 2 * self.keys[0, :, 0].numel() * self.keys.element_size() + self.positions.element_size()

    @property
    def bytes_per_slot(self) -> int:
        """Bytes one slot occupies now."""
        return self.size * self.bytes_per_position()

    @property
    def max_bytes_per_slot(self) -> int:
        """Bytes one slot can ever occupy."""
        return self.capacity * self.bytes_per_position()

    def _grow(self, needed: int) -> None:
        if needed > self.capacity:
            raise IndexError(f"position {needed - 1} is past the cache capacity of {self.capacity}")
        size = min(self.capacity, max(needed, 2 * self.size))
        grow = size - self.size
        pad = (0, 0, 0, grow)
        self.keys = torch.nn.functional.pad(self.keys, pad)
        self.values = torch.nn.functional.pad(self.values, pad)
        self.positions = torch.nn.functional.pad(self.positions, (0, grow), value=-1)
        self.size = size

    def write(self, slots: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """slots: [B]; positions: [B, T]; keys, values: [B, H, T, hd]. A ring keeps
        the last ``size`` of them."""
        if self.ring and positions.shape[1] > self.size:
            positions, keys, values = positions[:, -self.size :], keys[:, :, -self.size :], values[:, :, -self.size :]
        if not self.ring and int(positions.max()) >= self.size:
            self._grow(int(positions.max()) + 1)
        index = positions % self.size if self.ring else positions
        rows = slots[:, None]
        self.keys[rows, :, index] = keys.transpose(1, 2)
        self.values[rows, :, index] = values.transpose(1, 2)
        self.positions[rows, index] = positions

    def read(self, slots: torch.Tensor, length: int | None = None):
        """Keys, values [B, H, L, hd] and their positions [B, L] of ``slots``
        (the first ``length`` entries of a linear cache, all of a ring)."""
        length = self.size if self.ring or length is None else length
        return (
            self.keys[slots, :, :length],
            self.values[slots, :, :length],
            self.positions[slots, :length],
        )

    def clear(self, slot: int) -> None:
        self.positions[slot] = -1


@dataclass
class CacheView:
    """Where one attention call reads and writes: a layer's cache, the slots of
    the sequences in the batch and the positions of their new tokens."""

    cache: KVCache
    slots: torch.Tensor  # [B]
    positions: torch.Tensor  # [B, T]
    window: int | None

    def write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.cache.write(self.slots, self.positions, keys, values)

    def read(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cached keys and values with the mask [B, 1, T, L] of the entries each
        new token may attend to."""
        length = None if self.cache.ring else int(self.positions.max()) + 1
        keys, values, key_positions = self.cache.read(self.slots, length)
        query = self.positions[:, :, None]
        key = key_positions[:, None, :]
        allowed = (key >= 0) & (key <= query)
        if self.window is not None:
            allowed &= key > query - self.window
        return keys, values, allowed[:, None]
