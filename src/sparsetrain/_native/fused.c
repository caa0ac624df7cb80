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
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the flag scan reads eight flags as one little-endian word"
#endif

/* Elements a block: a block of grad, res and out (12 KiB of float32) and its flags stay in L1
 * cache between the vectorised sum (which also writes one flag byte an element) and the scan of
 * the flags eight at a time, which only looks inside the words that hold a selected entry. A
 * branch an element instead, taken for 1% of them, cost twice the time of the whole pass. */
#define ST_BLOCK 1024

#define ST_SUM_LOOP(T, UT, EXP_SHIFT, EXP_MASK, VALUE, STORE)                                 \
    for (int64_t i = 0; i < len; i++) {                                                       \
        const T gi = g[i];                                                                    \
        const T v = VALUE;                                                                    \
        UT bits;                                                                              \
        memcpy(&bits, &gi, sizeof bits);                                                      \
        nf |= (UT)(((bits >> EXP_SHIFT) & EXP_MASK) == EXP_MASK);                             \
        STORE;                                                                                \
        flag[i] = !((v < 0 ? -v : v) <= thr);                                                 \
    }

#define ST_KERNEL(NAME, T, UT, EXP_SHIFT, EXP_MASK)                                          \
    int64_t NAME(T *grad, const T *res, T *out, int64_t n, T thr, int64_t base, int64_t *idx, \
                 T *vals, int64_t cap, int64_t count, int32_t *nonfinite, int32_t clear)      \
    {                                                                                         \
        UT nf = 0;                                                                            \
        uint8_t flag[ST_BLOCK];                                                               \
        for (int64_t a = 0; a < n; a += ST_BLOCK) {                                           \
            const int64_t len = a + ST_BLOCK < n ? ST_BLOCK : n - a;                          \
            T *g = grad + a;                                                                  \
            T *o = out ? out + a : NULL;                                                      \
            const T *v_at = o ? o : g; /* where the block's v are, until g is cleared */      \
            if (res) {                                                                        \
                const T *r = res + a;                                                         \
                ST_SUM_LOOP(T, UT, EXP_SHIFT, EXP_MASK, gi + r[i], o[i] = v)                  \
            } else if (o) {                                                                   \
                ST_SUM_LOOP(T, UT, EXP_SHIFT, EXP_MASK, gi, o[i] = v)                         \
            } else {                                                                          \
                ST_SUM_LOOP(T, UT, EXP_SHIFT, EXP_MASK, gi, (void)0)                          \
            }                                                                                 \
            /* zero flags up to a whole word, so the scan reads whole words only */           \
            for (int64_t i = len; i & 7; i++)                                                 \
                flag[i] = 0;                                                                  \
            for (int64_t w = 0; w < len; w += 8) {                                            \
                uint64_t word; /* eight flags, each byte 0 or 1 */                            \
                memcpy(&word, flag + w, 8);                                                   \
                while (word) {                                                                \
                    /* the lowest set byte, in memory order on a little-endian machine */     \
                    const int64_t at = w + (__builtin_ctzll(word) >> 3);                      \
                    if (count < cap) {                                                        \
                        idx[count] = base + a + at;                                           \
                        if (vals)                                                             \
                            vals[count] = v_at[at];                                           \
                    }                                                                         \
                    count++;                                                                  \
                    word &= word - 1;                                                         \
                }                                                                             \
            }                                                                                 \
            if (clear)                                                                        \
                memset(g, 0, (size_t)len * sizeof(T));                                        \
        }                                                                                     \
        if (nf)                                                                               \
            *nonfinite = 1;                                                                   \
        return count;                                                                         \
    }

ST_KERNEL(st_compensate_select_f32, float, uint32_t, 23, 0xffu)
ST_KERNEL(st_compensate_select_f64, double, uint64_t, 52, 0x7ffu)

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
int32_t st_abi_version(void) { return 2; }
