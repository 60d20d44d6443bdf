/* Dense bf16 matrix-vector products for decode: Y (M, N) = X (M, K) . W (N, K)^T, bf16 in, float32 sums.
 *
 * Why: a decode step multiplies one (or a few) activation rows by every weight matrix, so it is bound by how
 * fast the weights stream from memory. torch's bf16 F.linear for one row reaches ~22 GB/s on this CPU against
 * ~57 GB/s of read bandwidth (bench/PROFILE.md section 9). Here each thread walks its own share of weight rows,
 * RB rows at a time, and every X load is shared by those rows; with AVX512_BF16, `vdpbf16ps`
 * (`_mm512_dpbf16_ps`, Intel Intrinsics Guide) multiplies 32 bf16 pairs and adds them pairwise into 16 float32
 * lanes, so the bf16 weights are never widened in memory. The products of two bf16 values are exact in float32
 * (8-bit x 8-bit significands); only the float32 accumulation rounds. The instruction flushes denormal inputs
 * and outputs to zero (Intel SDM, VDPBF16PS), which bf16 weights and activations of a working model never
 * reach.
 *
 * Without AVX512_BF16 the `#else` path widens bf16 to float by a 16-bit shift (bf16 is the top half of an
 * IEEE float32) and accumulates in float32; the compiler vectorises it for whatever -march it has.
 *
 * Results are written as float32 or rounded to bf16 (round to nearest even, as torch's `.bfloat16()`).
 * `lh_bf16_gemv_many` applies several weights to one X inside a single OpenMP region (one fork/join), for
 * projections that share their input (wq/wk/wv, w1/w3); its loop, `lh_bf16_gemv_in_region` (dense.h), runs
 * inside step.c's one-call decode step too. Built by llamaherd/native/__init__.py with
 * -march=native and OpenMP, called through ctypes by llamaherd/native/dense.py.
 */
#include <stdint.h>
#include <string.h>

#include "common.h"
#include "dense.h"
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define LH_BF16_NATIVE 1
#else
#define LH_BF16_NATIVE 0
#endif

#define LH_BF16_RB 4     /* weight rows per inner block: 4 streams per thread, 16 accumulators for 4 X rows */
#define LH_BF16_MB 4     /* X rows per inner block (more X rows re-read the RB weight rows from L1/L2) */

static inline void lh_bf16_store(void *Y, int y_bf16, int64_t i, float v) {
    if (y_bf16) ((uint16_t *)Y)[i] = lh_f2bf(v);
    else ((float *)Y)[i] = v;
}

#if LH_BF16_NATIVE

/* mb X rows times rb weight rows over all K, sums into out[i * rb + r]. Called with constant mb, rb so that the
 * accumulator arrays become registers (always_inline + unrolled constant loops). */
static inline __attribute__((always_inline)) void lh_bf16_tile(const uint16_t *X, int64_t ldx, const int mb,
                                                               const uint16_t *W, int64_t ldw, const int rb,
                                                               int64_t K, float *out) {
    __m512 acc[LH_BF16_MB][LH_BF16_RB];
    for (int i = 0; i < mb; i++)
        for (int r = 0; r < rb; r++) acc[i][r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512bh w[LH_BF16_RB];
        for (int r = 0; r < rb; r++) w[r] = (__m512bh)_mm512_loadu_si512((const void *)(W + r * ldw + k));
        for (int i = 0; i < mb; i++) {
            const __m512bh x = (__m512bh)_mm512_loadu_si512((const void *)(X + i * ldx + k));
            for (int r = 0; r < rb; r++) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], x, w[r]);
        }
    }
    if (k < K) { /* tail: masked loads read only the K - k remaining elements and zero the rest */
        const __mmask32 m = (__mmask32)((1ull << (K - k)) - 1);
        __m512bh w[LH_BF16_RB];
        for (int r = 0; r < rb; r++) w[r] = (__m512bh)_mm512_maskz_loadu_epi16(m, W + r * ldw + k);
        for (int i = 0; i < mb; i++) {
            const __m512bh x = (__m512bh)_mm512_maskz_loadu_epi16(m, X + i * ldx + k);
            for (int r = 0; r < rb; r++) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], x, w[r]);
        }
    }
    for (int i = 0; i < mb; i++)
        for (int r = 0; r < rb; r++) out[i * rb + r] = _mm512_reduce_add_ps(acc[i][r]);
}

#else

static inline __attribute__((always_inline)) void lh_bf16_tile(const uint16_t *X, int64_t ldx, const int mb,
                                                               const uint16_t *W, int64_t ldw, const int rb,
                                                               int64_t K, float *out) {
    /* 16 partial sums per pair, as the vector path's lanes, so the compiler can vectorise the K loop */
    for (int i = 0; i < mb; i++)
        for (int r = 0; r < rb; r++) {
            const uint16_t *x = X + i * ldx, *w = W + r * ldw;
            float part[16] = {0};
            int64_t k = 0;
            for (; k + 16 <= K; k += 16)
                for (int l = 0; l < 16; l++) part[l] += lh_bf2f(x[k + l]) * lh_bf2f(w[k + l]);
            float s = 0.0f;
            for (; k < K; k++) s += lh_bf2f(x[k]) * lh_bf2f(w[k]);
            for (int l = 0; l < 16; l++) s += part[l];
            out[i * rb + r] = s;
        }
}

#endif

