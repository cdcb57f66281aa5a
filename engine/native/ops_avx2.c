/* Attention and the small operations with AVX2 + FMA intrinsics: the computation ops_scalar.c defines, lane for
 * lane (ops_scalar.c's lane l of 32 is lane l % 8 of vector l / 8 here), so both give the same floats. */
#include "native.h"
#ifdef MTP_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>
#include <math.h>

#define INLINE static inline __attribute__((always_inline))

INLINE float sum8(__m256 v) { /* ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)), as ops_scalar.c's tree8 */
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

INLINE float fma1(float a, float b, float c) {
    return _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(a), _mm_set_ss(b), _mm_set_ss(c)));
}

/* ops_scalar.c's dot: 32 lanes in four vectors, folded (v0 + v1) + (v2 + v3), then the tree, then the tail. */
INLINE float dot(const float *a, const float *b, int n) {
    __m256 v0 = _mm256_setzero_ps(), v1 = v0, v2 = v0, v3 = v0;
    const int whole = n - n % 32;
    for (int i = 0; i < whole; i += 32) {
        v0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), v0);
        v1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), v1);
        v2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), v2);
        v3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), v3);
    }
    float total = sum8(_mm256_add_ps(_mm256_add_ps(v0, v1), _mm256_add_ps(v2, v3)));
    for (int i = whole; i < n; i++) total = fma1(a[i], b[i], total);
    return total;
}

/* ops_scalar.c's exp_lane on 8 lanes. */
INLINE __m256 exp8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    x = _mm256_min_ps(x, _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693359375f), x);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}

INLINE float exp1(float x) { /* one lane of exp8, for tails */
    return _mm256_cvtss_f32(exp8(_mm256_set1_ps(x)));
}

/* ops_scalar.c's attention_chunk. */
void attention_chunk_avx2(const AttentionJob *job, int row, int slot, int chunk, int kv_head) {
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
            scores[t] = dot(q, keys + (size_t)t * dim, dim) * job->scale;
            highest = scores[t] > highest ? scores[t] : highest;
        }
        const __m256 top = _mm256_set1_ps(highest);
        __m256 lanes = _mm256_setzero_ps();
        const int whole = count - count % 8;
        for (int t = 0; t < whole; t += 8) {
            const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + t), top));
            _mm256_storeu_ps(scores + t, e);
            lanes = _mm256_add_ps(lanes, e);
        }
        float total = sum8(lanes);
        for (int t = whole; t < count; t++) {
            scores[t] = exp1(scores[t] - highest);
            total += scores[t];
        }
        /* 64 dimensions at a time in registers, each a sum over the keys in order */
        int i = 0;
        for (; i + 64 <= dim; i += 64) {
            __m256 acc[8];
            for (int c = 0; c < 8; c++) acc[c] = _mm256_setzero_ps();
            for (int t = 0; t < count; t++) {
                const __m256 weight = _mm256_set1_ps(scores[t]);
                const float *v = values + (size_t)t * dim + i;
                for (int c = 0; c < 8; c++) acc[c] = _mm256_fmadd_ps(weight, _mm256_loadu_ps(v + 8 * c), acc[c]);
            }
            for (int c = 0; c < 8; c++) _mm256_storeu_ps(out + i + 8 * c, acc[c]);
        }
        for (; i < dim; i++) {
            float acc = 0.0f;
            for (int t = 0; t < count; t++) acc = fma1(scores[t], values[(size_t)t * dim + i], acc);
            out[i] = acc;
        }
        job->slot_max[(size_t)slot * job->heads + head] = highest;
        job->slot_sum[(size_t)slot * job->heads + head] = total;
    }
}

/* ops_scalar.c's attention_combine. */
void attention_combine_avx2(const AttentionJob *job, int row, int head) {
    const int dim = job->dim, heads = job->heads;
    const int begin = job->first_slot[row], end = job->first_slot[row + 1];
    float *out = job->out + ((size_t)row * heads + head) * dim;
    const float highest = attention_slots_max(job, row, head);
    float total = 0.0f;
    int i;
    for (i = 0; i < dim; i++) out[i] = 0.0f;
    for (int slot = begin; slot < end; slot++) {
        const float factor = exp1(job->slot_max[(size_t)slot * heads + head] - highest);
        const float *partial = job->slot_out + ((size_t)slot * heads + head) * dim;
        total = fma1(job->slot_sum[(size_t)slot * heads + head], factor, total);
        const __m256 f = _mm256_set1_ps(factor);
        for (i = 0; i + 8 <= dim; i += 8) {
            _mm256_storeu_ps(out + i, _mm256_fmadd_ps(f, _mm256_loadu_ps(partial + i), _mm256_loadu_ps(out + i)));
        }
        for (; i < dim; i++) out[i] = fma1(factor, partial[i], out[i]);
    }
    const __m256 divisor = _mm256_set1_ps(total);
    for (i = 0; i + 8 <= dim; i += 8) _mm256_storeu_ps(out + i, _mm256_div_ps(_mm256_loadu_ps(out + i), divisor));
    for (; i < dim; i++) out[i] = out[i] / total;
}

