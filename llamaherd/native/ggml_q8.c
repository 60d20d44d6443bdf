/* Matrix-vector products on packed ggml weights with int8 activations: llama.cpp's decode arithmetic, finer for K-quants.
 *
 * Why: the float-activation kernels in ggml.c widen every 4-6 bit weight code to int32, convert it to float
 * and FMA it: several instructions per weight byte, so Q4_0/Q5_0/K-quant products ran at 4-10 GB/s of packed
 * bytes, far below the memory bandwidth (bench/PROFILE.md sections 4 and 8). llama.cpp instead quantizes the
 * activation row once per product to int8 blocks (`quantize_row_q8_0` / `quantize_row_q8_K`, ggml
 * `ggml-quants.c`) and multiplies integer codes with integer dot-product instructions (ggml-cpu
 * `arch/x86/quants.c`). Here that is AVX-512 VNNI `vpdpbusd` (Intel intrinsics guide `_mm512_dpbusd_epi32`):
 * 64 u8 x s8 products per instruction, each group of 4 summed into one int32 lane. The unsigned weight codes
 * (nibbles, 5- and 6-bit codes) are the u8 operand and the int8 activations the s8 one; the code offset (8, 16,
 * 32) and the K-quants' mins are folded in afterwards through per-block sums of the activation codes. Q8_0's
 * signed weights use |w| and x * sign(w) (AVX-512 has no `vpsignb` on zmm: a masked subtract from zero).
 *
 * Activation quantization: Q8_0 blocks for every weight type, `quantize_row_q8_0_ref`: per 32 elements
 * d = amax / 127, q = roundf(x * (1/d)) (half away from zero), d stored as float16 and used as such; the codes and
 * d are byte-exact with gguf-py's `quantize(x, Q8_0)`. For Q4_0/Q5_0/Q8_0 weights that is llama.cpp's own
 * `vec_dot_type`, so those products are the ones llama.cpp computes up to float summation order. For the K-quants
 * llama.cpp takes Q8_K (`quantize_row_q8_K_ref`: ONE scale per 256 elements), and here they do not: when the
 * activations' magnitude changes along a super-block, as after Gemma's gated GELU, one scale per 256 rounds its
 * small elements away. Measured on the default model's decode (bench/eval_fidelity.py, 254 positions): mean KLD
 * against the float64 reference 5.30e-3 with Q8_K activations (llama.cpp itself: 4.52e-3), 1.97e-3 with blocks of
 * 32; tests/test_q8_kernels.py shows the same on single products. It costs the one-row kernels a conversion,
 * permute and FMA per 64 codes (bench/PROFILE.md section 15).
 *
 * Products: per 32 (Q6_K: 16) elements the integer dot is exact; it is scaled by (weight scale x activation
 * scale) in float32 and accumulated in float32 lanes, one horizontal reduction per output. The offset terms
 * (code offset x weight scale x activation scale x sum of activation codes) accumulate separately and are
 * subtracted at the end: the same float arithmetic as decode-then-dot up to rounding order. The one-row K-quant
 * kernels (decode) sum each 32 elements' integer dot with the weight's sub-block scales in int32 first
 * (`row_k45_one`, `row_q6k_one`).
 *
 * Block layouts (llama.cpp `ggml/src/ggml-common.h`):
 *   block_q4_0 (18 B): f16 d, u8 qs[16]; x[j] = d * ((qs[j] & 15) - 8), x[j+16] = d * ((qs[j] >> 4) - 8)
 *   block_q5_0 (22 B): f16 d, u32 qh, u8 qs[16]; as Q4_0 with bit j of qh the fifth bit of x[j], offset 16
 *   block_q8_0 (34 B): f16 d, s8 qs[32]; x[j] = d * qs[j]
 *   block_q4_K (144 B): f16 d, f16 dmin, u8 scales[12] (8 six-bit scales and mins), u8 qs[128];
 *     chunk c of 64: x[64c+l] = d*sc[2c]*(qs[32c+l] & 15) - dmin*m[2c], x[64c+32+l] = ... >> 4 with [2c+1]
 *   block_q5_K (176 B): f16 d, f16 dmin, scales[12], u8 qh[32], u8 qs[128]; as Q4_K with bit (2c) / (2c+1)
 *     of qh[l] the fifth bit
 *   block_q6_K (210 B): u8 ql[128], u8 qh[64], s8 scales[16], f16 d; per half h of 128, l < 32:
 *     x[l] = d*sc[l/16] * ((ql[l] & 15 | (qh[l] & 3) << 4) - 32), x[l+32]: ql[l+32] & 15, qh bits 2-3,
 *     x[l+64]: ql[l] >> 4, bits 4-5, x[l+96]: ql[l+32] >> 4, bits 6-7 (ql += 64, qh += 32, sc += 8 per half)
 *
 * Exported: `lh_q8_gemv` and `lh_q8_gemv_many` with the arguments of ggml.c's `lh_gemv` / `lh_gemv_many`
 * (one OpenMP region per call: the activation rows are quantized in an `omp for`, then each weight's rows are
 * an `omp for nowait`), and `lh_q8_quantize` (the activation codes, for tests). Compiled with -DLH_Q8_PORTABLE,
 * or without AVX-512 VNNI, the same arithmetic runs in portable C.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "ggml_q8.h"

#if !defined(LH_Q8_PORTABLE) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__) && defined(__AVX512VNNI__) && defined(__F16C__)
#define LH_Q8_VNNI 1
#endif
#if defined(LH_Q8_VNNI) || defined(__F16C__)
#include <immintrin.h>
#endif

enum { Q4_0 = 2, Q5_0 = 6, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };
#define MAX_ROWS LH_Q8_MAX_ROWS

/* The one-row K-quant kernels prefetch as they go, each super-block the bytes K_PREFETCH_BYTES ahead of it
 * (across row ends: rows of a weight are adjacent), instead of lh_q8_weight's burst of a whole row's lines once
 * per row (which, we suppose, stalls on the core's few line-fill buffers). 1 thread, weights read from memory:
 * 4096 ahead gave Q6_K 2048 x 8192 +28% and Q4_K +6-11% over the burst; 2048 less, 8192 the same
 * (bench/PROFILE.md section 14). */
#ifndef K_PREFETCH_BYTES /* -DK_PREFETCH_BYTES=n to try another distance; 0: off (the per-row burst instead) */
#define K_PREFETCH_BYTES 4096
#endif
#define K_PREFETCH(blk, TS) \
    do { \
        if (K_PREFETCH_BYTES) \
            for (int o_ = 0; o_ < (TS); o_ += 64) _mm_prefetch((const char *)(blk) + K_PREFETCH_BYTES + o_, _MM_HINT_T0); \
    } while (0)

