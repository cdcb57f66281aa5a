/* The products for AVX-512 VNNI: few activation rows (decoding, a short verification) on 256-bit registers
 * (products_x86.h), where one dpbusd forms and adds what maddubs + madd + add do; more rows (a long verification,
 * a prefill chunk) two row blocks at a time on 512-bit registers, their values unpacked once for all the rows.
 *
 * Why the wide path: at 256 rows the 256-bit code unpacks a row block's values again for every tile of 4
 * activation rows and spends as many instructions on that as on the dots (measured on a 2-vCPU Xeon: no faster
 * than torch's float32 product there). Both paths compute blocks.h's floats, lane for lane the same operations
 * (the integer sums are exact, and each lane's dw * dx, fma and minimum term are those of the 256-bit code), so a
 * row's output is the same bits whichever path computed it. Q6_K stays on the 256-bit code: its signed values need
 * their signs moved onto the activations, which has no 512-bit instruction.
 */
#include "native.h"
#ifdef MTP_X86
#include <stdlib.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")
#define SUFFIX(name) name##_avx512vnni_narrow
#define DOT(acc, u, x) _mm256_dpbusd_epi32(acc, u, x)
#define UNSIGNED_Q8_0 1
#include "products_x86.h"

/* From how many activation rows the wide path pays for unpacking the values (2-vCPU Xeon, 2 threads, medians of
 * 30 calls): a 2048 x 640 Q5_0 weight 0.105-0.118 -> 0.078-0.087 ms at 5 rows; a 640 x 2048 Q4_K one, whose
 * scales take more unpacking and which has fewer row blocks to share it, 0.086-0.116 -> 0.118-0.140 ms at 4-5
 * rows and even at 9-13. */
#define WIDE_MIN_ROWS_LEGACY 5
#define WIDE_MIN_ROWS_K 16
#define WIDE_TILE 8 /* activation rows per pass over the unpacked values: 2 x 8 accumulators in 32 registers */

/* One group of 32 columns of two row blocks, unpacked: lanes 0-7 the first block's rows, 8-15 the second's. */
typedef struct {
    uint8_t values[8][64]; /* chunk c: 16 rows x 4 unsigned values (Q8_0: w + 128) */
    float dw[16], mw[16];
} WideGroup;

/* Row block `record` into half `half` of every group, walking the record as block_tile does. */
INLINE void unpack_block(const uint8_t *record, const int groups, const int type, WideGroup *wide, const int half) {
    const Layout layout = layout_of(type);
    __m256 super_d = _mm256_setzero_ps(), super_m = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m256 dw, mw = _mm256_setzero_ps();
        if (layout.scales == SCALES_LEGACY) {
            dw = halves_avx512vnni_narrow(record);
            record += 16;
            if (layout.has_min) {
                mw = halves_avx512vnni_narrow(record);
                record += 16;
            }
        } else { /* SCALES_K */
            if ((g & 7) == 0) {
                super_d = halves_avx512vnni_narrow(record);
                super_m = halves_avx512vnni_narrow(record + 16);
                record += 32;
            }
            dw = _mm256_mul_ps(super_d, bytes_as_floats_avx512vnni_narrow(record));
            mw = _mm256_xor_ps(_mm256_mul_ps(super_m, bytes_as_floats_avx512vnni_narrow(record + 8)),
                               _mm256_set1_ps(-0.0f));
            record += 16;
        }
        for (int c = 0; c < 8; c++) {
            __m256i w;
            if (layout.width == 8) {
                w = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(record + 32 * c)), _mm256_set1_epi8((char)0x80));
            } else {
                const __m256i packed = _mm256_loadu_si256((const __m256i *)(record + 32 * (c >> 1)));
                w = _mm256_and_si256((c & 1) ? _mm256_srli_epi16(packed, 4) : packed, _mm256_set1_epi8(15));
                if (layout.width == 5) w = _mm256_or_si256(w, fifth_bits_avx512vnni_narrow(read_u32(record + 128 + 4 * c)));
            }
            _mm256_storeu_si256((__m256i *)(wide[g].values[c] + 32 * half), w);
        }
        _mm256_storeu_ps(wide[g].dw + 8 * half, dw);
        _mm256_storeu_ps(wide[g].mw + 8 * half, mw);
        record += value_bytes(layout.width);
    }
}

