"""Memory: caches that give freed slots back, and one copy of the weights."""

import torch

from patchwork.engines.api import SamplingParams
from patchwork.engines.kv_cache import KVCache
from tests.helpers import PATCHINGS, make_engine, reference


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def test_a_cache_takes_memory_only_where_written_and_gives_a_released_slot_back():
    before = resident_bytes()
    with torch.inference_mode():
        # 4 slots of 2 layers x 8 heads x 16384 positions x 64 dims: 64 MiB of keys per slot.
        cache = KVCache(layers=2, slots=4, kv_heads=8, head_dim=64, capacity=16384, ring=False, device="cpu",
                        dtype=torch.float32)
        reserved = resident_bytes()
        cache.keys[2].fill_(1.0)
        cache.values[2].fill_(1.0)
        cache.positions[2] = torch.arange(16384)
        written = resident_bytes()
        cache.release(2)
        released = resident_bytes()
        assert float(cache.keys[2].abs().max()) == 0.0 and int(cache.positions[2].max()) == -1
    slot_bytes = 2 * cache.keys[2].numel() * 4
    assert reserved - before < slot_bytes // 8  # the full size costs nothing up front
    assert written - reserved > 0.9 * slot_bytes
    assert written - released > 0.9 * slot_bytes


def test_a_move_copies_only_the_entries_in_use():
    with torch.inference_mode():
        # Slots of whole pages (2 MiB), so a released one reads as zeros.
        cache = KVCache(layers=1, slots=3, kv_heads=2, head_dim=64, capacity=4096, ring=False, device="cpu",
                        dtype=torch.float32)
        cache.keys[2, :, :, :10] = 7.0
        cache.keys[2, :, :, 10:] = 9.0  # stale entries past the slot's positions
        cache.positions[2, :10] = torch.arange(10)
        cache.move(2, 0)
        assert float(cache.keys[0, :, :, :10].min()) == 7.0 and float(cache.keys[0, :, :, 10:].abs().max()) == 0.0
        assert cache.positions[0, :10].tolist() == list(range(10)) and int(cache.positions[2].max()) == -1
        assert float(cache.keys[2].abs().max()) == 0.0  # the source is released


def test_a_finished_sequence_releases_its_slot():
    engine = make_engine(PATCHINGS["static"], max_batch_size=2, max_sequence_bytes=1100)
    caches = engine.scheduler.caches
    released = []
    release = caches.release
    caches.release = lambda slot: (released.append(slot), release(slot))
    result = engine.generate_one(b"z" * 1000, SamplingParams(max_new_bytes=40))
    assert result.text == reference(engine, b"z" * 1000, SamplingParams(max_new_bytes=40)).text
    assert released[-1] == 0  # when it left, not only when the slot is reused
    with torch.inference_mode():
        for cache in caches.all():
            assert int(cache.positions.max()) == -1


def unique_bytes(tensors) -> int:
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def test_fused_projections_hold_no_second_copy_of_the_weights():
    engine = make_engine()
    model = engine.model
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    attention = model.global_model.stack.layers[0].self_attn
    feed_forward = model.global_model.stack.layers[0].mlp
    assert attention.q_proj.weight.untyped_storage().data_ptr() == attention.qkv_weight.untyped_storage().data_ptr()
    assert feed_forward.up_proj.weight.untyped_storage().data_ptr() == \
        feed_forward.gate_up_weight.untyped_storage().data_ptr()
    fused = [m.qkv_weight for m in model.modules() if hasattr(m, "qkv_weight")] + \
        [m.gate_up_weight for m in model.modules() if hasattr(m, "gate_up_weight")]
    engine.generate_one(b"warm", SamplingParams(max_new_bytes=8))
    assert unique_bytes([*model.parameters(), *fused]) == parameter_bytes
    # Loading weights writes through to the fused matrices.
    with torch.no_grad():
        attention.k_proj.weight.fill_(0.5)
    rows = attention.q_proj.weight.shape[0]
    assert float(attention.qkv_weight[rows : rows + attention.k_proj.weight.shape[0]].min()) == 0.5
