"""MAViL: both training stages through the CLI, the engine (batched
embeddings equal one-at-a-time ones and the embeddings the probes read),
the micro-batcher, heads, indexes and their command."""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from patchwork.engines.api import AdmissionError, DeadlineExceeded, EngineUnavailable, InvalidRequest
from patchwork.engines.batching import MicroBatcher
from patchwork.engines.checkpoint import MANIFEST_FILE, CheckpointError, add_assets, read_manifest
from patchwork.engines.loading import load
from patchwork.engines.mavil.engine import Clip
from patchwork.engines.mavil.index import asset_name
from patchwork.training.avworld import LABELS, AudioVideoWorld
from patchwork.training.mavil.probe import clip_embeddings
from patchwork.training.mavil.train import HELDOUT_START, encoder_inputs
from tests.conftest import run_patchwork

REPO = Path(__file__).resolve().parent.parent


def _clip(world_clip, audio=True, video=True) -> Clip:
    return Clip(world_clip.waveform if audio else None,
                world_clip.frames.astype(np.float32) / 255 if video else None)


@pytest.fixture(scope="module")
def engine(mavil_engine):
    return mavil_engine


@pytest.fixture(scope="module")
def world(mavil_world):
    return mavil_world


def test_both_stages_write_checkpoints_with_metrics_heads_and_an_index(mavil_checkpoints):
    stage_one, stage_two = (read_manifest(path) for path in mavil_checkpoints)
    for manifest, stage in ((stage_one, 1), (stage_two, 2)):
        metrics = manifest.training.metrics
        for name in ("probe_audio_accuracy", "probe_video_accuracy", "probe_fused_accuracy",
                     "audio_to_video_recall@1", "audio_to_video_recall@5", "video_to_audio_recall@1"):
            assert 0.0 <= metrics[name] <= 1.0
        assert metrics["audio_to_video_recall@1"] <= metrics["audio_to_video_recall@5"]
        assert manifest.training.data["stage"] == stage
        assert asset_name("heldout") in manifest.files
    assert stage_two.training.data["teacher"] == str(mavil_checkpoints[0])
    configs = [json.loads((path / "config.json").read_text()) for path in mavil_checkpoints]
    assert configs[1]["audio"] == configs[0]["audio"] and configs[1]["stage"] == 2  # the teacher's inputs
    assert configs[0]["labels"] == list(LABELS)


def test_batched_embeddings_equal_one_at_a_time_and_what_the_probes_read(engine, world):
    clips = world.take(6, start=HELDOUT_START)
    requests = [_clip(clips[0]), _clip(clips[1], video=False), _clip(clips[2], audio=False), _clip(clips[3]),
                _clip(clips[4], video=False), _clip(clips[5])]
    alone = [engine.embed(request).result() for request in requests]  # one batch each
    futures = [engine.embed(request) for request in requests]  # batched as they wait together
    together = [future.result() for future in futures]
    for one, many in zip(alone, together):
        for field in ("audio", "video", "fused", "shared_audio", "shared_video"):
            a, b = getattr(one, field), getattr(many, field)
            assert (a is None) == (b is None)
            if a is not None:
                np.testing.assert_allclose(a, b, atol=1e-5)
    assert alone[1].video is None and alone[1].fused is None and alone[2].audio is None
    assert alone[0].audio.shape == (engine.config.dim,) and alone[0].shared_audio.shape == (engine.config.embed_dim,)
    assert abs(np.linalg.norm(alone[0].shared_video) - 1) < 1e-5
    # The training path's embeddings (what the probes and heads were trained on) are the engine's.
    reference = clip_embeddings(engine.model, encoder_inputs([clips[0], clips[3]], engine.config))
    for row, served in zip(range(2), (alone[0], alone[3])):
        for field in ("audio", "video", "fused"):
            np.testing.assert_allclose(reference[field][row].numpy(), getattr(served, field), atol=1e-5)


