// Reductions: the bias gradient and the gradient statistics. Both are two-pass with a fixed launch shape, so
// results are deterministic (no atomics); partial sums live in the backend's scratch, outside the arena.

// bias_grad, inner == 1 (Linear): dy: [outer, channels]. Column sums of channels c0..c0+cc over the rows
// of split blockIdx.y. Block (32, 8): 32 adjacent columns per block keep the loads coalesced.
// partial: [splits, cc] f32.
template <typename Y>
__device__ void bias_grad_rows_impl(const Y* dy, float* partial, u64 outer, u64 channels, u64 c0, u64 cc,
                                    u64 rows_per_split) {
    __shared__ float sh[8][33];
    const u64 c = c0 + (u64)blockIdx.x * 32 + threadIdx.x;
    const u64 r0 = (u64)blockIdx.y * rows_per_split;
    const u64 r1 = min(r0 + rows_per_split, outer);
    float acc = 0.0f;
    if (c < c0 + cc)
        for (u64 r = r0 + threadIdx.y; r < r1; r += 8) acc += ld(dy, r * channels + c);
    sh[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < c0 + cc) {
        float s = 0.0f;
        for (int t = 0; t < 8; t++) s += sh[t][threadIdx.x];
        partial[(u64)blockIdx.y * cc + (c - c0)] = s;
    }
}

