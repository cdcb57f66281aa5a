/* mtp_mcp.engine._native: the kernels of engine/native/ for Python, on memory given by address (torch tensors'
 * data_ptr(), numpy arrays' ctypes.data). The Python side (engine/native_ops.py) checks shapes, dtypes and
 * contiguity before it calls here; these functions trust what they are given.
 *
 * The GIL is released while a kernel runs, so the server's event loop keeps answering during a long prefill. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "blocks.h"
#include "native.h"

static const Kernels SCALAR = {"scalar", product_blocks_scalar, attention_chunk_scalar, attention_combine_scalar, rms_norm_rows_scalar,
                               add_rms_norm_rows_scalar, head_norm_rotary_scalar, gelu_tanh_mul_scalar};
#ifdef MTP_X86
static const Kernels AVX2 = {"avx2", product_blocks_avx2, attention_chunk_avx2, attention_combine_avx2,
                             rms_norm_rows_avx2, add_rms_norm_rows_avx2, head_norm_rotary_avx2, gelu_tanh_mul_avx2};
/* VNNI changes only the integer dot of the products; the float operations are AVX2's. */
static const Kernels AVX512VNNI = {"avx512vnni", product_blocks_avx512vnni, attention_chunk_avx2,
                                   attention_combine_avx2, rms_norm_rows_avx2,
                                   add_rms_norm_rows_avx2, head_norm_rotary_avx2, gelu_tanh_mul_avx2};
#endif

static const Kernels *available[3];
static int available_count;
static const Kernels *active;

static void detect_instruction_sets(void) {
    available[available_count++] = &SCALAR;
#ifdef MTP_X86
    __builtin_cpu_init();
    /* Every CPU with AVX2 and FMA also has F16C (Intel since Ivy Bridge, AMD since Piledriver). */
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        available[available_count++] = &AVX2;
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
            __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni")) {
            available[available_count++] = &AVX512VNNI;
        }
    }
#endif
    active = available[available_count - 1];
}

/* ---- argument helpers: every argument is a Python int (an address or a count) or a float ---- */

static int take_pointer(PyObject *value, void **out) {
    *out = PyLong_AsVoidPtr(value);
    return !(*out == NULL && PyErr_Occurred());
}

static int take_long(PyObject *value, long *out) {
    *out = PyLong_AsLong(value);
    return !(*out == -1 && PyErr_Occurred());
}

static int take_float(PyObject *value, float *out) {
    double d = PyFloat_AsDouble(value);
    *out = (float)d;
    return !(d == -1.0 && PyErr_Occurred());
}

static int expect_args(Py_ssize_t got, Py_ssize_t wanted, const char *name) {
    if (got == wanted) return 1;
    PyErr_Format(PyExc_TypeError, "%s takes %zd arguments (%zd given)", name, wanted, got);
    return 0;
}

/* ---- products ---- */

static pthread_mutex_t scratch_lock = PTHREAD_MUTEX_INITIALIZER;
static void *scratch;
static size_t scratch_bytes;

static void *scratch_of(size_t bytes) {
    if (bytes > scratch_bytes) {
        void *grown = realloc(scratch, bytes);
        if (grown == NULL) return NULL;
        scratch = grown;
        scratch_bytes = bytes;
    }
    return scratch;
}

typedef struct {
    const Kernels *kernels;
    const float *x;
    ptrdiff_t x_stride;
    Activations *a;
    const Product *products;
    int count, k;
    long total_blocks; /* row blocks of all products */
} ProductsJob;

static void quantize_task(void *arg, int thread, int threads) {
    ProductsJob *job = arg;
    int per = (job->a->rows + threads - 1) / threads;
    int begin = thread * per, end = begin + per < job->a->rows ? begin + per : job->a->rows;
    if (begin < end) quantize_activations(job->x, job->x_stride, job->a, begin, end);
}

static long blocks_of(long rows) { return (rows + ROW_BLOCK - 1) / ROW_BLOCK; }

