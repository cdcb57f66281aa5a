/* Row blocks (blocks.h): GGUF rows regrouped 8 at a time, read back as floats, and the products in plain C, which
 * are the fallback on CPUs without AVX2 and the definition the SIMD kernels are held to, bit for bit. */
#include <math.h>
#include <stdlib.h>

#include "blocks.h"
#include "native.h"

size_t repacked_bytes(int type, int rows, int k) {
    Layout layout = layout_of(type);
    if (layout.width == 0 || row_bytes(type, k) == 0 || rows < 0) return 0;
    return (size_t)((rows + ROW_BLOCK - 1) / ROW_BLOCK) * row_block_bytes(layout, k / GROUP);
}

/* The raw scales of group g of a GGUF row, as the record stores them for its lane. */
typedef struct {
    uint16_t d, m;     /* legacy: fp16 d (and m); K: fp16 d, dmin of the super-block; Q6_K: fp16 d */
    uint8_t scale, min; /* K: the group's 6-bit scale and min */
    int8_t half_a, half_b; /* Q6_K */
} RawScales;

static RawScales raw_scales(int type, const uint8_t *row, int g) {
    RawScales s = {0, 0, 0, 0, 0, 0};
    const uint8_t *b;
    switch (type) {
    case 2: s.d = read_u16(row + (size_t)g * Q4_0_BYTES); break;
    case 3: b = row + (size_t)g * Q4_1_BYTES; s.d = read_u16(b); s.m = read_u16(b + 2); break;
    case 6: s.d = read_u16(row + (size_t)g * Q5_0_BYTES); break;
    case 7: b = row + (size_t)g * Q5_1_BYTES; s.d = read_u16(b); s.m = read_u16(b + 2); break;
    case 8: s.d = read_u16(row + (size_t)g * Q8_0_BYTES); break;
    case 12: case 13:
        b = row + (size_t)(g >> 3) * (type == 12 ? Q4_K_BYTES : Q5_K_BYTES);
        s.d = read_u16(b);
        s.m = read_u16(b + 2);
        k_scale_min(g & 7, b + 4, &s.scale, &s.min);
        break;
    case 14: {
        int j = g & 7;
        b = row + (size_t)(g >> 3) * Q6_K_BYTES;
        s.d = read_u16(b + 208);
        s.half_a = (int8_t)b[192 + 8 * (j >> 2) + 2 * (j & 3)];
        s.half_b = (int8_t)b[192 + 8 * (j >> 2) + 2 * (j & 3) + 1];
        break;
    }
    }
    return s;
}

void repack_rows(int type, const uint8_t *gguf, int rows, int k, uint8_t *out, int block_begin, int block_end) {
    const Layout layout = layout_of(type);
    const int groups = k / GROUP;
    const size_t in_stride = row_bytes(type, k), block_bytes = row_block_bytes(layout, groups);
    for (int rb = block_begin; rb < block_end; rb++) {
        uint8_t *record = out + (size_t)rb * block_bytes;
        for (int g = 0; g < groups; g++) {
            RawScales scales[ROW_BLOCK];
            int u[ROW_BLOCK][GROUP];
            for (int r = 0; r < ROW_BLOCK; r++) {
                const int j = rb * ROW_BLOCK + r;
                if (j >= rows) { /* padding rows: zero scales and values, so their outputs are 0 (and unused) */
                    memset(&scales[r], 0, sizeof scales[r]);
                    memset(u[r], 0, sizeof u[r]);
                    continue;
                }
                const uint8_t *row = gguf + (size_t)j * in_stride;
                Group group;
                read_gguf_group(type, row, g, &group);
                scales[r] = raw_scales(type, row, g);
                for (int e = 0; e < GROUP; e++) u[r][e] = group.v[e] + layout.offset;
            }
            if (layout.scales == SCALES_LEGACY) {
                for (int r = 0; r < ROW_BLOCK; r++) memcpy(record + 2 * r, &scales[r].d, 2);
                record += 16;
                if (layout.has_min) {
                    for (int r = 0; r < ROW_BLOCK; r++) memcpy(record + 2 * r, &scales[r].m, 2);
                    record += 16;
                }
            } else {
                if ((g & 7) == 0) {
                    for (int r = 0; r < ROW_BLOCK; r++) memcpy(record + 2 * r, &scales[r].d, 2);
                    record += 16;
                    if (layout.scales == SCALES_K) {
                        for (int r = 0; r < ROW_BLOCK; r++) memcpy(record + 2 * r, &scales[r].m, 2);
                        record += 16;
                    }
                }
                for (int r = 0; r < ROW_BLOCK; r++) {
                    record[r] = layout.scales == SCALES_K ? scales[r].scale : (uint8_t)scales[r].half_a;
                    record[8 + r] = layout.scales == SCALES_K ? scales[r].min : (uint8_t)scales[r].half_b;
                }
                record += 16;
            }
            if (layout.width == 8) {
                for (int c = 0; c < 8; c++)
                    for (int r = 0; r < ROW_BLOCK; r++)
                        for (int e = 0; e < 4; e++) record[32 * c + 4 * r + e] = (uint8_t)(int8_t)u[r][4 * c + e];
            } else {
                for (int p = 0; p < 4; p++)
                    for (int r = 0; r < ROW_BLOCK; r++)
                        for (int e = 0; e < 4; e++)
                            record[32 * p + 4 * r + e] =
                                (uint8_t)((u[r][8 * p + e] & 15) | ((u[r][8 * p + 4 + e] & 15) << 4));
                if (layout.width == 5) {
                    for (int c = 0; c < 8; c++) {
                        uint32_t word = 0;
                        for (int r = 0; r < ROW_BLOCK; r++)
                            for (int e = 0; e < 4; e++) word |= (uint32_t)((u[r][4 * c + e] >> 4) & 1) << (4 * r + e);
                        memcpy(record + 128 + 4 * c, &word, 4);
                    }
                }
            }
            record += value_bytes(layout.width);
        }
    }
}

