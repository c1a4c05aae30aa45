/* Fused CPU loops for combine and project on a packed basis (8, 4, 2 or 1-bit codes), and, at the end of
 * this file, for gram and orth_quantize (the subspace build).
 *
 * The torch references (reference.py) make three to four passes per chunk: codes -> float32,
 * scale, sum over rows, add the mean. Here each basis byte is read once per op and decoded on the
 * way (8-bit codes in registers; narrower codes into a scratch row that stays in L1), so at 8 bits
 * both ops run near the speed of reading the basis. Layout as in layout.py: row r of
 * the basis is the bytes codes[r * code_stride ...], column j of a b-bit row sits in byte j * b / 8
 * at bit (j % (8 / b)) * b; group g (columns g * group_size ...) has scale scales[r, g] and zero
 * zeros[r, g]; group_block[g] is the block whose coefficients beta[block, :] weight it.
 *
 * Both functions work on a range of groups [g0, g1), so the caller can split a call over threads;
 * every output element is computed by one call in a fixed order, so results do not depend on the
 * split. Built by native.py with the system C compiler; no Python or torch headers are needed.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

/* Columns per tile: the float32 accumulator (8 KiB) stays in L1 while the K rows stream past. */
#define TILE_COLS 2048
/* Independent partial sums in a dot product: lanes the compiler maps onto SIMD registers. */
#define LANES 16
/* Bytes ahead of the current group that each row of codes is prefetched: a row's run in a tile is
 * at most half a 4 KiB page, too short for the hardware prefetcher, which stops at page edges, to
 * ramp up on its own (benchmarks/RESULTS.md: combine 25% and project 15% faster at 100M parameters). */
#define PREFETCH_BYTES 1024

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even, as torch does; NaN stays NaN. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Decode n codes (n a multiple of 8) starting at a byte boundary into floats. */
static void decode(const uint8_t *p, int64_t n, int bits, float *q) {
    switch (bits) {
    case 8:
        for (int64_t j = 0; j < n; ++j) q[j] = (float)p[j];
        break;
    case 4:
        for (int64_t m = 0; m < n / 2; ++m) {
            q[2 * m] = (float)(p[m] & 15u);
            q[2 * m + 1] = (float)(p[m] >> 4);
        }
        break;
    case 2:
        for (int64_t m = 0; m < n / 4; ++m)
            for (int i = 0; i < 4; ++i) q[4 * m + i] = (float)((p[m] >> (2 * i)) & 3u);
        break;
    default: /* 1 */
        for (int64_t m = 0; m < n / 8; ++m)
            for (int i = 0; i < 8; ++i) q[8 * m + i] = (float)((p[m] >> i) & 1u);
        break;
    }
}

/* acc[j] += w * code[j] for n codes at p. */
static void axpy_codes(float *restrict acc, const uint8_t *restrict p, int64_t n, int bits, float w,
                       float *restrict scratch) {
    if (bits == 8) {
        for (int64_t j = 0; j < n; ++j) acc[j] += w * (float)p[j];
        return;
    }
    decode(p, n, bits, scratch);
    for (int64_t j = 0; j < n; ++j) acc[j] += w * scratch[j];
}

/* Sum of the LANES partial sums, as a tree (halves added lane-wise: vector adds, not a scalar chain). */
static inline float reduce_lanes(float *lane) {
    for (int width = LANES / 2; width > 0; width /= 2)
        for (int l = 0; l < width; ++l) lane[l] += lane[l + width];
    return lane[0];
}

/* sum_j a[j] * b[j] over LANES independent partial sums added in a fixed order. */
static float dot(const float *restrict a, const float *restrict b, int64_t n) {
    float lane[LANES] = {0};
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int l = 0; l < LANES; ++l) lane[l] += a[j + l] * b[j + l];
    float s = 0.0f;
    for (; j < n; ++j) s += a[j] * b[j];
    return s + reduce_lanes(lane);
}