/* mb (1..MB) X rows against rb weight rows starting at row n, results into Y[i][n + r]. */
static inline __attribute__((always_inline)) void lh_bf16_rows(const uint16_t *X, int64_t ldx, int mb,
                                                               const uint16_t *W, int64_t ldw, int rb, int64_t K,
                                                               void *Y, int64_t ldy, int y_bf16, int64_t n) {
    float s[LH_BF16_MB * LH_BF16_RB];
    const uint16_t *w = W + n * ldw;
    /* constant (mb, rb) at each call site: the compiler specialises the tile for each case */
    if (rb == LH_BF16_RB) {
        switch (mb) {
        case 1: lh_bf16_tile(X, ldx, 1, w, ldw, LH_BF16_RB, K, s); break;
        case 2: lh_bf16_tile(X, ldx, 2, w, ldw, LH_BF16_RB, K, s); break;
        case 3: lh_bf16_tile(X, ldx, 3, w, ldw, LH_BF16_RB, K, s); break;
        default: lh_bf16_tile(X, ldx, 4, w, ldw, LH_BF16_RB, K, s); break;
        }
    } else { /* the last < RB rows of a matrix, one at a time */
        for (int r = 0; r < rb; r++) {
            float t[LH_BF16_MB];
            switch (mb) {
            case 1: lh_bf16_tile(X, ldx, 1, w + r * ldw, ldw, 1, K, t); break;
            case 2: lh_bf16_tile(X, ldx, 2, w + r * ldw, ldw, 1, K, t); break;
            case 3: lh_bf16_tile(X, ldx, 3, w + r * ldw, ldw, 1, K, t); break;
            default: lh_bf16_tile(X, ldx, 4, w + r * ldw, ldw, 1, K, t); break;
            }
            for (int i = 0; i < mb; i++) s[i * rb + r] = t[i];
        }
    }
    for (int i = 0; i < mb; i++)
        for (int r = 0; r < rb; r++) lh_bf16_store(Y, y_bf16, i * ldy + n + r, s[i * rb + r]);
}

/* One product, inside the caller's parallel region: the weight-row blocks are an orphaned `omp for`. */
void lh_bf16_gemv_in_region(const uint16_t *X, int64_t ldx, int64_t M, const uint16_t *W, int64_t ldw, int64_t N,
                            int64_t K, void *Y, int64_t ldy, int y_bf16) {
    const int64_t blocks = (N + LH_BF16_RB - 1) / LH_BF16_RB;
#pragma omp for schedule(static) nowait
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n = b * LH_BF16_RB;
        const int rb = N - n < LH_BF16_RB ? (int)(N - n) : LH_BF16_RB;
        for (int64_t m = 0; m < M; m += LH_BF16_MB) {
            const int mb = M - m < LH_BF16_MB ? (int)(M - m) : LH_BF16_MB;
            const uint16_t *x = X + m * ldx;
            char *y = (char *)Y + m * ldy * (y_bf16 ? 2 : 4);
            if (rb == LH_BF16_RB) lh_bf16_rows(x, ldx, mb, W, ldw, LH_BF16_RB, K, y, ldy, y_bf16, n);
            else lh_bf16_rows(x, ldx, mb, W, ldw, rb, K, y, ldy, y_bf16, n);
        }
    }
}

/* Below this many multiply-adds a product runs on the calling thread: a fork/join would cost more. */
#define LH_BF16_SERIAL_WORK (1 << 16)

/* Y (M, N) = X (M, K) . W (N, K)^T. X rows ldx apart, W rows ldw apart (elements, unit stride along K), Y rows
 * ldy apart, float32 (y_bf16 = 0) or bf16. Returns 0, or -1 for M outside 1..16 or a negative size. */
int lh_bf16_gemv(const uint16_t *X, int64_t ldx, int64_t M, const uint16_t *W, int64_t ldw, int64_t N, int64_t K,
                 void *Y, int64_t ldy, int y_bf16, int nthreads) {
    if (M < 1 || M > LH_BF16_MAX_M || N < 0 || K < 0) return -1;
    const int par = nthreads > 1 && (double)M * N * K >= LH_BF16_SERIAL_WORK;
#pragma omp parallel num_threads(nthreads) if (par)
    lh_bf16_gemv_in_region(X, ldx, M, W, ldw, N, K, Y, ldy, y_bf16);
    return 0;
}

/* nw products of one X (M, K) in one parallel region: W[j] (N[j], K) rows ldw[j] apart into Y[j] (M, N[j]),
 * rows ldy[j] apart. */
int lh_bf16_gemv_many(int nw, const uint16_t *X, int64_t ldx, int64_t M, const uint16_t *const *W,
                      const int64_t *ldw, const int64_t *N, int64_t K, void *const *Y, const int64_t *ldy,
                      int y_bf16, int nthreads) {
    if (M < 1 || M > LH_BF16_MAX_M || K < 0 || nw < 0) return -1;
    double work = 0;
    for (int j = 0; j < nw; j++) {
        if (N[j] < 0) return -1;
        work += (double)M * N[j] * K;
    }
    const int par = nthreads > 1 && work >= LH_BF16_SERIAL_WORK;
#pragma omp parallel num_threads(nthreads) if (par)
    for (int j = 0; j < nw; j++) lh_bf16_gemv_in_region(X, ldx, M, W[j], ldw[j], N[j], K, Y[j], ldy[j], y_bf16);
    return 0;
}

/* Whether this build has the AVX512_BF16 path (1) or the portable one (0). */
int lh_bf16_native(void) { return LH_BF16_NATIVE; }
