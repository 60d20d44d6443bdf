/* Weight-only int8 / int4 products for decode: Y (M, N) = X (M, K) . W (N, K)^T with W held as integer codes.
 *
 * Why: torch's `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` are compute-bound at one activation row
 * (about half our bf16 decode speed, BENCHMARKS.md issue 18), although they read a half / a quarter of the
 * bytes. Here each thread walks its own share of weight rows, RB rows at a time, and widens the codes to
 * float32 in registers; the activations stay float32 (bf16 inputs are widened exactly), so no activation is
 * quantized and the products are those of the dequantised weights: the same numbers on every device.
 *
 * The layouts are the portable ones of llamaherd/quant/weight_only.py, read in place (no kernel copy):
 *   int8: codes int8 (N, K), one bf16 scale per row:      w[n, k] = q[n, k] * s[n]
 *         (the scale multiplies the float32 dot product of the row, as torch's int8 kernel does)
 *   int4: codes uint8 (N, K/2), byte j = q[2j] << 4 | q[2j+1], bf16 scales and zeros (K/G, N):
 *         w[n, k] = (q[n, k] - 8) * s[k/G, n] + z[k/G, n]
 *         (gpt-fast `quantize.py` / torch `_weight_int4pack_mm`). Per group and row, a 16-entry float table
 *         T[i] = (i - 8) * s + z is built with one FMA and `vpermps` (`_mm512_permutexvar_ps`, which reads only
 *         the low 4 bits of each index) maps codes to weights: the weights are exactly the float32 values the
 *         reference dequantises to ((q - 8) * s is exact in float32), only the float32 sum order differs.
 *   For int4 the activation rows are first copied, per 32-element chunk, as its 16 even then its 16 odd
 *   elements (the high and low nibbles of 16 bytes), so one 16-byte load feeds two FMAs without a shuffle.
 *
 *   grouped 8-bit (GPTQ 8-bit, repacked at load by quant/hf_quantized.py): codes uint8 (N, K), float32 scales
 *         and zeros (K/G, N): w = q * s + z (exact in float32 for the formats' float16 scales).
 *
 *   int4 and int8 on int8 activations (llama.cpp's Q8_0 blocks, `vpdpbusd` on the codes as stored) are
 *   weight_only_a8.c's; lh_wo_act_init picks them when asked (LH_WO_ACT_I8) and K is a multiple of 128 (int4) or
 *   32 (int8).
 *
 * `lh_wo_int8` / `lh_wo_int4` / `lh_wo_grouped8` apply nw weights to one X in a single OpenMP region (one fork/join for
 * wq/wk/wv or w1/w3). Without AVX-512F the `#else` path does the same arithmetic in plain C. Built by
 * llamaherd/native/__init__.py, called through ctypes by llamaherd/native/weight_only.py. The pieces those calls
 * are made of (the activation rows prepared once, one weight's worksharing loop) are weight_only.h's, which
 * step.c calls inside its own parallel region: the one-call decode step multiplies the same numbers.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "weight_only.h"
#include "weight_only_a8.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#define LH_WO_AVX512 1
#else
#define LH_WO_AVX512 0
#endif

#define LH_WO_RB 4     /* weight rows per block */
#define LH_WO_MB 4     /* X rows per block */
#define LH_WO_SERIAL_WORK (1 << 16)
static int lh_wo_run(int scheme, int nw, const void *X, int x_f32, int64_t ldx, int64_t M, const void *const *W,
                     const void *const *S, const void *const *Z, int sz_f32, const int64_t *N, int64_t K, int64_t G,
                     void *const *Y, const int64_t *ldy, int y_bf16, int act, int nthreads);
#define LH_WO_AHEAD 1024 /* bytes of each weight row prefetched ahead of the loads: 4 row streams per thread */

/* Row i of X rounded to int16 on its own scale amax / 32767 (round to nearest), into out (K values; with split,
 * each 64-element chunk as its 32 even then its 32 odd elements). Returns the scale (NaN for a row with a NaN,
 * so that its outputs are NaN too). */
static float lh_wo_act16(const void *X, int x_f32, int64_t ldx, int64_t i, int64_t K, int split, int16_t *out) {
    float amax = 0.0f;
    for (int64_t k = 0; k < K; k++) {
        const float v = lh_wo_x(X, x_f32, i * ldx + k);
        if (v != v) { amax = v; break; }
        amax = v > amax ? v : (-v > amax ? -v : amax);
    }
    const float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
    for (int64_t k = 0; k < K; k++) {
        const int64_t to = split ? (k & ~(int64_t)63) + ((k & 1) << 5) + ((k & 63) >> 1) : k;
        out[to] = (int16_t)__builtin_lrintf(lh_wo_x(X, x_f32, i * ldx + k) * inv);
    }
    return amax / 32767.0f;
}

/* ---- int8 ------------------------------------------------------------------------------------------------ */