static float dot_codes(const uint8_t *restrict p, const float *restrict g, int64_t n, int bits,
                       float *restrict scratch) {
    if (bits == 8) {
        float lane[LANES] = {0};
        int64_t j = 0;
        for (; j + LANES <= n; j += LANES)
            for (int l = 0; l < LANES; ++l) lane[l] += (float)p[j + l] * g[j + l];
        float s = 0.0f;
        for (; j < n; ++j) s += (float)p[j] * g[j];
        return s + reduce_lanes(lane);
    }
    decode(p, n, bits, scratch);
    return dot(scratch, g, n);
}

static int64_t tile_groups(int64_t group_size) {
    int64_t t = TILE_COLS / group_size;
    return t > 0 ? t : 1;
}

/* out[j] = mean[j] + sum_r beta[block(g), r] * (zeros[r, g] + scales[r, g] * code[r, j]) for the
 * columns j of groups [g0, g1); out is float32 (out_bf16 = 0) or bfloat16 (rounded once, at the
 * store). Returns 0, or -1 when a temporary cannot be allocated. */
int twa_combine(const float *mean, const uint8_t *codes, int64_t code_stride, const float *scales,
                int64_t scale_stride, const float *zeros, int64_t zero_stride, const float *beta,
                const int32_t *group_block, int64_t rows, int64_t g0, int64_t g1, int64_t group_size,
                int bits, void *out, int out_bf16) {
    const int64_t tg = tile_groups(group_size), width = tg * group_size;
    float *acc = malloc(2 * (size_t)width * sizeof(float));
    if (!acc) return -1;
    float *scratch = acc + width;
    for (int64_t t0 = g0; t0 < g1; t0 += tg) {
        const int64_t t1 = t0 + tg < g1 ? t0 + tg : g1, c0 = t0 * group_size;
        /* The zeros' part is one offset per group: sum_r beta_r zero_r. */
        for (int64_t g = t0; g < t1; ++g) {
            const float *b = beta + (int64_t)group_block[g] * rows;
            float offset = 0.0f;
            for (int64_t r = 0; r < rows; ++r) offset += b[r] * zeros[r * zero_stride + g];
            float *a = acc + (g - t0) * group_size;
            const float *m = mean + g * group_size;
            for (int64_t j = 0; j < group_size; ++j) a[j] = m[j] + offset;
        }
        for (int64_t r = 0; r < rows; ++r) {
            const uint8_t *row = codes + r * code_stride + c0 * bits / 8;
            for (int64_t g = t0; g < t1; ++g) {
                const float w = beta[(int64_t)group_block[g] * rows + r] * scales[r * scale_stride + g];
                __builtin_prefetch(row + (g - t0) * group_size * bits / 8 + PREFETCH_BYTES);
                axpy_codes(acc + (g - t0) * group_size, row + (g - t0) * group_size * bits / 8, group_size,
                           bits, w, scratch);
            }
        }
        const int64_t n = (t1 - t0) * group_size;
        if (out_bf16) {
            uint16_t *o = (uint16_t *)out + c0;
            for (int64_t j = 0; j < n; ++j) o[j] = f32_to_bf16(acc[j]);
        } else {
            float *o = (float *)out + c0;
#ifdef __AVX__
            /* Streaming stores: the weights are not read again before the forward pass, and a
             * plain store would first read each line of out into cache (a third more traffic). */
            if (((uintptr_t)o & 31) == 0 && n % 8 == 0) {
                for (int64_t j = 0; j < n; j += 8) _mm256_stream_ps(o + j, _mm256_loadu_ps(acc + j));
            } else
#endif
            memcpy(o, acc, (size_t)n * sizeof(float));
        }
    }
#ifdef __AVX__
    _mm_sfence(); /* streaming stores are weakly ordered: make them visible before returning */
#endif
    free(acc);
    return 0;
}

