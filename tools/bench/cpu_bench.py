#!/usr/bin/env python3
"""CPU latency of the fused MobileOne S0-S4: ONNX Runtime, PyTorch eager and `mobileone bench`, side by side.

For each variant and batch size this builds timm's `mobileone_sN` with random weights, reparameterizes it,
exports it to ONNX, and times ONNX Runtime, PyTorch eager and the release `mobileone bench --json` with the
same thread count. The three are timed in alternating rounds, so load from other processes on the machine
hits all of them alike; the table reports medians and the ratios ours/ORT and ours/PyTorch.

    tools/reference/.venv/bin/python tools/bench/cpu_bench.py            # S0-S4, batch 1 and 8, 2 threads
    tools/reference/.venv/bin/python tools/bench/cpu_bench.py --variants s0 --batches 1 --rounds 3

Build the binary first: `cargo build --release -p mobileone-cli --bin mobileone`.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["s0", "s1", "s2", "s3", "s4"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per engine")
    p.add_argument("--iters", type=int, default=20, help="timed forward passes per round (batch 1; fewer for batch 8)")
    p.add_argument("--binary", type=Path, default=REPO / "target" / "release" / "mobileone")
    p.add_argument("--markdown", type=Path, help="also write the table here")
    return p.parse_args()


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def time_callable(fn, iters):
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def main():
    args = parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import numpy as np
    import onnxruntime as ort
    import timm
    import torch
    from timm.utils.model import reparameterize_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if not args.binary.exists():
        sys.exit(f"error: {args.binary} not found; run `cargo build --release -p mobileone-cli --bin mobileone`")

    rows = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            model = timm.create_model(f"mobileone_{variant}", pretrained=False).eval()
            model = reparameterize_model(model)
            for batch in args.batches:
                iters = max(3, args.iters // batch) if batch > 1 else args.iters
                x = torch.randn(batch, 3, args.size, args.size)
                onnx_path = Path(tmp) / f"mobileone_{variant}_b{batch}.onnx"
                torch.onnx.export(model, (x,), str(onnx_path), input_names=["x"], output_names=["logits"],
                                  opset_version=17, dynamo=False)
                so = ort.SessionOptions()
                so.intra_op_num_threads = args.threads
                so.inter_op_num_threads = 1
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                session = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
                x_np = x.numpy()

                def run_ort():
                    session.run(None, {"x": x_np})

                def run_torch():
                    with torch.inference_mode():
                        model(x)

                ours_cmd = [str(args.binary), "bench", "--variant", variant, "--size", str(args.size),
                            "--batch", str(batch), "--threads", str(args.threads), "--iters", str(iters),
                            "--fused", "--json"]
                for warm in (run_ort, run_torch):
                    time_callable(warm, 10)  # oneDNN / ORT pick and cache kernels on the first calls
                ort_times, torch_times, ours_medians = [], [], []
                for _ in range(args.rounds):
                    ort_times += time_callable(run_ort, iters)
                    torch_times += time_callable(run_torch, iters)
                    out = subprocess.run(ours_cmd, check=True, capture_output=True, text=True).stdout
                    ours_medians.append(json.loads(out)["median_ms"])
                ort_ms, torch_ms = statistics.median(ort_times), statistics.median(torch_times)
                ours_ms = statistics.median(ours_medians)
                rows.append((variant.upper(), batch, ort_ms, torch_ms, ours_ms))
                print(f"{variant} batch {batch}: ORT {ort_ms:.2f} ms, PyTorch {torch_ms:.2f} ms, "
                      f"mobileone {ours_ms:.2f} ms", file=sys.stderr, flush=True)
    load_after = os.getloadavg()

    lines = [
        f"CPU: {cpu_name()}, {os.cpu_count()} logical cores, {args.threads} threads, {args.size}x{args.size}, "
        f"fused random-weight models, medians over {args.rounds} alternating rounds; "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after. "
        f"onnxruntime {ort.__version__}, torch {torch.__version__}, timm {timm.__version__}.",
        "",
        "| variant | batch | ONNX Runtime (ms) | PyTorch eager (ms) | mobileone (ms) | ours / ORT | ours / PyTorch |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, batch, ort_ms, torch_ms, ours_ms in rows:
        lines.append(f"| {variant} | {batch} | {ort_ms:.2f} | {torch_ms:.2f} | {ours_ms:.2f} | "
                     f"{ours_ms / ort_ms:.2f} | {ours_ms / torch_ms:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = args.markdown.with_suffix(".tmp")
        tmp_path.write_text(table + "\n")
        tmp_path.replace(args.markdown)


if __name__ == "__main__":
    main()
