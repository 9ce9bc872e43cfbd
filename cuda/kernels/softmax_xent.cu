// Softmax cross-entropy, forward and backward fused, computed in f32 whatever the storage types.
// logits: [rows, classes] (L), labels: [rows] i32 -> dlogits: [rows, classes] (D) = (softmax - onehot) * g,
// g = grad_scale / rows; loss = mean over rows of (logsumexp(row) - row[label]).
//
// One warp per row (grid-stride over rows); each block writes the sum of its rows' losses to partial[block],
// and softmax_xent_finish sums the partials in a fixed order (deterministic for a given launch shape).
// A label outside 0..classes sets bad[0] = 1, bad[1] = label and leaves its row untouched; the host reports it.

template <typename L, typename D>
__device__ void softmax_xent_impl(const L* logits, const int* labels, u64 rows, u64 classes, D* dlogits, float g,
                                  float* partial, int* bad) {
    const unsigned lane = threadIdx.x & 31;
    const u64 first = gtid() >> 5, warps = gstride() >> 5;
    float local = 0.0f;  // lane 0: the losses of this warp's rows
    for (u64 r = first; r < rows; r += warps) {
        const int label = labels[r];
        if (label < 0 || (u64)label >= classes) {
            if (lane == 0 && atomicCAS(bad, 0, 1) == 0) bad[1] = label;
            continue;
        }
        const u64 row = r * classes;
        float m = -INFINITY;
        for (u64 j = lane; j < classes; j += 32) m = fmaxf(m, ld(logits, row + j));
        m = warp_max(m);
        float s = 0.0f;
        for (u64 j = lane; j < classes; j += 32) s += expf(ld(logits, row + j) - m);
        s = warp_sum(s);
        if (lane == 0) local += logf(s) + m - ld(logits, row + (u64)label);
        for (u64 j = lane; j < classes; j += 32) {
            const float p = expf(ld(logits, row + j) - m) / s;
            const float onehot = j == (u64)label ? 1.0f : 0.0f;
            st(dlogits, row + j, (p - onehot) * g);
        }
    }
    const float total = block_sum(lane == 0 ? local : 0.0f);
    if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

// loss[0] = inv_rows * sum of partial[0..parts]. One block.
extern "C" __global__ void softmax_xent_finish(const float* partial, u64 parts, float inv_rows, float* loss) {
    float v = 0.0f;
    for (u64 i = threadIdx.x; i < parts; i += blockDim.x) v += partial[i];
    v = block_sum(v);
    if (threadIdx.x == 0) loss[0] = v * inv_rows;
}

#define SOFTMAX_XENT(ln, L, dn, D)                                                                           \
    extern "C" __global__ void softmax_xent_##ln##_##dn(const L* logits, const int* labels, u64 rows,        \
                                                        u64 classes, D* dlogits, float g, float* partial,    \
                                                        int* bad) {                                          \
        softmax_xent_impl(logits, labels, rows, classes, dlogits, g, partial, bad);                          \
    }
FOR_FLOAT_PAIR(SOFTMAX_XENT)

// Backend::softmax_cross_entropy_scaled: g = (grad_scale * SCALE) * inv_rows with SCALE read from the step-control
// block `ctl` on the device (the host computes the same product in the same order for the unscaled op). The bad
// label flag is still raised, but nobody waits for it: the trainer validates labels on the host before upload.
#define SOFTMAX_XENT_SCALED(ln, L, dn, D)                                                                    \
    extern "C" __global__ void softmax_xent_scaled_##ln##_##dn(const L* logits, const int* labels, u64 rows, \
                                                               u64 classes, D* dlogits, float grad_scale,    \
                                                               float inv_rows, const unsigned* ctl,          \
                                                               float* partial, int* bad) {                   \
        const float g = grad_scale * __uint_as_float(ctl[CTL_SCALE]) * inv_rows;                             \
        softmax_xent_impl(logits, labels, rows, classes, dlogits, g, partial, bad);                          \
    }
FOR_FLOAT_PAIR(SOFTMAX_XENT_SCALED)

// out[r] = the first index of the largest logit of row r (NaN never wins), one thread per row.
template <typename L>
__device__ void argmax_impl(const L* logits, u64 rows, u64 classes, int* out) {
    for (u64 r = gtid(); r < rows; r += gstride()) {
        float best = -INFINITY;
        int best_j = 0;
        for (u64 j = 0; j < classes; j++) {
            const float v = ld(logits, r * classes + j);
            if (v > best) {
                best = v;
                best_j = (int)j;
            }
        }
        out[r] = best_j;
    }
}

#define ARGMAX(n, T)                                                                                         \
    extern "C" __global__ void argmax_##n(const T* logits, u64 rows, u64 classes, int* out) {               \
        argmax_impl(logits, rows, classes, out);                                                             \
    }
FOR_FLOAT(ARGMAX)

// count[0] += rows whose arg-max logit (first on ties, NaN never wins) equals the label. C: a u64 counter in the
// scratch, or the u32 LAST_CORRECT word of the step-control block (counted modulo 2^32, the host's `as u32`).
template <typename L, typename C>
__device__ void count_correct_impl(const L* logits, const int* labels, u64 rows, u64 classes, C* count) {
    u64 c = 0;
    for (u64 r = gtid(); r < rows; r += gstride()) {
        float best = -INFINITY;
        int best_j = 0;
        for (u64 j = 0; j < classes; j++) {
            const float v = ld(logits, r * classes + j);
            if (v > best) {
                best = v;
                best_j = (int)j;
            }
        }
        if (best_j == labels[r]) c++;
    }
    if (c) atomicAdd(count, (C)c);
}

#define COUNT_CORRECT(n, T)                                                                                  \
    extern "C" __global__ void count_correct_##n(const T* logits, const int* labels, u64 rows, u64 classes,  \
                                                 u64* count) {                                               \
        count_correct_impl(logits, labels, rows, classes, count);                                            \
    }                                                                                                        \
    extern "C" __global__ void count_correct_ctl_##n(const T* logits, const int* labels, u64 rows,           \
                                                     u64 classes, unsigned* count) {                         \
        count_correct_impl(logits, labels, rows, classes, count);                                            \
    }
FOR_FLOAT(COUNT_CORRECT)