/* Walks the groups of one lane (row) of a row block in order. */
typedef struct {
    Layout layout;
    const uint8_t *record;
    float super_d, super_m;
    int lane;
} Reader;

static void next_group(Reader *reader, int g, Group *group) {
    const Layout layout = reader->layout;
    const uint8_t *record = reader->record;
    const int lane = reader->lane;
    group->half_scale[0] = group->half_scale[1] = 1;
    group->has_min = layout.has_min;
    group->mw = 0.0f;
    if (layout.scales == SCALES_LEGACY) {
        group->dw = half_to_float(read_u16(record + 2 * lane));
        record += 16;
        if (layout.has_min) {
            group->mw = half_to_float(read_u16(record + 2 * lane));
            record += 16;
        }
    } else {
        if ((g & 7) == 0) {
            reader->super_d = half_to_float(read_u16(record + 2 * lane));
            record += 16;
            if (layout.scales == SCALES_K) {
                reader->super_m = half_to_float(read_u16(record + 2 * lane));
                record += 16;
            }
        }
        if (layout.scales == SCALES_K) {
            group->dw = reader->super_d * (float)record[lane];
            group->mw = -(reader->super_m * (float)record[8 + lane]);
        } else {
            group->dw = reader->super_d;
            group->half_scale[0] = (int8_t)record[lane];
            group->half_scale[1] = (int8_t)record[8 + lane];
        }
        record += 16;
    }
    for (int e = 0; e < GROUP; e++) {
        const int c = e / 4, i = 4 * lane + e % 4;
        int value;
        if (layout.width == 8) {
            value = (int8_t)record[32 * c + i];
        } else {
            const uint8_t packed = record[32 * (c / 2) + i];
            value = (c & 1) ? packed >> 4 : packed & 15;
            if (layout.width == 5) value |= (int)((read_u32(record + 128 + 4 * c) >> i) & 1) << 4;
            value -= layout.offset;
        }
        group->v[e] = value;
    }
    reader->record = record + value_bytes(layout.width);
}

static Reader reader_of(int type, const uint8_t *blocks, int k, int row) {
    const Layout layout = layout_of(type);
    Reader reader = {layout, blocks + (size_t)(row / ROW_BLOCK) * row_block_bytes(layout, k / GROUP), 0.0f, 0.0f,
                     row % ROW_BLOCK};
    return reader;
}

void dequantize_repacked_row(int type, const uint8_t *blocks, int k, int row, float *out) {
    Reader reader = reader_of(type, blocks, k, row);
    Group group;
    for (int g = 0; g < k / GROUP; g++) {
        next_group(&reader, g, &group);
        for (int e = 0; e < GROUP; e++) {
            float w = group.dw * (float)(group.half_scale[e >> 4] * group.v[e]);
            out[g * GROUP + e] = group.has_min ? w + group.mw : w;
        }
    }
}

void product_blocks_scalar(const Activations *a, const Product *p, int k, int block_begin, int block_end) {
    const int groups = k / GROUP;
    Group *row_groups = malloc(sizeof(Group) * (size_t)groups);
    if (row_groups == NULL) return;
    for (int j = block_begin * ROW_BLOCK; j < block_end * ROW_BLOCK && j < p->rows; j++) {
        Reader reader = reader_of(p->type, p->blocks, k, j);
        for (int g = 0; g < groups; g++) next_group(&reader, g, &row_groups[g]);
        for (int r = 0; r < a->rows; r++) {
            const int8_t *q = a->q + (size_t)r * k;
            float acc = 0.0f;
            for (int g = 0; g < groups; g++) {
                const Group *group = &row_groups[g];
                int32_t halves[2] = {0, 0};
                for (int e = 0; e < GROUP; e++) halves[e >> 4] += group->v[e] * q[g * GROUP + e];
                const int32_t lanes = group->half_scale[0] * halves[0] + group->half_scale[1] * halves[1];
                acc = fmaf((float)lanes, group->dw * a->d[(size_t)r * groups + g], acc);
                if (group->has_min) acc = fmaf(group->mw, a->dsum[(size_t)r * groups + g], acc);
            }
            p->out[(ptrdiff_t)r * p->out_stride + j] = acc;
        }
    }
    free(row_groups);
}
