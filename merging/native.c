/* Fused CPU loops for mergeline (see native.py). Each function mirrors, operation by operation,
 * the torch code it replaces, so both give bit-identical results:
 *   - float32 roundings happen at the same steps, in the same order;
 *   - torch's `add_(other, alpha=w)` is a fused multiply-add (`fmaf`), everything else is not:
 *     the file is compiled with -ffp-contract=off so the compiler does not fuse on its own;
 *   - sign(x) is (x > 0) - (x < 0), as torch's, and masks multiply as 0.0 / 1.0 floats.
 * No allocation, no threads: the engine runs one call per chunk on each of its workers. */

#include <math.h>
#include <stdint.h>

#define BLOCK 256 /* elements per inner block: the per-element state stays in L1 */

static inline float sign_of(float x) { return (float)((x > 0.0f) - (x < 0.0f)); }

/* torch's hardshrink: zero where -bound <= x <= bound (bound -inf keeps everything). */
static inline float shrink(float x, float bound) { return ((x >= -bound) & (x <= bound)) ? 0.0f : x; }

/* methods.task_arithmetic_family's kernel followed by methods.combine_deltas, for one chunk.
 * Per model j: delta = (model - base) [* mask] -> hardshrink(bound) -> * factor -> weighted
 * combination (TIES sign election when `consensus`), normalized, scaled, plus the base.
 * Each inner loop is branch-free so that it vectorizes; the branches pick loops per block. */
void ml_task_merge(const float *base, const float *const *models, const uint8_t *const *masks,
                   const float *bounds, const float *factors, const float *weights, int32_t count,
                   int64_t n, int32_t consensus, int32_t normalize, float divisor, float scale,
                   float *out) {
    float delta[BLOCK], total[BLOCK], magnitude[BLOCK], signed_weight[BLOCK], support[BLOCK];
    for (int64_t start = 0; start < n; start += BLOCK) {
        const int64_t size = n - start < BLOCK ? n - start : BLOCK;
        const float *b = base + start;
        for (int64_t i = 0; i < size; i++) total[i] = magnitude[i] = signed_weight[i] = support[i] = 0.0f;
        for (int32_t j = 0; j < count; j++) {
            const float *m = models[j] + start;
            const float bound = bounds[j], factor = factors[j], w = weights[j];
            if (masks[j]) {
                const uint8_t *keep = masks[j] + start;
                for (int64_t i = 0; i < size; i++) delta[i] = shrink((m[i] - b[i]) * (float)keep[i], bound) * factor;
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
        float *o = out + start;
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
        for (int64_t i = 0; i < size; i++) o[i] = total[i] + b[i];
    }
}

/* selection.TopK._scan_bracket for one chunk of non-negative values v (v = |values - base| when
 * `base` is given): how many exceed `high`, and how many lie in [low, high]; the first `capacity`
 * of those are copied to `inside` in stream order. */
void ml_bracket_scan(const float *values, const float *base, int64_t n, float low, float high,
                     float *inside, int64_t capacity, int64_t *counts) {
    enum { GROUP = 16 };  /* few values fall inside: test a group at once, collect rarely */
    int64_t above = 0, found = 0;
    float v[GROUP];
    for (int64_t start = 0; start < n; start += GROUP) {
        const int64_t size = n - start < GROUP ? n - start : GROUP;
        if (base) {
            for (int64_t i = 0; i < size; i++) v[i] = fabsf(values[start + i] - base[start + i]);
        } else {
            for (int64_t i = 0; i < size; i++) v[i] = values[start + i];
        }
        int32_t group_above = 0, group_inside = 0;
        for (int64_t i = 0; i < size; i++) {
            group_above += v[i] > high;
            group_inside += (v[i] >= low) & (v[i] <= high);
        }
        above += group_above;
        if (group_inside && found < capacity) {
            for (int64_t i = 0; i < size; i++) {
                if ((v[i] >= low) & (v[i] <= high)) {
                    if (found < capacity) inside[found] = v[i];
                    found++;
                }
            }
        } else {
            found += group_inside;
        }
    }
    counts[0] = above;
    counts[1] = found;
}

/* selection.bernoulli: keep[p] = hash(p) < threshold for flat positions [start, start + n), with
 * the hash of selection._block_hash (int32 arithmetic wrapping as torch's, arithmetic shifts).
 * seeds[k] is the stream seed of block start / block_size + k. */
void ml_bernoulli(int64_t start, int64_t n, int64_t block_size, const int64_t *seeds,
                  int32_t threshold, uint8_t *keep) {
    const uint32_t mix1 = 0x85EBCA6Bu, mix2 = 0xC2B2AE35u;
    const int64_t first_block = start / block_size;
    for (int64_t done = 0; done < n;) {
        const int64_t position = start + done;
        const int64_t block = position / block_size;
        const int64_t local = position - block * block_size;
        int64_t size = block_size - local;
        if (size > n - done) size = n - done;
        const uint64_t seed = (uint64_t)seeds[block - first_block];
        const uint32_t multiplier = (uint32_t)seed | 1u, offset = (uint32_t)(seed >> 32);
        uint8_t *out = keep + done;
        const uint32_t first = (uint32_t)local;
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

/* The L1 sums of DARE's rescale, before summing: magnitude = |values - base| and
 * kept = magnitude * keep (0.0 / 1.0), as methods.task_arithmetic_family's l1_sums computes them. */
void ml_masked_magnitudes(const float *values, const float *base, const uint8_t *keep, int64_t n,
                          float *magnitude, float *kept) {
    for (int64_t i = 0; i < n; i++) {
        const float m = fabsf(values[i] - base[i]);
        magnitude[i] = m;
        kept[i] = m * (float)keep[i];
    }
}

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
