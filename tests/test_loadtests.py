"""The load-test tooling, briefly, against the test server (real Locust, real gRPC)."""

import csv
import re
import subprocess

import pytest

from patchwork.loadtests.plan import FAMILIES, RPCS
from patchwork.serving.families import SERVED
from tests.conftest import CM3LEON_MODEL, MAVIL_MODEL, PATCHWORK, REPO, WIDE_MODEL


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


def stats(prefix) -> dict[str, dict]:
    """Locust's statistics of a run (``run_stats.csv``) by entry name."""
    with open(f"{prefix}_stats.csv", newline="") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


def test_a_short_run_writes_csv_summary_and_plot_and_checks_the_slo(grpc_target, tmp_path):
    common = ["--target", grpc_target, "--mix", "blt", "--max-new-bytes", "8"]
    # A ramp from one user to two and back, with the replicas recorded.
    result = loadtests("run", *common, "--ramp", "1@0s,2@3s,2@5s,1@6s", "--record-replicas",
                       "--out", str(tmp_path / "ok"), "--slo-p99-ms", "100000")
    assert result.returncode == 0, result.stderr
    summary = (tmp_path / "ok" / "summary.md").read_text()
    assert summary.startswith("## up to 2 users (1@0s,2@3s,2@5s,1@6s)")
    assert "0 failed (error rate 0.00%)" in summary
    with open(tmp_path / "ok" / "run_stats_history.csv", newline="") as f:
        users = {int(row["User Count"]) for row in csv.DictReader(f)}
    assert users <= {0, 1, 2} and 2 in users
    from patchwork.loadtests import replicas

    recorded = replicas.read(tmp_path / "ok" / "run_replicas.csv")
    tiny = [sample for sample in recorded if sample.deployment == "model-tiny"]
    assert len(tiny) >= 2 and {(s.target, s.running) for s in tiny} == {(1, 1)}
    assert "| model-tiny | 1 | 1 | 1 |" in summary
    # Without --model, the server's default model answers ByteLM.
    assert all(f"| {rpc} | tiny | {spec.weight} |" in summary for rpc, spec in RPCS.items() if spec.family == "blt")
    counts = {name: int(row["Request Count"]) for name, row in stats(tmp_path / "ok" / "run").items()}
    assert counts["Aggregated"] > 0
    # Which methods a short run reaches is random (a round's order is): every
    # row whose statistic has samples reports them, and an empty one says so.
    for row, name in ROWS.items():
        line = next(line for line in summary.splitlines() if line.startswith(f"| {row} |"))
        assert line.endswith("| - |") == (counts.get(name, 0) == 0), (row, counts)
    for name in ("run_stats.csv", "run_stats_history.csv", "latency_over_time.png"):
        assert (tmp_path / "ok" / name).stat().st_size > 0
    assert "SLO ttfb p99 <= 100000.0 ms: met" in result.stdout
    strict = loadtests("run", *common, "--users", "2", "--duration", "4s", "--out", str(tmp_path / "slo"),
                       "--slo-p99-ms", "0.001")
    assert strict.returncode == 3 and "FAILED" in strict.stdout


# RPC -> its service, as Locust's entries name calls.
SERVICES = {rpc: {"blt": "ByteLM", "cm3leon": "Multimodal", "mavil": "AudioVideo"}[spec.family]
            for rpc, spec in RPCS.items()}