static void products_task(void *arg, int thread, int threads) {
    ProductsJob *job = arg;
    /* Contiguous shares of the row blocks of all products. */
    long per = (job->total_blocks + threads - 1) / threads;
    long begin = thread * per, end = begin + per < job->total_blocks ? begin + per : job->total_blocks, base = 0;
    for (int i = 0; i < job->count; i++) {
        long blocks = blocks_of(job->products[i].rows);
        long lo = begin > base ? begin : base, hi = end < base + blocks ? end : base + blocks;
        if (lo < hi) job->kernels->product_blocks(job->a, &job->products[i], job->k, (int)(lo - base), (int)(hi - base));
        base += blocks;
    }
}

/* products(x, rows, k, x_stride, ((blocks, type, weight_rows, out, out_stride), ...)): blocks in row blocks. */
static PyObject *py_products(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!expect_args(nargs, 5, "products")) return NULL;
    void *x;
    long rows, k, x_stride;
    if (!take_pointer(args[0], &x) || !take_long(args[1], &rows) || !take_long(args[2], &k) ||
        !take_long(args[3], &x_stride))
        return NULL;
    if (!PyTuple_Check(args[4])) return PyErr_Format(PyExc_TypeError, "products: a tuple of products expected");
    Py_ssize_t count = PyTuple_GET_SIZE(args[4]);
    if (count < 1 || count > 16) return PyErr_Format(PyExc_ValueError, "products: 1 to 16 products, not %zd", count);
    if (k <= 0 || k % GROUP) return PyErr_Format(PyExc_ValueError, "products: k = %ld is not a multiple of 32", k);
    Product products[16];
    long total = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *spec = PyTuple_GET_ITEM(args[4], i);
        if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != 5)
            return PyErr_Format(PyExc_TypeError, "products: (blocks, type, rows, out, out_stride) expected");
        void *blocks, *out;
        long type, weight_rows, out_stride;
        if (!take_pointer(PyTuple_GET_ITEM(spec, 0), &blocks) || !take_long(PyTuple_GET_ITEM(spec, 1), &type) ||
            !take_long(PyTuple_GET_ITEM(spec, 2), &weight_rows) || !take_pointer(PyTuple_GET_ITEM(spec, 3), &out) ||
            !take_long(PyTuple_GET_ITEM(spec, 4), &out_stride))
            return NULL;
        if (repacked_bytes((int)type, (int)weight_rows, (int)k) == 0)
            return PyErr_Format(PyExc_ValueError, "products: type %ld cannot hold rows of %ld values", type, k);
        products[i] = (Product){blocks, (int)type, (int)weight_rows, out, out_stride};
        total += blocks_of(weight_rows);
    }
    if (rows <= 0) Py_RETURN_NONE;
    const int groups = (int)(k / GROUP);
    const size_t q_bytes = ((size_t)rows * k + 63) / 64 * 64;
    const size_t group_bytes = (size_t)rows * groups * sizeof(float);
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&scratch_lock);
    char *buffer = scratch_of(q_bytes + 3 * group_bytes);
    if (buffer == NULL) {
        failed = 1;
    } else {
        Activations a = {(int)rows, (int)k, (int8_t *)buffer, (float *)(buffer + q_bytes),
                         (int32_t *)(buffer + q_bytes + group_bytes), (float *)(buffer + q_bytes + 2 * group_bytes)};
        ProductsJob job = {active, x, x_stride, &a, products, (int)count, (int)k, total};
        if (rows >= 8) pool_run(quantize_task, &job);
        else quantize_activations(x, x_stride, &a, 0, (int)rows);
        pool_run(products_task, &job);
    }
    pthread_mutex_unlock(&scratch_lock);
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

typedef struct {
    int type, rows, k;
    const uint8_t *gguf;
    uint8_t *out;
} RepackJob;

static void repack_task(void *arg, int thread, int threads) {
    RepackJob *job = arg;
    int blocks = (int)blocks_of(job->rows), per = (blocks + threads - 1) / threads;
    int begin = thread * per, end = begin + per < blocks ? begin + per : blocks;
    if (begin < end) repack_rows(job->type, job->gguf, job->rows, job->k, job->out, begin, end);
}

