// Activation backward fused with the bias gradient (Epilogue::ActGrad's tail after the GEMM), one pass over the
// data: dx = dy * act'(pre) written over dy, and per-split column sums of the stored dx into f32 partial sums in
// the backend's scratch; then a small finishing pass adds the splits up per column, in a fixed order. The
// composed version (activation_backward, then bias_grad) reads C twice.
//
// - dx: the same expression as elementwise.cu's act_bwd / act_bwd8 (`st(dx, ld(dy) * act_derivative(act,
//   ld(pre)))`, act_derivative from common.cuh), so it equals activation_backward bit for bit.
// - dbias: sums of dx as stored (rounded to T, widened back exactly, as bias_grad reads it), in f32. No atomics:
//   a thread adds its rows in order, the block's thread rows meet in shared memory in order, and the finishing
//   pass adds the splits in order, so the result depends only on the launch shape (which the host derives from
//   the problem and the device).
//
// Layout: block (32, AG_BY); blockIdx.x picks a tile of 32 V columns of the chunk [c0, c0 + cc) (V elements per
// thread: 16 bytes, or 1 in the scalar kernels), blockIdx.y a split of rows_per_split rows; thread row y walks
// the split's rows y, y + AG_BY, ..., in order, two (vector) or AG_SU (scalar) rows per iteration, all their
// loads issued before any arithmetic.
// partial: [splits, cc] f32.
//
// pre may be dy itself (every element is read before it is written, by the same thread); the host refuses any
// other overlap.

#define AG_BY 8

// 16 bytes of storage type T: 8 16-bit elements or 4 f32. Moved with one 16-byte load or store (the host launches
// the `16` kernels only when n is a multiple of V and pre and dy are 16-byte aligned: every group then is), then
// widened and rounded element by element with common.cuh's ld / st.
template <typename T>
struct alignas(16) AgVec {
    T v[16 / sizeof(T)];
};

template <typename T>
__device__ __forceinline__ AgVec<T> ag_ld(const T* p, u64 i) {
    AgVec<T> r;
    *reinterpret_cast<uint4*>(&r) = *reinterpret_cast<const uint4*>(p + i);
    return r;
}

template <typename T>
__device__ __forceinline__ void ag_st(T* p, u64 i, const AgVec<T>& r) {
    *reinterpret_cast<uint4*>(p + i) = *reinterpret_cast<const uint4*>(&r);
}

// dx of one group of V elements in place of dy (d holds dy), and its stored values added to acc.
template <typename T>
__device__ __forceinline__ void ag_group(int act, const AgVec<T>& x, AgVec<T>& d, float* acc) {
    constexpr int V = 16 / sizeof(T);
#pragma unroll
    for (int k = 0; k < V; k++) {
        st(d.v, k, ld(d.v, k) * act_derivative(act, ld(x.v, k)));
        acc[k] += ld(d.v, k);
    }
}

// Vector kernel: V = 16 / sizeof(T) columns per thread (8 for 16-bit, 4 for f32), 32 V per block.
template <typename T>
__device__ void act_grad_bias16_impl(int act, const T* pre, T* dy, float* partial, u64 m, u64 n, u64 c0, u64 cc,
                                     u64 rows_per_split) {
    constexpr int V = 16 / sizeof(T);
    // [thread row][element of the group][lane], padded: the stores below hit 32 different banks.
    __shared__ float sh[AG_BY][V][33];
    const u64 col = (u64)blockIdx.x * (32 * V) + (u64)threadIdx.x * V;  // in the chunk; cc is a multiple of V
    const u64 r0 = (u64)blockIdx.y * rows_per_split;
    const u64 r1 = min(r0 + rows_per_split, m);
    float acc[V];
#pragma unroll
    for (int k = 0; k < V; k++) acc[k] = 0.0f;
    if (col < cc) {
        const u64 c = c0 + col;
        u64 r = r0 + threadIdx.y;
        for (; r + AG_BY < r1; r += 2 * AG_BY) {
            const u64 i0 = r * n + c, i1 = (r + AG_BY) * n + c;
            const AgVec<T> x0 = ag_ld(pre, i0), x1 = ag_ld(pre, i1);
            AgVec<T> d0 = ag_ld((const T*)dy, i0), d1 = ag_ld((const T*)dy, i1);
            ag_group(act, x0, d0, acc);
            ag_group(act, x1, d1, acc);
            ag_st(dy, i0, d0);
            ag_st(dy, i1, d1);
        }
        if (r < r1) {
            const u64 i0 = r * n + c;
            const AgVec<T> x0 = ag_ld(pre, i0);
            AgVec<T> d0 = ag_ld((const T*)dy, i0);
            ag_group(act, x0, d0, acc);
            ag_st(dy, i0, d0);
        }
    }
#pragma unroll
    for (int k = 0; k < V; k++) sh[threadIdx.y][k][threadIdx.x] = acc[k];
    __syncthreads();
    // The block's 32 V columns, one per thread (V = 4: the first 128 threads), each adding the AG_BY thread rows
    // in order; consecutive threads write consecutive columns.
    const unsigned j = threadIdx.y * 32 + threadIdx.x;
    const u64 cj = (u64)blockIdx.x * (32 * V) + j;
    if (j < 32 * V && cj < cc) {
        const unsigned lane = j / V, k = j % V;
        float s = 0.0f;
#pragma unroll
        for (int t = 0; t < AG_BY; t++) s += sh[t][k][lane];
        partial[(u64)blockIdx.y * cc + cj] = s;
    }
}

