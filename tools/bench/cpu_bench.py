#!/usr/bin/env python3
"""CPU latency, side by side in one run: ONNX Runtime, OpenVINO and `mobileone bench`, on the fused MobileOne
S0-S4 classifiers and on the whole SSDLite-320 and DeepLabV3-512 networks.

Each model is built in PyTorch with random weights exactly as the parity fixtures build it (timm's
`mobileone_sN`, reparameterised; torchvision's SSD with SSDLite extras and heads, 91 classes; torchvision's
DeepLabV3 with a 256-wide ASPP, rates 12/24/36, output stride 16, 21 classes), exported to ONNX and run by
ONNX Runtime (CPU provider) and OpenVINO (CPU, f32 precision hint; bf16 too where the CPU has bf16 or AMX,
for reference), with the same thread count as the release `mobileone bench --json` (which builds the same
networks natively). The whole networks are timed without default boxes / NMS (SSDLite: trunk, extras and
heads; DeepLabV3: trunk, head and the final bilinear resize).

The engines run in alternating short rounds (pauses between them so idle worker threads stop spinning), and
each round times every model in turn, so load from elsewhere hits all alike and a slow phase of the host
(minutes long) touches a round or two of every row; the table gives the median of the round medians, ours /
ORT from those, and the median over the rounds of ours / ORT within one round (seconds apart, so a slow
phase divides out). Ours runs as a fresh process each round, so it first makes as many untimed passes as
it times (the other engines stay warm in this process; with two warm-up passes S0 at batch 1 measured ~25 %
slower than in a warm process). Ours runs once per SIMD level given by --simd (MOBILEONE_SIMD; the GEMMs keep gemm's own choice), so an AVX-512
machine also measures the AVX2 path; there ONNX Runtime runs a second time held to its own AVX2 kernels
(ort_avx2.py, in a worker process), and the AVX2 column is divided by that.

    tools/reference/.venv/bin/python tools/bench/cpu_bench.py                 # everything, 2 threads
    tools/reference/.venv/bin/python tools/bench/cpu_bench.py --models s0 ssdlite --rounds 3

Build first: `cargo build --release -p mobileone-cli --bin mobileone`; `pip install openvino` in the venv.
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
sys.path.insert(0, str(REPO / "tools" / "reference"))
from ort_avx2 import cpu_session, patched_package  # noqa: E402 (tools/bench is this script's folder)
PAUSE_S = 0.5
ORT_AVX2 = "ONNX Runtime (avx2)"
CLASSIFIERS = ["s0", "s1", "s2", "s3", "s4"]
WHOLE = {"ssdlite": 320, "deeplabv3": 512}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=CLASSIFIERS + list(WHOLE),
                   help="s0..s4 (classifiers, 224 px), ssdlite (S0, 320 px), deeplabv3 (S0, 512 px)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="batch sizes of the classifiers")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per engine")
    p.add_argument("--iters", type=int, default=10,
                   help="timed passes per round at batch 1 (batch B: iters/B, at least 2)")
    p.add_argument("--simd", nargs="+", default=None,
                   help="SIMD levels to run ours at (default: the best this CPU has, and avx2 if that is avx512)")
    p.add_argument("--no-bf16", action="store_true", help="skip OpenVINO bf16")
    p.add_argument("--binary", type=Path, default=REPO / "target" / "release" / "mobileone")
    p.add_argument("--markdown", type=Path, help="also write the report here")
    return p.parse_args()


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") or line.startswith("Features"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def simd_summary(flags):
    wanted = ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_bf16",
              "amx_tile", "asimd", "sve"]
    return " ".join(f for f in wanted if f in flags) or "none of avx2/avx512/neon"


def reference(ours, engines):
    """The ONNX Runtime column `ours (level)` is divided by: the one at the same SIMD level where there is one."""
    return ORT_AVX2 if ours == "ours (avx2)" and ORT_AVX2 in engines else "ONNX Runtime"


def ask(worker, request):
    """One JSON-line request to the ONNX Runtime AVX2 worker process and its answer."""
    worker.stdin.write(json.dumps(request) + "\n")
    worker.stdin.flush()
    line = worker.stdout.readline()
    if not line:
        sys.exit(f"error: the ONNX Runtime AVX2 worker exited (request {request})")
    return json.loads(line)


def ours_times(cmd, level):
    """`mobileone bench --json` at one SIMD level, as a fresh process: its median pass time (ms), as a
    one-element list (the other engines' runners return every pass's time)."""
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env={**os.environ, "MOBILEONE_SIMD": level}).stdout
    result = json.loads(out)
    if result["simd"] != level:
        sys.exit(f"error: asked for {level}, ours ran {result['simd']}")
    return [result["median_ms"]]


def time_callable(fn, iters):
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def build_torch(name):
    """(module, input size, our `bench --model` name) of one benchmark model, fused, in eval mode."""
    import timm
    import torch.nn as nn
    from timm.utils.model import reparameterize_model

    if name in CLASSIFIERS:
        return reparameterize_model(timm.create_model(f"mobileone_{name}", pretrained=False)).eval(), 224, "classifier"
    if name == "ssdlite":
        from ssdlite_fixtures import build_model

        body = timm.create_model("mobileone_s0", pretrained=False, num_classes=0)
        ssd = build_model(body, (256, 1024), [512, 256, 256, 128], 91).eval()
        ssd.backbone.body = reparameterize_model(ssd.backbone.body)

        class Network(nn.Module):
            """The SSD network without the transform, default boxes and post-processing."""

            def __init__(self, ssd):
                super().__init__()
                self.backbone, self.head = ssd.backbone, ssd.head

            def forward(self, x):
                out = self.head(list(self.backbone(x).values()))
                return out["bbox_regression"], out["cls_logits"]

        return Network(ssd).eval(), WHOLE[name], "ssdlite"
    if name == "deeplabv3":
        from deeplabv3_fixtures import build

        model = build(16, (12, 24, 36), variant="s0", num_classes=21, width=256)
        model.aux_classifier = None
        model.backbone.body = reparameterize_model(model.backbone.body)

        class Network(nn.Module):
            def __init__(self, model):
                super().__init__()
                self.model = model

            def forward(self, x):
                return self.model(x)["out"]

        return Network(model).eval(), WHOLE[name], "deeplabv3"
    sys.exit(f"error: unknown model {name!r} (s0..s4, ssdlite, deeplabv3)")


def main():
    args = parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import onnxruntime as ort
    import openvino as ov
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if not args.binary.exists():
        sys.exit(f"error: {args.binary} not found; run `cargo build --release -p mobileone-cli --bin mobileone`")
    flags = cpu_flags()
    if args.simd is None:
        best = json.loads(subprocess.run([str(args.binary), "bench", "--iters", "1", "--warmup", "0", "--fused",
                                          "--json"], check=True, capture_output=True, text=True).stdout)["simd"]
        args.simd = [best] + (["avx2"] if best == "avx512" else [])
    bf16 = not args.no_bf16 and ({"avx512_bf16", "amx_bf16"} & flags)
    core = ov.Core()

    engines = ["ONNX Runtime", "OpenVINO f32"] + (["OpenVINO bf16"] if bf16 else []) + \
        [f"ours ({level})" for level in args.simd]
    rows = []
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        ort_avx2, ort_avx2_note = None, ""
        if "avx512f" in flags and "avx2" in args.simd:
            # Our AVX2 path against ONNX Runtime's own AVX2 kernels, not its AVX-512 ones (ort_avx2.py).
            package, sites = patched_package(Path(tmp) / "ort_avx2")
            if sites:
                ort_avx2 = subprocess.Popen([sys.executable, str(Path(__file__).with_name("ort_avx2.py")),
                                             str(package), str(args.threads)], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, text=True, env=os.environ)
                engines.insert(1, ORT_AVX2)
                ort_avx2_note = (f" {ORT_AVX2}: a copy of the package whose XCR0 reads ({sites} sites) report no AVX-512 "
                                 "state, so MLAS runs its FMA3 kernels (tools/bench/ort_avx2.py).")
            else:
                ort_avx2_note = " ONNX Runtime could not be held to AVX2 (no XCR0 read found to patch)."
        # Every case is built and warmed first; then each round times every case in turn, so a slow
        # phase of the host (minutes long) touches a round or two of every row instead of every
        # round of one row.
        cases = []
        for name in args.models:
            model, size, ours_model = build_torch(name)
            variant = name if name in CLASSIFIERS else "s0"
            for batch in (args.batches if name in CLASSIFIERS else [1]):
                iters = max(2, args.iters // batch)
                x = torch.randn(batch, 3, size, size)
                onnx_path = Path(tmp) / f"{name}_b{batch}.onnx"
                torch.onnx.export(model, (x,), str(onnx_path), input_names=["x"], opset_version=17, dynamo=False)
                session = cpu_session(ort, onnx_path, args.threads)
                x_np = x.numpy()
                runners = {"ONNX Runtime": (lambda s, f: lambda n: time_callable(lambda: s.run(None, f), n))(
                    session, {"x": x_np})}
                for precision in ["f32"] + (["bf16"] if bf16 else []):
                    compiled = core.compile_model(str(onnx_path), "CPU", {
                        "INFERENCE_NUM_THREADS": args.threads, "INFERENCE_PRECISION_HINT": precision,
                        "PERFORMANCE_HINT": "LATENCY"})
                    request = compiled.create_infer_request()
                    runners[f"OpenVINO {precision}"] = (lambda r, v: lambda n: time_callable(
                        lambda: r.infer({0: v}), n))(request, x_np)
                if ort_avx2:
                    loaded = ask(ort_avx2, {"load": str(onnx_path), "shape": list(x.shape)})["module"]
                    if not loaded.startswith(str(Path(tmp))):
                        sys.exit(f"error: the ONNX Runtime AVX2 worker loaded {loaded}, not the patched copy")
                    runners[ORT_AVX2] = (lambda path: lambda n: ask(ort_avx2, {"time": n, "model": path})[
                        "times_ms"])(str(onnx_path))
                for warm in runners.values():
                    warm(max(2, 10 // batch))  # engines pick and cache kernels first
                for level in args.simd:
                    cmd = [str(args.binary), "bench", "--model", ours_model, "--variant", variant,
                           "--size", str(size), "--batch", str(batch), "--threads", str(args.threads),
                           "--iters", str(iters), "--warmup", str(iters), "--fused", "--json"]
                    runners[f"ours ({level})"] = (lambda c, lv: lambda n: ours_times(c, lv))(cmd, level)
                label = name.upper() if name in CLASSIFIERS else {"ssdlite": "SSDLite-320 (S0)",
                                                                  "deeplabv3": "DeepLabV3-512 OS16 (S0)"}[name]
                cases.append((label, batch, iters, runners))
                print(f"built {label} batch {batch}", file=sys.stderr, flush=True)
        rounds = [{e: [] for e in engines} for _ in cases]
        for r in range(args.rounds):
            for (label, batch, iters, runners), times in zip(cases, rounds):
                for engine in engines:
                    # The pause lets the previous engine's idle worker threads stop spinning.
                    time.sleep(PAUSE_S)
                    times[engine].append(statistics.median(runners[engine](iters)))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        for (label, batch, _, _), times in zip(cases, rounds):
            medians = {e: statistics.median(t) for e, t in times.items()}
            # Ours / ORT within each round (seconds apart), then the median over the rounds.
            paired = {e: statistics.median(a / b for a, b in zip(t, times[reference(e, engines)]))
                      for e, t in times.items() if e.startswith("ours")}
            rows.append((label, batch, medians, paired))
            # Every round's median too: the host's slow phases show up as outliers.
            print(f"{label} batch {batch}: " + ", ".join(
                f"{e} {m:.2f} ms [{' '.join(f'{v:.2f}' for v in times[e])}]" for e, m in medians.items()),
                  file=sys.stderr, flush=True)
        if ort_avx2:
            ort_avx2.stdin.close()
            ort_avx2.wait()
    load_after = os.getloadavg()

    ours = [e for e in engines if e.startswith("ours")]
    lines = [
        f"CPU: {cpu_name()} ({os.cpu_count()} logical cores; SIMD: {simd_summary(flags)}), {args.threads} threads, "
        f"random-weight fused models, median of {args.rounds} alternating rounds' medians (each round times "
        f"every row in turn); the last columns are the median over the rounds of ours / ORT within a round "
        f"(measured seconds apart, so a slow phase of the host divides out). "
        f"`uptime` before: {uptime_before}; load average after {load_after[0]:.2f} (before {load_before[0]:.2f}). "
        f"onnxruntime {ort.__version__}, openvino {ov.__version__}, torch {torch.__version__}.{ort_avx2_note}",
        "",
        "| model | batch | " + " | ".join(f"{e} (ms)" for e in engines) + " | " +
        " | ".join(f"{e} / {reference(e, engines)}" for e in ours) + " | " +
        " | ".join(f"per round: {e} / {reference(e, engines)}" for e in ours) + " |",
        "|---|---|" + "---:|" * (len(engines) + 2 * len(ours)),
    ]
    for label, batch, medians, paired in rows:
        lines.append(f"| {label} | {batch} | " + " | ".join(f"{medians[e]:.2f}" for e in engines) + " | " +
                     " | ".join(f"{medians[e] / medians[reference(e, engines)]:.2f}" for e in ours) + " | " +
                     " | ".join(f"{paired[e]:.2f}" for e in ours) + " |")
    report = "\n".join(lines)
    print(report)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = args.markdown.with_suffix(".tmp")
        tmp_path.write_text(report + "\n")
        tmp_path.replace(args.markdown)


if __name__ == "__main__":
    main()
