/* sparsetrain's native CPU kernel: error feedback's compensation, the threshold selection and
 * the clearing of the gradient in one pass over memory (see sparsetrain/_native/__init__.py).
 *
 * For i in [0, n):  v = grad[i] + res[i]  (res may be NULL: v = grad[i]);  out[i] = v (out may
 * be NULL when res is: a selection over grad alone, which grad may then not be cleared);
 * when !(|v| <= thr) the global index base + i is recorded (in ascending order) in idx, and v
 * in vals (unless NULL), while fewer than cap are recorded, and counted in any case;
 * grad[i] = 0 when clear.
 * Returns count plus the number of entries selected here; *nonfinite is set to 1 when an entry
 * of grad is NaN or infinite. The selection test is hardshrink's: NaN is selected, as is any
 * |v| > thr; 0 never is. */
#include <float.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Elements a block: a block of grad, res and out (12 KiB of float32) and its selection mask stay
 * in L1 cache between the pass that sums, checks and compares and the scan of the mask, which
 * only looks inside the mask's words that hold a selected entry. A branch an element instead,
 * taken for 1% of them, cost twice the time of the whole pass. */
#define ST_BLOCK 1024
#define ST_WORDS (ST_BLOCK / 64)

/* The block pass: v = g[i] + r[i] (or g[i]) for i < len, stored in o (unless NULL); bit i of
 * bits (zeroed by the caller) set where !(|v| <= thr); returns nonzero when a g[i] is NaN or
 * infinite (!(|g| <= max finite)). One version a vector width (see st_level). */
typedef int (*st_pass_f32)(const float *, const float *, float *, int64_t, float, uint64_t *);
typedef int (*st_pass_f64)(const double *, const double *, double *, int64_t, double,
                           uint64_t *);

/* Scalar: the tail of a block after the vector steps. */
#define ST_SCALAR_PASS(T, MAXV)                                                               \
    for (; i < len; i++) {                                                                    \
        const T gi = g[i];                                                                    \
        const T v = r ? gi + r[i] : gi;                                                       \
        if (o)                                                                                \
            o[i] = v;                                                                         \
        nf |= !((gi < 0 ? -gi : gi) <= MAXV);                                                 \
        bits[i >> 6] |= (uint64_t)!((v < 0 ? -v : v) <= thr) << (i & 63);                    \
    }

/* The portable version: one flag byte an entry in loops the compiler can vectorise (one loop a
 * case, with no branch inside, and the finiteness check on the exponent's bits: a bit an entry
 * set in the loop, or a float comparison for the check, kept it from vectorising), then each 8
 * flags packed into 8 bits of the mask word: with every byte of w 0 or 1, the product
 * w * 0x0102040810204080 holds flag j at bit 56 + j and nothing else in its top byte (no two
 * partial products meet, so none carries). */
/* Eight flag bytes as a word, flag j in byte j (bits 8j to 8j + 7). */
static uint64_t st_flags8(const uint8_t *f)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    uint64_t w;
    memcpy(&w, f, sizeof w);
    return w;
#else
    uint64_t w = 0;
    for (int j = 0; j < 8; j++)
        w |= (uint64_t)f[j] << (8 * j);
    return w;
#endif
}

#define ST_FLAG_LOOP(T, UT, EXP_SHIFT, EXP_MASK, VALUE, STORE)                                \
    for (int64_t i = 0; i < len; i++) {                                                       \
        const T gi = g[i];                                                                    \
        const T v = VALUE;                                                                    \
        UT gbits;                                                                             \
        memcpy(&gbits, &gi, sizeof gbits);                                                    \
        nf |= (UT)(((gbits >> EXP_SHIFT) & EXP_MASK) == EXP_MASK);                            \
        STORE;                                                                                \
        flag[i] = !((v < 0 ? -v : v) <= thr);                                                 \
    }

#define ST_GENERIC(NAME, T, UT, EXP_SHIFT, EXP_MASK)                                         \
    static int NAME(const T *g, const T *r, T *o, int64_t len, T thr, uint64_t *bits)         \
    {                                                                                         \
        uint8_t flag[ST_BLOCK];                                                               \
        UT nf = 0;                                                                            \
        if (r) /* then o too */                                                               \
            ST_FLAG_LOOP(T, UT, EXP_SHIFT, EXP_MASK, gi + r[i], o[i] = v)                     \
        else if (o)                                                                           \
            ST_FLAG_LOOP(T, UT, EXP_SHIFT, EXP_MASK, gi, o[i] = v)                            \
        else                                                                                  \
            ST_FLAG_LOOP(T, UT, EXP_SHIFT, EXP_MASK, gi, (void)0)                             \
        for (int64_t i = len; i & 7; i++)                                                     \
            flag[i] = 0;                                                                      \
        for (int64_t e = 0; e < len; e += 8) {                                                \
            const uint64_t w = st_flags8(flag + e);                                           \
            if (w)                                                                            \
                bits[e >> 6] |= ((w * 0x0102040810204080ull) >> 56) << (e & 63);              \
        }                                                                                     \
        return nf != 0;                                                                       \
    }

