/* The products over row blocks (blocks.h) on x86, included once per instruction set by products_avx2.c and
 * products_avx512vnni.c, which define SUFFIX(name) and
 *   DOT(acc, u, x)   acc + 8 int32 lanes, lane r = the sum of u_e * x_e over bytes e = 4r .. 4r + 3
 *                    (u unsigned, x signed)
 * AVX2 forms it with maddubs + madd (no int16 lane can saturate: |u| <= 128 and |x| <= 127 keep a pair's sum
 * within 32,512), AVX-512 VNNI with one dpbusd: the same integers, so both compute blocks.h's floats. Signed
 * weights go in as |w| with w's sign moved onto the activations (sign_epi8), as llama.cpp does.
 *
 * A lane is a weight row: one broadcast of 4 activations meets 4 weights of each of the 8 rows of a block, and
 * the rows' scales come as one vector. A row block is computed against up to TILE_ROWS activation rows at a time
 * (its record read once for all of them); the format and the tile size are compile-time constants in each
 * instance of block_tile.
 *
 * Unpacked products, for many activation rows (a long verification, a prefill chunk): block_tile unpacks a row
 * block's values again for every tile of activation rows, and at 256 rows spends as many instructions on that as
 * on the dots. So from unpacked_min_rows(type) rows the values of UNPACKED_BLOCKS row blocks (one per 8 lanes of
 * the instance's vectors) are unpacked once into a buffer and every tile of UNPACKED_TILE rows reads them there.
 * The same floats lane for lane as block_tile (the integer sums are exact, and each lane's dw * dx, fma and
 * minimum term are block_tile's), so a row's output is the same bits whichever path computed it. Q6_K, and Q8_0
 * without UNSIGNED_Q8_0, stay on block_tile: their signed values need their signs moved onto the activations. The
 * instance defines UNPACKED_BLOCKS, UNPACKED_TILE, its vector types VI
 * (int32) and VF (float) and their operations (VI_LOAD, VI_ZERO, VI_SET1, VI_SUB, VI_DOT, VF_ZERO, VF_LOAD,
 * VF_SET1, VF_CVT, VF_MUL, VF_FMADD, VF_STORE_FIRST(out, v, n): the first n lanes).
 */
#include <immintrin.h>
#include <stdlib.h>

#include "blocks.h"
#include "native.h"

#define TILE_ROWS 4
#define INLINE static inline __attribute__((always_inline))
/* With a dot that cannot saturate (VNNI's dpbusd), Q8_0's signed weights go in as w + 128 (unsigned, a flip of the
 * top bit) and the activations as they are, the product then corrected by 128 * (sum of q): one operation less per
 * row than moving the sign onto the activations. The same integers either way. */
#ifndef UNSIGNED_Q8_0
#define UNSIGNED_Q8_0 0
#endif

/* The offset o of a format's unsigned values as the dots see them (the weight is d * (u - o)): Q8_0's 128 when its
 * values go in as w + 128. */
INLINE int SUFFIX(value_offset)(const int type) {
    return UNSIGNED_Q8_0 && type == TYPE_Q8_0 ? 128 : layout_of(type).offset;
}

INLINE __m256i SUFFIX(fifth_bits)(uint32_t bits) {
    /* bit i of bits -> 16 in byte i */
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
    __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), spread);
    bytes = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
    return _mm256_and_si256(bytes, _mm256_set1_epi8(16));
}

/* The first n (1-8) lanes of v to out. */
INLINE void SUFFIX(store_first_lanes)(float *out, const __m256 v, const int n) {
    if (n == ROW_BLOCK) {
        _mm256_storeu_ps(out, v);
    } else {
        float lanes[ROW_BLOCK];
        _mm256_storeu_ps(lanes, v);
        memcpy(out, lanes, sizeof(float) * (size_t)n);
    }
}

