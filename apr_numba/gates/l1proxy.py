"""WS-002: an L1 data-cache miss-rate proxy for the decode matmul kernel, from its access pattern.

aprender measures WS-002 with hardware counters (``perf stat -e L1-dcache-load-misses``). These machines
have none, so the miss rate is *computed* from what the kernel does and the cache the machine has, and the
model is checked against cachegrind's simulation of the same kernel (:mod:`apr_numba.gates.l1_validate`,
``tests/test_l1proxy.py``).

The kernel (``apr_numba.kernels.matmul._group_dot``, one parallel task per group of LANES = 64 output
rows of the row-interleaved layout; ``matmul3``'s decode path, T = 1). Per block b of a group it runs, for
each of k code rows j (U4: k = 16 bytes holding 32 codes; I8: k = 16 or 32 codes), a lane loop over the
64 lanes: ``blk[lane] += f(q[g, b, j, lane]) * x...``; then ``acc[lane] += s[g,b,lane] * blk[lane] -
m[g,b,lane] * xs``. F32 weights: ``acc[lane] += s[g, c, lane] * x[c]`` per column c.

Loads and stores (the denominator). LLVM vectorizes the 64-lane loops with W-byte vectors (W = 64 with
AVX-512, 32 with AVX2, 16 with SSE), so a 64-lane float32 array access is V = 4 * 64 / W vector accesses
and 64 one-byte codes widened to float32 (``vpmovzxbd`` / ``vpmovsxbd``) are also V loads. The code-row loop
(the hot one) is read from the kernel as compiled on this machine (:func:`code_profile`: the innermost loop
that widens codes, its memory operands per iteration and lanes per iteration), which also catches what the
formula cannot know, e.g. a constant reloaded every iteration when registers run out (SSE/AVX2 builds; the
AVX-512 build here has exactly V code loads + V blk loads + V blk stores per 64 lanes). Scalars of x are one
load each (hoisted out of the lane loop): 2 per code row for U4, 1 for I8. Per block: blk reset (V stores),
the acc update (s, blk, acc and, with offsets, m: 3-4 V loads; V stores). Per group: acc reset (V stores),
the copy of acc to the output (V loads, V stores). F32 weights: per column 1 x load + 2V loads + V stores.

Misses (the numerator), with the L1D geometry read from sysfs (:func:`l1d_geometry`) and no prefetching
(cachegrind's model; hardware prefetchers would lower the real rate, so the proxy is an upper bound):

* weight streams q, s, m are read once per token: one compulsory miss per 64-byte line, unless the whole
  matrix and x fit in L1 together (only then repeated products hit);
* x is re-read by every row group: it misses again per group when one group's streamed bytes plus x
  exceed the L1 capacity (LRU reuse distance), else only once;
* blk, acc (256 B each) and the current lines of x stay resident (hits);
* output lines are written once per group (store misses; they do not count in the load-miss rate).

Validation: :mod:`apr_numba.gates.l1_validate` runs the same kernel under cachegrind (SSE4.2 build, six
shapes) and tests/test_l1proxy.py requires |proxy - cachegrind| <= 10 % x cachegrind + 0.002 on each.

The gate value is the load-miss rate (misses of loads / loads, perf's ``L1-dcache-load-misses`` /
``L1-dcache-loads``); ``details`` also has the combined rate (loads + stores, cachegrind's "D1 miss rate").

Tile footprint: the L1-resident reuse set of one row-group task: x (4 cols bytes) + blk + acc + the lines
of the block being streamed (q: k * 64 B, U5 k * 128 B; s and m: 256 B each). WS-002 wants it <= 32 KiB: beyond
that the reused x vector cannot stay in L1 (it is what fails first for wide matrices, n_ff > ~7800).
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from apr_numba.quants.blocks import FAMILY_I8V, FAMILY_U4V, FAMILY_U5V
from apr_numba.quants.layouts import FAMILY_F32, FAMILY_I8, FAMILY_U4, FAMILY_U5

LANES = 64
SYSFS_CACHE = "/sys/devices/system/cpu/cpu{cpu}/cache"
FAMILY_NAMES = {FAMILY_U4: "U4", FAMILY_I8: "I8", FAMILY_U5: "U5", FAMILY_F32: "F32"}
CODE_BYTES = {FAMILY_U4: 1, FAMILY_I8: 1, FAMILY_U5: 2}  # bytes per code row and lane
U5_WORDS = 11  # code rows (16-bit words) per 32-value block of FAMILY_U5 (apr_numba.quants.repack)


@dataclass(frozen=True)
class CacheGeometry:
    """An L1 data cache: size, line and ways in bytes / count; sets derived; source says where it came from."""

    size: int
    line: int
    ways: int
    source: str = "sysfs"

    @property
    def sets(self) -> int:
        return self.size // (self.line * self.ways)

    def valgrind_arg(self) -> str:
        """cachegrind's ``--D1=size,assoc,line_size``."""
        return f"--D1={self.size},{self.ways},{self.line}"


