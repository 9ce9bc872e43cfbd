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
    float xf[V], df[V];
    widen<V>(x.v, xf);
    widen<V>(d.v, df);
#pragma unroll
    for (int k = 0; k < V; k++) df[k] *= act_derivative(act, xf[k]);
    narrow<V>(df, d.v);
    widen<V>(d.v, df);
#pragma unroll
    for (int k = 0; k < V; k++) acc[k] += df[k];
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

// dbias[c] = sum over splits of partial[s, c] for c < cc (dbias already offset to the chunk): common.cuh's
// split_sum_impl with one row (a grid of height 1), coalesced over 32 columns a block.

#define ACT_GRAD(tn, T)                                                                                      \
    extern "C" __global__ void __launch_bounds__(32 * AG_BY)                                                 \
        act_grad_bias16_##tn(int act, const T* pre, T* dy, float* partial, u64 m, u64 n, u64 c0, u64 cc,     \
                             u64 rows_per_split) {                                                           \
        PDL_ENTRY();                                                                                         \
        act_grad_bias16_impl(act, pre, dy, partial, m, n, c0, cc, rows_per_split);                           \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * AG_BY)                                                 \
        act_grad_bias_##tn(int act, const T* pre, T* dy, float* partial, u64 m, u64 n, u64 c0, u64 cc,       \
                           u64 rows_per_split) {                                                             \
        PDL_ENTRY();                                                                                         \
        act_grad_bias_impl(act, pre, dy, partial, m, n, c0, cc, rows_per_split);                             \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * AG_BY)                                                 \
        act_grad_finish_##tn(const float* partial, T* dbias, u64 cc, u64 splits) {                           \
        PDL_ENTRY();                                                                                         \
        split_sum_impl<AG_BY>(partial, cc, dbias, 0, cc, splits, 0);                                          \
    }
FOR_FLOAT(ACT_GRAD)

// ---- act_grad_small_k: the small-k product fused in, dx = act_grad(c = round_T(A B)) ----
//
// act_grad_small_k{K}_{T}: for row-major A [m, k] (leading dimension lda) and B [k, n] (ldb), all of storage
// type T, and 1 <= k <= K (the host picks the smallest K >= k of 4, 8, 10, 12, 16: 10 for the classifier layers
// of 10 classes, the case this is for; a finer set would cost NVRTC time at start-up for little):
//   c[i, j]  = round_T(sum_{p < k} A[i, p] B[p, j]): f32 accumulation from +0, p ascending, one fmaf per term
//              (fused multiply-add, one rounding per term; --fmad=false only stops the compiler contracting
//              a * b + c on its own, explicit fmaf is kept);
//   dx[i, j] = st(rnd_T(c) * act_derivative(act, ld(pre)))   (ag_group's expression, dy being the stored c);
//   partial[split, j] = column sums of dx as stored (widened to f32), as act_grad_bias16 writes them, for the
//              same act_grad_finish pass; partial == 0 (no dbias): nothing is written there.
// So dx equals "C = A B rounded to T, then act_grad_bias" bit for bit wherever that C equals this one.
//
// Layout: block (32, AG_BY); blockIdx.x picks 32 SK_V columns of the chunk [c0, c0 + cc) (SK_V = 4 a thread:
// one 8-byte load / store for 16-bit T, 16-byte for f32; the host needs n and ldb multiples of 4 and pre, dx and
// B aligned to 4 elements), blockIdx.y a split of rows_per_split rows. Each thread keeps its K x 4 slice of B in
// registers as f32 (zero past k). Thread row y walks the split's rows y, y + AG_BY, ... in order, SK_U at a time
// (32 bytes of pre a thread in flight: 4 rows for 16-bit T, 2 for f32). Every SK_ROWS of its rows the warp
// stages their A values as f32 in its own slice of shared memory (rows padded to KP, a multiple of 4, with
// zeros past k; KP / 4 values a lane), between two __syncwarp (no block-wide barrier in the loop); every lane
// then reads a row with KP / 4 16-byte broadcast loads.
// With k < K the terms past k are fmaf(0, 0, acc): acc is never -0 (it starts at +0 and, rounding to nearest, a
// sum is -0 only when both terms are), so adding +0 leaves it as it is (infinities and NaN included).
// Lanes past the chunk's last column work on a clamped (valid) column and store nothing.
//
// The host refuses any overlap of dx with A, B or pre (all read-only here).

#define SK_V 4
#define SK_ROWS 8