/* repack(type, gguf_rows, rows, k, out): GGUF rows into row blocks (out: repacked_bytes(type, rows, k) bytes). */
static PyObject *py_repack(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!expect_args(nargs, 5, "repack")) return NULL;
    long type, rows, k;
    void *gguf, *out;
    if (!take_long(args[0], &type) || !take_pointer(args[1], &gguf) || !take_long(args[2], &rows) ||
        !take_long(args[3], &k) || !take_pointer(args[4], &out))
        return NULL;
    if (repacked_bytes((int)type, (int)rows, (int)k) == 0)
        return PyErr_Format(PyExc_ValueError, "repack: type %ld cannot hold rows of %ld values", type, k);
    RepackJob job = {(int)type, (int)rows, (int)k, gguf, out};
    Py_BEGIN_ALLOW_THREADS
    pool_run(repack_task, &job);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_repacked_bytes(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    long type, rows, k;
    if (!expect_args(nargs, 3, "repacked_bytes") || !take_long(args[0], &type) || !take_long(args[1], &rows) ||
        !take_long(args[2], &k))
        return NULL;
    return PyLong_FromSize_t(repacked_bytes((int)type, (int)rows, (int)k));
}

/* dequantize_rows(type, blocks, k, ids (int64 address), count, out): out[i] = row ids[i] of a weight in row blocks. */
static PyObject *py_dequantize_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!expect_args(nargs, 6, "dequantize_rows")) return NULL;
    long type, k, count;
    void *blocks, *ids, *out;
    if (!take_long(args[0], &type) || !take_pointer(args[1], &blocks) || !take_long(args[2], &k) ||
        !take_pointer(args[3], &ids) || !take_long(args[4], &count) || !take_pointer(args[5], &out))
        return NULL;
    if (repacked_bytes((int)type, 1, (int)k) == 0)
        return PyErr_Format(PyExc_ValueError, "dequantize_rows: type %ld, k %ld not supported", type, k);
    Py_BEGIN_ALLOW_THREADS
    for (long i = 0; i < count; i++) {
        dequantize_repacked_row((int)type, blocks, (int)k, (int)((const int64_t *)ids)[i], (float *)out + (size_t)i * k);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---- attention ---- */

static pthread_mutex_t attention_lock = PTHREAD_MUTEX_INITIALIZER;
static void *attention_scratch;
static size_t attention_scratch_bytes;

typedef struct {
    const Kernels *kernels;
    const AttentionJob *job;
    const int *slot_row, *slot_chunk;
    int slots;
} AttentionTask;

static void share(int items, int thread, int threads, int *begin, int *end) {
    int per = (items + threads - 1) / threads;
    *begin = thread * per;
    *end = *begin + per < items ? *begin + per : items;
}

static void chunks_task(void *arg, int thread, int threads) {
    const AttentionTask *task = arg;
    const int kv_heads = task->job->kv_heads;
    int begin, end;
    share(task->slots * kv_heads, thread, threads, &begin, &end);
    for (int item = begin; item < end; item++) {
        const int slot = item / kv_heads;
        task->kernels->attention_chunk(task->job, task->slot_row[slot], slot, task->slot_chunk[slot], item % kv_heads);
    }
}

static void combine_task(void *arg, int thread, int threads) {
    const AttentionTask *task = arg;
    const int heads = task->job->heads;
    int begin, end;
    share(task->job->n * heads, thread, threads, &begin, &end);
    for (int item = begin; item < end; item++) task->kernels->attention_combine(task->job, item / heads, item % heads);
}

/* attention(q, q_stride, keys, values, out, n, start, heads, kv_heads, dim, capacity, window, scale) */
static PyObject *py_attention(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!expect_args(nargs, 13, "attention")) return NULL;
    void *q, *keys, *values, *out;
    long q_stride, n, start, heads, kv_heads, dim, capacity, window;
    float scale;
    if (!take_pointer(args[0], &q) || !take_long(args[1], &q_stride) || !take_pointer(args[2], &keys) ||
        !take_pointer(args[3], &values) || !take_pointer(args[4], &out) || !take_long(args[5], &n) ||
        !take_long(args[6], &start) || !take_long(args[7], &heads) || !take_long(args[8], &kv_heads) ||
        !take_long(args[9], &dim) || !take_long(args[10], &capacity) || !take_long(args[11], &window) ||
        !take_float(args[12], &scale))
        return NULL;
    if (n <= 0) Py_RETURN_NONE;
    if (kv_heads < 1 || heads % kv_heads || start < 0 || start + n > capacity || dim < 1)
        return PyErr_Format(PyExc_ValueError, "attention: inconsistent shapes");
    AttentionJob job = {q, keys, values, out, q_stride, (int)n, (int)start, (int)heads, (int)kv_heads, (int)dim,
                        (int)capacity, (int)window, scale, NULL, NULL, NULL, NULL};
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    /* Every row's chunks: from the one holding its first key to the one holding itself. */
    long slots = 0;
    for (int row = 0; row < n; row++) slots += (start + row) / KEY_CHUNK - attention_first_key(&job, row) / KEY_CHUNK + 1;
    const size_t int_bytes = sizeof(int) * ((size_t)n + 1 + 2 * (size_t)slots);
    const size_t bytes = int_bytes + sizeof(float) * (size_t)slots * heads * (2 + (size_t)dim) + 64;
    pthread_mutex_lock(&attention_lock);
    if (bytes > attention_scratch_bytes) {
        void *grown = realloc(attention_scratch, bytes);
        if (grown != NULL) attention_scratch = grown, attention_scratch_bytes = bytes;
    }
    if (bytes > attention_scratch_bytes) {
        failed = 1;
    } else {
        int *first_slot = attention_scratch, *slot_row = first_slot + n + 1, *slot_chunk = slot_row + slots;
        float *floats = (float *)((char *)attention_scratch + (int_bytes + 63) / 64 * 64);
        job.first_slot = first_slot;
        job.slot_max = floats;
        job.slot_sum = floats + (size_t)slots * heads;
        job.slot_out = floats + 2 * (size_t)slots * heads;
        int slot = 0;
        for (int row = 0; row < n; row++) {
            first_slot[row] = slot;
            for (int chunk = attention_first_key(&job, row) / KEY_CHUNK; chunk <= ((int)start + row) / KEY_CHUNK;
                 chunk++, slot++) {
                slot_row[slot] = row;
                slot_chunk[slot] = chunk;
            }
        }
        first_slot[n] = slot;
        AttentionTask task = {active, &job, slot_row, slot_chunk, (int)slots};
        pool_run(chunks_task, &task);
        if (n * heads >= 16) pool_run(combine_task, &task);
        else combine_task(&task, 0, 1);
    }
    pthread_mutex_unlock(&attention_lock);
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* ---- the small operations: rows split over threads when there are many ---- */

typedef struct {
    int kind; /* 0 rms_norm, 1 add_rms_norm, 2 gelu_tanh_mul */
    const float *x, *y, *scale;
    float *out;
    ptrdiff_t x_stride, out_stride;
    float eps;
    int rows, dim;
} RowsJob;

static void rows_task(void *arg, int thread, int threads) {
    RowsJob *job = arg;
    int per = (job->rows + threads - 1) / threads;
    int begin = thread * per, end = begin + per < job->rows ? begin + per : job->rows;
    if (begin >= end) return;
    const float *x = job->x + begin * job->x_stride;
    float *out = job->out + begin * job->out_stride;
    switch (job->kind) {
    case 0: active->rms_norm_rows(x, job->x_stride, job->scale, job->eps, out, job->out_stride, end - begin, job->dim);
        break;
    case 1: active->add_rms_norm_rows(x, job->x_stride, job->scale, job->eps, out, job->out_stride, end - begin,
                                      job->dim);
        break;
    default: active->gelu_tanh_mul(x, job->y + begin * job->x_stride, job->x_stride, out, job->out_stride,
                                   end - begin, job->dim);
    }
}

static void run_rows(RowsJob *job) {
    if (job->rows >= 16) pool_run(rows_task, job);
    else rows_task(job, 0, 1);
}

/* rms_norm(x, x_stride, scale, eps, out, out_stride, rows, dim); add_rms_norm: the same, out += the norm. */
static PyObject *norm_call(PyObject *const *args, Py_ssize_t nargs, int kind, const char *name) {
    if (!expect_args(nargs, 8, name)) return NULL;
    void *x, *scale, *out;
    long x_stride, out_stride, rows, dim;
    float eps;
    if (!take_pointer(args[0], &x) || !take_long(args[1], &x_stride) || !take_pointer(args[2], &scale) ||
        !take_float(args[3], &eps) || !take_pointer(args[4], &out) || !take_long(args[5], &out_stride) ||
        !take_long(args[6], &rows) || !take_long(args[7], &dim))
        return NULL;
    RowsJob job = {kind, x, NULL, scale, out, x_stride, out_stride, eps, (int)rows, (int)dim};
    Py_BEGIN_ALLOW_THREADS
    run_rows(&job);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_rms_norm(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return norm_call(args, nargs, 0, "rms_norm");
}

static PyObject *py_add_rms_norm(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return norm_call(args, nargs, 1, "add_rms_norm");
}

/* gelu_tanh_mul(gate, up, in_stride, out, out_stride, rows, dim) */
static PyObject *py_gelu_tanh_mul(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!expect_args(nargs, 7, "gelu_tanh_mul")) return NULL;
    void *gate, *up, *out;
    long in_stride, out_stride, rows, dim;
    if (!take_pointer(args[0], &gate) || !take_pointer(args[1], &up) || !take_long(args[2], &in_stride) ||
        !take_pointer(args[3], &out) || !take_long(args[4], &out_stride) || !take_long(args[5], &rows) ||
        !take_long(args[6], &dim))
        return NULL;
    RowsJob job = {2, gate, up, NULL, out, in_stride, out_stride, 0.0f, (int)rows, (int)dim};
    Py_BEGIN_ALLOW_THREADS
    run_rows(&job);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* head_norm_rotary(x, x_stride, rows, heads, dim, scales, eps, cos, sin) */
static PyObject *py_head_norm_rotary(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!expect_args(nargs, 9, "head_norm_rotary")) return NULL;
    void *x, *scales, *cos, *sin;
    long x_stride, rows, heads, dim;
    float eps;
    if (!take_pointer(args[0], &x) || !take_long(args[1], &x_stride) || !take_long(args[2], &rows) ||
        !take_long(args[3], &heads) || !take_long(args[4], &dim) || !take_pointer(args[5], &scales) ||
        !take_float(args[6], &eps) || !take_pointer(args[7], &cos) || !take_pointer(args[8], &sin))
        return NULL;
    if (dim > 1024 || dim % 2) return PyErr_Format(PyExc_ValueError, "head_norm_rotary: head dim %ld", dim);
    Py_BEGIN_ALLOW_THREADS
    active->head_norm_rotary(x, x_stride, (int)rows, (int)heads, (int)dim, scales, eps, cos, sin);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* store_keys_values(qkv, qkv_stride, keys_column, values_column, keys, values, kv_heads, capacity, dim, start, n):
 * rows of a fused q/k/v product into a KV cache [kv_heads][capacity][dim] at positions start .. start + n - 1. */
static PyObject *py_store_keys_values(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    void *qkv, *keys, *values;
    long qkv_stride, keys_column, values_column, kv_heads, capacity, dim, start, n;
    if (!expect_args(nargs, 11, "store_keys_values") || !take_pointer(args[0], &qkv) ||
        !take_long(args[1], &qkv_stride) || !take_long(args[2], &keys_column) || !take_long(args[3], &values_column) ||
        !take_pointer(args[4], &keys) || !take_pointer(args[5], &values) || !take_long(args[6], &kv_heads) ||
        !take_long(args[7], &capacity) || !take_long(args[8], &dim) || !take_long(args[9], &start) ||
        !take_long(args[10], &n))
        return NULL;
    if (start < 0 || start + n > capacity) return PyErr_Format(PyExc_ValueError, "store_keys_values: past the cache");
    for (long r = 0; r < n; r++) {
        const float *row = (const float *)qkv + r * qkv_stride;
        for (long h = 0; h < kv_heads; h++) {
            const size_t to = ((size_t)h * capacity + (size_t)(start + r)) * dim;
            memcpy((float *)keys + to, row + keys_column + h * dim, sizeof(float) * (size_t)dim);
            memcpy((float *)values + to, row + values_column + h * dim, sizeof(float) * (size_t)dim);
        }
    }
    Py_RETURN_NONE;
}

/* argmax_rows(x, rows, columns, stride) -> [the index of each row's largest value], torch.argmax's answer: the
 * first of equal maxima, or the first NaN. */
static PyObject *py_argmax_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    void *x;
    long rows, columns, stride;
    if (!expect_args(nargs, 4, "argmax_rows") || !take_pointer(args[0], &x) || !take_long(args[1], &rows) ||
        !take_long(args[2], &columns) || !take_long(args[3], &stride))
        return NULL;
    PyObject *result = PyList_New(rows);
    if (result == NULL) return NULL;
    for (long r = 0; r < rows; r++) {
        const float *row = (const float *)x + r * stride;
        long best = 0;
        float top = columns ? row[0] : 0.0f;
        for (long i = 0; i < columns && top == top; i++) {
            const float value = row[i];
            if (value > top || value != value) best = i, top = value;
        }
        PyList_SET_ITEM(result, r, PyLong_FromLong(best));
    }
    return result;
}

/* ---- configuration ---- */

static PyObject *py_row_bytes(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    long type, k;
    if (!expect_args(nargs, 2, "row_bytes") || !take_long(args[0], &type) || !take_long(args[1], &k)) return NULL;
    return PyLong_FromSize_t(row_bytes((int)type, (int)k));
}

static PyObject *py_instruction_sets(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    PyObject *names = PyTuple_New(available_count);
    if (names == NULL) return NULL;
    for (int i = 0; i < available_count; i++) PyTuple_SET_ITEM(names, i, PyUnicode_FromString(available[i]->name));
    return names;
}

static PyObject *py_instruction_set(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyUnicode_FromString(active->name);
}

static PyObject *py_use_instruction_set(PyObject *self, PyObject *name) {
    (void)self;
    const char *wanted = PyUnicode_AsUTF8(name);
    if (wanted == NULL) return NULL;
    for (int i = 0; i < available_count; i++) {
        if (strcmp(available[i]->name, wanted) == 0) {
            active = available[i];
            Py_RETURN_NONE;
        }
    }
    return PyErr_Format(PyExc_ValueError, "instruction set '%s' is not available on this CPU", wanted);
}

static PyObject *py_set_threads(PyObject *self, PyObject *value) {
    (void)self;
    long threads;
    if (!take_long(value, &threads)) return NULL;
    pool_set_threads((int)threads);
    Py_RETURN_NONE;
}

static PyObject *py_threads(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyLong_FromLong(pool_threads());
}

static PyMethodDef methods[] = {
    {"products", (PyCFunction)(void (*)(void))py_products, METH_FASTCALL, "weight rows times activation rows"},
    {"dequantize_rows", (PyCFunction)(void (*)(void))py_dequantize_rows, METH_FASTCALL, "rows as floats"},
    {"attention", (PyCFunction)(void (*)(void))py_attention, METH_FASTCALL, "causal attention over a cache"},
    {"rms_norm", (PyCFunction)(void (*)(void))py_rms_norm, METH_FASTCALL, "rows normed"},
    {"add_rms_norm", (PyCFunction)(void (*)(void))py_add_rms_norm, METH_FASTCALL, "rows normed, added"},
    {"gelu_tanh_mul", (PyCFunction)(void (*)(void))py_gelu_tanh_mul, METH_FASTCALL, "gelu(gate) * up"},
    {"head_norm_rotary", (PyCFunction)(void (*)(void))py_head_norm_rotary, METH_FASTCALL, "heads normed, rotated"},
    {"store_keys_values", (PyCFunction)(void (*)(void))py_store_keys_values, METH_FASTCALL, "k and v rows into a cache"},
    {"argmax_rows", (PyCFunction)(void (*)(void))py_argmax_rows, METH_FASTCALL, "each row's argmax, as torch's"},
    {"row_bytes", (PyCFunction)(void (*)(void))py_row_bytes, METH_FASTCALL, "bytes of a GGUF row of a block type"},
    {"repack", (PyCFunction)(void (*)(void))py_repack, METH_FASTCALL, "GGUF rows into row blocks"},
    {"repacked_bytes", (PyCFunction)(void (*)(void))py_repacked_bytes, METH_FASTCALL, "bytes of a weight in row blocks"},
    {"instruction_sets", py_instruction_sets, METH_NOARGS, "what this CPU runs, best last"},
    {"instruction_set", py_instruction_set, METH_NOARGS, "what the kernels use"},
    {"use_instruction_set", py_use_instruction_set, METH_O, "choose one of instruction_sets()"},
    {"set_threads", py_set_threads, METH_O, "threads the kernels use"},
    {"threads", py_threads, METH_NOARGS, "threads the kernels use"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "mtp-mcp's CPU kernels", -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
    detect_instruction_sets();
    return PyModule_Create(&module);
}
