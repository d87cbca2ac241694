import json
import re
from pathlib import Path

import pytest
import torch

from patchwork.engines.checkpoint import (
    CONFIG_FILE,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    TrainingRecord,
    save_checkpoint,
    sha256_of,
)
from patchwork.engines.loading import load
from tests.conftest import random_blt

RECORD = TrainingRecord(command="patchwork train blt --preset tiny", data={"source": "test"},
                        metrics={"heldout_bits_per_byte": 3.0})


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    model = random_blt(seed=1)
    return save_checkpoint(tmp_path / "model", model.cfg, model.state_dict(), RECORD)


def rewrite_json(path: Path, update: dict, fix_manifest: bool = True) -> None:
    """Edits a JSON file of the checkpoint; optionally re-hashes it so only the
    edit itself is wrong."""
    data = json.loads(path.read_text())
    data.update(update)
    path.write_text(json.dumps(data))
    if fix_manifest:
        manifest_path = path.parent / MANIFEST_FILE
        manifest = json.loads(manifest_path.read_text())
        manifest["files"][path.name] = sha256_of(path)
        manifest_path.write_text(json.dumps(manifest))


def test_round_trip_gives_the_same_model(checkpoint):
    model = random_blt(seed=1)
    engine = load(checkpoint)
    assert engine.name == "model" and engine.family == "blt"
    assert engine.manifest.training.metrics == RECORD.metrics
    tokens = torch.randint(4, 260, (2, 30))
    starts, _ = model.patch(tokens)
    patch_ids = starts.long().cumsum(1) - 1
    with torch.no_grad():
        assert torch.equal(engine.model(tokens, patch_ids), model(tokens, patch_ids))
    manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == {CONFIG_FILE, WEIGHTS_FILE}
    assert manifest["training"]["command"] == RECORD.command


def test_weights_are_safetensors_not_pickle(checkpoint):
    header_size = int.from_bytes((checkpoint / WEIGHTS_FILE).read_bytes()[:8], "little")
    header = json.loads((checkpoint / WEIGHTS_FILE).read_bytes()[8 : 8 + header_size])
    assert "local_encoder.hash_embeddings.weight" in header


def test_a_changed_byte_fails_the_hash_check(checkpoint):
    weights = checkpoint / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_FILE}: sha256 is [0-9a-f]{{64}}, {MANIFEST_FILE} expects"):
        load(checkpoint)


@pytest.mark.parametrize("missing", [CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE])
def test_a_missing_file_is_named(checkpoint, missing):
    (checkpoint / missing).unlink()
    with pytest.raises(CheckpointError, match=rf"{missing}: missing"):
        load(checkpoint)


def test_unknown_family_is_named_with_the_known_ones(checkpoint):
    rewrite_json(checkpoint / CONFIG_FILE, {"family": "gpt-17"})
    from patchwork.engines.registry import known_families

    assert {"blt", "cm3leon", "mavil"} <= set(known_families())
    with pytest.raises(CheckpointError, match=rf"{CONFIG_FILE}: unknown family 'gpt-17'; expected one of "
                                              rf"{re.escape(str(known_families()))}"):
        load(checkpoint)


def test_unsupported_format_version_says_what_is_expected(checkpoint):
    rewrite_json(checkpoint / CONFIG_FILE, {"format_version": 7})
    with pytest.raises(CheckpointError, match=rf"{CONFIG_FILE}: format_version 7 .* expected 1"):
        load(checkpoint)


def test_invalid_config_field_is_reported(checkpoint):
    rewrite_json(checkpoint / CONFIG_FILE, {"cross_attn_k": 0})
    with pytest.raises(CheckpointError, match=rf"{CONFIG_FILE}: invalid blt config: .*cross_attn_k"):
        load(checkpoint)


def test_weights_that_do_not_fit_the_config_are_reported(checkpoint):
    rewrite_json(checkpoint / CONFIG_FILE, {"cross_attn_k": 3})
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_FILE}: weights do not match {CONFIG_FILE}"):
        load(checkpoint)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load(tmp_path / "nothing-here")


def test_saving_replaces_an_old_checkpoint_whole(checkpoint):
    model = random_blt(seed=2)
    save_checkpoint(checkpoint, model.cfg, model.state_dict(), RECORD)
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["model"]
    load(checkpoint)
