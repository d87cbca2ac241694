"""CM3Leon's guidance kernel against its PyTorch reference, run by Triton's
interpreter on CPU tensors (TRITON_INTERPRET=1, set in conftest)."""

import pytest
import torch

from patchwork.kernels import dispatch
from patchwork.kernels import guidance as module
from patchwork.kernels.guidance import MAX_TOP_K, TOLERANCE, bench_case, guidance, guidance_reference, guidance_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The interpreter's numpy warns about the IEEE infinities the kernel works with (-inf - -inf, log 0).
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


@pytest.fixture
def small_blocks(monkeypatch):
    """128-symbol blocks: a small vocabulary spans several, so the online
    normalisers and the running top-k merge across blocks."""
    monkeypatch.setattr(module, "MAX_BLOCK", 128)


@pytest.fixture
def large_blocks(monkeypatch):
    """8192-symbol blocks: fewer steps for the interpreter on a 50k vocabulary."""
    monkeypatch.setattr(module, "MAX_BLOCK", 8192)


def logits(rows, vocab, dtype, seed):
    """Logits of spread 3 on a 1/64 grid, exact in every dtype: no logit sits
    within rounding of CD-K's cut (no log alpha used here is near a multiple
    of 1/64), so -inf positions compare exactly."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.round(torch.randn(rows, vocab, generator=generator) * 192) / 64).to(dtype)


def pair(rows, vocab, dtype, seed=0):
    return logits(rows, vocab, dtype, seed), logits(rows, vocab, dtype, seed + 1)


def assert_matches(actual, expected, dtype):
    """-inf, +inf and NaN at the same places; finite values within the dtype's tolerance."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype == torch.float32
    for where in (torch.isneginf, torch.isposinf, torch.isnan):
        assert torch.equal(where(actual), where(expected)), where.__name__
    finite = torch.isfinite(expected)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual[finite], expected[finite], atol=atol, rtol=rtol)


def check(cond, uncond, allowed, *settings, temperature=None):
    """The kernel (one launch) against the reference; returns the reference's (scores, probs)."""
    before = dispatch.launches["guidance"]
    scores, probs = guidance_triton(cond, uncond, allowed, *settings, temperature=temperature)
    assert dispatch.launches["guidance"] == before + 1
    expected_scores, expected_probs = guidance_reference(cond, uncond, allowed, *settings, temperature=temperature)
    assert_matches(scores, expected_scores, cond.dtype)
    if temperature is None:
        assert probs is None and expected_probs is None
    else:
        assert_matches(probs, expected_probs, cond.dtype)
    return expected_scores, expected_probs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["none", "classifier_free", "contrastive"])
@pytest.mark.parametrize("rows, vocab", [(1, 260), (3, 1000)])
def test_each_mode_matches_the_reference(rows, vocab, mode, dtype):
    cond, uncond = pair(rows, vocab, dtype, seed=vocab)
    allowed = torch.arange(vocab) % 7 != 3
    scores, probs = check(cond, uncond, allowed, mode, 3.0, 0.1, 5, temperature=0.7)
    assert torch.isfinite(scores).any(dim=-1).all() and not probs.isnan().any()
    assert torch.isneginf(scores[:, 3]).all()  # not allowed


def test_a_gpt2_sized_vocabulary(large_blocks):
    dtype = torch.bfloat16  # a GPU replica's; the other dtypes read the same way on the smaller vocabularies
    cond, uncond = pair(3, 50_257, dtype)
    allowed = torch.ones(50_257, dtype=torch.bool)
    allowed[:100] = False
    check(cond, uncond, allowed, ["none", "classifier_free", "contrastive"], 2.5, 0.1, 5, temperature=1.0)


@pytest.mark.parametrize("k, alpha", [(1, 1.0), (1, 1e-3), (12, 0.1), (40, 1e-9), (MAX_TOP_K, 0.5), (200, 1e-3),
                                      (5000, 0.1)])