#if LH_WO_AVX512
static inline __attribute__((always_inline)) void lh_wo8_tile(const float *X, int64_t K, const int mb,
                                                              const int8_t *W, int64_t ldw, const int rb,
                                                              float *out) {
    __m512 acc[LH_WO_MB][LH_WO_RB];
    for (int i = 0; i < mb; i++)
        for (int r = 0; r < rb; r++) acc[i][r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 w[LH_WO_RB];
        if ((k & 63) == 0)
            for (int r = 0; r < rb; r++) _mm_prefetch((const char *)(W + r * ldw + k) + LH_WO_AHEAD, _MM_HINT_T0);
        for (int r = 0; r < rb; r++)
            w[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(W + r * ldw + k))));
        for (int i = 0; i < mb; i++) {
            const __m512 x = _mm512_loadu_ps(X + i * K + k);
            for (int r = 0; r < rb; r++) acc[i][r] = _mm512_fmadd_ps(x, w[r], acc[i][r]);
        }
    }
    if (k < K) { /* masked loads read only the K - k remaining elements and zero the rest */
        const __mmask16 m = (__mmask16)((1u << (K - k)) - 1);
        __m512 w[LH_WO_RB];
        for (int r = 0; r < rb; r++)
            w[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, W + r * ldw + k)));
        for (int i = 0; i < mb; i++) {
            const __m512 x = _mm512_maskz_loadu_ps(m, X + i * K + k);
            for (int r = 0; r < rb; r++) acc[i][r] = _mm512_fmadd_ps(x, w[r], acc[i][r]);
        }
    }
    for (int i = 0; i < mb; i++)
        for (int r = 0; r < rb; r++) out[i * rb + r] = _mm512_reduce_add_ps(acc[i][r]);
}
#else
static inline __attribute__((always_inline)) void lh_wo8_tile(const float *X, int64_t K, const int mb,
                                                              const int8_t *W, int64_t ldw, const int rb,
                                                              float *out) {
    for (int i = 0; i < mb; i++)
        for (int r = 0; r < rb; r++) {
            const float *x = X + i * K;
            const int8_t *w = W + r * ldw;
            float part[16] = {0}, s = 0.0f;
            int64_t k = 0;
            for (; k + 16 <= K; k += 16)
                for (int l = 0; l < 16; l++) part[l] += x[k + l] * (float)w[k + l];
            for (; k < K; k++) s += x[k] * (float)w[k];
            for (int l = 0; l < 16; l++) s += part[l];
            out[i * rb + r] = s;
        }
}
#endif

/* int16 activations (`act16`): each X row is rounded to int16 codes on its own scale amax / 32767 (an error of at
 * most amax * 2^-16 per element, below the bf16 rounding of any element larger than amax / 128), and
 * `vpdpwssd` (`_mm512_dpwssd_epi32`, AVX512_VNNI) sums 32 exact int16 x int8 products per instruction into
 * int32 lanes; lanes are moved to float32 every 8192 elements, before they can overflow (512 products of at
 * most 32767 * 128 each per lane). A third of the float32 path's instructions per weight. */
#if LH_WO_AVX512 && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define LH_WO_VNNI 1
static inline __attribute__((always_inline)) void lh_wo8w_tile(const int16_t *X, int64_t K, const int mb,
                                                               const int8_t *W, int64_t ldw, const int rb,
                                                               float *out) {
    __m512 f[LH_WO_MB][LH_WO_RB];
    for (int i = 0; i < mb; i++)
        for (int r = 0; r < rb; r++) f[i][r] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += 8192) {
        const int64_t k1 = K - k0 < 8192 ? K : k0 + 8192;
        __m512i acc[LH_WO_MB][LH_WO_RB];
        for (int i = 0; i < mb; i++)
            for (int r = 0; r < rb; r++) acc[i][r] = _mm512_setzero_si512();
        int64_t k = k0;
        for (; k + 32 <= k1; k += 32) {
            __m512i w[LH_WO_RB];
            if ((k & 63) == 0)
                for (int r = 0; r < rb; r++) _mm_prefetch((const char *)(W + r * ldw + k) + LH_WO_AHEAD, _MM_HINT_T0);
            for (int r = 0; r < rb; r++)
                w[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(W + r * ldw + k)));
            for (int i = 0; i < mb; i++) {
                const __m512i x = _mm512_loadu_si512((const void *)(X + i * K + k));
                for (int r = 0; r < rb; r++) acc[i][r] = _mm512_dpwssd_epi32(acc[i][r], x, w[r]);
            }
        }
        if (k < k1) {
            const __mmask32 m = (__mmask32)((1ull << (k1 - k)) - 1);
            __m512i w[LH_WO_RB];
            for (int r = 0; r < rb; r++) w[r] = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, W + r * ldw + k));
            for (int i = 0; i < mb; i++) {
                const __m512i x = _mm512_maskz_loadu_epi16(m, X + i * K + k);
                for (int r = 0; r < rb; r++) acc[i][r] = _mm512_dpwssd_epi32(acc[i][r], x, w[r]);
            }
        }
        for (int i = 0; i < mb; i++)
            for (int r = 0; r < rb; r++) f[i][r] = _mm512_add_ps(f[i][r], _mm512_cvtepi32_ps(acc[i][r]));
    }
    for (int i = 0; i < mb; i++)
        for (int r = 0; r < rb; r++) out[i * rb + r] = _mm512_reduce_add_ps(f[i][r]);
}
#else
#define LH_WO_VNNI 0
static inline __attribute__((always_inline)) void lh_wo8w_tile(const int16_t *X, int64_t K, const int mb,
                                                               const int8_t *W, int64_t ldw, const int rb,
                                                               float *out) {
    for (int i = 0; i < mb; i++)
        for (int r = 0; r < rb; r++) {
            int64_t sum = 0;
            for (int64_t k = 0; k < K; k++) sum += (int32_t)X[i * K + k] * W[r * ldw + k];
            out[i * rb + r] = (float)sum;
        }
}
#endif

