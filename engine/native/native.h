/* Shared declarations of mtp-mcp's CPU kernels (engine/native/): GGUF block formats times int8 activations,
 * attention over a float32 KV cache, and the small per-layer operations of a decoding step.
 *
 * Every kernel computes each output element from its own inputs only, by one fixed sequence of float operations:
 * the same for any number of rows fed together, any thread count, and every instruction set (the scalar code
 * mirrors the SIMD code's lanes, fused multiply-adds and summation trees). So a row comes out bit for bit the same
 * in plain decoding, in a verification pass and in a prefill chunk, on an AVX2 machine and on an AVX-512 one.
 */
#ifndef MTP_NATIVE_H
#define MTP_NATIVE_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#if defined(__x86_64__) && defined(__GNUC__)
#define MTP_X86 1
#endif

/* GGML tensor type ids of the block formats computed here (ggml.h's enum ggml_type). */
enum {
    TYPE_Q4_0 = 2,
    TYPE_Q4_1 = 3,
    TYPE_Q5_0 = 6,
    TYPE_Q5_1 = 7,
    TYPE_Q8_0 = 8,
    TYPE_Q4_K = 12,
    TYPE_Q5_K = 13,
    TYPE_Q6_K = 14,
};

#define GROUP 32  /* activations are quantized per group of 32 values; weights are read per group too */
#define SUPER 256 /* K-quant super-block */

/* GGUF rows (gguf_blocks.c): bytes of one row of k values in a block format (0 for a type not computed here or k
 * not a whole number of blocks), and one row as floats. */
size_t row_bytes(int type, int k);
int block_values(int type);
void dequantize_gguf_row(int type, const uint8_t *row, int k, float *out);

/* Row blocks (repack.c, layout in blocks.h): bytes of a weight of `rows` rows, the regrouping of GGUF rows into
 * them, and rows read back as floats. */
size_t repacked_bytes(int type, int rows, int k);
void repack_rows(int type, const uint8_t *gguf, int rows, int k, uint8_t *out, int block_begin, int block_end);
void dequantize_repacked_row(int type, const uint8_t *blocks, int k, int row, float *out);

/* Rows of activations quantized for the products: x ~ d_g * q per group g of 32 values, q int8 in [-127, 127].
 * sums[g]: sum of q over group g; dsum[g] = d_g * sums[g], the minimum terms. */
typedef struct {
    int rows, k;
    int8_t *q;     /* [rows][k] */
    float *d;      /* [rows][k / 32] */
    int32_t *sums; /* [rows][k / 32] */
    float *dsum;   /* [rows][k / 32] */
} Activations;

void quantize_activations(const float *x, ptrdiff_t x_stride, Activations *a, int row_begin, int row_end);

/* One weight matrix in row blocks, and where its product goes. */
typedef struct {
    const uint8_t *blocks;
    int type, rows;
    float *out; /* out[r * out_stride + j]: activation row r times weight row j */
    ptrdiff_t out_stride;
} Product;

/* Attention of query rows at positions start .. start + n - 1: the row at position p reads the keys at
 * max(0, p - window + 1) .. p (window 0: from 0). Keys are read in chunks of KEY_CHUNK positions aligned to
 * multiples of KEY_CHUNK: for each (row, kv head, chunk) the chunk's softmax maximum, sum and unnormalised output
 * per query head (attention_chunk), then per (row, head) the chunks combined in order (attention_combine). Where
 * the chunks fall depends on the row's position alone, so a row comes out the same whatever is computed with it,
 * and the chunks of one row spread over the threads. */
#define KEY_CHUNK 128

typedef struct {
    const float *q;      /* [n][heads][dim], rows q_stride floats apart */
    const float *keys;   /* [kv_heads][capacity][dim] */
    const float *values; /* the same layout */
    float *out;          /* [n][heads][dim] */
    ptrdiff_t q_stride;
    int n, start, heads, kv_heads, dim, capacity, window;
    float scale;
    /* Partial results: slot s is one chunk of one row (row i's chunks are slots first_slot[i] .. first_slot[i+1]-1,
     * in order); per slot and head its maximum, sum and [dim] unnormalised output. */
    const int *first_slot; /* [n + 1] */
    float *slot_max, *slot_sum; /* [slots][heads] */
    float *slot_out;            /* [slots][heads][dim] */
} AttentionJob;