INLINE __m256 SUFFIX(halves)(const uint8_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

INLINE __m256 SUFFIX(bytes_as_floats)(const uint8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* Group g's scales, read from *record, which is moved past them: dw and mw (blocks.h), and Q6_K's half scales.
 * super_d and super_m carry a K-quant super-block's scales from its first group to the next seven. */
typedef struct {
    __m256 dw, mw;
    __m256i half_a, half_b;
} GroupScales;

INLINE GroupScales SUFFIX(group_scales)(const Layout layout, const int g, const uint8_t **record, __m256 *super_d,
                                        __m256 *super_m) {
    GroupScales scales = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    const uint8_t *at = *record;
    if (layout.scales == SCALES_LEGACY) {
        scales.dw = SUFFIX(halves)(at);
        at += 16;
        if (layout.has_min) {
            scales.mw = SUFFIX(halves)(at);
            at += 16;
        }
    } else {
        if ((g & 7) == 0) {
            *super_d = SUFFIX(halves)(at);
            at += 16;
            if (layout.scales == SCALES_K) {
                *super_m = SUFFIX(halves)(at);
                at += 16;
            }
        }
        if (layout.scales == SCALES_K) {
            scales.dw = _mm256_mul_ps(*super_d, SUFFIX(bytes_as_floats)(at));
            scales.mw = _mm256_xor_ps(_mm256_mul_ps(*super_m, SUFFIX(bytes_as_floats)(at + 8)), _mm256_set1_ps(-0.0f));
        } else {
            scales.dw = *super_d;
            scales.half_a = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)at));
            scales.half_b = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(at + 8)));
        }
        at += 16;
    }
    *record = at;
    return scales;
}

/* Chunk c of a group's values (at `values`) for the 8 rows: byte 4r + e = row r's value at column 4c + e, as the
 * file stores it (4- and 5-bit: unsigned; 8-bit: signed). */
INLINE __m256i SUFFIX(chunk_values)(const Layout layout, const uint8_t *values, const int c) {
    if (layout.width == 8) return _mm256_loadu_si256((const __m256i *)(values + 32 * c));
    const __m256i packed = _mm256_loadu_si256((const __m256i *)(values + 32 * (c >> 1)));
    const __m256i w = _mm256_and_si256((c & 1) ? _mm256_srli_epi16(packed, 4) : packed, _mm256_set1_epi8(15));
    return layout.width == 5 ? _mm256_or_si256(w, SUFFIX(fifth_bits)(read_u32(values + 128 + 4 * c))) : w;
}

/* Row block rb against activation rows r0 .. r0 + tile - 1. */
INLINE void SUFFIX(block_tile)(const Activations *a, const Product *p, const uint8_t *record, const int k,
                               const int rb, const int r0, const int tile, const int type) {
    const Layout layout = layout_of(type);
    const int unsigned_q8_0 = UNSIGNED_Q8_0 && type == TYPE_Q8_0;
    const int offset = SUFFIX(value_offset)(type);
    const int groups = k / GROUP;
    const int8_t *xq[TILE_ROWS];
    const float *xd[TILE_ROWS], *xdsum[TILE_ROWS];
    const int32_t *xsum[TILE_ROWS];
    __m256 acc[TILE_ROWS];
    for (int r = 0; r < tile; r++) {
        const size_t row = (size_t)(r0 + r);
        xq[r] = a->q + row * k;
        xd[r] = a->d + row * groups;
        xsum[r] = a->sums + row * groups;
        xdsum[r] = a->dsum + row * groups;
        acc[r] = _mm256_setzero_ps();
    }
    __m256 super_d = _mm256_setzero_ps(), super_m = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++) {
        const GroupScales scales = SUFFIX(group_scales)(layout, g, &record, &super_d, &super_m);
        /* Below 4 rows, two integer sums per row (even and odd chunks), so that a row's dots do not wait on each
         * other; from 4 rows the rows' own sums are chains enough, and a second set would not fit AVX2's 16
         * registers (measured: 256 rows 9.2-10.9 -> 6.3-7.9 ms on AVX2, no change with VNNI). Integer addition is
         * exact, so how the sum is split changes nothing. */
        __m256i lanes[TILE_ROWS], odd[TILE_ROWS], first_half[TILE_ROWS];
        for (int r = 0; r < tile; r++) lanes[r] = odd[r] = _mm256_setzero_si256();
        for (int c = 0; c < 8; c++) {
            const __m256i w = SUFFIX(chunk_values)(layout, record, c);
            const int sign_onto_x = layout.width == 8 && !unsigned_q8_0;
            const __m256i magnitude = unsigned_q8_0 ? _mm256_xor_si256(w, _mm256_set1_epi8((char)0x80))
                                      : sign_onto_x ? _mm256_abs_epi8(w) : w;
            for (int r = 0; r < tile; r++) {
                const __m256i x = _mm256_set1_epi32((int)read_u32((const uint8_t *)xq[r] + (size_t)g * GROUP + 4 * c));
                const __m256i signed_x = sign_onto_x ? _mm256_sign_epi8(x, w) : x;
                if ((c & 1) && tile < 4) odd[r] = DOT(odd[r], magnitude, signed_x);
                else lanes[r] = DOT(lanes[r], magnitude, signed_x);
            }
            if (layout.scales == SCALES_Q6K && c == 3) {
                for (int r = 0; r < tile; r++) {
                    first_half[r] = _mm256_mullo_epi32(_mm256_add_epi32(lanes[r], odd[r]), scales.half_a);
                    lanes[r] = odd[r] = _mm256_setzero_si256();
                }
            }
        }
        for (int r = 0; r < tile; r++) lanes[r] = _mm256_add_epi32(lanes[r], odd[r]);
        record += value_bytes(layout.width);
        for (int r = 0; r < tile; r++) {
            __m256i sum = lanes[r];
            if (layout.scales == SCALES_Q6K) sum = _mm256_add_epi32(first_half[r], _mm256_mullo_epi32(sum, scales.half_b));
            if (offset) sum = _mm256_sub_epi32(sum, _mm256_set1_epi32(offset * xsum[r][g]));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(scales.dw, _mm256_set1_ps(xd[r][g])), acc[r]);
            if (layout.has_min) acc[r] = _mm256_fmadd_ps(scales.mw, _mm256_set1_ps(xdsum[r][g]), acc[r]);
        }
    }
    const int valid = p->rows - rb * ROW_BLOCK < ROW_BLOCK ? p->rows - rb * ROW_BLOCK : ROW_BLOCK;
    for (int r = 0; r < tile; r++) {
        SUFFIX(store_first_lanes)(p->out + (ptrdiff_t)(r0 + r) * p->out_stride + (ptrdiff_t)rb * ROW_BLOCK, acc[r], valid);
    }
}