/* rb (<= RB) weight rows from row n against all M rows of X, results scaled and stored. */
static void lh_wo8_rows(const void *X, const float *sx, int64_t M, int64_t K, const int8_t *W, const uint16_t *S,
                        int64_t n, int rb, void *Y, int64_t ldy, int y_bf16) {
    float s[LH_WO_MB * LH_WO_RB];
    const int8_t *w = W + n * K;
    for (int64_t m = 0; m < M; m += LH_WO_MB) {
        const int mb = M - m < LH_WO_MB ? (int)(M - m) : LH_WO_MB;
#define W16_TILE(MB, R, ROWS, OUT) lh_wo8w_tile((const int16_t *)X + m * K, K, MB, w + (R) * K, K, ROWS, OUT)
#define F32_TILE(MB, R, ROWS, OUT) lh_wo8_tile((const float *)X + m * K, K, MB, w + (R) * K, K, ROWS, OUT)
        if (sx != NULL) LH_WO_TILES(W16_TILE, mb, rb, LH_WO_RB, s); /* int16 activations */
        else LH_WO_TILES(F32_TILE, mb, rb, LH_WO_RB, s);
#undef W16_TILE
#undef F32_TILE
        for (int i = 0; i < mb; i++)
            for (int r = 0; r < rb; r++)
                lh_wo_store(Y, y_bf16, (m + i) * ldy + n + r,
                            s[i * rb + r] * lh_bf2f(S[n + r]) * (sx != NULL ? sx[m + i] : 1.0f));
    }
}

static void lh_wo8_in_region(const void *X, const float *sx, int64_t M, int64_t K, const int8_t *W,
                             const uint16_t *S, int64_t N, void *Y, int64_t ldy, int y_bf16) {
    const int64_t blocks = (N + LH_WO_RB - 1) / LH_WO_RB;
#pragma omp for schedule(static) nowait
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n = b * LH_WO_RB;
        lh_wo8_rows(X, sx, M, K, W, S, n, N - n < LH_WO_RB ? (int)(N - n) : LH_WO_RB, Y, ldy, y_bf16);
    }
}

/* nw int8 weights W[j] (N[j], K) with row scales S[j] (N[j],) applied to X (M, K) (float32 when x_f32, else
 * bf16; rows ldx apart) into Y[j] (M, N[j]) rows ldy[j] apart, float32 or bf16 (y_bf16); act: the activation
 * kind requested (weight_only.h's LH_WO_ACT_*: float32, the int16 path above, or weight_only_a8.c's int8 codes).
 * Returns 0, or -1 for M outside 1..16, a negative size, or no memory. */
int lh_wo_int8(int nw, const void *X, int x_f32, int64_t ldx, int64_t M, const int8_t *const *W,
               const uint16_t *const *S, const int64_t *N, int64_t K, void *const *Y, const int64_t *ldy,
               int y_bf16, int act, int nthreads) {
    if (M < 1 || M > LH_WO_MAX_M || K < 1 || nw < 1) return -1;
    return lh_wo_run(LH_WO_INT8, nw, X, x_f32, ldx, M, (const void *const *)W, (const void *const *)S, NULL, 0, N,
                     K, 0, Y, ldy, y_bf16, act, nthreads);
}

/* ---- int4 ------------------------------------------------------------------------------------------------ */

