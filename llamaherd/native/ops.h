/* The per-row float32 pieces of ops.c, shared with step.c (a whole decode step in one call): RMSNorm of a row,
 * rotary embedding of one head in either layout, and one query head's softmax attention over cached slots.
 * ops.c's comment gives the arithmetic and its references. */
#ifndef LLAMAHERD_NATIVE_OPS_H
#define LLAMAHERD_NATIVE_OPS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "common.h"

enum { LH_OPS_NO_WEIGHT = 0, LH_OPS_WEIGHT = 1, LH_OPS_ONE_PLUS_WEIGHT = 2 };
enum { LH_OPS_ROPE_NONE = 0, LH_OPS_ROPE_PAIRS = 1, LH_OPS_ROPE_HALVES = 2 };

/* One row: y = x / sqrt(mean(x^2) + eps), then times w, or (1 + w), or nothing. y may alias x. */
static inline void norm_row(const float *x, const float *w, int mode, float eps, int64_t n, float *y) {
    float ss = 0.0f;
    for (int64_t j = 0; j < n; j++) ss += x[j] * x[j];
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    if (mode == LH_OPS_WEIGHT) {
        for (int64_t j = 0; j < n; j++) y[j] = (x[j] * r) * w[j];
    } else if (mode == LH_OPS_ONE_PLUS_WEIGHT) {
        for (int64_t j = 0; j < n; j++) y[j] = (x[j] * r) * (1.0f + w[j]);
    } else {
        for (int64_t j = 0; j < n; j++) y[j] = x[j] * r;
    }
}

/* Rotate one head's D values by angles (c[i], s[i]), i < D/2, in the given layout. y may not alias x. */
static inline void rope_row(const float *x, const float *c, const float *s, int layout, int64_t D, float *y) {
    const int64_t h = D / 2;
    if (layout == LH_OPS_ROPE_HALVES) {
        for (int64_t i = 0; i < h; i++) {
            const float x0 = x[i], x1 = x[i + h];
            y[i] = x0 * c[i] - x1 * s[i];
            y[i + h] = x1 * c[i] + x0 * s[i];
        }
    } else if (layout == LH_OPS_ROPE_PAIRS) {
        for (int64_t i = 0; i < h; i++) {
            const float x0 = x[2 * i], x1 = x[2 * i + 1];
            y[2 * i] = x0 * c[i] - x1 * s[i];
            y[2 * i + 1] = x0 * s[i] + x1 * c[i];
        }
    } else {
        memcpy(y, x, (size_t)D * sizeof(float));
    }
}

/* A head's vector as attention uses it: per-head norm (norm_mode, weight w) first, then the rotation. */
static inline void prepare_head(const float *x, const float *w, int norm_mode, int use_norm, float eps,
                                const float *c, const float *s, int layout, int64_t D, float *tmp, float *y) {
    if (use_norm) {
        norm_row(x, w, norm_mode, eps, D, tmp);
        x = tmp;
    }
    rope_row(x, c, s, layout, D, y);
}

/* Element i of cache memory held as float32, or (bf16 != 0) as bfloat16 widened exactly. */
static inline float cache_elem(const void *p, int bf16, int64_t i) {
    return bf16 ? lh_bf2f(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* One query head qr (D) against S keys/vals of D elements (float32, or bfloat16 when bf16): key j is row idx[j]
 * of `keys` / `vals` (idx NULL: row j, the rows contiguous), so a paged cache's block table reads in place.
 * out (D) = softmax(scale * q.k) . v over the keys whose mask byte is nonzero (mask NULL: all); scores is
 * scratch of S floats. A query that sees no key gets zeros. */
static inline void attend_head(const float *qr, const void *keys, const void *vals, int bf16, const int64_t *idx,
                               int64_t S, int64_t D, const uint8_t *mask, float scale, float *scores, float *out) {
    float best = -INFINITY;
    for (int64_t j = 0; j < S; j++) {
        if (mask && !mask[j]) { scores[j] = -INFINITY; continue; }
        const int64_t row = (idx ? idx[j] : j) * D;
        float dot = 0.0f;
        for (int64_t d = 0; d < D; d++) dot += qr[d] * cache_elem(keys, bf16, row + d);
        scores[j] = dot * scale;
        if (scores[j] > best) best = scores[j];
    }
    memset(out, 0, (size_t)D * sizeof(float));
    if (best == -INFINITY) return; /* no visible key */
    float total = 0.0f;
    for (int64_t j = 0; j < S; j++) {
        if (scores[j] == -INFINITY) continue;
        const float p = expf(scores[j] - best);
        const int64_t row = (idx ? idx[j] : j) * D;
        total += p;
        for (int64_t d = 0; d < D; d++) out[d] += p * cache_elem(vals, bf16, row + d);
    }
    const float inv = 1.0f / total;
    for (int64_t d = 0; d < D; d++) out[d] *= inv;
}

#endif
