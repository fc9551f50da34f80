/* The non-linear methods' native passes (methods/programs.py says what each computes):

   - task_vectors: TIES, DARE and DELLA over one chunk, straight from the mapped sources (fp16,
     bf16, fp32): each model's delta from the base, its seeded dropout, then either the magnitude
     histograms that find each model's top-k threshold, or the threshold, the sign election and
     the disjoint mean (or DARE's sum), the rescale and base + alpha * merged, in fp32. It computes
     exactly what the torch path computes, in the same order, so the bytes are the same.
   - gram: the fp64 inner products of a chunk's points (models, less a reference model or the
     base), accumulated for the geometric median, model stock and slerp.
   - all_finite, uniform24 (the dropout draws), magnitude_histogram and elect_merge (the steps of
     the torch path where its inputs are not plain sources).

   Everything runs in blocks of a few hundred elements that stay in L1 cache, so each source is
   read once per pass. */

#include "_kernels.h"

/* The counter-based uniform of seeded dropout (docs/METHODS.md): element e's 24-bit draw is
   lowbias32(lowbias32(lo(e) ^ k0) ^ k1 ^ hi(e)) >> 8, the same whatever the chunking or device. */
static inline uint32_t lowbias32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

PyDoc_STRVAR(uniform24_doc,
"uniform24(out, n, start, k0, k1)\\n\\n"
"Write the 24-bit dropout draws of elements [start, start + n) as int32 at address out.");

