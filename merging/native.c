/* Fused CPU loops for mergeline (see native.py). Each function mirrors, operation by operation,
 * the torch code it replaces, so both give bit-identical results:
 *   - float32 roundings happen at the same steps, in the same order;
 *   - torch's `add_(other, alpha=w)` is a fused multiply-add (`fmaf`), everything else is not:
 *     the file is compiled with -ffp-contract=off so the compiler does not fuse on its own;
 *   - sign(x) is (x > 0) - (x < 0), as torch's, and masks multiply as 0.0 / 1.0 floats.
 * Inputs and outputs flagged `bf16` are bfloat16, else float32: the loops widen blocks of them
 * into buffers that stay in L1 (exactly, as torch widens) and round results as torch narrows, so
 * merging the stored bfloat16 directly gives the bits of widening first.
 * No allocation, no threads: the engine runs one call per chunk on each of its workers. */

#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 256 /* elements per inner block: the per-element state stays in L1 */

static inline float sign_of(float x) { return (float)((x > 0.0f) - (x < 0.0f)); }

/* torch's hardshrink: zero where -bound <= x <= bound (bound -inf keeps everything). */
static inline float shrink(float x, float bound) { return ((x >= -bound) & (x <= bound)) ? 0.0f : x; }

/* bfloat16 <-> float32 as torch converts them: widening is exact (the bits shifted up), and
 * narrowing rounds to nearest, ties to even (NaN never gets here: the engine refuses it). */
