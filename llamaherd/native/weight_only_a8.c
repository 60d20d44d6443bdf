/* Weight-only int4 and int8 products on int8 activations: the Q8_0 activation blocks of llama.cpp's Q4_0 / Q8_0
 * paths against the int4 and int8 codes of weight_only.c, read in place.
 *
 * Why: weight_only.c's int16-activation int4 path is bound by instructions, not bytes (BENCHMARKS.md, issue 18:
 * 66.7 ms/token at 2 threads where its bytes need 37 ms): per 64 codes it widens 32 bytes to int16 and issues
 * two `vpdpwssd`. With int8 activations one `vpdpbusd` (`_mm512_dpbusd_epi32`, AVX512_VNNI: 64 unsigned x signed
 * byte products into 16 int32 lanes) takes the 64 high or the 64 low nibbles of 64 code bytes as they are.
 *
 * Activations: each row quantized once per product group to Q8_0 blocks, through ggml_q8.c's quantizer (the
 * rounding of ggml `quantize_row_q8_0_ref`: per 32 elements d = amax / 127 rounded to float16, codes
 * round(x / d) from the unrounded d): x[k] ~ d_b xq[k], b = k / 32. One scale per 32, as llama.cpp's Q4_0
 * products (issue 17 found one per 256 too coarse on real activations). Each 128-element chunk of codes is
 * stored as its 64 even then its 64 odd elements, the order of the high and low nibbles of the chunk's 64 code
 * bytes (byte j = q[2j] << 4 | q[2j+1]); int32 lane l of either product then holds elements 8l..8l+7, all in
 * activation block l / 4, so one float vector of the four blocks' d (each repeated four times) scales a chunk.
 *
 * With w = (q - 8) s_g + z_g (weight_only.c), per output:
 *   y = sum_g s_g sum_{b in g} d_b (q . xq)_b  +  sum_g (z_g - 8 s_g) XS_g,
 *   XS_g = sum_{b in g} d_b sum_{k in b} xq[k]
 * the integer dots exact, the rest float32 (XS from the quantizer's block code sums, once per row).
 * Needs K a multiple of 128 and the VNNI build; weight_only.c's lh_wo_act_init falls back to the int16 path
 * otherwise.
 *
 * int8 weights (w = q s, one scale per output row): the codes in order, so int32 lane l of a 64-code product holds
 * elements 4l..4l+3, lanes 0-7 in one activation block and 8-15 in the next; per output
 *   y = s sum_b d_b (q . xq)_b,
 * a float vector of the chunk's two d (each over eight lanes) scaling each 64-code product (a8_tile8 for the
 * signed x signed products). Per 64 codes and activation row: one `vpdpbusd`, a conversion and an FMA, against
 * the int16 path's two `vpdpwssd` and its widening of the codes (weight_only.c, which stays: INT8_ACTIVATIONS
 * off). Needs K a multiple of 32 (the blocks) and the VNNI build, else the int16 path. */
#include <stdint.h>
#include <string.h>

#include "weight_only_a8.h"
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define LH_WO_A8 1
#else
#define LH_WO_A8 0
#endif

/* ggml_q8.c's exported quantizer (ggml_kernels.py declares it too): rows of K floats to int8 codes q, per 32
 * elements the float16-rounded scale d, per 16 the code sums s16. */
int lh_q8_quantize(int type, const float *X, int64_t M, int64_t K, int8_t *q, float *d, float *s16);
#define LH_WO_A8_TYPE 2 /* ggml's Q4_0: its activations are the Q8_0 blocks */

/* Weight rows per block: four streams per thread, each prefetching its row of the next block (about 1.25x over no
 * prefetch on the 1B shapes, one thread, the products alone; 1024 bytes ahead, as weight_only.c does, measured
 * the same there, but for K = 2048 that is the next row, which the block is already reading). */
#define LH_WO_A8_RB 4
#define LH_WO_A8_MB 4 /* X rows per block */

