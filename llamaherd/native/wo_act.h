/* The activation rows the weight-only kernels read (lh_wo_act) and the small helpers every one of them uses:
 * weight_only.c (int8 / int4 / grouped 8-bit on int16 or float32 activations), weight_only_a8.c (int4, int8 on int8
 * activation blocks) and their callers (weight_only.h, step.c). */
#ifndef LLAMAHERD_NATIVE_WO_ACT_H
#define LLAMAHERD_NATIVE_WO_ACT_H

#include <stdint.h>

#include "common.h"

#define LH_WO_MAX_M 16 /* rows of X per call; weight_only.py's MAX_ROWS */

enum { LH_WO_INT8 = 0, LH_WO_INT4 = 1, LH_WO_GROUPED8 = 2 };
/* Activation kinds (weight_only.py's activation_mode()): float32; int16 codes per row; int8 codes per 32. */
enum { LH_WO_ACT_F32 = 0, LH_WO_ACT_I16 = 1, LH_WO_ACT_I8 = 2 };

/* The activation rows of one group of products, as the scheme's kernel reads them. */
typedef struct {
    int scheme, act;       /* act: the activation kind in use (what the build and K allow of the request) */
    int64_t M, K, G;       /* rows, width, group size (int4 / grouped8) */
    void *x;               /* int16 codes or float32 values (M, K), int4's in the nibble order; int8 codes: each
                            * row 8 K bytes apart (weight_only_a8.c lays them out) */
    float *xs;             /* int4 with integer codes: each group's code sum (M, K/G), times d for int8 codes */
    float sx[LH_WO_MAX_M]; /* each row's int16 code scale */
} lh_wo_act;

static inline void lh_wo_store(void *Y, int y_bf16, int64_t i, float v) {
    if (y_bf16) ((uint16_t *)Y)[i] = lh_f2bf(v);
    else ((float *)Y)[i] = v;
}

static inline float lh_wo_x(const void *X, int x_f32, int64_t i) {
    return x_f32 ? ((const float *)X)[i] : lh_bf2f(((const uint16_t *)X)[i]);
}

/* The tile dispatch of every weight-only kernel: the sums of mb (<= 4) activation rows against rb weight rows into
 * s[i * rb + r]. A full block of RB_FULL weight rows calls TILE with the activation row count a compile-time
 * constant, so the tile's accumulators stay in registers; a short last block runs one weight row at a time.
 * TILE(mb, r, rows, out) is the caller's tile of `rows` weight rows starting at row r, out[i * rows + j]. */
#define LH_WO_TILES(TILE, mb, rb, RB_FULL, s)                                                                         \
    do {                                                                                                               \
        if ((rb) == (RB_FULL)) {                                                                                       \
            switch (mb) {                                                                                              \
            case 1: TILE(1, 0, RB_FULL, s); break;                                                                     \
            case 2: TILE(2, 0, RB_FULL, s); break;                                                                     \
            case 3: TILE(3, 0, RB_FULL, s); break;                                                                     \
            default: TILE(4, 0, RB_FULL, s); break;                                                                    \
            }                                                                                                          \
        } else {                                                                                                       \
            for (int r_ = 0; r_ < (rb); r_++) {                                                                        \
                float u_[4];                                                                                           \
                TILE(mb, r_, 1, u_);                                                                                   \
                for (int i_ = 0; i_ < (mb); i_++) (s)[i_ * (rb) + r_] = u_[i_];                                        \
            }                                                                                                          \
        }                                                                                                              \
    } while (0)

/* A scale or zero: bf16 (llamaherd's own codes) or float32 (GPTQ / AWQ's float16 values, kept exact). */
static inline float lh_wo_sz(const void *P, int f32, int64_t i) {
    return f32 ? ((const float *)P)[i] : lh_bf2f(((const uint16_t *)P)[i]);
}

#endif