def test_long_audio_is_embedded_window_by_window_and_pooled(engine, world):
    from patchwork.engines.mavil.engine import window_frames

    clips = world.take(3, start=HELDOUT_START + 20)
    sound = np.concatenate([clip.waveform for clip in clips])[: round(2.3 * len(clips[0].waveform))]
    frames = np.concatenate([clip.frames for clip in clips]).astype(np.float32) / 255
    window = len(clips[0].waveform)
    starts = np.linspace(0, len(sound) - window, 3).round().astype(int).tolist()
    long, short = engine.embed(Clip(sound, frames)), engine.embed(_clip(clips[0]))  # batched together
    long, short = long.result(), short.result()
    assert long.windows == 3 and short.windows == 1
    parts = [engine.embed(Clip(sound[start:start + window], part)).result()
             for start, part in zip(starts, window_frames(len(frames), starts, window, len(sound), frames))]
    for field in ("audio", "video", "fused"):
        np.testing.assert_allclose(getattr(long, field), np.mean([getattr(p, field) for p in parts], 0), atol=1e-5)
    with torch.no_grad():
        pooled = torch.from_numpy(long.audio)[None].to(next(engine.model.parameters()).dtype)
        np.testing.assert_allclose(long.shared_audio, engine.model.shared_audio(pooled)[0].float().numpy(), atol=1e-5)
    np.testing.assert_allclose(short.audio, engine.embed(_clip(clips[0])).result().audio, atol=1e-5)
    # What the head reads and what retrieval searches with are the pooled embeddings.
    assert engine.classify(long, 3)[0] == "fused"
    assert len(engine.retrieve(engine.embed(Clip(sound)).result(), "heldout", "video", 2)) == 2


def test_classification_uses_the_head_the_clip_allows(engine, world):
    clip = world[HELDOUT_START]
    for request, head in ((_clip(clip), "fused"), (_clip(clip, video=False), "audio"),
                          (_clip(clip, audio=False), "video")):
        used, labels = engine.classify(engine.embed(request).result(), 3)
        assert used == head and len(labels) == 3
        scores = [score for _, score in labels]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6
        assert {name for name, _ in labels} <= set(LABELS)
    everything = engine.classify(engine.embed(_clip(clip)).result(), 100)[1]
    assert len(everything) == len(LABELS) and abs(sum(score for _, score in everything) - 1) < 1e-5


def test_retrieval_searches_the_other_modality_of_a_named_index(engine, world):
    clip = world[HELDOUT_START + 3]
    audio_only = _clip(clip, video=False)
    assert engine.searched_modality(audio_only, "heldout") == "video"
    matches = engine.retrieve(engine.embed(audio_only).result(), "heldout", "video", 5)
    assert len(matches) == 5 and [s for _, s in matches] == sorted((s for _, s in matches), reverse=True)
    assert all(identifier.isdigit() and int(identifier) >= HELDOUT_START for identifier, _ in matches)
    # A clip's own frames score its own audio query exactly as the index stored them.
    index = engine.indexes["heldout"]
    own = index.video.ids.index(f"{HELDOUT_START + 3:06d}")
    query = engine.embed(audio_only).result().shared_audio
    assert abs(float(np.dot(index.video.vectors[own], query)) - float(
        np.dot(engine.embed(_clip(clip, audio=False)).result().shared_video, query))) < 1e-4
    with pytest.raises(InvalidRequest, match="query: a query holds one modality"):
        engine.searched_modality(_clip(clip), "heldout")
    with pytest.raises(InvalidRequest, match="index: unknown index 'other'"):
        engine.searched_modality(audio_only, "other")


def test_bad_clips_are_refused_naming_the_field(engine, world):
    clip = world[0]
    too_short = np.zeros(round(engine.config.audio.seconds * 16000 / 4) - 1, dtype=np.float32)
    cases = [(Clip(None, None), "clip: holds neither"),
             (Clip(too_short, None), r"clip.audio: .* reads at least 0.125 s \(a quarter of its 0.5 s clip\)"),
             (Clip(np.zeros((2, 100), np.float32), None), "clip.audio: expected a non-empty mono waveform"),
             (Clip(None, clip.frames[..., :2].astype(np.float32)), "clip.frames: expected RGB frames")]
    for bad, message in cases:
        with pytest.raises(InvalidRequest, match=message):
            engine.embed(bad)


# -- the micro-batcher ------------------------------------------------------------------


class _Gate:
    """A batch function that blocks until released, recording each batch it runs."""

    def __init__(self):
        self.batches, self.open, self.started = [], threading.Event(), threading.Event()

    def __call__(self, items):
        self.batches.append(list(items))
        self.started.set()
        self.open.wait(timeout=60)
        if "boom" in items:
            raise RuntimeError("boom")
        return [item * 2 for item in items]


