"""The load-test tooling, briefly, against the test server (real Locust, real gRPC)."""

import csv
import subprocess

from tests.conftest import PATCHWORK, REPO


def loadtests(*args, timeout=300):
    return subprocess.run([*PATCHWORK, "loadtest", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


# Summary row -> the Locust statistic (run_stats.csv) it reports.
ROWS = {
    "time to first byte (stream)": "/patchwork.v1.ByteLM/GenerateStream time to first byte",
    "time per output byte (stream)": "/patchwork.v1.ByteLM/GenerateStream time per output byte",
    "inter-byte latency (stream)": "/patchwork.v1.ByteLM/GenerateStream inter-byte latency",
    "end to end, GenerateStream": "/patchwork.v1.ByteLM/GenerateStream",
    "end to end, Generate": "/patchwork.v1.ByteLM/Generate",
}


def test_a_short_run_writes_csv_summary_and_plot_and_checks_the_slo(grpc_target, tmp_path):
    common = ["--target", grpc_target, "--users", "2", "--duration", "6s", "--max-new-bytes", "8"]
    result = loadtests("run", *common, "--out", str(tmp_path / "ok"), "--slo-p99-ms", "100000")
    assert result.returncode == 0, result.stderr
    summary = (tmp_path / "ok" / "summary.md").read_text()
    assert "0 failed (error rate 0.00%)" in summary
    with open(tmp_path / "ok" / "run_stats.csv", newline="") as stats:
        counts = {row["Name"]: int(row["Request Count"]) for row in csv.DictReader(stats)}
    assert counts["Aggregated"] > 0
    # Which methods a short run calls is random (weighted tasks): every row
    # whose statistic has samples reports them, and an empty one says so.
    for row, name in ROWS.items():
        line = next(line for line in summary.splitlines() if line.startswith(f"| {row} |"))
        assert line.endswith("| - |") == (counts.get(name, 0) == 0), (row, counts)
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


def test_a_replica_comparison_scales_runs_and_reports(grpc_target, tmp_path):
    # One replica count, the one model-tiny already has: the whole path (scale,
    # run, report, plot) without changing what other tests see.
    result = loadtests("compare", "--target", grpc_target, "--replicas", "1", "--deployment", "model-tiny",
                       "--users", "1", "--duration", "3s", "--max-new-bytes", "8", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    table = (tmp_path / "compare.md").read_text().splitlines()
    assert table[0] == "1 users, model-tiny"
    assert [line.split("|")[1].strip() for line in table[4:5]] == ["1"]
    assert (tmp_path / "compare.png").stat().st_size > 0


def test_the_overhead_measurement_runs(grpc_target, tiny_checkpoint, tmp_path):
    result = loadtests("overhead", "--target", grpc_target, "--checkpoint", str(tiny_checkpoint), "--model", "tiny",
                       "--requests", "5", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = (tmp_path / "overhead.md").read_text()
    assert "5 sequential calls each" in report and "overhead p50:" in report