// SK_V consecutive elements of T as raw words (one 8- or 16-byte access), widened with common.cuh's ld.
template <typename T>
struct SkIo {  // f16, bf16
    typedef uint2 R;
    static __device__ __forceinline__ float get(const R& r, int i) {
        const unsigned w = i < 2 ? r.x : r.y;
        T h;
        h.bits = (unsigned short)((i & 1) ? (w >> 16) : (w & 0xffffu));
        return ld(&h, 0);
    }
    static __device__ __forceinline__ R pack(const T (&d)[SK_V]) {
        return make_uint2((unsigned)d[0].bits | ((unsigned)d[1].bits << 16),
                          (unsigned)d[2].bits | ((unsigned)d[3].bits << 16));
    }
};
template <>
struct SkIo<float> {
    typedef uint4 R;
    static __device__ __forceinline__ float get(const R& r, int i) {
        return __uint_as_float(i == 0 ? r.x : i == 1 ? r.y : i == 2 ? r.z : r.w);
    }
    static __device__ __forceinline__ R pack(const float (&d)[SK_V]) {
        return make_uint4(__float_as_uint(d[0]), __float_as_uint(d[1]), __float_as_uint(d[2]),
                          __float_as_uint(d[3]));
    }
};

// Rows a thread row handles per inner iteration: 32 bytes of pre in flight a thread.
#define SK_U(T) (32 / (SK_V * (int)sizeof(T)))