/* dest = x * inverse * scale (+ dest when accumulate), elementwise. */
INLINE void scaled_row(const float *x, float inverse, const float *scale, float *dest, int dim, int accumulate) {
    const __m256 inv = _mm256_set1_ps(inverse);
    int i = 0;
    for (; i + 8 <= dim; i += 8) {
        __m256 y = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), inv), _mm256_loadu_ps(scale + i));
        if (accumulate) y = _mm256_add_ps(_mm256_loadu_ps(dest + i), y);
        _mm256_storeu_ps(dest + i, y);
    }
    for (; i < dim; i++) dest[i] = accumulate ? dest[i] + x[i] * inverse * scale[i] : x[i] * inverse * scale[i];
}

INLINE float inverse_rms(const float *x, int dim, float eps) {
    return 1.0f / sqrtf(dot(x, x, dim) / (float)dim + eps);
}

void rms_norm_rows_avx2(const float *x, ptrdiff_t x_stride, const float *scale, float eps, float *out,
                        ptrdiff_t out_stride, int rows, int dim) {
    for (int r = 0; r < rows; r++) {
        const float *row = x + (ptrdiff_t)r * x_stride;
        scaled_row(row, inverse_rms(row, dim, eps), scale, out + (ptrdiff_t)r * out_stride, dim, 0);
    }
}

void add_rms_norm_rows_avx2(const float *x, ptrdiff_t x_stride, const float *scale, float eps, float *residual,
                            ptrdiff_t residual_stride, int rows, int dim) {
    for (int r = 0; r < rows; r++) {
        const float *row = x + (ptrdiff_t)r * x_stride;
        scaled_row(row, inverse_rms(row, dim, eps), scale, residual + (ptrdiff_t)r * residual_stride, dim, 1);
    }
}

void head_norm_rotary_avx2(float *x, ptrdiff_t x_stride, int rows, int heads, int dim, const float *scales,
                           float eps, const float *cos, const float *sin) {
    const int half = dim / 2;
    float normed[1024];
    if (dim > 1024) return;
    for (int r = 0; r < rows; r++) {
        const float *c = cos + (size_t)r * dim, *s = sin + (size_t)r * dim;
        for (int h = 0; h < heads; h++) {
            float *v = x + (ptrdiff_t)r * x_stride + (ptrdiff_t)h * dim;
            scaled_row(v, inverse_rms(v, dim, eps), scales + (size_t)h * dim, normed, dim, 0);
            int i = 0;
            for (; i + 8 <= half; i += 8) {
                const __m256 low = _mm256_loadu_ps(normed + i), high = _mm256_loadu_ps(normed + i + half);
                /* -(high * s) by flipping the sign bit: the scalar code's unary minus, zeros included */
                const __m256 rotated_low = _mm256_xor_ps(_mm256_mul_ps(high, _mm256_loadu_ps(s + i)),
                                                         _mm256_set1_ps(-0.0f));
                _mm256_storeu_ps(v + i, _mm256_fmadd_ps(low, _mm256_loadu_ps(c + i), rotated_low));
                _mm256_storeu_ps(v + i + half, _mm256_fmadd_ps(high, _mm256_loadu_ps(c + i + half),
                                                               _mm256_mul_ps(low, _mm256_loadu_ps(s + i + half))));
            }
            for (; i < half; i++) {
                v[i] = fma1(normed[i], c[i], -(normed[i + half] * s[i]));
                v[i + half] = fma1(normed[i + half], c[i + half], normed[i] * s[i + half]);
            }
        }
    }
}

INLINE __m256 gelu_tanh_mul8(__m256 x, __m256 u) {
    const __m256 inner = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                       _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), x),
                                                       _mm256_mul_ps(x, x), x));
    const __m256 e = exp8(_mm256_mul_ps(_mm256_set1_ps(2.0f), inner));
    const __m256 tanh_inner = _mm256_sub_ps(_mm256_set1_ps(1.0f), _mm256_div_ps(_mm256_set1_ps(2.0f),
                                                                                _mm256_add_ps(e, _mm256_set1_ps(1.0f))));
    const __m256 half_x = _mm256_mul_ps(_mm256_set1_ps(0.5f), x);
    return _mm256_mul_ps(_mm256_mul_ps(half_x, _mm256_add_ps(_mm256_set1_ps(1.0f), tanh_inner)), u);
}

void gelu_tanh_mul_avx2(const float *gate, const float *up, ptrdiff_t in_stride, float *out, ptrdiff_t out_stride,
                        int rows, int dim) {
    for (int r = 0; r < rows; r++) {
        const float *g = gate + (ptrdiff_t)r * in_stride, *u = up + (ptrdiff_t)r * in_stride;
        float *dest = out + (ptrdiff_t)r * out_stride;
        int i = 0;
        for (; i + 8 <= dim; i += 8) {
            _mm256_storeu_ps(dest + i, gelu_tanh_mul8(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i)));
        }
        for (; i < dim; i++) dest[i] = _mm256_cvtss_f32(gelu_tanh_mul8(_mm256_set1_ps(g[i]), _mm256_set1_ps(u[i])));
    }
}

#pragma GCC pop_options
#endif
