/* CPU kernels on packed ggml blocks: dequantize rows, and matrix-vector products that read the packed bytes.
 *
 * Block layouts and the dequantization formulas follow llama.cpp `ggml/src/ggml-common.h` (block_q4_0 ...
 * block_q6_K) and `ggml-quants.c` (dequantize_row_*); each decoder does its float arithmetic in the same order
 * as llamaherd/checkpoint/ggml_quants.py so that `lh_dequant` agrees with it bit for bit.
 * `lh_gemv` computes Y (M, N) = X (M, K) . W (N, K)^T for a few rows of X: memory-bound decode reads each
 * weight block once, decodes it into registers/L1 and uses it for all M rows; `lh_gemv_many` applies several
 * weights to one X inside a single OpenMP region (one fork/join). Built by llamaherd/native/__init__.py with
 * the host's -march and OpenMP (the libgomp torch already loaded), called through ctypes.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "ggml.h"
#ifdef __F16C__
#include <immintrin.h>
#endif

enum { T_Q4_0 = 2, T_Q5_0 = 6, T_Q8_0 = 8, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14 };

/* ---- one block -> floats, in the reference's order of operations ------------------------------------------ */

static inline void deq_q4_0(const uint8_t *b, float *y) {
    const float d = lh_h2f(b);
    const uint8_t *qs = b + 2;
    for (int j = 0; j < 16; j++) {
        y[j] = d * (float)((int)(qs[j] & 0x0F) - 8);
        y[j + 16] = d * (float)((int)(qs[j] >> 4) - 8);
    }
}

static inline void deq_q5_0(const uint8_t *b, float *y) {
    const float d = lh_h2f(b);
    uint32_t qh;
    memcpy(&qh, b + 2, 4);
    const uint8_t *qs = b + 6;
    for (int j = 0; j < 16; j++) {
        const int x0 = (int)((qs[j] & 0x0F) | (((qh >> j) & 1) << 4)) - 16;
        const int x1 = (int)((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16;
        y[j] = d * (float)x0;
        y[j + 16] = d * (float)x1;
    }
}

static inline void deq_q8_0(const uint8_t *b, float *y) {
    const float d = lh_h2f(b);
    const int8_t *qs = (const int8_t *)(b + 2);
    for (int j = 0; j < 32; j++) y[j] = (float)qs[j] * d;
}

/* ggml `get_scale_min_k4`: 8 six-bit scales and mins packed in 12 bytes. */
static inline void scale_min_k4(int j, const uint8_t *q, int *sc, int *m) {
    if (j < 4) { *sc = q[j] & 63; *m = q[j + 4] & 63; }
    else { *sc = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4); *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4); }
}

static inline void deq_q4_k(const uint8_t *b, float *y) {
    const float d = lh_h2f(b), dmin = lh_h2f(b + 2);
    const uint8_t *scales = b + 4, *q = b + 16;
    for (int j = 0; j < 4; j++) {  /* 4 chunks of 64: low nibbles then high nibbles of 32 bytes */
        int sc, m;
        scale_min_k4(2 * j, scales, &sc, &m);
        const float d1 = d * (float)sc, m1 = dmin * (float)m;
        scale_min_k4(2 * j + 1, scales, &sc, &m);
        const float d2 = d * (float)sc, m2 = dmin * (float)m;
        for (int l = 0; l < 32; l++) y[64 * j + l] = d1 * (float)(q[32 * j + l] & 0x0F) - m1;
        for (int l = 0; l < 32; l++) y[64 * j + 32 + l] = d2 * (float)(q[32 * j + l] >> 4) - m2;
    }
}

static inline void deq_q5_k(const uint8_t *b, float *y) {
    const float d = lh_h2f(b), dmin = lh_h2f(b + 2);
    const uint8_t *scales = b + 4, *qh = b + 16, *ql = b + 48;
    for (int j = 0; j < 4; j++) {
        int sc, m;
        scale_min_k4(2 * j, scales, &sc, &m);
        const float d1 = d * (float)sc, m1 = dmin * (float)m;
        scale_min_k4(2 * j + 1, scales, &sc, &m);
        const float d2 = d * (float)sc, m2 = dmin * (float)m;
        for (int l = 0; l < 32; l++) {
            const int lo = ql[32 * j + l] & 0x0F, hi = (qh[l] >> (2 * j)) & 1;
            y[64 * j + l] = d1 * (float)(lo | (hi << 4)) - m1;
        }
        for (int l = 0; l < 32; l++) {
            const int lo = ql[32 * j + l] >> 4, hi = (qh[l] >> (2 * j + 1)) & 1;
            y[64 * j + 32 + l] = d2 * (float)(lo | (hi << 4)) - m2;
        }
    }
}

