/* One decode step of a whole Llama or Gemma 3 decoder, in one call and one OpenMP region: packed ggml weights,
 * bf16 matrices or weight-only int8 / int4 codes.
 *
 * Why: with the matrix kernels at the memory's pace, what was left of a decode step was the work around them:
 * per layer a dozen Python module calls, ctypes calls and small torch ops, and one OpenMP fork/join per product
 * (bench/PROFILE.md sections 5, 7, 10 and 12). Here every layer (norm -> q/k/v products -> per-head q/k norm and
 * rotary -> KV-cache write -> attention -> output product -> residual -> norm -> gate/up products -> SwiGLU or
 * GeGLU -> down product -> residual) runs inside ONE parallel region, phases separated by barriers; Python is
 * left with the embedding lookup, the final norm and vocabulary projection, and sampling (native/step.py).
 *
 * The arithmetic is that of the per-module native path it replaces, piece by piece: norm_row, prepare_head and
 * attend_head (ops.h, as ops.c's lh_ops_attend_decode), and the kernels' own products: for ggml weights int8
 * activations quantized once per product as llama.cpp does (ggml_q8.h) or float activations (ggml.h); for
 * bf16 matrices dense.c's kernel on the rows rounded to bf16 (dense.h); for weight-only codes weight_only.c's
 * kernels after its own activation preparation (weight_only.h). The residual stream is float32 whatever the
 * weights; the KV cache float32 or bf16 (native/step.py says why). The reference for
 * each layer is model/llama.py and model/gemma3.py (llama-models `llama3/model.py`; HF `modeling_gemma3.py`):
 *
 *   Llama:   h += wo(attn(rope(wq x), rope(wk x), wv x)),  x = norm(h);   h += w2(silu(w1 x) * w3 x),  x = norm(h)
 *   Gemma 3: h += post_norm(wo(attn(rope(q_norm(wq x)), rope(k_norm(wk x)), wv x)));
 *            h += post_norm(w2(gelu_tanh(w1 x) * w3 x))
 *
 * The rotary angles are computed here from the positions: (float)position * inv_freq[i] in float32, then cosf /
 * sinf (the reference's `rope_angles`: float32 product, then torch's cos / sin, which may differ by an ulp).
 * Masks: key slot j is visible from the new token at `slot` when j <= slot, when the row's key mask (if any)
 * shows it or j == slot (llama.attention_mask), and on sliding-window layers when slot - j < window
 * (gemma3.window_mask).
 *
 * SiLU and GELU-tanh use a vectorised exp (Cephes' expf polynomial, as in llama.cpp's ggml_v_expf and Sleef's
 * expf: range reduction by ln 2 split in two constants, a degree-6 polynomial, scaling by 2^n), within ~2 ulp.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "dense.h"
#include "ggml.h"
#include "ggml_q8.h"
#include "ops.h"
#include "weight_only.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

/* The structures native/step.py fills once per model (ctypes mirrors of these, field for field). */
typedef struct {
    int64_t type;          /* a ggml type id, or one of the LH_STEP_* kinds below */
    const uint8_t *data;   /* packed rows (ggml), bf16 rows, or weight-only codes */
    int64_t rows, stride;  /* output features, bytes between rows */
    const void *scales, *zeros; /* weight-only: scales and zeros (int8: bf16 row scales, no zeros) */
    int64_t group, sz_f32;      /* weight-only: group size (int4, grouped8); scales and zeros float32, else bf16 */
} lh_step_weight;

/* The weight kinds besides the packed ggml ones: a bf16 matrix (dense.c's kernel) and the weight-only codes
 * (weight_only.c's kernels, the layouts of quant/weight_only.py and quant/hf_quantized.py). */
enum { LH_STEP_BF16 = 1000, LH_STEP_WO_INT8 = 1001, LH_STEP_WO_INT4 = 1002, LH_STEP_WO_GROUPED8 = 1003 };

typedef struct {
    lh_step_weight wq, wk, wv, wo, w1, w3, w2;
    const float *attn_norm, *ffn_norm;
    const float *post_attn_norm, *post_ffn_norm; /* Gemma's sandwich norms; NULL for Llama */
    const float *q_norm, *k_norm;                /* Gemma's per-head norms; NULL for Llama */
    int64_t local;                               /* 1: a sliding-window layer (local angles and window) */
} lh_step_layer;

