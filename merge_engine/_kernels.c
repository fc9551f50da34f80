/* The merge's hot loop in one pass: out = round(c0 * x0 + c1 * x1 + ...), summed in fp32.

   Torch needs one pass per source to widen it into an fp32 buffer and another to add that buffer;
   this reads each source once, widens and accumulates 1,024 elements at a time in L1 cache, checks
   the range and rounds straight into the output. It computes exactly what the torch path in
   accumulate.py computes: acc = c0 * x0, then acc = fma(x_k, c_k, acc) in fp32 for each further
   source, rounded once to nearest-even. So the bytes are the same either way (the tests compare
   them bit for bit), and the same as the GPU path.

   Sources and output are fp16, bf16 or fp32. On x86 CPUs with AVX2, FMA and F16C (2013 on), a
   vector version is chosen at run time; elsewhere a portable one gives the same results.

   Also here: the guard that lets inputs be read through a memory mapping safely (see below).
   The non-linear methods' kernels are in _methods.c. */

#include "_kernels.h"

#define BLOCK 1024

typedef struct {
    const void *data;
    int kind;
    float coefficient;
} term_t;

/* ---- portable version ---- */

static int sum_portable(void *out, int out_kind, size_t n, const term_t *terms, Py_ssize_t count, float limit) {
    float acc[BLOCK];
    int bad = 0;
    for (size_t base = 0; base < n; base += BLOCK) {
        size_t m = n - base < BLOCK ? n - base : BLOCK;
        for (Py_ssize_t k = 0; k < count; k++) {
            const term_t *t = &terms[k];
            for (size_t i = 0; i < m; i++) {
                float x = load_scalar(t->data, t->kind, base + i);
                acc[i] = k == 0 ? t->coefficient * x : fmaf(x, t->coefficient, acc[i]);
            }
        }
        for (size_t i = 0; i < m; i++) {
            bad |= !(fabsf(acc[i]) <= limit);
            store_scalar(out, out_kind, base + i, acc[i]);
        }
    }
    return bad;
}

/* ---- x86 vector version: AVX2, FMA, F16C ---- */
#ifdef HAVE_X86_VECTOR


VECTOR static inline void store8_bf16(uint16_t *out, __m256 v) {
    __m256i b = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7fff)), lsb), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
    _mm_storeu_si128((__m128i *)out, packed);
}

VECTOR static int sum_vector(void *out, int out_kind, size_t n, const term_t *terms, Py_ssize_t count, float limit) {
    float acc[BLOCK];
    const __m256 magnitude_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 vlimit = _mm256_set1_ps(limit);
    __m256 bad = _mm256_setzero_ps();
    int bad_tail = 0;
    for (size_t base = 0; base < n; base += BLOCK) {
        size_t m = n - base < BLOCK ? n - base : BLOCK, whole = m & ~(size_t)7;
        for (Py_ssize_t k = 0; k < count; k++) {
            const term_t *t = &terms[k];
            const __m256 c = _mm256_set1_ps(t->coefficient);
            if (k == 0) {
                for (size_t i = 0; i < whole; i += 8)
                    _mm256_storeu_ps(acc + i, _mm256_mul_ps(c, load8(t->data, t->kind, base + i)));
                for (size_t i = whole; i < m; i++) acc[i] = t->coefficient * load_scalar(t->data, t->kind, base + i);
            } else {
                for (size_t i = 0; i < whole; i += 8)
                    _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(load8(t->data, t->kind, base + i), c, _mm256_loadu_ps(acc + i)));
                for (size_t i = whole; i < m; i++) acc[i] = fmaf(load_scalar(t->data, t->kind, base + i), t->coefficient, acc[i]);
            }
        }
        for (size_t i = 0; i < whole; i += 8) {
            __m256 v = _mm256_loadu_ps(acc + i);
            bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_and_ps(v, magnitude_mask), vlimit, _CMP_NLE_UQ));
            switch (out_kind) {
            case KIND_F16:
                _mm_storeu_si128((__m128i *)((uint16_t *)out + base + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
                break;
            case KIND_BF16: store8_bf16((uint16_t *)out + base + i, v); break;
            default: _mm256_storeu_ps((float *)out + base + i, v);
            }
        }
        for (size_t i = whole; i < m; i++) {
            bad_tail |= !(fabsf(acc[i]) <= limit);
            store_scalar(out, out_kind, base + i, acc[i]);
        }
    }
    return bad_tail || !_mm256_testz_ps(bad, bad);
}

#endif

typedef int (*sum_fn)(void *, int, size_t, const term_t *, Py_ssize_t, float);
static sum_fn chosen = sum_portable;

/* ---- Python ---- */

