/* Fused CPU loops for mergeline (see native.py). Each function mirrors, operation by operation,
 * the torch code it replaces, so both give bit-identical results:
 *   - float32 roundings happen at the same steps, in the same order;
 *   - torch's `add_(other, alpha=w)` is a fused multiply-add (`fmaf`), everything else is not:
 *     the file is compiled with -ffp-contract=off so the compiler does not fuse on its own;
 *   - sign(x) is (x > 0) - (x < 0), as torch's; where torch multiplies by a sign or a 0/1 mask
 *     and the product is exact, a loop may pick or mask bits instead (same values).
 * Inputs and outputs flagged `bf16` are bfloat16, else float32: the loops widen them exactly, as
 * torch widens, and round results as torch narrows, so merging the stored bfloat16 directly
 * gives the bits of widening first.
 * No heap allocation, no threads: the engine runs one call per chunk on each of its workers. */

#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 256 /* elements per inner block: the per-element state stays in L1 */
#define MIX1 0x85EBCA6Bu /* MurmurHash3's finalizer */
#define MIX2 0xC2B2AE35u

/* bfloat16 to float32 as torch widens: exactly, the bits shifted up. */
static inline float widen(uint16_t h) {
    union { uint32_t u; float f; } v = { (uint32_t)h << 16 };
    return v.f;
}

/* Elements [start, start + size) of `src` as float32: in place for float32, widened into `buffer` for bfloat16. */
static inline const float *load(const void *src, int32_t bf16, int64_t start, int64_t size, float *buffer) {
    if (!bf16) return (const float *)src + start;
    const uint16_t *h = (const uint16_t *)src + start;
    for (int64_t i = 0; i < size; i++) buffer[i] = widen(h[i]);
    return buffer;
}


/* ---- Eight lanes at a time -------------------------------------------------------------------
 * The merge loops below keep their per-element state in registers, eight float32 lanes at a time,
 * with GCC/Clang vector extensions (AVX2 registers on x86-64, pairs of NEON registers on ARM). A
 * chunk's last, partial group is loaded zero-padded and stored in part: one code path. */
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef double f64x4 __attribute__((vector_size(32)));

static inline f32x8 splat(float x) { return (f32x8){x, x, x, x, x, x, x, x}; }
static inline i32x8 splat_int(int32_t x) { return (i32x8){x, x, x, x, x, x, x, x}; }

/* Elements [at, at + 8) of `src`, widened as torch widens. */
static inline f32x8 load8(const void *src, int32_t bf16, int64_t at) {
    f32x8 x;
    if (bf16) {
        u16x8 h;
        memcpy(&h, (const uint16_t *)src + at, sizeof h);
        const u32x8 wide = __builtin_convertvector(h, u32x8) << 16;
        memcpy(&x, &wide, sizeof x);
    } else {
        memcpy(&x, (const float *)src + at, sizeof x);
    }
    return x;
}

/* x to dst[at, at + 8); to bfloat16 as torch narrows: to nearest, ties to even (NaN never gets
 * here: the engine refuses it). */