static inline int attention_first_key(const AttentionJob *job, int row) {
    const int position = job->start + row;
    return job->window > 0 && position - job->window + 1 > 0 ? position - job->window + 1 : 0;
}

/* The keys and values that row `row`'s chunk `chunk` reads for kv head `kv_head`: `count` positions from `keys`. */
typedef struct {
    const float *keys, *values;
    int count;
} KeySpan;

static inline KeySpan attention_chunk_span(const AttentionJob *job, int row, int chunk, int kv_head) {
    const int first = attention_first_key(job, row), position = job->start + row;
    const int lo = chunk * KEY_CHUNK > first ? chunk * KEY_CHUNK : first;
    const int hi = chunk * KEY_CHUNK + KEY_CHUNK - 1 < position ? chunk * KEY_CHUNK + KEY_CHUNK - 1 : position;
    const size_t offset = ((size_t)kv_head * job->capacity + lo) * job->dim;
    return (KeySpan){job->keys + offset, job->values + offset, hi - lo + 1};
}

/* The largest of row `row`'s chunk maxima for `head`. */
static inline float attention_slots_max(const AttentionJob *job, int row, int head) {
    float highest = -INFINITY;
    for (int slot = job->first_slot[row]; slot < job->first_slot[row + 1]; slot++) {
        const float m = job->slot_max[(size_t)slot * job->heads + head];
        highest = m > highest ? m : highest;
    }
    return highest;
}

/* The kernels of one instruction set. */
typedef struct {
    const char *name;
    /* weight row blocks block_begin .. block_end - 1 of p against every activation row */
    void (*product_blocks)(const Activations *a, const Product *p, int k, int block_begin, int block_end);
    /* slot `slot` (row `row`'s chunk `chunk`) for the query heads of kv head `kv_head` */
    void (*attention_chunk)(const AttentionJob *job, int row, int slot, int chunk, int kv_head);
    void (*attention_combine)(const AttentionJob *job, int row, int head);
    void (*rms_norm_rows)(const float *x, ptrdiff_t x_stride, const float *scale, float eps, float *out,
                          ptrdiff_t out_stride, int rows, int dim);
    void (*add_rms_norm_rows)(const float *x, ptrdiff_t x_stride, const float *scale, float eps, float *residual,
                              ptrdiff_t residual_stride, int rows, int dim);
    void (*head_norm_rotary)(float *x, ptrdiff_t x_stride, int rows, int heads, int dim, const float *scales,
                             float eps, const float *cos, const float *sin);
    void (*gelu_tanh_mul)(const float *gate, const float *up, ptrdiff_t in_stride, float *out, ptrdiff_t out_stride,
                          int rows, int dim);
} Kernels;

#define DECLARE_KERNELS(suffix)                                                                                   \
    void product_blocks_##suffix(const Activations *, const Product *, int, int, int);                           \
    void attention_chunk_##suffix(const AttentionJob *, int, int, int, int);                                      \
    void attention_combine_##suffix(const AttentionJob *, int, int);                                              \
    void rms_norm_rows_##suffix(const float *, ptrdiff_t, const float *, float, float *, ptrdiff_t, int, int);    \
    void add_rms_norm_rows_##suffix(const float *, ptrdiff_t, const float *, float, float *, ptrdiff_t, int, int); \
    void head_norm_rotary_##suffix(float *, ptrdiff_t, int, int, int, const float *, float, const float *,        \
                                   const float *);                                                                \
    void gelu_tanh_mul_##suffix(const float *, const float *, ptrdiff_t, float *, ptrdiff_t, int, int);

DECLARE_KERNELS(scalar)
#ifdef MTP_X86
DECLARE_KERNELS(avx2)
void product_blocks_avx512vnni(const Activations *, const Product *, int, int, int);
#endif

/* The thread pool (pool.c): runs fn(arg, t, threads) on `threads` threads (the caller is thread 0) and waits. */
typedef void (*PoolFn)(void *arg, int thread, int threads);
int pool_threads(void);
void pool_set_threads(int threads);
void pool_run(PoolFn fn, void *arg);

#endif
