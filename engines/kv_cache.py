"""Preallocated key/value caches, one per transformer stack, shared by every family.

A cache holds a fixed number of sequence slots for all layers of a stack. For
local (windowed) attention it is a ring of ``window`` entries per slot, so
its memory does not grow with the sequence; otherwise it holds positions up
to ``capacity``, allocated as they are needed (doubling), so memory follows
the longest sequence in the batch rather than the worst case. Every entry
records its absolute position (-1 when empty), which is all attention masks
need: rotary embeddings are applied before keys are stored, so the order of
entries inside the ring does not matter. All layers of a stack store the
same positions, so one position table and one mask serve them all.
"""

from __future__ import annotations

import torch

INITIAL_LINEAR_SIZE = 64


def slot_selector(slots: list[int], device) -> slice | torch.Tensor:
    """Indexes a batch's slots: a slice (views, no copies) when they are
    consecutive, else an index tensor."""
    first = slots[0]
    if slots == list(range(first, first + len(slots))):
        return slice(first, first + len(slots))
    return torch.tensor(slots, device=device)


class KVCache:
    def __init__(
        self, layers: int, slots: int, kv_heads: int, head_dim: int, capacity: int, ring: bool, device, dtype
    ):
        self.capacity, self.ring = capacity, ring
        self.size = capacity if ring else min(capacity, INITIAL_LINEAR_SIZE)
        self.keys = torch.zeros(layers, slots, kv_heads, self.size, head_dim, device=device, dtype=dtype)
        self.values = torch.zeros_like(self.keys)
        self.positions = torch.full((slots, self.size), -1, dtype=torch.long, device=device)

    def bytes_per_position(self) -> int:
        """Bytes one cached position takes in one slot, over all layers."""
        return 2 * self.keys[:, 0, :, 0].numel() * self.keys.element_size() + self.positions.element_size()

    @property
    def bytes_per_slot(self) -> int:
        """Bytes one slot occupies now."""
        return self.size * self.bytes_per_position()

    @property
    def max_bytes_per_slot(self) -> int:
        """Bytes one slot can ever occupy."""
        return self.capacity * self.bytes_per_position()

    def clear(self, slot: int) -> None:
        self.positions[slot] = -1

    def move(self, source: int, target: int) -> None:
        """Moves a sequence's entries to another slot (the source slot is cleared)."""
        self.keys[:, target] = self.keys[:, source]
        self.values[:, target] = self.values[:, source]
        self.positions[target] = self.positions[source]
        self.clear(source)

    def _grow(self, needed: int) -> None:
        if needed > self.capacity:
            raise IndexError(f"position {needed - 1} is past the cache capacity of {self.capacity}")
        size = min(self.capacity, max(needed, 2 * self.size))
        grow = size - self.size
        self.keys = torch.nn.functional.pad(self.keys, (0, 0, 0, grow))
        self.values = torch.nn.functional.pad(self.values, (0, 0, 0, grow))
        self.positions = torch.nn.functional.pad(self.positions, (0, grow), value=-1)
        self.size = size

    def view(self, slots: list[int], positions: torch.Tensor, window: int | None, decode: bool) -> "CacheView":
        """Reserves entries for new tokens at ``positions`` [B, T] of ``slots``
        (a ring keeps the last ``size``) and returns where the layers write and read."""
        if self.ring and positions.shape[1] > self.size:
            positions = positions[:, -self.size :]
        if self.ring:
            length, index = self.size, positions % self.size
        else:
            length, index = int(positions.max()) + 1, positions  # one host sync per stack and step
            if length > self.size:
                self._grow(length)
        view = CacheView(self, slot_selector(slots, positions.device), positions, index, length)
        view.rows(self.positions)[view.batch_rows, index] = positions
        if decode:
            view.mask_for(window)
        return view


class CacheView:
    """Where one stack call reads and writes: the slots of the sequences in the
    batch, the positions of their new tokens and, for a decode step, the mask
    [B, 1, T, L] of the cached entries each new token may attend to."""

    def __init__(
        self, cache: KVCache, slots: slice | torch.Tensor, positions: torch.Tensor, index: torch.Tensor, length: int
    ):
        self.cache, self.slots, self.positions, self.index = cache, slots, positions, index
        self.length = length  # cached entries a read covers
        batch = positions.shape[0]
        # Row indices into rows(...): the batch itself for a slice, the slots otherwise.
        rows = torch.arange(batch, device=positions.device) if isinstance(slots, slice) else slots
        self.batch_rows = rows[:, None]
        self.mask: torch.Tensor | None = None

    def rows(self, table: torch.Tensor) -> torch.Tensor:
        """``table`` restricted to the batch's slots when they are consecutive (a view)."""
        return table[self.slots] if isinstance(self.slots, slice) else table

    def mask_for(self, window: int | None) -> None:
        key = self.cache.positions[self.slots, : self.length][:, None, :]
        query = self.positions[:, :, None]
        allowed = (key >= 0) & (key <= query)
        if window is not None:
            allowed &= key > query - window
        # Additive float mask, built once for all layers of the stack.
        mask = torch.zeros(allowed.shape, dtype=self.cache.keys.dtype, device=allowed.device)
        self.mask = mask.masked_fill_(~allowed, float("-inf"))[:, None]

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys, values: [B, H, T, hd] of the new tokens (a ring keeps the last ``size``)."""
        kept = self.index.shape[1]
        self.rows(self.cache.keys[layer])[self.batch_rows, :, self.index] = keys[:, :, -kept:].transpose(1, 2)
        self.rows(self.cache.values[layer])[self.batch_rows, :, self.index] = values[:, :, -kept:].transpose(1, 2)

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached keys and values [B, H, L, hd] of the batch's slots."""
        return (
            self.cache.keys[layer][self.slots, :, : self.length],
            self.cache.values[layer][self.slots, :, : self.length],
        )