ST_GENERIC(st_pass_f32_generic, float, uint32_t, 23, 0xffu)
ST_GENERIC(st_pass_f64_generic, double, uint64_t, 52, 0x7ffu)

/* ST_PORTABLE_ONLY builds what other processors get (the tests build it so on x86-64 too). */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(ST_PORTABLE_ONLY)
#include <immintrin.h>
#define ST_X86 1

/* A vector version: LANES elements a step (a divisor of 64), so 64 / LANES steps make a word of
 * the mask, kept in a register; CMP(a, b) is true where !(a <= b), also for NaN; MASK packs a
 * comparison's lanes into bits. */
#define ST_VECTOR(NAME, TARGET, T, VT, LANES, LOAD, STORE, ADD, ANDNOT, OR, CMP, MASK, SET1,  \
                  MAXV)                                                                       \
    __attribute__((target(TARGET))) static int NAME(const T *g, const T *r, T *o,             \
                                                    int64_t len, T thr, uint64_t *bits)       \
    {                                                                                         \
        const VT sign = SET1((T)-0.0), vthr = SET1(thr), vmax = SET1(MAXV);                   \
        VT bad = SET1((T)0);                                                                  \
        int64_t i = 0;                                                                        \
        for (; i + 64 <= len; i += 64) {                                                      \
            uint64_t word = 0;                                                                \
            for (int j = 0; j < 64; j += LANES) {                                             \
                const VT gv = LOAD(g + i + j);                                                \
                const VT v = r ? ADD(gv, LOAD(r + i + j)) : gv;                               \
                if (o)                                                                        \
                    STORE(o + i + j, v);                                                      \
                bad = OR(bad, CMP(ANDNOT(sign, gv), vmax));                                   \
                word |= (uint64_t)(unsigned)MASK(CMP(ANDNOT(sign, v), vthr)) << j;            \
            }                                                                                 \
            bits[i >> 6] = word;                                                              \
        }                                                                                     \
        int nf = MASK(bad) != 0;                                                              \
        ST_SCALAR_PASS(T, MAXV)                                                               \
        return nf;                                                                            \
    }

#define ST_AVX_NLE_PS(a, b) _mm256_cmp_ps(a, b, _CMP_NLE_UQ)
#define ST_AVX_NLE_PD(a, b) _mm256_cmp_pd(a, b, _CMP_NLE_UQ)
ST_VECTOR(st_pass_f32_avx2, "avx2", float, __m256, 8, _mm256_loadu_ps, _mm256_storeu_ps,
          _mm256_add_ps, _mm256_andnot_ps, _mm256_or_ps, ST_AVX_NLE_PS, _mm256_movemask_ps,
          _mm256_set1_ps, FLT_MAX)
ST_VECTOR(st_pass_f64_avx2, "avx2", double, __m256d, 4, _mm256_loadu_pd, _mm256_storeu_pd,
          _mm256_add_pd, _mm256_andnot_pd, _mm256_or_pd, ST_AVX_NLE_PD, _mm256_movemask_pd,
          _mm256_set1_pd, DBL_MAX)
/* SSE2, which every x86-64 processor has: cmpnle is true for NaN too. */
ST_VECTOR(st_pass_f32_sse2, "sse2", float, __m128, 4, _mm_loadu_ps, _mm_storeu_ps, _mm_add_ps,
          _mm_andnot_ps, _mm_or_ps, _mm_cmpnle_ps, _mm_movemask_ps, _mm_set1_ps, FLT_MAX)
ST_VECTOR(st_pass_f64_sse2, "sse2", double, __m128d, 2, _mm_loadu_pd, _mm_storeu_pd, _mm_add_pd,
          _mm_andnot_pd, _mm_or_pd, _mm_cmpnle_pd, _mm_movemask_pd, _mm_set1_pd, DBL_MAX)
#endif

/* The version that runs: 2 AVX2, 1 SSE2, 0 portable C; -1 (the default) the best this CPU
 * has. The tests set it to compare the versions (st_set_vector_level), and read which one the
 * last kernel call ran (st_last_vector_level). Atomic, as kernel calls may run in threads. */
static int st_forced = -1;
static int st_last = -1;

static int st_best(void)
{
#ifdef ST_X86
    __builtin_cpu_init(); /* idempotent and cheap */
    return __builtin_cpu_supports("avx2") ? 2 : 1;
#else
    return 0;
#endif
}

static int st_level(void)
{
    const int forced = __atomic_load_n(&st_forced, __ATOMIC_RELAXED);
    return forced >= 0 ? forced : st_best();
}

/* Set the version (-1: the best this CPU has; a higher one than that is taken as -1), or with
 * -2 leave it as it is; returns the one in use. */