/* The unpacked groups against activation rows r0 .. r0 + tile - 1; lanes outside `lanes` are not stored. */
INLINE void wide_tile(const Activations *a, const Product *p, const WideGroup *wide, const int groups, const int rb,
                      const int r0, const int tile, const int type, const __mmask16 lanes) {
    const Layout layout = layout_of(type);
    const int offset = type == TYPE_Q8_0 ? 128 : layout.offset;
    const int k = groups * GROUP;
    __m512 acc[WIDE_TILE];
    for (int r = 0; r < tile; r++) acc[r] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m512i sums[WIDE_TILE];
        for (int r = 0; r < tile; r++) sums[r] = _mm512_setzero_si512();
        for (int c = 0; c < 8; c++) {
            const __m512i w = _mm512_load_si512((const void *)wide[g].values[c]);
            for (int r = 0; r < tile; r++) {
                const uint8_t *x = (const uint8_t *)a->q + (size_t)(r0 + r) * k + (size_t)g * GROUP + 4 * c;
                sums[r] = _mm512_dpbusd_epi32(sums[r], w, _mm512_set1_epi32((int)read_u32(x)));
            }
        }
        const __m512 dw = _mm512_load_ps(wide[g].dw), mw = _mm512_load_ps(wide[g].mw);
        for (int r = 0; r < tile; r++) {
            const size_t at = (size_t)(r0 + r) * groups + g;
            __m512i sum = sums[r];
            if (offset) sum = _mm512_sub_epi32(sum, _mm512_set1_epi32(offset * a->sums[at]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(dw, _mm512_set1_ps(a->d[at])), acc[r]);
            if (layout.has_min) acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(a->dsum[at]), acc[r]);
        }
    }
    for (int r = 0; r < tile; r++)
        _mm512_mask_storeu_ps(p->out + (ptrdiff_t)(r0 + r) * p->out_stride + (ptrdiff_t)rb * ROW_BLOCK, lanes, acc[r]);
}

INLINE void wide_blocks_of_type(const Activations *a, const Product *p, const int k, const int block_begin,
                                const int block_end, const int type, WideGroup *wide) {
    const int groups = k / GROUP;
    const size_t stride = row_block_bytes(layout_of(type), groups);
    for (int rb = block_begin; rb < block_end; rb += 2) {
        const int pair = rb + 1 < block_end;
        unpack_block(p->blocks + (size_t)rb * stride, groups, type, wide, 0);
        if (pair) {
            unpack_block(p->blocks + (size_t)(rb + 1) * stride, groups, type, wide, 1);
        } else {
            for (int g = 0; g < groups; g++) { /* lanes 8-15 computed but not stored */
                for (int c = 0; c < 8; c++) memset(wide[g].values[c] + 32, 0, 32);
                memset(wide[g].dw + 8, 0, 32);
                memset(wide[g].mw + 8, 0, 32);
            }
        }
        /* Only a weight's last row block can be partial. */
        const int rows = p->rows - rb * ROW_BLOCK < 2 * ROW_BLOCK ? p->rows - rb * ROW_BLOCK : 2 * ROW_BLOCK;
        const int stored = pair ? rows : (rows < ROW_BLOCK ? rows : ROW_BLOCK);
        const __mmask16 lanes = (__mmask16)((1u << stored) - 1);
        for (int r0 = 0; r0 < a->rows; r0 += WIDE_TILE) {
            switch (a->rows - r0 < WIDE_TILE ? a->rows - r0 : WIDE_TILE) {
            case 8: wide_tile(a, p, wide, groups, rb, r0, 8, type, lanes); break;
            case 7: wide_tile(a, p, wide, groups, rb, r0, 7, type, lanes); break;
            case 6: wide_tile(a, p, wide, groups, rb, r0, 6, type, lanes); break;
            case 5: wide_tile(a, p, wide, groups, rb, r0, 5, type, lanes); break;
            case 4: wide_tile(a, p, wide, groups, rb, r0, 4, type, lanes); break;
            case 3: wide_tile(a, p, wide, groups, rb, r0, 3, type, lanes); break;
            case 2: wide_tile(a, p, wide, groups, rb, r0, 2, type, lanes); break;
            default: wide_tile(a, p, wide, groups, rb, r0, 1, type, lanes); break;
            }
        }
    }
}

void product_blocks_avx512vnni(const Activations *a, const Product *p, int k, int block_begin, int block_end) {
    WideGroup *wide = NULL;
    const int k_quant = p->type == TYPE_Q4_K || p->type == TYPE_Q5_K;
    if (p->type != TYPE_Q6_K && a->rows >= (k_quant ? WIDE_MIN_ROWS_K : WIDE_MIN_ROWS_LEGACY))
        wide = aligned_alloc(64, sizeof(WideGroup) * (size_t)(k / GROUP)); /* 640 bytes per 32 columns */
    if (wide == NULL) { /* few rows, Q6_K, or no memory for the unpacked values */
        product_blocks_avx512vnni_narrow(a, p, k, block_begin, block_end);
        return;
    }
    switch (p->type) {
    case TYPE_Q4_0: wide_blocks_of_type(a, p, k, block_begin, block_end, TYPE_Q4_0, wide); break;
    case TYPE_Q4_1: wide_blocks_of_type(a, p, k, block_begin, block_end, TYPE_Q4_1, wide); break;
    case TYPE_Q5_0: wide_blocks_of_type(a, p, k, block_begin, block_end, TYPE_Q5_0, wide); break;
    case TYPE_Q5_1: wide_blocks_of_type(a, p, k, block_begin, block_end, TYPE_Q5_1, wide); break;
    case TYPE_Q8_0: wide_blocks_of_type(a, p, k, block_begin, block_end, TYPE_Q8_0, wide); break;
    case TYPE_Q4_K: wide_blocks_of_type(a, p, k, block_begin, block_end, TYPE_Q4_K, wide); break;
    case TYPE_Q5_K: wide_blocks_of_type(a, p, k, block_begin, block_end, TYPE_Q5_K, wide); break;
    }
    free(wide);
}
#pragma GCC pop_options
#endif