static inline void deq_q6_k(const uint8_t *b, float *y) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    const float d = lh_h2f(b + 208);
    for (int n = 0; n < 2; n++) {  /* two halves of 128 elements, each 2 x 16-element runs per scale */
        for (int h = 0; h < 2; h++) {  /* h: which 16 of the 32 bytes, i.e. which scale of each pair */
            const float s1 = d * (float)sc[h], s2 = d * (float)sc[h + 2];
            const float s3 = d * (float)sc[h + 4], s4 = d * (float)sc[h + 6];
            for (int i = 0; i < 16; i++) {
                const int l = 16 * h + i;
                const int q1 = (int)((ql[l] & 0x0F) | (((qh[l] >> 0) & 3) << 4)) - 32;
                const int q2 = (int)((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = (int)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = (int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l] = s1 * (float)q1;
                y[l + 32] = s2 * (float)q2;
                y[l + 64] = s3 * (float)q3;
                y[l + 96] = s4 * (float)q4;
            }
        }
        y += 128; ql += 64; qh += 32; sc += 8;
    }
}

typedef void (*deq_fn)(const uint8_t *, float *);

static int layout(int type, deq_fn *fn, int *qk, int *tsize) {
    switch (type) {
    case T_Q4_0: *fn = deq_q4_0; *qk = 32; *tsize = 18; return 0;
    case T_Q5_0: *fn = deq_q5_0; *qk = 32; *tsize = 22; return 0;
    case T_Q8_0: *fn = deq_q8_0; *qk = 32; *tsize = 34; return 0;
    case T_Q4_K: *fn = deq_q4_k; *qk = 256; *tsize = 144; return 0;
    case T_Q5_K: *fn = deq_q5_k; *qk = 256; *tsize = 176; return 0;
    case T_Q6_K: *fn = deq_q6_k; *qk = 256; *tsize = 210; return 0;
    default: return -1;
    }
}

/* ---- exported ------------------------------------------------------------------------------------------- */

int lh_supported(int type) { deq_fn f; int qk, ts; return layout(type, &f, &qk, &ts) == 0; }

/* W: N rows of row_bytes packed bytes (row stride `stride` bytes); out: (N, K) float32. */
int lh_dequant(int type, const uint8_t *W, int64_t N, int64_t stride, int64_t K, float *out, int nthreads) {
    deq_fn fn; int qk, ts;
    if (layout(type, &fn, &qk, &ts)) return -1;
    const int64_t nb = K / qk;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++)
        for (int64_t b = 0; b < nb; b++) fn(W + n * stride + b * ts, out + n * K + b * qk);
    return 0;
}

/* As lh_dequant, but the decoded values rounded to bfloat16: the weight operand of a bf16 GEMM (prefill on
 * CPUs with AVX-512 BF16, where oneDNN's bf16 GEMM is ~5x its fp32 one; quant/cpu_kernels.py `linear`).
 * Every ggml value with <= 8 significant bits (Q4_0..Q8_0 codes times an f16 scale) may still round here. */
int lh_dequant_bf16(int type, const uint8_t *W, int64_t N, int64_t stride, int64_t K, uint16_t *out, int nthreads) {
    deq_fn fn; int qk, ts;
    if (layout(type, &fn, &qk, &ts)) return -1;
    const int64_t nb = K / qk;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        /* A whole row decoded first, then converted in one pass: converting each block straight after its
         * scalar stores reloads them too early (store-forwarding stalls; measured 2x slower for Q8_0). */
        float *row = malloc((size_t)K * sizeof(float));
        if (row == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            if (row == NULL) continue;
            for (int64_t b = 0; b < nb; b++) fn(W + n * stride + b * ts, row + b * qk);
            uint16_t *o = out + n * K;
            int64_t j = 0;
#ifdef __AVX512BF16__
            /* vcvtneps2bf16 rounds to nearest even like lh_f2bf; it flushes float denormals, which no ggml value
             * is (the smallest is an f16 subnormal scale, ~6e-8, times a small integer). */
            for (; j + 16 <= K; j += 16)
                _mm256_storeu_si256((__m256i *)(o + j), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(row + j)));
#endif
            for (; j < K; j++) o[j] = lh_f2bf(row[j]);
        }
        free(row);
    }
    return failed ? -2 : 0;
}