typedef struct {
    int64_t n_layers, dim, hidden, n_heads, n_kv_heads, head_dim;
    int64_t norm_mode; /* LH_OPS_WEIGHT (Llama) or LH_OPS_ONE_PLUS_WEIGHT (Gemma) */
    int64_t layout;    /* rotary layout: LH_OPS_ROPE_PAIRS (Meta) or LH_OPS_ROPE_HALVES (Gemma) */
    int64_t act;       /* LH_STEP_SILU or LH_STEP_GELU_TANH */
    int64_t window;    /* local layers' sliding window (0: none) */
    int64_t int8;      /* 1: int8 activations (ggml_q8.c), 0: float activations (ggml.c) */
    int64_t act16;     /* weight-only: the activation kind asked (weight_only.h LH_WO_ACT_*: 0 f32, 1 int16, 2 int8) */
    float eps, scale;  /* every norm's eps; attention score scale */
    const float *inv_freq, *inv_freq_local; /* head_dim / 2 each (local: for local layers) */
    const lh_step_layer *layers;
} lh_step_model;

/* Where a step's keys and values live, for the engine's simple cache and for the serving engine's paged one alike.
 * Column j of row b (j in [0, slot]; `slot` is the new token's column) is cache slot slots[b * slots_stride + j],
 * or slot j when `slots` is NULL; the keys of (layer l, row b, KV head h) start layer_stride * l + row_stride * b
 * + head_stride * h elements into k / v, one head_dim-wide row per slot, n_slots slots.
 *   simple cache (n_layers, B, n_kv_heads, max_len, head_dim): slots NULL, n_slots = max_len;
 *   paged cache (n_layers, n_kv_heads, blocks * block_size, head_dim): row_stride 0, each row's slots its block
 *     table's, left-padded to the longest row (engine/paged.py's BatchView: `gather` then `write`).
 * key_mask (B rows key_mask_stride bytes apart, slot + 1 used) or NULL: the real columns of a left-padded row. */
typedef struct {
    void *k, *v;
    int64_t bf16; /* 1: bfloat16 elements (new keys and values rounded as the reference's cache write), 0: float32 */
    int64_t layer_stride, row_stride, head_stride, n_slots, slot;
    const int64_t *slots;
    int64_t slots_stride;
    const uint8_t *key_mask;
    int64_t key_mask_stride;
} lh_step_cache;

enum { LH_STEP_SILU = 0, LH_STEP_GELU_TANH = 1 };
#define LH_STEP_MAX_ROWS 16

/* ---- activations -------------------------------------------------------------------------------------------- */

#ifdef __AVX512F__
static inline __m512 v_exp(__m512 x) {
    /* Cephes expf: x = n ln2 + r, |r| <= ln2/2; exp(r) by its minimax polynomial; times 2^n (vscalefps also
     * gives 0 and inf past the ends of the range) */
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(88.8f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}
#endif

/* g[i] = act(g[i]) * u[i] for i in [lo, hi). SiLU: x / (1 + exp(-x)) (torch's silu). GELU, tanh form (torch's
 * gelu(approximate="tanh")): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), tanh(y) = 1 - 2 / (exp(2y) + 1). */
static void gate(int act, float *g, const float *u, int64_t lo, int64_t hi) {
    const float beta = 0.7978845608028654f, kappa = 0.044715f;
    int64_t i = lo;
#ifdef __AVX512F__
    const __m512 one = _mm512_set1_ps(1.0f), two = _mm512_set1_ps(2.0f), halfv = _mm512_set1_ps(0.5f);
    for (; i + 16 <= hi; i += 16) {
        const __m512 x = _mm512_loadu_ps(g + i);
        __m512 y;
        if (act == LH_STEP_SILU) {
            y = _mm512_div_ps(x, _mm512_add_ps(one, v_exp(_mm512_sub_ps(_mm512_setzero_ps(), x))));
        } else {
            const __m512 cube = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(kappa), x), _mm512_mul_ps(x, x));
            const __m512 inner = _mm512_mul_ps(_mm512_set1_ps(beta), _mm512_add_ps(x, cube));
            const __m512 e = v_exp(_mm512_mul_ps(two, inner));
            const __m512 t = _mm512_sub_ps(one, _mm512_div_ps(two, _mm512_add_ps(e, one)));
            y = _mm512_mul_ps(_mm512_mul_ps(halfv, x), _mm512_add_ps(one, t));
        }
        _mm512_storeu_ps(g + i, _mm512_mul_ps(y, _mm512_loadu_ps(u + i)));
    }
