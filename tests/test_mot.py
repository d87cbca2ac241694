"""Mixture-of-Transformers: the router, the untied block against the dense one,
the audio tokenizer, and a MoT checkpoint trained, loaded and decoded."""

import math

import numpy as np
import pytest
import torch

from patchwork.engines.api import InvalidRequest
from patchwork.engines.cm3leon.audio import AudioTokenizer, AudioVqConfig
from patchwork.engines.cm3leon.decoding import Cm3Params, Guidance
from patchwork.engines.cm3leon.reference import generate_reference
from patchwork.engines.layers import CausalLM, TransformerConfig
from patchwork.engines.loading import load
from patchwork.engines.mot.config import Untied
from patchwork.engines.mot.model import MotLM
from patchwork.engines.mot.routing import ModalityRouter
from patchwork.engines.scheduler import SchedulerConfig
from patchwork.training.avworld import AudioVideoWorld
from patchwork.training.cm3leon.audio import fit_audio_tokenizer, quantisation_error
from patchwork.training.imageworld import ImageWorld
from tests.conftest import run_patchwork
from tests.helpers import admitted_together

VOCAB, BOUNDARIES = 60, [20, 40]  # text [0, 20), image [20, 40), audio [40, 60)
CONFIG = TransformerConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2)


def test_the_router_sends_each_id_to_its_range_and_groups_round_trip():
    router = ModalityRouter(BOUNDARIES)
    tokens = torch.tensor([[0, 19, 20, 39, 40, 59], [45, 3, 22, 22, 1, 58]])
    assert router(tokens).tolist() == [[0, 0, 1, 1, 2, 2], [2, 0, 1, 1, 0, 2]]
    groups = router.groups(tokens)
    assert groups.sizes == [4, 4, 4]
    values = torch.arange(12.0).view(2, 6, 1)
    ordered = groups.gather(values)
    assert router(tokens).flatten()[groups.order].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert ordered[:, 0].tolist() == [0, 1, 7, 10, 2, 3, 8, 9, 4, 5, 6, 11]  # each group in sequence order
    assert torch.equal(groups.scatter(ordered), values)
    assert torch.equal(groups.apply(ordered, [lambda x: x + 100 * (x >= 0)] * 3)[:, 0],
                       ordered[:, 0] + 100)
    with pytest.raises(ValueError, match="must increase"):
        ModalityRouter([40, 20])


def _tied_copy(dense: CausalLM, untied: Untied) -> MotLM:
    """A MoT model whose every modality holds the dense model's weights."""
    mot = MotLM(CONFIG, VOCAB, BOUNDARIES, untied)
    weights = dense.state_dict()
    state = {}
    for name in mot.state_dict():
        parts = name.split(".")
        # layers.0.mlp.2.gate_proj.weight -> layers.0.mlp.gate_proj.weight; norm.1.weight -> norm.weight
        dense_name = ".".join(p for i, p in enumerate(parts) if not (p.isdigit() and parts[i - 1] != "layers"))
        state[name] = weights[dense_name]
    mot.load_state_dict(state)
    return mot


@pytest.mark.parametrize("untied", list(Untied))
def test_with_every_modality_holding_the_same_weights_the_mot_model_is_the_dense_model(untied):
    """Bit for bit in bfloat16, through whole sequences and cached decoding.
    (In float32 the last bit may differ: the CPU matmul library accumulates
    a few rows in a different order than many, so a group of 3 tokens is not
    rounded as the same tokens inside a batch of 51; the dense model itself
    differs in that bit between batch sizes. It stays within 1e-5.)"""
    torch.manual_seed(0)
    dense = CausalLM(CONFIG, VOCAB).eval()
    mot = _tied_copy(dense, untied).eval()
    tokens = torch.randint(0, VOCAB, (3, 17))
    tokens[1] = torch.randint(0, 20, (17,))  # one sequence of text alone
    with torch.no_grad():
        assert torch.allclose(mot(tokens), dense(tokens), atol=1e-5, rtol=0)
        dense16, mot16 = dense.to(torch.bfloat16), mot.to(torch.bfloat16)
        assert torch.equal(mot16(tokens), dense16(tokens))
        caches = [model.stack.new_cache(3, 32, "cpu", torch.bfloat16) for model in (dense16, mot16)]
        prompt = torch.arange(12)[None].expand(3, 12)
        for model, cache in zip((dense16, mot16), caches):
            model.step(tokens[:, :12], model.stack.extend_view(cache, [0, 1, 2], prompt))
        for position in range(12, 17):
            logits = [model.step(tokens[:, position:position + 1],
                                 model.stack.decode_view(cache, [0, 1, 2], torch.full((3,), position)))
                      for model, cache in zip((dense16, mot16), caches)]
            assert torch.equal(logits[0], logits[1])
            # The cache reads what a whole-sequence pass computes (to bfloat16 rounding).
            assert torch.allclose(logits[1][:, 0], mot16(tokens[:, :position + 1])[:, -1], atol=0.05, rtol=0)