// Scalar kernel (any n, any element alignment): one column per thread, 32 per block. Each load moves 2 or 4
// bytes, so AG_SU rows per iteration (all their loads issued before any arithmetic) keep enough bytes in flight.
#define AG_SU 4
template <typename T>
__device__ void act_grad_bias_impl(int act, const T* pre, T* dy, float* partial, u64 m, u64 n, u64 c0, u64 cc,
                                   u64 rows_per_split) {
    __shared__ float sh[AG_BY][33];
    const u64 col = (u64)blockIdx.x * 32 + threadIdx.x;
    const u64 r0 = (u64)blockIdx.y * rows_per_split;
    const u64 r1 = min(r0 + rows_per_split, m);
    float acc = 0.0f;
    if (col < cc) {
        const u64 c = c0 + col;
        u64 r = r0 + threadIdx.y;
        for (; r + (AG_SU - 1) * AG_BY < r1; r += AG_SU * AG_BY) {
            float x[AG_SU], g[AG_SU];
#pragma unroll
            for (int u = 0; u < AG_SU; u++) {
                const u64 i = (r + u * AG_BY) * n + c;
                x[u] = ld(pre, i);
                g[u] = ld(dy, i);
            }
#pragma unroll
            for (int u = 0; u < AG_SU; u++) {
                // Rounded through a T, stored, and that T widened back: what bias_grad would read.
                T h;
                st(&h, 0, g[u] * act_derivative(act, x[u]));
                dy[(r + u * AG_BY) * n + c] = h;
                acc += ld(&h, 0);
            }
        }
        for (; r < r1; r += AG_BY) {
            const u64 i = r * n + c;
            T h;
            st(&h, 0, ld(dy, i) * act_derivative(act, ld(pre, i)));
            dy[i] = h;
            acc += ld(&h, 0);
        }
    }
    sh[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && col < cc) {
        float s = 0.0f;
#pragma unroll
        for (int t = 0; t < AG_BY; t++) s += sh[t][threadIdx.x];
        partial[(u64)blockIdx.y * cc + col] = s;
    }
}

// dbias[c] = sum over splits of partial[s, c] for c < cc (dbias already offset to the chunk): block (32, AG_BY)
// over 32 columns, coalesced; thread row y adds splits y, y + AG_BY, ... in order, then row 0 adds the AG_BY
// sums in order.
template <typename B>
__device__ void act_grad_finish_impl(const float* partial, B* dbias, u64 cc, u64 splits) {
    __shared__ float sh[AG_BY][33];
    const u64 c = (u64)blockIdx.x * 32 + threadIdx.x;
    float acc = 0.0f;
    if (c < cc) {
#pragma unroll 4
        for (u64 s = threadIdx.y; s < splits; s += AG_BY) acc += partial[s * cc + c];
    }
    sh[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < cc) {
        float s = 0.0f;
#pragma unroll
        for (int t = 0; t < AG_BY; t++) s += sh[t][threadIdx.x];
        st(dbias, c, s);
    }
}

#define ACT_GRAD(tn, T)                                                                                      \
    extern "C" __global__ void __launch_bounds__(32 * AG_BY)                                                 \
        act_grad_bias16_##tn(int act, const T* pre, T* dy, float* partial, u64 m, u64 n, u64 c0, u64 cc,     \
                             u64 rows_per_split) {                                                           \
        act_grad_bias16_impl(act, pre, dy, partial, m, n, c0, cc, rows_per_split);                           \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * AG_BY)                                                 \
        act_grad_bias_##tn(int act, const T* pre, T* dy, float* partial, u64 m, u64 n, u64 c0, u64 cc,       \
                           u64 rows_per_split) {                                                             \
        act_grad_bias_impl(act, pre, dy, partial, m, n, c0, cc, rows_per_split);                             \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * AG_BY)                                                 \
        act_grad_finish_##tn(const float* partial, T* dbias, u64 cc, u64 splits) {                           \
        act_grad_finish_impl(partial, dbias, cc, splits);                                                    \
    }
FOR_FLOAT(ACT_GRAD)