def _batcher(gate, **options):
    settings = {"max_batch": 8, "max_wait_s": 0.0, "max_queue": 16, "stall_timeout_s": 60.0, **options}
    return MicroBatcher(gate, name="test", **settings)


def test_requests_that_wait_together_share_one_batch():
    gate = _Gate()
    batcher = _batcher(gate)
    first = batcher.submit(1)
    assert gate.started.wait(10)  # the worker is busy with the first batch
    waiting = [batcher.submit(i) for i in range(10, 20)]  # 10 wait: one batch of 8, then one of 2
    assert batcher.waiting == 10 and batcher.running == 1
    gate.open.set()
    assert first.result(10) == 2 and [f.result(10) for f in waiting] == [i * 2 for i in range(10, 20)]
    assert gate.batches == [[1], list(range(10, 18)), [18, 19]]
    batcher.close()


def test_the_queue_is_bounded_and_cancelled_or_late_requests_are_dropped():
    gate = _Gate()
    batcher = _batcher(gate, max_queue=3)
    batcher.submit(0)
    assert gate.started.wait(10)
    cancelled, late, kept = batcher.submit(1), batcher.submit(2, deadline=time.monotonic() - 1), batcher.submit(3)
    with pytest.raises(AdmissionError, match="3 requests are waiting"):
        batcher.submit(4)
    assert cancelled.cancel()
    gate.open.set()
    assert kept.result(10) == 6
    with pytest.raises(DeadlineExceeded):
        late.result(10)
    assert gate.batches == [[0], [3]]  # the cancelled and the late request never reached the model
    batcher.close()


def test_a_failing_batch_fails_its_requests_only_and_stalls_show_in_health():
    gate = _Gate()
    batcher = _batcher(gate, stall_timeout_s=0.05)
    failing = batcher.submit("boom")
    assert gate.started.wait(10)
    time.sleep(0.1)
    assert "a batch has run for over" in batcher.health()
    gate.open.set()
    with pytest.raises(RuntimeError, match="boom"):
        failing.result(10)
    assert batcher.submit(5).result(10) == 10 and batcher.health() is None
    gate.open.clear()
    gate.started.clear()
    batcher.submit(6)
    assert gate.started.wait(10)  # the worker holds 6; 7 waits behind it
    stranded = batcher.submit(7)
    assert batcher.abort_all(EngineUnavailable("drained")) == 1
    with pytest.raises(EngineUnavailable, match="drained"):
        stranded.result(10)
    gate.open.set()
    batcher.close()
    with pytest.raises(EngineUnavailable):
        batcher.submit(8)


# -- indexes and commands -----------------------------------------------------------------


def test_the_index_command_embeds_a_clip_directory_into_the_checkpoint(mavil_checkpoints, tmp_path, world):
    import shutil

    checkpoint = tmp_path / "model"
    shutil.copytree(mavil_checkpoints[1], checkpoint)
    clips = tmp_path / "clips"
    video, audio = world.frames, world.seconds
    made = run_patchwork("avworld", "--out", str(clips), "--count", "5",
                         "--frames", str(video), "--seconds", str(audio))
    assert made.returncode == 0, made.stderr
    (clips / "000001" / "audio.wav").unlink()  # a silent film: in the index's frames only
    run = run_patchwork("index", "--checkpoint", str(checkpoint), "--clips",
                        str(clips), "--name", "mine")
    assert run.returncode == 0, run.stderr
    assert "index mine: 4 clips with audio, 5 with frames" in run.stdout
    loaded = load(checkpoint)  # the manifest lists and verifies the new asset
    try:
        assert set(loaded.indexes) == {"heldout", "mine"}
        query = _clip(world[2], video=False)
        best, _ = loaded.retrieve(loaded.embed(query).result(), "mine", "video", 5)[0]
        assert len(loaded.indexes["mine"].video.ids) == 5 and best in loaded.indexes["mine"].video.ids
    finally:
        loaded.close()
    (clips / "000002" / "frame_03.png").write_bytes(b"not a png")
    bad = run_patchwork("index", "--checkpoint", str(checkpoint), "--clips",
                        str(clips), "--name", "mine")
    assert bad.returncode == 2 and "000002: frame 3 is not a readable image" in bad.stderr
    named = run_patchwork("index", "--checkpoint", str(checkpoint), "--clips",
                          str(clips), "--name", "../x")
    assert named.returncode == 2 and "index name '../x'" in named.stderr


