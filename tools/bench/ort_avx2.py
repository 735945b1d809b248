#!/usr/bin/env python3
"""ONNX Runtime held to its AVX2 kernels on an AVX-512 machine, for a like-for-like AVX2 comparison.

ONNX Runtime's MLAS picks its kernels from CPUID and XCR0 once, at load, with no option to override it (and
this kind of VM cannot fake CPUID). MLAS takes its AVX-512 kernels only when XCR0 says the OS saves the
AVX-512 state (bits 5-7, `(xcr0 & 0xE0) == 0xE0` in `onnxruntime/core/mlas/lib/platform.cpp`), so a copy of
the package whose `xgetbv` reads return 0x7 (x87, SSE and AVX state only) takes exactly the path it takes on
an AVX2-only CPU or OS: the FMA3 GEMM and NCHWc convolution kernels, NCHWc blocks of 8. The copy is made in a
temporary folder; the installed package is not touched.

Each `xor ecx, ecx; xgetbv` (31 c9 0f 01 d0) becomes `xor ecx, ecx; lea eax, [rcx + 7]` (31 c9 8d 41 07):
same length, ECX still 0 for the CPUID leaf-7 query that follows in MLAS's platform setup.

Run as a worker (what `cpu_bench.py` does): `python ort_avx2.py PACKAGE_PARENT THREADS`, then JSON lines on
stdin: {"load": onnx_path, "shape": [N, C, H, W]} (a session kept under that path) and
{"time": iters, "model": onnx_path}; answers one JSON line each ({"ok": true, "module": ...} /
{"times_ms": [...]}).
"""

import json
import shutil
import sys
import time
from pathlib import Path

XGETBV_AFTER_XOR_ECX = bytes.fromhex("31c90f01d0")
XCR0_SSE_AVX_ONLY = bytes.fromhex("31c98d4107")


def patched_package(dest: Path) -> tuple[Path, int]:
    """Copy the installed `onnxruntime` package into `dest` with every extension module's XCR0 reads patched.

    Returns (the folder to put first on sys.path, the number of `xgetbv` sites patched); 0 sites means the
    build reads XCR0 some other way and the copy is not held to AVX2 (the caller must not use it then).
    """
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or spec.origin is None:
        sys.exit("error: onnxruntime is not installed in this Python")
    source = Path(spec.origin).parent
    target = dest / "onnxruntime"
    shutil.copytree(source, target)
    sites = 0
    for lib in list(target.rglob("*.so")) + list(target.rglob("*.so.*")):
        data = lib.read_bytes()
        count = data.count(XGETBV_AFTER_XOR_ECX)
        if count:
            lib.write_bytes(data.replace(XGETBV_AFTER_XOR_ECX, XCR0_SSE_AVX_ONLY))
            sites += count
    return dest, sites


def cpu_session(ort, onnx_path, threads):
    """An ONNX Runtime CPU session as the benchmark runs every one (here and in cpu_bench.py): `threads`
    intra-op threads, one inter-op thread, every graph optimisation (the NCHWc transformer included)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])


def worker(threads: int):
    import numpy as np
    import onnxruntime as ort

    sessions = {}
    for line in sys.stdin:
        request = json.loads(line)
        if "load" in request:
            session = cpu_session(ort, request["load"], threads)
            rng = np.random.default_rng(0)
            sessions[request["load"]] = (session, {"x": rng.standard_normal(request["shape"]).astype(np.float32)})
            answer = {"ok": True, "module": ort.__file__}
        else:
            session, feed = sessions[request["model"]]
            times = []
            for _ in range(request["time"]):
                start = time.perf_counter()
                session.run(None, feed)
                times.append((time.perf_counter() - start) * 1e3)
            answer = {"times_ms": times}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, sys.argv[1])
    worker(int(sys.argv[2]))
