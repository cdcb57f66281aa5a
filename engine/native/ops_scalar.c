/* Attention and the small operations of a step in plain C: the fallback for CPUs without AVX2, and the definition
 * that ops_avx2.c computes with intrinsics, bit for bit. Every operation is per element (the same IEEE float
 * operation in a SIMD lane as in a scalar register), and every sum runs over explicit lanes in a fixed order, then
 * a fixed tree, so the vector code can do exactly what this code does. */
#include <math.h>
#include <string.h>

#include "native.h"

#define SUFFIX(name) name##_scalar

#define LANES 8
#define DOT_LANES 32 /* four vectors of 8: enough independent sums to hide the fused multiply-add latency */

static inline float SUFFIX(tree8)(const float *l) {
    return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

/* sum of a[i] * b[i]: lane l of 32 takes i = l, l + 32, ...; lanes folded 32 -> 8 in a fixed order, then tree8;
 * dimensions past the last whole 32 are added in order after. */
static inline float SUFFIX(dot)(const float *a, const float *b, int n) {
    float lanes[DOT_LANES] = {0};
    int whole = n - n % DOT_LANES;
    for (int i = 0; i < whole; i += DOT_LANES) {
        for (int l = 0; l < DOT_LANES; l++) lanes[l] = fmaf(a[i + l], b[i + l], lanes[l]);
    }
    float folded[LANES];
    for (int l = 0; l < LANES; l++) folded[l] = (lanes[l] + lanes[l + 8]) + (lanes[l + 16] + lanes[l + 24]);
    float total = SUFFIX(tree8)(folded);
    for (int i = whole; i < n; i++) total = fmaf(a[i], b[i], total);
    return total;
}

static inline float SUFFIX(sum_squares)(const float *x, int n) { return SUFFIX(dot)(x, x, n); }

/* e^x to about 1 ulp over the range softmax and GELU need (Cephes' expf polynomial), clamped to [-87, 88]. */
static inline float SUFFIX(exp_lane)(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    float n = nearbyintf(x * 1.44269504088896341f);
    float r = fmaf(n, -0.693359375f, x);
    r = fmaf(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    float y = fmaf(p, r * r, r) + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

/* The chunk's keys for each query head of kv_head: maximum, sum of e^(score - maximum), and the values weighted
 * by those exponentials, in order of position. */
void SUFFIX(attention_chunk)(const AttentionJob *job, int row, int slot, int chunk, int kv_head) {
    const int dim = job->dim, group = job->heads / job->kv_heads;
    const KeySpan span = attention_chunk_span(job, row, chunk, kv_head);
    const int count = span.count;
    const float *keys = span.keys, *values = span.values;
    float scores[KEY_CHUNK];
    for (int head = kv_head * group; head < (kv_head + 1) * group; head++) {
        const float *q = job->q + (ptrdiff_t)row * job->q_stride + (ptrdiff_t)head * dim;
        float *out = job->slot_out + ((size_t)slot * job->heads + head) * dim;
        float highest = -INFINITY;
        for (int t = 0; t < count; t++) {
            scores[t] = SUFFIX(dot)(q, keys + (size_t)t * dim, dim) * job->scale;
            highest = scores[t] > highest ? scores[t] : highest;
        }
        float lanes[LANES] = {0};
        int whole = count - count % LANES;
        for (int t = 0; t < whole; t += LANES) {
            for (int l = 0; l < LANES; l++) {
                scores[t + l] = SUFFIX(exp_lane)(scores[t + l] - highest);
                lanes[l] += scores[t + l];
            }
        }
        float total = SUFFIX(tree8)(lanes);
        for (int t = whole; t < count; t++) {
            scores[t] = SUFFIX(exp_lane)(scores[t] - highest);
            total += scores[t];
        }
        for (int i = 0; i < dim; i++) out[i] = 0.0f;
        for (int t = 0; t < count; t++) {
            const float weight = scores[t], *v = values + (size_t)t * dim;
            for (int i = 0; i < dim; i++) out[i] = fmaf(weight, v[i], out[i]);
        }
        job->slot_max[(size_t)slot * job->heads + head] = highest;
        job->slot_sum[(size_t)slot * job->heads + head] = total;
    }
}

/* The row's chunks for one head, in order: each scaled by e^(its maximum - the largest), summed, normalised. */
void SUFFIX(attention_combine)(const AttentionJob *job, int row, int head) {
    const int dim = job->dim, heads = job->heads;
    const int begin = job->first_slot[row], end = job->first_slot[row + 1];
    float *out = job->out + ((size_t)row * heads + head) * dim;
    const float highest = attention_slots_max(job, row, head);
    float total = 0.0f;
    for (int i = 0; i < dim; i++) out[i] = 0.0f;
    for (int slot = begin; slot < end; slot++) {
        const float factor = SUFFIX(exp_lane)(job->slot_max[(size_t)slot * heads + head] - highest);
        const float *partial = job->slot_out + ((size_t)slot * heads + head) * dim;
        total = fmaf(job->slot_sum[(size_t)slot * heads + head], factor, total);
        for (int i = 0; i < dim; i++) out[i] = fmaf(factor, partial[i], out[i]);
    }
    for (int i = 0; i < dim; i++) out[i] = out[i] / total;
}

/* out = x / sqrt(mean(x^2) + eps) * scale, per row. */
void SUFFIX(rms_norm_rows)(const float *x, ptrdiff_t x_stride, const float *scale, float eps, float *out,
                           ptrdiff_t out_stride, int rows, int dim) {
    for (int r = 0; r < rows; r++) {
        const float *row = x + (ptrdiff_t)r * x_stride;
        float *dest = out + (ptrdiff_t)r * out_stride;
        const float inverse = 1.0f / sqrtf(SUFFIX(sum_squares)(row, dim) / (float)dim + eps);
        for (int i = 0; i < dim; i++) dest[i] = row[i] * inverse * scale[i];
    }
}

/* residual += rms_norm(x) * scale, per row (a sublayer's output normed and added, as Gemma's post-norms do). */
void SUFFIX(add_rms_norm_rows)(const float *x, ptrdiff_t x_stride, const float *scale, float eps, float *residual,
                               ptrdiff_t residual_stride, int rows, int dim) {
    for (int r = 0; r < rows; r++) {
        const float *row = x + (ptrdiff_t)r * x_stride;
        float *dest = residual + (ptrdiff_t)r * residual_stride;
        const float inverse = 1.0f / sqrtf(SUFFIX(sum_squares)(row, dim) / (float)dim + eps);
        for (int i = 0; i < dim; i++) dest[i] = dest[i] + row[i] * inverse * scale[i];
    }
}

/* In place on [rows][heads][dim] (rows x_stride floats apart): each head normed (its own scale row) then rotated by the row's cos and sin, as
 * transformers' rotate_half rotary embedding: y_i = x_i cos_i + rot_i sin_i, rot = (-x[half:], x[:half]). */
void SUFFIX(head_norm_rotary)(float *x, ptrdiff_t x_stride, int rows, int heads, int dim, const float *scales,
                              float eps, const float *cos, const float *sin) {
    const int half = dim / 2;
    float normed[1024];
    if (dim > 1024) return;
    for (int r = 0; r < rows; r++) {
        const float *c = cos + (size_t)r * dim, *s = sin + (size_t)r * dim;
        for (int h = 0; h < heads; h++) {
            float *v = x + (ptrdiff_t)r * x_stride + (ptrdiff_t)h * dim;
            const float *scale = scales + (size_t)h * dim;
            const float inverse = 1.0f / sqrtf(SUFFIX(sum_squares)(v, dim) / (float)dim + eps);
            for (int i = 0; i < dim; i++) normed[i] = v[i] * inverse * scale[i];
            for (int i = 0; i < half; i++) v[i] = fmaf(normed[i], c[i], -normed[i + half] * s[i]);
            for (int i = half; i < dim; i++) v[i] = fmaf(normed[i], c[i], normed[i - half] * s[i]);
        }
    }
}

/* out = gelu_tanh(gate) * up, per element (transformers' gelu_pytorch_tanh: 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715
 * g^3))), with tanh(u) = 1 - 2 / (e^(2u) + 1)). */
void SUFFIX(gelu_tanh_mul)(const float *gate, const float *up, ptrdiff_t in_stride, float *out, ptrdiff_t out_stride,
                           int rows, int dim) {
    for (int r = 0; r < rows; r++) {
        const float *g = gate + (ptrdiff_t)r * in_stride, *u = up + (ptrdiff_t)r * in_stride;
        float *dest = out + (ptrdiff_t)r * out_stride;
        for (int i = 0; i < dim; i++) {
            const float x = g[i];
            const float inner = 0.7978845608028654f * fmaf(0.044715f * x, x * x, x);
            const float tanh_inner = 1.0f - 2.0f / (SUFFIX(exp_lane)(2.0f * inner) + 1.0f);
            dest[i] = 0.5f * x * (1.0f + tanh_inner) * u[i];
        }
    }
}