def test_contrastive_decoding_for_any_k_and_alpha(k, alpha, small_blocks):
    """k beyond the allowed symbols (30 a row), beyond the registers
    (MAX_TOP_K: the k-th largest from torch.topk) and beyond the vocabulary."""
    cond, uncond = pair(2, 1000, torch.float32, seed=k)
    allowed = torch.zeros(2, 1000, dtype=torch.bool)
    allowed[0, 500:530] = True
    allowed[1, ::33] = True
    cond[0, 520] = cond[0, 500:530].max() + 1
    cond[0, 510] = cond[0, 520]  # two best, tied
    scores, _ = check(cond, uncond, allowed, "contrastive", 1.0, alpha, k, temperature=1.5)
    kept = torch.isfinite(scores).sum(dim=-1)
    if k >= 30:
        assert torch.equal(kept, allowed.sum(dim=-1))  # every allowed symbol is plausible
    if (k, alpha) == (1, 1.0):
        assert kept.tolist() == [2, 1]  # the conditional stream's best alone (both, when tied)


@pytest.mark.parametrize("dtype", DTYPES)
def test_each_row_has_its_own_settings_and_mask(dtype):
    """Mixed guidance in one call; masks that leave one or three symbols;
    strided rows (a slice of a wider tensor)."""
    wide_cond, wide_uncond = pair(5, 1400, dtype, seed=3)
    cond, uncond = wide_cond[:, 200:1200], wide_uncond[:, 100:1100]
    allowed = torch.rand(5, 1000, generator=torch.Generator().manual_seed(0)) < 0.5
    allowed[1] = False
    allowed[1, 17] = True
    allowed[3] = False
    allowed[3, [5, 600, 999]] = True
    modes = ["contrastive", "contrastive", "classifier_free", "contrastive", "none"]
    scores, _ = check(cond, uncond, allowed, modes, [3.0, 1.0, 1.5, 3.0, 3.0], [0.1, 0.5, 0.1, 1e-3, 0.1],
                      [5, 1, 5, 2, 5], temperature=[1.0, 0.5, 2.0, 0.05, 1.0])
    assert torch.isfinite(scores[1]).sum() == 1 and torch.isfinite(scores[3]).sum() == 3


@pytest.mark.parametrize("mode", ["none", "classifier_free", "contrastive"])
def test_tokens_masked_in_both_streams_stay_minus_infinity(mode, small_blocks):
    cond, uncond = pair(2, 300, torch.float32, seed=9)
    allowed = torch.ones(300, dtype=torch.bool)
    allowed[:40] = False
    cond[:, :60] = uncond[:, :60] = float("-inf")  # outside the mask and, for 40..59, inside it
    if mode == "classifier_free":  # -inf + scale * (-inf - -inf) is NaN in the reference: only masked ones
        cond[:, 40:60], uncond[:, 40:60] = logits(2, 20, torch.float32, seed=1), logits(2, 20, torch.float32, seed=2)
    scores, probs = check(cond, uncond, allowed, mode, 3.0, 1e-9, 300, temperature=1.0)
    assert torch.isneginf(scores[:, :40]).all() and not scores.isnan().any() and not probs.isnan().any()
    assert torch.isfinite(scores[:, 60:]).all()


def test_nan_logits_propagate_as_in_the_reference(small_blocks):
    cond, uncond = pair(5, 500, torch.float32, seed=4)
    allowed = torch.ones(500, dtype=torch.bool)
    allowed[0] = False
    modes = ["none", "classifier_free", "contrastive", "contrastive", "contrastive"]
    cond[0, 7] = cond[1, 8] = cond[2, 10] = uncond[3, 9] = float("nan")
    cond[4, 0] = uncond[4, 0] = float("nan")  # not allowed: masked away
    scores, probs = check(cond, uncond, allowed, modes, 3.0, 0.1, 5, temperature=1.0)
    assert scores[0, 7].isnan() and scores[1, 8].isnan() and scores[:2].isnan().sum() == 2
    assert torch.isneginf(scores[2]).all()  # a NaN conditional logit leaves nothing plausible (the reference's rule)
    assert scores[3].isnan().any() and not torch.isfinite(scores[3]).any()  # NaN where plausible, else -inf
    assert probs[:4].isnan().all() and not scores[4].isnan().any() and not probs[4].isnan().any()