static int q8_layout(int type, int *qk, int *tsize) {
    switch (type) {
    case Q4_0: *qk = 32; *tsize = 18; return 0;
    case Q5_0: *qk = 32; *tsize = 22; return 0;
    case Q8_0: *qk = 32; *tsize = 34; return 0;
    case Q4_K: *qk = 256; *tsize = 144; return 0;
    case Q5_K: *qk = 256; *tsize = 176; return 0;
    case Q6_K: *qk = 256; *tsize = 210; return 0;
    default: return -1;
    }
}

/* ---- quantized activations: the rows of X as int8 codes (the layout is in ggml_q8.h) --------------------- */

int lh_q8_flavour(int type) { return type == Q4_K || type == Q5_K || type == Q6_K ? FLAVOUR_K : FLAVOUR_Q8_0; }

int lh_q8_alloc(qact *a, int64_t K, int64_t M) {
    const int64_t nb = K / 32, nbp = (nb + 15) / 16 * 16;
    const size_t per_row = (size_t)nbp * 64 + sizeof(float) * (size_t)nbp * 7 + sizeof(int16_t) * (size_t)nbp * 3;
    a->nbp = nbp;
    a->mem = aligned_alloc(64, per_row * (size_t)M * 2);
    if (!a->mem) return -1;
    uint8_t *p = a->mem;
    for (int64_t m = 0; m < 2 * M; m++) {
        qrow *r = &a->rows[m / M][m % M];
        r->q = (int8_t *)p; p += nbp * 32;
        r->d = (float *)p; p += 4 * nbp;
        r->s = (float *)p; p += 4 * nbp;
        r->ds = (float *)p; p += 4 * nbp;
        r->d16 = (float *)p; p += 8 * nbp;
        r->s16 = (float *)p; p += 8 * nbp;
        r->qk4 = (int8_t *)p; p += nbp * 32;
        r->b16 = (int16_t *)p; p += 4 * nbp;
        r->b32 = (int16_t *)p; p += 2 * nbp;
    }
    return 0;
}

/* A float rounded to the nearest float16 (half to even) and back: the Q8_0 scale as llama.cpp stores it. */
static inline float q8_f16_round(float f) {
#ifdef __F16C__
    return _cvtsh_ss(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
#else
    const float a = fabsf(f);
    if (a >= 65520.0f) return copysignf(INFINITY, f);
    int e;
    frexpf(a, &e); /* a = m 2^e, m in [0.5, 1): float16 keeps 11 bits, a step of 2^(e-11), at least 2^-24 */
    const float step = ldexpf(1.0f, e - 11 < -24 ? -24 : e - 11);
    return copysignf(nearbyintf(a / step) * step, f);
#endif
}

/* x (K floats) -> r as Q8_0 blocks, the rounding of `quantize_row_q8_0_ref` (roundf: half away from zero). */
static void quantize_row(const float *x, int64_t K, int64_t nbp, qrow *r) {
    const int64_t nb = K / 32;
    for (int64_t b = 0; b < nbp; b++) {
        int8_t *q = r->q + 32 * b;
        if (b >= nb) {
            memset(q, 0, 32);
            r->d[b] = r->s[b] = r->ds[b] = 0.0f;
            r->d16[2 * b] = r->d16[2 * b + 1] = r->s16[2 * b] = r->s16[2 * b + 1] = 0.0f;
            continue;
        }
        const float *xb = x + 32 * b;
        int s0 = 0, s1 = 0;
#ifdef LH_Q8_VNNI
        const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        /* |v| = floor(|v|) + frac exactly; round up when frac >= 0.5; sign put back */
        const __m512 vid = _mm512_set1_ps(id), half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
        __m512i qi[2];
        for (int h = 0; h < 2; h++) {
            const __m512 v = _mm512_mul_ps(h ? x1 : x0, vid), a = _mm512_abs_ps(v);
            const __m512 f = _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
            const __mmask16 up = _mm512_cmp_ps_mask(_mm512_sub_ps(a, f), half, _CMP_GE_OQ);
            const __m512 rnd = _mm512_mask_add_ps(f, up, f, one);
            const __mmask16 neg = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ);
            qi[h] = _mm512_cvttps_epi32(_mm512_mask_sub_ps(rnd, neg, _mm512_setzero_ps(), rnd));
            _mm_storeu_si128((__m128i *)(q + 16 * h), _mm512_cvtepi32_epi8(qi[h]));
        }
        s0 = _mm512_reduce_add_epi32(qi[0]);
        s1 = _mm512_reduce_add_epi32(qi[1]);
#else
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        for (int j = 0; j < 32; j++) {
            q[j] = (int8_t)roundf(xb[j] * id);
            if (j < 16) s0 += q[j]; else s1 += q[j];
        }
#endif
        const float dh = q8_f16_round(d); /* the codes come from d, the products use its float16 value */
        r->d[b] = dh;
        r->s[b] = (float)(s0 + s1); /* |s| <= 32 * 127: exact in float */
        r->ds[b] = dh * (float)(s0 + s1);
        r->d16[2 * b] = r->d16[2 * b + 1] = dh;
        r->s16[2 * b] = (float)s0;
        r->s16[2 * b + 1] = (float)s1;
    }
}

/* x (K floats, K % 256 == 0) -> r for the K-quants: the codes, per-32 scales and sums of quantize_row (Q8_0
 * blocks, not llama.cpp's Q8_K with one scale per 256; the header says why), plus the kernels' extras: int16 code
 * sums per 16 and per 32, and Q4_K's nibble order of the codes. */
static void quantize_row_k(const float *x, int64_t K, qrow *r) {
    quantize_row(x, K, K / 32, r);
    for (int64_t b = 0; b < K / 256; b++) {
        const int8_t *q = r->q + 256 * b;
        for (int s = 0; s < 16; s++) r->b16[16 * b + s] = (int16_t)r->s16[16 * b + s]; /* |sum| <= 16 * 127 */
        for (int i = 0; i < 8; i++) r->b32[8 * b + i] = (int16_t)r->s[8 * b + i];
        for (int h = 0; h < 2; h++) /* Q4_K's order: a 64-byte load of its codes holds elements 0-31 and 64-95 of
                                     * the half in its low nibbles, 32-63 and 96-127 in its high ones */
            for (int c = 0; c < 4; c++) memcpy(r->qk4 + 256 * b + 128 * h + 32 * c, q + 128 * h + 32 * ((c & 1) * 2 + (c >> 1)), 32);
    }
}

