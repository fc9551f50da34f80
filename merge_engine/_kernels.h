/* What the native kernels share: exact conversions between fp16, bf16 and fp32, and the
   x86 vector loads chosen at run time (AVX2, FMA, F16C). */

#ifndef SDMERGE_KERNELS_H
#define SDMERGE_KERNELS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#ifndef _WIN32
#define HAVE_GUARD 1
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>
#endif

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_X86_VECTOR 1
#include <immintrin.h>
#endif

enum { KIND_F16 = 0, KIND_BF16 = 1, KIND_F32 = 2 };

/* ---- exact scalar conversions (tails, and the portable version) ---- */

static inline float from_bits(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
static inline uint32_t to_bits(float f) { uint32_t b; memcpy(&b, &f, 4); return b; }

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    if (exponent == 0x1f) return from_bits(sign | 0x7f800000 | (mantissa << 13)); /* Inf, NaN */
    if (exponent == 0) { /* zero or subnormal: mantissa * 2^-24, exact */
        float v = (float)mantissa * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    return from_bits(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

static inline uint16_t f32_to_f16(float f) { /* round to nearest even, as F16C's vcvtps2ph */
    uint32_t b = to_bits(f), sign = (b >> 16) & 0x8000, magnitude = b & 0x7fffffff;
    if (magnitude > 0x7f800000) return (uint16_t)(sign | 0x7e00 | ((magnitude >> 13) & 0x3ff)); /* NaN */
    if (magnitude >= 0x477ff000) return (uint16_t)(sign | 0x7c00); /* 65520 and up round to Inf */
    if (magnitude < 0x38800000) /* below 2^-14: a subnormal (or zero, or the smallest normal) */
        return (uint16_t)(sign | (uint32_t)nearbyintf(from_bits(magnitude) * 16777216.0f));
    return (uint16_t)(sign | ((magnitude + 0xfff + ((magnitude >> 13) & 1) - 0x38000000) >> 13));
}

static inline float bf16_to_f32(uint16_t h) { return from_bits((uint32_t)h << 16); }

static inline uint16_t f32_to_bf16(float f) {
    uint32_t b = to_bits(f);
    if ((b & 0x7fffffff) > 0x7f800000) return 0x7fc0; /* NaN */
    return (uint16_t)((b + 0x7fff + ((b >> 16) & 1)) >> 16);
}

static inline float load_scalar(const void *data, int kind, size_t i) {
    switch (kind) {
    case KIND_F16: return f16_to_f32(((const uint16_t *)data)[i]);
    case KIND_BF16: return bf16_to_f32(((const uint16_t *)data)[i]);
    default: return ((const float *)data)[i];
    }
}

static inline void store_scalar(void *out, int kind, size_t i, float v) {
    switch (kind) {
    case KIND_F16: ((uint16_t *)out)[i] = f32_to_f16(v); break;
    case KIND_BF16: ((uint16_t *)out)[i] = f32_to_bf16(v); break;
    default: ((float *)out)[i] = v;
    }
}

#ifdef HAVE_X86_VECTOR
#define VECTOR __attribute__((target("avx2,fma,f16c")))

VECTOR static inline __m256 load8(const void *data, int kind, size_t i) {
    switch (kind) {
    case KIND_F16: return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)data + i)));
    case KIND_BF16: {
        __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)data + i)));
        return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
    }
    default: return _mm256_loadu_ps((const float *)data + i);
    }
}

static inline int has_vector(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#endif

/* _methods.c: the non-linear methods' kernels, added to the module at its import. */
int add_method_kernels(PyObject *module, int vector);

#endif