def test_untied_weights_are_the_modalitys_own_and_counted():
    torch.manual_seed(1)
    full = MotLM(CONFIG, VOCAB, BOUNDARIES, Untied.ALL).eval()
    dense = CausalLM(CONFIG, VOCAB)

    def count(model):
        return sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name
                   and "lm_head" not in name)

    assert count(full) == 3 * count(dense)
    ffn = sum(p.numel() for p in dense.stack.layers[0].mlp.parameters()) * CONFIG.n_layers
    attention = sum(p.numel() for p in dense.stack.layers[0].self_attn.parameters()) * CONFIG.n_layers
    assert count(MotLM(CONFIG, VOCAB, BOUNDARIES, Untied.FFN)) == count(dense) + 2 * ffn
    assert count(MotLM(CONFIG, VOCAB, BOUNDARIES, Untied.FFN_ATTENTION)) == count(dense) + 2 * (ffn + attention)

    text = torch.randint(0, 20, (2, 9))
    mixed = torch.cat([text, torch.randint(20, 40, (2, 3))], dim=1)
    with torch.no_grad():
        before_text, before_mixed = full(text), full(mixed)
        for layer in full.stack.layers:  # change every image weight
            for module in (layer.mlp[1], layer.self_attn[1], layer.input_layernorm[1]):
                for parameter in module.parameters():
                    parameter.add_(0.5)
        assert torch.equal(full(text), before_text)  # text never runs through image weights
        after_mixed = full(mixed)
    assert torch.equal(after_mixed[:, :9], before_mixed[:, :9])  # causal: text before the image is untouched
    assert not torch.allclose(after_mixed[:, 9:], before_mixed[:, 9:])


def test_the_audio_tokenizer_turns_sounds_into_codes_that_tell_them_apart():
    world = AudioVideoWorld(seed=2)
    clips = world.take(96)
    config = AudioVqConfig(codes=32)
    tokenizer = AudioTokenizer(config)
    waveforms = torch.from_numpy(np.stack([clip.waveform for clip in clips]))
    fit_audio_tokenizer(tokenizer, waveforms[:64], iterations=10, generator=torch.Generator().manual_seed(0))
    codes = tokenizer.encode(waveforms[64:])
    assert codes.shape == (32, config.tokens) and config.tokens == 24
    assert 0 <= int(codes.min()) and int(codes.max()) < 32 and len(codes.unique()) > 16
    assert quantisation_error(tokenizer, waveforms[64:]) < 0.6  # held out, against 1 for the mean vector
    assert tokenizer.decode(codes).shape == (32, 96, config.mel_bins)
    # The quantised spectrogram keeps the pitch: the loudest mel bin follows the shape's size.
    loud = tokenizer.decode(codes).mean(dim=1).argmax(dim=1)
    small = [i for i, clip in enumerate(clips[64:]) if clip.motion.side <= 8]
    large = [i for i, clip in enumerate(clips[64:]) if clip.motion.side >= 12]
    assert loud[small].float().mean() > loud[large].float().mean()
    half = tokenizer.encode(waveforms[64:65, :8000])  # shorter sounds are padded with silence
    assert half.shape == (1, 24)
    with pytest.raises(ValueError, match="at most 16000"):
        tokenizer.spectrogram(torch.zeros(1, 16001))


def test_the_mot_checkpoint_learned_every_modality(mot_checkpoint):
    path, metrics = mot_checkpoint
    engine = load(path)
    try:
        assert type(engine.model.lm).__name__ == "MotLM" and engine.config.modalities == ("text", "image", "audio")
        vocab = engine.config.vocab_size
        for modality in ("text", "image", "audio"):
            assert metrics[f"heldout_loss_{modality}"] < math.log(vocab)  # better than uniform over the vocabulary
        assert metrics["audio_vq_heldout_error"] < 1.0
    finally:
        engine.close()


def test_a_dense_checkpoint_refuses_sound_naming_it(cm3leon_checkpoint):
    engine = load(cm3leon_checkpoint[0])
    try:
        with pytest.raises(InvalidRequest) as refusal:
            engine.audio_caption_prompt(np.zeros(16000, dtype=np.float32))
        assert refusal.value.field == "audio" and "not trained on audio" in refusal.value.message
    finally:
        engine.close()