#if LH_WO_AVX512
static inline __attribute__((always_inline)) void lh_wo4_tile(const float *X, int64_t K, const int mb,
                                                              const uint8_t *W, int64_t ldw, const int rb,
                                                              const void *S, const void *Z, int sz_f32, int64_t N,
                                                              int64_t G, float *out) {
    const __m512 codes = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7); /* i - 8 */
    __m512 acc[LH_WO_MB][LH_WO_RB];
    for (int i = 0; i < mb; i++)
        for (int r = 0; r < rb; r++) acc[i][r] = _mm512_setzero_ps();
    for (int64_t k0 = 0, g = 0; k0 < K; k0 += G, g++) {
        __m512 t[LH_WO_RB]; /* this group's 16 dequantised values for each row */
        for (int r = 0; r < rb; r++)
            t[r] = _mm512_fmadd_ps(codes, _mm512_set1_ps(lh_wo_sz(S, sz_f32, g * N + r)),
                                   _mm512_set1_ps(lh_wo_sz(Z, sz_f32, g * N + r)));
        for (int64_t k = k0; k < k0 + G; k += 32) {
            __m512 hi[LH_WO_RB], lo[LH_WO_RB];
            if ((k & 127) == 0)
                for (int r = 0; r < rb; r++)
                    _mm_prefetch((const char *)(W + r * ldw + k / 2) + LH_WO_AHEAD, _MM_HINT_T0);
            for (int r = 0; r < rb; r++) {
                const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(W + r * ldw + k / 2)));
                hi[r] = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), t[r]); /* q[k + 2j] */
                lo[r] = _mm512_permutexvar_ps(b, t[r]);                         /* q[k + 2j + 1]: low 4 bits */
            }
            for (int i = 0; i < mb; i++) {
                const __m512 xe = _mm512_loadu_ps(X + i * K + k), xo = _mm512_loadu_ps(X + i * K + k + 16);
                for (int r = 0; r < rb; r++)
                    acc[i][r] = _mm512_fmadd_ps(xo, lo[r], _mm512_fmadd_ps(xe, hi[r], acc[i][r]));
            }
        }
    }
    for (int i = 0; i < mb; i++)
        for (int r = 0; r < rb; r++) out[i * rb + r] = _mm512_reduce_add_ps(acc[i][r]);
}
#else
static inline __attribute__((always_inline)) void lh_wo4_tile(const float *X, int64_t K, const int mb,
                                                              const uint8_t *W, int64_t ldw, const int rb,
                                                              const void *S, const void *Z, int sz_f32, int64_t N,
                                                              int64_t G, float *out) {
    for (int i = 0; i < mb; i++)
        for (int r = 0; r < rb; r++) {
            float part[16] = {0};
            for (int64_t k0 = 0, g = 0; k0 < K; k0 += G, g++) {
                const float s = lh_wo_sz(S, sz_f32, g * N + r), z = lh_wo_sz(Z, sz_f32, g * N + r);
                for (int64_t k = k0; k < k0 + G; k += 32)
                    for (int j = 0; j < 16; j++) {
                        const uint8_t b = W[r * ldw + k / 2 + j];
                        part[j] += X[i * K + k + j] * ((float)((b >> 4) - 8) * s + z);
                        part[j] += X[i * K + k + 16 + j] * ((float)((b & 15) - 8) * s + z);
                    }
            }
            float sum = 0.0f;
            for (int l = 0; l < 16; l++) sum += part[l];
            out[i * rb + r] = sum;
        }
}
#endif

static void lh_wo4_rows(const float *X, int64_t M, int64_t K, const uint8_t *W, const void *S, const void *Z,
                        int sz_f32, int64_t N, int64_t G, int64_t n, int rb, void *Y, int64_t ldy, int y_bf16) {
    const size_t esz = sz_f32 ? 4 : 2;
    const char *Sn = (const char *)S + n * esz, *Zn = (const char *)Z + n * esz;
    float s[LH_WO_MB * LH_WO_RB];
    const int64_t ldw = K / 2;
    const uint8_t *w = W + n * ldw;
    for (int64_t m = 0; m < M; m += LH_WO_MB) {
        const int mb = M - m < LH_WO_MB ? (int)(M - m) : LH_WO_MB;
        const float *x = X + m * K;
        if (rb == LH_WO_RB) {
            switch (mb) {
            case 1: lh_wo4_tile(x, K, 1, w, ldw, LH_WO_RB, Sn, Zn, sz_f32, N, G, s); break;
            case 2: lh_wo4_tile(x, K, 2, w, ldw, LH_WO_RB, Sn, Zn, sz_f32, N, G, s); break;
            case 3: lh_wo4_tile(x, K, 3, w, ldw, LH_WO_RB, Sn, Zn, sz_f32, N, G, s); break;
            default: lh_wo4_tile(x, K, 4, w, ldw, LH_WO_RB, Sn, Zn, sz_f32, N, G, s); break;
            }
        } else {
            for (int r = 0; r < rb; r++) {
                float t[LH_WO_MB];
                lh_wo4_tile(x, K, mb, w + r * ldw, ldw, 1, Sn + r * esz, Zn + r * esz, sz_f32, N, G, t);
                for (int i = 0; i < mb; i++) s[i * rb + r] = t[i];
            }
        }
        for (int i = 0; i < mb; i++)
            for (int r = 0; r < rb; r++) lh_wo_store(Y, y_bf16, (m + i) * ldy + n + r, s[i * rb + r]);
    }
}

static void lh_wo4_in_region(const float *X, int64_t M, int64_t K, const uint8_t *W, const void *S, const void *Z,
                             int sz_f32, int64_t N, int64_t G, void *Y, int64_t ldy, int y_bf16) {
    const int64_t blocks = (N + LH_WO_RB - 1) / LH_WO_RB;
#pragma omp for schedule(static) nowait
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n = b * LH_WO_RB;
        lh_wo4_rows(X, M, K, W, S, Z, sz_f32, N, G, n, N - n < LH_WO_RB ? (int)(N - n) : LH_WO_RB, Y, ldy, y_bf16);
    }
}

