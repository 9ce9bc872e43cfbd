// Skinny matrix products: one of m, n, k is small (<= SK_MAX), one problem (batch 1). cuBLAS runs these at
// 4-12 TFLOP/s on the H200 (its tiles are sized for large products); they are memory-bound, so each kernel
// reads the big operand once, coalesced, in 16-byte loads where the layout allows, and accumulates in f32.
// Semantics of mantissa_core::backend::Gemm (row-major, op(A) [m, k], op(B) [k, n], C [m, n], leading
// dimensions lda/ldb/ldc): C = alpha * sum + beta * C, and beta == 0 does not read C. The order of summation
// differs from the reference (lanes, then a fixed tree or fixed split order): results are deterministic for a
// given launch shape, which depends only on the problem.
//
// Legend: m, n, k as above; V: elements per vector load; R: rows of C per warp or thread.
//
// - skinny_n (n small, A [m, k] row-major): one warp per SKN_R rows of A, lanes across k, op(B) read through L1
//   (for the gpu-mlp's last layer B is W [10, 4096], 80 KB); a warp reduction per C element.
// - skinny_m_part / skinny_m_finish (m small, e.g. dW = dY^T H with dY [k, m]): blocks split k; a block's 8
//   warps take interleaved rows of B, reduce in shared memory, and write per-split partial sums (f32, the
//   backend's scratch); the finishing pass adds the splits in order (no atomics: replays are bit-identical).
// - skinny_k (k small, e.g. dH = dY W with dY [m, 10], W [10, 4096]): one thread per V columns and SKK_R rows
//   at a time, element-wise style; with act >= 0 it is the fused input gradient through an activation:
//   C = round_C(A B) * act'(pre), what `gemm` followed by `activation_backward` computes, bit for bit.

#define SK_MAX 16

// act'(pre): common.cuh's act_derivative, as activation_backward and act_grad_bias compute it: the fused
// ActGrad then equals the composed path bit for bit.

// V consecutive elements of storage type T moved with loads / stores of up to 16 bytes (the host launches the
// V > 1 kernels only when every such group is aligned to its size, or to 16 bytes), then widened and rounded
// element by element with common.cuh's ld / st.
template <int BYTES>
struct SkRaw;
template <>
struct SkRaw<2> {
    typedef unsigned short t;
};
template <>
struct SkRaw<4> {
    typedef unsigned t;
};
template <>
struct SkRaw<8> {
    typedef uint2 t;
};
template <>
struct SkRaw<16> {
    typedef uint4 t;
};

template <int V, typename T>
struct Vec {
    static const int BYTES = V * (int)sizeof(T);
    static const int CHUNK = BYTES < 16 ? BYTES : 16;
    typedef typename SkRaw<CHUNK>::t R;
    R raw[BYTES / CHUNK];
    __device__ __forceinline__ float at(int i) const { return ld(reinterpret_cast<const T*>(raw), (u64)i); }
    __device__ __forceinline__ void set(int i, float v) { st(reinterpret_cast<T*>(raw), (u64)i, v); }
};

template <int V, typename T>
__device__ __forceinline__ Vec<V, T> ldv(const T* p) {
    Vec<V, T> r;
    const typename Vec<V, T>::R* q = reinterpret_cast<const typename Vec<V, T>::R*>(p);
#pragma unroll
    for (int i = 0; i < Vec<V, T>::BYTES / Vec<V, T>::CHUNK; i++) r.raw[i] = q[i];
    return r;
}

// The same for an operand read once (evict-first: it does not push the small, reused operand out of L1).
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
    uint4 r;
    asm("ld.global.cs.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}
template <int V, typename T>
__device__ __forceinline__ Vec<V, T> ldv_stream(const T* p) {
    if (Vec<V, T>::CHUNK != 16) return ldv<V>(p);
    Vec<V, T> r;
    const uint4* q = reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int i = 0; i < Vec<V, T>::BYTES / 16; i++) {
        const uint4 x = ld_stream(q + i);
        r.raw[i] = *reinterpret_cast<const typename Vec<V, T>::R*>(&x);
    }
    return r;
}