PyDoc_STRVAR(weighted_sum_doc,
"weighted_sum(out, out_kind, n, terms, limit, portable=False) -> bool\n\n"
"out[i] = round(sum of coefficient * source[i]) for i < n, summed in fp32 and rounded once.\n"
"out and each source are addresses (as ints) of n elements; kinds: 0 fp16, 1 bf16, 2 fp32;\n"
"terms: a sequence of (address, kind, coefficient). True when every sum's magnitude is at most\n"
"limit (a NaN is not). portable=True uses the portable code even where vectors are available.");

static PyObject *weighted_sum(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    static char *keywords[] = {"out", "out_kind", "n", "terms", "limit", "portable", NULL};
    unsigned long long out_address;
    Py_ssize_t n;
    int out_kind, portable = 0;
    PyObject *sequence;
    float limit;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "KinOf|p", keywords, &out_address, &out_kind, &n, &sequence,
                                     &limit, &portable))
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "n must not be negative");
        return NULL;
    }
    if (out_kind < KIND_F16 || out_kind > KIND_F32) {
        PyErr_SetString(PyExc_ValueError, "unknown output kind");
        return NULL;
    }
    PyObject *items = PySequence_Fast(sequence, "terms must be a sequence");
    if (items == NULL) return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(items);
    if (count < 1) {
        Py_DECREF(items);
        PyErr_SetString(PyExc_ValueError, "at least one term is needed");
        return NULL;
    }
    term_t *terms = PyMem_Malloc(sizeof(term_t) * (size_t)count);
    if (terms == NULL) {
        Py_DECREF(items);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t k = 0; k < count; k++) {
        unsigned long long address;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(items, k), "Kif;a term is (address, kind, coefficient)",
                              &address, &terms[k].kind, &terms[k].coefficient)) {
            PyMem_Free(terms);
            Py_DECREF(items);
            return NULL;
        }
        if (terms[k].kind < KIND_F16 || terms[k].kind > KIND_F32) {
            PyMem_Free(terms);
            Py_DECREF(items);
            PyErr_SetString(PyExc_ValueError, "unknown source kind");
            return NULL;
        }
        terms[k].data = (const void *)(uintptr_t)address;
    }
    Py_DECREF(items);
    sum_fn run = portable ? sum_portable : chosen;
    int bad;
    Py_BEGIN_ALLOW_THREADS
    bad = run((void *)(uintptr_t)out_address, out_kind, (size_t)n, terms, count, limit);
    Py_END_ALLOW_THREADS
    PyMem_Free(terms);
    return PyBool_FromLong(!bad);
}

/* ---- the mapping guard ----

   Inputs are read through read-only mappings of their files. If a file shrinks while it is mapped
   (truncated, or rewritten by a tool that truncates first), touching a page past its new end raises
   SIGBUS, which kills the process wherever it happens: in this kernel, in torch, anywhere. So every
   mapping is registered here, and a SIGBUS handler that finds the faulting address in a registered
   mapping replaces the rest of that mapping with zero pages, notes the fault, and returns: the read
   goes on with zeros, and the reader, which checks `guard_faulted` after each chunk it reads, raises
   a clear error instead. A fault anywhere else goes to the handler that was there before (Python's
   faulthandler, or the default action). mmap is a plain system call on Linux, safe in a handler. */

#ifdef HAVE_GUARD
#define GUARD_SLOTS 4096

typedef struct {
    uintptr_t start;
    size_t length; /* whole pages */
    int used, faulted;
} guard_t;

static guard_t guards[GUARD_SLOTS];
static struct sigaction previous_action;
static size_t page_size = 4096;

static void on_sigbus(int sig, siginfo_t *info, void *context) {
    uintptr_t address = (uintptr_t)info->si_addr;
    for (int i = 0; i < GUARD_SLOTS; i++) {
        guard_t *g = &guards[i];
        if (!__atomic_load_n(&g->used, __ATOMIC_ACQUIRE) || address - g->start >= g->length) continue;
        uintptr_t from = address & ~(uintptr_t)(page_size - 1);
        void *zeros = mmap((void *)from, g->start + g->length - from, PROT_READ,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
        if (zeros == MAP_FAILED) break;
        __atomic_store_n(&g->faulted, 1, __ATOMIC_RELEASE);
        return;
    }
    if (previous_action.sa_flags & SA_SIGINFO) {
        previous_action.sa_sigaction(sig, info, context);
    } else if (previous_action.sa_handler != SIG_DFL && previous_action.sa_handler != SIG_IGN) {
        previous_action.sa_handler(sig);
    } else {
        signal(sig, SIG_DFL); /* a faulting access runs again and ends the process, as without us */
        if (info->si_code <= 0) raise(sig); /* sent by kill(): nothing runs again, so send it on */
    }
}

/* Ours must be the handler when a mapping is registered; whoever installed one since (Python's
   faulthandler, say) becomes the one we pass foreign faults to. */
static int install_handler(void) {
    struct sigaction current;
    if (sigaction(SIGBUS, NULL, &current) != 0) return -1;
    if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == on_sigbus) return 0;
    struct sigaction ours;
    memset(&ours, 0, sizeof ours);
    ours.sa_sigaction = on_sigbus;
    ours.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&ours.sa_mask);
    previous_action = current;
    return sigaction(SIGBUS, &ours, NULL);
}
#endif