int lh_wo4a8_available(void) { return LH_WO_A8; }

/* int4: row i's part of a->x (8 K bytes): the split codes (K), the quantizer's codes (K), its s16 (K/16 floats), d
 * (K/32 floats), the chunks' d vectors dv (K/8 floats), and (bf16 input) the row widened to float32 (K floats). */
static int8_t *a8_codes(const lh_wo_act *a, int64_t i) { return (int8_t *)a->x + i * a->K * 8; }
static float *a8_dv(const lh_wo_act *a, int64_t i) { return (float *)(a8_codes(a, i) + a->K * 2 + a->K / 2); }

/* Row i of X as Q8_0 blocks: widened to float32 in `row` when bf16, then the quantizer's codes q (K), scales d
 * (K/32) and code sums s16 (K/16). Returns 0 (or NaN: a NaN or an infinity, which int8 codes cannot carry, makes
 * the row's outputs NaN) in *poison, and -1 when the quantizer could not get its scratch memory. */
static int a8_quantize(const lh_wo_act *a, const void *X, int x_f32, int64_t ldx, int64_t i, float *row, int8_t *q,
                       float *d, float *s16, float *poison) {
    const int64_t K = a->K;
    const float *xf = (const float *)X + i * ldx;
    if (!x_f32) {
        for (int64_t k = 0; k < K; k++) row[k] = lh_bf2f(((const uint16_t *)X)[i * ldx + k]);
        xf = row;
    }
    int finite = 1;
    for (int64_t k = 0; k < K; k++) finite &= __builtin_isfinite(xf[k]);
    const int failed = lh_q8_quantize(LH_WO_A8_TYPE, xf, 1, K, q, d, s16) != 0;
    *poison = finite && !failed ? 0.0f : __builtin_nanf("");
    return failed ? -1 : 0;
}

int lh_wo4a8_row(lh_wo_act *a, const void *X, int x_f32, int64_t ldx, int64_t i) {
    const int64_t K = a->K, G = a->G, ng = K / G;
    int8_t *split = a8_codes(a, i), *raw = split + K;
    float *s16 = (float *)(split + 2 * K), *d = s16 + K / 16, *dv = a8_dv(a, i), *row = (float *)(split + 4 * K);
    float poison;
    const int rc = a8_quantize(a, X, x_f32, ldx, i, row, raw, d, s16, &poison);
    for (int64_t c = 0; c < K; c += 128) {
        for (int j = 0; j < 64; j++) {
            split[c + j] = raw[c + 2 * j];
            split[c + 64 + j] = raw[c + 2 * j + 1];
        }
        for (int l = 0; l < 16; l++) dv[c / 8 + l] = d[c / 32 + l / 4] + poison;
    }
    for (int64_t g = 0; g < ng; g++) {
        float sum = 0.0f;
        for (int64_t b = g * G / 32; b < (g + 1) * G / 32; b++) sum += d[b] * (s16[2 * b] + s16[2 * b + 1]);
        a->xs[i * ng + g] = sum + poison;
    }
    return rc;
}

/* int8 weights: row i's codes in order (K), s16 (K/16 floats), d (K/32 floats), from 2 K bytes the d vector of
 * each 64-element chunk (its two blocks' d, each over eight int32 lanes: K/4 floats, 16 more when a half chunk
 * ends the row, its upper lanes 0), the widened row from 4 K, then over it each lane's start, -128 times the sum
 * of its four codes (K/4 int32, 16 more for a last half chunk). */
static float *a8_dv8(const lh_wo_act *a, int64_t i) { return (float *)(a8_codes(a, i) + a->K * 2); }
static int32_t *a8_start(const lh_wo_act *a, int64_t i) { return (int32_t *)(a8_codes(a, i) + a->K * 4); }

