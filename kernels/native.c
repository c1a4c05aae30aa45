/* Fused CPU loops for combine and project on a packed basis (8, 4, 2 or 1-bit codes).
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
