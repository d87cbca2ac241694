"""The kernel benchmark runs end to end on the CPU (Triton's interpreter,
tiny sizes), so it cannot rot; its numbers mean something only on a GPU."""

import json
import os
import subprocess

from patchwork.benchmarks.kernels import KERNELS
from tests.conftest import PATCHWORK, REPO


def test_the_kernel_benchmark_checks_and_times_every_kernel(tiny_checkpoint, tmp_path):
    out, table = tmp_path / "kernels.json", tmp_path / "kernels.md"
    run = subprocess.run(
        [*PATCHWORK, "bench", "kernels", "--all", "--device", "cpu", "--dtype", "float32", "--repeats", "1",
         "--blt-checkpoint", str(tiny_checkpoint),
         "--blt-options", "--new-bytes 8 --streams 2 --prompt-bytes 8 --long-prompt-bytes 0",
         "--json", str(out), "--markdown", str(table)],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert set(result["kernels"]) == set(KERNELS)
    for name, kernel in result["kernels"].items():
        assert kernel["ok"] and kernel["mismatched"] == 0, name
        assert kernel["triton_s"] > 0 and kernel["baseline_s"] > 0 and kernel["bytes_moved"] > 0
    grouped = result["kernels"]["grouped_linear"]
    assert grouped["flops_per_s"] > 0 and grouped["fraction_of_dense"] > 0
    assert result["peaks"]["copy_bytes_per_s"] > 0 and result["blt"]["incremental_batch1"]["bytes"] == 8
    rows = table.read_text()
    assert "| grouped_linear[" in rows and "| NO" not in rows and "BLT generation on this device" in run.stdout
    total = 1 + len(KERNELS)  # the peaks, then each kernel; then the BLT benchmark's own phases
    assert f"[bench kernels] phase {total}/{total} done in" in run.stderr and "[bench blt] phase 1/" in run.stderr


def test_on_a_cpu_it_asks_for_the_interpreter():
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    run = subprocess.run([*PATCHWORK, "bench", "kernels", "--kernel", "rms_norm", "--device", "cpu"],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env=environment)
    assert run.returncode == 2 and "set TRITON_INTERPRET=1" in run.stderr