static inline void store8(void *dst, int32_t bf16, int64_t at, f32x8 x) {
    if (bf16) {
        u32x8 u;
        memcpy(&u, &x, sizeof u);
        const u16x8 h = __builtin_convertvector((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16, u16x8);
        memcpy((uint16_t *)dst + at, &h, sizeof h);
    } else {
        memcpy((float *)dst + at, &x, sizeof x);
    }
}

/* A last, partial group: `count` (< 8) elements from `at` as float32, the other lanes zero. */
static inline f32x8 load8_part(const void *src, int32_t bf16, int64_t at, int64_t count) {
    float part[8] = {0}, widened[8];
    memcpy(part, load(src, bf16, at, count, widened), (size_t)count * sizeof(float));
    f32x8 x;
    memcpy(&x, part, sizeof x);
    return x;
}

/* The first `count` (< 8) lanes of x to dst[at, at + count), rounded as store8 rounds. */
static inline void store8_part(void *dst, int32_t bf16, int64_t at, int64_t count, f32x8 x) {
    union { float f32[8]; uint16_t bf16[8]; } part;
    store8(&part, bf16, 0, x);
    const size_t width = bf16 ? sizeof(uint16_t) : sizeof(float);
    memcpy((char *)dst + at * width, &part, (size_t)count * width);
}

/* Elements [at, at + 8) of `src`, or its last ones up to `end`, zero-padded. */
static inline f32x8 load8_upto(const void *src, int32_t bf16, int64_t at, int64_t end) {
    return end - at >= 8 ? load8(src, bf16, at) : load8_part(src, bf16, at, end - at);
}

/* x to dst[at, at + 8), or its first lanes up to `end`. */
static inline void store8_upto(void *dst, int32_t bf16, int64_t at, int64_t end, f32x8 x) {
    if (end - at >= 8) store8(dst, bf16, at, x);
    else store8_part(dst, bf16, at, end - at, x);
}

static inline f32x8 sign8(f32x8 x) {  /* sign_of in each lane */
    const i32x8 one = (i32x8)splat(1.0f);
    return (f32x8)(one & (x > 0.0f)) - (f32x8)(one & (x < 0.0f));
}

static inline f32x8 fma8(f32x8 a, f32x8 b, f32x8 c) {  /* fmaf in each lane */
#ifdef __FMA__
    return __builtin_ia32_vfmaddps256(a, b, c);  /* GCC does not vectorize the loop below */
#else
    f32x8 r;
    for (int k = 0; k < 8; k++) r[k] = fmaf(a[k], b[k], c[k]);
    return r;
#endif
}

/* Keep masks travel between DARE's passes packed 8 to a byte: bit k of byte i is position 8i + k. */
static inline uint8_t pack8(i32x8 keep) {
#ifdef __AVX__
    return (uint8_t)__builtin_ia32_movmskps256((f32x8)keep);
#else
    unsigned byte = 0;
    for (int k = 0; k < 8; k++) byte |= (unsigned)(keep[k] & 1) << k;
    return (uint8_t)byte;
#endif
}

static inline i32x8 unpack8(uint8_t byte) {
    return (splat_int(byte) & (i32x8){1, 2, 4, 8, 16, 32, 64, 128}) != 0;
}

/* selection._block_hash for 8 consecutive positions of an RNG block from `local`, before the
 * finalizer: an odd multiplier and an offset from the block's seed (int32 arithmetic wraps as
 * torch's). The next 8 positions add 8 * multiplier. */
static inline u32x8 first_hashes(int64_t local, uint64_t seed) {
    return ((u32x8){0, 1, 2, 3, 4, 5, 6, 7} + (uint32_t)local) * ((uint32_t)seed | 1u) + (uint32_t)(seed >> 32);
}

/* MurmurHash3's finalizer with arithmetic shifts (torch has no uint32), eight at a time. */
static inline i32x8 finalize8(u32x8 linear) {
    i32x8 z = (i32x8)linear;
    z ^= z >> 16;
    z = (i32x8)((u32x8)z * MIX1);
    z ^= z >> 13;
    z = (i32x8)((u32x8)z * MIX2);
    z ^= z >> 16;
    return z;
}

static inline int32_t hash1(int64_t local, uint64_t seed) {  /* one position */
    return finalize8(first_hashes(local, seed))[0];
}

/* selection.bernoulli's mask for the n positions from `at`, as lane masks keep[0, (n + 7) / 8)
 * (-1 keep, 0 not; lanes past n are 0): a position is kept where its hash is below `threshold`.
 * seeds[k] is the seed of RNG block first_block + k; blocks are 1 << shift positions long. */
static void draw_masks(int64_t at, int64_t n, int shift, const int64_t *seeds, int64_t first_block, int32_t threshold,
                       i32x8 *keep) {
    memset(keep, 0, (size_t)(n + 7) / 8 * sizeof *keep);
    for (int64_t done = 0; done < n;) {
        const int64_t block = (at + done) >> shift, local = at + done - (block << shift);
        const int64_t block_end = done + (INT64_C(1) << shift) - local, end = block_end < n ? block_end : n;
        const uint64_t seed = (uint64_t)seeds[block - first_block];
        if (done % 8 || end - done < 8) {  /* one at a time up to a group's start, and at an RNG block's end */
            keep[done / 8][done % 8] = -(hash1(local, seed) < threshold);
            done++;
            continue;
        }
        const uint32_t multiplier = (uint32_t)seed | 1u;
        u32x8 linear = first_hashes(local, seed);
        for (; done + 8 <= end; done += 8) {
            keep[done / 8] = finalize8(linear) < threshold;
            linear += 8u * multiplier;
        }
    }
}

/* ml_task_merge for elements [from, to) (a multiple of 8 apart), with every model's keep mask
 * packed (masks[j], from `from`; NULL: no mask). Compiled once per combination of `masked` (any
 * mask) and `shrunk` (any finite bound), so each loop holds only the constants it uses in
 * registers (AVX2 has 16; the loop for all cases spilled an accumulator and ran ~10% slower). */
static inline __attribute__((always_inline)) void merge_groups(
        const void *base_in, const void *const *models_in, int32_t in_bf16, const uint8_t *const *masks,
        int64_t from, int64_t to, const float *bounds, const float *factors, const float *weights, int32_t count,
        int32_t consensus, int32_t normalize, float divisor, float scale, void *out, int32_t out_bf16,
        const int masked, const int shrunk) {
    const i32x8 one = (i32x8)splat(1.0f), sign_bit = splat_int(INT32_MIN);
    for (int64_t start = from; start < to; start += 8) {
        const f32x8 b = load8(base_in, in_bf16, start);
        f32x8 total = splat(0.0f), magnitude = total, signed_weight = total, support = total;
        for (int32_t j = 0; j < count; j++) {
            f32x8 delta = load8(models_in[j], in_bf16, start) - b;
            if (masked && masks[j]) delta *= (f32x8)(one & unpack8(masks[j][(start - from) >> 3]));
            if (shrunk && bounds[j] != -INFINITY) {  /* hardshrink */
                delta = (f32x8)((i32x8)delta & ~((delta >= -bounds[j]) & (delta <= bounds[j])));
            }
            delta *= factors[j];
            const f32x8 x = delta * weights[j];
            if (!consensus) {  /* _weighted_sum: w0 * d0, then += w * d as torch's fused add */
                total = j == 0 ? x : fma8(delta, splat(weights[j]), total);
            } else {  /* x * sign(x) is |x|; sign(x) * w is w with x's sign, or 0 where x is 0 */
                total += x;
                magnitude += (f32x8)((i32x8)x & ~sign_bit);
                if (normalize) {
                    const i32x8 nonzero = (x > 0.0f) | (x < 0.0f), w = (i32x8)splat(weights[j]);
                    signed_weight += (f32x8)(nonzero & (w ^ ((i32x8)x & sign_bit)));
                    support += (f32x8)(nonzero & w);
                }
            }
        }
        if (consensus) {
            const f32x8 elected = sign8(sign8(total) + 0.5f);  /* a zero sum elects + */
            total = (total + elected * magnitude) * 0.5f;
            if (normalize) {
                const f32x8 d = (support + elected * signed_weight) * 0.5f;
                total = total / (d + (1.0f - (f32x8)((i32x8)sign8(d) & ~sign_bit)));
            }
        } else if (normalize) {
            total = total / divisor;
        }
        if (scale != 1.0f) total *= scale;
        store8(out, out_bf16, start, total + b);
    }
}

static void task_merge_groups(const void *base_in, const void *const *models_in, int32_t in_bf16,
                              const uint8_t *const *masks, int64_t from, int64_t to, const float *bounds,
                              const float *factors, const float *weights, int32_t count, int32_t consensus,
                              int32_t normalize, float divisor, float scale, void *out, int32_t out_bf16) {
    int masked = 0, shrunk = 0;
    for (int32_t j = 0; j < count; j++) {
        masked |= masks[j] != NULL;
        shrunk |= bounds[j] != -INFINITY;
    }
#define MERGE_GROUPS(masked, shrunk) merge_groups(base_in, models_in, in_bf16, masks, from, to, bounds, factors, \
    weights, count, consensus, normalize, divisor, scale, out, out_bf16, masked, shrunk)
    if (masked && shrunk) MERGE_GROUPS(1, 1);
    else if (masked) MERGE_GROUPS(1, 0);
    else if (shrunk) MERGE_GROUPS(0, 1);
    else MERGE_GROUPS(0, 0);
#undef MERGE_GROUPS
}

