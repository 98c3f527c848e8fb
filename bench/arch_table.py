"""The architecture x backend table of docs/architectures.md: last-position logits cosine against HF, per backend.

For each committed tiny fixture (tests/fixtures/arch/<name>.gguf with <name>_ref.npz) and gemma-3-270m
(models/gemma-3-270m-q4_k_m.gguf with tests/fixtures/hf_gemma3-270m.npz), on the 5 recorded prompts (HF's ids):

* ``cos``: the smallest cosine over the prompts of the last-position logits against HF transformers fp32 on the
  same GGUF, for the Numba CPU forward, OpenCL (PoCL, through apr_numba.load(backend="opencl"); the parity gate
  must keep the device path) and the float64 NumPy reference;
* ``greedy``: whether the plain-argmax continuation (fed back token by token through each backend's KV cache)
  equals HF's recorded ``greedy_ids`` over the first ``--greedy`` steps (up to the first HF near-tie, margin
  <= 1e-3, as tests/test_arch_hf_parity.py does) on every prompt.

Run::

    PYTHONPATH=. .venv/bin/python bench/arch_table.py [--greedy 20] [--json out.json]

Prints a Markdown table with the CPU model and the load average.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import cpu_model, load_average  # noqa: E402

ARCH = ROOT / "tests" / "fixtures" / "arch"
MARGIN_MIN = 1e-3


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def cases() -> list[tuple[str, Path, Path]]:
    out = []
    for meta in sorted(ARCH.glob("*_ref.json")):
        m = json.loads(meta.read_text())
        out.append((m["model"], ARCH / m["gguf_file"], ARCH / f"{m['model']}_ref.npz"))
    g = ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"
    if g.exists():
        out.append(("gemma3-270m", g, ROOT / "tests" / "fixtures" / "hf_gemma3-270m.npz"))
    return out


def n_steps(ref, i: int, limit: int) -> int:
    ids = ref[f"greedy_ids_{i}"]
    margins = ref[f"greedy_margin_{i}"] if f"greedy_margin_{i}" in ref else np.ones(len(ids))
    low = np.flatnonzero(np.asarray(margins, np.float64) <= MARGIN_MIN)
    return min(limit, int(low[0]) if low.size else len(ids))


class Runner:
    """last(ids) -> last-position logits; greedy(ids, n) -> n argmax tokens, for one backend."""

    def __init__(self, kind: str, path: Path):
        from apr_numba.model.decoder import load

        self.kind = kind
        if kind == "reference":
            from apr_numba.backends.reference import ReferenceModel

            self.ref = ReferenceModel(path)
        else:
            self.m = load(path, backend=kind, n_ctx=256, warmup=False)
            if kind == "opencl" and self.m.backend != "opencl":
                raise RuntimeError(f"OpenCL path rejected: {self.m.parity}")

    def _step(self, ids, st):
        if self.kind == "reference":
            return self.ref.eval(ids, st)[-1]
        if self.kind == "opencl":
            return self.m.opencl.eval(ids, 1, st)[-1]
        return self.m.eval(ids, state=st)[-1]

    def _state(self, n):
        if self.kind == "reference":
            return self.ref.new_state(n)
        if self.kind == "opencl":
            return self.m.opencl.new_state(n)
        return self.m.new_state(n, cpu=True)

    def run(self, ids, n):
        st = self._state(len(ids) + n + 1)
        last = self._step(ids, st)
        out, logits = [], last
        for _ in range(n):
            out.append(int(np.argmax(logits)))
            logits = self._step([out[-1]], st)
        return last, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--greedy", type=int, default=20)
    ap.add_argument("--json", default=None)
    ap.add_argument("--backends", nargs="+", default=["cpu", "opencl", "reference"])
    args = ap.parse_args(argv)
    rows = []
    for name, path, refp in cases():
        ref = np.load(refp)
        n_prompts = sum(1 for k in ref.files if k.startswith("prompt_ids_"))
        row = {"model": name}
        for kind in args.backends:
            try:
                r = Runner(kind, path)
            except Exception as exc:  # noqa: BLE001 - reported in the table
                row[kind] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            coss, equal, compared = [], True, []
            for i in range(n_prompts):
                ids = [int(t) for t in ref[f"prompt_ids_{i}"]]
                n = n_steps(ref, i, args.greedy)
                last, toks = r.run(ids, n)
                coss.append(cosine(last, ref[f"last_logits_{i}"]))
                equal &= toks == [int(t) for t in ref[f"greedy_ids_{i}"][:n]]
                compared.append(n)
            row[kind] = {"min_cos": min(coss), "greedy_equal": bool(equal), "steps": compared}
            print(name, kind, row[kind], flush=True)
        rows.append(row)
    print(f"\nCPU: {cpu_model()}; load average {load_average()}\n")
    print("| model | " + " | ".join(f"{k} cos (min of 5) | {k} greedy" for k in args.backends) + " |")
    print("|---|" + "---|---|" * len(args.backends))
    for row in rows:
        cells = []
        for k in args.backends:
            v = row[k]
            cells += [v["error"][:60], "-"] if "error" in v else [f"1 - {1 - v['min_cos']:.1e}",
                                                                   "equal" if v["greedy_equal"] else "DIFFERS"]
        print(f"| {row['model']} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_model(), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
