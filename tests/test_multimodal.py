"""CM3Leon served through the real proxy: GenerateImage, Caption (of images and sounds), Infill,
both backbones (dense and Mixture-of-Transformers), bad input and fuzzing."""

import io
import json
import struct
import subprocess
import sys
import zlib

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from patchwork.engines.wav import resample, wav_bytes
from patchwork.training.avworld import AudioVideoWorld
from patchwork.training.imageworld import ImageWorld
from tests.conftest import CM3LEON_MODEL, MOT_MODEL, RECORDED_IMAGE_DEFAULTS, run_patchwork, wait_serving


@pytest.fixture(scope="module")
def mm(channel):
    from patchwork.v1 import multimodal_pb2_grpc

    return multimodal_pb2_grpc.MultimodalStub(channel)


@pytest.fixture(scope="module")
def mpb2():
    from patchwork.v1 import multimodal_pb2

    return multimodal_pb2


def encoded(pixels: np.ndarray, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=format)
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds almost none (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_images_are_generated_ranked_and_reproducible(mm, mpb2):
    decoding = mpb2.Decoding(guidance=mpb2.GUIDANCE_MIXED, temperature=1.0, seed=5)
    request = mpb2.GenerateImageRequest(prompt="a large red circle at the top left", samples=4, decoding=decoding)
    response = mm.GenerateImage(request, timeout=120)
    assert response.model == CM3LEON_MODEL  # no model named: the first that serves GenerateImage
    assert len(response.images) == 4
    scores = [image.score for image in response.images]
    assert scores == sorted(scores, reverse=True) and all(s < 0 for s in scores)
    # The paper's mix: half classifier-free, half CD-K.
    assert sorted(image.guidance for image in response.images) == [mpb2.GUIDANCE_CLASSIFIER_FREE] * 2 + [
        mpb2.GUIDANCE_CONTRASTIVE] * 2
    for image in response.images:
        with Image.open(io.BytesIO(image.png)) as decoded:
            assert (decoded.format, decoded.size, decoded.mode) == ("PNG", (32, 32), "RGB")
    again = mm.GenerateImage(request, timeout=120)
    assert [image.png for image in again.images] == [image.png for image in response.images]
    guided = mm.GenerateImage(mpb2.GenerateImageRequest(
        prompt="a small blue square at the bottom right", documents=0, model=CM3LEON_MODEL,
        decoding=mpb2.Decoding(guidance=mpb2.GUIDANCE_CLASSIFIER_FREE, guidance_scale=2.0)), timeout=120)
    assert len(guided.images) == 1 and guided.images[0].guidance == mpb2.GUIDANCE_CLASSIFIER_FREE


def _pngs(mm, mpb2, **fields) -> list[bytes]:
    return [image.png for image in mm.GenerateImage(mpb2.GenerateImageRequest(
        prompt="a large green square at the top right", samples=2, **fields), timeout=120).images]


def test_a_request_that_sets_nothing_gets_the_models_defaults_which_list_models_shows(mm, mpb2, channel):
    from patchwork.engines.cm3leon.decoding import FAMILY_DEFAULTS
    from patchwork.v1 import models_pb2, models_pb2_grpc

    listed = {m.name: json.loads(m.defaults_json) for m in
              models_pb2_grpc.ModelsStub(channel).ListModels(models_pb2.ListModelsRequest(), timeout=30).models}
    assert listed[CM3LEON_MODEL]["image"] == RECORDED_IMAGE_DEFAULTS  # from the checkpoint's manifest
    assert listed[MOT_MODEL]["image"] == FAMILY_DEFAULTS["image"].model_dump(mode="json")  # none recorded
    assert listed[CM3LEON_MODEL]["text"]["temperature"] == 0.0 and listed["tiny"] == {}
    guidance = {"classifier_free": mpb2.GUIDANCE_CLASSIFIER_FREE, "contrastive": mpb2.GUIDANCE_CONTRASTIVE}
    for model in (CM3LEON_MODEL, MOT_MODEL):
        defaults = listed[model]["image"]
        spelled_out = mpb2.Decoding(guidance=guidance[defaults["guidance"]], **{name: defaults[name] for name in (
            "guidance_scale", "temperature", "top_p", "contrastive_alpha", "contrastive_k")})
        unset = _pngs(mm, mpb2, model=model)
        assert unset == _pngs(mm, mpb2, model=model, decoding=spelled_out, documents=defaults["documents"])
    # Each setting a request names replaces its default alone.
    recorded = RECORDED_IMAGE_DEFAULTS
    for changed in ({"guidance_scale": 0.0}, {"top_p": 1.0}, {"temperature": 0.5}):
        alone = _pngs(mm, mpb2, model=CM3LEON_MODEL, decoding=mpb2.Decoding(**changed))
        spelled_out = {"guidance": mpb2.GUIDANCE_CLASSIFIER_FREE, **{name: recorded[name] for name in (
            "guidance_scale", "temperature", "top_p", "contrastive_alpha", "contrastive_k")}, **changed}
        assert alone == _pngs(mm, mpb2, model=CM3LEON_MODEL, decoding=mpb2.Decoding(**spelled_out),
                              documents=recorded["documents"])


def test_a_request_passes_on_exactly_the_settings_it_names_zero_included(mpb2):
    from patchwork.serving.config import Limits
    from patchwork.serving.multimodal import explicit_decoding

    limits = Limits()
    assert explicit_decoding(mpb2.Decoding(), 0, limits) == {"seed": 0, "top_k": 0}  # the rest: the model's
    named = mpb2.Decoding(guidance=mpb2.GUIDANCE_MIXED, guidance_scale=0.0, temperature=0.0, top_p=0.0, seed=3,
                          contrastive_alpha=0.5, contrastive_k=1)
    assert explicit_decoding(named, 0, limits) == {  # a scale of 0 is the unconditional stream, not "the default"
        "seed": 3, "top_k": 0, "guidance_scale": 0.0, "temperature": 0.0, "top_p": 0.0, "contrastive_alpha": 0.5,
        "contrastive_k": 1, "guidance": "mixed"}


def test_a_captions_default_budget_is_what_the_context_leaves(mm, mpb2, cm3leon_checkpoint):
    from patchwork.engines.cm3leon.tokenizer import TextTokenizer

    positions = 512  # the tiny preset's context (the server's engine allows more)
    tokenizer = TextTokenizer.from_json((cm3leon_checkpoint[0] / "tokenizer.json").read_text())
    # <img> 64 codes </img> <break> alt-text <break>; "~" is a token of its own.
    alt_text = "~" * (positions - 68 - 5)
    assert len(tokenizer.encode(alt_text)) == len(alt_text)
    image = encoded(ImageWorld(seed=12)[3].image)
    fits = mm.Caption(mpb2.CaptionRequest(image=image, alt_text=alt_text, documents=0), timeout=120)
    assert len(fits.text.encode()) <= 5  # the server's default (16) does not fit: the 5 positions left do
    with pytest.raises(grpc.RpcError) as refusal:  # a budget the request names is its own
        mm.Caption(mpb2.CaptionRequest(image=image, alt_text=alt_text, documents=0, max_new_bytes=16), timeout=120)
    assert refusal.value.details() == (f"max_new_bytes: prompt ({positions - 5}) plus max_new_bytes (16) need "
                                       f"{positions + 11} cache positions; a sequence may use at most {positions}")
    with pytest.raises(grpc.RpcError) as refusal:
        mm.Caption(mpb2.CaptionRequest(image=image, alt_text=alt_text + "~" * 5, documents=0), timeout=120)
    assert refusal.value.details() == (f"alt_text: the prompt takes {positions} of the model's {positions} "
                                       "positions and leaves none to write in")


def test_captions_and_infills_come_back_as_text(mm, mpb2):
    example = ImageWorld(seed=12)[3]
    for data in (encoded(example.image), encoded(example.image, "JPEG"), encoded(np.kron(
            example.image, np.ones((2, 2, 1), dtype=np.uint8)))):  # 64x64: resized to the model's 32x32
        response = mm.Caption(mpb2.CaptionRequest(image=data, max_new_bytes=40), timeout=120)
        assert response.model == CM3LEON_MODEL and 0 < len(response.text.encode()) <= 40
    realigned = mm.Caption(mpb2.CaptionRequest(image=encoded(example.image), alt_text=example.alt_text,
                                                max_new_bytes=40, documents=1), timeout=120)
    assert len(realigned.text.encode()) <= 40
    infill = mm.Infill(mpb2.InfillRequest(text="a large <mask> circle at the <mask>", image=encoded(example.image),
                                          max_new_bytes=30), timeout=120)
    assert infill.model == CM3LEON_MODEL and len(infill.spans) == 2
    assert len("".join(infill.spans).encode()) <= 30


def test_a_mot_checkpoint_serves_the_same_rpcs(mm, mpb2):
    example = ImageWorld(seed=13)[2]
    decoding = mpb2.Decoding(guidance=mpb2.GUIDANCE_MIXED, temperature=1.0, seed=3)
    images = mm.GenerateImage(mpb2.GenerateImageRequest(prompt=example.caption, samples=2, decoding=decoding,
                                                        model=MOT_MODEL), timeout=120)
    assert images.model == MOT_MODEL and len(images.images) == 2
    for image in images.images:
        with Image.open(io.BytesIO(image.png)) as decoded:
            assert decoded.size == (32, 32)
    caption = mm.Caption(mpb2.CaptionRequest(image=encoded(example.image), alt_text=example.alt_text,
                                             max_new_bytes=30, documents=1, model=MOT_MODEL), timeout=120)
    assert caption.model == MOT_MODEL and len(caption.text.encode()) <= 30
    infill = mm.Infill(mpb2.InfillRequest(text="a <mask> square", max_new_bytes=20, model=MOT_MODEL), timeout=120)
    assert len(infill.spans) == 1


def test_a_model_trained_on_sound_captions_wav_files_at_any_rate(mm, mpb2):
    clip = AudioVideoWorld(seed=9)[4]
    plain = mm.Caption(mpb2.CaptionRequest(audio=wav_bytes(clip.waveform, 16000), max_new_bytes=40,
                                           model=MOT_MODEL), timeout=120)
    assert plain.model == MOT_MODEL and len(plain.text.encode()) <= 40
    # 44.1 kHz is resampled to 16 kHz; half a second is padded with silence.
    for sound, rate in ((resample(clip.waveform, 16000, 44100), 44100), (clip.waveform[:8000], 16000)):
        again = mm.Caption(mpb2.CaptionRequest(audio=wav_bytes(sound, rate), max_new_bytes=40, model=MOT_MODEL),
                           timeout=120)
        assert len(again.text.encode()) <= 40


SOUND = wav_bytes(AudioVideoWorld(seed=1)[0].waveform, 16000)
BAD = [
    ("Caption", {"audio": SOUND, "model": CM3LEON_MODEL},
     "audio: model cm3leon was not trained on audio (it reads text and image)"),
    ("Caption", {"audio": SOUND, "image": "png", "model": MOT_MODEL}, "audio: send an image or a sound, not both"),
    ("Caption", {"audio": SOUND, "alt_text": "x", "model": MOT_MODEL},
     "alt_text: re-aligns an image's text; a sound has none"),
    ("Caption", {"audio": SOUND, "documents": 1, "model": MOT_MODEL},
     "documents: retrieval finds images; a sound's caption reads none"),
    ("Caption", {"audio": b"RIFF not really", "model": MOT_MODEL},
     "audio: not a readable WAV file (Not a WAV file. RIFF form type is b' rea'.)"),
    ("Caption", {"audio": wav_bytes(np.zeros(32000), 16000), "model": MOT_MODEL},
     "audio: 2.00 s of sound; this model reads up to 1 s"),
    ("Caption", {"audio": wav_bytes(np.zeros(100), 2000), "model": MOT_MODEL},
     "audio: sample rate 2000 Hz; expected 4000 to 192000"),
    ("GenerateImage", {"prompt": "x", "samples": 5}, "samples: 5 is over the limit of 4"),
    ("GenerateImage", {"prompt": "x" * 1537}, "prompt: 1537 bytes is over the limit of 1536"),
    ("GenerateImage", {"prompt": "x", "decoding": {"guidance_scale": 500.0}},
     "decoding.guidance_scale: Input should be less than or equal to 100"),
    ("GenerateImage", {"prompt": "x", "decoding": {"guidance": 9}}, "decoding.guidance: unknown value 9"),
    ("GenerateImage", {"prompt": "x", "samples": 2, "decoding": {"temperature": 0.0}},
     "decoding.temperature: 0 (greedy) makes all 2 samples the same; sample with a temperature above 0, or ask "
     "for one sample"),
    ("GenerateImage", {"prompt": "x", "documents": 3}, "documents: 3 retrieved documents; this model takes 0 to 2"),
    ("GenerateImage", {"prompt": "x", "model": "tiny"},
     "model: 'tiny' (family blt) does not serve GenerateImage; it serves Generate, GenerateStream, Score"),
    ("Caption", {}, "image: an image is required (PNG or JPEG)"),
    ("Caption", {"image": b"GIF89a not really"}, "image: not a PNG or JPEG image"),
    ("Caption", {"image": "gif"}, "image: not a PNG or JPEG image"),
    ("Caption", {"image": "wide"}, "image: 300x8 pixels; at most 256 on a side"),
    ("Caption", {"image": "bomb"}, "image: declares too many pixels; at most 256 on a side"),
    ("Caption", {"image": "large"}, "image: 2000x2000 pixels; at most 256 on a side"),
    ("Caption", {"image": "png", "max_new_bytes": 5000}, "max_new_bytes: 5000 is over the limit of 1900"),
    ("Infill", {"text": "nothing masked"}, "text: no <mask> to fill"),
    ("Infill", {"text": "<mask>" * 17}, "text: 17 masks; at most 16"),
    ("Infill", {"text": "a <mask>", "image": b"\x89PNG\r\n\x1a\n broken"}, "image: not a PNG or JPEG image"),
]


def _image(name) -> bytes:
    pixels = ImageWorld(seed=1)[0].image
    if name == "gif":
        return encoded(pixels, "GIF")
    if name == "wide":
        return encoded(np.zeros((8, 300, 3), dtype=np.uint8))
    if name == "bomb":
        return png_header(100_000, 100_000)
    if name == "large":
        return png_header(2000, 2000)
    return encoded(pixels)


@pytest.mark.parametrize("method, fields, details", BAD)
def test_bad_input_is_refused_naming_the_field(mm, mpb2, method, fields, details):
    fields = dict(fields)
    if isinstance(fields.get("image"), str):
        fields["image"] = _image(fields["image"])
    if "decoding" in fields:
        fields["decoding"] = mpb2.Decoding(**fields["decoding"])
    request = {"GenerateImage": mpb2.GenerateImageRequest, "Caption": mpb2.CaptionRequest,
               "Infill": mpb2.InfillRequest}[method](**fields)
    with pytest.raises(grpc.RpcError) as refusal:
        getattr(mm, method)(request, timeout=60)
    assert (refusal.value.code(), refusal.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, details)


def test_a_byte_model_refuses_multimodal_calls_and_cm3leon_refuses_byte_calls(stub, pb2):
    with pytest.raises(grpc.RpcError) as refusal:
        stub.Generate(pb2.GenerateRequest(prompt=b"x", model=CM3LEON_MODEL), timeout=60)
    assert refusal.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refusal.value.details() == ("model: 'cm3leon' (family cm3leon) does not serve Generate; it serves "
                                       "Caption, GenerateImage, Infill")


def test_the_client_writes_images_captions_and_spans(grpc_target, tmp_path):
    from tests.conftest import AUTH_TOKEN

    def client(*args):
        run = run_patchwork("client", "--target", grpc_target, "--token",
                            AUTH_TOKEN, *args)
        assert run.returncode == 0, run.stderr
        return run

    out = tmp_path / "red.png"
    client("image", "a red circle", "--out", str(out), "--samples", "2", "--guidance", "cfg")
    assert Image.open(out).size == (32, 32) and Image.open(tmp_path / "red-1.png").size == (32, 32)
    caption = client("caption", str(out), "--alt-text", "stock photo")
    assert "[cm3leon]" in caption.stderr
    sound = tmp_path / "clip.wav"
    sound.write_bytes(SOUND)
    heard = client("--model", MOT_MODEL, "caption", str(sound))
    assert f"[{MOT_MODEL}]" in heard.stderr
    spans = client("infill", "a <mask> circle at the <mask>")
    assert len(spans.stdout.splitlines()) == 2
    # The module runs the same code as the command, in an interpreter of its own, from any folder.
    module = subprocess.run([sys.executable, "-m", "patchwork.serving.client", "--target", grpc_target, "--token",
                             AUTH_TOKEN, "infill", "a <mask> circle at the <mask>"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert module.returncode == 0 and module.stdout == spans.stdout, module.stderr
    missing = run_patchwork("client", "--target", grpc_target, "caption",
                            str(tmp_path / "absent.png"))
    assert missing.returncode != 0 and "absent.png" in missing.stderr


PROPER = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
decodings = st.fixed_dictionaries({}, optional={
    "guidance": st.integers(0, 6), "temperature": st.floats(width=32), "top_p": st.floats(width=32),
    "top_k": st.integers(0, 2**32 - 1), "guidance_scale": st.floats(width=32),
    "contrastive_alpha": st.floats(width=32), "contrastive_k": st.integers(0, 2**32 - 1),
    "seed": st.integers(0, 2**64 - 1),
})


@pytest.mark.timeout(900)
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(method=st.sampled_from(["GenerateImage", "Caption", "Sound", "Infill", "raw"]),
       text=st.one_of(st.text(st.characters(exclude_categories=("Cs",)), max_size=200),
                      st.just("a <mask> circle"), st.just("<mask>")),
       image=st.one_of(st.binary(max_size=300), st.sampled_from(["png", "gif", "wide"])), decoding=decodings,
       samples=st.integers(0, 6), documents=st.one_of(st.none(), st.integers(0, 4)),
       max_new_bytes=st.sampled_from([0, 3, 10**6]),
       sound=st.one_of(st.binary(max_size=300), st.integers(0, len(SOUND)).map(lambda n: SOUND[:n])))
def test_fuzzed_multimodal_requests_get_proper_status_codes(mm, mpb2, channel, method, text, image, decoding,
                                                            samples, documents, max_new_bytes, sound):
    image = _image(image) if isinstance(image, str) else image
    extra = {} if documents is None else {"documents": documents}
    try:
        if method == "GenerateImage":
            mm.GenerateImage(mpb2.GenerateImageRequest(prompt=text, samples=samples, decoding=mpb2.Decoding(
                **decoding), **extra), timeout=120)
        elif method == "Caption":
            mm.Caption(mpb2.CaptionRequest(image=image, alt_text=text, max_new_bytes=max_new_bytes,
                                           decoding=mpb2.Decoding(**decoding), **extra), timeout=120)
        elif method == "Sound":
            mm.Caption(mpb2.CaptionRequest(audio=sound, max_new_bytes=max_new_bytes, decoding=mpb2.Decoding(
                **decoding), model=MOT_MODEL), timeout=120)
        elif method == "Infill":
            mm.Infill(mpb2.InfillRequest(text=text, image=image, max_new_bytes=max_new_bytes,
                                         decoding=mpb2.Decoding(**decoding)), timeout=120)
        else:
            channel.unary_unary("/patchwork.v1.Multimodal/Caption")(image, timeout=120)
        code = grpc.StatusCode.OK
    except grpc.RpcError as e:
        code = e.code()
    assert code in PROPER, (method, text, image[:40], decoding, code)


def test_still_serving_after_the_multimodal_fuzzing(grpc_target, mm, mpb2):
    wait_serving(grpc_target, timeout_s=60)
    response = mm.GenerateImage(mpb2.GenerateImageRequest(prompt="a white square", documents=1), timeout=120)
    assert len(response.images) == 1