// bias_grad, inner > 1 (Conv2d): dy: [outer, channels, inner]. One block per (channel c0 + blockIdx.x, split
// of outer): each (o, c) row of `inner` values is contiguous. Block of 256 threads.
template <typename Y>
__device__ void bias_grad_inner_impl(const Y* dy, float* partial, u64 outer, u64 channels, u64 inner, u64 c0,
                                     u64 cc, u64 outer_per_split) {
    const u64 c = c0 + blockIdx.x;
    const u64 o0 = (u64)blockIdx.y * outer_per_split;
    const u64 o1 = min(o0 + outer_per_split, outer);
    const u64 cnt = o1 > o0 ? (o1 - o0) * inner : 0;
    float acc = 0.0f;
    for (u64 j = threadIdx.x; j < cnt; j += blockDim.x) {
        const u64 o = o0 + j / inner, i = j % inner;
        acc += ld(dy, (o * channels + c) * inner + i);
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[(u64)blockIdx.y * cc + blockIdx.x] = acc;
}

// bias_grad, inner == 1, few channels (<= 64): dy [outer, channels] as one flat array. Block b sums rows
// [b * rows_per_block, ...) for every channel: thread t < stride (the largest multiple of `channels` that fits
// the block) reads elements t, t + stride, ... of the chunk, all of channel t % channels, so the loads are
// coalesced and every thread is busy. Block of 256 threads. partial: [blocks, channels].
template <typename Y>
__device__ void bias_grad_few_impl(const Y* dy, float* partial, u64 outer, u64 channels, u64 rows_per_block) {
    __shared__ float sh[256];
    const u64 stride = (blockDim.x / channels) * channels;
    const u64 r0 = (u64)blockIdx.x * rows_per_block;
    const u64 r1 = min(r0 + rows_per_block, outer);
    float acc = 0.0f;
    if (threadIdx.x < stride && r0 < r1) {
        const u64 e1 = r1 * channels;
#pragma unroll 4
        for (u64 e = r0 * channels + threadIdx.x; e < e1; e += stride) acc += ld(dy, e);
    }
    sh[threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.x < channels) {
        float s = 0.0f;
        for (u64 t = threadIdx.x; t < stride; t += channels) s += sh[t];
        partial[(u64)blockIdx.x * channels + threadIdx.x] = s;
    }
}

// dbias[c] = sum over blocks of partial[s, c]: one warp per channel (8 per block of 256), lanes over the blocks,
// then the warp's tree; a fixed order for a given launch.
template <typename B>
__device__ void bias_grad_finish_warp_impl(const float* partial, B* dbias, u64 channels, u64 splits) {
    const u64 c = (u64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (c >= channels) return;
    float acc = 0.0f;
    for (u64 s = threadIdx.x & 31; s < splits; s += 32) acc += partial[s * channels + c];
    acc = warp_sum(acc);
    if ((threadIdx.x & 31) == 0) st(dbias, c, acc);
}

// dbias[c0 + c] = sum over splits of partial[s, c], in split order.
template <typename B>
__device__ void bias_grad_finish_impl(const float* partial, B* dbias, u64 c0, u64 cc, u64 splits) {
    for (u64 c = gtid(); c < cc; c += gstride()) {
        float acc = 0.0f;
        for (u64 s = 0; s < splits; s++) acc += partial[s * cc + c];
        st(dbias, c0 + c, acc);
    }
}

// grad_stats: per block, the count of non-finite grad[i] * scale and the f64 sum of their squares (finite ones
// only). Block of 256 threads; the host (grad_stats) or step_control's second pass adds the per-block results.
// Both launch it with the same grid (CudaBackend::stats_blocks), so they see the same per-block partials.
//
// A bandwidth kernel: the gradients are read with 16-byte loads (4 f32 or 8 f16 / bf16), 4 of them per thread
// per pass, all issued before the arithmetic (64 bytes in flight per thread, 64 KiB per SM at 4 blocks of 256;
// STATS_BOUNDS caps the registers so that 4 blocks fit on an SM and the host's grid of at most 4 blocks per SM
// is one wave). Elements before the first 16-byte boundary and after the last whole vector are read one by one,
// so any gradient pointer works. Each thread adds its elements in a fixed order (its head elements, its vectors
// pass by pass, its tail elements); the block adds the threads' sums in a fixed tree: for a given grid, the
// per-block partials are a fixed function of the data.
#define STATS_BOUNDS __launch_bounds__(256, 4)
#define STATS_VECS 4

__device__ __forceinline__ void stats_add(float v, double& s, u64& bad) {
    if (isfinite(v)) {
        s += (double)v * (double)v;
    } else {
        bad++;
    }
}
template <typename G>
__device__ __forceinline__ void stats_add_vec(const uint4& x, float scale, double& s, u64& bad) {
    const G* e = reinterpret_cast<const G*>(&x);
#pragma unroll
    for (int k = 0; k < (int)(16 / sizeof(G)); k++) stats_add(ld(e, k) * scale, s, bad);
}

template <typename G>
__device__ void grad_stats_impl(const G* grad, u64 n, float scale, double* sums, u64* counts) {
    __shared__ double sh_sum[256];
    __shared__ u64 sh_cnt[256];
    const u64 E = 16 / sizeof(G);  // elements per 16-byte vector
    const u64 t = gtid(), T = gstride();
    double s = 0.0;
    u64 bad = 0;
    // grad is aligned to its element size, so fewer than E elements come before the first 16-byte boundary.
    const u64 head = min(n, ((16 - ((u64)grad & 15)) & 15) / sizeof(G));
    for (u64 j = t; j < head; j += T) stats_add(ld(grad, j) * scale, s, bad);
    const uint4* body = reinterpret_cast<const uint4*>(grad + head);
    const u64 vecs = (n - head) / E;
    // Vectors t + jT, j = 0, 1, ...: STATS_VECS per pass (each warp-wide load covers 512 contiguous bytes).
    u64 i = t;
    for (; i + (STATS_VECS - 1) * T < vecs; i += STATS_VECS * T) {
        uint4 x[STATS_VECS];
#pragma unroll
        for (int k = 0; k < STATS_VECS; k++) x[k] = body[i + k * T];
#pragma unroll
        for (int k = 0; k < STATS_VECS; k++) stats_add_vec<G>(x[k], scale, s, bad);
    }
    for (; i < vecs; i += T) {
        const uint4 x = body[i];
        stats_add_vec<G>(x, scale, s, bad);
    }
    const u64 tail = head + vecs * E;  // fewer than E elements from here to n
    for (u64 j = tail + t; j < n; j += T) stats_add(ld(grad, j) * scale, s, bad);
    sh_sum[threadIdx.x] = s;
    sh_cnt[threadIdx.x] = bad;
    __syncthreads();
    for (unsigned half = blockDim.x / 2; half > 0; half >>= 1) {
        if (threadIdx.x < half) {
            sh_sum[threadIdx.x] += sh_sum[threadIdx.x + half];
            sh_cnt[threadIdx.x] += sh_cnt[threadIdx.x + half];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        sums[blockIdx.x] = sh_sum[0];
        counts[blockIdx.x] = sh_cnt[0];
    }
}

#define REDUCE(yn, Y)                                                                                        \
    extern "C" __global__ void bias_grad_rows_##yn(const Y* dy, float* partial, u64 outer, u64 channels,    \
                                                   u64 c0, u64 cc, u64 rows_per_split) {                     \
        PDL_ENTRY();                                                                                         \
        bias_grad_rows_impl(dy, partial, outer, channels, c0, cc, rows_per_split);                           \
    }                                                                                                        \
    extern "C" __global__ void bias_grad_inner_##yn(const Y* dy, float* partial, u64 outer, u64 channels,   \
                                                    u64 inner, u64 c0, u64 cc, u64 outer_per_split) {        \
        PDL_ENTRY();                                                                                         \
        bias_grad_inner_impl(dy, partial, outer, channels, inner, c0, cc, outer_per_split);                  \
    }                                                                                                        \
    extern "C" __global__ void bias_grad_finish_##yn(const float* partial, Y* dbias, u64 c0, u64 cc,         \
                                                     u64 splits) {                                           \
        PDL_ENTRY();                                                                                         \
        bias_grad_finish_impl(partial, dbias, c0, cc, splits);                                               \
    }                                                                                                        \
    extern "C" __global__ void bias_grad_few_##yn(const Y* dy, float* partial, u64 outer, u64 channels,     \
                                                  u64 rows_per_block) {                                      \
        PDL_ENTRY();                                                                                         \
        bias_grad_few_impl(dy, partial, outer, channels, rows_per_block);                                    \
    }                                                                                                        \
    extern "C" __global__ void bias_grad_finish_warp_##yn(const float* partial, Y* dbias, u64 channels,      \
                                                          u64 splits) {                                      \
        PDL_ENTRY();                                                                                         \
        bias_grad_finish_warp_impl(partial, dbias, channels, splits);                                        \
    }                                                                                                        \
    extern "C" __global__ void STATS_BOUNDS                                                                  \
    grad_stats_##yn(const Y* grad, u64 n, float scale, double* sums, u64* counts) {                          \
        PDL_ENTRY();                                                                                         \
        grad_stats_impl(grad, n, scale, sums, counts);                                                       \
    }                                                                                                        \
    /* Backend::step_control's first pass: unscaled by 1 / SCALE of the step-control block, read here. */   \
    extern "C" __global__ void STATS_BOUNDS                                                                  \
    grad_stats_ctl_##yn(const Y* grad, u64 n, const unsigned* ctl, double* sums, u64* counts) {              \
        PDL_ENTRY();                                                                                         \
        grad_stats_impl(grad, n, 1.0f / __uint_as_float(ctl[CTL_SCALE]), sums, counts);                      \
    }