static PyObject *uniform24(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long address, start;
    Py_ssize_t n;
    unsigned int k0, k1;
    if (!PyArg_ParseTuple(args, "KnKII", &address, &n, &start, &k0, &k1)) return NULL;
    int32_t *out = (int32_t *)(uintptr_t)address;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t j = 0; j < n; j++) {
        uint64_t e = start + (uint64_t)j;
        out[j] = (int32_t)(lowbias32(lowbias32((uint32_t)e ^ k0) ^ k1 ^ (uint32_t)(e >> 32)) >> 8);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyDoc_STRVAR(magnitude_histogram_doc,
"magnitude_histogram(hist, values, n, select)\\n\\n"
"Count the fp32 values at address values by the bits of their magnitude into the int64 bins at\\n"
"hist: by the top 16 bits (select < 0, 32768 bins), or by the low 16 bits of those whose top 16\\n"
"bits equal select (65536 bins). Two calls find the k-th smallest magnitude exactly.");

static PyObject *magnitude_histogram(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long hist_address, values_address;
    Py_ssize_t n;
    long select;
    if (!PyArg_ParseTuple(args, "KKnl", &hist_address, &values_address, &n, &select)) return NULL;
    int64_t *hist = (int64_t *)(uintptr_t)hist_address;
    const uint32_t *values = (const uint32_t *)(uintptr_t)values_address;
    Py_BEGIN_ALLOW_THREADS
    if (select < 0) {
        for (Py_ssize_t j = 0; j < n; j++) hist[(values[j] & 0x7fffffffU) >> 16]++;
    } else {
        uint32_t top = (uint32_t)select;
        for (Py_ssize_t j = 0; j < n; j++) {
            uint32_t bits = values[j] & 0x7fffffffU;
            if ((bits >> 16) == top) hist[bits & 0xffffU]++;
        }
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyDoc_STRVAR(elect_merge_doc,
"elect_merge(out, deltas, n_models, n, by_magnitude)\\n\\n"
"TIES' election and disjoint mean over fp32 deltas (n_models rows of n, at address deltas):\\n"
"the sign of the sum (by_magnitude) or of the sign count, then the mean of the deltas that agree\\n"
"with it (0 where none does), written as fp32 at address out.");

#define ELECT_BLOCK 1024

static inline float sign_of(float v) { return (float)(v > 0.0f) - (float)(v < 0.0f); }

/* Blocks of ELECT_BLOCK elements, each loop over the block's elements (so they vectorise): the
   votes, then the agreeing sums and counts, then the means. Sums run in model order, as the
   torch path's in_order does. */
static void elect_block(float *out, const float *d, Py_ssize_t models, Py_ssize_t n, Py_ssize_t from,
                        Py_ssize_t count, int by_magnitude) {
    float vote[ELECT_BLOCK], total[ELECT_BLOCK], agree[ELECT_BLOCK];
    for (Py_ssize_t j = 0; j < count; j++) vote[j] = total[j] = agree[j] = 0.0f;
    for (Py_ssize_t i = 0; i < models; i++) {
        const float *row = d + i * n + from;
        if (by_magnitude)
            for (Py_ssize_t j = 0; j < count; j++) vote[j] += row[j];
        else
            for (Py_ssize_t j = 0; j < count; j++) vote[j] += sign_of(row[j]);
    }
    for (Py_ssize_t j = 0; j < count; j++) vote[j] = sign_of(vote[j]);
    for (Py_ssize_t i = 0; i < models; i++) {
        const float *row = d + i * n + from;
        for (Py_ssize_t j = 0; j < count; j++) {
            float same = sign_of(row[j]) == vote[j] ? 1.0f : 0.0f;
            total[j] += row[j] * same;
            agree[j] += same;
        }
    }
    for (Py_ssize_t j = 0; j < count; j++) out[from + j] = agree[j] > 0.0f ? total[j] / agree[j] : 0.0f;
}

static PyObject *elect_merge(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long out_address, deltas_address;
    Py_ssize_t models, n;
    int by_magnitude;
    if (!PyArg_ParseTuple(args, "KKnnp", &out_address, &deltas_address, &models, &n, &by_magnitude)) return NULL;
    float *out = (float *)(uintptr_t)out_address;
    const float *d = (const float *)(uintptr_t)deltas_address;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t from = 0; from < n; from += ELECT_BLOCK)
        elect_block(out, d, models, n, from, n - from < ELECT_BLOCK ? n - from : ELECT_BLOCK, by_magnitude);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---- reading blocks of sources ---- */

static void load_block_portable(float *dst, const void *src, int kind, size_t count) {
    for (size_t j = 0; j < count; j++) dst[j] = load_scalar(src, kind, j);
}

#ifdef HAVE_X86_VECTOR
VECTOR static void load_block_vector(float *dst, const void *src, int kind, size_t count) {
    size_t whole = count & ~(size_t)7;
    for (size_t j = 0; j < whole; j += 8) _mm256_storeu_ps(dst + j, load8(src, kind, j));
    for (size_t j = whole; j < count; j++) dst[j] = load_scalar(src, kind, j);
}
#endif

static void (*load_block)(float *, const void *, int, size_t) = load_block_portable;

static inline const void *advanced(const void *data, int kind, size_t by) {
    return (const char *)data + by * (kind == KIND_F32 ? 4 : 2);
}

static int parse_source(PyObject *item, const void **data, int *kind) {
    unsigned long long address;
    if (!PyArg_ParseTuple(item, "Ki;a source is (address, kind)", &address, kind)) return -1;
    if (*kind < KIND_F16 || *kind > KIND_F32) {
        PyErr_SetString(PyExc_ValueError, "unknown source kind");
        return -1;
    }
    *data = (const void *)(uintptr_t)address;
    return 0;
}

PyDoc_STRVAR(all_finite_doc,
"all_finite(address, kind, n) -> bool\\n\\nWhether the n values (kind 0 fp16, 1 bf16, 2 fp32) hold no NaN or Inf.");

static PyObject *all_finite(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long address;
    int kind;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "Kin", &address, &kind, &n)) return NULL;
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
    if (kind == KIND_F32) {
        const uint32_t *v = (const uint32_t *)(uintptr_t)address;
        for (Py_ssize_t j = 0; j < n; j++) bad |= (v[j] & 0x7f800000U) == 0x7f800000U;
    } else {
        const uint16_t *v = (const uint16_t *)(uintptr_t)address;
        uint16_t exponent = kind == KIND_F16 ? 0x7c00 : 0x7f80;
        for (Py_ssize_t j = 0; j < n; j++) bad |= (v[j] & exponent) == exponent;
    }
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(!bad);
}

/* ---- TIES, DARE, DELLA ---- */

#define TV_BLOCK 256
enum { MASK_NONE = 0, MASK_DRAWS = 1, MASK_BITS = 2 };
enum { OP_COARSE = 0, OP_FINE = 1, OP_MERGE = 2 };
enum { VOTE_NONE = 0, VOTE_SIGNS = 1, VOTE_MAGNITUDE = 2 };

typedef struct {
    const void *data;
    int kind, mask;
    unsigned int k0, k1, limit; /* MASK_DRAWS: keep where the element's draw is below limit */
    const uint8_t *bits;        /* MASK_BITS: the whole tensor's keep mask, np.packbits order */
    float threshold;            /* OP_MERGE: |delta| below it becomes 0 (top-k) */
    int64_t *hist;              /* OP_COARSE, OP_FINE: this model's bins */
    long select;                /* OP_FINE: the coarse bin refined */
} tv_model_t;

/* d = (model - base) * keep, for the block's elements; `first` is the block's element index in
   the tensor. A dropped delta is multiplied by 0 (keeping its sign), as the torch path's d * mask. */
static void tv_delta(float *d, const float *b, const tv_model_t *m, size_t from, size_t count, uint64_t first) {
    load_block(d, advanced(m->data, m->kind, from), m->kind, count);
    for (size_t j = 0; j < count; j++) d[j] -= b[j];
    if (m->mask == MASK_DRAWS) {
        for (size_t j = 0; j < count; j++) {
            uint64_t e = first + j;
            uint32_t v = lowbias32(lowbias32((uint32_t)e ^ m->k0) ^ m->k1 ^ (uint32_t)(e >> 32)) >> 8;
            d[j] = v < m->limit ? d[j] : d[j] * 0.0f;
        }
    } else if (m->mask == MASK_BITS) {
        for (size_t j = 0; j < count; j++) {
            uint64_t e = first + j;
            d[j] = (m->bits[e >> 3] >> (7 - (e & 7))) & 1 ? d[j] : d[j] * 0.0f;
        }
    }
}

static void tv_histogram(int op, const tv_model_t *m, const float *d, size_t count) {
    const uint32_t *bits = (const uint32_t *)d;
    int64_t *hist = m->hist;
    if (op == OP_COARSE) {
        for (size_t j = 0; j < count; j++) hist[(bits[j] & 0x7fffffffU) >> 16]++;
    } else { /* the few inside the chosen bin, gathered without a branch, then counted */
        uint32_t top = (uint32_t)m->select, inside[TV_BLOCK];
        size_t found = 0;
        for (size_t j = 0; j < count; j++) {
            uint32_t v = bits[j] & 0x7fffffffU;
            inside[found] = v & 0xffffU;
            found += (v >> 16) == top;
        }
        for (size_t j = 0; j < found; j++) hist[inside[j]]++;
    }
}

/* The block's merge: rows holds every model's filtered delta (models x TV_BLOCK). */
static void tv_merge(float *out, const float *b, float *rows, Py_ssize_t models, size_t count, int vote,
                     int rescale, float divisor, float alpha) {
    float elected[TV_BLOCK], total[TV_BLOCK], agree[TV_BLOCK];
    for (size_t j = 0; j < count; j++) elected[j] = total[j] = agree[j] = 0.0f;
    if (vote == VOTE_NONE) {
        for (Py_ssize_t i = 0; i < models; i++)
            for (size_t j = 0; j < count; j++) total[j] += rows[i * TV_BLOCK + j];
    } else {
        for (Py_ssize_t i = 0; i < models; i++) {
            const float *row = rows + i * TV_BLOCK;
            if (vote == VOTE_MAGNITUDE)
                for (size_t j = 0; j < count; j++) elected[j] += row[j];
            else
                for (size_t j = 0; j < count; j++) elected[j] += sign_of(row[j]);
        }
        for (size_t j = 0; j < count; j++) elected[j] = sign_of(elected[j]);
        for (Py_ssize_t i = 0; i < models; i++) {
            const float *row = rows + i * TV_BLOCK;
            for (size_t j = 0; j < count; j++) {
                float same = sign_of(row[j]) == elected[j] ? 1.0f : 0.0f;
                total[j] += row[j] * same;
                agree[j] += same;
            }
        }
        for (size_t j = 0; j < count; j++) total[j] = agree[j] > 0.0f ? total[j] / agree[j] : 0.0f;
    }
    if (rescale)
        for (size_t j = 0; j < count; j++) total[j] = total[j] / divisor;
    for (size_t j = 0; j < count; j++) out[j] = b[j] + total[j] * alpha;
}

PyDoc_STRVAR(task_vectors_doc,
"task_vectors(op, out, n, start, base, models, vote, rescale, divisor, alpha)\\n\\n"
"One pass of TIES / DARE / DELLA over elements [start, start + n) of a tensor. base is (address,\\n"
"kind) of the chunk; models a sequence of (address, kind, mask, k0, k1, limit, bits, threshold,\\n"
"hist, select): mask 0 none, 1 keep where the draw (uniform24 with k0, k1) is below limit, 2 keep\\n"
"where the bit of the packed mask at address bits is set. op 0 counts each model's |delta| by its\\n"
"top 16 bits into hist, op 1 by its low 16 bits where the top ones equal select; op 2 zeroes\\n"
"|delta| below threshold, elects (vote 0: none, a plain sum; 1: by sign count; 2: by the sign of\\n"
"the sum), takes the disjoint mean, divides by divisor if rescale, and writes base + alpha * that\\n"
"as fp32 at address out.");

static PyObject *task_vectors(PyObject *self, PyObject *args) {
    (void)self;
    int op, vote, rescale, base_kind;
    unsigned long long out_address, start;
    Py_ssize_t n;
    PyObject *base, *sequence;
    float divisor, alpha;
    if (!PyArg_ParseTuple(args, "iKnKOOipff", &op, &out_address, &n, &start, &base, &sequence, &vote, &rescale,
                          &divisor, &alpha))
        return NULL;
    const void *base_data;
    if (parse_source(base, &base_data, &base_kind) < 0) return NULL;
    if (op < OP_COARSE || op > OP_MERGE || n < 0) {
        PyErr_SetString(PyExc_ValueError, "unknown pass, or a negative count");
        return NULL;
    }
    PyObject *items = PySequence_Fast(sequence, "models must be a sequence");
    if (items == NULL) return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(items);
    tv_model_t *models = PyMem_Calloc((size_t)(count ? count : 1), sizeof(tv_model_t));
    float *rows = PyMem_Malloc(sizeof(float) * TV_BLOCK * (size_t)(count + 2));
    if (models == NULL || rows == NULL) {
        PyMem_Free(models);
        PyMem_Free(rows);
        Py_DECREF(items);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        tv_model_t *m = &models[i];
        unsigned long long address, bits, hist;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(items, i), "KiiIIIKfKl;a model is (address, kind, mask, "
                              "k0, k1, limit, bits, threshold, hist, select)", &address, &m->kind, &m->mask, &m->k0,
                              &m->k1, &m->limit, &bits, &m->threshold, &hist, &m->select) ||
            m->kind < KIND_F16 || m->kind > KIND_F32 || m->mask < MASK_NONE || m->mask > MASK_BITS ||
            (m->mask == MASK_BITS && bits == 0) || (op != OP_MERGE && hist == 0)) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "a model's kind, mask, bits or bins are missing");
            PyMem_Free(models);
            PyMem_Free(rows);
            Py_DECREF(items);
            return NULL;
        }
        m->data = (const void *)(uintptr_t)address;
        m->bits = (const uint8_t *)(uintptr_t)bits;
        m->hist = (int64_t *)(uintptr_t)hist;
    }
    Py_DECREF(items);
    float *out = (float *)(uintptr_t)out_address, *b = rows + TV_BLOCK * count, *d = b + TV_BLOCK;
    Py_BEGIN_ALLOW_THREADS
    for (size_t from = 0; from < (size_t)n; from += TV_BLOCK) {
        size_t m = (size_t)n - from < TV_BLOCK ? (size_t)n - from : TV_BLOCK;
        load_block(b, advanced(base_data, base_kind, from), base_kind, m);
        for (Py_ssize_t i = 0; i < count; i++) {
            float *row = op == OP_MERGE ? rows + i * TV_BLOCK : d;
            tv_delta(row, b, &models[i], from, m, start + from);
            if (op != OP_MERGE) {
                tv_histogram(op, &models[i], row, m);
            } else {
                float threshold = models[i].threshold;
                for (size_t j = 0; j < m; j++) row[j] = fabsf(row[j]) < threshold ? 0.0f : row[j];
            }
        }
        if (op == OP_MERGE) tv_merge(out + from, b, rows, count, m, vote, rescale, divisor, alpha);
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(models);
    PyMem_Free(rows);
    Py_RETURN_NONE;
}