/* methods.task_arithmetic_family's kernel followed by methods.combine_deltas, for the chunk at
 * flat position `position`. Per model j: delta = (model - base) [* DARE's keep mask: packed in
 * bits[j], else drawn with seeds[j] and thresholds[j], else none] -> hardshrink(bounds[j]) ->
 * * factors[j] -> weighted combination (TIES sign election when `consensus`), normalized,
 * scaled, plus the base. Where the torch code multiplies by a sign or a 0/1 mask, the loop picks
 * or masks bits instead: the same values, as those products are exact (and a NaN anywhere fails
 * the merge, so NaN lanes need not agree). RNG blocks are `block_size` (a power of two) long. */
void ml_task_merge(const void *base_in, const void *const *models_in, int32_t in_bf16,
                   const uint8_t *const *bits, const int64_t *const *seeds, const int32_t *thresholds,
                   int64_t position, int64_t block_size,
                   const float *bounds, const float *factors, const float *weights, int32_t count,
                   int64_t n, int32_t consensus, int32_t normalize, float divisor, float scale,
                   void *out, int32_t out_bf16) {
    const int shift = __builtin_ctzll((uint64_t)block_size);
    uint8_t drawn[count][BLOCK / 8];
    i32x8 keep[BLOCK / 8];
    const uint8_t *masks[count];
    for (int64_t start = 0; start < n; start += BLOCK) {
        const int64_t size = n - start < BLOCK ? n - start : BLOCK, whole = start + size / 8 * 8;
        for (int32_t j = 0; j < count; j++) {  /* masks drawn a block at a time, so that they stay in L1 */
            masks[j] = bits[j] ? bits[j] + start / 8 : seeds[j] ? drawn[j] : NULL;
            if (!bits[j] && seeds[j]) {
                draw_masks(position + start, size, shift, seeds[j], position >> shift, thresholds[j], keep);
                for (int64_t g = 0; g < (size + 7) / 8; g++) drawn[j][g] = pack8(keep[g]);
            }
        }
        task_merge_groups(base_in, models_in, in_bf16, masks, start, whole, bounds, factors, weights, count,
                          consensus, normalize, divisor, scale, out, out_bf16);
        if (whole == start + size) continue;
        /* The chunk's last few elements, as a group of 8 padded with zeros. */
        const int64_t rest = start + size - whole;
        f32x8 base_tail = load8_part(base_in, in_bf16, whole, rest), model_tail[count];
        const void *model_tails[count];
        const uint8_t *tail_masks[count];
        for (int32_t j = 0; j < count; j++) {
            model_tail[j] = load8_part(models_in[j], in_bf16, whole, rest);
            model_tails[j] = &model_tail[j];
            tail_masks[j] = masks[j] ? masks[j] + (whole - start) / 8 : NULL;
        }
        f32x8 out_tail;
        task_merge_groups(&base_tail, model_tails, 0, tail_masks, 0, 8, bounds, factors, weights, count, consensus,
                          normalize, divisor, scale, &out_tail, 0);
        store8_part(out, out_bf16, whole, rest, out_tail);
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

/* selection.bernoulli: keep[p] = 1 where p is kept, for flat positions [start, start + n);
 * seeds[k] is the stream seed of block start / block_size + k (block_size: a power of two). */
void ml_bernoulli(int64_t start, int64_t n, int64_t block_size, const int64_t *seeds, int32_t threshold,
                  uint8_t *keep) {
    const int shift = __builtin_ctzll((uint64_t)block_size);
    i32x8 masks[BLOCK / 8];
    for (int64_t done = 0; done < n; done += BLOCK) {
        const int64_t size = n - done < BLOCK ? n - done : BLOCK;
        draw_masks(start + done, size, shift, seeds, start >> shift, threshold, masks);
        for (int64_t i = 0; i < size; i++) keep[done + i] = masks[i / 8][i % 8] != 0;
    }
}

/* One group of 8 columns of ml_l1_sums, added to a segment's float32 lanes. */
static inline void l1_group(f32x8 difference, i32x8 keep, f32x8 *lanes, f32x8 *kept_lanes) {
    const f32x8 magnitude = (f32x8)((i32x8)difference & splat_int(INT32_MAX));  /* fabsf */
    *lanes += magnitude;
    *kept_lanes += magnitude * (f32x8)(keep & (i32x8)splat(1.0f));
}

/* Lanes 0-7 and 8-15 of a segment, added to the row's float64 lanes. */
static inline void fold_lanes(f32x8 low, f32x8 high, f64x4 row[4]) {
    f32x4 quarters[4];
    memcpy(quarters, &low, sizeof low);
    memcpy(quarters + 2, &high, sizeof high);
    for (int q = 0; q < 4; q++) row[q] += __builtin_convertvector(quarters[q], f64x4);
}

/* DARE's L1 sums for a chunk of `rows` rows of `cols` starting at flat position `position`, per
 * row: of |values - base|, and of |values - base| * keep with the mask selection.bernoulli draws
 * for (seeds, threshold). Each row adds as methods.row_sums defines it: in segments of SEGMENT
 * columns, LANES float32 running sums (lane k takes the segment's columns k, k + LANES, ... in
 * order); each segment's lanes are added in float64 to the row's lanes, which are then added in
 * order. With `bits` (rows of a multiple of 8 columns), the mask is also packed there for the
 * merge pass. RNG blocks are `block_size` (a power of two) long. */
#define LANES 16
#define SEGMENT 256
void ml_l1_sums(const void *values_in, const void *base_in, int32_t in_bf16, int64_t rows, int64_t cols,
                int64_t position, int64_t block_size, const int64_t *seeds, int32_t threshold,
                double *totals, double *kepts, uint8_t *bits) {
    const int shift = __builtin_ctzll((uint64_t)block_size);
    const int64_t block_length = INT64_C(1) << shift;
    i32x8 drawn[SEGMENT / 8];
    for (int64_t r = 0; r < rows; r++) {
        f64x4 total[LANES / 4] = {{0}}, kept_total[LANES / 4] = {{0}};
        for (int64_t segment = 0; segment < cols; segment += SEGMENT) {
            const int64_t at = r * cols + segment, size = cols - segment < SEGMENT ? cols - segment : SEGMENT;
            /* A segment inside one RNG block hashes as it goes; one across two draws its mask first. */
            const int64_t block = (position + at) >> shift, local = position + at - (block << shift);
            const uint64_t seed = (uint64_t)seeds[block - (position >> shift)];
            const int inside = local + size <= block_length;
            if (!inside) draw_masks(position + at, size, shift, seeds, position >> shift, threshold, drawn);
            u32x8 linear = first_hashes(local, seed);
            const u32x8 step = (u32x8){0} + 8u * ((uint32_t)seed | 1u);
            f32x8 low = splat(0.0f), high = low, kept_low = low, kept_high = low;  /* lanes 0-7, 8-15 */
            for (int64_t column = 0; column < size; column += LANES) {
                const int64_t i = at + column, end = at + size;  /* the row's last group is zero-padded */
                const i32x8 keep = inside ? finalize8(linear) < threshold : drawn[column / 8];
                const i32x8 keep_high = inside ? finalize8(linear + step) < threshold : drawn[column / 8 + 1];
                linear += step + step;
                if (bits) {  /* rows are a multiple of 8 long */
                    bits[i / 8] = pack8(keep);
                    if (i + 8 < end) bits[i / 8 + 1] = pack8(keep_high);
                }
                l1_group(load8_upto(values_in, in_bf16, i, end) - load8_upto(base_in, in_bf16, i, end), keep,
                         &low, &kept_low);
                if (i + 8 < end) {
                    l1_group(load8_upto(values_in, in_bf16, i + 8, end) - load8_upto(base_in, in_bf16, i + 8, end),
                             keep_high, &high, &kept_high);
                }
            }
            fold_lanes(low, high, total);
            fold_lanes(kept_low, kept_high, kept_total);
        }
        double row_total = 0.0, row_kept = 0.0;
        for (int k = 0; k < LANES; k++) {
            row_total += total[k / 4][k % 4];
            row_kept += kept_total[k / 4][k % 4];
        }
        totals[r] = row_total;
        kepts[r] = row_kept;
    }
}

/* Row sums of a * a, b * b and a * b (SLERP's norms and dot product) for a chunk of `rows` rows
 * of `cols`, each added as methods.row_sums defines it (see ml_l1_sums). A product rounds to
 * float32 before it is added, as torch's `row_sums(a * b)` rounds it; bfloat16 products are exact. */
void ml_product_sums(const void *a_in, const void *b_in, int32_t in_bf16, int64_t rows, int64_t cols,
                     double *aa, double *bb, double *ab) {
    for (int64_t r = 0; r < rows; r++) {
        f64x4 row[3][LANES / 4] = {{{0}}};
        for (int64_t segment = 0; segment < cols; segment += SEGMENT) {
            const int64_t at = r * cols + segment, size = cols - segment < SEGMENT ? cols - segment : SEGMENT;
            f32x8 lanes[3][2] = {{{0}}};  /* per sum: lanes 0-7, 8-15 */
            for (int64_t column = 0; column < size; column += 8) {
                const f32x8 a = load8_upto(a_in, in_bf16, at + column, at + size);
                const f32x8 b = load8_upto(b_in, in_bf16, at + column, at + size);
                const int half = (column / 8) & 1;
                lanes[0][half] += a * a;
                lanes[1][half] += b * b;
                lanes[2][half] += a * b;
            }
            for (int k = 0; k < 3; k++) fold_lanes(lanes[k][0], lanes[k][1], row[k]);
        }
        double sums[3] = {0.0, 0.0, 0.0};
        for (int k = 0; k < 3; k++) {
            for (int lane = 0; lane < LANES; lane++) sums[k] += row[k][lane / 4][lane % 4];
        }
        aa[r] = sums[0];
        bb[r] = sums[1];
        ab[r] = sums[2];
    }
}

/* methods.linear over bfloat16 chunks, rounded to bfloat16: w0 * m0, then += w * m as torch's
 * fused add, then / divisor when `normalize`; the float32 steps of the torch code, in its order. */
void ml_linear_bf16(const uint16_t *const *models, const float *weights, int32_t count, int64_t n,
                    int32_t normalize, float divisor, uint16_t *out) {
    for (int64_t at = 0; at < n; at += 8) {
        f32x8 total = load8_upto(models[0], 1, at, n) * weights[0];
        for (int32_t j = 1; j < count; j++) total = fma8(load8_upto(models[j], 1, at, n), splat(weights[j]), total);
        if (normalize) total = total / divisor;
        store8_upto(out, 1, at, n, total);
    }
}

/* SLERP's a * x + b * y over bfloat16, rounded to bfloat16, as `torch.mul(x, a).add_(y, alpha=b)`. */
void ml_axpby_bf16(const uint16_t *x, const uint16_t *y, float a, float b, int64_t n, uint16_t *out) {
    for (int64_t at = 0; at < n; at += 8) {
        store8_upto(out, 1, at, n, fma8(load8_upto(y, 1, at, n), splat(b), load8_upto(x, 1, at, n) * a));
    }
}
