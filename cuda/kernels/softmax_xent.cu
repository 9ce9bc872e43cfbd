// Softmax cross-entropy, forward and backward fused, computed in f32 whatever the storage types.
// logits: [rows, classes] (L), labels: [rows] i32 -> dlogits: [rows, classes] (D) = (softmax - onehot) * g,
// g = grad_scale / rows; loss = mean over rows of (logsumexp(row) - row[label]).
//
// One warp per row (grid-stride over rows); each block writes the sum of its rows' losses to partial[block],
// and softmax_xent_finish sums the partials in a fixed order (deterministic for a given launch shape).
// A label outside 0..classes sets bad[0] = 1, bad[1] = label and leaves its row untouched; the host reports it.
//
// With COUNT (softmax_xent_to, the loss of a step decided on the device), the same pass also counts, per block,
// into counts[3 * block + k]: k = 0 the rows whose arg-max logit (count_correct's: the first of the largest,
// NaN never wins) is the label; k = 1 and 2 the gradient values that are non-zero in f32 and, of those, the ones
// that become zero when stored in D (count_underflow's rule on the f32 value: the same bits the composed op
// computes into an f32 buffer before casting it). softmax_xent_to_finish adds them into the control block.

template <typename L, typename D, bool COUNT>
__device__ void softmax_xent_impl(const L* logits, const int* labels, u64 rows, u64 classes, D* dlogits, float g,
                                  float* partial, int* bad, unsigned* counts) {
    __shared__ unsigned block_counts[3];
    if (COUNT) {
        if (threadIdx.x < 3) block_counts[threadIdx.x] = 0;
        __syncthreads();
    }
    const unsigned lane = threadIdx.x & 31;
    const u64 first = gtid() >> 5, warps = gstride() >> 5;
    float local = 0.0f;  // lane 0: the losses of this warp's rows
    unsigned correct = 0, flushed = 0, non_zero = 0;  // COUNT: correct in lane 0, the others per lane
    for (u64 r = first; r < rows; r += warps) {
        const int label = labels[r];
        if (label < 0 || (u64)label >= classes) {
            if (lane == 0 && atomicCAS(bad, 0, 1) == 0) bad[1] = label;
            continue;
        }
        const u64 row = r * classes;
        float m = -INFINITY;
        float best = -INFINITY;  // COUNT: this lane's first largest logit, and its index
        u64 best_j = ~(u64)0;
        for (u64 j = lane; j < classes; j += 32) {
            const float v = ld(logits, row + j);
            m = fmaxf(m, v);
            if (COUNT && v > best) {
                best = v;
                best_j = j;
            }
        }
        m = warp_max(m);
        if (COUNT) {
            // The lanes' candidates meet: the larger value, then the lower index (NaN never got in).
            for (int o = 16; o > 0; o >>= 1) {
                const float ob = __shfl_xor_sync(0xffffffffu, best, o);
                const u64 oj = __shfl_xor_sync(0xffffffffu, best_j, o);
                if (ob > best || (ob == best && oj < best_j)) {
                    best = ob;
                    best_j = oj;
                }
            }
            // Nothing above -inf: count_correct's index 0.
            const u64 pred = best == -INFINITY ? 0 : best_j;
            if (lane == 0 && pred == (u64)label) correct++;
        }
        float s = 0.0f;
        for (u64 j = lane; j < classes; j += 32) s += expf(ld(logits, row + j) - m);
        s = warp_sum(s);
        if (lane == 0) local += logf(s) + m - ld(logits, row + (u64)label);
        for (u64 j = lane; j < classes; j += 32) {
            const float p = expf(ld(logits, row + j) - m) / s;
            const float onehot = j == (u64)label ? 1.0f : 0.0f;
            const float d = (p - onehot) * g;
            st(dlogits, row + j, d);
            if (COUNT && d != 0.0f) {
                non_zero++;
                if (rnd((const D*)0, d) == 0.0f) flushed++;
            }
        }
    }
    const float total = block_sum(lane == 0 ? local : 0.0f);
    if (threadIdx.x == 0) partial[blockIdx.x] = total;
    if (COUNT) {
        const unsigned c[3] = {correct, warp_sum(flushed), warp_sum(non_zero)};
        if (lane == 0)
            for (int k = 0; k < 3; k++)
                if (c[k]) atomicAdd(&block_counts[k], c[k]);
        __syncthreads();
        if (threadIdx.x < 3) counts[3 * (u64)blockIdx.x + threadIdx.x] = block_counts[threadIdx.x];
    }
}