FOR_FLOAT(REDUCE)

// counts[0] += values of src that are non-zero but round to zero when stored as D (f16 underflow);
// counts[1] += non-zero values (NaN included, as the reference counts them). Integer atomics: the totals do not
// depend on the order. C: u64 counters in the scratch, or u32 words of the step-control block (counted modulo
// 2^32, which is the host's `as u32`).
template <typename S, typename D, typename C>
__device__ void count_underflow_impl(const S* src, u64 n, C* counts) {
    u64 flushed = 0, non_zero = 0;
    for (u64 i = gtid(); i < n; i += gstride()) {
        const float v = ld(src, i);
        if (v != 0.0f) {
            non_zero++;
            if (rnd((const D*)0, v) == 0.0f) flushed++;
        }
    }
    if (flushed) atomicAdd(&counts[0], (C)flushed);
    if (non_zero) atomicAdd(&counts[1], (C)non_zero);
}

#define COUNT_UNDERFLOW(sn, S, dn, D)                                                                        \
    extern "C" __global__ void count_underflow_##sn##_##dn(const S* src, u64 n, u64* counts) {             \
        PDL_ENTRY();                                                                                         \
        count_underflow_impl<S, D>(src, n, counts);                                                          \
    }                                                                                                        \
    /* counts: the block's LAST_FLUSHED and LAST_NON_ZERO words (zeroed by the host). */                     \
    extern "C" __global__ void count_underflow_ctl_##sn##_##dn(const S* src, u64 n, unsigned* counts) {    \
        PDL_ENTRY();                                                                                         \
        count_underflow_impl<S, D>(src, n, counts);                                                          \
    }
FOR_FLOAT_PAIR(COUNT_UNDERFLOW)