PyDoc_STRVAR(guard_map_doc,
"guard_map(address, length) -> int\\n\\n"
"Register the mapping [address, address + length): a SIGBUS inside it no longer kills the process\\n"
"(see guard_faulted). Returns the slot to pass to guard_faulted and guard_release, or -1 where\\n"
"nothing can be guarded (then do not read the file through a mapping).");

static PyObject *guard_map(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long address;
    Py_ssize_t length;
    if (!PyArg_ParseTuple(args, "Kn", &address, &length)) return NULL;
#ifdef HAVE_GUARD
    if (length <= 0 || install_handler() != 0) return PyLong_FromLong(-1);
    for (int i = 0; i < GUARD_SLOTS; i++) {
        guard_t *g = &guards[i];
        if (__atomic_load_n(&g->used, __ATOMIC_ACQUIRE)) continue; /* only taken under the GIL */
        g->start = (uintptr_t)address;
        g->length = ((size_t)length + page_size - 1) & ~(page_size - 1);
        __atomic_store_n(&g->faulted, 0, __ATOMIC_RELEASE);
        __atomic_store_n(&g->used, 1, __ATOMIC_RELEASE);
        return PyLong_FromLong(i);
    }
#endif
    return PyLong_FromLong(-1);
}

static int slot_arg(PyObject *args, int *slot) {
    if (!PyArg_ParseTuple(args, "i", slot)) return -1;
#ifdef HAVE_GUARD
    if (*slot >= 0 && *slot < GUARD_SLOTS) return 0;
#endif
    PyErr_SetString(PyExc_ValueError, "no such guard slot");
    return -1;
}

PyDoc_STRVAR(guard_faulted_doc, "guard_faulted(slot) -> bool: whether a read of that mapping has faulted.");

static PyObject *guard_faulted(PyObject *self, PyObject *args) {
    (void)self;
    int slot;
    if (slot_arg(args, &slot) < 0) return NULL;
#ifdef HAVE_GUARD
    return PyBool_FromLong(__atomic_load_n(&guards[slot].faulted, __ATOMIC_ACQUIRE));
#else
    Py_RETURN_FALSE;
#endif
}

PyDoc_STRVAR(guard_release_doc,
"guard_release(slot) -> bool\\n\\nForget the mapping (before unmapping it); returns whether it faulted.");

static PyObject *guard_release(PyObject *self, PyObject *args) {
    (void)self;
    int slot;
    if (slot_arg(args, &slot) < 0) return NULL;
#ifdef HAVE_GUARD
    int faulted = __atomic_load_n(&guards[slot].faulted, __ATOMIC_ACQUIRE);
    __atomic_store_n(&guards[slot].used, 0, __ATOMIC_RELEASE);
    return PyBool_FromLong(faulted);
#else
    Py_RETURN_FALSE;
#endif
}

PyDoc_STRVAR(address_doc,
"address(buffer) -> int\n\n"
"The address of a buffer's first byte, read-only buffers (a PROT_READ mmap) included. It stays\n"
"valid only while the buffer's memory does: the caller keeps the object alive.");

static PyObject *address(PyObject *self, PyObject *arg) {
    (void)self;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    PyObject *result = PyLong_FromVoidPtr(view.buf);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"address", address, METH_O, address_doc},
    {"weighted_sum", (PyCFunction)(void (*)(void))weighted_sum, METH_VARARGS | METH_KEYWORDS, weighted_sum_doc},
    {"guard_map", guard_map, METH_VARARGS, guard_map_doc},
    {"guard_faulted", guard_faulted, METH_VARARGS, guard_faulted_doc},
    {"guard_release", guard_release, METH_VARARGS, guard_release_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernels", "Fused weighted sums for merges, the non-linear methods' passes, and the guard of mapped inputs.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__kernels(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    const char *isa = "portable";
    int vector = 0;
#ifdef HAVE_GUARD
    long page = sysconf(_SC_PAGESIZE);
    if (page > 0) page_size = (size_t)page;
#endif
#ifdef HAVE_X86_VECTOR
    if (has_vector()) {
        chosen = sum_vector;
        isa = "avx2";
        vector = 1;
    }
#endif
    if (add_method_kernels(m, vector) < 0 || PyModule_AddStringConstant(m, "ISA", isa) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