/* six-bit scales and mins of Q4_K/Q5_K (ggml `get_scale_min_k4`) as 8 bytes each, four at a time in u32s:
 * j < 4: sc = q[j] & 63, m = q[j+4] & 63; j >= 4: sc = q[j+4] & 15 | (q[j-4] >> 6) << 4,
 * m = q[j+4] >> 4 | (q[j] >> 6) << 4. */
static inline void q8_scale_min(const uint8_t *q, uint64_t *sc, uint64_t *mn) {
    uint32_t w0, w1, w2;
    memcpy(&w0, q, 4); memcpy(&w1, q + 4, 4); memcpy(&w2, q + 8, 4);
    const uint32_t sc_lo = w0 & 0x3F3F3F3Fu, m_lo = w1 & 0x3F3F3F3Fu;
    const uint32_t sc_hi = (w2 & 0x0F0F0F0Fu) | (((w0 >> 6) & 0x03030303u) << 4);
    const uint32_t m_hi = ((w2 >> 4) & 0x0F0F0F0Fu) | (((w1 >> 6) & 0x03030303u) << 4);
    *sc = (uint64_t)sc_lo | (uint64_t)sc_hi << 32;
    *mn = (uint64_t)m_lo | (uint64_t)m_hi << 32;
}

#ifdef LH_Q8_VNNI
/* ---- AVX-512 VNNI kernels ----------------------------------------------------------------------------------
 * Each takes one weight row and M activation rows (always inlined: M == 1 becomes its own copy with the
 * accumulators in registers) and writes y[m * ldy]. */
#define INLINE static inline __attribute__((always_inline))

INLINE float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
INLINE float hsum8(__m256 v) { return hsum(_mm512_zextps256_ps512(v)); }

/* Blocks A (at blk) and B (the next; zero when !hasb) of a Q4_0/Q5_0/Q8_0 pair as 64 weight codes in element
 * order: unsigned codes, or for Q8_0 |w| with the sign mask of w in *negp. */
INLINE __m512i unpack_pair(const int T, const uint8_t *blk, int hasb, __mmask64 *negp) {
    const int TS = T == Q4_0 ? 18 : T == Q5_0 ? 22 : 34;
    const __m512i nib = _mm512_set1_epi8(0x0F), sixteen = _mm512_set1_epi8(16);
    __m512i w;
    __mmask64 neg = 0;
    if (T == Q8_0) {
        const __m256i a = _mm256_loadu_si256((const __m256i *)(blk + 2));
        const __m256i b = hasb ? _mm256_loadu_si256((const __m256i *)(blk + TS + 2)) : _mm256_setzero_si256();
        w = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
        neg = _mm512_movepi8_mask(w);
        w = _mm512_abs_epi8(w); /* -128 -> 0x80, which is 128 read as u8 */
    } else {
        const int qo = T == Q5_0 ? 6 : 2;
        /* 128-bit lanes [A, A, B, B]; lanes 1 and 3 shifted to the high nibbles: A's elements 0-15, 16-31,
         * then B's, the activation order */
        const __m256i a = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(blk + qo)));
        const __m256i b = hasb ? _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(blk + TS + qo)))
                               : _mm256_setzero_si256();
        w = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
        w = _mm512_and_si512(_mm512_mask_srli_epi16(w, 0xFF00FF00u, w, 4), nib);
        if (T == Q5_0) { /* bit j of qh is the fifth bit of element j */
            uint32_t ha, hb = 0;
            memcpy(&ha, blk + 2, 4);
            if (hasb) memcpy(&hb, blk + TS + 2, 4);
            w = _mm512_mask_add_epi8(w, (__mmask64)ha | (__mmask64)hb << 32, w, sixteen);
        }
    }
    *negp = neg;
    return w;
}

/* Q4_0 / Q5_0 / Q8_0, several activation rows: blocks 16 at a time (their 16 float16 scales fetched by one gather), two blocks per zmm.
 * Lane k of a dot holds 4 products of block 2p + k/8; its scale is lane 2p + k/8 of the 16-block scale vector. */
INLINE void row_32(const int T, const uint8_t *row, int64_t nb, const qrow *x, const int64_t M, float *y,
                   int64_t ldy) {
    const int TS = T == Q4_0 ? 18 : T == Q5_0 ? 22 : 34;
    const __m512i gidx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(TS));
    const __m512i pair0 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1), two = _mm512_set1_epi32(2);
    __m512 acc[MAX_ROWS], off[MAX_ROWS], S[MAX_ROWS];
    for (int64_t m = 0; m < M; m++) acc[m] = off[m] = _mm512_setzero_ps();
    for (int64_t b0 = 0; b0 < nb; b0 += 16) {
        const int g = nb - b0 < 16 ? (int)(nb - b0) : 16;
        const __mmask16 gm = (__mmask16)(g == 16 ? 0xFFFF : (1u << g) - 1);
        const uint8_t *blk = row + b0 * TS;
        /* 4 bytes at each block start: the float16 d in the low half */
        const __m512i raw = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), gm, gidx, blk, 1);
        const __m512 dw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(raw));
        for (int64_t m = 0; m < M; m++) {
            S[m] = _mm512_mul_ps(dw, _mm512_loadu_ps(x[m].d + b0));
            if (T != Q8_0) off[m] = _mm512_fmadd_ps(S[m], _mm512_loadu_ps(x[m].s + b0), off[m]);
        }
        __m512i idx = pair0;
        for (int p = 0; p < g; p += 2, blk += 2 * TS, idx = _mm512_add_epi32(idx, two)) {
            const int hasb = p + 1 < g;
            __mmask64 neg = 0;
            const __m512i w = unpack_pair(T, blk, hasb, &neg);
            for (int64_t m = 0; m < M; m++) {
                __m512i xq = _mm512_loadu_si512((const void *)(x[m].q + (b0 + p) * 32));
                if (T == Q8_0) xq = _mm512_mask_sub_epi8(xq, neg, _mm512_setzero_si512(), xq);
                const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xq);
                acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(idx, S[m]), acc[m]);
            }
        }
    }
    const float c = T == Q4_0 ? 8.0f : T == Q5_0 ? 16.0f : 0.0f;
    for (int64_t m = 0; m < M; m++) y[m * ldy] = hsum(acc[m]) - c * hsum(off[m]);
}

