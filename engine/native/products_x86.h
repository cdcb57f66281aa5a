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
 */
#include <immintrin.h>

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

INLINE __m256i SUFFIX(fifth_bits)(uint32_t bits) {
    /* bit i of bits -> 16 in byte i */
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
    __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), spread);
    bytes = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
    return _mm256_and_si256(bytes, _mm256_set1_epi8(16));
}

INLINE __m256 SUFFIX(halves)(const uint8_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

INLINE __m256 SUFFIX(bytes_as_floats)(const uint8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* Row block rb against activation rows r0 .. r0 + tile - 1. */
INLINE void SUFFIX(block_tile)(const Activations *a, const Product *p, const uint8_t *record, const int k,
                               const int rb, const int r0, const int tile, const int type) {
    const Layout layout = layout_of(type);
    const int unsigned_q8_0 = UNSIGNED_Q8_0 && type == TYPE_Q8_0;
    const int offset = unsigned_q8_0 ? 128 : layout.offset;
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
        __m256 dw, mw = _mm256_setzero_ps();
        __m256i half_a = _mm256_setzero_si256(), half_b = half_a;
        if (layout.scales == SCALES_LEGACY) {
            dw = SUFFIX(halves)(record);
            record += 16;
            if (layout.has_min) {
                mw = SUFFIX(halves)(record);
                record += 16;
            }
        } else {
            if ((g & 7) == 0) {
                super_d = SUFFIX(halves)(record);
                record += 16;
                if (layout.scales == SCALES_K) {
                    super_m = SUFFIX(halves)(record);
                    record += 16;
                }
            }
            if (layout.scales == SCALES_K) {
                dw = _mm256_mul_ps(super_d, SUFFIX(bytes_as_floats)(record));
                mw = _mm256_xor_ps(_mm256_mul_ps(super_m, SUFFIX(bytes_as_floats)(record + 8)), _mm256_set1_ps(-0.0f));
            } else {
                dw = super_d;
                half_a = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)record));
                half_b = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(record + 8)));
            }
            record += 16;
        }
        /* Below 4 rows, two integer sums per row (even and odd chunks), so that a row's dots do not wait on each
         * other; from 4 rows the rows' own sums are chains enough, and a second set would not fit AVX2's 16
         * registers (measured: 256 rows 9.2-10.9 -> 6.3-7.9 ms on AVX2, no change with VNNI). Integer addition is
         * exact, so how the sum is split changes nothing. */
        __m256i lanes[TILE_ROWS], odd[TILE_ROWS], first_half[TILE_ROWS];
        for (int r = 0; r < tile; r++) lanes[r] = odd[r] = _mm256_setzero_si256();
        for (int c = 0; c < 8; c++) {
            __m256i w;
            if (layout.width == 8) {
                w = _mm256_loadu_si256((const __m256i *)(record + 32 * c));
            } else {
                const __m256i packed = _mm256_loadu_si256((const __m256i *)(record + 32 * (c >> 1)));
                w = _mm256_and_si256((c & 1) ? _mm256_srli_epi16(packed, 4) : packed, _mm256_set1_epi8(15));
                if (layout.width == 5) w = _mm256_or_si256(w, SUFFIX(fifth_bits)(read_u32(record + 128 + 4 * c)));
            }
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
                    first_half[r] = _mm256_mullo_epi32(_mm256_add_epi32(lanes[r], odd[r]), half_a);
                    lanes[r] = odd[r] = _mm256_setzero_si256();
                }
            }
        }
        for (int r = 0; r < tile; r++) lanes[r] = _mm256_add_epi32(lanes[r], odd[r]);
        record += value_bytes(layout.width);
        for (int r = 0; r < tile; r++) {
            __m256i sum = lanes[r];
            if (layout.scales == SCALES_Q6K) sum = _mm256_add_epi32(first_half[r], _mm256_mullo_epi32(sum, half_b));
            if (offset) sum = _mm256_sub_epi32(sum, _mm256_set1_epi32(offset * xsum[r][g]));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(dw, _mm256_set1_ps(xd[r][g])), acc[r]);
            if (layout.has_min) acc[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(xdsum[r][g]), acc[r]);
        }
    }
    const int valid = p->rows - rb * ROW_BLOCK < ROW_BLOCK ? p->rows - rb * ROW_BLOCK : ROW_BLOCK;
    for (int r = 0; r < tile; r++) {
        float *out = p->out + (ptrdiff_t)(r0 + r) * p->out_stride + (ptrdiff_t)rb * ROW_BLOCK;
        if (valid == ROW_BLOCK) {
            _mm256_storeu_ps(out, acc[r]);
        } else {
            float lanes_out[ROW_BLOCK];
            _mm256_storeu_ps(lanes_out, acc[r]);
            memcpy(out, lanes_out, sizeof(float) * (size_t)valid);
        }
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

void SUFFIX(product_blocks)(const Activations *a, const Product *p, int k, int block_begin, int block_end) {
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
