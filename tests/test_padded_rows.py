"""Right-padded batches computed on their real positions alone
(``layers.PaddedRows``), against the plain padded computation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from patchwork.engines.blt.config import BltConfig, HashEmbeddingConfig
from patchwork.engines.blt.model import BltModel
from patchwork.engines.blt.patching import patch_ids_from_starts
from patchwork.engines.cm3leon.tokenizer import PAD
from patchwork.engines.layers import CausalLM, PaddedRows, TransformerConfig, TransformerStack
from patchwork.engines.mot.config import Untied
from patchwork.engines.mot.model import MotLM
from patchwork.training.cm3leon.train import lm_loss


def _real_positions(lengths: list[int], seq: int) -> torch.Tensor:
    return torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]


def test_a_stack_on_the_real_positions_computes_what_the_padded_stack_does_there():
    torch.manual_seed(0)
    stack = TransformerStack(TransformerConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2))
    lengths, seq = [9, 3, 12, 1], 12
    h = torch.randn(len(lengths), seq, 32, requires_grad=True)
    real = _real_positions(lengths, seq)

    padded = stack(h)
    padded[real].square().sum().backward()
    padded_grads = [p.grad.clone() for p in stack.parameters()] + [h.grad.clone()]
    stack.zero_grad()
    h.grad = None

    rows = PaddedRows(torch.tensor(lengths), seq)
    packed = stack(rows.pack(h), rows)
    packed.square().sum().backward()
    packed_grads = [p.grad for p in stack.parameters()] + [h.grad]

    torch.testing.assert_close(packed, padded[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows.unpack(packed)[real], packed)
    assert torch.all(rows.unpack(packed)[~real] == 0)
    for got, want in zip(packed_grads, padded_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_blt_rows_with_different_patch_counts_give_the_padded_global_models_logits():
    """The global model computes each row's own patches; the plain
    computation runs it over every row padded to the longest."""
    torch.manual_seed(0)
    local = TransformerConfig(dim=32, n_layers=1, n_heads=2, window=16)
    model = BltModel(BltConfig(
        entropy_model=TransformerConfig(dim=32, n_layers=1, n_heads=2),
        hash_embeddings=HashEmbeddingConfig(ngram_sizes=[3, 4], buckets=97),
        local_encoder=local, local_decoder=local.model_copy(update={"n_layers": 2}),
        global_model=TransformerConfig(dim=48, n_layers=2, n_heads=4),
    ))
    model.init_weights(generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(4, 256, (3, 20))
    starts = torch.zeros(3, 21, dtype=torch.bool)
    starts[:, :2] = True  # as ``patching.patch_starts`` always does
    starts[0, 1::2] = True  # 11 patches
    starts[1, [5, 17, 20]] = True  # 4, the last read by the last byte (the next one starts a patch)
    starts[2, 1::4] = True  # 6
    patch_ids = patch_ids_from_starts(starts)

    byte_states, patch_vectors = model.local_encoder(tokens, patch_ids[:, :20])
    decoder = model.local_decoder
    plain = decoder(byte_states, decoder.patch_slots(model.global_model(patch_vectors)), patch_ids[:, 1:] - 1)
    torch.testing.assert_close(model(tokens, patch_ids), plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backbone", ["dense", "mot"])
def test_cm3leons_loss_on_the_real_positions_is_the_padded_loss_that_ignores_padding(backbone):
    torch.manual_seed(0)
    config = TransformerConfig(dim=32, n_layers=2, n_heads=4)
    # MoT: ids below 20 are text, 20-34 image codes, 35-49 sound codes, each with weights of its own.
    lm = CausalLM(config, vocab_size=50) if backbone == "dense" else MotLM(config, 50, [20, 35], Untied.ALL)
    rows = [torch.randint(1, 50, (n,)) for n in (7, 12, 3, 12)]
    batch = torch.full((4, 12), PAD)
    for i, row in enumerate(rows):
        batch[i, :len(row)] = row

    loss = lm_loss(SimpleNamespace(lm=lm), batch)
    loss.backward()
    grads = [p.grad.clone() for p in lm.parameters()]
    lm.zero_grad()
    padded = F.cross_entropy(lm(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten(), ignore_index=PAD)
    padded.backward()

    torch.testing.assert_close(loss, padded)
    for got, p in zip(grads, lm.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6)
