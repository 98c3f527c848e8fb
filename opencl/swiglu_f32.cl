// kernel_swiglu_f32: act[t, i] = a(gu[t, i]) * gu[t, n_ff + i], the gated FFN activation.
//
// act_type 0 (ACT_SILU, SwiGLU: Shazeer 2020; HF LlamaMLP; llama.cpp ggml_swiglu): a(g) = silu(g) =
// g / (1 + exp(-g)). act_type 1 (ACT_GELU_TANH, GeGLU: gemma's MLP, HF gelu_pytorch_tanh; llama.cpp
// ggml_geglu): a(g) = 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))), in float32 as the CPU path's
// kernels/norm.py geglu. ggml-opencl kernels/glu.cl. gu holds [gate | up] side by side.
// gate_only (tracing the ffn_silu stage): act = a(g).
// NDRange: global (n_ff, ntok).

kernel void kernel_swiglu_f32(global const float *gu, global float *act, int n_ff, int gate_only, int act_type) {
    const int i = get_global_id(0);
    const int t = get_global_id(1);
    const float g = gu[(size_t)t * 2 * n_ff + i];
    const float s = act_type == 1 ? 0.5f * g * (1.0f + tanh(0.7978845608028654f * (g + 0.044715f * g * g * g)))
                                  : g / (1.0f + exp(-g));
    act[(size_t)t * n_ff + i] = gate_only ? s : s * gu[(size_t)t * 2 * n_ff + n_ff + i];
}
