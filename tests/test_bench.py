"""The generation benchmark runs end to end (tiny sizes), so it cannot rot."""

import json
import re
import subprocess

from tests.conftest import PATCHWORK, REPO


def test_the_benchmark_runs_and_reports_every_measurement(tiny_checkpoint, tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [*PATCHWORK, "bench", "blt", "--checkpoint", str(tiny_checkpoint), "--new-bytes", "24",
         "--streams", "3", "--prompt-bytes", "16", "--long-prompt-bytes", "300", "--peer-bytes", "16",
         "--device", "cpu", "--dtype", "float32", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert result["machine"]["device"] == "cpu"
    assert result["reference"]["same_output_as_incremental"]
    assert result["incremental_streams"]["bytes"] == 3 * 24
    assert result["weights"]["held_bytes"] == result["weights"]["parameter_bytes"]
    uncached = result["transformers"]["uncached"]
    assert uncached["same_output_as_incremental"]  # the peer computes what the engine computes, at its own size
    assert uncached["streams"]["bytes"] == 3 * 16 and result["batch1_over_transformers_uncached"] > 0
    assert result["incremental_at_peer_size"]["new_bytes"] == 16
    assert set(result["transformers"]) == {"cached", "uncached"}
    floor = result["decode_step_batch1"]
    assert floor["ops_per_step"] > 10 and floor["floor_s"] == floor["ops_per_step"] * floor["small_op_s"]
    interference = result["interference"]
    assert interference["long_prompt_bytes"] == 300 and interference["normal_step_s"] > 0
    assert set(interference["resident_bytes"]) == {"before", "during_peak", "after"}
    for line in ("incremental batch 1 / reference", "beside 8 running streams", "resident memory", "decode step",
                 "transformers generate (uncached, 16 bytes a prompt): the engine's bytes exactly"):
        assert line in run.stdout
    # Progress on stderr: each phase as it starts, and as it ends with what it measured.
    started = re.findall(r"^\[bench blt\] phase (\d+)/(\d+): ", run.stderr, re.M)
    ended = re.findall(r"^\[bench blt\] phase (\d+)/(\d+) done in [\d.]+ s: (.+)$", run.stderr, re.M)
    total = int(started[0][1])
    assert total == 10  # load, batch 1, step, reference, streams, bandwidth, long prompt, engine at 16 bytes, peer x2
    assert [int(n) for n, _ in started] == [int(n) for n, _, _ in ended] == list(range(1, total + 1))
    assert "bytes/s" in ended[1][2] and "transformers generate (uncached), 16 bytes" in ended[-1][2]