/* ---- the Gram matrix of the geometric median, model stock and slerp ---- */

#define GRAM_BLOCK 256

static double dot_portable(const double *a, const double *b, size_t count) {
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    size_t whole = count & ~(size_t)3;
    for (size_t j = 0; j < whole; j += 4)
        for (int k = 0; k < 4; k++) s[k] += a[j + k] * b[j + k];
    for (size_t j = whole; j < count; j++) s[0] += a[j] * b[j];
    return (s[0] + s[1]) + (s[2] + s[3]);
}

#ifdef HAVE_X86_VECTOR
VECTOR static double dot_vector(const double *a, const double *b, size_t count) {
    __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
    size_t whole = count & ~(size_t)7, j = 0;
    for (; j < whole; j += 8) {
        s0 = _mm256_fmadd_pd(_mm256_loadu_pd(a + j), _mm256_loadu_pd(b + j), s0);
        s1 = _mm256_fmadd_pd(_mm256_loadu_pd(a + j + 4), _mm256_loadu_pd(b + j + 4), s1);
    }
    double lanes[4];
    _mm256_storeu_pd(lanes, _mm256_add_pd(s0, s1));
    double s = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
    for (; j < count; j++) s += a[j] * b[j];
    return s;
}
#endif

static double (*dot)(const double *, const double *, size_t) = dot_portable;