/* The int16-activation int4 path (`act16`, AVX512_VNNI, K a multiple of 64): X rounded to int16 per row as for
 * int8 weights; 32 bytes of codes widened to 16-bit lanes, split into high and low nibbles (q in 0..15), and
 * `vpdpwssd` sums exact int16 x code products into int32 lanes. Per group: sum_k x_k w_k = sx * (s * D + (z - 8 s)
 * * Xg) with D = sum_k xq_k q_k and Xg = sum_k xq_k exact integers (Xg made once per call). The X codes are laid
 * out per 64-element chunk as its 32 even then its 32 odd elements, the order of the high and low nibbles. */
#if LH_WO_VNNI
#define LH_WO_ACT16_INT4 1
static inline __attribute__((always_inline)) void lh_wo4w_tile(const int16_t *X, const float *XS, int64_t K,
                                                               const int mb, const uint8_t *W, int64_t ldw,
                                                               const int rb, const void *S, const void *Z,
                                                               int sz_f32, int64_t N, int64_t G, float *out) {
    const __m512i low = _mm512_set1_epi16(15);
    __m512 acc[LH_WO_MB][LH_WO_RB];
    for (int i = 0; i < mb; i++)
        for (int r = 0; r < rb; r++) acc[i][r] = _mm512_setzero_ps();
    const int64_t span = G < 64 ? 64 : G; /* codes per scale step: one group, or two groups of 32 per chunk */
    for (int64_t k0 = 0; k0 < K; k0 += span) {
        __m512i dot[LH_WO_MB][LH_WO_RB];
        for (int i = 0; i < mb; i++)
            for (int r = 0; r < rb; r++) dot[i][r] = _mm512_setzero_si512();
        for (int64_t k = k0; k < k0 + span; k += 64) {
            __m512i wh[LH_WO_RB], wl[LH_WO_RB];
            if ((k & 127) == 0)
                for (int r = 0; r < rb; r++)
                    _mm_prefetch((const char *)(W + r * ldw + k / 2) + LH_WO_AHEAD, _MM_HINT_T0);
            for (int r = 0; r < rb; r++) {
                const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(W + r * ldw + k / 2)));
                wh[r] = _mm512_srli_epi16(b, 4);    /* q[k + 2j] */
                wl[r] = _mm512_and_si512(b, low);    /* q[k + 2j + 1] */
            }
            for (int i = 0; i < mb; i++) {
                const __m512i xe = _mm512_loadu_si512((const void *)(X + i * K + k));
                const __m512i xo = _mm512_loadu_si512((const void *)(X + i * K + k + 32));
                for (int r = 0; r < rb; r++)
                    dot[i][r] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(dot[i][r], xe, wh[r]), xo, wl[r]);
            }
        }
        const int64_t g = k0 / G;
        for (int r = 0; r < rb; r++) {
            __m512 sv = _mm512_set1_ps(lh_wo_sz(S, sz_f32, g * N + r));
            if (G < 64) /* float lanes 8..15 hold the chunk's second group of 32 */
                sv = _mm512_mask_blend_ps((__mmask16)0xFF00, sv, _mm512_set1_ps(lh_wo_sz(S, sz_f32, (g + 1) * N + r)));
            for (int i = 0; i < mb; i++) acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[i][r]), sv, acc[i][r]);
        }
    }
    const int64_t ng = K / G;
    for (int i = 0; i < mb; i++)
        for (int r = 0; r < rb; r++) {
            float zs = 0.0f;
            for (int64_t g = 0; g < ng; g++)
                zs += (lh_wo_sz(Z, sz_f32, g * N + r) - 8.0f * lh_wo_sz(S, sz_f32, g * N + r)) * XS[i * ng + g];
            out[i * rb + r] = _mm512_reduce_add_ps(acc[i][r]) + zs;
        }
}