def test_a_mixed_run_calls_every_rpc_of_every_family_and_reports_each_in_its_unit(grpc_target, serving_config,
                                                                                   tmp_path):
    # Every RPC at the same weight, and two images a GenerateImage; as many users as RPCs, so
    # each RPC is some user's first call (however busy the machine). A user has one call in
    # flight, so every model must take all users at once (a GenerateImage's samples are a
    # sequence each) for no call to be refused however the calls bunch up: ByteLM goes to
    # `wide`, the model with room for that.
    users, samples = len(RPCS), 2
    models = {"blt": WIDE_MODEL, "cm3leon": CM3LEON_MODEL, "mavil": MAVIL_MODEL}
    for family, model in models.items():
        options, engine = serving_config.options_for(model), serving_config.engine_for(model)
        assert users <= options.max_ongoing_requests and (
            users * (samples if family == "cm3leon" else 1) <= engine.max_batch_size + engine.max_queue), model
    mix = ",".join(f"{rpc}=1" for rpc in RPCS)
    result = loadtests("run", "--target", grpc_target, "--mix", mix, "--model", WIDE_MODEL, "--users", str(users),
                       "--duration", "10s", "--max-new-bytes", "8", "--samples", str(samples), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert "0 failed (error rate 0.00%)" in summary
    rows = stats(tmp_path / "run")
    for rpc, spec in RPCS.items():
        row = rows[f"/patchwork.v1.{SERVICES[rpc]}/{rpc}"]
        requests = int(row["Request Count"])
        assert requests > 0 and int(row["Failure Count"]) == 0, rpc
        line = next(line for line in summary.splitlines() if line.startswith(f"| {rpc} |"))
        assert line.startswith(f"| {rpc} | {models[spec.family]} | 1 | {requests} | 0 |")
        assert line.endswith(f" {spec.unit}/s |")
        assert f"| end to end, {rpc} |" in summary
    image = rows["/patchwork.v1.Multimodal/GenerateImage"]
    assert float(image["Average Content Size"]) == 2.0  # images a response holds
    assert all(float(rows[f"/patchwork.v1.AudioVideo/{rpc}"]["Average Content Size"]) == 1.0
               for rpc in ("Embed", "Classify", "Retrieve"))  # one clip a request
    outputs = re.search(r"output throughput (.*)\.$", summary, flags=re.M).group(1)
    units = [re.fullmatch(r"[0-9.]+ ([a-z ]+)/s", part).group(1) for part in outputs.split(", ")]
    assert units == ["bytes", "scored bytes", "images", "captions", "infills", "clips"]
    assert (tmp_path / "latency_over_time.png").stat().st_size > 0


def test_a_family_sweep_reports_its_units_and_knee(grpc_target, tmp_path):
    result = loadtests("sweep", "--target", grpc_target, "--mix", "cm3leon", "--users-list", "1,2",
                       "--duration", "4s", "--max-new-bytes", "8", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "sweep.md").read_text().splitlines()
    family = ("GenerateImage", "Caption", "Infill")
    assert lines[0] == "mix: " + ", ".join(f"{rpc}=1 ({CM3LEON_MODEL})" for rpc in family)
    assert lines[2] == "| users | requests/s | images/s | captions/s | infills/s | errors |"
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines[4:6]]
    assert [row[0] for row in rows] == ["1", "2"] and [row[-1] for row in rows] == ["0.00%", "0.00%"]
    latency = lines.index("End to end (ms):")
    assert lines[latency + 2].startswith("| users | GenerateImage p50 | GenerateImage p99 | Caption p50 |")
    assert [line.split("|")[1].strip() for line in lines[latency + 4:latency + 6]] == ["1", "2"]
    # The knee: where two users did not add 10% requests per second (none failed) to one's.
    one, two = (float(row[1]) for row in rows)
    assert lines[-1] == ("Knee: throughput (successful requests/s) stops growing (under 10% more at the next user "
                         "count) at 1 users." if two < 1.1 * one else
                         "No knee: throughput (successful requests/s) grew by 10% or more at every step.")
    assert (tmp_path / "sweep.png").stat().st_size > 0


def test_a_mix_or_model_that_cannot_run_is_refused_naming_the_flag(tmp_path):
    nobody = ["--target", "127.0.0.1:1", "--duration", "2s", "--out", str(tmp_path)]
    for mix, message in [("Generate=3,Reverse=1", "--mix 'Generate=3,Reverse=1': unknown RPC 'Reverse'"),
                         ("Embed=two", "--mix 'Embed=two': the weight of Embed must be a whole number"),
                         ("bytes", "--mix 'bytes': 'bytes' is neither RPC=WEIGHT, a family")]:
        refused = loadtests("run", "--mix", mix, *nobody)  # checked before any server is looked for
        assert refused.returncode == 2 and f"error: {message}" in refused.stderr, refused.stderr


def test_a_mix_or_model_the_server_cannot_answer_is_refused_naming_the_flag(grpc_target, tmp_path):
    common = ["--target", grpc_target, "--duration", "2s", "--out", str(tmp_path)]
    for flags, message in [(["--model", "nosuch"], "--model nosuch: not served (served: autoscaled, bounded, cm3leon,"),
                           (["--model", "echo"], "--model echo: its family 'echo' has no load-test users"),
                           (["--model", "tiny", "--model", "wide"], "--model wide: tiny is already blt's model"),
                           (["--mix", "Generate=0"], "--mix 'Generate=0': no RPC left to call"),
                           (["--mix", "mavil", "--slo-p99-ms", "100"],
                            "--slo-metric ttfb: the --mix 'mavil' has no GenerateStream")]:
        refused = loadtests("run", *flags, *common)
        assert refused.returncode == 2 and f"error: {message}" in refused.stderr, (flags, refused.stderr)
    assert not (tmp_path / "run_stats.csv").exists()


def test_the_load_tests_call_every_rpc_of_the_families_they_drive():
    for family in FAMILIES:
        assert {rpc for rpc, spec in RPCS.items() if spec.family == family} == SERVED[family].rpcs


