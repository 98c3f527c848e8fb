// GGML block layouts and 32-value chunk decoders, shared by matvec_f32.cl and get_rows_f32.cl.
//
// The structs re-declare ggml's (ggml/src/ggml-common.h) with the same comments; the decoders follow
// dequantize_row_* in ggml/src/ggml-quants.c. Weights stay in device memory exactly as in the GGUF
// file (zero repacking), so every block is decoded here, in registers.
//
// `half` members are declared as `ushort` (IEEE binary16 bits) and read with vload_half, so that no
// cl_khr_fp16 support is needed: OpenCL C allows `half` only behind a pointer without it.
//
// Every type is cut into chunks of 32 consecutive values of a row (a whole block for the 32-value
// types; one sub-block of a 256-value K-quant super-block; 32 plain values for F32/F16/BF16), so one
// kernel body serves every type: `DEQUANT_CHUNK(row, c, w)` writes values 32c .. 32c+31 of the row to
// four float8 vectors w[0..3]. The host builds one program per weight type with -D WTYPE=<type>.
//
// Fault injection (tests of the parity gate only): with -D FAULT_SCALE, every odd chunk's block scale
// has its sign flipped, a wrong-scale bug that yields finite, plausible-looking garbage.

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)

#define QK_CHUNK 32  // values per decoded chunk (the work unit of one work-item)

#ifdef FAULT_SCALE
#define SCALE(d, c) (((c) & 1) ? -(d) : (d))
#else
#define SCALE(d, c) (d)
#endif

#define HALF(p) vload_half(0, (global const half *)(p))

// Each decoder writes values 32c + 8i .. 32c + 8i + 7 to w[i], i < 4 (float8 vectors, so the dot products
// vectorize on SIMD CPUs and GPUs alike; 512-bit types such as float16 are avoided because PoCL warns
// about their ABI on AVX2 machines, and PoCL 3.0 cannot reload a cached build that had warnings).

// ---------------------------------------------------------------------------------------------------
// plain floats: "block" of 1 value
#define QK_f32 1
#define TS_f32 4
#define QK_f16 1
#define TS_f16 2
#define QK_bf16 1
#define TS_bf16 2

inline void dequant_chunk_f32(global const uchar *row, int c, float8 *w) {
    global const float *p = (global const float *)row + c * QK_CHUNK;
    for (int i = 0; i < 4; ++i) w[i] = vload8(i, p);
}

inline void dequant_chunk_f16(global const uchar *row, int c, float8 *w) {
    global const half *p = (global const half *)row + c * QK_CHUNK;
    for (int i = 0; i < 4; ++i) w[i] = vload_half8(i, p);
}

inline void dequant_chunk_bf16(global const uchar *row, int c, float8 *w) {
    global const ushort *p = (global const ushort *)row + c * QK_CHUNK;
    for (int i = 0; i < 4; ++i) w[i] = as_float8(convert_uint8(vload8(i, p)) << 16);
}

// values of 16 bytes of nibbles: w[0], w[1] <- low nibbles (elements 0..15), w[2], w[3] <- high nibbles
inline void nibbles(uchar16 q, float8 *w) {
    const uchar16 lo = q & (uchar)0x0F;
    const uchar16 hi = q >> (uchar)4;
    w[0] = convert_float8(lo.lo);
    w[1] = convert_float8(lo.hi);
    w[2] = convert_float8(hi.lo);
    w[3] = convert_float8(hi.hi);
}

// ---------------------------------------------------------------------------------------------------
// Q4_0: w = d * (q - 8); 4.5 bits per weight
#define QK4_0 32
#define QK_q4_0 QK4_0
#define TS_q4_0 18
typedef struct {
    ushort d;             // delta (half)
    uchar qs[QK4_0 / 2];  // nibbles / quants: element j low nibble of qs[j], element j+16 high nibble
} block_q4_0;

inline void dequant_chunk_q4_0(global const uchar *row, int c, float8 *w) {
    global const block_q4_0 *b = (global const block_q4_0 *)row + c;
    const float d = SCALE(HALF(&b->d), c);
    nibbles(vload16(0, b->qs), w);
    for (int i = 0; i < 4; ++i) w[i] = d * (w[i] - 8.0f);
}