/* Q4_K / Q5_K: per super-block of 256, four chunks of 64 codes ([low nibbles | high nibbles] of 32 bytes), lanes
 * 0-7 of a chunk's dot in sub-block 2c and 8-15 in 2c+1. The 16-float vector per super-block holds the 8
 * dot scales d*sc*dx (lanes 0-7) and the 8 min terms dmin*m*dx*sum(q) (lanes 8-15). */
INLINE void row_k45(const int T, const uint8_t *row, int64_t nsb, const qrow *x, const int64_t M, float *y,
                    int64_t ldy) {
    const int TS = T == Q4_K ? 144 : 176, qo = T == Q4_K ? 16 : 48;
    const __m512i nib = _mm512_set1_epi8(0x0F), sixteen = _mm512_set1_epi8(16);
    __m512i cidx[4], hbit[4];
    for (int c = 0; c < 4; c++) {
        cidx[c] = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(2 * c), _mm512_set1_epi32(2 * c + 1));
        hbit[c] = _mm512_mask_blend_epi64(0xF0, _mm512_set1_epi8((char)(1 << (2 * c))), _mm512_set1_epi8((char)(1 << (2 * c + 1))));
    }
    __m512 acc[MAX_ROWS], off[MAX_ROWS];
    for (int64_t m = 0; m < M; m++) acc[m] = off[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nsb; b++) {
        const uint8_t *blk = row + b * TS;
        uint64_t sc, mn;
        q8_scale_min(blk + 4, &sc, &mn);
        const __m512 scm = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_set_epi64x((long long)mn, (long long)sc)));
        const __m512 dd = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(lh_h2f(blk)), _mm512_set1_ps(lh_h2f(blk + 2)));
        const __m512 wsc = _mm512_mul_ps(scm, dd);
        __m512 S[MAX_ROWS];
        for (int64_t m = 0; m < M; m++) {
            const __m512 xs = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(x[m].d + 8 * b)),
                                                 _mm256_loadu_ps(x[m].ds + 8 * b), 1);
            S[m] = _mm512_mul_ps(wsc, xs);
            off[m] = _mm512_mask_add_ps(off[m], 0xFF00, off[m], S[m]);
        }
        __m512i H = _mm512_setzero_si512();
        if (T == Q5_K) H = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(blk + 16)));
        for (int c = 0; c < 4; c++) {
            __m512i w = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(blk + qo + 32 * c)));
            w = _mm512_and_si512(_mm512_mask_srli_epi16(w, 0xFFFF0000u, w, 4), nib);
            if (T == Q5_K) w = _mm512_mask_add_epi8(w, _mm512_test_epi8_mask(H, hbit[c]), w, sixteen);
            for (int64_t m = 0; m < M; m++) {
                const __m512i xq = _mm512_loadu_si512((const void *)(x[m].q + 256 * b + 64 * c));
                const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xq);
                acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(cidx[c], S[m]), acc[m]);
            }
        }
    }
    for (int64_t m = 0; m < M; m++) y[m * ldy] = hsum(acc[m]) - hsum(off[m]);
}

/* Q6_K: per half of 128, two zmm of 64 six-bit codes (elements in order); lane k of vector v (0-3) covers
 * sub-block 4v + k/4 of 16 elements, whose scale is d * sc * dx16. */
INLINE void row_q6k(const uint8_t *row, int64_t nsb, const qrow *x, const int64_t M, float *y, int64_t ldy) {
    const __m512i nib = _mm512_set1_epi8(0x0F), top = _mm512_set1_epi8(0x30);
    __m512i vidx[4];
    for (int v = 0; v < 4; v++)
        vidx[v] = _mm512_setr_epi32(4 * v, 4 * v, 4 * v, 4 * v, 4 * v + 1, 4 * v + 1, 4 * v + 1, 4 * v + 1, 4 * v + 2,
                                    4 * v + 2, 4 * v + 2, 4 * v + 2, 4 * v + 3, 4 * v + 3, 4 * v + 3, 4 * v + 3);
    __m512 acc[MAX_ROWS], off[MAX_ROWS];
    for (int64_t m = 0; m < M; m++) acc[m] = off[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nsb; b++) {
        const uint8_t *blk = row + b * 210;
        const __m512 wsc = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 192)))),
                                         _mm512_set1_ps(lh_h2f(blk + 208)));
        __m512 S[MAX_ROWS];
        for (int64_t m = 0; m < M; m++) {
            S[m] = _mm512_mul_ps(wsc, _mm512_loadu_ps(x[m].d16 + 16 * b));
            off[m] = _mm512_fmadd_ps(S[m], _mm512_loadu_ps(x[m].s16 + 16 * b), off[m]);
        }
        for (int h = 0; h < 2; h++) {
            const __m512i L = _mm512_loadu_si512((const void *)(blk + 64 * h));
            const __m512i H = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h)));
            /* high bits to bits 4-5: [qh << 4 | qh << 2] for elements 0-63, [qh | qh >> 2] for 64-127 of the half
             * (16-bit shifts: bits crossing into the neighbour byte are masked off by 0x30) */
            const __m512i h0 = _mm512_and_si512(_mm512_mask_slli_epi16(_mm512_slli_epi16(H, 2), 0x0000FFFFu, H, 4), top);
            const __m512i h1 = _mm512_and_si512(_mm512_mask_srli_epi16(H, 0xFFFF0000u, H, 2), top);
            /* ternary logic 0xEC: (a & c) | b */
            const __m512i w0 = _mm512_ternarylogic_epi32(L, h0, nib, 0xEC);
            const __m512i w1 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(L, 4), h1, nib, 0xEC);
            for (int64_t m = 0; m < M; m++) {
                const int8_t *xq = x[m].q + 256 * b + 128 * h;
                const __m512i d0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w0, _mm512_loadu_si512((const void *)xq));
                const __m512i d1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w1, _mm512_loadu_si512((const void *)(xq + 64)));
                acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_permutexvar_ps(vidx[2 * h], S[m]), acc[m]);
                acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), _mm512_permutexvar_ps(vidx[2 * h + 1], S[m]), acc[m]);
            }
        }
    }
    for (int64_t m = 0; m < M; m++) y[m * ldy] = hsum(acc[m]) - 32.0f * hsum(off[m]);
}