INLINE void SUFFIX(blocks_of_type)(const Activations *a, const Product *p, const int k, const int block_begin,
                                   const int block_end, const int type) {
    const size_t stride = row_block_bytes(layout_of(type), k / GROUP);
    for (int rb = block_begin; rb < block_end; rb++) {
        const uint8_t *record = p->blocks + (size_t)rb * stride;
        for (int r0 = 0; r0 < a->rows; r0 += TILE_ROWS) {
            switch (a->rows - r0 < TILE_ROWS ? a->rows - r0 : TILE_ROWS) {
            case 4: SUFFIX(block_tile)(a, p, record, k, rb, r0, 4, type); break;
            case 3: SUFFIX(block_tile)(a, p, record, k, rb, r0, 3, type); break;
            case 2: SUFFIX(block_tile)(a, p, record, k, rb, r0, 2, type); break;
            default: SUFFIX(block_tile)(a, p, record, k, rb, r0, 1, type); break;
            }
        }
    }
}

static void SUFFIX(narrow_product_blocks)(const Activations *a, const Product *p, int k, int block_begin,
                                         int block_end) {
    switch (p->type) {
    case 2: SUFFIX(blocks_of_type)(a, p, k, block_begin, block_end, 2); break;
    case 3: SUFFIX(blocks_of_type)(a, p, k, block_begin, block_end, 3); break;
    case 6: SUFFIX(blocks_of_type)(a, p, k, block_begin, block_end, 6); break;
    case 7: SUFFIX(blocks_of_type)(a, p, k, block_begin, block_end, 7); break;
    case 8: SUFFIX(blocks_of_type)(a, p, k, block_begin, block_end, 8); break;
    case 12: SUFFIX(blocks_of_type)(a, p, k, block_begin, block_end, 12); break;
    case 13: SUFFIX(blocks_of_type)(a, p, k, block_begin, block_end, 13); break;
    case 14: SUFFIX(blocks_of_type)(a, p, k, block_begin, block_end, 14); break;
    }
}

/* One group of 32 columns of UNPACKED_BLOCKS row blocks, unpacked: lanes 0-7 the first block's rows, 8-15 the
 * second's. */
typedef struct {
    uint8_t values[8][32 * UNPACKED_BLOCKS]; /* chunk c: rows x 4 unsigned values (Q8_0: w + 128) */
    float dw[8 * UNPACKED_BLOCKS], mw[8 * UNPACKED_BLOCKS];
} UnpackedGroup;