def test_mixed_modality_batches_step_together_and_match_the_reference(mot_checkpoint):
    """An image, image captions and sound captions decode in the same steps
    (a step's tokens span modalities) and each equals the plain reference."""
    engine = load(mot_checkpoint[0], scheduler=SchedulerConfig(max_batch_size=4, prefill_budget=16,
                                                                       short_prompt=4))
    step_modalities = []
    step = engine.model.lm.step

    def recording_step(tokens, cache):
        if tokens.shape[1] == 1:  # a decode step: one new token per row
            step_modalities.append(set(engine.model.modality_of(tokens).flatten().tolist()))
        return step(tokens, cache)

    engine.model.lm.step = recording_step
    try:
        images, sounds = ImageWorld(seed=6), AudioVideoWorld(seed=6)
        with pytest.raises(InvalidRequest, match="audio: 1.00 s of sound; this model reads up to 1 s"):
            engine.audio_caption_prompt(np.zeros(16001 + 16, dtype=np.float32))
        asks = [
            (engine.image_prompt(images[0].caption, documents=0), Cm3Params(guidance=Guidance.CLASSIFIER_FREE)),
            (engine.audio_caption_prompt(sounds[0].waveform), Cm3Params(max_new_bytes=40)),
            (engine.caption_prompt(images[1].image, documents=1),
             Cm3Params(max_new_bytes=30, guidance=Guidance.CONTRASTIVE)),
            (engine.audio_caption_prompt(sounds[1].waveform[:9000]),
             Cm3Params(max_new_bytes=25, temperature=1.0, seed=4)),
            (engine.image_prompt(images[2].caption), Cm3Params(temperature=1.0, seed=2)),
        ]
        with admitted_together(engine):
            requests = [engine.submit(prompt, params) for prompt, params in asks]
        results = [request.result() for request in requests]
        engine.model.lm.step = step
        for (prompt, params), result in zip(asks, results):
            reference = generate_reference(engine.model, engine.tokenizer, prompt, params)
            assert result.details.tokens == reference.details.tokens
            assert (result.text, result.finish_reason) == (reference.text, reference.finish_reason)
        image_ids = range(engine.config.text_vocab, engine.config.image_end)
        assert all(t in image_ids for t in results[0].details.tokens + results[4].details.tokens)
        assert any({0, 1} <= modalities for modalities in step_modalities)  # text and image codes, one step
    finally:
        engine.model.lm.step = step
        engine.close()



def test_the_flops_fraction_is_read_between_evaluations():
    from patchwork.training.mot.study import flops_fraction

    dense = [{"flops": 100.0, "heldout_loss_text": 3.0}, {"flops": 200.0, "heldout_loss_text": 2.0}]
    crossing = [{"flops": 100.0, "heldout_loss_text": 2.5}, {"flops": 200.0, "heldout_loss_text": 1.5}]
    assert flops_fraction(crossing, dense, "heldout_loss_text") == {"fraction": 0.75, "upper_bound": False}
    early = [{"flops": 100.0, "heldout_loss_text": 1.9}, {"flops": 200.0, "heldout_loss_text": 1.5}]
    assert flops_fraction(early, dense, "heldout_loss_text") == {"fraction": 0.5, "upper_bound": True}
    assert flops_fraction([{"flops": 200.0, "heldout_loss_text": 2.1}], dense, "heldout_loss_text") is None