/* Q8_0 rows against one x: fused, the block scale applied to each block's partial sum. */
static void gemv1_q8_0(const uint8_t *W, int64_t N, int64_t stride, int64_t K, const float *x, float *y) {
    const int64_t nb = K / 32;
#pragma omp for schedule(static) nowait
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = W + n * stride;
        float acc = 0.0f;
        int64_t b = 0;
#ifdef __AVX512F__
        /* 16 lanes; the block scale multiplies the block's 16-lane partial products, one reduction per row. */
        __m512 vacc = _mm512_setzero_ps();
        for (; b < nb; b++) {
            const uint8_t *blk = row + b * 34;
            const __m128i *qs = (const __m128i *)(blk + 2);
            const float *xb = x + b * 32;
            const __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(qs)));
            const __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(qs + 1)));
            const __m512 p = _mm512_fmadd_ps(q1, _mm512_loadu_ps(xb + 16), _mm512_mul_ps(q0, _mm512_loadu_ps(xb)));
            vacc = _mm512_fmadd_ps(_mm512_set1_ps(lh_h2f(blk)), p, vacc);
        }
        acc = _mm512_reduce_add_ps(vacc);
#endif
        for (; b < nb; b++) {
            const uint8_t *blk = row + b * 34;
            const int8_t *qs = (const int8_t *)(blk + 2);
            const float *xb = x + b * 32;
            float s = 0.0f;
            for (int j = 0; j < 32; j++) s += (float)qs[j] * xb[j];
            acc += lh_h2f(blk) * s;
        }
        y[n] = acc;
    }
}

#ifdef __AVX512F__
/* Q4_0 / Q5_0 rows against one x, 16 lanes: element j is the low nibble of byte j, element j+16 the high one;
 * Q5_0's fifth bits come from its little-endian u32 (bit j -> element j). One reduction per row. */
static void gemv1_q4_q5(int five, const uint8_t *W, int64_t N, int64_t stride, int64_t K, const float *x, float *y) {
    const int64_t nb = K / 32;
    const int ts = five ? 22 : 18, off = five ? 6 : 2;
    const __m512i lo_idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i hi_idx = _mm512_add_epi32(lo_idx, _mm512_set1_epi32(16));
    const __m512i nib = _mm512_set1_epi32(0x0F), one = _mm512_set1_epi32(1);
    const __m512i centre = _mm512_set1_epi32(five ? 16 : 8);
#pragma omp for schedule(static) nowait
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = W + n * stride;
        __m512 vacc = _mm512_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = row + b * ts;
            const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(blk + off)));
            __m512i q0 = _mm512_and_si512(v, nib), q1 = _mm512_srli_epi32(v, 4);
            if (five) {
                uint32_t qh;
                memcpy(&qh, blk + 2, 4);
                const __m512i h = _mm512_set1_epi32((int)qh);
                q0 = _mm512_or_si512(q0, _mm512_slli_epi32(_mm512_and_si512(_mm512_srlv_epi32(h, lo_idx), one), 4));
                q1 = _mm512_or_si512(q1, _mm512_slli_epi32(_mm512_and_si512(_mm512_srlv_epi32(h, hi_idx), one), 4));
            }
            const __m512 f0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(q0, centre));
            const __m512 f1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(q1, centre));
            const float *xb = x + b * 32;
            const __m512 p = _mm512_fmadd_ps(f1, _mm512_loadu_ps(xb + 16), _mm512_mul_ps(f0, _mm512_loadu_ps(xb)));
            vacc = _mm512_fmadd_ps(_mm512_set1_ps(lh_h2f(blk)), p, vacc);
        }
        y[n] = _mm512_reduce_add_ps(vacc);
    }
}
#endif