int lh_wo8a8_row(lh_wo_act *a, const void *X, int x_f32, int64_t ldx, int64_t i) {
    const int64_t K = a->K;
    int8_t *q = a8_codes(a, i);
    float *s16 = (float *)(q + K), *d = s16 + K / 16, *dv = a8_dv8(a, i), *row = (float *)(q + 4 * K);
    int32_t *start = a8_start(a, i);
    float poison;
    const int rc = a8_quantize(a, X, x_f32, ldx, i, row, q, d, s16, &poison);
    for (int64_t c = 0; c < K; c += 64)
        for (int l = 0; l < 16; l++) {
            const int64_t b = c / 32 + l / 8, k = c + 4 * l;
            dv[c / 4 + l] = (b < K / 32 ? d[b] : 0.0f) + poison;
            start[c / 4 + l] = k < K ? -128 * (q[k] + q[k + 1] + q[k + 2] + q[k + 3]) : 0;
        }
    return rc;
}

#if LH_WO_A8
/* Four consecutive scales or zeros from P[i] (bf16 widened exactly, or float32). */
static inline __m128 a8_four(const void *P, int f32, int64_t i) {
    if (f32) return _mm_loadu_ps((const float *)P + i);
    const __m128i h = _mm_loadl_epi64((const __m128i *)((const uint16_t *)P + i));
    return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16));
}

/* rb weight rows (codes W, ldw bytes apart; scales and zeros of row r at S/Z + r) against mb activation rows. */
static inline __attribute__((always_inline)) void a8_tile(const lh_wo_act *a, int64_t m, const int mb,
                                                          const uint8_t *W, int64_t ldw, const int rb, const void *S,
                                                          const void *Z, int sz_f32, int64_t N, float *out) {
    const int64_t K = a->K, G = a->G, ng = K / G;
    const __m512i low = _mm512_set1_epi8(15);
    const int whole = G % 128 == 0; /* a chunk lies in one group */
    const int8_t *x[LH_WO_A8_MB];
    const float *dv[LH_WO_A8_MB];
    for (int i = 0; i < mb; i++) x[i] = a8_codes(a, m + i), dv[i] = a8_dv(a, m + i);
    __m512 acc[LH_WO_A8_MB][LH_WO_A8_RB], sv[LH_WO_A8_RB];
    for (int i = 0; i < mb; i++)
        for (int r = 0; r < rb; r++) acc[i][r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 128) {
        if (!whole) { /* the group of each of the chunk's four blocks, its scale over that block's four lanes */
            for (int r = 0; r < rb; r++) {
                float s[4];
                for (int b = 0; b < 4; b++) s[b] = lh_wo_sz(S, sz_f32, ((k + 32 * b) / G) * N + r);
                sv[r] = _mm512_setr_ps(s[0], s[0], s[0], s[0], s[1], s[1], s[1], s[1], s[2], s[2], s[2], s[2], s[3],
                                       s[3], s[3], s[3]);
            }
        } else if (k % G == 0) {
            for (int r = 0; r < rb; r++) sv[r] = _mm512_set1_ps(lh_wo_sz(S, sz_f32, (k / G) * N + r));
        }
        __m512i wh[LH_WO_A8_RB], wl[LH_WO_A8_RB];
        for (int r = 0; r < rb; r++) {
            const uint8_t *p = W + r * ldw + k / 2;
            _mm_prefetch((const char *)(p + LH_WO_A8_RB * ldw), _MM_HINT_T0); /* the next block's row r */
            const __m512i bytes = _mm512_loadu_si512((const void *)p);
            wh[r] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low); /* q[k + 2j], j = 0..63 */
            wl[r] = _mm512_and_si512(bytes, low);                        /* q[k + 2j + 1] */
        }
        for (int i = 0; i < mb; i++) {
            const __m512i xe = _mm512_loadu_si512((const void *)(x[i] + k));
            const __m512i xo = _mm512_loadu_si512((const void *)(x[i] + k + 64));
            const __m512 d = _mm512_loadu_ps(dv[i] + k / 8);
            for (int r = 0; r < rb; r++) {
                const __m512i dot =
                    _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wh[r], xe), wl[r], xo);
                acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d, sv[r]), acc[i][r]);
            }
        }
    }
    for (int i = 0; i < mb; i++) {
        const float *xs = a->xs + (m + i) * ng;
        float zs[LH_WO_A8_RB];
        if (rb == 4) { /* the four rows' (z - 8 s) side by side */
            __m128 z4 = _mm_setzero_ps();
            for (int64_t g = 0; g < ng; g++)
                z4 = _mm_fmadd_ps(_mm_fnmadd_ps(_mm_set1_ps(8.0f), a8_four(S, sz_f32, g * N), a8_four(Z, sz_f32, g * N)),
                                  _mm_set1_ps(xs[g]), z4);
            _mm_storeu_ps(zs, z4);
        } else {
            for (int r = 0; r < rb; r++) {
                zs[r] = 0.0f;
                for (int64_t g = 0; g < ng; g++)
                    zs[r] += (lh_wo_sz(Z, sz_f32, g * N + r) - 8.0f * lh_wo_sz(S, sz_f32, g * N + r)) * xs[g];
            }
        }
        for (int r = 0; r < rb; r++) out[i * rb + r] = _mm512_reduce_add_ps(acc[i][r]) + zs[r];
    }
}

