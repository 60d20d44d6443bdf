/* The weight-only int8 / int4 / grouped 8-bit products of weight_only.c as building blocks for a caller's own
 * OpenMP region (step.c runs a whole decode step in one region): the prepared activation rows and one weight's
 * worksharing loop. weight_only.c's comment explains the arithmetic; its exported lh_wo_int8 / lh_wo_int4 /
 * lh_wo_grouped8 are these pieces, the rows prepared on the calling thread and the weights in one `omp
 * parallel`, so both callers compute the very same numbers. */
#ifndef LLAMAHERD_NATIVE_WEIGHT_ONLY_H
#define LLAMAHERD_NATIVE_WEIGHT_ONLY_H

#include <stddef.h>
#include <stdint.h>

#include "common.h"

#define LH_WO_MAX_M 16 /* rows of X per call; weight_only.py's MAX_ROWS */

enum { LH_WO_INT8 = 0, LH_WO_INT4 = 1, LH_WO_GROUPED8 = 2 };
/* Activation kinds (weight_only.py's activation_mode()): float32; int16 codes per row; int8 codes per 32 (int4). */
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

/* Bytes of 64-aligned memory lh_wo_act_init needs for M rows of K with groups of G (G >= 16, or 0 for int8). */
size_t lh_wo_act_bytes(int64_t K, int64_t M, int64_t G);
/* Lay out `a` over `mem` for the scheme; act is the requested kind (LH_WO_ACT_*: taken where the scheme, the
 * build and K allow it, else the next one down). */
void lh_wo_act_init(lh_wo_act *a, void *mem, int scheme, int act, int64_t K, int64_t M, int64_t G);
/* Prepare row i of X (float32 when x_f32, else bf16; rows ldx apart): rows are independent of each other.
 * Returns 0, or -1 when int8 codes could not get their scratch memory (the row's outputs are then NaN). */
int lh_wo_act_row(lh_wo_act *a, const void *X, int x_f32, int64_t ldx, int64_t i);
/* Inside a parallel region, every thread: Y (M, N) rows ldy apart = X . W^T for one weight (codes W, scales S,
 * zeros Z, bf16 or float32 (sz_f32); int8: bf16 row scales, Z unused); an `omp for nowait`: the caller puts the
 * barrier after its last weight. */
void lh_wo_weight_in_region(const lh_wo_act *a, const void *W, const void *S, const void *Z, int sz_f32, int64_t N,
                            void *Y, int64_t ldy, int y_bf16);


/* ---- shared by weight_only.c and weight_only_a8.c -------------------------------------------------------- */

/* weight_only_a8.c: int4 weights on int8 activations (the VNNI build; 0 without it). */
int lh_wo4a8_available(void);
int lh_wo4a8_row(lh_wo_act *a, const void *X, int x_f32, int64_t ldx, int64_t i);
void lh_wo4a8_in_region(const lh_wo_act *a, const uint8_t *W, const void *S, const void *Z, int sz_f32, int64_t N,
                        void *Y, int64_t ldy, int y_bf16);

static inline void lh_wo_store(void *Y, int y_bf16, int64_t i, float v) {
    if (y_bf16) ((uint16_t *)Y)[i] = lh_f2bf(v);
    else ((float *)Y)[i] = v;
}

static inline float lh_wo_x(const void *X, int x_f32, int64_t i) {
    return x_f32 ? ((const float *)X)[i] : lh_bf2f(((const uint16_t *)X)[i]);
}

/* A scale or zero: bf16 (llamaherd's own codes) or float32 (GPTQ / AWQ's float16 values, kept exact). */
static inline float lh_wo_sz(const void *P, int f32, int64_t i) {
    return f32 ? ((const float *)P)[i] : lh_bf2f(((const uint16_t *)P)[i]);
}

#endif
