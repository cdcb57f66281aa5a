/* GGUF rows in plain C: the formats' sizes, a group of a row read as integers and scales, a row as floats; and
 * the quantization of activations that every product kernel uses. */
#include <math.h>
#include <stdlib.h>

#include "blocks.h"
#include "native.h"

int block_values(int type) {
    switch (type) {
    case TYPE_Q4_0: case TYPE_Q4_1: case TYPE_Q5_0: case TYPE_Q5_1: case TYPE_Q8_0: return GROUP;
    case TYPE_Q4_K: case TYPE_Q5_K: case TYPE_Q6_K: return SUPER;
    default: return 0;
    }
}

static int block_bytes(int type) {
    switch (type) {
    case TYPE_Q4_0: return Q4_0_BYTES;
    case TYPE_Q4_1: return Q4_1_BYTES;
    case TYPE_Q5_0: return Q5_0_BYTES;
    case TYPE_Q5_1: return Q5_1_BYTES;
    case TYPE_Q8_0: return Q8_0_BYTES;
    case TYPE_Q4_K: return Q4_K_BYTES;
    case TYPE_Q5_K: return Q5_K_BYTES;
    case TYPE_Q6_K: return Q6_K_BYTES;
    default: return 0;
    }
}

size_t row_bytes(int type, int k) {
    int values = block_values(type);
    if (values == 0 || k <= 0 || k % values) return 0;
    return (size_t)(k / values) * (size_t)block_bytes(type);
}

void read_gguf_group(int type, const uint8_t *row, int g, Group *group) {
    const uint8_t *b, *qs;
    uint32_t qh;
    uint8_t scale, min;
    int j = g & 7;
    int offset = 0;
    group->mw = 0.0f;
    group->half_scale[0] = group->half_scale[1] = 1;
    group->has_min = 0;
    switch (type) {
    case TYPE_Q4_0:
        b = row + (size_t)g * Q4_0_BYTES;
        group->dw = half_to_float(read_u16(b));
        for (int e = 0; e < 16; e++) group->v[e] = b[2 + e] & 15, group->v[e + 16] = b[2 + e] >> 4;
        offset = 8;
        break;
    case TYPE_Q4_1:
        b = row + (size_t)g * Q4_1_BYTES;
        group->dw = half_to_float(read_u16(b));
        group->mw = half_to_float(read_u16(b + 2));
        group->has_min = 1;
        for (int e = 0; e < 16; e++) group->v[e] = b[4 + e] & 15, group->v[e + 16] = b[4 + e] >> 4;
        break;
    case TYPE_Q5_0: case TYPE_Q5_1:
        if (type == TYPE_Q5_0) {
            b = row + (size_t)g * Q5_0_BYTES;
            qh = read_u32(b + 2);
            qs = b + 6;
            offset = 16;
        } else {
            b = row + (size_t)g * Q5_1_BYTES;
            group->mw = half_to_float(read_u16(b + 2));
            group->has_min = 1;
            qh = read_u32(b + 4);
            qs = b + 8;
        }
        group->dw = half_to_float(read_u16(b));
        for (int e = 0; e < 16; e++) {
            group->v[e] = (qs[e] & 15) | (int)(((qh >> e) & 1) << 4);
            group->v[e + 16] = (qs[e] >> 4) | (int)(((qh >> (e + 16)) & 1) << 4);
        }
        break;
    case TYPE_Q8_0:
        b = row + (size_t)g * Q8_0_BYTES;
        group->dw = half_to_float(read_u16(b));
        for (int e = 0; e < GROUP; e++) group->v[e] = (int8_t)b[2 + e];
        break;
    case TYPE_Q4_K: case TYPE_Q5_K: {
        int bytes = type == TYPE_Q4_K ? Q4_K_BYTES : Q5_K_BYTES;
        b = K_SUPER(row, g, bytes);
        k_scale_min(j, b + 4, &scale, &min);
        group->dw = half_to_float(read_u16(b)) * (float)scale;
        group->mw = -(half_to_float(read_u16(b + 2)) * (float)min);
        group->has_min = 1;
        qs = b + (type == TYPE_Q4_K ? 16 : 48) + 32 * (j >> 1);
        for (int e = 0; e < GROUP; e++) {
            int nibble = (j & 1) ? qs[e] >> 4 : qs[e] & 15;
            int fifth = type == TYPE_Q5_K ? ((b[16 + e] >> j) & 1) << 4 : 0;
            group->v[e] = nibble | fifth;
        }
        break;
    }
    case TYPE_Q6_K: {
        int half = j >> 2, t = j & 3;
        b = K_SUPER(row, g, Q6_K_BYTES);
        const uint8_t *ql = b + 64 * half + 32 * (t & 1), *high = b + 128 + 32 * half;
        const int8_t *scales = (const int8_t *)(b + 192) + 8 * half + 2 * t;
        group->dw = half_to_float(read_u16(b + 208));
        offset = 32;
        group->half_scale[0] = scales[0];
        group->half_scale[1] = scales[1];
        for (int e = 0; e < GROUP; e++) {
            int nibble = t >= 2 ? ql[e] >> 4 : ql[e] & 15;
            group->v[e] = nibble | (((high[e] >> (2 * t)) & 3) << 4);
        }
        break;
    }
    }
    for (int e = 0; e < GROUP; e++) group->v[e] -= offset;
}

void dequantize_gguf_row(int type, const uint8_t *row, int k, float *out) {
    Group group;
    for (int g = 0; g < k / GROUP; g++) {
        read_gguf_group(type, row, g, &group);
        for (int e = 0; e < GROUP; e++) {
            float w = group.dw * (float)(group.half_scale[e >> 4] * group.v[e]);
            out[g * GROUP + e] = group.has_min ? w + group.mw : w;
        }
    }
}

void quantize_activations(const float *x, ptrdiff_t x_stride, Activations *a, int row_begin, int row_end) {
    int k = a->k, groups = k / GROUP;
    for (int r = row_begin; r < row_end; r++) {
        const float *row = x + (ptrdiff_t)r * x_stride;
        int8_t *q = a->q + (size_t)r * k;
        for (int g = 0; g < groups; g++) {
            float amax = 0.0f;
            for (int e = 0; e < GROUP; e++) {
                float magnitude = fabsf(row[g * GROUP + e]);
                amax = magnitude > amax ? magnitude : amax;
            }
            float inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
            int sum = 0;
            for (int e = 0; e < GROUP; e++) {
                float scaled = nearbyintf(row[g * GROUP + e] * inverse);
                int value = scaled > 127.0f ? 127 : scaled < -127.0f ? -127 : (int)scaled;
                q[g * GROUP + e] = (int8_t)value;
                sum += value;
            }
            float d = amax / 127.0f;
            a->d[(size_t)r * groups + g] = d;
            a->sums[(size_t)r * groups + g] = sum;
            a->dsum[(size_t)r * groups + g] = d * (float)sum;
        }
    }
}