PyDoc_STRVAR(gram_doc,
"gram(out, n, points, reference)\\n\\n"
"Add the inner products of the n-element points (a sequence of (address, kind)), each less the\\n"
"reference (address, kind) where one is given (in fp32, then widened), to the fp64 matrix of\\n"
"len(points) x len(points) at address out.");

static PyObject *gram(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long out_address;
    Py_ssize_t n;
    PyObject *sequence, *reference;
    if (!PyArg_ParseTuple(args, "KnOO", &out_address, &n, &sequence, &reference)) return NULL;
    const void *ref_data = NULL;
    int ref_kind = KIND_F32;
    if (reference != Py_None && parse_source(reference, &ref_data, &ref_kind) < 0) return NULL;
    PyObject *items = PySequence_Fast(sequence, "points must be a sequence");
    if (items == NULL) return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(items);
    const void **data = PyMem_Calloc((size_t)(count ? count : 1), sizeof(void *));
    int *kinds = PyMem_Calloc((size_t)(count ? count : 1), sizeof(int));
    double *rows = PyMem_Malloc(sizeof(double) * GRAM_BLOCK * (size_t)(count ? count : 1));
    double *sums = PyMem_Calloc((size_t)(count > 0 ? count * count : 1), sizeof(double));
    float *wide = PyMem_Malloc(sizeof(float) * GRAM_BLOCK * 2);
    int failed = data == NULL || kinds == NULL || rows == NULL || sums == NULL || wide == NULL;
    if (failed) PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < count && !failed; i++)
        failed = parse_source(PySequence_Fast_GET_ITEM(items, i), &data[i], &kinds[i]) < 0;
    Py_DECREF(items);
    if (!failed && n > 0) {
        double *out = (double *)(uintptr_t)out_address;
        Py_BEGIN_ALLOW_THREADS
        for (size_t from = 0; from < (size_t)n; from += GRAM_BLOCK) {
            size_t m = (size_t)n - from < GRAM_BLOCK ? (size_t)n - from : GRAM_BLOCK;
            float *x = wide, *r = wide + GRAM_BLOCK;
            if (ref_data != NULL) load_block(r, advanced(ref_data, ref_kind, from), ref_kind, m);
            for (Py_ssize_t i = 0; i < count; i++) {
                load_block(x, advanced(data[i], kinds[i], from), kinds[i], m);
                double *row = rows + i * GRAM_BLOCK;
                if (ref_data != NULL)
                    for (size_t j = 0; j < m; j++) row[j] = (double)(x[j] - r[j]);
                else
                    for (size_t j = 0; j < m; j++) row[j] = (double)x[j];
            }
            for (Py_ssize_t a = 0; a < count; a++)
                for (Py_ssize_t c = a; c < count; c++)
                    sums[a * count + c] += dot(rows + a * GRAM_BLOCK, rows + c * GRAM_BLOCK, m);
        }
        for (Py_ssize_t a = 0; a < count; a++)
            for (Py_ssize_t c = a; c < count; c++) {
                out[a * count + c] += sums[a * count + c];
                if (c != a) out[c * count + a] += sums[a * count + c];
            }
        Py_END_ALLOW_THREADS
    }
    PyMem_Free(data);
    PyMem_Free(kinds);
    PyMem_Free(rows);
    PyMem_Free(sums);
    PyMem_Free(wide);
    if (failed) return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef method_kernels[] = {
    {"task_vectors", task_vectors, METH_VARARGS, task_vectors_doc},
    {"gram", gram, METH_VARARGS, gram_doc},
    {"all_finite", all_finite, METH_VARARGS, all_finite_doc},
    {"magnitude_histogram", magnitude_histogram, METH_VARARGS, magnitude_histogram_doc},
    {"elect_merge", elect_merge, METH_VARARGS, elect_merge_doc},
    {"uniform24", uniform24, METH_VARARGS, uniform24_doc},
    {NULL, NULL, 0, NULL},
};

int add_method_kernels(PyObject *module, int vector) {
#ifdef HAVE_X86_VECTOR
    if (vector) {
        load_block = load_block_vector;
        dot = dot_vector;
    }
#else
    (void)vector;
#endif
    return PyModule_AddFunctions(module, method_kernels);
}