// ---------------------------------------------------------------------------------------------------
// Q4_1: w = d * q + m; 5 bits per weight
#define QK4_1 32
#define QK_q4_1 QK4_1
#define TS_q4_1 20
typedef struct {
    ushort d;             // delta (half)
    ushort m;             // min (half)
    uchar qs[QK4_1 / 2];  // nibbles / quants
} block_q4_1;

inline void dequant_chunk_q4_1(global const uchar *row, int c, float8 *w) {
    global const block_q4_1 *b = (global const block_q4_1 *)row + c;
    const float d = SCALE(HALF(&b->d), c);
    const float m = HALF(&b->m);
    nibbles(vload16(0, b->qs), w);
    for (int i = 0; i < 4; ++i) w[i] = d * w[i] + m;
}

// ---------------------------------------------------------------------------------------------------
// Q5_0: w = d * (q - 16), q 5-bit; 5.5 bits per weight
#define QK5_0 32
#define QK_q5_0 QK5_0
#define TS_q5_0 22
typedef struct {
    ushort d;             // delta (half)
    uchar qh[4];          // 5-th bit of quants (little-endian uint32, bit j belongs to element j)
    uchar qs[QK5_0 / 2];  // nibbles / quants
} block_q5_0;

inline uint load_u32(global const uchar *p) {
    return (uint)p[0] | ((uint)p[1] << 8) | ((uint)p[2] << 16) | ((uint)p[3] << 24);
}

#define BITS8 ((uint8)(0, 1, 2, 3, 4, 5, 6, 7))

// the 5-bit codes of a Q5 block: element j is nibble j | bit j of qh << 4 (elements in nibbles() order)
inline void q5_codes(global const uchar *qs, uint qh, float8 *w) {
    nibbles(vload16(0, qs), w);
    for (int i = 0; i < 4; ++i) w[i] += convert_float8((((uint8)(qh) >> (BITS8 + (uint)(8 * i))) & 1u) << 4);
}

inline void dequant_chunk_q5_0(global const uchar *row, int c, float8 *w) {
    global const block_q5_0 *b = (global const block_q5_0 *)row + c;
    const float d = SCALE(HALF(&b->d), c);
    q5_codes(b->qs, load_u32(b->qh), w);
    for (int i = 0; i < 4; ++i) w[i] = d * (w[i] - 16.0f);
}

// ---------------------------------------------------------------------------------------------------
// Q5_1: w = d * q + m, q 5-bit; 6 bits per weight
#define QK5_1 32
#define QK_q5_1 QK5_1
#define TS_q5_1 24
typedef struct {
    ushort d;             // delta (half)
    ushort m;             // min (half)
    uchar qh[4];          // 5-th bit of quants
    uchar qs[QK5_1 / 2];  // nibbles / quants
} block_q5_1;

inline void dequant_chunk_q5_1(global const uchar *row, int c, float8 *w) {
    global const block_q5_1 *b = (global const block_q5_1 *)row + c;
    const float d = SCALE(HALF(&b->d), c);
    const float m = HALF(&b->m);
    q5_codes(b->qs, load_u32(b->qh), w);
    for (int i = 0; i < 4; ++i) w[i] = d * w[i] + m;
}

// ---------------------------------------------------------------------------------------------------
// Q8_0: w = d * q; 8.5 bits per weight
#define QK8_0 32
#define QK_q8_0 QK8_0
#define TS_q8_0 34
typedef struct {
    ushort d;           // delta (half)
    char qs[QK8_0];     // quants
} block_q8_0;

inline void dequant_chunk_q8_0(global const uchar *row, int c, float8 *w) {
    global const block_q8_0 *b = (global const block_q8_0 *)row + c;
    const float d = SCALE(HALF(&b->d), c);
    for (int i = 0; i < 4; ++i) w[i] = d * convert_float8(vload8(i, b->qs));
}

