// Element-wise and per-head kernels of the ArchSpec block features (apr_numba.arch.spec), in the CPU
// path's float32 math (kernels/norm.py):
//
// kernel_rms_norm_heads_f32: QK-norm. RMSNorm of each head of x in place (Qwen3 q_norm / k_norm, Gemma3;
//   llama.cpp build_norm on the (head_dim, n_head, T) view; CPU rmsnorm_heads): row t, head h holds
//   head_dim values at column col0 + h * head_dim; x <- x / sqrt(mean(x^2) + eps) * w, w (head_dim,).
//   NDRange: global (WG, n_heads, ntok), local (WG, 1, 1).
// kernel_scale_f32: x[i] *= s (gemma's embedding scale sqrt(n_embd); CPU scale_inplace). global (n,).
// kernel_softcap_f32: x[i] = c * tanh(x[i] / c) (final logit soft-capping, Gemma 2; llama.cpp
//   final_logit_softcapping; CPU softcap_inplace). global (n,).
// kernel_axpy_f32: y[y_off + i] += a * x[x_off + i] (a mixture-of-experts FFN adds each chosen expert's output
//   with its router weight; CPU _moe_ffn). global (n,).

#ifndef WG
#define WG 64  // work-group size (power of two), set from the device at build time
#endif

kernel void kernel_rms_norm_heads_f32(global float *x, int x_stride, int col0, int head_dim,
                                      global const float *w, float eps) {
    const int lid = get_local_id(0);
    const int h = get_group_id(1);
    const int t = get_group_id(2);
    global float *xh = x + (size_t)t * x_stride + col0 + h * head_dim;
    local float red[WG];
    float ss = 0.0f;
    for (int i = lid; i < head_dim; i += WG) ss += xh[i] * xh[i];
    red[lid] = ss;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = WG / 2; s > 0; s >>= 1) {
        if (lid < s) red[lid] += red[lid + s];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    const float inv = 1.0f / sqrt(red[0] / (float)head_dim + eps);
    for (int i = lid; i < head_dim; i += WG) xh[i] = xh[i] * inv * w[i];
}

kernel void kernel_scale_f32(global float *x, float s) {
    x[get_global_id(0)] *= s;
}

kernel void kernel_softcap_f32(global float *x, float c) {
    const int i = get_global_id(0);
    x[i] = c * tanh(x[i] / c);
}

kernel void kernel_axpy_f32(global float *y, int y_off, global const float *x, int x_off, float a) {
    const int i = get_global_id(0);
    y[y_off + i] += a * x[x_off + i];
}
