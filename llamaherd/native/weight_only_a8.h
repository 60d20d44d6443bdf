/* weight_only_a8.c: int4 and int8 weight-only codes multiplied on int8 activation blocks (llama.cpp's Q8_0
 * rounding), the kind weight_only.c hands to it (LH_WO_ACT_I8) when the build has AVX-512 VNNI and K is a
 * multiple of 128 (int4) or 32 (int8). */
#ifndef LLAMAHERD_NATIVE_WEIGHT_ONLY_A8_H
#define LLAMAHERD_NATIVE_WEIGHT_ONLY_A8_H

#include <stdint.h>

#include "wo_act.h"

/* Whether the kernels were compiled in (the VNNI build; 0 without it). */
int lh_wo4a8_available(void);
int lh_wo4a8_row(lh_wo_act *a, const void *X, int x_f32, int64_t ldx, int64_t i);
void lh_wo4a8_in_region(const lh_wo_act *a, const uint8_t *W, const void *S, const void *Z, int sz_f32, int64_t N,
                        void *Y, int64_t ldy, int y_bf16);
/* int8 weights (bf16 row scales S): the same pair, the activation rows laid out for a8_tile8. */
int lh_wo8a8_row(lh_wo_act *a, const void *X, int x_f32, int64_t ldx, int64_t i);
void lh_wo8a8_in_region(const lh_wo_act *a, const int8_t *W, const uint16_t *S, int64_t N, void *Y, int64_t ldy,
                        int y_bf16);

#endif
