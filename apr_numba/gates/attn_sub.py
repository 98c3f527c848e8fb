"""ATTN-SUB-001..005: the attention sub-stages (attn_scores, attn_softmax) in tracing, stage diff and bisection.

Measured with the real commands' code: :func:`apr_numba.debug.tracing.trace` (CPU backend),
:mod:`apr_numba.debug.stage_diff` and :func:`apr_numba.debug.bisection.compare_traces`, on the gated model with a short
prompt.
"""

from __future__ import annotations

import inspect
import tempfile
from pathlib import Path

import numpy as np

from apr_numba.gates.core import Measured

SUB = ("attn_scores", "attn_softmax")
PROMPT = "The capital of France is"
# Attention faults and the sub-stage where each enters (apr_numba.debug.faults.FAULTS[...].enters).
FAULTS = ("attn-scale", "causal-mask-off", "gqa-map")


def _tokens(ctx) -> list[int]:
    from apr_numba.generation.generate import prompt_ids

    return prompt_ids(ctx.model, PROMPT)


def _order_ok(names, where: str) -> list[str]:
    names = list(names)
    bad = []
    for s in ("k_post_rope", *SUB, "attention"):
        if s not in names:
            bad.append(f"{where}: {s} missing")
    if not bad:
        i = [names.index(s) for s in ("k_post_rope", *SUB, "attention")]
        if i != sorted(i):
            bad.append(f"{where}: order " + ", ".join(names[j] for j in sorted(i)))
    return bad


def attn_sub_001(ctx, *, stages=None, drop=()) -> Measured:
    """attn_scores and attn_softmax between k_post_rope and attention in: the stage table
    (``apr_numba.arch.stages.STAGES``), the ``SaveTensorStage`` enum, and the chain of a real trace
    (layer 0, CPU). Value: violations.

    Injection: ``stages`` replaces the stage table; ``drop`` removes stages from the captured trace."""
    from apr_numba.arch.stages import STAGES, SaveTensorStage
    from apr_numba.debug.tracing import trace

    bad = _order_ok(stages if stages is not None else STAGES, "stage table")
    bad += _order_ok([s.value for s in SaveTensorStage], "SaveTensorStage")
    tr = trace(ctx.model, tokens=_tokens(ctx), stages="k_post_rope,attn_scores,attn_softmax,attention", layers="0")
    chain = [st for (_, st) in tr.keys() if st not in drop]
    bad += _order_ok(chain, "traced chain")
    return Measured(float(len(bad)), detail=("chain " + " -> ".join(chain) + (f"; {'; '.join(bad)}" if bad else "")),
                    data={"chain": chain, "violations": bad})


def attn_sub_002(ctx, *, mutate=None) -> Measured:
    """Trace attn_scores and attn_softmax of the first and last layer for a prompt of T tokens, in memory and saved
    (APRT files + trace.json, read back with ``Trace.load``): each must be (n_head, T, T) with n_head * T * T
    elements in its file and zeros above the diagonal. Value: violations.

    Injection: ``mutate(trace)`` alters the Trace before it is checked and saved (a capture writing the wrong
    shape)."""
    from apr_numba.debug.tracing import Trace, read_aprt, stage_path, trace

    m = ctx.model
    c = m.config
    toks = _tokens(ctx)
    T = len(toks)
    layers = sorted({0, c.n_layer - 1})
    tr = trace(m, tokens=toks, stages=",".join(SUB), layers=layers)
    if mutate is not None:
        mutate(tr)
    want = (c.n_head, T, T)
    bad = []
    with tempfile.TemporaryDirectory(prefix="apr-gate-trace-") as tmp:
        tr.save(tmp)
        back = Trace.load(tmp)
        for layer in layers:
            for st in SUB:
                a = tr.get(st, layer)
                if a.shape != want:
                    bad.append(f"layer {layer} {st}: shape {a.shape}")
                lay, flat = read_aprt(stage_path(Path(tmp), layer, st))
                if lay != layer or flat.size != int(np.prod(want)):
                    bad.append(f"layer {layer} {st}.bin: layer {lay}, {flat.size} values")
                if back.get(st, layer).shape != want:
                    bad.append(f"layer {layer} {st}: reloaded shape {back.get(st, layer).shape}")
                if a.ndim == 3 and a.shape[1] == a.shape[2] and np.triu(a, 1).any():
                    bad.append(f"layer {layer} {st}: non-zero above the diagonal")
    return Measured(float(len(bad)), detail=(f"layers {layers}, T={T}, want {want}" + (f"; {'; '.join(bad[:3])}" if bad
                                                                                      else "; all shapes right")),
                    data={"shape": list(want), "violations": bad})