def test_an_index_built_by_other_weights_is_refused(mavil_checkpoints, tmp_path):
    import shutil

    checkpoint = tmp_path / "model"
    shutil.copytree(mavil_checkpoints[1], checkpoint)
    foreign = (mavil_checkpoints[0] / asset_name("heldout")).read_text()  # stage 1's weights made it
    add_assets(checkpoint, {asset_name("heldout"): foreign})
    with pytest.raises(CheckpointError, match="index.heldout.json: built by other weights"):
        load(checkpoint)
    manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == {"config.json", "model.safetensors", "index.heldout.json"}
    with pytest.raises(ValueError, match="asset name"):
        add_assets(checkpoint, {"model.safetensors": "x"})


def test_the_training_command_refuses_inconsistent_stages(mavil_checkpoints, tiny_checkpoint, tmp_path):
    def train(*args):
        return run_patchwork("train", "mavil", "--preset", "tiny", "--out",
                             str(tmp_path / "out"), *args)

    missing = train("--stage", "2")
    assert missing.returncode == 2 and "--teacher is required with --stage 2" in missing.stderr
    wrong = train("--stage", "2", "--teacher", str(tiny_checkpoint))
    assert wrong.returncode == 2 and "a blt checkpoint, not a MAViL one" in wrong.stderr
    ablation = train("--stage", "2", "--teacher", str(mavil_checkpoints[0]), "--objective", "contrastive")
    assert ablation.returncode == 2 and "--objective chooses stage 1's losses" in ablation.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("objective", ["reconstruction", "contrastive"])
def test_the_ablations_keep_one_loss_alone(objective, tmp_path):
    from patchwork.engines.mavil.config import MavilConfig
    from patchwork.engines.mavil.model import MavilModel
    from patchwork.training.mavil.objective import TrainingHeads, stage_one_loss
    from patchwork.training.mavil.presets import PRESETS
    from patchwork.training.mavil.train import train_mavil

    preset = PRESETS["tiny"]()
    config = MavilConfig(audio=preset.audio, video=preset.video, audio_encoder=preset.audio_encoder,
                         video_encoder=preset.video_encoder, fusion=preset.fusion, embed_dim=preset.embed_dim)
    model = MavilModel(config)
    heads = TrainingHeads(model, preset, config.audio.patch_values, config.video.patch_values)
    batch = encoder_inputs(AudioVideoWorld(frames=config.video.frames, seconds=config.audio.seconds).take(4), config)
    terms = {o: set(stage_one_loss(model, heads, batch, preset, torch.Generator().manual_seed(0), o))
             for o in ("full", objective)}
    assert terms["full"] == {"audio", "video", "inter", "intra"}
    assert terms[objective] == ({"audio", "video"} if objective == "reconstruction" else {"inter", "intra"})
    train_mavil(preset, tmp_path / "ablation", command="tests", objective=objective, steps=2)
    assert read_manifest(tmp_path / "ablation").training.data["objective"] == objective


def test_the_evaluation_compares_a_random_encoder_with_each_checkpoint(mavil_checkpoints, tmp_path):
    out = tmp_path / "eval.json"
    run = run_patchwork("eval", "mavil", "--model",
                        f"stage-1={mavil_checkpoints[0]}", "--model", f"stage-2={mavil_checkpoints[1]}",
                        "--probe-steps", "5", "--json", str(out))
    assert run.returncode == 0, run.stderr
    results = json.loads(out.read_text())
    assert list(results) == ["random init", "stage-1", "stage-2", "retrieval references"]
    references = results.pop("retrieval references")
    assert all(0 <= value <= 1 for metrics in results.values() for value in metrics.values())
    for metrics in results.values():  # every attribute each modality carries has its probe
        assert {"audio kind", "audio glide", "audio material", "video direction", "video colour"} <= set(metrics)
    # Matching on more of what is shared narrows the clips alike: recall rises to the world's ceiling.
    recall_at_5 = [recall["recall@5"] for recall in references.values()]
    assert list(references)[-1] == "everything shared" and recall_at_5 == sorted(recall_at_5)
    assert "| stage-2 |" in run.stdout and "Chance: probe 0.083" in run.stdout
    assert "| video speed | video direction |" in run.stdout and "| kind + speed + glide |" in run.stdout
    bad = run_patchwork("eval", "mavil", "--model", f"x={tmp_path}")
    assert bad.returncode == 2 and "manifest.json: missing" in bad.stderr


