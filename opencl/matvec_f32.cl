// kernel_matvec_<WTYPE>_f32: Y (ntok, rows) = X (ntok, cols) @ W.T for a matrix W of raw GGML blocks.
//
// Needs quants.cl in front (the host concatenates them) and -D WTYPE=<q4_0|q4_1|q5_0|q5_1|q8_0|q2_K|q3_K|
// q4_K|q5_K|q6_K|iq4_nl|iq4_xs|f16|bf16|f32>. This is llama.cpp's mul_mv_<type>_f32 (ggml-opencl kernels/mul_mv_*.cl) for
// ntok = 1 (decode) and a tiled mul_mm for ntok > 1 (prefill): each decoded chunk of W is reused for TB
// activation rows, so W is read ceil(ntok / TB) times instead of ntok times.
//
// Work decomposition: a work-group of LANES x ROWS work-items owns ROWS consecutive rows; the LANES
// work-items of a row stride over its 32-value chunks (adjacent lanes read adjacent blocks), keep
// float8 vectors of partial products, and reduce them in local memory (a tree; LANES is a power of two).
// NDRange: global (LANES, ceil(rows / ROWS) * ROWS, ceil(ntok / TB)), local (LANES, ROWS, 1).
//
// X rows start every x_stride floats; Y element (t, r) is written to y[t * y_stride + y_off + r], so
// Q, K and V (or gate and up) land side by side in one buffer, as in the CPU path's matmul3.

#ifndef LANES
#define LANES 32  // work-items sharing one row (power of two), set from the device at build time
#endif
#ifndef ROWS
#define ROWS 4    // rows per work-group
#endif
#ifndef TB
#define TB 4      // activation rows (tokens) per pass over W
#endif

inline float hsum8(float8 v) {
    const float4 b = v.lo + v.hi;
    return (b.x + b.y) + (b.z + b.w);
}

// acc[t] += partial products of this lane's chunks of row wr with activation row t0 + t, t < nt.
// Called with nt = TB (a full tile), 1 (decode) or the tile's remainder; the first two are compile-time
// constants after inlining, so their token loops unroll without bounds checks.
inline void row_dot(global const uchar *wr, int nch, int lane, global const float *x, int x_stride, int t0,
                    const int nt, float8 *acc) {
    for (int c = lane; c < nch; c += LANES) {
        float8 w[4];
        DEQUANT_CHUNK(wr, c, w);
        for (int t = 0; t < nt; ++t) {
            global const float *xp = x + (size_t)(t0 + t) * x_stride + c * QK_CHUNK;
            acc[t] += (w[0] * vload8(0, xp) + w[1] * vload8(1, xp)) + (w[2] * vload8(2, xp) + w[3] * vload8(3, xp));
        }
    }
}

kernel void CAT(CAT(kernel_matvec_, WTYPE), _f32)(
        global const uchar *W,     // (rows, row_bytes) raw GGML blocks
        int ncols, int nrows,
        global const float *x,     // (ntok, x_stride) float32 activations
        int x_stride,
        global float *y,           // (ntok, y_stride) float32 output
        int y_stride, int y_off, int ntok) {
    const int lane = get_local_id(0);
    const int lrow = get_local_id(1);
    const int row = get_group_id(1) * ROWS + lrow;
    const int t0 = get_group_id(2) * TB;
    local float part[TB][ROWS][LANES];

    float8 acc[TB];
    for (int t = 0; t < TB; ++t) acc[t] = (float8)(0.0f);
    if (row < nrows) {
        global const uchar *wr = W + (size_t)row * ROW_BYTES(ncols);
        const int nch = ncols / QK_CHUNK;
        const int nt = min(TB, ntok - t0);
        if (nt == TB) {
            row_dot(wr, nch, lane, x, x_stride, t0, TB, acc);
        } else if (nt == 1) {
            row_dot(wr, nch, lane, x, x_stride, t0, 1, acc);
        } else {
            row_dot(wr, nch, lane, x, x_stride, t0, nt, acc);
        }
    }
    for (int t = 0; t < TB; ++t) part[t][lrow][lane] = hsum8(acc[t]);
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = LANES / 2; s > 0; s >>= 1) {
        if (lane < s) {
            for (int t = 0; t < TB; ++t) part[t][lrow][lane] += part[t][lrow][lane + s];
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (lane == 0 && row < nrows) {
        for (int t = 0; t < TB; ++t) {
            if (t0 + t < ntok) y[(size_t)(t0 + t) * y_stride + y_off + row] = part[t][lrow][0];
        }
    }
}
