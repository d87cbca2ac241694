"""Key/value caches, one per transformer stack, shared by every family.

A cache holds a fixed number of sequence slots for all layers of a stack. For
local (windowed) attention it is a ring of ``window`` entries per slot, so its
memory does not grow with the sequence; otherwise it holds positions up to
``capacity``. Every entry records its absolute position (-1 when empty), which
is all attention masks need: rotary embeddings are applied before keys are
stored, so the order of entries inside the ring does not matter. All layers of
a stack store the same positions, so one position table and one mask serve
them all.

Memory: the tensors have their full size from the start, so nothing is ever
copied to grow them (a copy of every slot at once stalls every running
sequence). On the CPU they live in an anonymous memory mapping: the operating
system backs a page only once it is written, pages never written read as
zeros, and ``release`` hands a freed slot's pages back, so a replica's memory
follows the sequences running now, not the longest one it has seen. On a GPU
they are allocated whole up front, as GPU serving systems do. Each slot's
entries are contiguous (slot-major layout), which is what lets a slot be
released on its own.

A stack call sees the cache through a ``CacheView`` in one of two modes:

- ``decode``: one new token per sequence. Its key/value is written first, then
  the token attends to the slot's cached entries in place (views, no copies).
- ``extend``: a chunk of new tokens per sequence (a prompt, whole or in
  pieces), right-padded to one length with position -1. Each token attends to
  the entries cached before the chunk plus the chunk's tokens up to itself.
  A linear cache stores the chunk first and attends in place, as in decode; a
  ring attends to its entries as they were plus the chunk's, then keeps the
  chunk's newest ``size``: reading before writing is what lets a chunk longer
  than the window see every key it needs.
"""

from __future__ import annotations

import math
import mmap

import torch
import torch.nn.functional as F


def slot_selector(slots: list[int], device) -> slice | torch.Tensor:
    """Indexes a batch's slots: a slice (views, no copies) when they are
    evenly spaced (consecutive, or every other one as a family with two
    cache rows per sequence reads them), else an index tensor."""
    first = slots[0]
    stride = slots[1] - first if len(slots) > 1 else 1
    if stride > 0 and slots == list(range(first, first + stride * len(slots), stride)):
        return slice(first, first + stride * (len(slots) - 1) + 1, stride)
    return torch.tensor(slots, device=device)


