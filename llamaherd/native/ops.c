/* Per-layer float32 glue of the decoders, fused: RMSNorm rows, rotary embedding rows, and a one-token attention
 * step (optional per-head norm of q and k, rotary embedding, KV-cache write, softmax attention over the cached
 * slots).
 *
 * Why: in a decode step these are tiny (640 or 4 x 256 values) and torch runs each as 5-15 aten ops of ~1 us
 * dispatch each (bench/PROFILE.md sections 5, 7 and 10); one ctypes call does the arithmetic in well under
 * that. Over many rows (prefill) the same loops also beat torch's ops, which write several temporaries. The Python side (llamaherd/native/ops.py) decides when these apply; the torch code in the model files
 * is the reference they are tested against (tests/test_native_ops.py).
 *
 * Arithmetic follows the torch reference's order of operations (norm: mean of squares, + eps, 1/sqrt, x * r,
 * then the weight or (1 + weight); rotary: x0*c - x1*s, x1*c + x0*s); only the order of summation in the
 * reductions differs (the library is built with -fassociative-math so those loops vectorise). The rotary
 * layouts are Meta's adjacent pairs (llama-models `apply_rotary_emb`, ggml's normal mode) and the "rotate
 * half" pairs (x[i], x[i + D/2]) of HF `rotate_half` / ggml's GGML_ROPE_TYPE_NEOX (ggml-cpu `rope_f32`).
 * Exported symbols are prefixed lh_ops_ (every C file under native/ lands in one library).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ops.h"

/* rows x dim, contiguous: out[i] = norm_row(x[i]). Many rows (prefill) are split across threads. */
int lh_ops_rms_norm(const float *x, const float *w, int mode, float eps, int64_t rows, int64_t dim, float *out,
                    int nthreads) {
    if (rows * dim >= (1 << 16) && nthreads > 1) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
        for (int64_t i = 0; i < rows; i++) norm_row(x + i * dim, w, mode, eps, dim, out + i * dim);
    } else {
        for (int64_t i = 0; i < rows; i++) norm_row(x + i * dim, w, mode, eps, dim, out + i * dim);
    }
    return 0;
}

/* Rotary embedding of `tokens` tokens of `heads` heads of D values (x and out: (tokens, heads, D) contiguous).
 * Token i uses angle row (i % T) of cos/sin (D/2 each) when `broadcast` (one row of angles per position, shared
 * by every batch row), else row i. Many tokens (prefill) are split across threads. */
int lh_ops_rope(const float *x, int64_t tokens, int64_t heads, int64_t D, const float *cos, const float *sin,
                int64_t T, int broadcast, int layout, float *out, int nthreads) {
    const int64_t half = D / 2;
    const int threads = (tokens > 1 && tokens * heads * D >= (1 << 15)) ? nthreads : 1;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t i = 0; i < tokens; i++) {
        const int64_t row = broadcast ? i % T : i;
        for (int64_t h = 0; h < heads; h++)
            rope_row(x + (i * heads + h) * D, cos + row * half, sin + row * half, layout, D, out + (i * heads + h) * D);
    }
    return 0;
}

/* One new token per batch row through attention, for one layer:
 *
 *   q (B, Hq, D), k and v (B, Hkv, D): the projections of the new token (float32, contiguous);
 *   qk_norm: when nonzero, q and k heads are first RMS-normalised with weights qw / kw (norm_mode, q_eps and
 *   k_eps), before the rotation (Gemma 3's order);
 *   cos, sin: D/2 angles per batch row, rows cs_stride floats apart (0: one row for every batch row);
 *   kc, vc (B, Hkv, max_len, D): this layer's cache; the rotated k and v are written at `slot`;
 *   keys [0, slot] are attended to, minus those whose mask byte is 0 (mask rows mask_stride bytes apart,
 *   NULL: all), with scores scale * q.k and query head h reading key/value head h / (Hq / Hkv) (grouped-query
 *   attention as torch's enable_gqa and llama-models' repeat_kv);
 *   out (B, Hq, D): softmax-weighted sum of values.
 *
 * A query that sees no key gets zeros (the mask contract, llama.attention_mask, always shows its own slot).
 * Returns 0, or -1 when scratch memory cannot be had.
 */
int lh_ops_attend_decode(const float *q, const float *k, const float *v, int64_t B, int64_t Hq, int64_t Hkv,
                         int64_t D, int qk_norm, const float *qw, const float *kw, int norm_mode, float q_eps,
                         float k_eps,
                         const float *cos, const float *sin, int64_t cs_stride, int layout, float *kc, float *vc,
                         int64_t max_len, int64_t slot, const uint8_t *mask, int64_t mask_stride, float scale,
                         float *out, int nthreads) {
    const int64_t S = slot + 1, group = Hq / Hkv;
    float *tmp = malloc((size_t)D * sizeof(float));
    if (tmp == NULL) return -1;
    for (int64_t b = 0; b < B; b++) {  /* the new keys and values into the cache */
        for (int64_t h = 0; h < Hkv; h++) {
            const int64_t at = ((b * Hkv + h) * max_len + slot) * D;
            prepare_head(k + (b * Hkv + h) * D, kw, norm_mode, qk_norm, k_eps, cos + b * cs_stride,
                         sin + b * cs_stride, layout, D, tmp, kc + at);
            memcpy(vc + at, v + (b * Hkv + h) * D, (size_t)D * sizeof(float));
        }
    }
    free(tmp);
    const int64_t tasks = B * Hq;
    /* Split heads across threads only when there is enough work to pay for the fork/join (~1-2 us). */
    const int threads = (tasks > 1 && S * D * tasks >= (1 << 18)) ? nthreads : 1;
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float *scores = malloc((size_t)S * sizeof(float));
        float *buf = malloc((size_t)2 * D * sizeof(float));
        if (scores == NULL || buf == NULL) {
#pragma omp atomic write
            failed = 1;
        } else {
            float *qr = buf, *qtmp = buf + D;
#pragma omp for schedule(static)
            for (int64_t t = 0; t < tasks; t++) {
                const int64_t b = t / Hq, h = t % Hq, hk = h / group;
                prepare_head(q + t * D, qw, norm_mode, qk_norm, q_eps, cos + b * cs_stride, sin + b * cs_stride,
                             layout, D, qtmp, qr);
                attend_head(qr, kc + (b * Hkv + hk) * max_len * D, vc + (b * Hkv + hk) * max_len * D, 0, NULL, S, D,
                            mask ? mask + b * mask_stride : NULL, scale, scores, out + t * D);
            }
        }
        free(scores);
        free(buf);
    }
    return failed ? -1 : 0;
}