int32_t st_set_vector_level(int32_t level)
{
    if (level >= -1)
        __atomic_store_n(&st_forced, level < st_best() ? level : -1, __ATOMIC_RELAXED);
    return st_level();
}

/* The version the last kernel call ran (-1 before the first). */
int32_t st_last_vector_level(void) { return __atomic_load_n(&st_last, __ATOMIC_RELAXED); }

/* The versions by level (0 portable C, 1 SSE2, 2 AVX2: as many as this build has). */
static const st_pass_f32 st_passes_f32[] = {
    st_pass_f32_generic,
#ifdef ST_X86
    st_pass_f32_sse2,
    st_pass_f32_avx2,
#endif
};
static const st_pass_f64 st_passes_f64[] = {
    st_pass_f64_generic,
#ifdef ST_X86
    st_pass_f64_sse2,
    st_pass_f64_avx2,
#endif
};

/* The level a kernel call runs, recorded for st_last_vector_level. */
static int st_run_level(void)
{
    const int level = st_level();
    __atomic_store_n(&st_last, level, __ATOMIC_RELAXED);
    return level;
}

#define ST_KERNEL(NAME, T, PASS_T, PASSES)                                                    \
    int64_t NAME(T *grad, const T *res, T *out, int64_t n, T thr, int64_t base, int64_t *idx, \
                 T *vals, int64_t cap, int64_t count, int32_t *nonfinite, int32_t clear)      \
    {                                                                                         \
        const PASS_T pass = PASSES[st_run_level()];                                           \
        int nf = 0;                                                                           \
        uint64_t bits[ST_WORDS];                                                              \
        for (int64_t a = 0; a < n; a += ST_BLOCK) {                                           \
            const int64_t len = a + ST_BLOCK < n ? ST_BLOCK : n - a;                          \
            T *g = grad + a;                                                                  \
            T *o = out ? out + a : NULL;                                                      \
            const T *v_at = o ? o : g; /* where the block's v are, until g is cleared */      \
            memset(bits, 0, sizeof bits);                                                     \
            nf |= pass(g, res ? res + a : NULL, o, len, thr, bits);                           \
            for (int64_t w = 0; w < (len + 63) / 64; w++) {                                   \
                for (uint64_t word = bits[w]; word; word &= word - 1) {                       \
                    const int64_t at = w * 64 + __builtin_ctzll(word);                        \
                    if (count < cap) {                                                        \
                        idx[count] = base + a + at;                                           \
                        if (vals)                                                             \
                            vals[count] = v_at[at];                                           \
                    }                                                                         \
                    count++;                                                                  \
                }                                                                             \
            }                                                                                 \
            if (clear)                                                                        \
                memset(g, 0, (size_t)len * sizeof(T));                                        \
        }                                                                                     \
        if (nf)                                                                               \
            *nonfinite = 1;                                                                   \
        return count;                                                                         \
    }

ST_KERNEL(st_compensate_select_f32, float, st_pass_f32, st_passes_f32)
ST_KERNEL(st_compensate_select_f64, double, st_pass_f64, st_passes_f64)

/* st_difference_*: the entries of (idx, val), a sparse vector with strictly ascending indices,
 * whose index is not in sel (also strictly ascending), in order, into out_idx/out_val (room for
 * n); returns their number. One linear pass over both; -1, having written an unspecified part
 * of the output, when a list is not strictly ascending (the caller then takes another way). */
#define ST_DIFFERENCE(NAME, I, T)                                                             \
    int64_t NAME(const I *idx, const T *val, int64_t n, const I *sel, int64_t m, I *out_idx,  \
                 T *out_val)                                                                  \
    {                                                                                         \
        int64_t j = 0, c = 0;                                                                 \
        for (int64_t i = 1; i < n; i++)                                                       \
            if (idx[i] <= idx[i - 1])                                                         \
                return -1;                                                                    \
        for (int64_t i = 1; i < m; i++)                                                       \
            if (sel[i] <= sel[i - 1])                                                         \
                return -1;                                                                    \
        for (int64_t i = 0; i < n; i++) {                                                     \
            while (j < m && sel[j] < idx[i])                                                  \
                j++;                                                                          \
            if (j < m && sel[j] == idx[i])                                                    \
                continue;                                                                     \
            out_idx[c] = idx[i];                                                              \
            out_val[c] = val[i];                                                              \
            c++;                                                                              \
        }                                                                                     \
        return c;                                                                             \
    }

ST_DIFFERENCE(st_difference_i32_f32, int32_t, float)
ST_DIFFERENCE(st_difference_i64_f32, int64_t, float)
ST_DIFFERENCE(st_difference_i32_f64, int32_t, double)
ST_DIFFERENCE(st_difference_i64_f64, int64_t, double)

/* The version of this file's interface; the loader checks it. */
int32_t st_abi_version(void) { return 4; }
