"""Retrieval indexes for a MAViL checkpoint.

    patchwork index --checkpoint DIR --clips CLIPS --name NAME

embeds every clip of the clip directory ``CLIPS`` (``training.avworld.files``:
one sub-directory per clip with ``audio.wav`` and/or frames) with the
checkpoint's engine, batched as the server batches, and stores the index in
the checkpoint as ``index.<NAME>.json`` (replacing one of that name). A
server started afterwards serves it to ``Retrieve``; a running one serves it
after its replicas restart.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from patchwork.engines.checkpoint import WEIGHTS_FILE, CheckpointError, add_assets, read_manifest
from patchwork.engines.mavil.engine import Clip, MavilEngine, load_mavil
from patchwork.engines.mavil.index import ClipIndex, Vectors, asset_name, to_json
from patchwork.engines.wav import MediaError, read_wav, resample


def build_index(engine: MavilEngine, name: str, clips: dict[str, Clip]) -> ClipIndex:
    """The index of ``clips`` (id -> clip) under ``engine``'s weights."""
    from patchwork.engines.api import InvalidRequest

    embeddings, ids = {}, list(clips)
    for start in range(0, len(ids), engine.batcher.max_queue):  # never more than the engine lets wait
        futures = {}
        for clip_id in ids[start:start + engine.batcher.max_queue]:
            try:
                futures[clip_id] = engine.embed(clips[clip_id])
            except InvalidRequest as e:
                raise InvalidRequest(f"clip {clip_id}: {e.field}", e.message) from None
        embeddings.update({clip_id: future.result() for clip_id, future in futures.items()})
    sides = {}
    for modality in ("audio", "video"):
        found = {i: getattr(e, f"shared_{modality}") for i, e in embeddings.items()}
        found = {i: vector for i, vector in found.items() if vector is not None}
        sides[modality] = Vectors(ids=list(found), vectors=[vector.tolist() for vector in found.values()])
    weights = engine.manifest.files[WEIGHTS_FILE] if engine.manifest else ""
    return ClipIndex(name=name, weights_sha256=weights, **sides)


def read_clip(directory: Path, audio: bytes | None, frames: list[bytes]) -> Clip:
    """A clip directory's files -> a Clip (audio at 16 kHz, frames in [0, 1]); ValueError naming the file."""
    samples = None
    if audio is not None:
        try:
            samples = resample(*read_wav(audio))
        except MediaError as e:
            raise ValueError(f"{directory / 'audio.wav'}: {e}") from None
    pictures = []
    for i, data in enumerate(frames):
        try:
            pictures.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255)
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{directory}: frame {i} is not a readable image ({e})") from None
    if len({p.shape for p in pictures}) > 1:
        raise ValueError(f"{directory}: frames of different sizes")
    return Clip(samples, np.stack(pictures) if pictures else None)


def main(argv: list[str] | None = None) -> int:
    from patchwork.engines.api import InvalidRequest
    from patchwork.training.avworld.files import clip_files

    parser = argparse.ArgumentParser(prog="patchwork index", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a MAViL checkpoint directory")
    parser.add_argument("--clips", type=Path, required=True, help="a directory of clip directories")
    parser.add_argument("--name", required=True, help="the index's name (letters, digits, '_' and '-')")
    args = parser.parse_args(argv)
    try:
        asset = asset_name(args.name)
        read_manifest(args.checkpoint)
        clips = {clip_id: read_clip(args.clips / clip_id, audio, frames)
                 for clip_id, (audio, frames) in clip_files(args.clips).items()}
        engine = load_mavil(args.checkpoint)
    except (ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        index = build_index(engine, args.name, clips)
    except InvalidRequest as e:
        print(f"error: {args.clips}: {e}", file=sys.stderr)
        return 2
    finally:
        engine.close()
    add_assets(args.checkpoint, {asset: to_json(index)})
    sizes = index.size()
    print(f"index {args.name}: {sizes['audio']} clips with audio, {sizes['video']} with frames -> "
          f"{args.checkpoint / asset}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