def test_the_retrieval_references_count_clips_that_sound_and_look_alike():
    from patchwork.training.avworld import Motion
    from patchwork.training.mavil.attributes import SHARED, reference_recall

    class Clip_:
        def __init__(self, **fields):
            base = dict(kind="circle", colour="red", side=8, material="wood", direction="left", speed=1)
            self.motion = Motion(**{**base, **fields})

    # Left and right, colour and material are not shared: these three look and sound alike to a retriever.
    alike = [Clip_(), Clip_(direction="right", colour="blue"), Clip_(material="metal")]
    clips = [*alike, Clip_(direction="up"), Clip_(side=7)]
    ceiling = reference_recall(clips, SHARED["everything shared"])
    assert ceiling["recall@1"] == pytest.approx((3 * (1 / 3) + 1 + 1) / 5)
    assert ceiling["recall@5"] == 1.0
    # Side 7 is as small as side 8 to a listener: coarse size leaves it among the alike.
    coarse = reference_recall(clips, SHARED["kind + speed + glide + coarse size"])
    assert coarse["recall@1"] == pytest.approx((4 * (1 / 4) + 1) / 5)
    assert reference_recall(clips, SHARED["kind"])["recall@1"] == pytest.approx(1 / 5)


def test_the_default_video_tower_reads_speed_and_direction():
    # The tower check, cut to the motion it must read soonest: a fresh video
    # encoder of the default preset, trained on the labels for 200 steps.
    # (Tubelets of 2 frames x 8 x 8 pixels stayed at chance here: speed 0.38,
    # direction 0.25; the whole clip's 8 frames x 4 x 4 pixels read both.)
    from patchwork.training.loop import Schedule
    from patchwork.training.mavil.presets import PRESETS
    from patchwork.training.mavil.towers import TowerCheck, check_towers, failures

    check = TowerCheck(train_clips=1000, heldout_clips=128,
                       schedule=Schedule(steps=200, batch_size=64, lr=2e-3, warmup_fraction=0.1))
    video = check_towers(PRESETS["default"](), check, modalities=("video",))["video"]
    assert set(video) == {"kind", "size", "speed", "direction", "colour"}
    motion = {"video": {name: video[name] for name in ("speed", "direction", "colour")}}
    assert failures(motion) == [], video


def test_the_tower_check_command_reports_every_attribute_and_fails_below_the_bars(tmp_path):
    run = run_patchwork("eval", "mavil", "--towers", "--preset", "tiny", "--steps", "2", "--json",
                        str(tmp_path / "towers.json"))
    assert run.returncode == 1, run.stderr  # two steps teach nothing
    results = json.loads((tmp_path / "towers.json").read_text())
    assert set(results["audio"]) == {"kind", "size", "speed", "glide", "material"}
    assert "| video | direction |" in run.stdout and "tower check failed: video speed" in run.stderr
    # The module runs as the command does, in an interpreter of its own, from any folder.
    nothing = subprocess.run([sys.executable, "-m", "patchwork.training.mavil.evaluate"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert nothing.returncode == 2 and "--model NAME=DIR (or --towers)" in nothing.stderr


def test_the_teachers_targets_computed_once_per_clip_equal_those_of_any_batch(mavil_checkpoints, world):
    """Stage 2 computes the teacher's targets of every training clip once; a
    step's rows must be what the teacher gives that step's clips read together."""
    from patchwork.training.mavil.objective import Batch, teacher_targets
    from patchwork.training.mavil.train import load_teacher

    teacher = load_teacher(mavil_checkpoints[0])
    clips = encoder_inputs(world.take(12), teacher.config)
    once = teacher_targets(teacher, clips, chunk=5)
    picks = torch.tensor([7, 2, 2, 11, 0])
    together = teacher_targets(teacher, Batch(clips.audio[picks], clips.video[picks]))
    assert once.shape == (12, clips.audio.shape[1] + clips.video.shape[1], teacher.config.dim)
    torch.testing.assert_close(once[picks], together, rtol=1e-5, atol=1e-5)
