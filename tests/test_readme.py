"""The README's examples of calling the server (its shell commands and its
Python) run, as written, against the test server."""

from __future__ import annotations

import ast
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys

from tests.conftest import AUTH_TOKEN, MOT_MODEL, PATCHWORK, REPO, run_patchwork


def python_blocks(section: str) -> list[str]:
    """The ```python blocks of the README section headed ``section``."""
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n{section}\n")
    end = text.index("\n#", start + len(section) + 2)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def shell_commands(section: str) -> list[list[str]]:
    """The `patchwork` commands of the ```sh blocks from the README heading
    ``section`` to the next heading of its level or a higher one (but the
    title's: a shell comment starts with "# " too), without their comments."""
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n{section}\n")
    level = len(section.split()[0])
    end = re.compile(rf"\n#{{2,{level}}} ").search(text, start + len(section) + 2)
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text[start:end.start() if end else None], flags=re.S):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == [".venv/bin/patchwork"]:
                commands.append(words[1:])
    return commands


def test_every_command_the_readme_shows_for_calling_the_server_runs(grpc_target, mavil_engine, mavil_checkpoints,
                                                                     tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHWORK_TARGET", grpc_target)
    monkeypatch.setenv("PATCHWORK_AUTH_TOKEN", AUTH_TOKEN)
    commands = shell_commands("## Calling the server")
    assert [c[0] for c in commands].count("client") == 10 and {c[0] for c in commands} == {"client", "avworld", "index"}
    # The README's names, as the test server and this folder have them.
    shutil.copytree(mavil_checkpoints[1], tmp_path / "mavil")
    names = {"mot-default": MOT_MODEL, "checkpoints/mavil-default": str(tmp_path / "mavil"), "DIR": "clips",
             "NAME": "mine"}
    audio, video = mavil_engine.config.audio, mavil_engine.config.video
    for command in sorted(commands, key=lambda c: c[0] != "avworld"):  # the clips first: commands read them
        if command[0] == "avworld":  # the clips at the served model's size
            command += ["--seconds", str(audio.seconds), "--frames", str(video.frames),
                        "--image-size", str(video.image_size)]
            (tmp_path / "clip.wav").symlink_to(tmp_path / "clips" / "10000000" / "audio.wav")  # a user's recording
        # The shell's work: file name patterns, and the README's model names the test server's.
        command = [match for word in command for match in (sorted(glob.glob(word, root_dir=tmp_path)) or [word])]
        command = [names.get(word, word) for word in command]
        ran = run_patchwork(*command, cwd=tmp_path)
        assert ran.returncode == 0, (command, ran.stderr)
        assert ran.stdout.strip() or (tmp_path / "red.png").is_file() or command[0] != "client", command


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


# The load-test commands' sizes, shrunk to seconds of load on the test server.
SHRUNK = {"--users": "1", "--users-list": "1", "--duration": "2s", "--replicas": "1", "--requests": "5",
          "--ramp": "1@0s,2@2s"}
# Flags that take no value.
SWITCHES = {"--record-replicas"}


def test_every_load_test_command_the_readme_shows_runs(grpc_target, tiny_checkpoint, tmp_path):
    commands = shell_commands("### Load testing")
    assert sorted(c[1] for c in commands) == ["compare", "overhead", "run", "run", "run", "sweep"]
    names = {"model-blt-default": "model-tiny", "blt-default": "tiny", "checkpoints/blt-default": str(tiny_checkpoint)}
    reports = {"run": "summary.md", "sweep": "sweep.md", "compare": "compare.md", "overhead": "overhead.md"}
    for number, command in enumerate(commands):
        switches = [word for word in command if word in SWITCHES]
        pairs = [word for word in command[2:] if word not in SWITCHES]
        flags = {flag: SHRUNK.get(flag, value) for flag, value in zip(pairs[::2], pairs[1::2], strict=True)}
        if "--ramp" not in flags:
            flags.setdefault("--duration", SHRUNK["--duration"])
        if command[1] == "overhead":
            flags.setdefault("--requests", SHRUNK["--requests"])
        out = tmp_path / str(number)
        words = [*command[:2], *(word for flag, value in flags.items() for word in (flag, names.get(value, value))),
                 *switches, "--target", grpc_target, "--out", str(out)]
        ran = subprocess.run([*PATCHWORK, *words], cwd=REPO, capture_output=True, text=True, timeout=300)
        # A p99 objective is met or not on a busy machine: the exit status says which.
        failed_slo = "--slo-p99-ms" in flags and "FAILED" in ran.stdout
        assert ran.returncode == (3 if failed_slo else 0), (words, ran.stderr)
        assert (out / reports[command[1]]).stat().st_size > 0, words