class ReservedTensor:
    """A zero-initialised tensor whose memory is taken from the OS page by page
    as it is written (CPU), with a way to give a slot's pages back."""

    def __init__(self, shape: tuple[int, ...], device, dtype):
        self.device = torch.device(device)
        count = math.prod(shape)
        self.mapping = None
        if self.device.type == "cpu" and count:
            size = count * torch.empty((), dtype=dtype).element_size()
            # Private: a released page is dropped and reads as zeros again.
            self.mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self.tensor = torch.frombuffer(self.mapping, dtype=dtype, count=count).view(shape)
        else:
            self.tensor = torch.zeros(shape, device=device, dtype=dtype)

    def release(self, slot: int) -> None:
        """Returns the pages wholly inside ``slot``'s entries; they read as zeros again."""
        if self.mapping is None:
            return
        slot_bytes = self.tensor[0].numel() * self.tensor.element_size()
        start = -(-slot * slot_bytes // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (slot + 1) * slot_bytes // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start:
            self.mapping.madvise(mmap.MADV_DONTNEED, start, end - start)


class KVCache:
    def __init__(
        self, layers: int, slots: int, kv_heads: int, head_dim: int, capacity: int, ring: bool, device, dtype
    ):
        self.capacity, self.ring, self.size = capacity, ring, capacity
        shape = (slots, layers, kv_heads, capacity, head_dim)
        self._keys, self._values = ReservedTensor(shape, device, dtype), ReservedTensor(shape, device, dtype)
        self.keys, self.values = self._keys.tensor, self._values.tensor  # [slots, layers, Hkv, size, hd]
        self.positions = torch.full((slots, capacity), -1, dtype=torch.long, device=device)

    def bytes_per_position(self) -> int:
        """Bytes one cached position takes in one slot, over all layers."""
        return 2 * self.keys[0, :, :, 0].numel() * self.keys.element_size() + self.positions.element_size()

    @property
    def max_bytes_per_slot(self) -> int:
        """Bytes one slot can ever occupy."""
        return self.capacity * self.bytes_per_position()

    def used(self, slot: int) -> int:
        """Entries the slot holds now."""
        return int((self.positions[slot] >= 0).sum())

    def release(self, slot: int) -> None:
        """Empties a slot and gives its memory back."""
        self.positions[slot] = -1
        self._keys.release(slot)
        self._values.release(slot)

    def move(self, source: int, target: int) -> None:
        """Moves a sequence's entries to another slot and releases the source.
        Only the entries in use are copied (a linear cache fills from position 0)."""
        held = self.size if self.ring else self.used(source)
        self.keys[target, :, :, :held] = self.keys[source, :, :, :held]
        self.values[target, :, :, :held] = self.values[source, :, :, :held]
        self.positions[target] = self.positions[source]
        self.release(source)

    def decode_view(
        self, slots: list[int], positions: torch.Tensor, window: int | None, ends: list[int] | None = None
    ) -> "CacheView":
        """One new token per sequence of ``slots``, at ``positions`` [B]. A
        caller that knows them passes the positions on the host too
        (``ends``), and a linear cache then reads nothing from the device."""
        return CacheView(self, slots, positions[:, None], window, extend=False, ends=ends)

    def extend_view(
        self, slots: list[int], positions: torch.Tensor, window: int | None, ends: list[int] | None = None
    ) -> "CacheView":
        """A chunk of new tokens per sequence at ``positions`` [B, T] (-1 marks
        padding); ``ends``, when given, is each sequence's last new position."""
        return CacheView(self, slots, positions, window, extend=True, ends=ends)


class CacheView:
    """Where one stack call reads and writes: the slots of the sequences in the
    batch, the positions of their new tokens [B, T] and the additive mask
    [B, 1, T, L] over what each new token may attend to (built once for all
    layers of the stack)."""

    def __init__(self, cache: KVCache, slots: list[int], positions: torch.Tensor, window: int | None, extend: bool,
                 ends: list[int] | None = None):
        self.cache, self.positions, self.extend = cache, positions, extend
        self.host_ends = ends  # each sequence's last new position, when the caller knows it
        self.slots = slot_selector(slots, positions.device)
        self.slot_list = slots
        self.row_lengths: list[int] | None = None  # set when rows attend one by one
        if extend:
            self._prepare_extend(window)
        else:
            self._prepare_decode(window)

    # -- decode: write, then attend in place -------------------------------

    def _prepare_decode(self, window: int | None) -> None:
        cache = self.cache
        if cache.ring:
            self.length, self.index = cache.size, self.positions % cache.size
        else:
            ends = self.positions[:, 0].tolist() if self.host_ends is None else self.host_ends
            self.length, self.index = max(ends) + 1, self.positions
            _check_capacity(cache, self.length)
            if not isinstance(self.slots, slice):
                self.row_lengths = [end + 1 for end in ends]
        # Row indices into cache[...][self.slots]: the batch itself for a slice, the slot ids otherwise.
        batch = self.positions.shape[0]
        rows = torch.arange(batch, device=self.positions.device) if isinstance(self.slots, slice) else self.slots
        self.batch_rows = rows[:, None]
        self._rows(cache.positions)[self.batch_rows, self.index] = self.positions
        key = cache.positions[self.slots, : self.length][:, None, :]  # [B, 1, L]
        self.mask = _additive(_allowed(key, self.positions[:, :, None], window), cache.keys.dtype)

    def _rows(self, table: torch.Tensor) -> torch.Tensor:
        """``table`` restricted to the batch's slots when they are consecutive (a view)."""
        return table[self.slots] if isinstance(self.slots, slice) else table

    # -- extend: attend to what was cached plus the chunk, then write -----

    def _prepare_extend(self, window: int | None) -> None:
        cache = self.cache
        device = self.positions.device
        valid = self.positions >= 0  # [B, T]
        ends = torch.where(valid, self.positions, -1).amax(dim=1)  # last new position per sequence
        keep = valid
        if cache.ring:
            # Attend to the ring as it was plus the chunk, then keep the chunk's newest ``size`` entries.
            self.cached = cache.size
            key = torch.cat([cache.positions[self.slots], self.positions], dim=1)[:, None, :]  # [B, 1, size + T]
            keep = keep & (self.positions > ends[:, None] - cache.size)
            padding_key = self.cached + torch.arange(self.positions.shape[1], device=device)  # each pad sees itself
        else:
            # Positions never collide in a linear cache: write first, then attend in place.
            self.cached = None
            row_ends = ends.tolist() if self.host_ends is None else self.host_ends
            self.length = max(row_ends) + 1
            _check_capacity(cache, self.length)
            if not isinstance(self.slots, slice):
                self.row_lengths = [end + 1 for end in row_ends]
        batch_index, token_index = keep.nonzero(as_tuple=True)
        self.write_tokens = (batch_index, token_index)
        self.write_slots = torch.arange(cache.positions.shape[0], device=device)[self.slots][batch_index]
        new_positions = self.positions[batch_index, token_index]
        self.write_index = new_positions % cache.size if cache.ring else new_positions
        if not cache.ring:
            cache.positions[self.write_slots, self.write_index] = new_positions
            key = cache.positions[self.slots, : self.length][:, None, :]  # [B, 1, L]
            padding_key = torch.zeros(self.positions.shape[1], dtype=torch.long, device=device)  # position 0 exists
        allowed = _allowed(key, self.positions[:, :, None], window)
        # A padding query attends to one real entry only, so its row stays finite.
        allowed[:, torch.arange(self.positions.shape[1], device=device), padding_key] |= ~valid
        self.mask = _additive(allowed, cache.keys.dtype)
        if cache.ring:
            cache.positions[self.write_slots, self.write_index] = new_positions

    # -- what a layer calls ------------------------------------------------

    def attend(self, layer: int, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, gqa: bool):
        """Stores the new tokens' keys and values [B, Hkv, T, hd] and returns
        their attention output [B, H, T, hd]. A linear cache read for scattered
        slots attends row by row on views of each slot's own entries, rather
        than gathering every slot's entries up to the longest one."""
        if self.row_lengths is None:
            attend_keys, attend_values = self.update(layer, keys, values)
            return F.scaled_dot_product_attention(queries, attend_keys, attend_values, attn_mask=self.mask,
                                                  enable_gqa=gqa)
        self.write(layer, keys, values)
        cache = self.cache
        rows = []
        for row, (slot, length) in enumerate(zip(self.slot_list, self.row_lengths)):
            rows.append(F.scaled_dot_product_attention(
                queries[row : row + 1], cache.keys[slot, layer, :, :length][None],
                cache.values[slot, layer, :, :length][None], attn_mask=self.mask[row : row + 1, :, :, :length],
                enable_gqa=gqa,
            ))
        return torch.cat(rows)

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Stores the new tokens' keys and values [B, Hkv, T, hd] (a linear cache's, or a decode step's)."""
        cache = self.cache
        if not self.extend:
            self._rows(cache.keys)[self.batch_rows, layer, :, self.index] = keys.transpose(1, 2)
            self._rows(cache.values)[self.batch_rows, layer, :, self.index] = values.transpose(1, 2)
            return
        batch_index, token_index = self.write_tokens
        cache.keys[self.write_slots, layer, :, self.write_index] = keys[batch_index, :, token_index]
        cache.values[self.write_slots, layer, :, self.write_index] = values[batch_index, :, token_index]

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores the new tokens' keys and values [B, H, T, hd] and returns the
        keys and values [B, H, L, hd] they attend to (under ``mask``)."""
        cache = self.cache
        if self.extend and self.cached is not None:  # a ring: read what was there before writing
            attend_keys = torch.cat([cache.keys[self.slots, layer, :, : self.cached], keys], dim=2)
            attend_values = torch.cat([cache.values[self.slots, layer, :, : self.cached], values], dim=2)
            self.write(layer, keys, values)
            return attend_keys, attend_values
        self.write(layer, keys, values)
        return cache.keys[self.slots, layer, :, : self.length], cache.values[self.slots, layer, :, : self.length]


def _check_capacity(cache: KVCache, length: int) -> None:
    if length > cache.capacity:
        raise IndexError(f"position {length - 1} is past the cache capacity of {cache.capacity}")


def _allowed(key: torch.Tensor, query: torch.Tensor, window: int | None) -> torch.Tensor:
    """Causal (optionally windowed) attention between key and query positions; -1 keys are empty."""
    allowed = (key >= 0) & (key <= query)
    if window is not None:
        allowed &= key > query - window
    return allowed


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean [B, T, L] -> additive float mask [B, 1, T, L]."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, float("-inf"))[:, None]
