"""Each Triton kernel against the torch eager code it replaces, on one device.

    patchwork bench kernels --all [--json OUT] [--markdown OUT] [--blt-checkpoint DIR]
    TRITON_INTERPRET=1 patchwork bench kernels --kernel rms_norm --device cpu

For every kernel (``KERNELS``; each module's ``bench_case`` builds its
inputs): the Triton result is checked against the baseline's on the device,
then each is timed: the median of ``--repeats`` rounds (CUDA events on a
GPU, the host clock elsewhere), a round being one call on each input set
back to back, the sets together exceeding twice the L2 cache. Reported: the times, the kernel's speed-up over
eager, its achieved GB/s (the least bytes a call must move / time) against
the device's copy bandwidth measured here (a large device-to-device copy),
and for the compute-bound grouped linear its TFLOP/s against a dense matmul
of the same total size and a large bf16 matmul. Targets on an H100/H200
class GPU: memory-bound kernels at least 70% of the copy bandwidth and 2x
eager; the grouped linear at least 60% of the dense matmul's TFLOP/s.
``--all`` runs every kernel and, given ``--blt-checkpoint``, the BLT
generation benchmark on the same device.

Each phase (the peaks, each kernel) says on stderr when it starts and what it
measured when it ends (``training.progress``).

On a CPU, Triton runs in its interpreter (``TRITON_INTERPRET=1 patchwork
bench kernels --device cpu ...``): the numbers there say nothing about
speed; the mode exists so that the test suite runs the benchmark end to end.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from patchwork.training.progress import Phases

# Each case: the module whose ``bench_case`` builds it, and that function's options.
KERNELS = {
    "rms_norm": ("patchwork.kernels.rmsnorm", {}),
    "add_rms_norm": ("patchwork.kernels.add_rmsnorm", {}),
    "add_rms_norm_backward": ("patchwork.kernels.add_rmsnorm", {"backward": True}),
    "entropy_boundary": ("patchwork.kernels.entropy", {}),
    "hash_embedding": ("patchwork.kernels.hash_embedding", {}),
    "grouped_linear": ("patchwork.kernels.grouped_linear", {}),
    "guidance": ("patchwork.kernels.guidance", {}),
}
DTYPES = ("bfloat16", "float16", "float32")


def timer(device) -> Callable[[Callable[[], Any]], float]:
    """Seconds one call takes: CUDA events on a GPU, the host clock elsewhere."""
    if device.type == "cuda":
        def cuda_seconds(call: Callable[[], Any]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000

        return cuda_seconds

    def host_seconds(call: Callable[[], Any]) -> float:
        start = time.perf_counter()
        call()
        return time.perf_counter() - start

    return host_seconds


def median_seconds(function: Callable[..., Any], inputs: list[tuple], repeats: int, device) -> float:
    """Seconds per call: the median over ``repeats`` rounds, each timing one
    call on every input set back to back (so a short kernel's time is not
    its launch and the clock's overhead), divided by the number of sets."""
    seconds = timer(device)
    for arguments in inputs[:2]:  # compilation and caches
        function(*arguments)

    def round_of_calls() -> None:
        for arguments in inputs:
            function(*arguments)

    return statistics.median(seconds(round_of_calls) for _ in range(repeats)) / len(inputs)


def peaks(device, dtype) -> dict:
    """The device's copy bandwidth (bytes read + written per second) and its
    matmul rate in ``dtype``, each the best of a few large operations."""
    gpu = device.type == "cuda"
    source = torch.ones((2**30 if gpu else 2**24) // 4, device=device)
    target = torch.empty_like(source)
    seconds = timer(device)
    copy_s = min(seconds(lambda: target.copy_(source)) for _ in range(10))
    size = 8192 if gpu else 256
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b
    matmul_s = min(seconds(lambda: a @ b) for _ in range(10))
    return {"copy_bytes_per_s": 2 * source.numel() * 4 / copy_s, "matmul_flops_per_s": 2 * size**3 / matmul_s,
            "matmul_size": size}


def difference(actual: Any, expected: Any, tolerance: tuple[float, float]) -> dict:
    """How far the kernel's outputs are from the baseline's: the largest
    absolute error over floating outputs, the count of other elements
    (booleans, ids, infinities) that differ, and whether all is within tolerance."""
    actual = actual if isinstance(actual, tuple) else (actual,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    error, mismatched, close = 0.0, 0, True
    for got, want in zip(actual, expected):
        if got.is_floating_point():
            finite = torch.isfinite(want)
            mismatched += int((torch.isfinite(got) != finite).sum() + (got[~finite] != want[~finite]).sum())
            gap = (got[finite].float() - want[finite].float()).abs()
            error = max(error, float(gap.max()) if gap.numel() else 0.0)
            atol, rtol = tolerance
            close &= bool((gap <= atol + rtol * want[finite].float().abs()).all())
        else:
            mismatched += int((got != want).sum())
    return {"max_abs_error": error, "mismatched": mismatched, "ok": close and not mismatched}


@contextmanager
def checking_threads(device):
    """The correctness check runs torch on one CPU thread: with two, the eager
    entropy of a process's first check was seen 2e-4 nats off its float64
    value (the kernel's was 1e-6 off), and never with one. Serving engines
    run one thread per scheduler anyway; the timings keep every thread."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def measure(name: str, scale: int, device, dtype, repeats: int, peak: dict) -> dict:
    from patchwork.kernels import dispatch

    module, options = KERNELS[name]
    case = importlib.import_module(module).bench_case(scale, device, dtype, **options)
    launches = sum(dispatch.launches.values())
    with checking_threads(device):
        check = difference(case.triton(*case.inputs[0]), case.baseline(*case.inputs[0]), case.tolerance)
    if sum(dispatch.launches.values()) == launches:
        raise RuntimeError(f"{name}: the Triton call launched no Triton kernel")
    triton_s = median_seconds(case.triton, case.inputs, repeats, device)
    baseline_s = median_seconds(case.baseline, case.inputs, repeats, device)
    result = {
        **check, "triton_s": triton_s, "baseline_s": baseline_s, "speedup": baseline_s / triton_s,
        "bytes_moved": case.bytes_moved, "bytes_per_s": case.bytes_moved / triton_s,
        "fraction_of_copy": case.bytes_moved / triton_s / peak["copy_bytes_per_s"],
        "case": case.name, "input_sets": len(case.inputs),
    }
    if case.flops:
        result["flops_per_s"] = case.flops / triton_s
        result["fraction_of_matmul_peak"] = result["flops_per_s"] / peak["matmul_flops_per_s"]
        if case.dense is not None:
            dense_s = median_seconds(case.dense, case.inputs, repeats, device)
            result["dense_s"] = dense_s
            result["fraction_of_dense"] = dense_s / triton_s  # same flops: the ratio of rates
    return result


def markdown(result: dict) -> str:
    peak = result["peaks"]
    lines = [
        f"Device: {result['machine']['device_name']} ({result['machine']['device']}), {result['dtype']}, "
        f"torch {result['machine']['torch']}, triton {result['machine']['triton']}",
        f"Measured peaks: copy {peak['copy_bytes_per_s'] / 1e9:.0f} GB/s, {peak['matmul_size']}^3 matmul "
        f"{peak['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s",
        "",
        "| kernel | correct (max error) | Triton | eager | speed-up | GB/s | of copy | TFLOP/s | of dense |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, kernel in result["kernels"].items():
        correct = "yes" if kernel["ok"] else f"NO ({kernel['mismatched']} differ)"
        flops = f"{kernel['flops_per_s'] / 1e12:.1f}" if "flops_per_s" in kernel else ""
        dense = f"{100 * kernel['fraction_of_dense']:.0f}%" if "fraction_of_dense" in kernel else ""
        lines.append(
            f"| {kernel['case']} | {correct} ({kernel['max_abs_error']:.2g}) | {1e6 * kernel['triton_s']:.1f} us | "
            f"{1e6 * kernel['baseline_s']:.1f} us | {kernel['speedup']:.2f}x | {kernel['bytes_per_s'] / 1e9:.0f} | "
            f"{100 * kernel['fraction_of_copy']:.0f}% | {flops} | {dense} |")
    if "blt" in result:
        blt = result["blt"]
        lines += ["", f"BLT generation on this device: batch 1 {blt['incremental_batch1']['bytes_per_s']:.1f} B/s, "
                      f"{blt['streams']} streams {blt['incremental_streams']['bytes_per_s']:.1f} B/s"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="patchwork bench kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every kernel (and the BLT benchmark, given a checkpoint)")
    parser.add_argument("--kernel", action="append", choices=sorted(KERNELS), help="one kernel (repeatable)")
    parser.add_argument("--device", help="cuda (the default where there is one) or cpu (Triton's interpreter)")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--scale", type=int, help="input size factor (default: 64 on a GPU, 1 elsewhere)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--blt-checkpoint", type=Path, help="with --all: also run benchmarks.blt on it")
    parser.add_argument("--blt-options", default="", help="more options for benchmarks.blt (one string)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    args = parser.parse_args(argv)
    if not args.all and not args.kernel:
        parser.error("name a --kernel or pass --all")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("on a CPU the kernels run in Triton's interpreter: set TRITON_INTERPRET=1 (before Python starts)")
    import triton

    dtype = getattr(torch, args.dtype)
    scale = args.scale or (64 if device.type == "cuda" else 1)
    names = sorted(KERNELS) if args.all else args.kernel
    phases = Phases("bench kernels", 1 + len(names))
    with phases("the device's copy bandwidth and matmul peak") as phase:
        peak = peaks(device, dtype)
        phase.result = f"{peak['copy_bytes_per_s'] / 1e9:.1f} GB/s, {peak['matmul_flops_per_s'] / 1e12:.2f} TFLOP/s"
    kernels = {}
    for name in names:
        with phases(f"kernel {name}") as phase:
            kernels[name] = measure(name, scale, device, dtype, args.repeats, peak)
            phase.result = (f"{'correct' if kernels[name]['ok'] else 'WRONG'}, {kernels[name]['speedup']:.2f}x eager, "
                            f"{kernels[name]['bytes_per_s'] / 1e9:.1f} GB/s")
    result: dict = {
        "machine": {
            "device": str(device), "torch": torch.__version__, "triton": triton.__version__,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or platform.machine(),
        },
        "dtype": args.dtype, "scale": scale, "repeats": args.repeats, "peaks": peak, "kernels": kernels,
    }
    if args.all and args.blt_checkpoint:  # the BLT benchmark reports its own phases
        from patchwork.benchmarks import blt as blt_bench

        result["blt"] = blt_bench.run(blt_bench.parse_args([
            "--checkpoint", str(args.blt_checkpoint), "--device", str(device), "--dtype", args.dtype,
            "--skip-transformers", *shlex.split(args.blt_options),
        ]))
    text = markdown(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n")
    print(text)
    return 0 if all(kernel["ok"] for kernel in result["kernels"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