/* partial[r, g] = sum_{j in group g} (zeros[r, g] + scales[r, g] * code[r, j]) * grad[j] for the
 * groups [g0, g1), computed as scale * (code . grad) + zero * sum(grad). grad is float32
 * (grad_bf16 = 0) or bfloat16. Returns 0, or -1 when a temporary cannot be allocated. */
int twa_project(const void *grad, int grad_bf16, const uint8_t *codes, int64_t code_stride,
                const float *scales, int64_t scale_stride, const float *zeros, int64_t zero_stride,
                int64_t rows, int64_t g0, int64_t g1, int64_t group_size, int bits, float *partial,
                int64_t partial_stride) {
    const int64_t tg = tile_groups(group_size), width = tg * group_size;
    float *buf = malloc(2 * (size_t)width * sizeof(float));
    float *sums = malloc((size_t)tg * sizeof(float));
    if (!buf || !sums) {
        free(buf);
        free(sums);
        return -1;
    }
    float *g32 = buf, *scratch = buf + width;
    for (int64_t t0 = g0; t0 < g1; t0 += tg) {
        const int64_t t1 = t0 + tg < g1 ? t0 + tg : g1, c0 = t0 * group_size, n = (t1 - t0) * group_size;
        const float *g;
        if (grad_bf16) {
            const uint16_t *h = (const uint16_t *)grad + c0;
            for (int64_t j = 0; j < n; ++j) g32[j] = bf16_to_f32(h[j]);
            g = g32;
        } else {
            g = (const float *)grad + c0;
        }
        for (int64_t k = 0; k < t1 - t0; ++k) {
            float lane[LANES] = {0};
            const float *x = g + k * group_size;
            int64_t j = 0;
            for (; j + LANES <= group_size; j += LANES)
                for (int l = 0; l < LANES; ++l) lane[l] += x[j + l];
            float s = 0.0f;
            for (; j < group_size; ++j) s += x[j];
            sums[k] = s + reduce_lanes(lane);
        }
        for (int64_t r = 0; r < rows; ++r) {
            const uint8_t *row = codes + r * code_stride + c0 * bits / 8;
            for (int64_t gi = t0; gi < t1; ++gi) {
                const int64_t k = gi - t0;
                __builtin_prefetch(row + k * group_size * bits / 8 + PREFETCH_BYTES);
                const float d = dot_codes(row + k * group_size * bits / 8, g + k * group_size, group_size, bits,
                                          scratch);
                partial[r * partial_stride + gi] = scales[r * scale_stride + gi] * d
                                                   + zeros[r * zero_stride + gi] * sums[k];
            }
        }
    }
    free(buf);
    free(sums);
    return 0;
}

/* ---- gram and orth_quantize: the subspace build, reading the K candidates' rows where they lie ----
 *
 * The candidates come as K row pointers (rows[k] is candidate k's first column of the call), each a
 * float32 (in_bf16 = 0) or bfloat16 row: the tensors as mapped from their files, never stacked. Both
 * loops compute in float32 with every product and sum rounded on its own, in a fixed order (the
 * functions marked NO_FMA are compiled without fused multiply-adds), so their results depend on the
 * data and the compiler's IEEE arithmetic only. */

#if defined(__clang__)
#define NO_FMA_FN
#define NO_FMA_BODY _Pragma("clang fp contract(off)")
#elif defined(__GNUC__)
#define NO_FMA_FN __attribute__((optimize("fp-contract=off"), noinline))
#define NO_FMA_BODY
#else
#define NO_FMA_FN
#define NO_FMA_BODY
#endif

/* Vectors of 8 and 16 floats (GCC/clang vector extensions; split into narrower registers where the CPU
 * has none this wide); the *u types may be unaligned. */
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf8u __attribute__((vector_size(32), aligned(4)));
typedef float vf16 __attribute__((vector_size(64)));
typedef float vf16u __attribute__((vector_size(64), aligned(4)));
typedef int32_t vi8 __attribute__((vector_size(32)));
typedef int32_t vi16 __attribute__((vector_size(64)));
typedef uint8_t vu8x16 __attribute__((vector_size(16), aligned(1)));