static void lh_wo4w_in_region(const int16_t *X, const float *XS, const float *sx, int64_t M, int64_t K,
                              const uint8_t *W, const void *S, const void *Z, int sz_f32, int64_t N, int64_t G,
                              void *Y, int64_t ldy, int y_bf16) {
    const int64_t blocks = (N + LH_WO_RB - 1) / LH_WO_RB, ldw = K / 2, ng = K / G;
    const size_t esz = sz_f32 ? 4 : 2;
#pragma omp for schedule(static) nowait
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n = b * LH_WO_RB;
        const int rb = N - n < LH_WO_RB ? (int)(N - n) : LH_WO_RB;
        const char *Sn = (const char *)S + n * esz, *Zn = (const char *)Z + n * esz;
        for (int64_t m = 0; m < M; m += LH_WO_MB) {
            const int mb = M - m < LH_WO_MB ? (int)(M - m) : LH_WO_MB;
            float s[LH_WO_MB * LH_WO_RB];
            const int16_t *x = X + m * K;
            const float *xs = XS + m * ng;
            const uint8_t *w = W + n * ldw;
            if (rb == LH_WO_RB) {
                switch (mb) {
                case 1: lh_wo4w_tile(x, xs, K, 1, w, ldw, LH_WO_RB, Sn, Zn, sz_f32, N, G, s); break;
                case 2: lh_wo4w_tile(x, xs, K, 2, w, ldw, LH_WO_RB, Sn, Zn, sz_f32, N, G, s); break;
                case 3: lh_wo4w_tile(x, xs, K, 3, w, ldw, LH_WO_RB, Sn, Zn, sz_f32, N, G, s); break;
                default: lh_wo4w_tile(x, xs, K, 4, w, ldw, LH_WO_RB, Sn, Zn, sz_f32, N, G, s); break;
                }
            } else {
                for (int r = 0; r < rb; r++) {
                    float u[LH_WO_MB];
                    lh_wo4w_tile(x, xs, K, mb, w + r * ldw, ldw, 1, Sn + r * esz, Zn + r * esz, sz_f32, N, G, u);
                    for (int i = 0; i < mb; i++) s[i * rb + r] = u[i];
                }
            }
            for (int i = 0; i < mb; i++)
                for (int r = 0; r < rb; r++) lh_wo_store(Y, y_bf16, (m + i) * ldy + n + r, s[i * rb + r] * sx[m + i]);
        }
    }
}
#else
#define LH_WO_ACT16_INT4 0
#endif

/* nw int4 weights: codes W[j] (N[j], K/2), scales S[j] and zeros Z[j] (K/G, N[j]), bf16 or float32 (sz_f32),
 * applied to X as in lh_wo_int8 (act: float32, the int16 path above, or weight_only_a8.c's int8 codes). G a
 * multiple of 32 dividing K. Returns 0, or -1 for bad sizes or no memory. */
int lh_wo_int4(int nw, const void *X, int x_f32, int64_t ldx, int64_t M, const uint8_t *const *W,
               const void *const *S, const void *const *Z, int sz_f32, const int64_t *N, int64_t K, int64_t G,
               void *const *Y, const int64_t *ldy, int y_bf16, int act, int nthreads) {
    if (M < 1 || M > LH_WO_MAX_M || K < 1 || nw < 1 || G < 32 || G % 32 != 0 || K % G != 0) return -1;
    return lh_wo_run(LH_WO_INT4, nw, X, x_f32, ldx, M, (const void *const *)W, S, Z, sz_f32, N, K, G, Y, ldy,
                     y_bf16, act, nthreads);
}

/* ---- 8-bit codes in groups (GPTQ 8-bit) ------------------------------------------------------------------ */

#if LH_WO_AVX512
static inline __attribute__((always_inline)) void lh_wog8_tile(const float *X, int64_t K, const int mb,
                                                               const uint8_t *W, int64_t ldw, const int rb,
                                                               const float *S, const float *Z, int64_t N,
                                                               int64_t G, float *out) {
    __m512 acc[LH_WO_MB][LH_WO_RB];
    for (int i = 0; i < mb; i++)
        for (int r = 0; r < rb; r++) acc[i][r] = _mm512_setzero_ps();
    for (int64_t k0 = 0, g = 0; k0 < K; k0 += G, g++) {
        __m512 s[LH_WO_RB], z[LH_WO_RB];
        for (int r = 0; r < rb; r++) {
            s[r] = _mm512_set1_ps(S[g * N + r]);
            z[r] = _mm512_set1_ps(Z[g * N + r]);
        }
        for (int64_t k = k0; k < k0 + G; k += 16) {
            __m512 w[LH_WO_RB]; /* q * s + z: the dequantised weight, exact in float32 for float16 s and z */
            for (int r = 0; r < rb; r++)
                w[r] = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(W + r * ldw + k)))),
                    s[r], z[r]);
            for (int i = 0; i < mb; i++) {
                const __m512 x = _mm512_loadu_ps(X + i * K + k);
                for (int r = 0; r < rb; r++) acc[i][r] = _mm512_fmadd_ps(x, w[r], acc[i][r]);
            }
        }
    }
    for (int i = 0; i < mb; i++)
        for (int r = 0; r < rb; r++) out[i * rb + r] = _mm512_reduce_add_ps(acc[i][r]);
}
#else
static inline __attribute__((always_inline)) void lh_wog8_tile(const float *X, int64_t K, const int mb,
                                                               const uint8_t *W, int64_t ldw, const int rb,
                                                               const float *S, const float *Z, int64_t N,
                                                               int64_t G, float *out) {
    for (int i = 0; i < mb; i++)
        for (int r = 0; r < rb; r++) {
            float part[16] = {0}, sum = 0.0f;
            for (int64_t k = 0; k < K; k++)
                part[k % 16] += X[i * K + k] * ((float)W[r * ldw + k] * S[(k / G) * N + r] + Z[(k / G) * N + r]);
            for (int l = 0; l < 16; l++) sum += part[l];
            out[i * rb + r] = sum;
        }
}
#endif

