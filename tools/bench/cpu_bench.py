#!/usr/bin/env python3
"""CPU latency of the fused MobileOne S0-S4: ONNX Runtime, PyTorch eager and `mobileone bench`, side by side.

For each variant and batch size this builds timm's `mobileone_sN` with random weights, reparameterizes it,
exports it to ONNX, and times ONNX Runtime, PyTorch eager and the release `mobileone bench --json` with the
same thread count. The three are timed in alternating short rounds, so load from other processes on the
machine hits all of them alike. Each round gives one median per engine; the table reports the median of
those round medians, the ratios ours/ORT and ours/PyTorch, and ours/ORT over the fastest round of each
(the least disturbed one, a better estimate on a busy machine).

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
PAUSE_S = 0.5


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["s0", "s1", "s2", "s3", "s4"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds per engine")
    p.add_argument("--iters", type=int, default=10, help="timed forward passes per round at batch 1 (batch B: iters/B, at least 2)")
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
                iters = max(2, args.iters // batch)
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
                            "--warmup", "2", "--fused", "--json"]
                for warm in (run_ort, run_torch):
                    time_callable(warm, max(2, 10 // batch))  # oneDNN / ORT pick and cache kernels first
                ort_rounds, torch_rounds, ours_rounds = [], [], []
                for _ in range(args.rounds):
                    # The pauses let each engine's idle worker threads stop spinning (OpenMP, ORT's
                    # pool) before the next engine runs, so none is timed against the previous one.
                    time.sleep(PAUSE_S)
                    ort_rounds.append(statistics.median(time_callable(run_ort, iters)))
                    time.sleep(PAUSE_S)
                    torch_rounds.append(statistics.median(time_callable(run_torch, iters)))
                    time.sleep(PAUSE_S)
                    out = subprocess.run(ours_cmd, check=True, capture_output=True, text=True).stdout
                    ours_rounds.append(json.loads(out)["median_ms"])
                ort_ms, torch_ms = statistics.median(ort_rounds), statistics.median(torch_rounds)
                ours_ms = statistics.median(ours_rounds)
                best_ratio = min(ours_rounds) / min(ort_rounds)
                rows.append((variant.upper(), batch, ort_ms, torch_ms, ours_ms, best_ratio))
                print(f"{variant} batch {batch}: ORT {ort_ms:.2f} ms, PyTorch {torch_ms:.2f} ms, "
                      f"mobileone {ours_ms:.2f} ms", file=sys.stderr, flush=True)
    load_after = os.getloadavg()

    lines = [
        f"CPU: {cpu_name()}, {os.cpu_count()} logical cores, {args.threads} threads, {args.size}x{args.size}, "
        f"fused random-weight models, median of {args.rounds} alternating rounds' medians; "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after. "
        f"onnxruntime {ort.__version__}, torch {torch.__version__}, timm {timm.__version__}.",
        "",
        "| variant | batch | ONNX Runtime (ms) | PyTorch eager (ms) | mobileone (ms) | ours / ORT | ours / PyTorch "
        "| ours / ORT, fastest rounds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant, batch, ort_ms, torch_ms, ours_ms, best_ratio in rows:
        lines.append(f"| {variant} | {batch} | {ort_ms:.2f} | {torch_ms:.2f} | {ours_ms:.2f} | "
                     f"{ours_ms / ort_ms:.2f} | {ours_ms / torch_ms:.2f} | {best_ratio:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = args.markdown.with_suffix(".tmp")
        tmp_path.write_text(table + "\n")
        tmp_path.replace(args.markdown)


if __name__ == "__main__":
    main()