#ifdef __AVX512F__
/* Q6_K rows against one x: per half of 128 and per 16-run, four 16-lane groups of 6-bit values (low nibble from
 * ql, two high bits from qh), each with its own int8 sub-block scale; one reduction per row. */
static void gemv1_q6_k(const uint8_t *W, int64_t N, int64_t stride, int64_t K, const float *x, float *y) {
    const int64_t nb = K / 256;
    const __m512i nib = _mm512_set1_epi32(0x0F), two = _mm512_set1_epi32(3), centre = _mm512_set1_epi32(32);
#pragma omp for schedule(static) nowait
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = W + n * stride;
        __m512 vacc = _mm512_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = row + b * 210;
            const float d = lh_h2f(blk + 208);
            for (int half = 0; half < 2; half++) {
                const uint8_t *ql = blk + 64 * half, *qh = blk + 128 + 32 * half;
                const int8_t *sc = (const int8_t *)(blk + 192) + 8 * half;
                const float *xh = x + b * 256 + 128 * half;
                for (int h = 0; h < 2; h++) {
                    const __m512i a = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(ql + 16 * h)));
                    const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(ql + 32 + 16 * h)));
                    const __m512i hb = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qh + 16 * h)));
                    const __m512i q1 = _mm512_or_si512(_mm512_and_si512(a, nib), _mm512_slli_epi32(_mm512_and_si512(hb, two), 4));
                    const __m512i q2 = _mm512_or_si512(_mm512_and_si512(c, nib),
                                                       _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(hb, 2), two), 4));
                    const __m512i q3 = _mm512_or_si512(_mm512_srli_epi32(a, 4),
                                                       _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(hb, 4), two), 4));
                    const __m512i q4 = _mm512_or_si512(_mm512_srli_epi32(c, 4),
                                                       _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(hb, 6), two), 4));
                    const float *xb = xh + 16 * h;
#define Q6_ACC(Q, OFF, S)                                                                                          \
    vacc = _mm512_fmadd_ps(_mm512_set1_ps(d * (float)sc[S]),                                                       \
                           _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(Q, centre)), _mm512_loadu_ps(xb + OFF)), vacc)
                    Q6_ACC(q1, 0, h);
                    Q6_ACC(q2, 32, h + 2);
                    Q6_ACC(q3, 64, h + 4);
                    Q6_ACC(q4, 96, h + 6);
#undef Q6_ACC
                }
            }
        }
        y[n] = _mm512_reduce_add_ps(vacc);
    }
}
#endif

/* Y (M, N) = X (M, K) . W^T; each block decoded once into L1 and used for every row of X (M <= 64).
 * One copy per type (a macro) so the decoder inlines and the dot loops vectorise with the block size known. */
#define GEMV_IMPL(NAME, DEQ, QK, TS)                                                                          \
    static void NAME(const uint8_t *W, int64_t N, int64_t stride, int64_t K, const float *X, int64_t M,      \
                     float *Y) {                                                                              \
        const int64_t nb = K / QK;                                                                            \
        _Pragma("omp for schedule(static) nowait")                                   \
        for (int64_t n = 0; n < N; n++) {                                                                     \
            float buf[QK] __attribute__((aligned(64)));                                                       \
            float acc[64];                                                                                    \
            if (M == 1) { /* lane-wise accumulators: no horizontal sum per block */                           \
                float av[QK] __attribute__((aligned(64)));                                                    \
                for (int j = 0; j < QK; j++) av[j] = 0.0f;                                                    \
                const uint8_t *r1 = W + n * stride;                                                           \
                for (int64_t b = 0; b < nb; b++) {                                                            \
                    DEQ(r1 + b * TS, buf);                                                                    \
                    const float *xb = X + b * QK;                                                             \
                    for (int j = 0; j < QK; j++) av[j] += buf[j] * xb[j];                                     \
                }                                                                                             \
                float s1 = 0.0f;                                                                              \
                for (int j = 0; j < QK; j++) s1 += av[j];                                                     \
                Y[n] = s1;                                                                                    \
                continue;                                                                                     \
            }                                                                                                 \
            for (int64_t m = 0; m < M; m++) acc[m] = 0.0f;                                                    \
            const uint8_t *row = W + n * stride;                                                              \
            for (int64_t b = 0; b < nb; b++) {                                                                \
                DEQ(row + b * TS, buf);                                                                       \
                for (int64_t m = 0; m < M; m++) {                                                             \
                    const float *xb = X + m * K + b * QK;                                                     \
                    float s = 0.0f;                                                                           \
                    for (int j = 0; j < QK; j++) s += buf[j] * xb[j];                                         \
                    acc[m] += s;                                                                              \
                }                                                                                             \
            }                                                                                                 \
            for (int64_t m = 0; m < M; m++) Y[m * N + n] = acc[m];                                            \
        }                                                                                                     \
    }