// ---------------------------------------------------------------------------------------------------
// Q4_K: 8 blocks of 32 elements each; weight is represented as x = a * q + b;
// Effectively 4.5 bits per weight
#define QK_K 256
#define K_SCALE_SIZE 12
#define QK_q4_K QK_K
#define TS_q4_K 144
typedef struct {
    ushort d;                    // super-block scale for quantized scales (half)
    ushort dmin;                 // super-block scale for quantized mins (half)
    uchar scales[K_SCALE_SIZE];  // scales and mins, quantized with 6 bits
    uchar qs[QK_K / 2];          // 4--bit quants
} block_q4_K;

// ggml get_scale_min_k4: 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes.
inline void get_scale_min_k4(int j, global const uchar *q, uchar *sc, uchar *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

// chunk c = sub-block j = c % 8 of super-block c / 8: 64-value group j/2 uses qs[32*(j/2) ..+32],
// low nibbles for even j, high nibbles for odd j.
inline void dequant_chunk_q4_K(global const uchar *row, int c, float8 *w) {
    global const block_q4_K *b = (global const block_q4_K *)row + (c >> 3);
    const int j = c & 7;
    uchar sc, mn;
    get_scale_min_k4(j, b->scales, &sc, &mn);
    const float d1 = SCALE(HALF(&b->d), c) * (float)sc;
    const float m1 = HALF(&b->dmin) * (float)mn;
    global const uchar *q = b->qs + 32 * (j >> 1);
    const uchar shift = 4 * (j & 1);
    for (int i = 0; i < 4; ++i) w[i] = d1 * convert_float8((vload8(i, q) >> shift) & (uchar)0x0F) - m1;
}

// ---------------------------------------------------------------------------------------------------
// Q6_K: 16 blocks of 16 elements each; weight is represented as x = a * q;
// Effectively 6.5625 bits per weight
#define QK_q6_K QK_K
#define TS_q6_K 210
typedef struct {
    uchar ql[QK_K / 2];       // quants, lower 4 bits
    uchar qh[QK_K / 4];       // quants, upper 2 bits
    char scales[QK_K / 16];   // scales, quantized with 8 bits
    ushort d;                 // super-block scale (half)
} block_q6_K;

// chunk c = 32 values 32k .. 32k+31 (k = c % 4) of 128-value half h = (c % 8) / 4 of super-block c / 8;
// as dequantize_row_q6_K: q_k = (ql[64h + 32(k&1) + l] >> 4(k>>1)) & 15 | ((qh[32h + l] >> 2k) & 3) << 4,
// scale scales[8h + 2k + l/16], w = d * scale * (q - 32).
inline void dequant_chunk_q6_K(global const uchar *row, int c, float8 *w) {
    global const block_q6_K *b = (global const block_q6_K *)row + (c >> 3);
    const int h = (c >> 2) & 1;
    const int k = c & 3;
    const float d = SCALE(HALF(&b->d), c);
    global const uchar *ql = b->ql + 64 * h + 32 * (k & 1);
    global const uchar *qh = b->qh + 32 * h;
    global const char *sc = b->scales + 8 * h + 2 * k;
    const uchar ls = 4 * (k >> 1);
    const uchar hs = 2 * k;
    for (int i = 0; i < 4; ++i) {
        const uchar8 q = ((vload8(i, ql) >> ls) & (uchar)0x0F) | (((vload8(i, qh) >> hs) & (uchar)3) << (uchar)4);
        w[i] = d * (float)sc[i >> 1] * (convert_float8(q) - 32.0f);
    }
}

// ---------------------------------------------------------------------------------------------------
// Q2_K: 16 blocks of 16 elements each; weight is represented as x = a * q + b;
// Effectively 2.625 bits per weight
#define QK_q2_K QK_K
#define TS_q2_K 84
typedef struct {
    uchar scales[QK_K / 16];  // scales and mins, quantized with 4 bits
    uchar qs[QK_K / 4];       // quants
    ushort d;                 // super-block scale for quantized scales (half)
    ushort dmin;              // super-block scale for quantized mins (half)
} block_q2_K;

// chunk c = values 32j .. 32j+31 (j = c % 4) of 128-value half h = (c % 8) / 4 of super-block c / 8; as
// dequantize_row_q2_K: q = (qs[32h + l] >> 2j) & 3, sub-block 8h + 2j + l/16 with scale byte sc:
// w = d * (sc & 15) * q - dmin * (sc >> 4).
inline void dequant_chunk_q2_K(global const uchar *row, int c, float8 *w) {
    global const block_q2_K *b = (global const block_q2_K *)row + (c >> 3);
    const int h = (c >> 2) & 1;
    const int j = c & 3;
    const float d = SCALE(HALF(&b->d), c);
    const float dmin = HALF(&b->dmin);
    global const uchar *q = b->qs + 32 * h;
    const uchar shift = 2 * j;
    for (int i = 0; i < 4; ++i) {
        const uchar sc = b->scales[8 * h + 2 * j + (i >> 1)];
        const float dl = d * (float)(sc & 0xF);
        const float ml = dmin * (float)(sc >> 4);
        w[i] = dl * convert_float8((vload8(i, q) >> shift) & (uchar)3) - ml;
    }
}

// ---------------------------------------------------------------------------------------------------
// Q3_K: 16 blocks of 16 elements each; weight is represented as x = a * q;
// Effectively 3.4375 bits per weight
#define QK_q3_K QK_K
#define TS_q3_K 110
typedef struct {
    uchar hmask[QK_K / 8];  // quants - high bit
    uchar qs[QK_K / 4];     // quants - low 2 bits
    uchar scales[12];       // scales, quantized with 6 bits
    ushort d;               // super-block scale (half)
} block_q3_K;

// chunk c as Q2_K's; as dequantize_row_q3_K: q = ((qs[32h + l] >> 2j) & 3) - 4 unless bit 4h + j of hmask[l]
// is set; 6-bit scale of sub-block s: (scales[s % 8] >> 4(s / 8)) & 15 | ((scales[8 + s % 4] >> 2(s / 4)) & 3)
// << 4; w = d * (scale - 32) * q.
inline void dequant_chunk_q3_K(global const uchar *row, int c, float8 *w) {
    global const block_q3_K *b = (global const block_q3_K *)row + (c >> 3);
    const int h = (c >> 2) & 1;
    const int j = c & 3;
    const float d = SCALE(HALF(&b->d), c);
    global const uchar *q = b->qs + 32 * h;
    const uchar shift = 2 * j;
    const uchar hbit = 4 * h + j;
    for (int i = 0; i < 4; ++i) {
        const int s = 8 * h + 2 * j + (i >> 1);
        const int sc = ((b->scales[s & 7] >> (4 * (s >> 3))) & 0xF)
                       | (((b->scales[8 + (s & 3)] >> (2 * (s >> 2))) & 3) << 4);
        const float dl = d * (float)(sc - 32);
        const float8 lo = convert_float8((vload8(i, q) >> shift) & (uchar)3);
        const float8 hi = convert_float8((vload8(i, b->hmask) >> hbit) & (uchar)1);
        w[i] = dl * (lo + (4.0f * hi - 4.0f));
    }
}

// ---------------------------------------------------------------------------------------------------
// Q5_K: 8 blocks of 32 elements each; weight is represented as x = a * q + b;
// Effectively 5.5 bits per weight
#define QK_q5_K QK_K
#define TS_q5_K 176
typedef struct {
    ushort d;                    // super-block scale for quantized scales (half)
    ushort dmin;                 // super-block scale for quantized mins (half)
    uchar scales[K_SCALE_SIZE];  // scales and mins, quantized with 6 bits
    uchar qh[QK_K / 8];          // quants, high bit
    uchar qs[QK_K / 2];          // quants, low 4 bits
} block_q5_K;

// chunk c = sub-block j = c % 8 of super-block c / 8; as dequantize_row_q5_K: q = (qs[32(j/2) + l] >> 4(j%2)) & 15
// | ((qh[l] >> j) & 1) << 4, w = d * sc * q - dmin * m (get_scale_min_k4).
inline void dequant_chunk_q5_K(global const uchar *row, int c, float8 *w) {
    global const block_q5_K *b = (global const block_q5_K *)row + (c >> 3);
    const int j = c & 7;
    uchar sc, mn;
    get_scale_min_k4(j, b->scales, &sc, &mn);
    const float d1 = SCALE(HALF(&b->d), c) * (float)sc;
    const float m1 = HALF(&b->dmin) * (float)mn;
    global const uchar *q = b->qs + 32 * (j >> 1);
    const uchar shift = 4 * (j & 1);
    for (int i = 0; i < 4; ++i) {
        const uchar8 v = ((vload8(i, q) >> shift) & (uchar)0x0F)
                         | (((vload8(i, b->qh) >> (uchar)j) & (uchar)1) << (uchar)4);
        w[i] = d1 * convert_float8(v) - m1;
    }
}

// ---------------------------------------------------------------------------------------------------
// IQ4_NL: w = d * kvalues_iq4nl[q], q 4-bit (non-linear table); 4.5 bits per weight
#define QK4_NL 32
#define QK_iq4_nl QK4_NL
#define TS_iq4_nl 18
typedef struct {
    ushort d;              // delta (half)
    uchar qs[QK4_NL / 2];  // nibbles / quants: element j low nibble of qs[j], element j+16 high nibble
} block_iq4_nl;

// ggml-common.h kvalues_iq4nl, as floats (exact)
constant float kvalues_iq4nl[16] = {-127.f, -104.f, -83.f, -65.f, -49.f, -35.f, -22.f, -10.f,
                                    1.f, 13.f, 25.f, 38.f, 53.f, 69.f, 89.f, 113.f};

inline float8 iq4_values(uchar8 q) {
    return (float8)(kvalues_iq4nl[q.s0], kvalues_iq4nl[q.s1], kvalues_iq4nl[q.s2], kvalues_iq4nl[q.s3],
                    kvalues_iq4nl[q.s4], kvalues_iq4nl[q.s5], kvalues_iq4nl[q.s6], kvalues_iq4nl[q.s7]);
}

// 16 bytes of nibbles -> the 32 table values (nibbles() order), times d
inline void iq4_chunk(global const uchar *qs, float d, float8 *w) {
    const uchar16 q = vload16(0, qs);
    const uchar16 lo = q & (uchar)0x0F;
    const uchar16 hi = q >> (uchar)4;
    w[0] = d * iq4_values(lo.lo);
    w[1] = d * iq4_values(lo.hi);
    w[2] = d * iq4_values(hi.lo);
    w[3] = d * iq4_values(hi.hi);
}

inline void dequant_chunk_iq4_nl(global const uchar *row, int c, float8 *w) {
    global const block_iq4_nl *b = (global const block_iq4_nl *)row + c;
    iq4_chunk(b->qs, SCALE(HALF(&b->d), c), w);
}

// ---------------------------------------------------------------------------------------------------
// IQ4_XS: 8 blocks of 32 elements each, 6-bit block scales, values through kvalues_iq4nl;
// 4.25 bits per weight
#define QK_iq4_xs QK_K
#define TS_iq4_xs 136
typedef struct {
    ushort d;                   // super-block scale (half)
    ushort scales_h;            // high 2 bits of the 8 block scales
    uchar scales_l[QK_K / 64];  // low 4 bits of the block scales
    uchar qs[QK_K / 2];         // nibbles: block j uses qs[16j .. 16j + 16] as IQ4_NL
} block_iq4_xs;

// chunk c = block j = c % 8 of super-block c / 8; as dequantize_row_iq4_xs:
// ls = (scales_l[j/2] >> 4(j%2)) & 15 | ((scales_h >> 2j) & 3) << 4, w = d * (ls - 32) * kvalues_iq4nl[q].
inline void dequant_chunk_iq4_xs(global const uchar *row, int c, float8 *w) {
    global const block_iq4_xs *b = (global const block_iq4_xs *)row + (c >> 3);
    const int j = c & 7;
    const int ls = ((b->scales_l[j >> 1] >> (4 * (j & 1))) & 0xF) | (((b->scales_h >> (2 * j)) & 3) << 4);
    iq4_chunk(b->qs + 16 * j, SCALE(HALF(&b->d), c) * (float)(ls - 32), w);
}

// ---------------------------------------------------------------------------------------------------
#define DEQUANT_CHUNK CAT(dequant_chunk_, WTYPE)
// bytes of one row of ncols values (ncols a multiple of the block size)
#define ROW_BYTES(ncols) ((size_t)((ncols) / CAT(QK_, WTYPE)) * CAT(TS_, WTYPE))
