// kernel_attn_f32: causal grouped-query attention over the device KV cache.
//
// For query head h (KV head h / n_rep, GQA) of row t at absolute position p = pos0 + t:
//   out[t, h] = softmax(q_h . K[lo..p] * scale) @ V[lo..p]
// scale is the model's attention scale (ArchSpec.attn_scale: 1/sqrt(head_dim), or gemma's
// query_pre_attn_scalar^-1/2); lo = 0, or with a sliding window (window > 0) lo = max(0, p - window + 1):
// keys k with p - window < k <= p (llama.cpp LLAMA_SWA_TYPE_STANDARD, HF sliding_window).
// (Vaswani et al. 2017; llama.cpp build_attn kq -> kq_soft_max -> kqv; the CPU path's
// kernels/attention.py, whose step order this follows: scaled scores, row max, exp(s - max), sum,
// weights e / sum, weighted sum of V, all in float32).
// One work-group per (head, row): work-items stride over positions for the scores, then over head_dim
// for the weighted sum of V (adjacent work-items read adjacent V values). Scores go to a global scratch
// row (n_ctx floats per (row, head)), visible to the work-group after the global-memory barrier.
// NDRange: global (WG, n_head, ntok), local (WG, 1, 1). HEAD_DIM is a build-time define.
//
// Tracing and teaching faults (apr_numba.stages; all off in normal runs): n_keys > 0 lets every row see
// n_keys keys (causal-mask-off; the window is then off too, as in the CPU path), kv_shift maps head h to KV head (h / n_rep + kv_shift) % n_kv (gqa-map),
// no_max skips the max subtraction and overflows like float16 (softmax-no-max); attn-scale is the host
// passing scale 1. With capture, the scaled scores and the softmax weights of row t, head h go to
// cap_s / cap_p [(h * ntok + t) * cap_nk + p] (aprender stages attn_scores / attn_softmax; the host
// zero-fills the buffers): scores for p < n, i.e. before the mask but zero above the diagonal, including
// the keys before a sliding window (the stage definition in apr_numba.arch.stages and the float64
// reference), and the softmax weights for p in [lo, n), zero where masked.

#ifndef WG
#define WG 64        // work-group size (power of two), set from the device at build time
#endif
#ifndef HEAD_DIM
#define HEAD_DIM 64  // per-head size of the model
#endif

kernel void kernel_attn_f32(
        global const float *qkv, int qkv_stride,        // (ntok, q_dim + 2 kv_dim); Q at column 0
        global const float *k_cache, global const float *v_cache,
        long cache_off, int kv_dim, int n_rep, int pos0,
        global float *scores, int scores_stride,        // (ntok, n_head, scores_stride) scratch
        global float *out, int out_stride,              // (ntok, out_stride); head h at column h*HEAD_DIM
        float scale, int window, int n_keys, int kv_shift, int no_max,
        int capture, global float *cap_s, global float *cap_p, int cap_nk) {
    const int lid = get_local_id(0);
    const int h = get_group_id(1);
    const int t = get_group_id(2);
    const int n_head = get_num_groups(1);
    const int n = n_keys > 0 ? n_keys : pos0 + t + 1;    // positions lo .. n - 1 are visible
    const int lo = (window > 0 && n_keys == 0) ? max(0, pos0 + t - window + 1) : 0;
    const int kvo = ((h / n_rep + kv_shift) % (kv_dim / HEAD_DIM)) * HEAD_DIM;
    global const float *kc = k_cache + (size_t)cache_off + kvo;
    global const float *vc = v_cache + (size_t)cache_off + kvo;
    global float *sc = scores + ((size_t)t * n_head + h) * scores_stride;
    local float q[HEAD_DIM];
    local float red[WG];

    for (int d = lid; d < HEAD_DIM; d += WG) q[d] = qkv[(size_t)t * qkv_stride + h * HEAD_DIM + d];
    barrier(CLK_LOCAL_MEM_FENCE);

    // attn_scores and the row max
    float mx = -INFINITY;
    for (int p = lo + lid; p < n; p += WG) {
        global const float *k = kc + (size_t)p * kv_dim;
        float acc = 0.0f;
        for (int d = 0; d < HEAD_DIM; ++d) acc += q[d] * k[d];
        acc *= scale;
        sc[p] = acc;
        mx = fmax(mx, acc);
        if (capture) cap_s[((size_t)h * get_num_groups(2) + t) * cap_nk + p] = acc;
    }
    if (capture) {  // attn_scores is "before the mask": the keys before a sliding window too
        for (int p = lid; p < lo; p += WG) {
            global const float *k = kc + (size_t)p * kv_dim;
            float acc = 0.0f;
            for (int d = 0; d < HEAD_DIM; ++d) acc += q[d] * k[d];
            cap_s[((size_t)h * get_num_groups(2) + t) * cap_nk + p] = acc * scale;
        }
    }
    red[lid] = mx;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = WG / 2; s > 0; s >>= 1) {
        if (lid < s) red[lid] = fmax(red[lid], red[lid + s]);
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    mx = no_max ? 0.0f : red[0];
    barrier(CLK_LOCAL_MEM_FENCE);

    // attn_softmax: exp(s - max) and the sum
    float tot = 0.0f;
    for (int p = lo + lid; p < n; p += WG) {
        float e = exp(sc[p] - mx);
        if (no_max && e > 65504.0f) e = INFINITY;
        sc[p] = e;
        tot += e;
    }
    red[lid] = tot;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = WG / 2; s > 0; s >>= 1) {
        if (lid < s) red[lid] += red[lid + s];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    const float inv = 1.0f / red[0];
    barrier(CLK_LOCAL_MEM_FENCE | CLK_GLOBAL_MEM_FENCE);  // every sc[p] written by the group is visible
    if (capture) {
        for (int p = lo + lid; p < n; p += WG) cap_p[((size_t)h * get_num_groups(2) + t) * cap_nk + p] = sc[p] * inv;
    }

    // attention: softmax weights @ V
    for (int d = lid; d < HEAD_DIM; d += WG) {
        float o = 0.0f;
        for (int p = lo; p < n; ++p) o += sc[p] * inv * vc[(size_t)p * kv_dim + d];
        out[(size_t)t * out_stride + h * HEAD_DIM + d] = o;
    }
}