/* One activation row (M == 1, decode): the 8 pair dots of a 16-block group are summed into one lane per block by
 * a tree of lane-pair additions (two `vpermt2d` and an add per level: lanes 2i and 2i+1 of two vectors), so the
 * group needs one int->float conversion and one FMA with its 16 scales instead of one per pair (A/B, 1 thread:
 * +8-10% on rows of 8192, unchanged on rows of 640; bench/PROFILE.md section 8). */
INLINE __m512i pairsum(__m512i a, __m512i b, __m512i ev, __m512i od) {
    return _mm512_add_epi32(_mm512_permutex2var_epi32(a, ev, b), _mm512_permutex2var_epi32(a, od, b));
}

INLINE void row_32_one(const int T, const uint8_t *row, int64_t nb, const qrow *x, float *y) {
    const int TS = T == Q4_0 ? 18 : T == Q5_0 ? 22 : 34;
    const __m512i gidx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(TS));
    const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i od = _mm512_add_epi32(ev, _mm512_set1_epi32(1));
    __m512 acc = _mm512_setzero_ps(), off = _mm512_setzero_ps();
    for (int64_t b0 = 0; b0 < nb; b0 += 16) {
        const int g = nb - b0 < 16 ? (int)(nb - b0) : 16;
        const __mmask16 gm = (__mmask16)(g == 16 ? 0xFFFF : (1u << g) - 1);
        const uint8_t *blk = row + b0 * TS;
        const __m512i raw = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), gm, gidx, blk, 1);
        const __m512 S = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_cvtepi32_epi16(raw)), _mm512_loadu_ps(x->d + b0));
        if (T != Q8_0) off = _mm512_fmadd_ps(S, _mm512_loadu_ps(x->s + b0), off);
        if (g < 16) { /* a row's last, partial group: each pair's 16 lanes scaled on their own */
            __m512i idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
            for (int p = 0; p < g; p += 2, idx = _mm512_add_epi32(idx, _mm512_set1_epi32(2))) {
                __mmask64 neg = 0;
                const __m512i w = unpack_pair(T, blk + p * TS, p + 1 < g, &neg);
                __m512i xq = _mm512_loadu_si512((const void *)(x->q + (b0 + p) * 32));
                if (T == Q8_0) xq = _mm512_mask_sub_epi8(xq, neg, _mm512_setzero_si512(), xq);
                const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xq);
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(idx, S), acc);
            }
            continue;
        }
        __m512i dot[8];
        for (int p = 0; p < 8; p++) {
            __mmask64 neg = 0;
            const __m512i w = unpack_pair(T, blk + 2 * p * TS, 1, &neg);
            __m512i xq = _mm512_loadu_si512((const void *)(x->q + (b0 + 2 * p) * 32));
            if (T == Q8_0) xq = _mm512_mask_sub_epi8(xq, neg, _mm512_setzero_si512(), xq);
            dot[p] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xq);
        }
        const __m512i l0 = pairsum(dot[0], dot[1], ev, od), l1 = pairsum(dot[2], dot[3], ev, od);
        const __m512i l2 = pairsum(dot[4], dot[5], ev, od), l3 = pairsum(dot[6], dot[7], ev, od);
        const __m512i sums = pairsum(pairsum(l0, l1, ev, od), pairsum(l2, l3, ev, od), ev, od);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), S, acc);
    }
    const float c = T == Q4_0 ? 8.0f : T == Q5_0 ? 16.0f : 0.0f;
    *y = hsum(acc) - c * hsum(off);
}

/* Bytes shifted by per-byte bit offsets: with AVX-512 VBMI one `vpmultishiftqb` (8 bits from bit ctrl[j] of byte j's
 * qword, rotating; the callers mask what they keep), which runs on the shuffle port while the integer shifts
 * compete with the multiplies; without VBMI the plain shifts `alt`. */
#ifdef __AVX512VBMI__
#define SHIFT_BYTES(ctrl, v, alt) _mm512_multishift_epi64_epi8((ctrl), (v))
#else
#define SHIFT_BYTES(ctrl, v, alt) (alt)
#endif

/* One activation row of the K-quants (decode), after llama.cpp's `ggml_vec_dot_q4_K_q8_K` / `_q6_K_q8_K`:
 * `vpmaddubsw` multiplies 64 weight codes by their activation codes into 32 int16 pair sums (no saturation:
 * |pair| <= 2 * 63 * 127), `vpdpwssd` multiplies those by the sub-block scales (int16 words, one `vpermw` per 64
 * codes) into int32 lanes, each lane within one block of 32 activations; one conversion and one FMA by the
 * lanes' d * dx (a `vpermps` of the super-block's 8 activation scales) per 64 codes. Q4_K/Q5_K use the
 * activation codes in their nibble order (`qk4`), so one 64-byte load serves four sub-blocks; their mins are one
 * `vpmaddwd` of the 8 mins by the per-32 code sums, scaled by dmin * dx. (With llama.cpp's one activation scale
 * per 256 the whole super-block would sum in int32 and scale once: bench/PROFILE.md sections 14 and 15.) */
