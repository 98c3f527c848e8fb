"""The mixture-of-experts FFN of the OpenCL backend (qwen3moe; ArchSpec feature ``moe``).

The same steps as the CPU forward's ``_moe_ffn`` (:mod:`apr_numba.backends.cpu_forward`; HF
``Qwen3MoeSparseMoeBlock``, llama.cpp ``build_moe_ffn`` with softmax gating and ``norm_w``):

    router = h @ W_router.T                     # (T, n_expert)                          moe_router
    p      = softmax(router); top-k by p (ties to the lower id, torch.topk); w = p / sum(top-k p)
                                                # (T, k) ids                             moe_router_indices
    out[t] = sum_j w[t, j] * down_e(act(gate_e h[t]) * up_e h[t]),  e = ids[t, j]      # moe_ffn_out

The router matvec runs on the device; its logits (4 * n_expert bytes per token, one counted device-to-host
copy per layer) come back to the host, which picks the top-k with the CPU path's float32 math
(:func:`moe_topk`). Only the chosen experts' matrices are then read: for rank j = 0..k-1 and each expert e
that some token chose at rank j, those tokens' rows of h are gathered on the device (buffer-to-buffer
copies, no host transfer), e's gate / up / down matvecs run over them as one batch, and each output row is
added to its token's row of ``out`` with its weight (``kernel_axpy_f32``), so every token sums its experts
in rank order, as the CPU does.

Expert stacks ``blk.N.ffn_{gate,up,down}_exps.weight`` (n_expert, rows, cols) store expert e's rows
contiguously (GGUF ne [cols, rows, n_expert]); each expert's byte range is uploaded once, at construction,
as its own read-only buffer of raw GGML blocks (the matvec kernels take a buffer, not a byte offset, and
OpenCL sub-buffers need origins aligned to ``CL_DEVICE_MEM_BASE_ADDR_ALIGN``, which an expert's byte size
is not in general). Device weight bytes still equal the file's tensor bytes.
"""

from __future__ import annotations

import numpy as np
import pyopencl as cl

from apr_numba.arch.stages import STAGE
from apr_numba.backends.reference_ops import softmax

EXPERT_STACKS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


def moe_topk(logits: np.ndarray, k: int, norm: bool) -> tuple[np.ndarray, np.ndarray]:
    """Softmax top-k gating of router logits, in their dtype (float32 here, as the CPU path).

    Args:
        logits: (T, n_expert) router logits. k: experts per token. norm: renormalise the k weights to sum 1.

    Returns:
        ids int64 (T, k), by decreasing probability, ties to the lower id (torch.topk, the CPU loop); weights
        (T, k) of logits' dtype.
    """
    p = softmax(logits, axis=-1)
    ids = np.argsort(-p, axis=-1, kind="stable")[:, :k]
    w = np.take_along_axis(p, ids, axis=-1)
    if norm:
        w = w / np.sum(w, axis=-1, keepdims=True, dtype=w.dtype)
    return ids, w.astype(logits.dtype, copy=False)


def upload_experts(be, src, blk: dict) -> dict:
    """Upload one MoE layer: the router (raw blocks) and every expert's gate / up / down byte range.

    Args:
        be: the :class:`~apr_numba.backends.opencl.OpenCLBackend` (its ``_matrix`` / ``_upload``).
        src: the weights source. blk: ``spec.block_tensors(layer)``.

    Returns:
        {"router": matrix tuple, "experts": [(gate, up, down) matrix tuples per expert]}, a matrix tuple being
        (buffer, ggml type, cols, rows) as ``OpenCLBackend._matrix``.

    Raises:
        ModelFormatError: a stack's type has no OpenCL kernel or its columns are not a multiple of 32.
    """
    stacks = []
    for s in EXPERT_STACKS:
        ts = blk[s + ".weight"]
        E, rows, cols = ts.shape
        be._check_matrix(src, ts)
        t = src.tensors[ts.name]
        raw = np.asarray(src.data(ts.name)).view(np.uint8).reshape(E, -1)
        stacks.append((raw, int(t.ggml_type), cols, rows))
    experts = [tuple((be._upload(np.ascontiguousarray(raw[e])), gt, cols, rows) for raw, gt, cols, rows in stacks)
               for e in range(stacks[0][0].shape[0])]
    return {"router": be._matrix(src, blk["ffn_gate_inp.weight"]), "experts": experts}


class MoEScratch:
    """Device scratch of the MoE FFN for ``max_batch`` tokens: router logits (B, E), gathered rows (B, D), the
    experts' [gate | up] (B, 2 Fe) and activation (B, Fe), and one expert's output rows (B, D)."""

    def __init__(self, be):
        c, B, spec = be.config, be.max_batch, be.spec
        E, Fe, D = spec.n_expert, spec.n_ff_expert, c.n_embd

        def buf(n):
            return cl.Buffer(be.ctx, cl.mem_flags.READ_WRITE, 4 * int(n))

        self.router, self.hx, self.gu, self.act, self.y = buf(B * E), buf(B * D), buf(B * 2 * Fe), buf(B * Fe), \
            buf(B * D)


def moe_ffn(be, lw: dict, layer: int, T: int, tr=None) -> None:
    """be.o (T, n_embd) <- the MoE FFN of be.h (T, n_embd) for layer ``layer`` (weights ``lw``, see the module
    docstring); traces moe_router, moe_router_indices and moe_ffn_out when ``tr`` asks for them."""
    c, spec, prg, q, s = be.config, be.spec, be.prg, be.queue, be.moe_scratch
    D, E, k, Fe = c.n_embd, spec.n_expert, spec.n_expert_used, spec.n_ff_expert
    r = lw["router"]
    prg.matvec(r[1], r[0], r[2], r[3], be.h, D, s.router, E, 0, T)
    if tr is not None:
        tr.grab(STAGE.moe_router, layer, s.router, E, 0, E)
    ids, w = moe_topk(be._d2h(np.empty((T, E), np.float32), s.router), k, spec.expert_norm)
    if tr is not None:
        tr.put(STAGE.moe_router_indices, layer, ids.astype(np.float32))
    cl.enqueue_fill_buffer(q, be.o, np.float32(0), 0, 4 * T * D)
    for j in range(k):
        for e in np.unique(ids[:, j]):
            toks = np.flatnonzero(ids[:, j] == e)
            n = toks.size
            if n == T:  # every token: its rows are h as it is
                x = be.h
            else:
                x = s.hx
                for i, t in enumerate(toks):
                    cl.enqueue_copy(q, s.hx, be.h, byte_count=4 * D, src_offset=4 * int(t) * D, dst_offset=4 * i * D)
            g, u, d = lw["experts"][int(e)]
            prg.matvec(g[1], g[0], g[2], g[3], x, D, s.gu, 2 * Fe, 0, n)
            prg.matvec(u[1], u[0], u[2], u[3], x, D, s.gu, 2 * Fe, Fe, n)
            prg.swiglu(q, (Fe, n), None, s.gu, s.act, Fe, 0, spec.activation)
            prg.matvec(d[1], d[0], d[2], d[3], s.act, Fe, s.y, D, 0, n)
            for i, t in enumerate(toks):
                prg.axpy(q, (D,), None, be.o, int(t) * D, s.y, i * D, w[t, j])
    if tr is not None:
        tr.grab(STAGE.moe_ffn_out, layer, be.o, D, 0, D)