def _law_curve(law, flops, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    return [{"flops": f, "heldout_loss_text": law(f) + noise * rng.standard_normal()} for f in flops]


def test_fitted_fractions_and_their_intervals_recover_a_known_speed_up():
    from patchwork.training.mot.fractions import PowerLaw, fitted_fraction, interval

    # A MoT run that needs 80% of the dense run's FLOPs for any loss: its curve is dense's, FLOPs scaled by 0.8.
    dense = PowerLaw(a=1.0, b=2.0, c=0.5, scale=1.0)
    faster = PowerLaw(a=1.0, b=2.0 * 0.8 ** 0.5, c=0.5, scale=1.0)
    flops = list(np.linspace(0.05, 1.0, 24))
    assert fitted_fraction(_law_curve(faster, flops), _law_curve(dense, flops), "heldout_loss_text") == \
        pytest.approx(0.8, abs=1e-3)
    # Through noise of 0.01 nats per point, three seeds: each near 0.8, the interval around it.
    fractions = [fitted_fraction(_law_curve(faster, flops, 0.01, seed), _law_curve(dense, flops, 0.01, 10 + seed),
                                 "heldout_loss_text") for seed in range(3)]
    assert all(abs(f - 0.8) < 0.1 for f in fractions), fractions
    spread = interval(fractions)
    assert spread.low < 0.8 < spread.high and spread.n == 3
    # A run slower than dense never reaches the dense run's final loss within its FLOPs.
    slower = PowerLaw(a=1.0, b=2.0 * 1.2 ** 0.5, c=0.5, scale=1.0)
    assert fitted_fraction(_law_curve(slower, flops), _law_curve(dense, flops), "heldout_loss_text") is None
    # Student's t with 2 degrees of freedom: 4.303 standard errors for 95%.
    assert interval([1.0, 2.0, 3.0]).high == pytest.approx(2.0 + 4.3027 / 3 ** 0.5, abs=1e-3)
    assert interval([0.5]).low == interval([0.5]).high == 0.5


def test_the_study_evaluates_four_times_as_often_in_the_last_quarter():
    from patchwork.training.mot.study import evaluation_steps

    steps = evaluation_steps(800, 16)
    assert steps[:12] == list(range(50, 601, 50)) and steps[-1] == 800
    late = [step for step in steps if step >= 600]
    assert max(b - a for a, b in zip(late, late[1:])) <= 12 and len(late) == 21


def test_the_study_counts_every_matmul_weight_a_token_runs_through(cm3leon_checkpoint):
    from patchwork.training.mot.study import flops_per_token

    engine = load(cm3leon_checkpoint[0])
    try:
        model = engine.model
        weights = sum(m.weight.numel() for m in model.lm.modules() if isinstance(m, torch.nn.Linear))
        batch = torch.tensor([[5, 6, 7, 0], [5, 6, 0, 0]])  # real inputs: 3 and 2 tokens (0 is <pad>)
        context = (1 + 2 + 3 + 1 + 2) / 5
        cfg = model.config.transformer
        expected = 3 * (2 * weights + 4 * cfg.dim * cfg.n_layers * context)
        assert flops_per_token(model, batch) == pytest.approx(expected)
    finally:
        engine.close()


def test_the_study_command_trains_every_backbone_on_the_same_data(tmp_path):
    import json

    out = tmp_path / "study"
    run = run_patchwork("train", "mot-study", "--preset", "tiny", "--steps", "6",
                        "--evaluations", "3", "--seeds", "2", "--out", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((out / "study.json").read_text())
    assert list(report["runs"]) == ["dense", "mot-ffn", "mot-ffn-attention", "mot-all"] and report["seeds"] == 2
    for seed in range(2):
        curves = [seeds[seed]["curve"] for seeds in report["runs"].values()]
        for curve in curves:
            assert [point["step"] for point in curve] == [2, 4, 5, 6]  # denser in the last quarter
            assert all(math.isfinite(point[key]) for point in curve
                       for key in ("heldout_loss", "heldout_loss_text", "heldout_loss_image", "heldout_loss_audio"))
        # The same batches and the same FLOPs per token: every run of a seed saw the same tokens and FLOPs.
        assert len({tuple((p["tokens"], p["flops"]) for p in curve) for curve in curves}) == 1
    # Another seed, other batches.
    assert report["runs"]["dense"][0]["curve"][-1]["tokens"] != report["runs"]["dense"][1]["curve"][-1]["tokens"]
    parameters = {name: seeds[0]["non_embedding_parameters"] for name, seeds in report["runs"].items()}
    assert parameters["dense"] < parameters["mot-ffn"] < parameters["mot-ffn-attention"] < parameters["mot-all"]
    summary = report["summary"]
    assert set(summary["flops_fraction"]) == {"mot-ffn", "mot-ffn-attention", "mot-all"}
    assert set(summary["flops_fraction"]["mot-all"]) == {"text", "image", "audio", "overall"}
    assert all(len(fraction["per_seed"]) == 2 for fraction in summary["flops_fraction"]["mot-all"].values())
    assert summary["final_loss"]["dense"]["overall"]["n"] == 2
    assert sorted(summary["ranking_by_overall_final_loss"]) == sorted(report["runs"])
    assert all(seconds > 0 for seconds in report["step_seconds"].values())
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "| mot-all |" in (out / "study.md").read_text()


def test_the_grouping_benchmark_runs_and_reports_every_case(tmp_path):
    import json

    out = tmp_path / "mot-bench.json"
    run = run_patchwork("bench", "mot", "--preset", "tiny", "--batch", "3", "--context", "8",
                        "--rounds", "2", "--json", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| decode, mixed |" in run.stdout
    assert "[bench mot] phase 3/3 done in" in run.stderr and "mot-all decode, mixed" in run.stderr
    result = json.loads(out.read_text())
    assert set(result["mot_over_dense"]) == {f"{kind}, {label}" for kind in ("decode", "prefill")
                                             for label in ("one modality", "mixed")}
    assert all(ratio > 0 for ratio in result["mot_over_dense"].values())
    assert result["parameters"]["mot-all"] > result["parameters"]["dense"]
