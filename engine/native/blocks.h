/* The GGUF block formats as llama.cpp's ggml-common.h lays them out, the row-block layout the products read them
 * in, and the computation every product kernel performs.
 *
 * Row blocks. At load, a weight's rows are regrouped 8 at a time (repack.c), so that one instruction multiplies
 * 4 activations by 4 weights of each of 8 rows (a dpbusd, or maddubs + madd) and the 8 rows' scales arrive as one
 * vector. For a row block and a group g of 32 columns the record is:
 *     [scales of the super-block, when g % 8 == 0 (K-quants)] [scales of the group] [values]
 * with, per format (fp16 and 6-bit scales kept exactly as the file stores them, for the 8 rows in order):
 *     legacy (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)  group: d[8] fp16, then m[8] fp16 for Q4_1 and Q5_1
 *     K (Q4_K, Q5_K)                         super: d[8] fp16, dmin[8] fp16; group: scale[8] u8, min[8] u8
 *     Q6_K                                   super: d[8] fp16; group: half scales a[8] i8, b[8] i8
 * and the values in chunks of 4 columns, chunk c holding byte 4r + e = row r's value at column 32g + 4c + e:
 *     4-bit (Q4_0, Q4_1, Q4_K)  4 vectors of 32 bytes: low nibbles chunk 2p, high nibbles chunk 2p + 1
 *     5-bit (Q5_0, Q5_1, Q5_K)  the 4-bit part, then 8 words of 32 bits: bit 4r + e of word c = the fifth bit
 *     8-bit (Q8_0, Q6_K)        8 vectors of 32 signed bytes (Q6_K: q - 32)
 * 4- and 5-bit values are the unsigned u of the file (the weight is d * (u - offset), offset 8 for Q4_0, 16 for
 * Q5_0, 0 otherwise, or d * u + m with a minimum). Every format but Q6_K keeps its bytes per weight (Q6_K's 6 bits
 * take 8: 34.25 bytes per 32 weights instead of 26.25).
 *
 * The computation. For activation row x (int8 q per group of 32 with scale dx_g, engine/native/native.h) and
 * weight row w, every kernel, scalar or SIMD, computes
 *     L_g = sum over the group of v_e * q_e - offset * (sum of q_e)      (Q6_K: a * (sum over e < 16) +
 *                                                                         b * (sum over e >= 16), no offset)
 *     acc = fma((float)L_g, dw_g * dx_g, acc)                             over the groups in order, from 0,
 *     acc = fma(mw_g, dx_g * (sum of q_e), acc)                          after it in formats with a minimum,
 *     y = acc
 * with dw_g = d (legacy, Q6_K), d * scale_g (K) and mw_g = m (legacy), -(dmin * min_g) (K). L_g is an exact
 * integer (|L_g| < 2^24: its float is exact), so y is one sequence of float operations for a given (x, w):
 * the same whatever other rows are computed with it, on any thread and any instruction set.
 */
#ifndef MTP_BLOCKS_H
#define MTP_BLOCKS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* GGUF blocks */
#define Q4_0_BYTES 18   /* fp16 d, 16 bytes of nibbles */
#define Q4_1_BYTES 20   /* fp16 d, fp16 m, 16 bytes of nibbles */
#define Q5_0_BYTES 22   /* fp16 d, 4 bytes of fifth bits, 16 bytes of nibbles */
#define Q5_1_BYTES 24   /* fp16 d, fp16 m, 4 bytes of fifth bits, 16 bytes of nibbles */
#define Q8_0_BYTES 34   /* fp16 d, 32 int8 */
#define Q4_K_BYTES 144  /* fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles */
#define Q5_K_BYTES 176  /* as Q4_K, with 32 bytes of fifth bits before the nibbles */
#define Q6_K_BYTES 210  /* 128 bytes of low nibbles, 64 of high 2 bits, 16 int8 scales, fp16 d */

static inline uint16_t read_u16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

static inline uint32_t read_u32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* IEEE half to float, exactly (every half is a float). */
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu, bits;
    if (exponent == 0) {
        float magnitude = (float)mantissa * 5.9604644775390625e-8f; /* 2^-24, exact */
        return sign ? -magnitude : magnitude;
    }
    bits = exponent == 31 ? sign | 0x7F800000u | (mantissa << 13) : sign | ((exponent + 112) << 23) | (mantissa << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* K-quants' 6-bit scale and min of group j (0..7) from the 12 packed bytes (ggml's get_scale_min_k4). */
static inline void k_scale_min(int j, const uint8_t *q, uint8_t *scale, uint8_t *min) {
    if (j < 4) {
        *scale = q[j] & 63;
        *min = q[j + 4] & 63;
    } else {
        *scale = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *min = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* Where group g of a K-quant row starts: super-block g / 8, group g % 8 in it. */
#define K_SUPER(row, g, bytes) ((row) + (size_t)((g) >> 3) * (bytes))

/* One group of 32 weights of one row: the weight of column e is dw * (half_scale[e / 16] * v[e]) + mw. */
typedef struct {
    int v[32];
    float dw, mw;
    int half_scale[2], has_min;
} Group;

/* Group g of a GGUF row (gguf_blocks.c). */
void read_gguf_group(int type, const uint8_t *row, int g, Group *group);

/* Row blocks */
#define ROW_BLOCK 8
enum { SCALES_LEGACY, SCALES_K, SCALES_Q6K };

typedef struct {
    int width;   /* bits per value: 4, 5 or 8 */
    int scales;  /* SCALES_* */
    int has_min; /* weight d * u + m */
    int offset;  /* weight d * (u - offset) */
} Layout;

static inline Layout layout_of(int type) {
    switch (type) {
    case 2: return (Layout){4, SCALES_LEGACY, 0, 8};   /* Q4_0 */
    case 3: return (Layout){4, SCALES_LEGACY, 1, 0};   /* Q4_1 */
    case 6: return (Layout){5, SCALES_LEGACY, 0, 16};  /* Q5_0 */
    case 7: return (Layout){5, SCALES_LEGACY, 1, 0};   /* Q5_1 */
    case 8: return (Layout){8, SCALES_LEGACY, 0, 0};   /* Q8_0 */
    case 12: return (Layout){4, SCALES_K, 1, 0};       /* Q4_K */
    case 13: return (Layout){5, SCALES_K, 1, 0};       /* Q5_K */
    case 14: return (Layout){8, SCALES_Q6K, 0, 0};     /* Q6_K */
    default: return (Layout){0, 0, 0, 0};
    }
}

static inline int value_bytes(int width) { return width == 4 ? 128 : width == 5 ? 160 : 256; }

/* Bytes of the scales that precede group g's values in a record (the super-block's included when g % 8 == 0). */
static inline int scale_bytes(Layout layout, int g) {
    if (layout.scales == SCALES_LEGACY) return layout.has_min ? 32 : 16;
    int super = (g & 7) == 0 ? (layout.scales == SCALES_K ? 32 : 16) : 0;
    return super + 16;
}

static inline size_t row_block_bytes(Layout layout, int groups) {
    size_t bytes = 0;
    for (int g = 0; g < groups; g++) bytes += (size_t)(scale_bytes(layout, g) + value_bytes(layout.width));
    return bytes;
}

#endif