def _generic(a, b) -> dict:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    d = np.abs(a - b)
    na, nb = np.sqrt(a @ a), np.sqrt(b @ b)
    return {"cosine": 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb)), "max_abs_diff": float(d.max()),
            "rms_diff": float(np.sqrt(np.mean(d * d)))}


def attn_sub_003(ctx, *, diff_fn=None) -> Measured:
    """``apr-numba diff``'s code (:func:`apr_numba.debug.stage_diff.diff_files`) on the attn_scores / attn_softmax APRT
    files of a clean trace and one with the attn-scale fault (layer 0): it must run, its JSON must satisfy the
    apr-stage-diff-v1 schema, its cosine / max_abs_diff / rms_diff must equal the generic float64 formulas
    computed here, and the source of the diff code must not name the attention sub-stages (no stage-specific
    code). Value: failed checks.

    Injection: ``diff_fn(path_a, path_b, limit)`` replaces ``diff_files``."""
    from apr_numba.debug import stage_diff
    from apr_numba.debug.tracing import stage_path, trace

    fn = diff_fn or stage_diff.diff_files
    m = ctx.model
    toks = _tokens(ctx)
    bad = []
    rows = {}
    with tempfile.TemporaryDirectory(prefix="apr-gate-diff-") as tmp:
        a_dir, b_dir = Path(tmp, "a"), Path(tmp, "b")
        ta = trace(m, tokens=toks, stages=",".join(SUB), layers="0", save_dir=a_dir)
        tb = trace(m, tokens=toks, stages=",".join(SUB), layers="0", inject="attn-scale@0", save_dir=b_dir)
        for st in SUB:
            try:
                r = fn(stage_path(a_dir, 0, st), stage_path(b_dir, 0, st), 5)
                js = r.to_json()
                stage_diff.validate_diff_json(js)
            except Exception as exc:  # noqa: BLE001 - any failure of the diff on these stages is the finding
                bad.append(f"{st}: {type(exc).__name__}: {exc}")
                continue
            g = _generic(ta.get(st, 0), tb.get(st, 0))
            rows[st] = {"cosine": js["cosine"], "max_abs_diff": js["max_abs_diff"], "rms_diff": js["rms_diff"]}
            for k, v in g.items():
                got = js[k]
                if got is None or abs(got - v) > 1e-9 * max(1.0, abs(v)):
                    bad.append(f"{st}: {k} {got} != {v:.12g}")
    src = inspect.getsource(inspect.getmodule(fn) or fn)
    named = [s for s in (*SUB, "attn_") if s in src]
    if named:
        bad.append(f"the diff code names {', '.join(named)}")
    return Measured(float(len(bad)), detail=(", ".join(f"{k}: cos {v['cosine']:.6f}" for k, v in rows.items()) +
                                             (f"; {'; '.join(bad[:3])}" if bad else "; generic numbers match")),
                    data={"diffs": rows, "failed": bad})