#endif
    for (; i < hi; i++) {
        const float x = g[i];
        const float y = act == LH_STEP_SILU ? x / (1.0f + expf(-x))
                                            : 0.5f * x * (1.0f + tanhf(beta * (x + kappa * x * x * x)));
        g[i] = y * u[i];
    }
}

/* ---- products ------------------------------------------------------------------------------------------------ */

/* The activation rows of one group of products (x quantized once for the group when int8; rounded to bf16 for
 * bf16 weights; prepared once as weight_only.c reads them for weight-only codes). */
typedef struct {
    const lh_step_model *m;
    qact *a;
    uint16_t *xb;      /* bf16 weights: the rows rounded to bf16 (B, K) */
    lh_wo_act *wo;     /* weight-only weights: the prepared rows, laid over wo_mem */
    void *wo_mem;
} products;

static int is_ggml(int64_t type) { return type < LH_STEP_BF16; }

static void need_of(const lh_step_weight *const *w, int n, int need[2]) {
    need[0] = need[1] = 0;
    for (int i = 0; i < n; i++) need[lh_q8_flavour((int)w[i]->type)] = 1;
}

/* Inside the region, every thread: y[i] (B, rows_i) = x (B, K) . w[i]^T for the n weights, then a barrier. */
static void project(const products *p, const float *x, int64_t K, int64_t B, const lh_step_weight *const *w,
                    float *const *y, int n) {
    const int64_t type = w[0]->type; /* lh_step_check: a model's non-ggml weights are all of one kind */
    if (type == LH_STEP_BF16) {
        /* the kernel multiplies bf16 rows, as the per-module path's bf16 activations; float32 sums out */
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++)
            for (int64_t k = 0; k < K; k++) p->xb[b * K + k] = lh_f2bf(x[b * K + k]);
        for (int i = 0; i < n; i++)
            lh_bf16_gemv_in_region(p->xb, K, B, (const uint16_t *)w[i]->data, w[i]->stride / 2, w[i]->rows, K, y[i],
                                   w[i]->rows, 0);
    } else if (!is_ggml(type)) {
#pragma omp single
        lh_wo_act_init(p->wo, p->wo_mem, (int)(type - LH_STEP_WO_INT8), (int)p->m->act16, K, B, w[0]->group);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) lh_wo_act_row(p->wo, x, 1, K, b);
        for (int i = 0; i < n; i++)
            lh_wo_weight_in_region(p->wo, w[i]->data, w[i]->scales, w[i]->zeros, (int)w[i]->sz_f32, w[i]->rows, y[i],
                                   w[i]->rows, 0);
    } else if (p->m->int8) {
        int need[2];
        need_of(w, n, need);
        lh_q8_quantize_in_region(p->a, x, K, B, need);
        for (int i = 0; i < n; i++)
            lh_q8_weight((int)w[i]->type, w[i]->data, w[i]->rows, w[i]->stride, K, p->a, B, y[i]);
    } else {
        for (int i = 0; i < n; i++)
            lh_gemv_in_region((int)w[i]->type, w[i]->data, w[i]->rows, w[i]->stride, K, x, B, y[i]);
    }
#pragma omp barrier
}

/* ---- the step ------------------------------------------------------------------------------------------------ */