// loss[0] = inv_rows * sum of partial[0..parts]. One block.
extern "C" __global__ void softmax_xent_finish(const float* partial, u64 parts, float inv_rows, float* loss) {
    PDL_ENTRY();
    float v = 0.0f;
    for (u64 i = threadIdx.x; i < parts; i += blockDim.x) v += partial[i];
    v = block_sum(v);
    if (threadIdx.x == 0) loss[0] = v * inv_rows;
}

#define SOFTMAX_XENT(ln, L, dn, D)                                                                           \
    extern "C" __global__ void softmax_xent_##ln##_##dn(const L* logits, const int* labels, u64 rows,        \
                                                        u64 classes, D* dlogits, float g, float* partial,    \
                                                        int* bad) {                                          \
        PDL_ENTRY();                                                                                                               \
        softmax_xent_impl<L, D, false>(logits, labels, rows, classes, dlogits, g, partial, bad, nullptr);                          \
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
        PDL_ENTRY();                                                                                         \
        const float g = grad_scale * __uint_as_float(ctl[CTL_SCALE]) * inv_rows;                             \
        softmax_xent_impl<L, D, false>(logits, labels, rows, classes, dlogits, g, partial, bad, nullptr);                          \
    }
FOR_FLOAT_PAIR(SOFTMAX_XENT_SCALED)

// Backend::softmax_cross_entropy_to: softmax_xent_scaled's pass with COUNT (counts: 3 u32 a block), then
// softmax_xent_to_finish.
#define SOFTMAX_XENT_TO(ln, L, dn, D)                                                                        \
    extern "C" __global__ void softmax_xent_to_##ln##_##dn(const L* logits, const int* labels, u64 rows,     \
                                                           u64 classes, D* dlogits, float grad_scale,        \
                                                           float inv_rows, const unsigned* ctl,              \
                                                           float* partial, int* bad, unsigned* counts) {     \
        PDL_ENTRY();                                                                                         \
        const float g = grad_scale * __uint_as_float(ctl[CTL_SCALE]) * inv_rows;                             \
        softmax_xent_impl<L, D, true>(logits, labels, rows, classes, dlogits, g, partial, bad, counts);      \
    }
FOR_FLOAT_PAIR(SOFTMAX_XENT_TO)

// loss[0] as softmax_xent_finish (the same sum, so the same bits), and the blocks' counts added into the control
// block's LAST_CORRECT and, when flushed != 0 (a 16-bit gradient), LAST_FLUSHED and LAST_NON_ZERO (u32, modulo
// 2^32 as the host's `as u32`). One block.
extern "C" __global__ void softmax_xent_to_finish(const float* partial, const unsigned* counts, u64 parts,
                                                  float inv_rows, float* loss, unsigned* ctl, int flushed) {
    PDL_ENTRY();
    __shared__ unsigned total[3];
    if (threadIdx.x < 3) total[threadIdx.x] = 0;
    __syncthreads();
    float v = 0.0f;
    unsigned c[3] = {0, 0, 0};
    for (u64 i = threadIdx.x; i < parts; i += blockDim.x) {
        v += partial[i];
        for (int k = 0; k < 3; k++) c[k] += counts[3 * i + k];
    }
    for (int k = 0; k < 3; k++) {
        c[k] = warp_sum(c[k]);
        if ((threadIdx.x & 31) == 0 && c[k]) atomicAdd(&total[k], c[k]);
    }
    v = block_sum(v);  // ends with __syncthreads: total[] is complete
    if (threadIdx.x == 0) {
        loss[0] = v * inv_rows;
        ctl[CTL_LAST_CORRECT] = total[0];
        if (flushed) {
            ctl[CTL_LAST_FLUSHED] = total[1];
            ctl[CTL_LAST_NON_ZERO] = total[2];
        }
    }
}

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
        PDL_ENTRY();                                                                                         \
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
        PDL_ENTRY();                                                                                         \
        count_correct_impl(logits, labels, rows, classes, count);                                            \
    }                                                                                                        \
    extern "C" __global__ void count_correct_ctl_##n(const T* logits, const int* labels, u64 rows,           \
                                                     u64 classes, unsigned* count) {                         \
        PDL_ENTRY();                                                                                         \
        count_correct_impl(logits, labels, rows, classes, count);                                            \
    }
FOR_FLOAT(COUNT_CORRECT)