INLINE void row_k45_one(const int T, const uint8_t *row, int64_t nsb, const qrow *x, float *y) {
    const int TS = T == Q4_K ? 144 : 176, qo = T == Q4_K ? 16 : 48;
    const __m512i nib = _mm512_set1_epi8(0x0F), sixteen = _mm512_set1_epi8(16);
    /* the scale words of the four dots (per 64-byte load: low nibbles, high nibbles): sub-blocks (0, 2), (1, 3),
     * (4, 6), (5, 7), 16 words each */
    __m512i sidx[4], hbit[4], fidx[4];
    for (int v = 0; v < 4; v++) {
        const int a = 4 * (v >> 1) + (v & 1);
        sidx[v] = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi16((short)a), _mm512_set1_epi16((short)(a + 2)));
        fidx[v] = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(a), _mm512_set1_epi32(a + 2)); /* its dx lanes */
        /* Q5_K: bit 2c (low nibbles of chunk c) / 2c+1 (high) of qh[l] is the fifth bit */
        hbit[v] = _mm512_mask_blend_epi64(0xF0, _mm512_set1_epi8((char)(1 << a)), _mm512_set1_epi8((char)(1 << (a + 2))));
    }
    __m512 acc = _mm512_setzero_ps();
    __m256 macc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nsb; b++) {
        const uint8_t *blk = row + b * TS;
        K_PREFETCH(blk, TS);
        uint64_t sc, mn;
        q8_scale_min(blk + 4, &sc, &mn);
        const __m512i sc16 = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)sc)));
        /* per sub-block: min x code sum (vpmaddwd of a zero-extended byte by a sign-extended word: one product) */
        const __m256i msum = _mm256_madd_epi16(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)mn)),
                                               _mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i *)(x->b32 + 8 * b))));
        int32_t d2;
        memcpy(&d2, blk, 4);
        const __m128 dw = _mm_cvtph_ps(_mm_cvtsi32_si128(d2)); /* [d, dmin] */
        const __m256 dx = _mm256_loadu_ps(x->d + 8 * b);       /* the 8 sub-blocks' activation scales */
        const __m512 sd = _mm512_castps256_ps512(_mm256_mul_ps(dx, _mm256_broadcastss_ps(dw)));
        macc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(msum), _mm256_mul_ps(dx, _mm256_set1_ps(_mm_cvtss_f32(_mm_movehdup_ps(dw)))), macc);
        __m512i H = _mm512_setzero_si512();
        if (T == Q5_K) H = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(blk + 16)));
        const int8_t *xq = x->qk4 + 256 * b;
        for (int h = 0; h < 2; h++) {
            const __m512i q = _mm512_loadu_si512((const void *)(blk + qo + 64 * h));
            __m512i lo = _mm512_and_si512(q, nib), hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), nib);
            if (T == Q5_K) {
                lo = _mm512_mask_add_epi8(lo, _mm512_test_epi8_mask(H, hbit[2 * h]), lo, sixteen);
                hi = _mm512_mask_add_epi8(hi, _mm512_test_epi8_mask(H, hbit[2 * h + 1]), hi, sixteen);
            }
            const __m512i plo = _mm512_maddubs_epi16(lo, _mm512_loadu_si512((const void *)(xq + 128 * h)));
            const __m512i phi = _mm512_maddubs_epi16(hi, _mm512_loadu_si512((const void *)(xq + 128 * h + 64)));
            const __m512i ilo = _mm512_dpwssd_epi32(_mm512_setzero_si512(), plo, _mm512_permutexvar_epi16(sidx[2 * h], sc16));
            const __m512i ihi = _mm512_dpwssd_epi32(_mm512_setzero_si512(), phi, _mm512_permutexvar_epi16(sidx[2 * h + 1], sc16));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ilo), _mm512_permutexvar_ps(fidx[2 * h], sd), acc);
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ihi), _mm512_permutexvar_ps(fidx[2 * h + 1], sd), acc);
        }
    }
    *y = hsum(acc) - hsum8(macc);
}

INLINE void row_q6k_one(const uint8_t *row, int64_t nsb, const qrow *x, float *y) {
    const __m512i nib = _mm512_set1_epi8(0x0F), top = _mm512_set1_epi8(0x30);
    /* dot v (64 codes, 32 pair words) covers sub-blocks 4v..4v+3, 8 words each: lanes 0-7 the activation block
     * 2v, 8-15 block 2v + 1 */
    __m512i sidx[4], fidx[4];
    for (int v = 0; v < 4; v++) {
        short w[32];
        for (int i = 0; i < 32; i++) w[i] = (short)(4 * v + i / 8);
        sidx[v] = _mm512_loadu_si512((const void *)w);
        fidx[v] = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(2 * v), _mm512_set1_epi32(2 * v + 1));
    }
    /* bit offsets for SHIFT_BYTES, byte j at bit 8k of its qword (k = j % 8): qh bits 0-1 (bytes 0-31) / 2-3
     * (32-63) to bits 4-5; bits 4-5 / 6-7 to 4-5; a byte's high nibble to its low one */
    __m512i ms[3];
    {
        uint8_t c[3][64];
        for (int j = 0; j < 64; j++) {
            const int k = 8 * (j % 8), up = j >= 32;
            c[0][j] = (uint8_t)((k + (up ? -2 : -4)) & 63);
            c[1][j] = (uint8_t)(k + (up ? 2 : 0));
            c[2][j] = (uint8_t)(k + 4);
        }
        for (int i = 0; i < 3; i++) ms[i] = _mm512_loadu_si512((const void *)c[i]);
    }
    (void)ms;
    __m512 acc = _mm512_setzero_ps();
    __m256 oacc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nsb; b++) {
        const uint8_t *blk = row + b * 210;
        K_PREFETCH(blk, 210);
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 192)));
        /* the code offset 32 as 32 * sum(sc * code sum per 16): lane i the activation block i */
        const __m256i off = _mm256_madd_epi16(sc16, _mm256_loadu_si256((const __m256i *)(x->b16 + 16 * b)));
        const __m256 dx = _mm256_mul_ps(_mm256_loadu_ps(x->d + 8 * b), _mm256_set1_ps(lh_h2f(blk + 208)));
        const __m512 sd = _mm512_castps256_ps512(dx);
        oacc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(off), dx, oacc);
        const __m512i scw = _mm512_castsi256_si512(sc16);
        const int8_t *xq = x->q + 256 * b;
        for (int h = 0; h < 2; h++) {
            const __m512i L = _mm512_loadu_si512((const void *)(blk + 64 * h));
            const __m512i H = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h)));
            /* as row_q6k: the two high bits to bits 4-5, then (a & c) | b */
            const __m512i h0 = _mm512_and_si512(SHIFT_BYTES(ms[0], H, _mm512_mask_slli_epi16(_mm512_slli_epi16(H, 2), 0x0000FFFFu, H, 4)), top);
            const __m512i h1 = _mm512_and_si512(SHIFT_BYTES(ms[1], H, _mm512_mask_srli_epi16(H, 0xFFFF0000u, H, 2)), top);
            const __m512i w0 = _mm512_ternarylogic_epi32(L, h0, nib, 0xEC);
            const __m512i w1 = _mm512_ternarylogic_epi32(SHIFT_BYTES(ms[2], L, _mm512_srli_epi16(L, 4)), h1, nib, 0xEC);
            const __m512i p0 = _mm512_maddubs_epi16(w0, _mm512_loadu_si512((const void *)(xq + 128 * h)));
            const __m512i p1 = _mm512_maddubs_epi16(w1, _mm512_loadu_si512((const void *)(xq + 128 * h + 64)));
            const __m512i i0 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), p0, _mm512_permutexvar_epi16(sidx[2 * h], scw));
            const __m512i i1 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), p1, _mm512_permutexvar_epi16(sidx[2 * h + 1], scw));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), _mm512_permutexvar_ps(fidx[2 * h], sd), acc);
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1), _mm512_permutexvar_ps(fidx[2 * h + 1], sd), acc);
        }
    }
    *y = hsum(acc) - 32.0f * hsum8(oacc);
}