static void lh_wog8_in_region(const float *X, int64_t M, int64_t K, const uint8_t *W, const float *S,
                              const float *Z, int64_t N, int64_t G, void *Y, int64_t ldy, int y_bf16) {
    const int64_t blocks = (N + LH_WO_RB - 1) / LH_WO_RB;
#pragma omp for schedule(static) nowait
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n = b * LH_WO_RB;
        const int rb = N - n < LH_WO_RB ? (int)(N - n) : LH_WO_RB;
        for (int64_t m = 0; m < M; m += LH_WO_MB) {
            const int mb = M - m < LH_WO_MB ? (int)(M - m) : LH_WO_MB;
            float s[LH_WO_MB * LH_WO_RB];
            const float *x = X + m * K;
            if (rb == LH_WO_RB) {
                switch (mb) {
                case 1: lh_wog8_tile(x, K, 1, W + n * K, K, LH_WO_RB, S + n, Z + n, N, G, s); break;
                case 2: lh_wog8_tile(x, K, 2, W + n * K, K, LH_WO_RB, S + n, Z + n, N, G, s); break;
                case 3: lh_wog8_tile(x, K, 3, W + n * K, K, LH_WO_RB, S + n, Z + n, N, G, s); break;
                default: lh_wog8_tile(x, K, 4, W + n * K, K, LH_WO_RB, S + n, Z + n, N, G, s); break;
                }
            } else {
                for (int r = 0; r < rb; r++) {
                    float t[LH_WO_MB];
                    lh_wog8_tile(x, K, mb, W + (n + r) * K, K, 1, S + n + r, Z + n + r, N, G, t);
                    for (int i = 0; i < mb; i++) s[i * rb + r] = t[i];
                }
            }
            for (int i = 0; i < mb; i++)
                for (int r = 0; r < rb; r++) lh_wo_store(Y, y_bf16, (m + i) * ldy + n + r, s[i * rb + r]);
        }
    }
}

/* nw weights of 8-bit codes W[j] uint8 (N[j], K) with float32 scales S[j] and zeros Z[j] (K/G, N[j]):
 * w = q * s + z. G a multiple of 16 dividing K. X, Y as in lh_wo_int8. Returns 0, or -1. */
int lh_wo_grouped8(int nw, const void *X, int x_f32, int64_t ldx, int64_t M, const uint8_t *const *W,
                   const float *const *S, const float *const *Z, const int64_t *N, int64_t K, int64_t G,
                   void *const *Y, const int64_t *ldy, int y_bf16, int nthreads) {
    if (M < 1 || M > LH_WO_MAX_M || K < 1 || nw < 1 || G < 16 || G % 16 != 0 || K % G != 0) return -1;
    return lh_wo_run(LH_WO_GROUPED8, nw, X, x_f32, ldx, M, (const void *const *)W, (const void *const *)S,
                     (const void *const *)Z, 1, N, K, G, Y, ldy, y_bf16, 0, nthreads);
}

/* ---- the pieces (weight_only.h) and the one driver of the exported calls ---------------------------------- */

size_t lh_wo_act_bytes(int64_t K, int64_t M, int64_t G) {
    const size_t x = ((size_t)(M * K) * 8 + 63) / 64 * 64; /* float32 or int16 values; int8 codes and their scratch */
    const size_t xs = G > 0 ? (size_t)(M * (K / G)) * sizeof(float) : 0;
    return x + (xs + 63) / 64 * 64;
}

void lh_wo_act_init(lh_wo_act *a, void *mem, int scheme, int act, int64_t K, int64_t M, int64_t G) {
    a->scheme = scheme, a->M = M, a->K = K, a->G = G;
    if (scheme == LH_WO_INT8 && act == LH_WO_ACT_I8 && lh_wo4a8_available() && K % 32 == 0) a->act = LH_WO_ACT_I8;
    else if (scheme == LH_WO_INT8) a->act = act != LH_WO_ACT_F32 ? LH_WO_ACT_I16 : LH_WO_ACT_F32;
    else if (scheme == LH_WO_INT4 && act == LH_WO_ACT_I8 && lh_wo4a8_available() && K % 128 == 0)
        a->act = LH_WO_ACT_I8;
    else if (scheme == LH_WO_INT4) a->act = act != LH_WO_ACT_F32 && LH_WO_ACT16_INT4 && K % 64 == 0;
    else a->act = LH_WO_ACT_F32;
    a->x = mem;
    a->xs = (float *)((char *)mem + ((size_t)(M * K) * 8 + 63) / 64 * 64);
}