def attn_sub_004(ctx, *, drop=()) -> Measured:
    """Bisection (:func:`apr_numba.debug.bisection.compare_traces`: aprender's rule on every stage of layers
    0..L+1 and the
    whole-model stages) of a CPU trace with an attention fault at layer L against the clean CPU trace, for the
    faults attn-scale, causal-mask-off and gqa-map (entering at attn_scores, attn_softmax, attn_scores). Each must
    name exactly one first divergence, at layer L, and that stage must be the fault's sub-stage. Value: faults not
    named so.

    Injection: ``drop`` removes stages from both traces before the walk (a trace without the sub-stages)."""
    from apr_numba.debug.bisection import compare_traces
    from apr_numba.debug.faults import plan_fault
    from apr_numba.debug.tracing import trace

    m = ctx.model
    c = m.config
    L = min(1, c.n_layer - 1)
    layers = f"0..{min(L + 1, c.n_layer - 1)}"
    toks = _tokens(ctx)

    def strip(tr):
        for key in [k for k in tr.tensors if k[1] in drop]:
            del tr.tensors[key]
        return tr

    clean = strip(trace(m, tokens=toks, stages="all", layers=layers))
    missed, named = [], {}
    for f in FAULTS:
        spec = f"{f}@{L}"
        plan = plan_fault(spec, c, m.source)
        want = plan.expected()
        if want is None:  # a no-op on this model
            continue
        res = compare_traces(strip(trace(m, tokens=toks, stages="all", layers=layers, inject=spec)), clean,
                             inject=spec, config=c, source=m.source)
        got = (res.layer, res.stage)
        named[spec] = {"named": list(got), "expected": list(want)}
        if res.index is None or got != tuple(want) or got[1] not in SUB:
            missed.append(f"{spec}: named {got}, expected {tuple(want)}")
    return Measured(float(len(missed)), detail=("; ".join(f"{k} -> {v['named'][1]}@{v['named'][0]}"
                                                          for k, v in named.items()) + (f"; {'; '.join(missed)}"
                                                                                        if missed else "")),
                    data={"faults": named, "missed": missed})


def attn_sub_005(ctx, *, alias_kv: bool = False, n: int = 8) -> Measured:
    """Greedy decoding of n tokens twice from the same prompt through the traceable forward
    (``cpu_forward.forward``): once with an empty trace table, once with every stage of the first and last layer
    plus final_norm captured at every step (as ``apr-numba trace`` fills it). Tokens and the logits' bytes must be
    identical at every step. Value: steps that differ. (Untraced short calls run the persistent-worker decode,
    the same arithmetic compiled apart: equal to float32 rounding, tests/test_workers.py.)

    Injection: ``alias_kv`` points the capture buffer at the KV cache's memory (a capture that writes into the
    model's state)."""
    from apr_numba.debug.tracing import parse_stages, trace_table, wanted_keys

    m = ctx.model
    c = m.config
    toks = _tokens(ctx)
    layers = sorted({0, c.n_layer - 1})
    sp = m.spec
    have = set(sp.block_stages())  # a MoE block: the router, ids and experts instead of the dense FFN stages
    stages = [s for s in parse_stages("all", moe=bool(sp.n_expert)) if s != "lm_head" and s in have]
    keys = wanted_keys(stages, layers)
    moe = (sp.n_expert, sp.n_expert_used) if sp.n_expert else None

    def run(capture: bool):
        st = m.new_state(cpu=True)  # the model's n_ctx: roomy enough for the aliasing injection
        ids, out, logs = list(toks), [], []
        for _ in range(n):
            T = len(ids)
            logits = np.empty((1, c.n_vocab), np.float32)
            if capture:
                off, buf, _ = trace_table(c, keys, T, st.n_past, moe)
                if alias_kv:
                    if buf.size > st.k.size:
                        raise RuntimeError("KV cache too small to alias the capture buffer")
                    buf = st.k.reshape(-1)[:buf.size]
                m.forward_into(np.asarray(ids, np.int64), logits, m.no_capture, st, m.debug_args(off, buf))
            else:  # a fresh default dbg tuple: the traceable forward with nothing traced
                m.forward_into(np.asarray(ids, np.int64), logits, m.no_capture, st, m.debug_args())
            st.n_past += T
            tok = int(np.argmax(logits[-1]))
            out.append(tok)
            logs.append(logits[-1].tobytes())
            ids = [tok]
        return out, logs

    plain_t, plain_l = run(False)
    cap_t, cap_l = run(True)
    diff = sum(1 for i in range(n) if plain_t[i] != cap_t[i] or plain_l[i] != cap_l[i])
    return Measured(float(diff), detail=(f"{n} greedy steps, {len(keys)} stages captured per step: " +
                                         ("tokens and logits bytes identical" if diff == 0 else
                                          f"{diff} steps differ (tokens {plain_t} vs {cap_t})")),
                    data={"plain": plain_t, "captured": cap_t})