def _size_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)\s*", text)
    if not m:
        raise ValueError(f"bad cache size {text!r}")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)]


def cache_levels(cpu: int = 0, root: str | None = None) -> list[dict]:
    """Every cache of ``cpu`` from sysfs: dicts with level, type, size, line, ways (empty when unreadable)."""
    base = Path(root or SYSFS_CACHE.format(cpu=cpu))
    out = []
    for d in sorted(base.glob("index*")):
        try:
            rd = {k: (d / k).read_text().strip() for k in ("level", "type", "size", "coherency_line_size",
                                                          "ways_of_associativity")}
            out.append({"level": int(rd["level"]), "type": rd["type"], "size": _size_bytes(rd["size"]),
                        "line": int(rd["coherency_line_size"]), "ways": int(rd["ways_of_associativity"]),
                        "path": str(d)})
        except (OSError, ValueError, KeyError):
            continue
    return out


@functools.lru_cache(maxsize=4)
def l1d_geometry(cpu: int = 0, root: str | None = None) -> CacheGeometry:
    """The L1 data cache of ``cpu`` (sysfs ``index*/{level,type,size,coherency_line_size,
    ways_of_associativity}``); 32 KiB, 64 B lines, 8 ways when sysfs does not say (``source`` tells)."""
    for c in cache_levels(cpu, root):
        if c["level"] == 1 and c["type"] in ("Data", "Unified") and c["ways"] > 0:
            return CacheGeometry(c["size"], c["line"], c["ways"], f"sysfs {c['path']}")
    return CacheGeometry(32768, 64, 8, "default (no L1D in sysfs)")


_MEM = re.compile(r"(?:[-\w.$]*)\((?:%\w+)?(?:,%\w+)?(?:,\d)?\)")
_STORE_ONLY = re.compile(r"^v?(mov|movnt|stos|extract|pextr|scatter|set|cvtps2ph|pmov(?!zx|sx))", re.I)
_READ_ONLY = re.compile(r"^v?(cmp|test|u?comis|bt|prefetch)", re.I)
_WIDEN = {"U4": re.compile(r"^v?pmovzxbd$"), "I8": re.compile(r"^v?pmovsxbd$"), "U5": re.compile(r"^v?pmovzxwd$")}
_ROUND = re.compile(r"^v?(roundps|rndscaleps)$")
_REG_BYTES = {"zmm": 64, "ymm": 32, "xmm": 16}


