/* The weight-only int8 / int4 / grouped 8-bit products of weight_only.c as building blocks for a caller's own
 * OpenMP region (step.c runs a whole decode step in one region): the prepared activation rows and one weight's
 * worksharing loop. weight_only.c's comment explains the arithmetic; its exported lh_wo_int8 / lh_wo_int4 /
 * lh_wo_grouped8 are these pieces, the rows prepared on the calling thread and the weights in one `omp
 * parallel`, so both callers compute the very same numbers. */
#ifndef LLAMAHERD_NATIVE_WEIGHT_ONLY_H
#define LLAMAHERD_NATIVE_WEIGHT_ONLY_H

#include <stddef.h>
#include <stdint.h>

#include "wo_act.h"

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

#endif
