"""The README's Python examples run, as written, against the test server."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

from tests.conftest import AUTH_TOKEN, REPO, run_patchwork


def python_blocks(section: str) -> list[str]:
    """The ```python blocks of the README section headed ``section``."""
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n{section}\n")
    end = text.index("\n#", start + len(section) + 2)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_the_client_examples_run_against_a_server(grpc_target, mavil_engine, tmp_path):
    blocks = python_blocks("### From Python")
    assert len(blocks) == 4  # ByteLM, Multimodal, AudioVideo, and asyncio
    # The clips the README writes for its MAViL examples, with the same command, at the served model's size.
    audio, video = mavil_engine.config.audio, mavil_engine.config.video
    made = run_patchwork("avworld", "--out", "clips", "--count", "1", "--start", "10000000",
                         "--seconds", str(audio.seconds), "--frames", str(video.frames),
                         "--image-size", str(video.image_size), cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    env = {**os.environ, "PATCHWORK_TARGET": grpc_target, "PATCHWORK_AUTH_TOKEN": AUTH_TOKEN}
    run = subprocess.run([sys.executable, "-c", "\n".join(blocks)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert any(re.fullmatch(r"\d+\.\d+", line) for line in lines)  # the bits per byte of `score`
    spans, labels, matches, texts, models = (ast.literal_eval(line) for line in lines[-5:])  # lists they print
    assert (len(spans), len(labels), len(matches), len(texts)) == (2, 3, 3, 3)
    assert "tiny" in models