/* Row block `record` into half `half` of every group. */
INLINE void SUFFIX(unpack_block)(const uint8_t *record, const int groups, const int type, UnpackedGroup *unpacked, const int half) {
    const Layout layout = layout_of(type);
    __m256 super_d = _mm256_setzero_ps(), super_m = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++) {
        const GroupScales scales = SUFFIX(group_scales)(layout, g, &record, &super_d, &super_m);
        for (int c = 0; c < 8; c++) {
            __m256i w = SUFFIX(chunk_values)(layout, record, c);
            if (UNSIGNED_Q8_0 && type == TYPE_Q8_0) w = _mm256_xor_si256(w, _mm256_set1_epi8((char)0x80)); /* w + 128 */
            _mm256_storeu_si256((__m256i *)(unpacked[g].values[c] + 32 * half), w);
        }
        _mm256_storeu_ps(unpacked[g].dw + 8 * half, scales.dw);
        _mm256_storeu_ps(unpacked[g].mw + 8 * half, scales.mw);
        record += value_bytes(layout.width);
    }
}

/* The unpacked groups against activation rows r0 .. r0 + tile - 1; lanes outside `lanes` are not stored. */
INLINE void SUFFIX(unpacked_tile)(const Activations *a, const Product *p, const UnpackedGroup *unpacked, const int groups, const int rb,
                               const int r0, const int tile, const int type, const int lanes) {
    const Layout layout = layout_of(type);
    const int offset = SUFFIX(value_offset)(type);
    const int k = groups * GROUP;
    VF acc[UNPACKED_TILE];
    for (int r = 0; r < tile; r++) acc[r] = VF_ZERO();
    for (int g = 0; g < groups; g++) {
        VI sums[UNPACKED_TILE];
        for (int r = 0; r < tile; r++) sums[r] = VI_ZERO();
        for (int c = 0; c < 8; c++) {
            const VI w = VI_LOAD(unpacked[g].values[c]);
            for (int r = 0; r < tile; r++) {
                const uint8_t *x = (const uint8_t *)a->q + (size_t)(r0 + r) * k + (size_t)g * GROUP + 4 * c;
                sums[r] = VI_DOT(sums[r], w, VI_SET1((int)read_u32(x)));
            }
        }
        const VF dw = VF_LOAD(unpacked[g].dw), mw = VF_LOAD(unpacked[g].mw);
        for (int r = 0; r < tile; r++) {
            const size_t at = (size_t)(r0 + r) * groups + g;
            VI sum = sums[r];
            if (offset) sum = VI_SUB(sum, VI_SET1(offset * a->sums[at]));
            acc[r] = VF_FMADD(VF_CVT(sum), VF_MUL(dw, VF_SET1(a->d[at])), acc[r]);
            if (layout.has_min) acc[r] = VF_FMADD(mw, VF_SET1(a->dsum[at]), acc[r]);
        }
    }
    for (int r = 0; r < tile; r++)
        VF_STORE_FIRST(p->out + (ptrdiff_t)(r0 + r) * p->out_stride + (ptrdiff_t)rb * ROW_BLOCK, acc[r], lanes);
}