def _operands(text: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        depth += ch == "("
        depth -= ch == ")"
        cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def _loop_bodies(asm: str) -> list[list[tuple[str, list[str]]]]:
    """Bodies of the innermost loops of an x86 AT&T listing: the instructions from a label to a later jump back to
    it, with no label in between."""
    lines = [ln.split("#")[0].rstrip() for ln in asm.splitlines()]
    labels = {}
    for i, ln in enumerate(lines):
        m = re.match(r"^(\.?L\w+):", ln)
        if m:
            labels[m.group(1)] = i
    loops = []
    for i, ln in enumerate(lines):
        m = re.match(r"^\s+j\w+\s+(\.?L\w+)\s*$", ln)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            span = lines[labels[m.group(1)] + 1:i]
            if any(re.match(r"^\.?L\w+:", b) for b in span):
                continue  # not innermost
            body = []
            for b in span:
                parts = b.strip().split(None, 1)
                if not parts or parts[0].startswith(".") or parts[0].endswith(":"):
                    continue
                body.append((parts[0], _operands(parts[1]) if len(parts) > 1 else []))
            loops.append(body)
    return loops


def _mem_counts(body) -> tuple[int, int]:
    """(reads, writes) of data memory per iteration (AT&T: a memory destination is the last operand)."""
    reads = writes = 0
    for mnem, ops in body:
        mem = [k for k, o in enumerate(ops) if _MEM.fullmatch(o) and not mnem.startswith(("lea", "nop"))]
        if not mem:
            continue
        if mem[-1] == len(ops) - 1 and len(ops) > 1 and not _READ_ONLY.match(mnem):
            writes += 1
            if not _STORE_ONLY.match(mnem):
                reads += 1  # read-modify-write
            reads += len(mem) - 1
        else:
            reads += len(mem)
    return reads, writes


def _widen_loops(asm: str, pat) -> list[tuple[int, int, int, list]]:
    """(lanes per iteration, vector bytes, floor/round instructions per widened vector, body) of each innermost
    loop that widens codes with ``pat``."""
    out = []
    for body in _loop_bodies(asm):
        widen = [ops for mnem, ops in body if pat.match(mnem)]
        if not widen:
            continue
        lanes = 0
        width = 16
        for ops in widen:
            reg = re.match(r"%(zmm|ymm|xmm)", ops[-1])
            w = _REG_BYTES[reg.group(1)] if reg else 16
            width = max(width, w)
            lanes += w // 4
        rounds = sum(1 for mnem, _ in body if _ROUND.match(mnem))
        out.append((lanes, width, round(rounds / len(widen)), body))
    return out


def _row(loop) -> dict:
    lanes, width, _, body = loop
    r, w = _mem_counts(body)
    return {"lanes_per_iter": lanes, "vector_bytes": width, "reads_per_64": r * LANES / lanes,
            "writes_per_64": w * LANES / lanes}


def code_row_profile(asm: str) -> dict:
    """From the kernel's assembly: for the U4, I8 and U5 code-row lane loops (the main vector loop widening the
    codes with pmovzxbd / pmovsxbd / pmovzxwd), the data reads and writes per 64 lanes and the vector width. Empty when
    no such loop is found (not x86, or the code changed shape).

    U5 has two code-row loops: the 10 words of three codes (two floors per word) and the last word of two codes
    (one floor); its entry is their average per word, (10 x first + 1 x second) / 11, told apart by the number of
    floor (``roundps`` / ``vrndscaleps``) instructions per widened vector (the widest loop of each kind)."""
    out: dict = {}
    for fam, pat in _WIDEN.items():
        loops = _widen_loops(asm, pat)
        if not loops:
            continue
        if fam == "U5":
            three = [lp for lp in loops if lp[2] == 2]
            two = [lp for lp in loops if lp[2] == 1]
            if three and two:
                a = _row(max(three, key=lambda lp: lp[0]))
                b = _row(max(two, key=lambda lp: lp[0]))
                n = U5_WORDS - 1
                out[fam] = {"lanes_per_iter": a["lanes_per_iter"], "vector_bytes": max(a["vector_bytes"],
                                                                                       b["vector_bytes"]),
                            "reads_per_64": (n * a["reads_per_64"] + b["reads_per_64"]) / U5_WORDS,
                            "writes_per_64": (n * a["writes_per_64"] + b["writes_per_64"]) / U5_WORDS}
                continue
        out[fam] = _row(max(loops, key=lambda lp: lp[0]))
    return out


@functools.lru_cache(maxsize=1)
def code_profile() -> dict:
    """What the compiled kernel does per code row, read from its assembly (~2 s once per process):
    ``vector_bytes`` W, and for "U4" / "I8" the reads and writes per 64 lanes of the code-row loop
    (:func:`code_row_profile`; "U5" likewise, from the formula when its loop is not found); ``source`` is "asm",
    or "formula" when the listing could not be read (then the counts come from W alone, W from the CPU flags:
    2 x 256/W reads, 256/W writes). ``APR_L1PROXY_VECTOR_BYTES`` forces W and the formula."""
    env = os.environ.get("APR_L1PROXY_VECTOR_BYTES", "").strip()
    prof: dict = {}
    if not env:
        try:
            prof = code_row_profile(_kernel_asm())
        except Exception:  # noqa: BLE001 - no listing (another ISA, a Numba change): use the formula
            prof = {}
    if env or "U4" not in prof or "I8" not in prof:
        return formula_profile(int(env) if env else _cpuinfo_vector_bytes())
    W = max(p["vector_bytes"] for p in prof.values())
    if "U5" not in prof:
        prof["U5"] = formula_profile(W)["U5"]
    return {"vector_bytes": W, "source": "asm", **prof}


def _cpuinfo_vector_bytes() -> int:
    """Widest SIMD register the CPU flags announce (x86 /proc/cpuinfo), else 16."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return 16
    return 64 if "avx512f" in flags else 32 if "avx2" in flags else 16


def formula_profile(vec_bytes: int) -> dict:
    """The code-row counts implied by the vector width alone: per 64 lanes, 256/W code loads, 256/W blk loads
    and 256/W blk stores (what the AVX-512 code here does exactly; narrower ISAs add reloads of constants)."""
    V = 4 * LANES / int(vec_bytes)
    row = {"reads_per_64": 2 * V, "writes_per_64": V}
    return {"vector_bytes": int(vec_bytes), "source": "formula", "U4": dict(row), "I8": dict(row), "U5": dict(row)}


def _kernel_asm() -> str:
    """Assembly of ``_group_dot`` compiled now for this machine's target (an uncached copy: Numba does not
    list cached code)."""
    from numba import njit

    from apr_numba.kernels.matmul import _group_dot
    from apr_numba.runtime import FASTMATH

    fn = njit(fastmath=FASTMATH, nogil=True, boundscheck=False)(_group_dot.py_func)
    G, nsub = 1, 1
    q = np.zeros((G, nsub, 16, LANES), np.uint8)
    s = np.zeros((G, nsub, LANES), np.float32)
    x = np.zeros(32, np.float32)
    acc = np.zeros(LANES, np.float32)
    fn(np.int64(FAMILY_U4), q, s, s, np.int64(0), x, acc, acc.copy())
    return "\n".join(fn.inspect_asm().values())


def vector_bytes() -> int:
    """Vector width W in bytes of the compiled kernel's lane loops (64 AVX-512, 32 AVX2, 16 SSE/NEON)."""
    return int(code_profile()["vector_bytes"])