static inline void load_row(const void *row, int in_bf16, int64_t c, int64_t n, float *dst) {
    if (in_bf16) {
        const uint16_t *h = (const uint16_t *)row + c;
        for (int64_t j = 0; j < n; ++j) dst[j] = bf16_to_f32(h[j]);
    } else {
        memcpy(dst, (const float *)row + c, (size_t)n * sizeof(float));
    }
}

/* x_i - x_0 for n columns at column c: d[(i - 1) * ld + j]; also writes x_0 into x0. */
static void differences(const void *const *rows, int in_bf16, int64_t k, int64_t c, int64_t n, int64_t ld,
                        float *x0, float *d) {
    load_row(rows[0], in_bf16, c, n, x0);
    for (int64_t i = 1; i < k; ++i) {
        float *di = d + (i - 1) * ld;
        if (in_bf16) {
            const uint16_t *h = (const uint16_t *)rows[i] + c;
            for (int64_t j = 0; j < n; ++j) di[j] = bf16_to_f32(h[j]) - x0[j];
        } else {
            const float *x = (const float *)rows[i] + c;
            for (int64_t j = 0; j < n; ++j) di[j] = x[j] - x0[j];
        }
    }
}

/* Sum of 8 lanes as a fixed tree (halves added lane-wise). */
static inline float hsum8(vf8 v) {
    float a[8];
    memcpy(a, &v, sizeof a);
    for (int w = 4; w > 0; w /= 2)
        for (int l = 0; l < w; ++l) a[l] += a[l + w];
    return a[0];
}

/* The float32 products of pairs (a, b) with b in [b0, b0 + PB) of a run of n columns (row i of the run at
 * d + i * ld): lanes over 8 columns, two accumulators (even and odd vectors of 8), then the columns past the
 * last whole vector, then the lanes as a tree. One fixed order for a given n, whichever pairs are computed
 * together and wherever the run lies. */
#define RUN_PAIRS(NAME, PB)                                                                                 \
    NO_FMA_FN static void NAME(const float *d, int64_t ld, int64_t n, int64_t a, int64_t b0, float *out) { \
        NO_FMA_BODY                                                                                        \
        vf8 acc0[PB], acc1[PB];                                                                            \
        for (int q = 0; q < PB; ++q) acc0[q] = acc1[q] = (vf8){0};                                         \
        const float *da = d + a * ld;                                                                      \
        int64_t j = 0;                                                                                     \
        for (; j + 16 <= n; j += 16) {                                                                     \
            const vf8 x0 = *(const vf8u *)(da + j), x1 = *(const vf8u *)(da + j + 8);                      \
            for (int q = 0; q < PB; ++q) {                                                                 \
                const float *db = d + (b0 + q) * ld + j;                                                   \
                acc0[q] = acc0[q] + x0 * *(const vf8u *)db;                                                \
                acc1[q] = acc1[q] + x1 * *(const vf8u *)(db + 8);                                          \
            }                                                                                              \
        }                                                                                                  \
        if (j + 8 <= n) {                                                                                  \
            const vf8 x0 = *(const vf8u *)(da + j);                                                        \
            for (int q = 0; q < PB; ++q) acc0[q] = acc0[q] + x0 * *(const vf8u *)(d + (b0 + q) * ld + j);  \
            j += 8;                                                                                        \
        }                                                                                                  \
        for (int q = 0; q < PB; ++q) {                                                                     \
            float tail = 0.0f;                                                                             \
            for (int64_t t = j; t < n; ++t) tail = tail + da[t] * d[(b0 + q) * ld + t];                    \
            out[q] = hsum8(acc0[q] + acc1[q]) + tail;                                                      \
        }                                                                                                  \
    }
RUN_PAIRS(run_pairs4, 4)
RUN_PAIRS(run_pairs3, 3)
RUN_PAIRS(run_pairs2, 2)
RUN_PAIRS(run_pairs1, 1)

