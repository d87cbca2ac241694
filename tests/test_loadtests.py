"""The load-test tooling, briefly, against the test server (real Locust, real gRPC)."""

import subprocess
import sys

from tests.conftest import REPO


def loadtests(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "loadtests", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_a_short_run_writes_csv_summary_and_plot_and_checks_the_slo(grpc_target, tmp_path):
    common = ["--target", grpc_target, "--users", "2", "--duration", "4s", "--max-new-bytes", "8"]
    result = loadtests("run", *common, "--out", str(tmp_path / "ok"), "--slo-p99-ms", "100000")
    assert result.returncode == 0, result.stderr
    summary = (tmp_path / "ok" / "summary.md").read_text()
    assert "0 failed (error rate 0.00%)" in summary
    for row in ("time to first byte (stream)", "time per output byte (stream)", "inter-byte latency (stream)",
                "end to end, GenerateStream", "end to end, Generate"):
        line = next(line for line in summary.splitlines() if line.startswith(f"| {row} |"))
        assert not line.endswith("| - |"), f"no samples for {row}"
    for name in ("run_stats.csv", "run_stats_history.csv", "latency_over_time.png"):
        assert (tmp_path / "ok" / name).stat().st_size > 0
    assert "SLO ttfb p99 <= 100000.0 ms: met" in result.stdout
    strict = loadtests("run", *common, "--out", str(tmp_path / "slo"), "--slo-p99-ms", "0.001")
    assert strict.returncode == 3 and "FAILED" in strict.stdout


def test_a_sweep_finds_throughput_per_user_count(grpc_target, tmp_path):
    result = loadtests("sweep", "--target", grpc_target, "--users-list", "1,2", "--duration", "3s",
                       "--max-new-bytes", "8", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    table = (tmp_path / "sweep.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in table[2:4]] == ["1", "2"]
    assert (tmp_path / "sweep.png").stat().st_size > 0


def test_only_loopback_targets_and_bounded_runs(tmp_path):
    remote = loadtests("run", "--target", "192.0.2.10:9000", "--out", str(tmp_path))
    assert remote.returncode == 2 and "only target loopback addresses" in remote.stderr
    unbounded = loadtests("run", "--target", "127.0.0.1:1", "--duration", "forever", "--out", str(tmp_path))
    assert unbounded.returncode == 2 and "--duration 'forever'" in unbounded.stderr
    nobody = loadtests("run", "--target", "127.0.0.1:1", "--duration", "2s", "--out", str(tmp_path))
    assert nobody.returncode == 2 and "no healthy server at 127.0.0.1:1" in nobody.stderr