/* Visibility bytes (B, S) of the new token at `slot` for one kind of layer, or NULL when every slot is visible. */
static uint8_t *visible(uint8_t *out, int64_t B, int64_t slot, const uint8_t *key_mask, int64_t km_stride,
                        int64_t window) {
    const int64_t S = slot + 1;
    if (key_mask == NULL && (window <= 0 || S <= window)) return NULL;
    for (int64_t b = 0; b < B; b++)
        for (int64_t j = 0; j < S; j++)
            out[b * S + j] = (uint8_t)((key_mask == NULL || key_mask[b * km_stride + j] || j == slot) &&
                                       (window <= 0 || slot - j < window));
    return out;
}

/* Whether a non-ggml weight of K inputs is one the kernels take, and of the same kind as `first` (a model's
 * bf16 or weight-only projections are all of one kind: one activation layout per product group). */
static int other_ok(const lh_step_weight *w, const lh_step_weight *first, int64_t K) {
    if (w->type != first->type || w->group != first->group || w->sz_f32 != first->sz_f32 || w->rows < 1) return 0;
    switch (w->type) {
    case LH_STEP_BF16: return w->stride >= 2 * K && w->stride % 2 == 0;
    case LH_STEP_WO_INT8: return w->sz_f32 == 0 && w->scales != NULL;
    case LH_STEP_WO_INT4: return w->group >= 32 && w->group % 32 == 0 && K % w->group == 0 && w->zeros != NULL;
    case LH_STEP_WO_GROUPED8:
        return w->group >= 16 && w->group % 16 == 0 && K % w->group == 0 && w->sz_f32 == 1 && w->zeros != NULL;
    default: return 0;
    }
}

/* Whether the model's weights are ones the kernels take (checked once, when native/step.py builds the model). */
int lh_step_check(const lh_step_model *m) {
    if (m->n_layers < 1 || m->head_dim % 2 || m->n_kv_heads < 1 || m->n_heads % m->n_kv_heads) return -1;
    const lh_step_weight *first = &m->layers[0].wq;
    const int64_t QD = m->n_heads * m->head_dim;
    for (int64_t l = 0; l < m->n_layers; l++) {
        const lh_step_layer *L = &m->layers[l];
        const lh_step_weight *w[7] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->w1, &L->w3, &L->w2};
        const int64_t K[7] = {m->dim, m->dim, m->dim, QD, m->dim, m->dim, m->hidden};
        for (int i = 0; i < 7; i++) {
            if (is_ggml(first->type) != is_ggml(w[i]->type)) return -1; /* no mixing of packed and other kinds */
            if (is_ggml(w[i]->type) ? !(m->int8 ? lh_q8_supported((int)w[i]->type) : lh_supported((int)w[i]->type))
                                    : !other_ok(w[i], first, K[i]))
                return -1;
        }
    }
    return 0;
}

/* Cache slot of row b's column j. */
static inline int64_t slot_of(const lh_step_cache *c, int64_t b, int64_t j) {
    return c->slots ? c->slots[b * c->slots_stride + j] : j;
}

/* One token per row through every layer.
 *
 *   h (B, dim): the embedded tokens in, the last layer's output (before the final norm) out; B <= 16
 *   pos (B): each row's rotary position
 *   c: the cache (see lh_step_cache); the new keys and values go to column c->slot of each row, attention reads
 *     columns [0, slot] (those the mask shows, and on sliding-window layers the window's)
 *
 * Returns 0, -1 for arguments the kernels do not take (a slot index outside the cache among them), -2 without
 * memory for the scratch. */