/* Columns of the K rows read in one sweep: the differences of a tile stay in L1 for the products. Tiles of
 * 512 and 2048 columns (in L2) measured 1.2-1.5x slower for gram and orth_quantize on the test machine. */
#define BUILD_TILE 128

/* Gram partials of the differences from the first candidate and the mean, for columns [c0, c1) of the
 * call (column c is element start + c of its parameter).
 *
 * A run ends before every element index that is a multiple of run or of period (period 0: none): the
 * float32 products of a run are summed by run_pairs (a fixed order for its length) and added to a float64
 * sum, so a run's partial is the same wherever the parameter was cut, as long as it was cut between
 * runs. Sums restart at every multiple of seg (a multiple of run): segment s (counted from the one that
 * holds column c0) adds into g0 + s * (k - 1)^2, the upper triangle of a (k - 1) x (k - 1) matrix, so a
 * caller that splits the columns between threads at segment ends gets the same sums in any split.
 * mean[c] = x_0 + (1 / k) * sum_i (x_i - x_0). Columns are read a tile of whole runs at a time, the
 * runs of a tile computed from L2. Returns 0, or -1 when a temporary cannot be allocated. */
NO_FMA_FN int twa_gram(const void *const *rows, int in_bf16, int64_t k, int64_t c0, int64_t c1, int64_t start,
                       int64_t period, int64_t run, int64_t seg, double *g0, float *mean) {
    NO_FMA_BODY
    const int64_t r = k - 1, tile = BUILD_TILE > run ? BUILD_TILE / run * run : run;
    float *buf = malloc((size_t)(k + 1) * (size_t)tile * sizeof(float));
    if (!buf) return -1;
    float *x0 = buf, *sum = buf + tile, *d = buf + 2 * tile, part[4];
    const float inv_k = (float)(1.0 / (double)k);
    const int64_t first_seg = (start + c0) / seg;
    for (int64_t t0 = c0; t0 < c1;) {
        /* A tile ends at a multiple of run (a break), so no run is cut by it. */
        const int64_t end = (start + t0 + tile) / run * run - start, tn = (end < c1 ? end : c1) - t0;
        differences(rows, in_bf16, k, t0, tn, tile, x0, d);
        for (int64_t j = 0; j < tn; ++j) sum[j] = 0.0f;
        for (int64_t i = 0; i < r; ++i)
            for (int64_t j = 0; j < tn; ++j) sum[j] = sum[j] + d[i * tile + j];
        /* torch's add(x0, sum, alpha=1/k) is one fused multiply-add where the CPU has one: the same bits. */
#ifdef __FMA__
        for (int64_t j = 0; j < tn; ++j) mean[t0 + j] = __builtin_fmaf(inv_k, sum[j], x0[j]);
#else
        for (int64_t j = 0; j < tn; ++j) mean[t0 + j] = x0[j] + inv_k * sum[j];
#endif
        for (int64_t c = t0; c < t0 + tn;) {
            const int64_t p = start + c;
            int64_t next = (p / run + 1) * run;
            if (period > 0 && (p / period + 1) * period < next) next = (p / period + 1) * period;
            const int64_t n = (next - start < t0 + tn ? next - start : t0 + tn) - c;
            const float *dr = d + (c - t0);
            double *g = g0 + (p / seg - first_seg) * r * r;
            for (int64_t a = 0; a < r; ++a) {
                int64_t b = a;
                for (; b + 4 <= r; b += 4) {
                    run_pairs4(dr, tile, n, a, b, part);
                    for (int q = 0; q < 4; ++q) g[a * r + b + q] += (double)part[q];
                }
                if (b < r) {
                    const int left = (int)(r - b);
                    (left == 3 ? run_pairs3 : left == 2 ? run_pairs2 : run_pairs1)(dr, tile, n, a, b, part);
                    for (int q = 0; q < left; ++q) g[a * r + b + q] += (double)part[q];
                }
            }
            c += n;
        }
        t0 += tn;
    }
    free(buf);
    return 0;
}