class KernelShape(NamedTuple):
    """One packed matrix as the kernel sees it: family (FAMILY_U4/I8/U5/F32), rows, cols, k (code rows per block:
    U4 16, I8 the group size, U5 11 words, F32 1), has_m (offsets present)."""

    family: int
    rows: int
    cols: int
    k: int
    has_m: bool

    @classmethod
    def of(cls, obj) -> KernelShape:
        """From a KernelShape, a :class:`~apr_numba.quants.repack.PackedMatrix` or a kernel tuple
        (family, rows, q, s, m). The int8-activation families (U4V, I8V, U5V) count as U4 / I8 / U5 (about the
        same bytes)."""
        if isinstance(obj, KernelShape):
            return obj
        if hasattr(obj, "family") and hasattr(obj, "q"):
            fam, rows, q, s, m, cols = obj.family, obj.rows, obj.q, obj.s, obj.m, obj.cols
        else:
            fam, rows, q, s, m = obj
            cols = None
        fam, rows = int(fam), int(rows)
        v5 = fam == FAMILY_U5V
        fam = {FAMILY_U4V: FAMILY_U4, FAMILY_I8V: FAMILY_I8, FAMILY_U5V: FAMILY_U5}.get(fam, fam)  # ~ same bytes
        if fam == FAMILY_F32:
            return cls(fam, rows, int(s.shape[1]), 1, False)
        k = 11 if v5 else int(q.shape[2])  # U5V: 20 bytes per lane and block, counted as U5's 11 words (22)
        nsub = int(q.shape[1])
        c = nsub * (2 * k if fam == FAMILY_U4 else 32 if fam == FAMILY_U5 else k)
        return cls(fam, rows, int(cols) if cols is not None else c, k, bool(m.shape[1] > 0))

    @property
    def groups(self) -> int:
        return -(-self.rows // LANES)

    @property
    def nsub(self) -> int:
        """Blocks per row (U4, U5: 32 values each; I8: k values each)."""
        if self.family in (FAMILY_U4, FAMILY_U5):
            return self.cols // 32
        if self.family == FAMILY_I8:
            return self.cols // self.k
        return self.cols

    @property
    def weight_bytes(self) -> int:
        """Bytes of the packed arrays (q, s, m) one product streams."""
        G = self.groups
        if self.family == FAMILY_F32:
            return G * self.cols * LANES * 4
        q = G * self.nsub * self.k * LANES * CODE_BYTES[self.family]
        s = G * self.nsub * LANES * 4
        return q + s * (2 if self.has_m else 1)

    def label(self) -> str:
        return f"{FAMILY_NAMES.get(self.family, self.family)} {self.rows}x{self.cols} k={self.k}" + (
            " +m" if self.has_m else "")


class ProxyResult(NamedTuple):
    """miss_rate: load-miss rate (fraction); footprint_bytes: tile footprint; details: the counts behind them."""

    miss_rate: float
    footprint_bytes: int
    details: dict


@dataclass
class _Counts:
    loads: float = 0.0
    stores: float = 0.0
    load_misses: float = 0.0
    store_misses: float = 0.0


def _per_group(ks: KernelShape, prof: dict) -> _Counts:
    """Accesses of one row-group task (no misses)."""
    V = 4 * LANES / prof["vector_bytes"]
    c = _Counts()
    c.stores += V  # acc reset
    if ks.family == FAMILY_F32:
        c.loads += ks.cols * (1 + 2 * V)  # x[c], s[g,c,:], acc
        c.stores += ks.cols * V
    else:
        fam = FAMILY_NAMES[ks.family]
        x_loads = {FAMILY_U4: 2 * ks.k, FAMILY_I8: ks.k, FAMILY_U5: 32}[ks.family]  # per block
        row = prof[fam] if fam in prof else formula_profile(prof["vector_bytes"])[fam]
        per_block_loads = x_loads + ks.k * row["reads_per_64"] + (4 if ks.has_m else 3) * V  # code rows, acc update
        per_block_stores = V + ks.k * row["writes_per_64"] + V  # blk reset, code rows, acc update
        c.loads += ks.nsub * per_block_loads
        c.stores += ks.nsub * per_block_stores
    c.loads += V  # acc -> out copy
    c.stores += V
    return c


def footprint(ks: KernelShape, line: int = 64) -> int:
    """Tile footprint in bytes (see the module docstring)."""
    x = 4 * ks.cols
    hot = 2 * 4 * LANES  # blk + acc
    if ks.family == FAMILY_F32:
        stream = 4 * LANES
    else:
        stream = ks.k * LANES * CODE_BYTES[ks.family] + 4 * LANES * (2 if ks.has_m else 1)
    return x + hot + stream


def l1_miss_proxy(kernel, geometry: CacheGeometry | None = None, profile: dict | None = None,
                  weights_cold: bool = True) -> ProxyResult:
    """Proxy of the L1D load-miss rate of one decode matmul (see the module docstring).

    Args:
        kernel: a :class:`KernelShape`, a PackedMatrix or a kernel tuple (family, rows, q, s, m).
        geometry: the L1D (default :func:`l1d_geometry`).
        profile: what the compiled code does per code row (default :func:`code_profile`; or
            :func:`formula_profile` for a given vector width).
        weights_cold: the weights come from beyond L1 (a decode step streams every matrix once per token:
            True); False models repeated products of the same matrix (the cachegrind validation), where the
            weights stay in L1 only if the whole matrix and x fit.

    Returns:
        :class:`ProxyResult` (miss_rate, footprint_bytes, details with loads, stores, misses, the
        combined rate and the assumptions).
    """
    ks = KernelShape.of(kernel)
    geo = geometry or l1d_geometry()
    prof = profile or code_profile()
    W = int(prof["vector_bytes"])
    G = ks.groups
    per = _per_group(ks, prof)
    line = geo.line
    x_lines = -(-4 * ks.cols // line)
    out_lines = -(-4 * ks.rows // line)
    stream_lines_group = ks.weight_bytes / G / line
    group_bytes = ks.weight_bytes / G + 4 * ks.cols + 2 * 4 * LANES + 4 * LANES
    matrix_bytes = ks.weight_bytes + 4 * ks.cols + 4 * ks.rows + 2 * 4 * LANES
    resident = (not weights_cold) and matrix_bytes <= geo.size
    x_evicted_per_group = group_bytes > geo.size
    tot = _Counts(per.loads * G, per.stores * G)
    if not resident:
        tot.load_misses += stream_lines_group * G
        tot.load_misses += x_lines * (G if x_evicted_per_group else 1)
        tot.store_misses += out_lines
    rate = tot.load_misses / tot.loads if tot.loads else 0.0
    both = (tot.load_misses + tot.store_misses) / (tot.loads + tot.stores) if tot.loads else 0.0
    fp = footprint(ks, line)
    details = {"kernel": ks.label(), "family": FAMILY_NAMES.get(ks.family, str(ks.family)), "rows": ks.rows,
               "cols": ks.cols, "groups": G, "vector_bytes": W, "code_profile": prof["source"], "loads": tot.loads,
               "stores": tot.stores,
               "load_misses": tot.load_misses, "store_misses": tot.store_misses, "load_miss_rate": rate,
               "miss_rate_all": both, "weights_resident": resident, "x_evicted_per_group": x_evicted_per_group,
               "weight_bytes": ks.weight_bytes, "footprint_bytes": fp, "l1d": asdict(geo) | {"sets": geo.sets}}
    return ProxyResult(rate, fp, details)


def model_proxy(weights, geometry: CacheGeometry | None = None, profile: dict | None = None) -> ProxyResult:
    """The proxy over one decode step's matmuls of a model (:class:`~apr_numba.model.weights.ModelWeights` or a
    list of packed matrices / kernel tuples): total load misses / total loads (each matrix streamed once,
    cold), footprint = the largest tile. ``details['per_kernel']`` lists the distinct matrix shapes."""
    mats = getattr(weights, "packed", weights)
    loads = misses = stores = smiss = 0.0
    fp = 0
    per: dict[str, dict] = {}
    for pm in mats:
        r = l1_miss_proxy(pm, geometry, profile)
        d = r.details
        loads += d["loads"]
        misses += d["load_misses"]
        stores += d["stores"]
        smiss += d["store_misses"]
        fp = max(fp, r.footprint_bytes)
        e = per.setdefault(d["kernel"], {"count": 0, "load_miss_rate": r.miss_rate, "footprint_bytes":
                                         r.footprint_bytes, "x_evicted_per_group": d["x_evicted_per_group"]})
        e["count"] += 1
    rate = misses / loads if loads else 0.0
    return ProxyResult(rate, fp, {"loads": loads, "load_misses": misses, "stores": stores, "store_misses": smiss,
                                  "miss_rate_all": (misses + smiss) / (loads + stores) if loads else 0.0,
                                  "per_kernel": per, "code_profile": profile or code_profile(),
                                  "l1d": asdict(geometry or l1d_geometry())})