/* Several rows go through the kernels four at a time, each group size (4, 3, 2, 1) a copy of the kernel with M
 * a constant: its accumulators then live in registers. With M a run-time value up to 16 they were arrays in
 * memory, reloaded and stored at every block (the vocabulary projection of 16 rows took 7x one row's time).
 * Each row's sums are formed in the same order as before: the same results. */
static void q8_row(int type, const uint8_t *row, int64_t K, const qrow *x, int64_t M, float *y, int64_t ldy) {
#define Q8_GROUPS(CALL)                                                                                        \
    for (int64_t m0 = 0; m0 < M; m0 += 4) {                                                                 \
        const int64_t r = M - m0;                                                                             \
        const qrow *xg = x + m0;                                                                              \
        float *yg = y + m0 * ldy;                                                                             \
        if (r >= 4) CALL(4); else if (r == 3) CALL(3); else if (r == 2) CALL(2); else CALL(1);                \
    }                                                                                                         \
    return
#define R32_M(n) row_32(T_, row, K / 32, xg, n, yg, ldy)
#define RK45_M(n) row_k45(T_, row, K / 256, xg, n, yg, ldy)
#define RQ6_M(n) row_q6k(row, K / 256, xg, n, yg, ldy)
    switch (type) {
    case Q4_0: { const int T_ = Q4_0; if (M == 1) { row_32_one(T_, row, K / 32, x, y); return; } Q8_GROUPS(R32_M); }
    case Q5_0: { const int T_ = Q5_0; if (M == 1) { row_32_one(T_, row, K / 32, x, y); return; } Q8_GROUPS(R32_M); }
    case Q8_0: { const int T_ = Q8_0; if (M == 1) { row_32_one(T_, row, K / 32, x, y); return; } Q8_GROUPS(R32_M); }
    case Q4_K: { const int T_ = Q4_K; if (M == 1) { row_k45_one(T_, row, K / 256, x, y); return; } Q8_GROUPS(RK45_M); }
    case Q5_K: { const int T_ = Q5_K; if (M == 1) { row_k45_one(T_, row, K / 256, x, y); return; } Q8_GROUPS(RK45_M); }
    case Q6_K: if (M == 1) { row_q6k_one(row, K / 256, x, y); return; } Q8_GROUPS(RQ6_M);
    }
#undef R32_M
#undef RK45_M
#undef RQ6_M
#undef Q8_GROUPS
}

#else /* ---- portable C: the same arithmetic, one sub-block of 16 at a time -------------------------------- */

/* One super-block of weights as unsigned codes and, per 16 elements, a scale and a min: w = scale*code - min. */
static void q8_codes(int type, const uint8_t *b, uint8_t *code, float *wsc, float *wmin) {
    switch (type) {
    case Q4_0: case Q5_0: {
        const float d = lh_h2f(b);
        const int five = type == Q5_0;
        uint32_t qh = 0;
        if (five) memcpy(&qh, b + 2, 4);
        const uint8_t *qs = b + (five ? 6 : 2);
        for (int j = 0; j < 16; j++) {
            code[j] = (uint8_t)((qs[j] & 15) | ((qh >> j) & 1) << 4);
            code[j + 16] = (uint8_t)((qs[j] >> 4) | ((qh >> (j + 16)) & 1) << 4);
        }
        wsc[0] = wsc[1] = d;
        wmin[0] = wmin[1] = d * (five ? 16.0f : 8.0f);
        return;
    }
    case Q8_0: /* codes kept signed: the caller reads them as int8 */
        memcpy(code, b + 2, 32);
        wsc[0] = wsc[1] = lh_h2f(b);
        wmin[0] = wmin[1] = 0.0f;
        return;
    case Q4_K: case Q5_K: {
        const float d = lh_h2f(b), dmin = lh_h2f(b + 2);
        uint64_t sc, mn;
        q8_scale_min(b + 4, &sc, &mn);
        const int five = type == Q5_K;
        const uint8_t *qh = b + 16, *qs = b + (five ? 48 : 16);
        for (int c = 0; c < 4; c++) {
            for (int l = 0; l < 32; l++) {
                code[64 * c + l] = (uint8_t)((qs[32 * c + l] & 15) | (five ? ((qh[l] >> (2 * c)) & 1) << 4 : 0));
                code[64 * c + 32 + l] = (uint8_t)((qs[32 * c + l] >> 4) | (five ? ((qh[l] >> (2 * c + 1)) & 1) << 4 : 0));
            }
        }
        for (int j = 0; j < 8; j++) {
            wsc[2 * j] = wsc[2 * j + 1] = d * (float)((sc >> (8 * j)) & 0xFF);
            wmin[2 * j] = wmin[2 * j + 1] = dmin * (float)((mn >> (8 * j)) & 0xFF);
        }
        return;
    }
    case Q6_K: {
        const float d = lh_h2f(b + 208);
        const int8_t *sc = (const int8_t *)(b + 192);
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = b + 64 * h, *qh = b + 128 + 32 * h;
            uint8_t *c = code + 128 * h;
            for (int l = 0; l < 32; l++) {
                c[l] = (uint8_t)((ql[l] & 15) | (qh[l] & 3) << 4);
                c[l + 32] = (uint8_t)((ql[l + 32] & 15) | ((qh[l] >> 2) & 3) << 4);
                c[l + 64] = (uint8_t)((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4);
                c[l + 96] = (uint8_t)((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4);
            }
        }
        for (int s = 0; s < 16; s++) {
            wsc[s] = d * (float)sc[s];
            wmin[s] = 32.0f * wsc[s];
        }
        return;
    }
    }
}

static void q8_row(int type, const uint8_t *row, int64_t K, const qrow *x, int64_t M, float *y, int64_t ldy) {
    int qk = 32, ts = 0;
    if (q8_layout(type, &qk, &ts)) return;
    uint8_t code[256];
    float wsc[16], wmin[16];
    for (int64_t m = 0; m < M; m++) y[m * ldy] = 0.0f;
    for (int64_t b = 0; b < K / qk; b++) {
        q8_codes(type, row + b * ts, code, wsc, wmin);
        for (int64_t m = 0; m < M; m++) {
            float acc = 0.0f;
            for (int s = 0; s < qk / 16; s++) {
                const int64_t e = b * qk + 16 * s; /* element index of this sub-block */
                const int8_t *xq = x[m].q + e;
                int32_t dot = 0;
                for (int j = 0; j < 16; j++)
                    dot += (type == Q8_0 ? (int32_t)(int8_t)code[16 * s + j] : (int32_t)code[16 * s + j]) * xq[j];
                const float dx = x[m].d16[e / 16];
                acc += wsc[s] * dx * (float)dot - wmin[s] * dx * x[m].s16[e / 16];
            }
            y[m * ldy] += acc;
        }
    }
}
#endif

/* ---- exported ---------------------------------------------------------------------------------------------- */

int lh_q8_supported(int type) { int qk, ts; return q8_layout(type, &qk, &ts) == 0; }

/* Whether the VNNI kernels were compiled in (else the portable C ones). */
int lh_q8_vnni(void) {
#ifdef LH_Q8_VNNI
    return 1;
#else
    return 0;
#endif
}

/* The activation quantization on its own (tests), for weights of `type`: q (M, K) int8, and per 32 elements
 * the scale d (M, K/32) float32, per 16 the code sums s16 (M, K/16). */
int lh_q8_quantize(int type, const float *X, int64_t M, int64_t K, int8_t *q, float *d, float *s16) {
    const int fl = lh_q8_flavour(type);
    if (K % (fl == FLAVOUR_K ? 256 : 32) || M < 1 || !lh_q8_supported(type)) return -1;
    qact a;
    if (lh_q8_alloc(&a, K, 1)) return -1;
    qrow *r = &a.rows[0][0];
    for (int64_t m = 0; m < M; m++) {
        if (fl == FLAVOUR_K) quantize_row_k(X + m * K, K, r);
        else quantize_row(X + m * K, K, a.nbp, r);
        memcpy(q + m * K, r->q, (size_t)K);
        memcpy(d + m * (K / 32), r->d, sizeof(float) * (size_t)(K / 32));
        memcpy(s16 + m * (K / 16), r->s16, sizeof(float) * (size_t)(K / 16));
    }
    free(a.mem);
    return 0;
}

/* Both flavours' rows as one worksharing loop (inside the caller's region): those the weights' types need. */
void lh_q8_quantize_in_region(qact *a, const float *X, int64_t K, int64_t M, const int need[2]) {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < 2 * M; i++) {
        const int fl = (int)(i / M);
        const int64_t m = i % M;
        if (!need[fl]) continue;
        if (fl == FLAVOUR_K) quantize_row_k(X + m * K, K, &a->rows[fl][m]);
        else quantize_row(X + m * K, K, a->nbp, &a->rows[fl][m]);
    }
}