template <int V, typename T>
__device__ __forceinline__ void stv(T* p, const Vec<V, T>& r) {
    typename Vec<V, T>::R* q = reinterpret_cast<typename Vec<V, T>::R*>(p);
#pragma unroll
    for (int i = 0; i < Vec<V, T>::BYTES / Vec<V, T>::CHUNK; i++) q[i] = r.raw[i];
}

template <int V, typename T>
__device__ __forceinline__ Vec<V, T> vzero() {
    Vec<V, T> r;
#pragma unroll
    for (int i = 0; i < Vec<V, T>::BYTES / Vec<V, T>::CHUNK; i++) r.raw[i] = typename Vec<V, T>::R();
    return r;
}

// ---- small n: C[m, n] = alpha A[m, k] op(B)[k, n] + beta C ----
// V = 8 needs trans_b (B stored [n, k]), k, lda, ldb multiples of 8 and A, B 16-byte aligned; V = 1 takes any
// op(B). Block of 4 warps (128 threads); warp w of the grid takes rows SKN_R w .. SKN_R w + SKN_R - 1
// (grid-stride). Each lane sums its share of k for every (row, column) pair in registers, SKN_U chunks of A in
// flight (streamed past L1, which keeps op(B)); the warp's lanes then meet in shared memory a row at a time,
// and lane j < 16 adds up column j over the 32 lanes in order.
#define SKN_R 4
#define SKN_U 2
#define SKN_OUT (SKN_R * SK_MAX)