// The row loop of one thread for a compile-time activation. sa: this warp's staging area [SK_ROWS][KP] f32.
// r: the thread's first row (< r1 or the loop does nothing); c: its first column (valid, clamped).
template <typename T, int K, int ACT>
__device__ __forceinline__ void act_grad_small_k_rows(const T* __restrict__ a, u64 lda, u64 k,
                                                      const T* __restrict__ pre, T* __restrict__ dx, u64 n, u64 c,
                                                      bool colok, u64 r, u64 r1, const float (&bv)[K][SK_V],
                                                      float* sa, float* acc) {
    typedef SkIo<T> Io;
    typedef typename Io::R R;
    constexpr int U = SK_U(T);
    constexpr int KP = (K + 3) / 4 * 4;
    constexpr int SPL = SK_ROWS * KP / 32;  // staged values a lane (KP / 4)
    const unsigned lane = threadIdx.x;
    // Staging slot t of this lane: value e = lane + 32 t of the SK_ROWS x KP block, i.e. A[r + AG_BY su, sp]
    // (fixed per lane; the row advances with r).
    int su[SPL];
    bool pok[SPL];
    u64 aidx[SPL];
#pragma unroll
    for (int t = 0; t < SPL; t++) {
        const int e = (int)lane + 32 * t;
        su[t] = e / KP;
        const int sp = e % KP;
        pok[t] = (u64)sp < k;
        aidx[t] = (r + (u64)AG_BY * su[t]) * lda + sp;
    }
    const u64 astep = (u64)AG_BY * SK_ROWS * lda;
    const u64 rs = (u64)AG_BY * n;  // elements from one of the thread's rows to the next
    u64 off = r * n + c;
    for (; r < r1; r += AG_BY * SK_ROWS, off += SK_ROWS * rs) {
        // Rows of the split from r on, capped: the thread's row r + AG_BY j is in the split iff AG_BY j < left.
        const int left = (int)min(r1 - r, (u64)(AG_BY * SK_ROWS));
        __syncwarp();  // every lane is done reading the previous block of rows
#pragma unroll
        for (int t = 0; t < SPL; t++) {
            const bool ok = pok[t] && AG_BY * su[t] < left;
            const float x = ld(a, ok ? aidx[t] : 0);  // a[0] exists (m, k >= 1): a load that never faults
            sa[lane + 32 * t] = ok ? x : 0.0f;
            aidx[t] += astep;
        }
        __syncwarp();
#pragma unroll 1
        for (int s = 0; s < SK_ROWS && AG_BY * s < left; s += U) {
            // The pre-activations of the U rows first: their loads are in flight during the products.
            R pv[U];
#pragma unroll
            for (int u = 0; u < U; u++) {
                pv[u] = R();
                if (AG_BY * (s + u) < left) pv[u] = *reinterpret_cast<const R*>(pre + off + (u64)(s + u) * rs);
            }
#pragma unroll
            for (int u = 0; u < U; u++) {
                float cv[SK_V];
#pragma unroll
                for (int v = 0; v < SK_V; v++) cv[v] = 0.0f;
                const float4* arow = reinterpret_cast<const float4*>(sa + (s + u) * KP);
#pragma unroll
                for (int g = 0; g < KP / 4; g++) {
                    const float4 q = arow[g];  // the same address in every lane: a broadcast
                    const float av[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
                    for (int i = 0; i < 4 && 4 * g + i < K; i++) {
#pragma unroll
                        for (int v = 0; v < SK_V; v++) cv[v] = fmaf(av[i], bv[4 * g + i][v], cv[v]);
                    }
                }
                // ag_group's expression, dy being c as stored in T (rnd: the round trip through T).
                T d[SK_V];
#pragma unroll
                for (int v = 0; v < SK_V; v++)
                    st(d, v, rnd((const T*)0, cv[v]) * act_derivative(ACT, Io::get(pv[u], v)));
                if (colok && AG_BY * (s + u) < left) {
                    *reinterpret_cast<R*>(dx + off + (u64)(s + u) * rs) = Io::pack(d);
#pragma unroll
                    for (int v = 0; v < SK_V; v++) acc[v] += ld(d, v);
                }
            }
        }
    }
}

template <typename T, int K>
__device__ void act_grad_small_k_impl(int act, const T* __restrict__ a, u64 lda, const T* __restrict__ b, u64 ldb,
                                      u64 k, const T* pre, T* dx, float* partial, u64 m, u64 n, u64 c0, u64 cc,
                                      u64 rows_per_split) {
    constexpr int KP = (K + 3) / 4 * 4;
    __shared__ __align__(16) float sa[AG_BY][SK_ROWS * KP];
    __shared__ float sh[AG_BY][SK_V][33];
    const u64 col = (u64)blockIdx.x * (32 * SK_V) + (u64)threadIdx.x * SK_V;  // in the chunk
    const bool colok = col < cc;                                                // cc is a multiple of SK_V
    const u64 c = c0 + (colok ? col : cc - SK_V);
    const u64 r0 = (u64)blockIdx.y * rows_per_split;
    const u64 r1 = min(r0 + rows_per_split, m);
    // This thread's columns of B, rows 0..K-1, as f32 (zero past k).
    float bv[K][SK_V];
#pragma unroll
    for (int p = 0; p < K; p++) {
        typename SkIo<T>::R q = typename SkIo<T>::R();
        if ((u64)p < k) q = *reinterpret_cast<const typename SkIo<T>::R*>(b + (u64)p * ldb + c);
#pragma unroll
        for (int v = 0; v < SK_V; v++) bv[p][v] = SkIo<T>::get(q, v);
    }
    float acc[SK_V];
#pragma unroll
    for (int v = 0; v < SK_V; v++) acc[v] = 0.0f;
    const u64 r = r0 + threadIdx.y;
    if (act == ACT_RELU) {
        act_grad_small_k_rows<T, K, ACT_RELU>(a, lda, k, pre, dx, n, c, colok, r, r1, bv, sa[threadIdx.y], acc);
    } else {
        act_grad_small_k_rows<T, K, ACT_GELU_TANH>(a, lda, k, pre, dx, n, c, colok, r, r1, bv, sa[threadIdx.y],
                                                   acc);
    }
    if (partial == 0) return;  // no dbias (the same for the whole grid)
    // As act_grad_bias16_impl with V = SK_V: the thread rows meet in shared memory, in order.
#pragma unroll
    for (int v = 0; v < SK_V; v++) sh[threadIdx.y][v][threadIdx.x] = acc[v];
    __syncthreads();
    const unsigned j = threadIdx.y * 32 + threadIdx.x;
    const u64 cj = (u64)blockIdx.x * (32 * SK_V) + j;
    if (j < 32 * SK_V && cj < cc) {
        const unsigned lane = j / SK_V, v = j % SK_V;
        float s = 0.0f;
#pragma unroll
        for (int t = 0; t < AG_BY; t++) s += sh[t][v][lane];
        partial[(u64)blockIdx.y * cc + cj] = s;
    }
}

#define ACT_GRAD_SMALL_K_ONE(tn, T, K, MINB)                                                                 \
    extern "C" __global__ void __launch_bounds__(32 * AG_BY, MINB) act_grad_small_k##K##_##tn(                \
        int act, const T* a, u64 lda, const T* b, u64 ldb, u64 k, const T* pre, T* dx, float* partial, u64 m, \
        u64 n, u64 c0, u64 cc, u64 rows_per_split) {                                                         \
        PDL_ENTRY();                                                                                         \
        act_grad_small_k_impl<T, K>(act, a, lda, b, ldb, k, pre, dx, partial, m, n, c0, cc, rows_per_split); \
    }
#define ACT_GRAD_SMALL_K(tn, T)        \
    ACT_GRAD_SMALL_K_ONE(tn, T, 4, 2)  \
    ACT_GRAD_SMALL_K_ONE(tn, T, 8, 2)  \
    ACT_GRAD_SMALL_K_ONE(tn, T, 10, 2) \
    ACT_GRAD_SMALL_K_ONE(tn, T, 12, 2) \
    ACT_GRAD_SMALL_K_ONE(tn, T, 16, 2)
FOR_FLOAT(ACT_GRAD_SMALL_K)