INLINE void SUFFIX(unpacked_blocks_of_type)(const Activations *a, const Product *p, const int k, const int block_begin,
                                const int block_end, const int type, UnpackedGroup *unpacked) {
    const int groups = k / GROUP;
    const size_t stride = row_block_bytes(layout_of(type), groups);
    for (int rb = block_begin; rb < block_end; rb += UNPACKED_BLOCKS) {
        const int pair = UNPACKED_BLOCKS == 2 && rb + 1 < block_end;
        SUFFIX(unpack_block)(p->blocks + (size_t)rb * stride, groups, type, unpacked, 0);
        if (pair) {
            SUFFIX(unpack_block)(p->blocks + (size_t)(rb + 1) * stride, groups, type, unpacked, 1);
        } else if (UNPACKED_BLOCKS == 2) {
            for (int g = 0; g < groups; g++) { /* lanes 8-15 computed but not stored */
                for (int c = 0; c < 8; c++) memset(unpacked[g].values[c] + 32, 0, 32);
                memset(unpacked[g].dw + 8, 0, 32);
                memset(unpacked[g].mw + 8, 0, 32);
            }
        }
        /* Only a weight's last row block can be partial. */
        const int rows = p->rows - rb * ROW_BLOCK, lanes = rows < (pair + 1) * ROW_BLOCK ? rows : (pair + 1) * ROW_BLOCK;
        for (int r0 = 0; r0 < a->rows; r0 += UNPACKED_TILE) {
            switch (a->rows - r0 < UNPACKED_TILE ? a->rows - r0 : UNPACKED_TILE) {
#if UNPACKED_TILE == 8
            case 8: SUFFIX(unpacked_tile)(a, p, unpacked, groups, rb, r0, 8, type, lanes); break;
            case 7: SUFFIX(unpacked_tile)(a, p, unpacked, groups, rb, r0, 7, type, lanes); break;
            case 6: SUFFIX(unpacked_tile)(a, p, unpacked, groups, rb, r0, 6, type, lanes); break;
            case 5: SUFFIX(unpacked_tile)(a, p, unpacked, groups, rb, r0, 5, type, lanes); break;
#endif
            case 4: SUFFIX(unpacked_tile)(a, p, unpacked, groups, rb, r0, 4, type, lanes); break;
            case 3: SUFFIX(unpacked_tile)(a, p, unpacked, groups, rb, r0, 3, type, lanes); break;
            case 2: SUFFIX(unpacked_tile)(a, p, unpacked, groups, rb, r0, 2, type, lanes); break;
            default: SUFFIX(unpacked_tile)(a, p, unpacked, groups, rb, r0, 1, type, lanes); break;
            }
        }
    }
}

/* From how many activation rows unpacking pays (2-vCPU Xeon, 2 threads, medians of 30 calls, AVX-512 VNNI): a
 * 2048 x 640 Q5_0 weight 0.105-0.118 -> 0.078-0.087 ms at 5 rows; a 640 x 2048 Q4_K one, whose scales take more
 * unpacking and which has fewer row blocks to share it, 0.086-0.116 -> 0.118-0.140 ms at 4-5 rows and even at 9-13.
 * 0: left to block_tile. */
INLINE int SUFFIX(unpacked_min_rows)(const int type) {
    if (type == TYPE_Q6_K || (type == TYPE_Q8_0 && !UNSIGNED_Q8_0)) return 0;
    return type == TYPE_Q4_K || type == TYPE_Q5_K ? 16 : 5;
}

void SUFFIX(product_blocks)(const Activations *a, const Product *p, int k, int block_begin, int block_end) {
    const int min_rows = SUFFIX(unpacked_min_rows)(p->type);
    UnpackedGroup *unpacked = NULL;
    if (min_rows && a->rows >= min_rows)
        unpacked = aligned_alloc(64, sizeof(UnpackedGroup) * (size_t)(k / GROUP)); /* a multiple of 64 bytes */
    if (unpacked == NULL) { /* few rows, a format left to block_tile, or no memory for the unpacked values */
        SUFFIX(narrow_product_blocks)(a, p, k, block_begin, block_end);
        return;
    }
    switch (p->type) {
    case TYPE_Q4_0: SUFFIX(unpacked_blocks_of_type)(a, p, k, block_begin, block_end, TYPE_Q4_0, unpacked); break;
    case TYPE_Q4_1: SUFFIX(unpacked_blocks_of_type)(a, p, k, block_begin, block_end, TYPE_Q4_1, unpacked); break;
    case TYPE_Q5_0: SUFFIX(unpacked_blocks_of_type)(a, p, k, block_begin, block_end, TYPE_Q5_0, unpacked); break;
    case TYPE_Q5_1: SUFFIX(unpacked_blocks_of_type)(a, p, k, block_begin, block_end, TYPE_Q5_1, unpacked); break;
    case TYPE_Q8_0: SUFFIX(unpacked_blocks_of_type)(a, p, k, block_begin, block_end, TYPE_Q8_0, unpacked); break;
    case TYPE_Q4_K: SUFFIX(unpacked_blocks_of_type)(a, p, k, block_begin, block_end, TYPE_Q4_K, unpacked); break;
    case TYPE_Q5_K: SUFFIX(unpacked_blocks_of_type)(a, p, k, block_begin, block_end, TYPE_Q5_K, unpacked); break;
    }
    free(unpacked);
}
