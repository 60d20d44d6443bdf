/* Scalar number conversions shared by the native kernels (all the .c files here build into one library). */
#ifndef LLAMAHERD_NATIVE_COMMON_H
#define LLAMAHERD_NATIVE_COMMON_H

#include <stdint.h>
#include <string.h>
#ifdef __F16C__
#include <immintrin.h>
#endif

/* IEEE half at p (little-endian, possibly unaligned: ggml block scales) -> float. */
static inline float lh_h2f(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    /* by hand: sign, 5-bit exponent, 10-bit mantissa; subnormals renormalised */
    uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1F, m = h & 0x3FF, bits;
    if (e == 0) {
        if (m == 0) { bits = s; }
        else { e = 127 - 15 + 1; while (!(m & 0x400)) { m <<= 1; e--; } m &= 0x3FF; bits = s | (e << 23) | (m << 13); }
    } else if (e == 31) { bits = s | 0x7F800000 | (m << 13); }
    else { bits = s | ((e + 127 - 15) << 23) | (m << 13); }
    float f; memcpy(&f, &bits, 4); return f;
#endif
}

/* float -> bfloat16, round to nearest even, NaN kept a quiet NaN: the rounding torch's `.bfloat16()` does. */
static inline uint16_t lh_f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* bfloat16 -> float: exact (a bf16 is the top half of a float). */
static inline float lh_bf2f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#endif