def test_the_reference_over_a_batch_is_each_row_alone_bit_for_bit():
    """The engine scores a step's rows together: on CPU exactly as it scored them one at a time."""
    for vocab in (384, 8192):
        cond, uncond = pair(4, vocab, torch.float32, seed=vocab)
        allowed = torch.rand(4, vocab, generator=torch.Generator().manual_seed(1)) < 0.9
        for mode in ("none", "classifier_free", "contrastive"):
            together, _ = guidance_reference(cond, uncond, allowed, mode, 3.0, 0.1, 5)
            for row in range(4):
                alone, _ = guidance_reference(cond[row:row + 1], uncond[row:row + 1], allowed[row], mode, 3.0, 0.1, 5)
                assert torch.equal(together[row], alone[0])


def test_the_dispatcher_runs_the_kernel_only_where_told():
    cond, uncond = pair(2, 260, torch.float32)
    allowed = torch.ones(260, dtype=torch.bool)
    before = dispatch.launches["guidance"]
    assert not dispatch.use_triton(cond)  # auto on CPU: the reference
    expected, _ = guidance(cond, uncond, allowed, "contrastive", 3.0, 0.1, 5)
    assert dispatch.launches["guidance"] == before
    with dispatch.forced("triton"):
        actual, _ = guidance(cond, uncond, allowed, "contrastive", 3.0, 0.1, 5)
    assert dispatch.launches["guidance"] == before + 1
    assert_matches(actual, expected, torch.float32)
    with pytest.raises(ValueError, match="guidance mode 'cfg'"):
        guidance(cond, uncond, allowed, "cfg", 3.0, 0.1, 5)
    with pytest.raises(ValueError, match="3 settings for 2 rows"):
        guidance(cond, uncond, allowed, "none", [1.0, 2.0, 3.0], 0.1, 5)
    with pytest.raises(ValueError, match="unconditional"):
        guidance_triton(cond, None, allowed, "classifier_free", 3.0, 0.1, 5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_bench_case_agrees_with_its_baseline(dtype):
    from patchwork.benchmarks.kernels import difference

    case = bench_case(1, torch.device("cpu"), dtype)
    assert difference(case.triton(*case.inputs[0]), case.baseline(*case.inputs[0]), case.tolerance)["ok"]


def test_the_engine_decodes_the_same_tokens_through_the_kernel():
    """A tiny random CM3Leon, two guided image requests and an unguided one,
    greedy: with every kernel forced to Triton the engine writes what the
    plain reference path writes."""
    from patchwork.engines.cm3leon.config import Cm3LeonConfig
    from patchwork.engines.cm3leon.decoding import Cm3Params, Guidance
    from patchwork.engines.cm3leon.engine import Cm3LeonEngine
    from patchwork.engines.cm3leon.model import Cm3LeonModel
    from patchwork.engines.cm3leon.prompts import image_prompt
    from patchwork.engines.cm3leon.reference import generate_reference
    from patchwork.engines.cm3leon.retrieval import RetrievalConfig
    from patchwork.engines.cm3leon.tokenizer import TextTokenizer
    from patchwork.engines.cm3leon.vqvae import VqConfig
    from patchwork.engines.layers import TransformerConfig
    from tests.helpers import admitted_together

    config = Cm3LeonConfig(transformer=TransformerConfig(dim=32, n_layers=1, n_heads=2), text_vocab=64,
                           vq=VqConfig(image_size=8, channels=4, codes=32, code_dim=4), retrieval=RetrievalConfig(dim=4))
    torch.manual_seed(0)
    model = Cm3LeonModel(config).eval()
    tokenizer = TextTokenizer.train(["a red circle", "a blue square"], vocab_size=config.text_vocab)
    engine = Cm3LeonEngine(model, tokenizer, torch.device("cpu"), "tiny")
    asks = [(image_prompt([30, 31, 32]), Cm3Params(guidance=Guidance.CLASSIFIER_FREE)),
            (image_prompt([33, 34]), Cm3Params(guidance=Guidance.CONTRASTIVE, contrastive_k=3)),
            (image_prompt([35]), Cm3Params())]
    try:
        before = dispatch.launches["guidance"]
        with dispatch.forced("triton"):
            with admitted_together(engine):
                requests = [engine.submit(prompt, params) for prompt, params in asks]
            results = [request.result() for request in requests]
        assert dispatch.launches["guidance"] >= before + config.image_tokens  # one launch a step
    finally:
        engine.close()
    for (prompt, params), result in zip(asks, results):
        assert len(result.details.tokens) == config.image_tokens
        assert result.details.tokens == generate_reference(model, tokenizer, prompt, params).details.tokens