// The lane's sums for rows i0 .. i0 + SKN_R - 1, reduced over the warp into sums[r * SK_MAX + j]; red: the
// warp's SK_MAX x 33 floats (stride 33: the lane-ordered reads hit 32 different banks). Not inlined: one copy
// per (V, A), shared by both C dtypes (NVRTC compile time).
template <int V, typename A>
__device__ __noinline__ void skinny_n_rows(const A* __restrict__ a, const A* __restrict__ b, u64 m, u64 n, u64 k,
                                           u64 lda, u64 ldb, int trans_b, u64 i0, float* red, float* sums) {
    const int lane = threadIdx.x & 31;
    float acc[SKN_R][SK_MAX];
#pragma unroll
    for (int r = 0; r < SKN_R; r++)
#pragma unroll
        for (int j = 0; j < SK_MAX; j++) acc[r][j] = 0.0f;
    // Rows past m read row m - 1 (valid memory; never stored).
    const A* arow[SKN_R];
#pragma unroll
    for (int r = 0; r < SKN_R; r++) arow[r] = a + min(i0 + r, m - 1) * lda;
    for (u64 p0 = (u64)lane * V; p0 < k; p0 += 32 * V * SKN_U) {
        // The step's SKN_U x SKN_R loads of A first (in flight together), then the products.
        Vec<V, A> av[SKN_U][SKN_R];
#pragma unroll
        for (int u = 0; u < SKN_U; u++) {
            const u64 p = p0 + (u64)u * 32 * V;
#pragma unroll
            for (int r = 0; r < SKN_R; r++) av[u][r] = p < k ? ldv_stream<V>(arow[r] + p) : vzero<V, A>();
        }
#pragma unroll
        for (int u = 0; u < SKN_U; u++) {
            const u64 p = p0 + (u64)u * 32 * V;
            if (p < k) {
                float x[SKN_R][V];
#pragma unroll
                for (int r = 0; r < SKN_R; r++)
#pragma unroll
                    for (int v = 0; v < V; v++) x[r][v] = av[u][r].at(v);
#pragma unroll
                for (int j = 0; j < SK_MAX; j++) {
                    if (j < n) {
                        float y[V];
                        if (V > 1 || trans_b) {
                            const Vec<V, A> bv = ldv<V>(b + j * ldb + p);
#pragma unroll
                            for (int v = 0; v < V; v++) y[v] = bv.at(v);
                        } else {
                            y[0] = ld(b, p * ldb + j);
                        }
#pragma unroll
                        for (int r = 0; r < SKN_R; r++)
#pragma unroll
                            for (int v = 0; v < V; v++) acc[r][j] = fmaf(x[r][v], y[v], acc[r][j]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < SKN_R; r++) {
#pragma unroll
        for (int j = 0; j < SK_MAX; j++) red[j * 33 + lane] = acc[r][j];
        __syncwarp();
        if (lane < SK_MAX) {
            float s = 0.0f;
#pragma unroll 8
            for (int t = 0; t < 32; t++) s += red[lane * 33 + t];
            sums[r * SK_MAX + lane] = s;
        }
        __syncwarp();
    }
}

template <int V, typename A, typename C>
__device__ void skinny_n_impl(const A* a, const A* b, C* c, u64 m, u64 n, u64 k, u64 lda, u64 ldb, u64 ldc,
                              int trans_b, float alpha, float beta) {
    __shared__ float red[4][SK_MAX * 33];
    __shared__ float sums[4][SKN_OUT];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const u64 groups = (m + SKN_R - 1) / SKN_R;
    for (u64 grp = (u64)blockIdx.x * 4 + w; grp < groups; grp += (u64)gridDim.x * 4) {
        const u64 i0 = grp * SKN_R;
        skinny_n_rows<V, A>(a, b, m, n, k, lda, ldb, trans_b, i0, red[w], sums[w]);
        __syncwarp();
        for (int o = lane; o < SKN_OUT; o += 32) {
            const u64 i = i0 + o / SK_MAX, j = o % SK_MAX;
            if (j < n && i < m) {
                const float s = sums[w][o];
                const u64 ci = i * ldc + j;
                st(c, ci, beta == 0.0f ? alpha * s : alpha * s + beta * ld(c, ci));
            }
        }
        __syncwarp();
    }
}

// ---- small m: partial[s, m, n] = sum over split s's rows p of op(A)[i, p] op(B)[p, j] ----
// V = 4 needs !trans_b, n and ldb multiples of 4 and B aligned to 4 elements (8 bytes for 16-bit types: 4
// columns per thread keep the m x V accumulators at 64 registers, two blocks per multiprocessor); V = 1 takes
// any op(B). Block of SKM_W warps = 256 threads over 32 V columns (blockIdx.x); blockIdx.y: the split, rows
// [s * per_split, min((s + 1) * per_split, k)). op(A)'s rows of the split are staged in shared memory as f32,
// SKM_TP at a time, padded with zeros to SK_MAX.
#define SKM_W 8
#define SKM_TP 128
#define SKM_U 8  // rows of B per thread in flight

template <int V, typename A>
__device__ void skinny_m_part_impl(const A* __restrict__ a, const A* __restrict__ b, float* partial, u64 m, u64 n,
                                   u64 k, u64 lda, u64 ldb, int trans_a, int trans_b, u64 per_split) {
    __shared__ __align__(16) float ash[SKM_TP][SK_MAX];
    __shared__ float red[SKM_W][4][32 * V];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const u64 j0 = ((u64)blockIdx.x * 32 + lane) * V;
    const bool col_ok = j0 < n;
    const u64 p_begin = (u64)blockIdx.y * per_split;
    const u64 p_end = min(p_begin + per_split, k);
    float acc[SK_MAX][V];
#pragma unroll
    for (int i = 0; i < SK_MAX; i++)
#pragma unroll
        for (int v = 0; v < V; v++) acc[i][v] = 0.0f;
    for (u64 t0 = p_begin; t0 < p_end; t0 += SKM_TP) {
        const int tn = (int)min((u64)SKM_TP, p_end - t0);
        __syncthreads();  // the previous tile's readers are done
        // Blocks of 256 threads: a fixed trip count, so the tile's loads are all in flight together.
#pragma unroll
        for (int it = 0; it < SKM_TP * SK_MAX / 256; it++) {
            const int e = threadIdx.x + it * 256;
            const int pp = e / SK_MAX, i = e % SK_MAX;
            const u64 p = t0 + pp;
            ash[pp][i] = (pp < tn && (u64)i < m) ? ld(a, trans_a ? p * lda + i : (u64)i * lda + p) : 0.0f;
        }
        __syncthreads();
        if (col_ok) {
            for (int q = w; q < tn; q += SKM_W * SKM_U) {
                Vec<V, A> bv[SKM_U];
#pragma unroll
                for (int u = 0; u < SKM_U; u++) {
                    const int pp = q + u * SKM_W;
                    if (pp < tn) {
                        const u64 p = t0 + pp;
                        if (V > 1 || !trans_b) {
                            bv[u] = ldv_stream<V>(b + p * ldb + j0);
                        } else {
                            bv[u] = vzero<V, A>();
                            bv[u].set(0, ld(b, j0 * ldb + p));
                        }
                    }
                }
#pragma unroll
                for (int u = 0; u < SKM_U; u++) {
                    const int pp = q + u * SKM_W;
                    if (pp < tn) {
                        float y[V];
#pragma unroll
                        for (int v = 0; v < V; v++) y[v] = bv[u].at(v);
                        const float4* row = reinterpret_cast<const float4*>(ash[pp]);
#pragma unroll
                        for (int i4 = 0; i4 < SK_MAX / 4; i4++) {
                            if ((u64)(4 * i4) < m) {
                                const float4 x = row[i4];
                                const float xs[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
                                for (int ii = 0; ii < 4; ii++)
#pragma unroll
                                    for (int v = 0; v < V; v++)
                                        acc[4 * i4 + ii][v] = fmaf(xs[ii], y[v], acc[4 * i4 + ii][v]);
                            }
                        }
                    }
                }
            }
        }
    }
    // The 8 warps' sums, added in warp order, four rows of C at a time.
#pragma unroll
    for (int r0 = 0; r0 < SK_MAX; r0 += 4) {
        if ((u64)r0 < m) {
            __syncthreads();
#pragma unroll
            for (int rr = 0; rr < 4; rr++)
#pragma unroll
                for (int v = 0; v < V; v++) red[w][rr][lane * V + v] = acc[r0 + rr][v];
            __syncthreads();
            for (int o = threadIdx.x; o < 4 * 32 * V; o += blockDim.x) {
                const int rr = o / (32 * V), col = o % (32 * V);
                const u64 i = r0 + rr, j = (u64)blockIdx.x * 32 * V + col;
                if (i < m && j < n) {
                    float s = 0.0f;
#pragma unroll
                    for (int ww = 0; ww < SKM_W; ww++) s += red[ww][rr][col];
                    partial[((u64)blockIdx.y * m + i) * n + j] = s;
                }
            }
        }
    }
}

// C[i, j] = alpha * (sum over splits of partial[s, i, j], in split order) + beta * C[i, j].
template <typename C>
__device__ void skinny_m_finish_impl(const float* partial, C* c, u64 m, u64 n, u64 ldc, u64 splits, float alpha,
                                     float beta) {
    const u64 mn = m * n;
    for (u64 idx = gtid(); idx < mn; idx += gstride()) {
        float s = 0.0f;
        for (u64 t = 0; t < splits; t++) s += partial[t * mn + idx];
        const u64 ci = (idx / n) * ldc + idx % n;
        st(c, ci, beta == 0.0f ? alpha * s : alpha * s + beta * ld(c, ci));
    }
}

// ---- small k: C[m, n] = alpha op(A)[m, k] op(B)[k, n] + beta C, or the fused input gradient ----
// Thread (blockIdx.x, threadIdx.x) owns columns V g .. V g + V - 1; blockIdx.y walks groups of SKK_R rows
// (grid-stride). op(A)'s k values of a row are the same for every thread of the row (broadcast loads); op(B)'s
// k rows of the thread's columns come from L1. V = 8 needs !trans_b, n, ldb, ldc multiples of 8 and B, C (and
// pre) 16-byte aligned. act >= 0 (alpha 1, beta 0): C = round_C(A B) * act'(pre), pre with C's layout.
#define SKK_R 4

template <int V, typename A, typename C>
__device__ void skinny_k_impl(const A* __restrict__ a, const A* __restrict__ b, C* c, const C* __restrict__ pre,
                              u64 m, u64 n, u64 k, u64 lda, u64 ldb, u64 ldc, int trans_a, int trans_b, float alpha,
                              float beta, int act) {
    const u64 j0 = ((u64)blockIdx.x * blockDim.x + threadIdx.x) * V;
    if (j0 >= n) return;
    const u64 groups = (m + SKK_R - 1) / SKK_R;
    for (u64 grp = blockIdx.y; grp < groups; grp += gridDim.y) {
        const u64 i0 = grp * SKK_R;
        // The pre-activations first: their loads are in flight during the products.
        Vec<V, C> pv[SKK_R];
        if (act >= 0) {
#pragma unroll
            for (int r = 0; r < SKK_R; r++)
                pv[r] = i0 + r < m ? ldv_stream<V>(pre + (i0 + r) * ldc + j0) : vzero<V, C>();
        }
        // op(A)[i, p] = arow[r][p * astep]; rows past m read row m - 1 (valid memory; never stored).
        const A* arow[SKK_R];
        const u64 astep = trans_a ? lda : 1;
#pragma unroll
        for (int r = 0; r < SKK_R; r++) {
            const u64 i = min(i0 + r, m - 1);
            arow[r] = a + (trans_a ? i : i * lda);
        }
        float acc[SKK_R][V];
#pragma unroll
        for (int r = 0; r < SKK_R; r++)
#pragma unroll
            for (int v = 0; v < V; v++) acc[r][v] = 0.0f;
#pragma unroll 2
        for (u64 p = 0; p < k; p++) {
            float y[V];
            if (V > 1 || !trans_b) {
                const Vec<V, A> bv = ldv<V>(b + p * ldb + j0);
#pragma unroll
                for (int v = 0; v < V; v++) y[v] = bv.at(v);
            } else {
                y[0] = ld(b, j0 * ldb + p);
            }
            const u64 ap = p * astep;
#pragma unroll
            for (int r = 0; r < SKK_R; r++) {
                const float x = ld(arow[r], ap);
#pragma unroll
                for (int v = 0; v < V; v++) acc[r][v] = fmaf(x, y[v], acc[r][v]);
            }
        }
#pragma unroll
        for (int r = 0; r < SKK_R; r++) {
            const u64 i = i0 + r;
            if (i < m) {
                const u64 ci = i * ldc + j0;
                Vec<V, C> out;
                if (act >= 0) {
                    // As `gemm` (C = round(alpha sum)) then `activation_backward` (dx = dy * act'(x), rounded).
#pragma unroll
                    for (int v = 0; v < V; v++)
                        out.set(v, rnd((const C*)0, alpha * acc[r][v]) * act_derivative(act, pv[r].at(v)));
                } else if (beta == 0.0f) {
#pragma unroll
                    for (int v = 0; v < V; v++) out.set(v, alpha * acc[r][v]);
                } else {
                    const Vec<V, C> old = ldv<V>(c + ci);
#pragma unroll
                    for (int v = 0; v < V; v++) out.set(v, alpha * acc[r][v] + beta * old.at(v));
                }
                stv<V>(c + ci, out);
            }
        }
    }
}

// (A, C) pairs: A in {f32, f16, bf16}, C in {A's dtype, f32}.
#define FOR_SKINNY_PAIR(X)                                                                                   \
    X(f32, float, f32, float)                                                                                \
    X(f16, f16, f16, f16)                                                                                    \
    X(f16, f16, f32, float)                                                                                  \
    X(bf16, bf16, bf16, bf16)                                                                                \
    X(bf16, bf16, f32, float)

#define SKINNY(an, A, cn, C)                                                                                 \
    extern "C" __global__ void __launch_bounds__(128) skinny_n_##an##_##cn(                                  \
        const A* a, const A* b, C* c, u64 m, u64 n, u64 k, u64 lda, u64 ldb, u64 ldc, int trans_b, float alpha, \
        float beta) {                                                                                        \
        PDL_ENTRY();                                                                                         \
        skinny_n_impl<1>(a, b, c, m, n, k, lda, ldb, ldc, trans_b, alpha, beta);                             \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(128) skinny_n8_##an##_##cn(                                 \
        const A* a, const A* b, C* c, u64 m, u64 n, u64 k, u64 lda, u64 ldb, u64 ldc, int trans_b, float alpha, \
        float beta) {                                                                                        \
        PDL_ENTRY();                                                                                         \
        skinny_n_impl<8>(a, b, c, m, n, k, lda, ldb, ldc, trans_b, alpha, beta);                             \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(128) skinny_k_##an##_##cn(                                  \
        const A* a, const A* b, C* c, const C* pre, u64 m, u64 n, u64 k, u64 lda, u64 ldb, u64 ldc,          \
        int trans_a, int trans_b, float alpha, float beta, int act) {                                        \
        PDL_ENTRY();                                                                                         \
        skinny_k_impl<1>(a, b, c, pre, m, n, k, lda, ldb, ldc, trans_a, trans_b, alpha, beta, act);          \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(128) skinny_k8_##an##_##cn(                                 \
        const A* a, const A* b, C* c, const C* pre, u64 m, u64 n, u64 k, u64 lda, u64 ldb, u64 ldc,          \
        int trans_a, int trans_b, float alpha, float beta, int act) {                                        \
        PDL_ENTRY();                                                                                         \
        skinny_k_impl<8>(a, b, c, pre, m, n, k, lda, ldb, ldc, trans_a, trans_b, alpha, beta, act);          \
    }
FOR_SKINNY_PAIR(SKINNY)

#define SKINNY_M(tn, T)                                                                                      \
    extern "C" __global__ void __launch_bounds__(256, 2) skinny_m_part_##tn(                                 \
        const T* a, const T* b, float* partial, u64 m, u64 n, u64 k, u64 lda, u64 ldb, int trans_a,          \
        int trans_b, u64 per_split) {                                                                        \
        PDL_ENTRY();                                                                                         \
        skinny_m_part_impl<1>(a, b, partial, m, n, k, lda, ldb, trans_a, trans_b, per_split);                \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(256, 2) skinny_m_part4_##tn(                                \
        const T* a, const T* b, float* partial, u64 m, u64 n, u64 k, u64 lda, u64 ldb, int trans_a,          \
        int trans_b, u64 per_split) {                                                                        \
        PDL_ENTRY();                                                                                         \
        skinny_m_part_impl<4>(a, b, partial, m, n, k, lda, ldb, trans_a, trans_b, per_split);                \
    }                                                                                                        \
    extern "C" __global__ void skinny_m_finish_##tn(const float* partial, T* c, u64 m, u64 n, u64 ldc,       \
                                                    u64 splits, float alpha, float beta) {                   \
        PDL_ENTRY();                                                                                         \
        skinny_m_finish_impl(partial, c, m, n, ldc, splits, alpha, beta);                                    \
    }
FOR_FLOAT(SKINNY_M)