def test_only_loopback_targets_and_bounded_runs(tmp_path):
    remote = loadtests("run", "--target", "192.0.2.10:9000", "--out", str(tmp_path))
    assert remote.returncode == 2 and "only target loopback addresses" in remote.stderr
    unbounded = loadtests("run", "--target", "127.0.0.1:1", "--duration", "forever", "--out", str(tmp_path))
    assert unbounded.returncode == 2 and "--duration 'forever'" in unbounded.stderr
    nobody = loadtests("run", "--target", "127.0.0.1:1", "--duration", "2s", "--out", str(tmp_path))
    assert nobody.returncode == 2 and "no healthy server at 127.0.0.1:1" in nobody.stderr
    both = loadtests("run", "--target", "127.0.0.1:1", "--ramp", "1@0s,2@5s", "--users", "3", "--out", str(tmp_path))
    assert both.returncode == 2 and "--ramp sets the users and the duration" in both.stderr


def test_the_replica_recorder_writes_as_it_goes_and_stops_cleanly(grpc_target, tmp_path):
    import signal
    import sys

    from patchwork.loadtests import replicas
    from tests.helpers import wait_until

    out = tmp_path / "replicas.csv"
    recorder = subprocess.Popen([sys.executable, "-m", "patchwork.loadtests.replicas", str(out), "--interval-s", "0.2"],
                                cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        assert recorder.stdout.readline().strip() == replicas.READY
        wait_until(lambda: len({s.timestamp for s in replicas.read(out)}) >= 3, timeout_s=120, interval_s=0.2,
                   what="three readings")
    finally:
        recorder.send_signal(signal.SIGTERM)
        assert recorder.wait(timeout=60) == 0  # its own handler ends it, the file whole
    tiny = [s for s in replicas.read(out) if s.deployment == "model-tiny"]
    assert len(tiny) >= 3 and {(s.target, s.running) for s in tiny} == {(1, 1)}


def test_replicas_that_cannot_be_read_are_reported_naming_the_flag(monkeypatch, tmp_path):
    from patchwork.loadtests import replicas

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # no cluster there
    with pytest.raises(replicas.RecorderError, match="--record-replicas: the replicas cannot be read"):
        with replicas.recording(tmp_path / "run_replicas.csv"):
            pass


def test_a_ramp_moves_in_straight_lines_between_its_points_and_a_bad_one_is_refused():
    from patchwork.loadtests.plan import PlanError, parse_ramp, users_at

    ramp = parse_ramp("1@0s,21@10s,5@10s,5@20s")
    assert [users_at(ramp, t) for t in (0, 2.5, 5, 10, 10.5, 15, 20, 30)] == [1, 6, 11, 21, 5, 5, 5, 5]
    assert [(p.at_s, p.users) for p in parse_ramp("2@0s,4@1m")] == [(0, 2), (60, 4)]
    refusals = {"2@5s,3@9s": "the first at 0s", "1@0s,x@5s": "'x@5s' is not USERS@TIME",
                "1@0s,2@soon": "'soon' is not a time", "1@0s,4@9s,2@6s": "in order of time",
                "0@0s,0@5s": "no point has a user", "1@0s": "two points or more"}
    for text, message in refusals.items():
        with pytest.raises(PlanError, match=re.escape(message)):
            parse_ramp(text)


def test_a_replica_comparison_scales_runs_and_reports(grpc_target, tmp_path):
    # One replica count, the one model-tiny already has: the whole path (scale,
    # run, report, plot) without changing what other tests see.
    result = loadtests("compare", "--target", grpc_target, "--mix", "blt", "--replicas", "1", "--deployment",
                       "model-tiny", "--users", "1", "--duration", "3s", "--max-new-bytes", "8", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    table = (tmp_path / "compare.md").read_text().splitlines()
    assert table[0] == "1 users, model-tiny"
    assert [line.split("|")[1].strip() for line in table[4:5]] == ["1"]
    assert (tmp_path / "compare.png").stat().st_size > 0


def test_the_overhead_of_each_familys_smallest_call_is_measured(grpc_target, serving_config, tmp_path):
    served = {name: str(serving_config.checkpoints / name) for name in ("tiny", CM3LEON_MODEL, MAVIL_MODEL)}
    result = loadtests("overhead", "--target", grpc_target, "--requests", "5", "--out", str(tmp_path),
                       *(arg for name, path in served.items() for arg in ("--checkpoint", path, "--model", name)))
    assert result.returncode == 0, result.stderr
    report = (tmp_path / "overhead.md").read_text()
    for call in ("1-byte Generate", "1-image GenerateImage", "1-clip Embed"):
        assert f"{call}, 5 sequential calls each" in report
    assert report.count("overhead p50:") == 3
    unpaired = loadtests("overhead", "--target", grpc_target, "--checkpoint", served["tiny"], "--checkpoint",
                         served[MAVIL_MODEL], "--model", "tiny")
    assert unpaired.returncode == 2 and "give one model per checkpoint" in unpaired.stderr