/* Software prefetch distance: the row ~8 KiB ahead is requested while this one is multiplied. Measured with
 * weights too large for the cache (bench/PROFILE.md section 8): +10% for Q8_0 and the K-quants, whose
 * kernels wait on memory, but -10% for Q4_0/Q5_0, whose unpacking keeps the core busier. */
#ifndef PREFETCH_BYTES /* -DPREFETCH_BYTES=n to try another distance (bench/kernels.py --ab . --new-cflags=...) */
#define PREFETCH_BYTES 8192
#endif

/* Rows of one weight against the quantized X, inside the caller's parallel region (an orphaned omp for). */
void lh_q8_weight(int type, const uint8_t *W, int64_t N, int64_t stride, int64_t K, const qact *a, int64_t M,
                      float *Y) {
    int qk = 32, ts = 0;
    q8_layout(type, &qk, &ts);
    const int64_t row_bytes = K / qk * ts, ahead = stride > 0 ? (PREFETCH_BYTES + stride - 1) / stride : N;
    const int one_row_k = M == 1 && (type == Q4_K || type == Q5_K || type == Q6_K) && K_PREFETCH_BYTES;
    const int prefetch = type != Q4_0 && type != Q5_0 && !one_row_k; /* those prefetch in the kernel */
#pragma omp for schedule(static) nowait
    for (int64_t n = 0; n < N; n++) {
#ifdef LH_Q8_VNNI
        if (prefetch && n + ahead < N)
            for (int64_t o = 0; o < row_bytes; o += 64) _mm_prefetch((const char *)(W + (n + ahead) * stride + o), _MM_HINT_T0);
#else
        (void)prefetch; (void)row_bytes; (void)ahead;
#endif
        q8_row(type, W + n * stride, K, a->rows[lh_q8_flavour(type)], M, Y + n, N);
    }
}

static int q8_check(int nseg, const int *types, int64_t K, int64_t M) {
    if (M > MAX_ROWS || M < 1 || nseg < 1) return -1;
    for (int s = 0; s < nseg; s++) {
        int qk, ts;
        if (q8_layout(types[s], &qk, &ts) || K % qk) return -1;
    }
    return 0;
}

/* Y (M, N) = X (M, K) . W (N, K)^T, X quantized to int8 blocks once; arguments as ggml.c's lh_gemv. */
int lh_q8_gemv(int type, const uint8_t *W, int64_t N, int64_t stride, int64_t K, const float *X, int64_t M,
               float *Y, int nthreads) {
    if (q8_check(1, &type, K, M)) return -1;
    qact a;
    if (lh_q8_alloc(&a, K, M)) return -1;
    int need[2] = {0, 0};
    need[lh_q8_flavour(type)] = 1;
#pragma omp parallel num_threads(nthreads)
    {
        lh_q8_quantize_in_region(&a, X, K, M, need);
        lh_q8_weight(type, W, N, stride, K, &a, M, Y);
    }
    free(a.mem);
    return 0;
}

/* Several weights against one X in one parallel region (X quantized once); arguments and the layout of Y as
 * ggml.c's lh_gemv_many: Y_s (M, N[s]) follow each other. */
int lh_q8_gemv_many(int nseg, const int *types, const uint8_t *const *W, const int64_t *N, const int64_t *stride,
                    int64_t K, const float *X, int64_t M, float *Y, int nthreads) {
    if (q8_check(nseg, types, K, M)) return -1;
    qact a;
    if (lh_q8_alloc(&a, K, M)) return -1;
    int need[2] = {0, 0};
    for (int s = 0; s < nseg; s++) need[lh_q8_flavour(types[s])] = 1;
#pragma omp parallel num_threads(nthreads)
    {
        lh_q8_quantize_in_region(&a, X, K, M, need);
        float *ys = Y;
        for (int s = 0; s < nseg; s++) {
            lh_q8_weight(types[s], W[s], N[s], stride[s], K, &a, M, ys);
            ys += M * N[s];
        }
    }
    free(a.mem);
    return 0;
}
