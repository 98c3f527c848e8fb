"""Check the WS-002 L1 proxy (:mod:`apr_numba.gates.l1proxy`) against cachegrind on the same kernel.

How (``validate()``; ``python apr_numba/gates/l1_validate.py`` prints the table):

1. valgrind cannot run AVX-512 code, and for AVX2 code its accounting is not one reference per memory operand:
   VEX splits a 32-byte access into two references and an FMA's memory operand into one load per lane
   (measured: a 256-bit ``vaddps`` loop counts 2 reads per vector, an 8-lane ``vfmadd213ps`` from memory 8).
   That would judge the proxy on a denominator no hardware has. So the kernel is compiled for SSE4.2
   (``nehalem``: 16-byte vectors, no FMA), where each memory operand is exactly one cachegrind reference:
   both runs below set ``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES`` and a private ``NUMBA_CACHE_DIR``. A first,
   ordinary process compiles :func:`apr_numba.gates.serial.serial_matvec` (the production ``_group_dot`` in
   a serial loop) into that cache and computes the proxy for each shape with the code profile of *that*
   build (:func:`apr_numba.gates.l1proxy.code_profile`: W = 16 and its code-row loop read from its assembly)
   and the sysfs L1D geometry. The proxy's formulas are the same for every W; only the counts per code row
   come from the build.
2. A second process runs under ``valgrind --tool=cachegrind --cache-sim=yes --D1=<sysfs geometry>``, loads
   the compiled kernel from the cache, builds each shape's matrix and then forks twice per shape: one child
   runs the product R1 times, the other R2 times, and each child's cachegrind totals are written to its own
   file (``%p``). Everything before the fork (interpreter, imports, loading, the matrix) is identical in
   both children, including the simulated cache state, so child(R2) - child(R1) is exactly R2 - R1
   products: the kernel's own reads, writes and D1 misses, with nothing of Python in them.
3. The proxy is computed for repeated products of one matrix (``weights_cold=False``: the weights stay in
   L1 only if the whole matrix fits), which is what the children run.

The agreement margin (tests/test_l1proxy.py, docs/gates.md): |proxy - cachegrind| <= MARGIN_REL x cachegrind
+ MARGIN_ABS for the load-miss rate, on every shape.

Importing the apr_numba package under valgrind would cost ~15 s of its ~50 s; run as a script this file puts
a bare ``apr_numba`` package in ``sys.modules`` (its ``__init__`` is not needed by the kernel) first.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

MARGIN_REL = 0.10
MARGIN_ABS = 0.002
R1, R2 = 2, 8
# SSE4.2 code: see the module docstring (why not AVX2).
VALGRIND_CPU = "nehalem"
VALGRIND_FEATURES = "+64bit,+cmov,+cx16,+fxsr,+mmx,+popcnt,+sahf,+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3"


def shapes():
    """The validation shapes: the kernel families (U4 with offsets, I8 k=32 and k=16 without, U5, F32) at model-like
    sizes, one where x is evicted between row groups, one small enough to stay in L1."""
    from apr_numba.gates.l1proxy import KernelShape
    from apr_numba.quants.layouts import FAMILY_F32, FAMILY_I8, FAMILY_U4, FAMILY_U5

    return [KernelShape(FAMILY_U4, 256, 576, 16, True),   # Q4_0/Q4_1/Q4_K, smollm2 width
            KernelShape(FAMILY_I8, 128, 896, 32, False),  # Q8_0, qwen2 width
            KernelShape(FAMILY_U5, 128, 896, 11, False),  # Q5_0 (11 16-bit words per block), qwen2 width
            KernelShape(FAMILY_I8, 128, 1536, 16, False),  # Q6_K, x evicted per group
            KernelShape(FAMILY_U4, 128, 2048, 16, True),  # wide U4, x evicted per group
            KernelShape(FAMILY_F32, 64, 256, 1, False),   # F32/F16 weights
            KernelShape(FAMILY_U4, 64, 256, 16, True)]    # fits in L1: repeated products hit


def make_case(ks, seed: int = 0):
    """(out, x, kernel tuple) with random codes for a KernelShape."""
    from apr_numba.gates.l1proxy import LANES
    from apr_numba.quants.layouts import FAMILY_F32, FAMILY_U5

    rng = np.random.default_rng(seed)
    G = ks.groups
    x = rng.standard_normal(ks.cols).astype(np.float32)
    out = np.zeros(ks.rows, np.float32)
    if ks.family == FAMILY_F32:
        q = np.zeros((G, 0, 0, LANES), np.uint8)
        s = rng.standard_normal((G, ks.cols, LANES)).astype(np.float32)
        m = np.zeros((G, 0, LANES), np.float32)
    else:
        lanes_bytes = 2 * LANES if ks.family == FAMILY_U5 else LANES  # U5: 16-bit words
        q = rng.integers(0, 256, (G, ks.nsub, ks.k, lanes_bytes), dtype=np.uint8)
        s = rng.random((G, ks.nsub, LANES), dtype=np.float32)
        m = rng.random((G, ks.nsub if ks.has_m else 0, LANES), dtype=np.float32)
    return out, x, (np.int64(ks.family), np.int64(ks.rows), q, s, m)


def _precompile() -> int:
    """Compile the kernel into NUMBA_CACHE_DIR and print the proxy of every shape (JSON) for this code."""
    from apr_numba.gates.l1proxy import code_profile, l1_miss_proxy, l1d_geometry
    from apr_numba.gates.serial import serial_matvec

    out = []
    for ks in shapes():
        o, x, w = make_case(ks)
        serial_matvec(o, x, w, 1)
        r = l1_miss_proxy(ks, l1d_geometry(), code_profile(), weights_cold=False)
        out.append({"shape": ks.label(), "proxy": r.miss_rate, "proxy_all": r.details["miss_rate_all"],
                    "loads": r.details["loads"], "stores": r.details["stores"],
                    "load_misses": r.details["load_misses"], "footprint_bytes": r.footprint_bytes})
    print(json.dumps({"vector_bytes": code_profile()["vector_bytes"], "profile": code_profile(), "shapes": out}))
    return 0


def _measure(outdir: str, r1: int, r2: int) -> int:
    """Under valgrind: fork a child per (shape, reps) after everything is loaded; write the pid manifest."""
    from apr_numba.gates.serial import serial_matvec

    cases = []
    for ks in shapes():
        o, x, w = make_case(ks)
        serial_matvec(o, x, w, 1)  # load the kernel from the cache, touch the arrays
        pids = {}
        for reps in (r1, r2):
            pid = os.fork()
            if pid == 0:
                serial_matvec(o, x, w, reps)
                os._exit(0)
            os.waitpid(pid, 0)
            pids[reps] = pid
        cases.append({"shape": ks.label(), "pids": pids})
    Path(outdir, "manifest.json").write_text(json.dumps(cases))
    return 0


def _summary(path: Path) -> dict[str, int]:
    """The totals of a cachegrind output file (its ``events:`` and ``summary:`` lines)."""
    events = summary = None
    for line in path.read_text().splitlines():
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith("summary:"):
            summary = [int(v) for v in line.split()[1:]]
    if events is None or summary is None:
        raise RuntimeError(f"{path}: not a cachegrind output file")
    return dict(zip(events, summary, strict=False))


def _env(cache_dir: str) -> dict:
    env = dict(os.environ)
    env.update(NUMBA_CPU_NAME=VALGRIND_CPU, NUMBA_CPU_FEATURES=VALGRIND_FEATURES, NUMBA_CACHE_DIR=cache_dir,
               NUMBA_NUM_THREADS="1", PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    env.pop("APR_L1PROXY_VECTOR_BYTES", None)
    return env


def validate(r1: int = R1, r2: int = R2, cache_dir: str | None = None, timeout: float = 900.0) -> dict:
    """Run the two processes (module docstring) and compare. Returns {"vector_bytes", "l1d", "rows": [{shape,
    proxy, cachegrind, proxy_all, cachegrind_all, loads_per_product (proxy, cachegrind), within_margin}]}.

    Raises:
        RuntimeError: valgrind is missing or a run failed.
    """
    from apr_numba.gates.l1proxy import l1d_geometry

    vg = shutil.which("valgrind")
    if vg is None:
        raise RuntimeError("valgrind is not installed")
    script = str(Path(__file__).resolve())
    geo = l1d_geometry()
    cache_dir = cache_dir or str(Path(tempfile.gettempdir()) / f"apr-numba-l1validate-{os.getuid()}")
    env = _env(cache_dir)
    pre = subprocess.run([sys.executable, script, "precompile"], env=env, capture_output=True, text=True,
                         timeout=timeout)
    if pre.returncode != 0:
        raise RuntimeError(f"precompile failed: {pre.stderr[-2000:]}")
    proxy = json.loads(pre.stdout.strip().splitlines()[-1])
    with tempfile.TemporaryDirectory(prefix="apr-cg-") as tmp:
        cmd = [vg, "--tool=cachegrind", "--cache-sim=yes", geo.valgrind_arg(), "--I1=32768,8,64",
               "--LL=33554432,16,64", f"--cachegrind-out-file={tmp}/cg.%p", sys.executable, script, "measure", tmp,
               str(r1), str(r2)]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if run.returncode != 0 or not Path(tmp, "manifest.json").exists():
            raise RuntimeError(f"cachegrind run failed (rc {run.returncode}): {run.stderr[-2000:]}")
        manifest = json.loads(Path(tmp, "manifest.json").read_text())
        rows = []
        for case, px in zip(manifest, proxy["shapes"], strict=True):
            a = _summary(Path(tmp, f"cg.{case['pids'][str(r1)]}"))
            b = _summary(Path(tmp, f"cg.{case['pids'][str(r2)]}"))
            d = {k: (b[k] - a[k]) / (r2 - r1) for k in ("Dr", "D1mr", "Dw", "D1mw")}
            cg = d["D1mr"] / d["Dr"] if d["Dr"] else 0.0
            cg_all = (d["D1mr"] + d["D1mw"]) / (d["Dr"] + d["Dw"]) if d["Dr"] else 0.0
            ok = abs(px["proxy"] - cg) <= MARGIN_REL * cg + MARGIN_ABS
            rows.append({"shape": case["shape"], "proxy": px["proxy"], "cachegrind": cg, "proxy_all": px["proxy_all"],
                         "cachegrind_all": cg_all, "loads_proxy": px["loads"], "loads_cachegrind": d["Dr"],
                         "load_misses_proxy": px["load_misses"], "load_misses_cachegrind": d["D1mr"],
                         "stores_proxy": px["stores"], "stores_cachegrind": d["Dw"], "within_margin": ok})
    return {"vector_bytes": proxy["vector_bytes"], "l1d": {"size": geo.size, "line": geo.line, "ways": geo.ways,
                                                          "source": geo.source},
            "margin": {"rel": MARGIN_REL, "abs": MARGIN_ABS}, "reps": [r1, r2], "rows": rows}


def format_table(res: dict) -> str:
    lines = [f"L1D {res['l1d']['size'] // 1024} KiB, {res['l1d']['ways']}-way, {res['l1d']['line']} B lines "
             f"({res['l1d']['source']}); code vector width {res['vector_bytes']} B; margin "
             f"{res['margin']['rel']:.0%} + {res['margin']['abs']}",
             f"{'shape':<24} {'proxy':>8} {'cachegrind':>10} {'loads/prod proxy':>17} {'cg':>9}  ok"]
    for r in res["rows"]:
        lines.append(f"{r['shape']:<24} {r['proxy']:>8.4f} {r['cachegrind']:>10.4f} {r['loads_proxy']:>17.0f} "
                     f"{r['loads_cachegrind']:>9.0f}  {'yes' if r['within_margin'] else 'NO'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["precompile"]:
        return _precompile()
    if argv[:1] == ["measure"]:
        return _measure(argv[1], int(argv[2]), int(argv[3]))
    res = validate()
    print(format_table(res))
    return 0 if all(r["within_margin"] for r in res["rows"]) else 1


if __name__ == "__main__":
    if "apr_numba" not in sys.modules:  # a bare package: skip apr_numba/__init__ (see the module docstring)
        import types

        _pkg = types.ModuleType("apr_numba")
        _pkg.__path__ = [str(Path(__file__).resolve().parent.parent)]
        sys.modules["apr_numba"] = _pkg
    from apr_numba.gates.l1_validate import main as _main

    sys.exit(_main())