GEMV_IMPL(gemv_q4_0, deq_q4_0, 32, 18)
GEMV_IMPL(gemv_q5_0, deq_q5_0, 32, 22)
GEMV_IMPL(gemv_q8_0, deq_q8_0, 32, 34)
GEMV_IMPL(gemv_q4_k, deq_q4_k, 256, 144)
GEMV_IMPL(gemv_q5_k, deq_q5_k, 256, 176)
GEMV_IMPL(gemv_q6_k, deq_q6_k, 256, 210)

/* One product, called inside the caller's parallel region (each kernel's rows are an orphaned `omp for`). */
void lh_gemv_in_region(int type, const uint8_t *W, int64_t N, int64_t stride, int64_t K, const float *X,
                           int64_t M, float *Y) {
    switch (type) {
#ifdef __AVX512F__
    case T_Q4_0: if (M == 1) gemv1_q4_q5(0, W, N, stride, K, X, Y); else gemv_q4_0(W, N, stride, K, X, M, Y); return;
    case T_Q5_0: if (M == 1) gemv1_q4_q5(1, W, N, stride, K, X, Y); else gemv_q5_0(W, N, stride, K, X, M, Y); return;
    case T_Q6_K: if (M == 1) gemv1_q6_k(W, N, stride, K, X, Y); else gemv_q6_k(W, N, stride, K, X, M, Y); return;
#else
    case T_Q4_0: gemv_q4_0(W, N, stride, K, X, M, Y); return;
    case T_Q5_0: gemv_q5_0(W, N, stride, K, X, M, Y); return;
    case T_Q6_K: gemv_q6_k(W, N, stride, K, X, M, Y); return;
#endif
    case T_Q8_0: if (M == 1) gemv1_q8_0(W, N, stride, K, X, Y); else gemv_q8_0(W, N, stride, K, X, M, Y); return;
    case T_Q4_K: gemv_q4_k(W, N, stride, K, X, M, Y); return;
    case T_Q5_K: gemv_q5_k(W, N, stride, K, X, M, Y); return;
    }
}

int lh_gemv(int type, const uint8_t *W, int64_t N, int64_t stride, int64_t K, const float *X, int64_t M,
            float *Y, int nthreads) {
    if (M > 64 || M < 1 || !lh_supported(type)) return -1;
#pragma omp parallel num_threads(nthreads)
    lh_gemv_in_region(type, W, N, stride, K, X, M, Y);
    return 0;
}

/* Several weights applied to the same X (M, K) in ONE parallel region: Y_s (M, N[s]) = X . W[s]^T, where Y_s
 * follow each other in Y (Y_0 at Y, Y_1 at Y + M * N[0], ...). The rows of
 * each weight are split across the threads with `nowait`, so a thread moves straight on to the next weight:
 * one fork/join for, say, wq/wk/wv instead of three (bench/PROFILE.md). Types may differ between weights. */
int lh_gemv_many(int nseg, const int *types, const uint8_t *const *W, const int64_t *N, const int64_t *stride,
                 int64_t K, const float *X, int64_t M, float *Y, int nthreads) {
    if (M > 64 || M < 1 || nseg < 1) return -1;
    for (int s = 0; s < nseg; s++)
        if (!lh_supported(types[s])) return -1;
#pragma omp parallel num_threads(nthreads)
    {
        float *ys = Y;
        for (int s = 0; s < nseg; s++) {
            lh_gemv_in_region(types[s], W[s], N[s], stride[s], K, X, M, ys);
            ys += M * N[s];
        }
    }
    return 0;
}