void lh_wo4a8_in_region(const lh_wo_act *a, const uint8_t *W, const void *S, const void *Z, int sz_f32, int64_t N,
                        void *Y, int64_t ldy, int y_bf16) {
    const int64_t M = a->M, ldw = a->K / 2, blocks = (N + LH_WO_A8_RB - 1) / LH_WO_A8_RB;
    const size_t esz = sz_f32 ? 4 : 2;
#pragma omp for schedule(static) nowait
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t n = blk * LH_WO_A8_RB;
        const int rb = N - n < LH_WO_A8_RB ? (int)(N - n) : LH_WO_A8_RB;
        const char *Sn = (const char *)S + n * esz, *Zn = (const char *)Z + n * esz;
        const uint8_t *w = W + n * ldw;
        for (int64_t m = 0; m < M; m += LH_WO_A8_MB) {
            const int mb = M - m < LH_WO_A8_MB ? (int)(M - m) : LH_WO_A8_MB;
            float s[LH_WO_A8_MB * LH_WO_A8_RB];
#define A4_TILE(MB, R, ROWS, OUT) \
    a8_tile(a, m, MB, w + (R) * ldw, ldw, ROWS, Sn + (R) * esz, Zn + (R) * esz, sz_f32, N, OUT)
            LH_WO_TILES(A4_TILE, mb, rb, LH_WO_A8_RB, s);
#undef A4_TILE
            for (int i = 0; i < mb; i++)
                for (int r = 0; r < rb; r++) lh_wo_store(Y, y_bf16, (m + i) * ldy + n + r, s[i * rb + r]);
        }
    }
}

/* int8 weights: rb weight rows (ldw bytes apart) against mb activation rows, each sum before the row's scale.
 * Per 64 codes w (signed) and activation codes x (Q8_0, -127..127): `vpdpbusd` multiplies unsigned by signed
 * bytes, so the codes go in with their sign bit flipped, wu = w + 128 (0..255, one XOR per weight row and chunk),
 * and each lane's sum starts at -128 (x0 + x1 + x2 + x3), laid out once per activation row (a8_start): the exact
 * int32 sum of the lane's four products w x. llama.cpp's sign transfer instead (`|w|` against x negated where
 * w < 0, ggml-cpu's `mul_sum_i8_pairs`) costs a masked subtraction per activation row and weight row: 1.1x / 1.4x
 * / 1.4x slower on 1 / 4 / 16 rows of a 512 x 2048 product from the cache, one thread (the same from memory);
 * x + 128 against w, with a start of -128 sum(w) per weight row (one more `vpdpbusd` and a subtraction per weight
 * row and chunk), measured as fast as this form. */
