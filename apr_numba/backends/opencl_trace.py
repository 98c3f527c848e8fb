"""Stage capture and teaching faults on the OpenCL path: the CPU forward's ``dbg`` contract.

``OpenCLBackend.run(toks, logits, cap, state, dbg=...)`` takes the same tuple as
:func:`apr_numba.backends.cpu_forward.forward` (``Model.debug_args``)::

    (trace_off int64 (N_STAGES, n_layer), trace_buf float32 (n,), layer_fault int64 (n_layer, N_FAULTS),
     rope_cos_alt, rope_sin_alt (float32 RoPE tables with the wrong base), eps_alt)

A stage whose offset is >= 0 is read back from the device buffer that holds it, right after the kernel that
produced it, and written to ``trace_buf[off:]`` as (T, width) row-major; attn_scores / attn_softmax come
from the attention kernel's capture outputs as (n_head, T, pos0 + T): scores before the mask, zero above the
diagonal (on sliding-window layers the keys before the window keep their scores, as the stage is defined and
the float64 reference records them; the Numba CPU capture leaves them 0), softmax zero where masked;
moe_router_indices (the host's top-k ids, as floats) is written from the host; whole-model stages use layer
0. Every read is a counted device-to-host copy. The teaching faults (apr_numba.arch.stages) change kernel
arguments only: rope-theta (the alt tables, uploaded once per call, on every layer whatever its own base),
rope-style (NORM <-> NEOX), attn-scale (scale 1 instead of the model's attention scale), causal-mask-off
(every row sees pos0 + T keys, no window), gqa-map (KV head shifted by one), qkv-bias-drop, softmax-no-max
(no max subtraction, float16 overflow), ffn-swap (gate and up swapped), rmsnorm-eps (eps_alt in every norm
of the layer: pre-norms, QK-norm, post-norms). A traced call runs as one chunk, as the CPU forward does, so
causal-mask-off sees the same keys.
"""

from __future__ import annotations

import copy

import numpy as np
import pyopencl as cl

from apr_numba.arch import faults as F
from apr_numba.arch import stages as S


class DeviceTrace:
    """One traced call of :meth:`OpenCLBackend.run` (T tokens at positions pos0..pos0+T-1)."""

    def __init__(self, backend, dbg, T: int, pos0: int):
        self.be, self.T, self.pos0 = backend, int(T), int(pos0)
        self.off, self.buf, self.flags, cos_alt, sin_alt, eps_alt = dbg
        self.eps_alt = np.float32(eps_alt)
        c = backend.config
        self.nk = self.pos0 + self.T
        self.alt = None
        if np.any(self.flags[:, F.F_ROPE_THETA]):
            self.alt = tuple(self._to_device(np.ascontiguousarray(t, np.float32)) for t in (cos_alt, sin_alt))
        attn = (self.off[S.S_ATTN_SCORES] >= 0) & (self.off[S.S_ATTN_SOFTMAX] >= 0)
        self.cap = None
        if np.any(attn):
            n = c.n_head * self.T * self.nk
            self.cap = (cl.Buffer(backend.ctx, cl.mem_flags.READ_WRITE, 4 * n),
                        cl.Buffer(backend.ctx, cl.mem_flags.READ_WRITE, 4 * n), n)

    def _to_device(self, arr: np.ndarray):
        buf = cl.Buffer(self.be.ctx, cl.mem_flags.READ_ONLY, arr.nbytes)
        self.be._h2d(buf, arr)
        return buf

    def wants(self, stage: str, layer: int) -> bool:
        return self.off[S.STAGE_ID[stage], layer] >= 0

    def grab(self, stage: str, layer: int, buf, stride: int, col0: int, width: int) -> None:
        """Copy columns col0..col0+width of the (T, stride) device rows ``buf`` to the stage's slot."""
        o = self.off[S.STAGE_ID[stage], layer]
        if o < 0:
            return
        rows = self.be._d2h(np.empty((self.T, stride), np.float32), buf)
        self.buf[o:o + self.T * width] = rows[:, col0:col0 + width].ravel()

    def put(self, stage: str, layer: int, arr: np.ndarray) -> None:
        """Write a host array (T, width) to the stage's slot (stages computed on the host: moe_router_indices)."""
        o = self.off[S.STAGE_ID[stage], layer]
        if o >= 0:
            self.buf[o:o + arr.size] = arr.ravel()

    def layer(self, layer: int):
        """The kernel arguments of ``layer`` with its teaching faults (a copy of the backend's plain ones)."""
        fl, f = self.flags[layer], copy.copy(self.be._plain)
        if fl[F.F_RMSNORM_EPS]:
            f.eps = self.eps_alt
        if fl[F.F_ATTN_SCALE]:
            f.scale = np.float32(1.0)
        if fl[F.F_ROPE_STYLE]:
            f.rope_type = self.be.spec.rope_type ^ 2  # NORM 0 <-> NEOX 2
        if fl[F.F_ROPE_THETA]:
            f.cos, f.sin = self.alt
        f.bias_drop, f.ffn_swap = bool(fl[F.F_QKV_BIAS_DROP]), bool(fl[F.F_FFN_SWAP])
        f.n_keys = self.nk if fl[F.F_CAUSAL_MASK_OFF] else 0
        f.kv_shift, f.no_max = int(bool(fl[F.F_GQA_MAP])), int(bool(fl[F.F_SOFTMAX_NO_MAX]))
        if self.cap is not None and self.off[S.S_ATTN_SCORES, layer] >= 0 and self.off[S.S_ATTN_SOFTMAX, layer] >= 0:
            f.capture, f.cap_s, f.cap_p, f.cap_nk = 1, self.cap[0], self.cap[1], self.nk
            for b in self.cap[:2]:  # zeros where masked, as the CPU capture
                cl.enqueue_fill_buffer(self.be.queue, b, np.float32(0), 0, 4 * self.cap[2])
        return f

    def grab_attention(self, layer: int) -> None:
        n = self.cap[2]
        for stage, b in ((S.S_ATTN_SCORES, self.cap[0]), (S.S_ATTN_SOFTMAX, self.cap[1])):
            o = self.off[stage, layer]
            self.buf[o:o + n] = self.be._d2h(np.empty(n, np.float32), b)

    def finish(self, logits: np.ndarray) -> None:
        """final_norm of every row (the layer-0 slot) and lm_head (the logits the call returns)."""
        be, c = self.be, self.be.config
        o = self.off[S.S_FINAL_NORM, 0]
        if o >= 0:
            wg = be.tuning.wg
            be.prg.rms_norm(be.queue, (wg, self.T), (wg, 1), be.x, c.n_embd, 0, be.output_norm, be.h, c.n_embd,
                            c.n_embd, np.float32(c.rms_eps))
            self.grab("final_norm", 0, be.h, c.n_embd, 0, c.n_embd)
        o = self.off[S.S_LM_HEAD, 0]
        if o >= 0 and logits.size:
            self.buf[o:o + logits.size] = logits.ravel()