/* Rows [r0, r0 + RB) of a group's basis: p[r * n + j] = sum_i t[r * k + i] * c[i * ld + j], i ascending, each
 * product and each sum rounded to float32 (the torch reference's order: the same bits on every backend and
 * CPU); RB accumulators per vector of columns stay in registers while the K centred rows stream from L1.
 * Also the minimum and maximum of each row (lo, hi; exact in any order) and whether it holds a NaN. */
/* Row q's running minimum, maximum and NaN flag, given its next vector v (first: v starts them). */
#define BASIS_TRACK(VT, VI, v, first)                                                                      \
    do {                                                                                                   \
        const VT v_ = (v);                                                                                 \
        if (first) {                                                                                       \
            vlo[q] = vhi[q] = v_;                                                                          \
        } else {                                                                                           \
            const VI lt = (VI)(v_ < vlo[q]), gt = (VI)(v_ > vhi[q]);                                       \
            vlo[q] = (VT)(((VI)v_ & lt) | ((VI)vlo[q] & ~lt));                                             \
            vhi[q] = (VT)(((VI)v_ & gt) | ((VI)vhi[q] & ~gt));                                             \
        }                                                                                                  \
        vnan[q] |= (VI)(v_ != v_);                                                                         \
    } while (0)

#define BASIS_ROWS(NAME, VT, VTU, VI, W, RB)                                                               \
    NO_FMA_FN static void NAME(const float *t, const float *c, int64_t ld, int64_t k, int64_t n, int64_t r0, \
                               float *p, float *lo, float *hi, int *nan) {                                \
        NO_FMA_BODY                                                                                        \
        VT vlo[RB], vhi[RB];                                                                               \
        VI vnan[RB];                                                                                       \
        for (int q = 0; q < RB; ++q) {                                                                     \
            vlo[q] = vhi[q] = (VT){0} + __builtin_nanf(""); /* replaced by the first vector */              \
            vnan[q] = (VI){0};                                                                             \
        }                                                                                                  \
        /* Two vectors of columns at a time where n allows (2 RB independent chains of additions), else one; the  \
         * same operations on every value either way. */                                                    \
        int64_t j = 0;                                                                                     \
        if (n % (2 * W) == 0) {                                                                            \
            for (; j < n; j += 2 * W) {                                                                    \
                VT acc0[RB], acc1[RB];                                                                     \
                const VT a0 = *(const VTU *)(c + j), b0 = *(const VTU *)(c + j + W);                       \
                for (int q = 0; q < RB; ++q) {                                                             \
                    acc0[q] = t[(r0 + q) * k] * a0;                                                        \
                    acc1[q] = t[(r0 + q) * k] * b0;                                                        \
                }                                                                                          \
                for (int64_t i = 1; i < k; ++i) {                                                          \
                    const VT ai = *(const VTU *)(c + i * ld + j), bi = *(const VTU *)(c + i * ld + j + W); \
                    for (int q = 0; q < RB; ++q) {                                                         \
                        const float ti = t[(r0 + q) * k + i];                                              \
                        acc0[q] = acc0[q] + ti * ai;                                                       \
                        acc1[q] = acc1[q] + ti * bi;                                                       \
                    }                                                                                      \
                }                                                                                          \
                for (int q = 0; q < RB; ++q) {                                                             \
                    *(VTU *)(p + (r0 + q) * n + j) = acc0[q];                                              \
                    *(VTU *)(p + (r0 + q) * n + j + W) = acc1[q];                                          \
                    BASIS_TRACK(VT, VI, acc0[q], j == 0);                                                  \
                    BASIS_TRACK(VT, VI, acc1[q], 0);                                                       \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
        for (; j < n; j += W) {                                                                            \
            VT acc0[RB];                                                                                   \
            const VT a0 = *(const VTU *)(c + j);                                                           \
            for (int q = 0; q < RB; ++q) acc0[q] = t[(r0 + q) * k] * a0;                                   \
            for (int64_t i = 1; i < k; ++i) {                                                              \
                const VT ai = *(const VTU *)(c + i * ld + j);                                              \
                for (int q = 0; q < RB; ++q) acc0[q] = acc0[q] + t[(r0 + q) * k + i] * ai;                 \
            }                                                                                              \
            for (int q = 0; q < RB; ++q) {                                                                 \
                *(VTU *)(p + (r0 + q) * n + j) = acc0[q];                                                  \
                BASIS_TRACK(VT, VI, acc0[q], j == 0);                                                      \
            }                                                                                              \
        }                                                                                                  \
        for (int q = 0; q < RB; ++q) {                                                                     \
            float l = vlo[q][0], h = vhi[q][0];                                                            \
            int any = vnan[q][0];                                                                          \
            for (int m = 1; m < W; ++m) {                                                                  \
                l = vlo[q][m] < l ? vlo[q][m] : l;                                                         \
                h = vhi[q][m] > h ? vhi[q][m] : h;                                                         \
                any |= vnan[q][m];                                                                         \
            }                                                                                              \
            lo[r0 + q] = l;                                                                                \
            hi[r0 + q] = h;                                                                                \
            nan[r0 + q] = any;                                                                             \
        }                                                                                                  \
    }
BASIS_ROWS(basis_rows16x4, vf16, vf16u, vi16, 16, 4)
BASIS_ROWS(basis_rows16x3, vf16, vf16u, vi16, 16, 3)
BASIS_ROWS(basis_rows16x2, vf16, vf16u, vi16, 16, 2)
BASIS_ROWS(basis_rows16x1, vf16, vf16u, vi16, 16, 1)
BASIS_ROWS(basis_rows8x4, vf8, vf8u, vi8, 8, 4)
BASIS_ROWS(basis_rows8x1, vf8, vf8u, vi8, 8, 1)

/* q = clamp((p - lo) * inv + 0.5, 0, levels) for n values, truncated to codes (the float -> uint8
 * conversion truncates; every value is >= 0 by then), in layout.py's expressions and order, each rounded
 * to float32 as torch rounds them (no fused multiply-add: (p - lo) * inv + 0.5 rounds twice). 8-bit codes
 * are stored as they come, narrower ones packed. */
NO_FMA_FN static void quantize_row(const float *p, int64_t n, int bits, float lo, float inv, uint8_t *code,
                                   float *q) {
    NO_FMA_BODY
    const float levels = (float)((1 << bits) - 1);
    int64_t j = 0;
    if (bits == 8) {
        const vf16 vlo = (vf16){0} + lo, vinv = (vf16){0} + inv, half = (vf16){0} + 0.5f, top = (vf16){0} + levels;
        for (; j + 16 <= n; j += 16) {
            vf16 v = (*(const vf16u *)(p + j) - vlo) * vinv;
            v = v + half;
            const vi16 neg = (vi16)(v < (vf16){0}), over = (vi16)(v > top);
            v = (vf16)((vi16)v & ~neg);
            v = (vf16)(((vi16)top & over) | ((vi16)v & ~over));
            *(vu8x16 *)(code + j) = __builtin_convertvector(__builtin_convertvector(v, vi16), vu8x16);
        }
    }
    for (int64_t m = j; m < n; ++m) {
        float v = (p[m] - lo) * inv;
        v = v + 0.5f;
        v = v < 0.0f ? 0.0f : v;
        q[m] = v > levels ? levels : v;
    }
    if (bits == 8) {
        for (int64_t m = j; m < n; ++m) code[m] = (uint8_t)q[m];
    } else {
        const int per = 8 / bits;
        for (int64_t m = 0; m < n / per; ++m) {
            uint8_t byte = 0;
            for (int i = 0; i < per; ++i) byte |= (uint8_t)((uint8_t)q[m * per + i] << (i * bits));
            code[m] = byte;
        }
    }
}

/* Basis rows of groups [g0, g1) of the call's columns: p_r = sum_k transform[r, k] * (x_k - mean) by
 * BASIS_ROWS, then each row's group quantized as the torch reference does it: scale = (hi - lo) / levels,
 * inv = 1 / scale (0 when scale is 0). Codes of row r start at codes + r * code_stride (the call's first
 * column); scales and zeros at [r * stride + g]. Every group is computed by one call on its own, so results
 * do not depend on the split. Returns 0, or -1 when a temporary cannot be allocated. */
NO_FMA_FN int twa_orth_quantize(const void *const *rows, int in_bf16, int64_t k, const float *mean,
                                const float *transform, int64_t nrows, int64_t g0, int64_t g1, int64_t group_size,
                                int bits, uint8_t *codes, int64_t code_stride, float *scales, int64_t scale_stride,
                                float *zeros, int64_t zero_stride) {
    NO_FMA_BODY
    const int64_t gs = group_size, tg = BUILD_TILE / gs > 0 ? BUILD_TILE / gs : 1, ld = tg * gs;
    const int wide = gs % 16 == 0;
    float *buf = malloc(((size_t)k * (size_t)ld + (size_t)(nrows + 1) * (size_t)gs + 2 * (size_t)nrows) * sizeof(float));
    int *nan = malloc((size_t)nrows * sizeof(int));
    if (!buf || !nan) {
        free(buf);
        free(nan);
        return -1;
    }
    float *cen = buf, *p = buf + k * ld, *q = p + nrows * gs, *lo = q + gs, *hi = lo + nrows;
    const float levels = (float)((1 << bits) - 1);
    for (int64_t t0 = g0; t0 < g1; t0 += tg) {
        /* The K rows of a tile of groups, centred, in one sweep (long sequential reads), then group by group. */
        const int64_t t1 = t0 + tg < g1 ? t0 + tg : g1, c0 = t0 * gs, n = (t1 - t0) * gs;
        const float *m = mean + c0;
        for (int64_t i = 0; i < k; ++i) {
            float *ci = cen + i * ld;
            if (in_bf16) {
                const uint16_t *h = (const uint16_t *)rows[i] + c0;
                for (int64_t j = 0; j < n; ++j) ci[j] = bf16_to_f32(h[j]) - m[j];
            } else {
                const float *x = (const float *)rows[i] + c0;
                for (int64_t j = 0; j < n; ++j) ci[j] = x[j] - m[j];
            }
        }
        for (int64_t g = t0; g < t1; ++g) {
            const int64_t c = g * gs;
            const float *cg = cen + (g - t0) * gs;
            int64_t r = 0;
            for (; r + 4 <= nrows; r += 4)
                (wide ? basis_rows16x4 : basis_rows8x4)(transform, cg, ld, k, gs, r, p, lo, hi, nan);
            if (wide && nrows - r == 3) basis_rows16x3(transform, cg, ld, k, gs, r, p, lo, hi, nan), r += 3;
            if (wide && nrows - r == 2) basis_rows16x2(transform, cg, ld, k, gs, r, p, lo, hi, nan), r += 2;
            for (; r < nrows; ++r) (wide ? basis_rows16x1 : basis_rows8x1)(transform, cg, ld, k, gs, r, p, lo, hi, nan);
            for (r = 0; r < nrows; ++r) {
                if (nan[r]) lo[r] = hi[r] = __builtin_nanf(""); /* torch's amin/amax propagate NaN */
                const float scale = (hi[r] - lo[r]) / levels;
                const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
                quantize_row(p + r * gs, gs, bits, lo[r], inv, codes + r * code_stride + c * bits / 8, q);
                scales[r * scale_stride + g] = scale;
                zeros[r * zero_stride + g] = lo[r];
            }
        }
    }
    free(buf);
    free(nan);
    return 0;
}