int lh_wo_act_row(lh_wo_act *a, const void *X, int x_f32, int64_t ldx, int64_t i) {
    const int64_t K = a->K;
    if (a->scheme == LH_WO_INT4 && a->act == LH_WO_ACT_I8) return lh_wo4a8_row(a, X, x_f32, ldx, i);
    if (a->scheme == LH_WO_INT8 && a->act == LH_WO_ACT_I8) return lh_wo8a8_row(a, X, x_f32, ldx, i);
    if (a->scheme == LH_WO_INT4 && a->act == LH_WO_ACT_I16) {
        int16_t *xq = (int16_t *)a->x + i * K;
        const int64_t G = a->G, ng = K / G;
        a->sx[i] = lh_wo_act16(X, x_f32, ldx, i, K, 1, xq);
        for (int64_t g = 0; g < ng; g++) { /* group sums of the codes, exact in int64 */
            int64_t sum = 0;
            for (int64_t c = g * G; c < (g + 1) * G; c++) /* element c sits at its split position */
                sum += xq[(c & ~(int64_t)63) + ((c & 1) << 5) + ((c & 63) >> 1)];
            a->xs[i * ng + g] = (float)sum;
        }
    } else if (a->scheme == LH_WO_INT4) {
        float *out = (float *)a->x + i * K;
        for (int64_t c = 0; c < K; c += 32) /* each 32-element chunk as its 16 even then its 16 odd elements */
            for (int j = 0; j < 16; j++) {
                out[c + j] = lh_wo_x(X, x_f32, i * ldx + c + 2 * j);
                out[c + 16 + j] = lh_wo_x(X, x_f32, i * ldx + c + 2 * j + 1);
            }
    } else if (a->act == LH_WO_ACT_I16) {
        a->sx[i] = lh_wo_act16(X, x_f32, ldx, i, K, 0, (int16_t *)a->x + i * K);
    } else {
        float *out = (float *)a->x + i * K;
        for (int64_t k = 0; k < K; k++) out[k] = lh_wo_x(X, x_f32, i * ldx + k);
    }
    return 0;
}

void lh_wo_weight_in_region(const lh_wo_act *a, const void *W, const void *S, const void *Z, int sz_f32, int64_t N,
                            void *Y, int64_t ldy, int y_bf16) {
    const int64_t M = a->M, K = a->K, G = a->G;
    if (a->scheme == LH_WO_INT8 && a->act == LH_WO_ACT_I8) {
        lh_wo8a8_in_region(a, (const int8_t *)W, (const uint16_t *)S, N, Y, ldy, y_bf16);
    } else if (a->scheme == LH_WO_INT8) {
        lh_wo8_in_region(a->x, a->act == LH_WO_ACT_I16 ? a->sx : NULL, M, K, (const int8_t *)W, (const uint16_t *)S,
                         N, Y, ldy, y_bf16);
    } else if (a->scheme == LH_WO_INT4) {
        if (a->act == LH_WO_ACT_I8) {
            lh_wo4a8_in_region(a, (const uint8_t *)W, S, Z, sz_f32, N, Y, ldy, y_bf16);
            return;
        }
#if LH_WO_ACT16_INT4
        if (a->act == LH_WO_ACT_I16) {
            lh_wo4w_in_region((const int16_t *)a->x, a->xs, a->sx, M, K, (const uint8_t *)W, S, Z, sz_f32, N, G, Y,
                              ldy, y_bf16);
            return;
        }
#endif
        lh_wo4_in_region((const float *)a->x, M, K, (const uint8_t *)W, S, Z, sz_f32, N, G, Y, ldy, y_bf16);
    } else {
        lh_wog8_in_region((const float *)a->x, M, K, (const uint8_t *)W, (const float *)S, (const float *)Z, N, G, Y,
                          ldy, y_bf16);
    }
}

static int lh_wo_run(int scheme, int nw, const void *X, int x_f32, int64_t ldx, int64_t M, const void *const *W,
                     const void *const *S, const void *const *Z, int sz_f32, const int64_t *N, int64_t K, int64_t G,
                     void *const *Y, const int64_t *ldy, int y_bf16, int act, int nthreads) {
    double work = 0;
    for (int j = 0; j < nw; j++) {
        if (N[j] < 0) return -1;
        work += (double)M * N[j] * K;
    }
    void *mem = aligned_alloc(64, lh_wo_act_bytes(K, M, G));
    if (mem == NULL) return -1;
    lh_wo_act a;
    lh_wo_act_init(&a, mem, scheme, act, K, M, G);
    int bad = 0;
    for (int64_t i = 0; i < M; i++) bad |= lh_wo_act_row(&a, X, x_f32, ldx, i);
    if (bad) {
        free(mem);
        return -1;
    }
    const int par = nthreads > 1 && work >= LH_WO_SERIAL_WORK;
#pragma omp parallel num_threads(nthreads) if (par)
    for (int j = 0; j < nw; j++)
        lh_wo_weight_in_region(&a, W[j], S[j], Z == NULL ? NULL : Z[j], sz_f32, N[j], Y[j], ldy[j], y_bf16);
    free(mem);
    return 0;
}

/* Whether this build has the AVX-512 paths (1) or the portable ones (0). */
int lh_wo_avx512(void) { return LH_WO_AVX512; }

/* Whether the int16-activation int8 path has its VNNI instructions (1) or the portable loop (0). */
int lh_wo_vnni(void) { return LH_WO_VNNI; }
