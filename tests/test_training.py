"""Training through the real CLI: data sources, the manifest, and learning."""

import json
import subprocess

import pytest

from patchwork.engines.checkpoint import MANIFEST_FILE
from patchwork.engines.loading import load
from tests.conftest import run_patchwork


def train(*args: str) -> subprocess.CompletedProcess:
    return run_patchwork("train", "blt", *args)


def test_tiny_preset_learns_more_than_byte_frequencies(tiny_checkpoint):
    manifest = json.loads((tiny_checkpoint / MANIFEST_FILE).read_text())
    metrics = manifest["training"]["metrics"]
    assert metrics["heldout_bits_per_byte"] < metrics["heldout_unigram_bits_per_byte"]
    assert metrics["entropy_model_heldout_bits_per_byte"] < metrics["heldout_unigram_bits_per_byte"]
    # The threshold was calibrated to the preset's target patch size on held-out text.
    assert metrics["average_patch_length"] == pytest.approx(4.0, rel=0.1)
    assert manifest["training"]["command"].startswith("patchwork train blt --preset tiny")
    assert manifest["training"]["data"]["source"] == "python standard library sources and pydoc topics"
    engine = load(tiny_checkpoint)
    assert engine.config.patching.threshold == pytest.approx(metrics["patching_threshold"])


def test_trains_from_a_jsonl_file_with_a_target_patch_size(tmp_path):
    data = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 20})
             for i in range(200)]
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "ckpt"
    result = train("--preset", "tiny", "--out", str(out), "--data", str(data), "--steps", "3",
                   "--target-patch-size", "6")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / MANIFEST_FILE).read_text())["training"]
    assert manifest["data"]["source"] == "JSONL file docs.jsonl"
    assert manifest["data"]["documents"]["train"] + manifest["data"]["documents"]["heldout"] == 200
    assert manifest["metrics"]["target_patch_size"] == 6.0
    load(out)


def test_trains_from_a_directory(tmp_path):
    for i in range(120):
        (tmp_path / "docs").mkdir(exist_ok=True)
        (tmp_path / "docs" / f"{i}.txt").write_text(f"file {i} " + "lorem ipsum dolor sit amet " * 30)
    out = tmp_path / "ckpt"
    result = train("--out", str(out), "--data", str(tmp_path / "docs"), "--steps", "2")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / MANIFEST_FILE).read_text())["training"]["data"]["source"] == "files under docs/"


def test_bad_data_is_reported_with_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n')
    result = train("--out", str(tmp_path / "x"), "--data", str(bad))
    assert result.returncode == 2 and f"{bad}:2: not valid JSON" in result.stderr
    missing = tmp_path / "missing.jsonl"
    result = train("--out", str(tmp_path / "x"), "--data", str(missing))
    assert result.returncode == 2 and f"{missing}: no such file or directory" in result.stderr
    assert not (tmp_path / "x").exists()


def test_bad_arguments_are_rejected_before_training(tmp_path):
    result = train("--out", str(tmp_path / "x"), "--steps", "0")
    assert result.returncode == 2 and "--steps" in result.stderr
    result = train("--out", str(tmp_path / "x"), "--target-patch-size", "0.5")
    assert result.returncode == 2 and "--target-patch-size" in result.stderr