static inline float widen(uint16_t h) {
    union { uint32_t u; float f; } v = { (uint32_t)h << 16 };
    return v.f;
}
static inline uint16_t narrow(float x) {
    union { float f; uint32_t u; } v = { x };
    return (uint16_t)((v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16);
}

/* Elements [start, start + size) of `src` as float32: in place for float32, widened into `buffer` for bfloat16. */
static inline const float *load(const void *src, int32_t bf16, int64_t start, int64_t size, float *buffer) {
    if (!bf16) return (const float *)src + start;
    const uint16_t *h = (const uint16_t *)src + start;
    for (int64_t i = 0; i < size; i++) buffer[i] = widen(h[i]);
    return buffer;
}

static inline void store(void *dst, int32_t bf16, int64_t start, int64_t size, const float *values) {
    if (!bf16) {
        memcpy((float *)dst + start, values, (size_t)size * sizeof(float));
        return;
    }
    uint16_t *h = (uint16_t *)dst + start;
    for (int64_t i = 0; i < size; i++) h[i] = narrow(values[i]);
}

/* selection.bernoulli's draws for flat positions [position, position + n): keep[i] = 1 where the
 * hash of selection._block_hash (int32 arithmetic wrapping as torch's, arithmetic shifts) is below
 * `threshold`, else 0. seeds[k] is the stream seed of RNG block first_block + k. */
static void draw(int64_t position, int64_t n, int64_t block_size, const int64_t *seeds, int64_t first_block,
                 int32_t threshold, uint8_t *keep) {
    const uint32_t mix1 = 0x85EBCA6Bu, mix2 = 0xC2B2AE35u;
    for (int64_t done = 0; done < n;) {
        const int64_t at = position + done;
        const int64_t block = at / block_size;
        const int64_t local = at - block * block_size;
        int64_t size = block_size - local;
        if (size > n - done) size = n - done;
        const uint64_t seed = (uint64_t)seeds[block - first_block];
        const uint32_t multiplier = (uint32_t)seed | 1u, offset = (uint32_t)(seed >> 32);
        const uint32_t first = (uint32_t)local;
        uint8_t *out = keep + done;
        for (int32_t i = 0; i < (int32_t)size; i++) {
            int32_t z = (int32_t)((first + (uint32_t)i) * multiplier + offset);
            z ^= z >> 16;
            z = (int32_t)((uint32_t)z * mix1);
            z ^= z >> 13;
            z = (int32_t)((uint32_t)z * mix2);
            z ^= z >> 16;
            out[i] = z < threshold;
        }
        done += size;
    }
}

/* Keep masks packed 8 to a byte (bit k of byte i is position 8i + k), kept between DARE's
 * passes: unpacking costs a fraction of drawing again. Multiplying by these constants moves
 * eight 0/1 bytes into one byte's bits and back without carries (each product bit has one source). */
static void pack(const uint8_t *keep, int64_t n, uint8_t *bits) {  /* n: a multiple of 8 */
    for (int64_t i = 0; i < n; i += 8) {
        uint64_t eight;
        memcpy(&eight, keep + i, 8);
        bits[i >> 3] = (uint8_t)((eight * 0x0102040810204080ull) >> 56);
    }
}

static void unpack(const uint8_t *bits, int64_t n, uint8_t *keep) {  /* keep: room for n rounded up to 8 */
    for (int64_t i = 0; i < n; i += 8) {
        const uint64_t spread = (bits[i >> 3] * 0x0101010101010101ull) & 0x8040201008040201ull;
        const uint64_t eight = ((spread + 0x7F7F7F7F7F7F7F7Full) >> 7) & 0x0101010101010101ull;
        memcpy(keep + i, &eight, 8);
    }
}

/* methods.task_arithmetic_family's kernel followed by methods.combine_deltas, for the chunk at
 * flat position `position`. Per model j: delta = (model - base) [* DARE's keep mask: packed in
 * bits[j], else drawn with seeds[j] and thresholds[j], else none] -> hardshrink(bounds[j]) -> * factors[j] -> weighted
 * combination (TIES sign election when `consensus`), normalized, scaled, plus the base.
 * Each inner loop is branch-free so that it vectorizes; the branches pick loops per block. */
void ml_task_merge(const void *base_in, const void *const *models_in, int32_t in_bf16,
                   const uint8_t *const *bits, const int64_t *const *seeds, const int32_t *thresholds,
                   int64_t position, int64_t block_size,
                   const float *bounds, const float *factors, const float *weights, int32_t count,
                   int64_t n, int32_t consensus, int32_t normalize, float divisor, float scale,
                   void *out, int32_t out_bf16) {
    float delta[BLOCK], total[BLOCK], magnitude[BLOCK], signed_weight[BLOCK], support[BLOCK];
    float base_block[BLOCK], model_block[BLOCK], keep[BLOCK];
    uint8_t kept[BLOCK];
    const int64_t first_block = position / block_size;
    for (int64_t start = 0; start < n; start += BLOCK) {
        const int64_t size = n - start < BLOCK ? n - start : BLOCK;
        const float *b = load(base_in, in_bf16, start, size, base_block);
        for (int64_t i = 0; i < size; i++) total[i] = magnitude[i] = signed_weight[i] = support[i] = 0.0f;
        for (int32_t j = 0; j < count; j++) {
            const float *m = load(models_in[j], in_bf16, start, size, model_block);
            const float bound = bounds[j], factor = factors[j], w = weights[j];
            if (bits[j] || seeds[j]) {
                if (bits[j]) {
                    unpack(bits[j] + start / 8, size, kept);  /* blocks start at multiples of 8 */
                } else {
                    draw(position + start, size, block_size, seeds[j], first_block, thresholds[j], kept);
                }
                for (int64_t i = 0; i < size; i++) keep[i] = (float)kept[i];
                for (int64_t i = 0; i < size; i++) delta[i] = shrink((m[i] - b[i]) * keep[i], bound) * factor;
            } else {
                for (int64_t i = 0; i < size; i++) delta[i] = shrink(m[i] - b[i], bound) * factor;
            }
            if (!consensus) {  /* _weighted_sum: w0 * d0, then += w * d as torch's fused add */
                if (j == 0) {
                    for (int64_t i = 0; i < size; i++) total[i] = delta[i] * w;
                } else {
                    for (int64_t i = 0; i < size; i++) total[i] = fmaf(delta[i], w, total[i]);
                }
            } else if (normalize) {
                for (int64_t i = 0; i < size; i++) {
                    const float x = delta[i] * w, s = sign_of(x);
                    total[i] = total[i] + x;
                    magnitude[i] = magnitude[i] + x * s;
                    signed_weight[i] = fmaf(s, w, signed_weight[i]);
                    support[i] = support[i] + (w * s) * s;
                }
            } else {
                for (int64_t i = 0; i < size; i++) {
                    const float x = delta[i] * w;
                    total[i] = total[i] + x;
                    magnitude[i] = magnitude[i] + x * sign_of(x);
                }
            }
        }
        if (consensus) {
            for (int64_t i = 0; i < size; i++) {
                const float elected = sign_of(sign_of(total[i]) + 0.5f); /* a zero sum elects + */
                total[i] = (total[i] + elected * magnitude[i]) * 0.5f;
                if (normalize) {
                    const float d = (support[i] + elected * signed_weight[i]) * 0.5f;
                    total[i] = total[i] / (d + (1.0f - fabsf(sign_of(d))));
                }
            }
        } else if (normalize) {
            for (int64_t i = 0; i < size; i++) total[i] = total[i] / divisor;
        }
        if (scale != 1.0f) {
            for (int64_t i = 0; i < size; i++) total[i] = total[i] * scale;
        }
        for (int64_t i = 0; i < size; i++) total[i] = total[i] + b[i];
        store(out, out_bf16, start, size, total);
    }
}

/* selection.TopK._scan_bracket for one chunk of non-negative values v (v = |values - base| when
 * `base` is given): how many exceed `high`, and how many lie in [low, high]; the first `capacity`
 * of those are copied to `inside` in stream order. */
void ml_bracket_scan(const void *values_in, const void *base_in, int32_t in_bf16, int64_t n, float low, float high,
                     float *inside, int64_t capacity, int64_t *counts) {
    enum { GROUP = 16 };  /* few values fall inside: test a group at once, collect rarely */
    int64_t above = 0, found = 0;
    float value_block[BLOCK], base_block[BLOCK], v[BLOCK];
    for (int64_t start = 0; start < n; start += BLOCK) {
        const int64_t size = n - start < BLOCK ? n - start : BLOCK;
        const float *x = load(values_in, in_bf16, start, size, value_block);
        if (base_in) {
            const float *b = load(base_in, in_bf16, start, size, base_block);
            for (int64_t i = 0; i < size; i++) v[i] = fabsf(x[i] - b[i]);
        } else {
            memcpy(v, x, (size_t)size * sizeof(float));
        }
        for (int64_t g = 0; g < size; g += GROUP) {
            const float *u = v + g;
            const int64_t group = size - g < GROUP ? size - g : GROUP;
            int32_t group_above = 0, group_inside = 0;
            for (int64_t i = 0; i < group; i++) {
                group_above += u[i] > high;
                group_inside += (u[i] >= low) & (u[i] <= high);
            }
            above += group_above;
            if (group_inside && found < capacity) {
                for (int64_t i = 0; i < group; i++) {
                    if ((u[i] >= low) & (u[i] <= high)) {
                        if (found < capacity) inside[found] = u[i];
                        found++;
                    }
                }
            } else {
                found += group_inside;
            }
        }
    }
    counts[0] = above;
    counts[1] = found;
}

/* selection.bernoulli: keep[p] = hash(p) < threshold for flat positions [start, start + n);
 * seeds[k] is the stream seed of block start / block_size + k. */
void ml_bernoulli(int64_t start, int64_t n, int64_t block_size, const int64_t *seeds, int32_t threshold,
                  uint8_t *keep) {
    draw(start, n, block_size, seeds, start / block_size, threshold, keep);
}

/* DARE's L1 sums for a chunk of `rows` rows of `cols` starting at flat position `position`, per
 * row: of |values - base|, and of |values - base| * keep with the mask selection.bernoulli draws
 * for (seeds, threshold). Each row sums in float64 as methods.row_sums defines it: LANES running
 * sums, lane k taking columns k, k + LANES, ... in order, then the lanes added in order.
 * With `bits` (rows of a multiple of 8 columns), the mask is also packed there for the merge pass. */
#define LANES 16
void ml_l1_sums(const void *values_in, const void *base_in, int32_t in_bf16, int64_t rows, int64_t cols,
                int64_t position, int64_t block_size, const int64_t *seeds, int32_t threshold,
                double *totals, double *kepts, uint8_t *bits) {
    float value_block[BLOCK], base_block[BLOCK], magnitude[BLOCK], kept[BLOCK];
    uint8_t keep[BLOCK];
    const int64_t first_block = position / block_size;
    for (int64_t r = 0; r < rows; r++) {
        double total[LANES] = {0.0}, kept_total[LANES] = {0.0};
        for (int64_t column = 0; column < cols; column += BLOCK) {  /* BLOCK is a multiple of LANES */
            const int64_t size = cols - column < BLOCK ? cols - column : BLOCK, start = r * cols + column;
            const float *x = load(values_in, in_bf16, start, size, value_block);
            const float *b = load(base_in, in_bf16, start, size, base_block);
            draw(position + start, size, block_size, seeds, first_block, threshold, keep);
            if (bits) pack(keep, size, bits + start / 8);
            for (int64_t i = 0; i < size; i++) {
                magnitude[i] = fabsf(x[i] - b[i]);
                kept[i] = magnitude[i] * (float)keep[i];
            }
            const int64_t whole = size / LANES * LANES;
            for (int64_t g = 0; g < whole; g += LANES) {
                for (int k = 0; k < LANES; k++) {
                    total[k] += (double)magnitude[g + k];
                    kept_total[k] += (double)kept[g + k];
                }
            }
            for (int64_t k = 0; k < size - whole; k++) {
                total[k] += (double)magnitude[whole + k];
                kept_total[k] += (double)kept[whole + k];
            }
        }
        double row_total = 0.0, row_kept = 0.0;
        for (int k = 0; k < LANES; k++) {
            row_total += total[k];
            row_kept += kept_total[k];
        }
        totals[r] = row_total;
        kepts[r] = row_kept;
    }
}

/* methods.linear over bfloat16 chunks, rounded to bfloat16: w0 * m0, then += w * m as torch's
 * fused add, then / divisor when `normalize`; the float32 steps of the torch code, in its order. */
void ml_linear_bf16(const uint16_t *const *models, const float *weights, int32_t count, int64_t n,
                    int32_t normalize, float divisor, uint16_t *out) {
    float total[BLOCK];
    for (int64_t start = 0; start < n; start += BLOCK) {
        const int64_t size = n - start < BLOCK ? n - start : BLOCK;
        const uint16_t *first = models[0] + start;
        for (int64_t i = 0; i < size; i++) total[i] = widen(first[i]) * weights[0];
        for (int32_t j = 1; j < count; j++) {
            const uint16_t *m = models[j] + start;
            const float w = weights[j];
            for (int64_t i = 0; i < size; i++) total[i] = fmaf(widen(m[i]), w, total[i]);
        }
        if (normalize) {
            for (int64_t i = 0; i < size; i++) total[i] = total[i] / divisor;
        }
        uint16_t *o = out + start;
        for (int64_t i = 0; i < size; i++) o[i] = narrow(total[i]);
    }
}

/* The SLERP kernel over bfloat16 chunks, rounded to bfloat16: x * a, then += y * b as torch's
 * fused add (prepare_slerp's `torch.mul(base, a).add_(model, alpha=b)`). */
void ml_axpby_bf16(const uint16_t *x, const uint16_t *y, float a, float b, int64_t n, uint16_t *out) {
    for (int64_t i = 0; i < n; i++) out[i] = narrow(fmaf(widen(y[i]), b, widen(x[i]) * a));
}