static inline __attribute__((always_inline)) void a8_tile8(const lh_wo_act *a, int64_t m, const int mb,
                                                           const int8_t *W, int64_t ldw, const int rb, float *out) {
    const int64_t K = a->K;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const int8_t *x[LH_WO_A8_MB];
    const int32_t *st[LH_WO_A8_MB];
    const float *dv[LH_WO_A8_MB];
    for (int i = 0; i < mb; i++) x[i] = a8_codes(a, m + i), st[i] = a8_start(a, m + i), dv[i] = a8_dv8(a, m + i);
    __m512 acc[LH_WO_A8_MB][LH_WO_A8_RB];
    for (int i = 0; i < mb; i++)
        for (int r = 0; r < rb; r++) acc[i][r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 64) { /* a last chunk of 32 (K % 64 == 32): masked loads zero the rest */
        const __mmask64 in = K - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (K - k)) - 1);
        __m512i wu[LH_WO_A8_RB];
        for (int r = 0; r < rb; r++) {
            const int8_t *p = W + r * ldw + k;
            _mm_prefetch((const char *)(p + LH_WO_A8_RB * ldw), _MM_HINT_T0); /* the next block's row r */
            wu[r] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(in, p), flip);
        }
        for (int i = 0; i < mb; i++) {
            const __m512i xv = _mm512_maskz_loadu_epi8(in, x[i] + k), s = _mm512_loadu_si512(st[i] + k / 4);
            const __m512 d = _mm512_loadu_ps(dv[i] + k / 4); /* lanes 0-7: block k / 32, 8-15: the next */
            for (int r = 0; r < rb; r++)
                acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(s, wu[r], xv)), d, acc[i][r]);
        }
    }
    for (int i = 0; i < mb; i++)
        for (int r = 0; r < rb; r++) out[i * rb + r] = _mm512_reduce_add_ps(acc[i][r]);
}

void lh_wo8a8_in_region(const lh_wo_act *a, const int8_t *W, const uint16_t *S, int64_t N, void *Y, int64_t ldy,
                        int y_bf16) {
    const int64_t M = a->M, ldw = a->K, blocks = (N + LH_WO_A8_RB - 1) / LH_WO_A8_RB;
#pragma omp for schedule(static) nowait
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t n = blk * LH_WO_A8_RB;
        const int rb = N - n < LH_WO_A8_RB ? (int)(N - n) : LH_WO_A8_RB;
        const int8_t *w = W + n * ldw;
        for (int64_t m = 0; m < M; m += LH_WO_A8_MB) {
            const int mb = M - m < LH_WO_A8_MB ? (int)(M - m) : LH_WO_A8_MB;
            float s[LH_WO_A8_MB * LH_WO_A8_RB];
#define A8_TILE(MB, R, ROWS, OUT) a8_tile8(a, m, MB, w + (R) * ldw, ldw, ROWS, OUT)
            LH_WO_TILES(A8_TILE, mb, rb, LH_WO_A8_RB, s);
#undef A8_TILE
            for (int i = 0; i < mb; i++)
                for (int r = 0; r < rb; r++)
                    lh_wo_store(Y, y_bf16, (m + i) * ldy + n + r, s[i * rb + r] * lh_bf2f(S[n + r]));
        }
    }
}
#else
void lh_wo8a8_in_region(const lh_wo_act *a, const int8_t *W, const uint16_t *S, int64_t N, void *Y, int64_t ldy,
                        int y_bf16) {
    (void)a, (void)W, (void)S, (void)N, (void)Y, (void)ldy, (void)y_bf16; /* never chosen */
}
void lh_wo4a8_in_region(const lh_wo_act *a, const uint8_t *W, const void *S, const void *Z, int sz_f32, int64_t N,
                        void *Y, int64_t ldy, int y_bf16) {
    (void)a, (void)W, (void)S, (void)Z, (void)sz_f32, (void)N, (void)Y, (void)ldy, (void)y_bf16; /* never chosen */
}
#endif