int lh_step_decode(const lh_step_model *m, float *h, int64_t B, const int64_t *pos, const lh_step_cache *c,
                   int nthreads) {
    const int64_t slot = c->slot;
    if (B < 1 || B > LH_STEP_MAX_ROWS || slot < 0 || nthreads < 1) return -1;
    if (c->slots == NULL ? slot >= c->n_slots : c->slots_stride < slot + 1) return -1;
    for (int64_t b = 0; c->slots != NULL && b < B; b++)
        for (int64_t j = 0; j <= slot; j++)
            if (c->slots[b * c->slots_stride + j] < 0 || c->slots[b * c->slots_stride + j] >= c->n_slots) return -1;
    const uint8_t *key_mask = c->key_mask;
    const int64_t key_mask_stride = c->key_mask_stride;
    const int kv_bf16 = (int)c->bf16;
    const int64_t dim = m->dim, F = m->hidden, Hq = m->n_heads, Hkv = m->n_kv_heads, D = m->head_dim;
    const int64_t half = D / 2, S = slot + 1, QD = Hq * D, KD = Hkv * D, group = Hq / Hkv;
    const int mode = (int)m->norm_mode, layout = (int)m->layout;

    /* scratch: every buffer of the step in one allocation, per-thread parts included (no failure inside the
     * region, where a thread leaving early would strand the others at a barrier) */
    const int64_t n_floats = B * (2 * dim + 2 * QD + 2 * KD + 2 * F) + 4 * B * half + (int64_t)nthreads * (S + 2 * D);
    float *mem = malloc(sizeof(float) * (size_t)n_floats + 2 * (size_t)(B * S));
    qact ad, aa, af;
    ad.mem = aa.mem = af.mem = NULL;
    const int64_t wtype = m->layers[0].wq.type, Kmax = dim > QD ? (dim > F ? dim : F) : (QD > F ? QD : F);
    const int packed = is_ggml(wtype), q8 = packed && m->int8;
    uint16_t *xb = wtype == LH_STEP_BF16 ? malloc(sizeof(uint16_t) * (size_t)(B * Kmax)) : NULL;
    void *wo_mem = !packed && wtype != LH_STEP_BF16
                       ? aligned_alloc(64, lh_wo_act_bytes(Kmax, B, m->layers[0].wq.group))
                       : NULL;
    lh_wo_act wo;
    if (mem == NULL || (q8 && (lh_q8_alloc(&ad, dim, B) || lh_q8_alloc(&aa, QD, B) || lh_q8_alloc(&af, F, B))) ||
        (wtype == LH_STEP_BF16 && xb == NULL) || (!packed && wtype != LH_STEP_BF16 && wo_mem == NULL)) {
        free(mem); free(ad.mem); free(aa.mem); free(af.mem); free(xb); free(wo_mem);
        return -2;
    }
    float *xn = mem, *o = xn + B * dim, *q = o + B * dim, *att = q + B * QD, *k = att + B * QD, *v = k + B * KD;
    float *g = v + B * KD, *u = g + B * F, *cs = u + B * F, *per_thread = cs + 4 * B * half;
    float *cos_g = cs, *sin_g = cs + B * half, *cos_l = cs + 2 * B * half, *sin_l = cs + 3 * B * half;
    uint8_t *mbytes = (uint8_t *)(mem + n_floats);
    for (int64_t b = 0; b < B; b++) {
        for (int64_t i = 0; i < half; i++) {
            const float ag = (float)pos[b] * m->inv_freq[i], al = (float)pos[b] * m->inv_freq_local[i];
            cos_g[b * half + i] = cosf(ag); sin_g[b * half + i] = sinf(ag);
            cos_l[b * half + i] = cosf(al); sin_l[b * half + i] = sinf(al);
        }
    }
    const uint8_t *mask_g = visible(mbytes, B, slot, key_mask, key_mask_stride, 0);
    const uint8_t *mask_l = visible(mbytes + B * S, B, slot, key_mask, key_mask_stride, m->window);
    const products pd = {m, &ad, xb, &wo, wo_mem}, pa = {m, &aa, xb, &wo, wo_mem}, pf = {m, &af, xb, &wo, wo_mem};
    const size_t esz = kv_bf16 ? 2 : 4;

#pragma omp parallel num_threads(nthreads)
    {
#ifdef _OPENMP
        const int tid = omp_get_thread_num();
#else
        const int tid = 0;
#endif
        float *scores = per_thread + tid * (S + 2 * D), *qr = scores + S, *tmp = qr + D;
        for (int64_t l = 0; l < m->n_layers; l++) {
            const lh_step_layer *L = &m->layers[l];
            char *kcl = (char *)c->k + (size_t)(l * c->layer_stride) * esz;
            char *vcl = (char *)c->v + (size_t)(l * c->layer_stride) * esz;
            const float *cl = L->local ? cos_l : cos_g, *sl = L->local ? sin_l : sin_g;
            const uint8_t *mask = L->local ? mask_l : mask_g;
            /* a sliding-window layer reads only the window's slots (the mask hides the others anyway) */
            const int64_t first = L->local && m->window > 0 && S > m->window ? S - m->window : 0;

#pragma omp for schedule(static)
            for (int64_t b = 0; b < B; b++) norm_row(h + b * dim, L->attn_norm, mode, m->eps, dim, xn + b * dim);
            {
                const lh_step_weight *w[3] = {&L->wq, &L->wk, &L->wv};
                float *y[3] = {q, k, v};
                project(&pd, xn, dim, B, w, y, 3);
            }
#pragma omp for schedule(static)
            for (int64_t t = 0; t < B * Hkv; t++) { /* the new key (normed, rotated) and value into the cache */
                const int64_t b = t / Hkv, at = b * c->row_stride + (t % Hkv) * c->head_stride + slot_of(c, b, slot) * D;
                if (kv_bf16) {
                    prepare_head(k + t * D, L->k_norm, mode, L->k_norm != NULL, m->eps, cl + b * half, sl + b * half,
                                 layout, D, tmp, qr);
                    uint16_t *kd = (uint16_t *)kcl + at, *vd = (uint16_t *)vcl + at;
                    for (int64_t d = 0; d < D; d++) kd[d] = lh_f2bf(qr[d]), vd[d] = lh_f2bf(v[t * D + d]);
                } else {
                    prepare_head(k + t * D, L->k_norm, mode, L->k_norm != NULL, m->eps, cl + b * half, sl + b * half,
                                 layout, D, tmp, (float *)kcl + at);
                    memcpy((float *)vcl + at, v + t * D, (size_t)D * sizeof(float));
                }
            }
#pragma omp for schedule(static)
            for (int64_t t = 0; t < B * Hq; t++) {
                const int64_t b = t / Hq, kv = (t % Hq) / group;
                prepare_head(q + t * D, L->q_norm, mode, L->q_norm != NULL, m->eps, cl + b * half, sl + b * half,
                             layout, D, tmp, qr);
                const int64_t *idx = c->slots ? c->slots + b * c->slots_stride + first : NULL;
                const size_t from = (size_t)(b * c->row_stride + kv * c->head_stride + (idx ? 0 : first * D)) * esz;
                attend_head(qr, (const char *)kcl + from, (const char *)vcl + from, kv_bf16, idx, S - first, D,
                            mask ? mask + b * S + first : NULL, m->scale, scores, att + t * D);
            }
            {
                const lh_step_weight *w[1] = {&L->wo};
                float *y[1] = {o};
                project(&pa, att, QD, B, w, y, 1);
            }
#pragma omp for schedule(static)
            for (int64_t b = 0; b < B; b++) { /* residual, then the feed-forward's input */
                float *hb = h + b * dim, *ob = o + b * dim;
                if (L->post_attn_norm) norm_row(ob, L->post_attn_norm, mode, m->eps, dim, ob);
                for (int64_t j = 0; j < dim; j++) hb[j] += ob[j];
                norm_row(hb, L->ffn_norm, mode, m->eps, dim, xn + b * dim);
            }
            {
                const lh_step_weight *w[2] = {&L->w1, &L->w3};
                float *y[2] = {g, u};
                project(&pd, xn, dim, B, w, y, 2);
            }
#pragma omp for schedule(static)
            for (int64_t c = 0; c < B * F; c += 256) gate((int)m->act, g, u, c, c + 256 < B * F ? c + 256 : B * F);
            {
                const lh_step_weight *w[1] = {&L->w2};
                float *y[1] = {o};
                project(&pf, g, F, B, w, y, 1);
            }
#pragma omp for schedule(static)
            for (int64_t b = 0; b < B; b++) {
                float *hb = h + b * dim, *ob = o + b * dim;
                if (L->post_ffn_norm) norm_row(ob, L->post_ffn_norm, mode, m->eps, dim, ob);
                for (int64_t j = 0; j < dim; j++) hb[j] += ob[j];
            }
        }
    }
    free(mem); free(ad.mem); free(aa.mem); free(af.mem); free(xb); free(wo_mem);
    return 0;
}
