"""MAViL served through the real proxy: Embed, Classify and Retrieve, raw
arrays, WAV files at other rates, concurrent clips of mixed modalities, bad
input and the command-line client."""

import io
import json
import re
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from PIL import Image

from patchwork.engines.mavil.engine import Clip
from patchwork.engines.wav import resample, wav_bytes
from patchwork.training.avworld import LABELS
from patchwork.training.mavil.train import HELDOUT_START
from tests.conftest import AUTH_TOKEN, MAVIL_MODEL, run_patchwork


@pytest.fixture(scope="module")
def av(channel):
    from patchwork.v1 import audiovideo_pb2_grpc

    return audiovideo_pb2_grpc.AudioVideoStub(channel)


@pytest.fixture(scope="module")
def apb2():
    from patchwork.v1 import audiovideo_pb2

    return audiovideo_pb2


@pytest.fixture(scope="module")
def local(mavil_engine):
    """The served checkpoint, loaded here: what the server's answers must equal."""
    return mavil_engine


@pytest.fixture(scope="module")
def world(mavil_world):
    return mavil_world


def png(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return buffer.getvalue()


def array(apb2, values: np.ndarray, dtype: str | None = None):
    values = np.ascontiguousarray(values)
    little_endian = values.astype("<" + values.dtype.str[1:])
    return apb2.Array(shape=list(values.shape), dtype=dtype or values.dtype.name, data=little_endian.tobytes())


def files_clip(apb2, clip, audio=True, video=True):
    return apb2.Clip(wav=wav_bytes(clip.waveform, 16000) if audio else b"",
                     frames=[png(frame) for frame in clip.frames] if video else [])


def local_embedding(local, clip, audio=True, video=True):
    # What the server decodes from files: 16-bit PCM samples and 8-bit frames.
    samples = np.round(clip.waveform * 32767).astype(np.int16).astype(np.float32) / 32768
    return local.embed(Clip(samples if audio else None,
                            clip.frames.astype(np.float32) / 255 if video else None)).result()


def test_embed_returns_what_the_engine_computes(av, apb2, local, world):
    clip = world[HELDOUT_START]
    response = av.Embed(apb2.EmbedRequest(clip=files_clip(apb2, clip)), timeout=120)
    assert response.model == MAVIL_MODEL  # no model named: the first whose family serves Embed
    expected = local_embedding(local, clip)
    for field in ("audio", "video", "fused"):
        assert len(getattr(response, field)) == local.config.dim
        np.testing.assert_allclose(np.array(getattr(response, field)), getattr(expected, field), atol=1e-4)
    audio_only = av.Embed(apb2.EmbedRequest(clip=files_clip(apb2, clip, video=False)), timeout=120)
    assert len(audio_only.audio) == local.config.dim and not audio_only.video and not audio_only.fused
    np.testing.assert_allclose(np.array(audio_only.audio), expected.audio, atol=1e-4)


def test_embed_gives_shared_vectors_a_client_can_retrieve_with(av, apb2, local, world):
    query, candidates = world[HELDOUT_START + 6], world.take(4, start=HELDOUT_START + 7)
    heard = av.Embed(apb2.EmbedRequest(clip=files_clip(apb2, query, video=False)), timeout=120)
    assert heard.windows == 1 and not heard.shared_video
    shared_audio = np.array(heard.shared_audio)
    assert shared_audio.shape == (local.config.embed_dim,) and abs(np.linalg.norm(shared_audio) - 1) < 1e-5
    np.testing.assert_allclose(shared_audio, local_embedding(local, query, video=False).shared_audio, atol=1e-5)
    # A client's own index of video vectors ranks as the server's Retrieve scores.
    seen = [np.array(av.Embed(apb2.EmbedRequest(clip=files_clip(apb2, clip, audio=False)), timeout=120).shared_video)
            for clip in candidates]
    mine = [float(vector @ shared_audio) for vector in seen]
    expected = local.retrieve(local_embedding(local, query, video=False), "heldout", "video", 256)
    theirs = dict(expected)
    for clip, score in zip(candidates, mine):
        assert abs(theirs[f"{clip.index:06d}"] - score) < 1e-4


def test_sound_longer_than_the_models_clip_is_windowed_and_pooled(av, apb2, local, world):
    clips = world.take(3, start=HELDOUT_START + 12)
    sound = np.concatenate([clip.waveform for clip in clips])[: round(2.5 * len(clips[0].waveform))]
    frames = np.concatenate([clip.frames for clip in clips])
    clip = apb2.Clip(audio=array(apb2, sound), sample_rate=16000, video=array(apb2, frames))
    response = av.Embed(apb2.EmbedRequest(clip=clip), timeout=120)
    expected = local.embed(Clip(sound, frames.astype(np.float32) / 255)).result()
    assert response.windows == expected.windows == 3
    for field in ("audio", "video", "fused", "shared_audio", "shared_video"):
        np.testing.assert_allclose(np.array(getattr(response, field)), getattr(expected, field), atol=1e-4)
    classified = av.Classify(apb2.ClassifyRequest(clip=clip, top_k=2), timeout=120)
    assert classified.windows == 3 and classified.head == "fused"
    heard = apb2.Clip(audio=array(apb2, sound), sample_rate=16000)
    retrieved = av.Retrieve(apb2.RetrieveRequest(query=heard, index="heldout", top_k=2), timeout=120)
    assert retrieved.windows == 3 and retrieved.searched == "video"


def test_raw_arrays_and_other_sample_rates_are_read(av, apb2, local, world):
    clip = world[HELDOUT_START + 1]
    raw = apb2.Clip(audio=array(apb2, clip.waveform), sample_rate=16000, video=array(apb2, clip.frames))
    response = av.Embed(apb2.EmbedRequest(clip=raw), timeout=120)
    expected = local.embed(Clip(clip.waveform, clip.frames.astype(np.float32) / 255)).result()
    np.testing.assert_allclose(np.array(response.fused), expected.fused, atol=1e-4)
    as_floats = apb2.Clip(audio=array(apb2, clip.waveform.astype(np.float64)), sample_rate=16000,
                          video=array(apb2, clip.frames.astype(np.float32) / 255))
    np.testing.assert_allclose(np.array(av.Embed(apb2.EmbedRequest(clip=as_floats), timeout=120).fused),
                               expected.fused, atol=1e-4)
    # 44.1 kHz audio is resampled to 16 kHz as the documented resampler does it.
    t = np.arange(round(0.25 * 44100)) / 44100
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    at_44k = av.Embed(apb2.EmbedRequest(clip=apb2.Clip(audio=array(apb2, tone), sample_rate=44100)), timeout=120)
    np.testing.assert_allclose(np.array(at_44k.audio), local.embed(Clip(resample(tone, 44100))).result().audio,
                               atol=1e-4)


def test_classify_answers_with_the_head_the_clip_allows(av, apb2, local, world):
    clip = world[HELDOUT_START + 2]
    response = av.Classify(apb2.ClassifyRequest(clip=files_clip(apb2, clip), top_k=3), timeout=120)
    assert response.head == "fused" and len(response.labels) == 3
    expected = local.classify(local_embedding(local, clip), 3)[1]
    assert [label.name for label in response.labels] == [name for name, _ in expected]
    assert all(label.name in LABELS for label in response.labels)
    video_only = av.Classify(apb2.ClassifyRequest(clip=files_clip(apb2, clip, audio=False)), timeout=120)
    assert video_only.head == "video" and len(video_only.labels) == 5  # top_k 0 means 5


def test_retrieve_searches_the_other_modality_of_the_index(av, apb2, local, world):
    clip = world[HELDOUT_START + 3]
    response = av.Retrieve(apb2.RetrieveRequest(query=files_clip(apb2, clip, video=False), index="heldout",
                                                top_k=4), timeout=120)
    assert response.searched == "video" and len(response.matches) == 4
    expected = local.retrieve(local_embedding(local, clip, video=False), "heldout", "video", 4)
    assert [m.id for m in response.matches] == [identifier for identifier, _ in expected]
    scores = [m.score for m in response.matches]
    assert scores == sorted(scores, reverse=True)
    by_frames = av.Retrieve(apb2.RetrieveRequest(query=files_clip(apb2, clip, audio=False), index="heldout"),
                            timeout=120)
    assert by_frames.searched == "audio" and len(by_frames.matches) == 5


def test_concurrent_clips_of_mixed_modalities_get_their_own_answers(av, apb2, local, world):
    clips = world.take(24, start=HELDOUT_START + 10)
    shapes = [(True, True), (True, False), (False, True)]
    requests = [(clip, *shapes[i % 3]) for i, clip in enumerate(clips)]

    def call(request):
        clip, audio, video = request
        return av.Embed(apb2.EmbedRequest(clip=files_clip(apb2, clip, audio, video)), timeout=300)

    with ThreadPoolExecutor(len(requests)) as pool:
        responses = list(pool.map(call, requests))
    for (clip, audio, video), response in zip(requests, responses):
        expected = local_embedding(local, clip, audio, video)
        for field, present in (("audio", audio), ("video", video), ("fused", audio and video)):
            assert bool(getattr(response, field)) == present
            if present:
                np.testing.assert_allclose(np.array(getattr(response, field)), getattr(expected, field), atol=1e-4)


def _bad(apb2, world, local):
    clip = world[0]
    good_wav, good_png = wav_bytes(clip.waveform, 16000), png(clip.frames[0])
    too_short = np.zeros(round(local.config.audio.seconds * 16000 / 4) - 160, dtype=np.float32)
    over_the_limit = np.zeros(31 * 8000, dtype=np.int16)  # 31 s at 8 kHz: within the size bound, over 30 s
    nan = clip.waveform.copy()
    nan[3] = np.nan
    return [
        (apb2.Clip(), "clip: holds neither sound"),
        (apb2.Clip(wav=b"RIFF not really"), "clip.wav: not a readable WAV file"),
        (apb2.Clip(audio=array(apb2, nan), sample_rate=16000), "clip.audio.data: holds NaN"),
        (apb2.Clip(audio=array(apb2, clip.waveform), sample_rate=16000, wav=good_wav),
         "clip.audio: send the sound once"),
        (apb2.Clip(audio=array(apb2, clip.waveform)), "clip.sample_rate: required with audio"),
        (apb2.Clip(audio=array(apb2, clip.waveform), sample_rate=1000), "clip.sample_rate: sample rate 1000 Hz"),
        (apb2.Clip(audio=apb2.Array(shape=[10], dtype="float32", data=b"\0" * 12), sample_rate=16000),
         "clip.audio.data: 12 bytes"),
        (apb2.Clip(audio=apb2.Array(shape=[10], dtype="complex64", data=b"\0" * 80), sample_rate=16000),
         "clip.audio.dtype: 'complex64'"),
        (apb2.Clip(audio=array(apb2, np.zeros((2, 5), np.float32)), sample_rate=16000), "clip.audio.shape"),
        (apb2.Clip(audio=array(apb2, too_short), sample_rate=16000), "clip.audio: .* reads at least"),
        (apb2.Clip(audio=array(apb2, over_the_limit), sample_rate=8000), "clip.audio: 31.00 s; at most 30 s"),
        (apb2.Clip(frames=[good_png, b"not a png"]), r"clip.frames\[1\]: not a PNG or JPEG"),
        (apb2.Clip(frames=[good_png, png(np.zeros((16, 16, 3), np.uint8))]), r"clip.frames\[1\]: 16x16 pixels"),
        (apb2.Clip(frames=[good_png] * 65), "clip.frames: 65 frames; at most 64"),
        (apb2.Clip(frames=[png(np.zeros((256, 256, 3), np.uint8))] * 17), "clip.frames: over 1048576 pixels in all"),
        (apb2.Clip(video=array(apb2, np.full((2, 8, 8, 3), 2.0, np.float32))), "clip.video.data: float frames"),
        (apb2.Clip(video=array(apb2, np.zeros((2, 8, 8, 4), np.uint8))), "clip.video.shape"),
        (apb2.Clip(video=array(apb2, clip.frames), frames=[good_png]), "clip.video: send the frames once"),
        (apb2.Clip(wav=b"\0" * (768 * 1024 + 1)), "clip: 786433 bytes of sound and frames"),
    ]


def test_bad_clips_get_invalid_argument_naming_the_field(av, apb2, world, local):
    for clip, message in _bad(apb2, world, local):
        with pytest.raises(grpc.RpcError) as error:
            av.Embed(apb2.EmbedRequest(clip=clip), timeout=60)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, message
        assert re.search(message, error.value.details()), (message, error.value.details())


def test_bad_requests_of_each_rpc_name_the_field(av, apb2, world, stub):
    clip = world[1]
    audio_only, both = files_clip(apb2, clip, video=False), files_clip(apb2, clip)
    cases = [
        (av.Retrieve, apb2.RetrieveRequest(query=both, index="heldout"), "query: a query holds one"),
        (av.Retrieve, apb2.RetrieveRequest(query=audio_only, index="nope"), "index: unknown index"),
        (av.Retrieve, apb2.RetrieveRequest(query=audio_only), "index: required"),
        (av.Classify, apb2.ClassifyRequest(clip=both, top_k=101), "top_k: 101 is over"),
        (av.Embed, apb2.EmbedRequest(clip=both, model="tiny"), "model: 'tiny' .* does not serve"),
    ]
    for rpc, request, message in cases:
        with pytest.raises(grpc.RpcError) as error:
            rpc(request, timeout=60)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, message
        assert re.search(message, error.value.details()), (message, error.value.details())


def test_the_client_embeds_classifies_and_retrieves(grpc_target, tmp_path, world):
    from patchwork.training.avworld.files import write_clip

    directory = write_clip(tmp_path, world[HELDOUT_START + 5])
    frames = sorted(str(p) for p in directory.glob("frame_*.png"))

    def client(*args):
        run = run_patchwork("client", "--target", grpc_target, "--token",
                            AUTH_TOKEN, *args)
        assert run.returncode == 0, run.stderr
        return run

    embedding = client("embed", "--wav", str(directory / "audio.wav"), "--frames", *frames)
    embedded = json.loads(embedding.stdout)
    assert len(embedded["audio"]) == len(embedded["video"]) == len(embedded["fused"]) > 0
    assert len(embedded["shared_audio"]) == len(embedded["shared_video"]) > 0 and "windows=1" in embedding.stderr
    classified = client("classify", "--wav", str(directory / "audio.wav"), "--frames", *frames, "--top-k", "2")
    assert len(classified.stdout.splitlines()) == 2 and "head=fused" in classified.stderr
    retrieved = client("retrieve", "--index", "heldout", "--wav", str(directory / "audio.wav"))
    assert len(retrieved.stdout.splitlines()) == 5 and "searched=video" in retrieved.stderr
    nothing = run_patchwork("client", "--target", grpc_target, "embed")
    assert nothing.returncode != 0 and "give the clip's --wav and/or --frames" in nothing.stderr


def test_the_speed_benchmark_runs_against_a_server(grpc_target, mavil_checkpoints, tmp_path):
    out = tmp_path / "bench.json"
    run = run_patchwork("bench", "mavil", "--checkpoint", str(mavil_checkpoints[1]),
                        "--clips", "8", "--target", grpc_target, "--model", MAVIL_MODEL, "--token", AUTH_TOKEN,
                        "--json", str(out))
    assert run.returncode == 0, run.stderr
    results = json.loads(out.read_text())
    assert results["clips"] == 8
    assert "[bench mavil] phase 3/3 done in" in run.stderr and "clips/s from one client" in run.stderr
    for name in ("encoder_clips_per_s_batch_1", "encoder_clips_per_s_batch_32", "served_clips_per_s_one_client",
                 "served_clips_per_s_16_clients"):
        assert results[name] > 0
