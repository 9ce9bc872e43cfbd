// A classifier layer's forward and backward through the activation before it, each in one pass over the
// activation's input: `logits = act(pre) W^T + b` for a layer of few outputs (o <= 16), which on the GPU is
// otherwise the previous GEMM's GELU epilogue storing act(pre), cuBLAS and add_bias forward, and three
// memory-bound passes over [rows, i] backward (cuBLAS's dW = dy^T x reading x, then the small-k product
// dx = dy W with the activation backward reading pre and writing dx; each far from the bandwidth bound at
// o = 10). Kernels: head_fwd* (f32) and head_bwd* (f32, and 16-bit rows that are not whole 16-byte groups)
// on CUDA cores, head_fwd_mma / head_bwd_mma on tensor cores (bf16, f16), head_finish for the partial sums.
//
// head_bwd{NP}_{T}, for dy [m, o], W [o, n] (row-major, the layer's weight [O, I]), pre [m, n], all of storage
// type T, o <= NP (the host picks the smallest NP >= o of 4, 10, 16):
//   h[r, c]    = round_T(act(pre[r, c]))             (the layer's input as the forward pass stored it; GELU: for
//                f32, with the tanh argument GELU_S (x + GELU_C x^2 x), which can differ from act_forward's by
//                an ulp; for 16-bit T, with the hardware tanh, see act_both)
//   g[r, c]    = round_T(sum_{p < o} dy[r, p] W[p, c])   (f32 from +0, p ascending, one fmaf a term)
//   dx[r, c]   = st(g * act'(pre[r, c]))            (f32: ag_group's expression with act_both's act', dy being g)
//   partial[split, p, c]  = sum over the split's rows of dy[r, p] * h[r, c] (f32, fmaf), p < o: dW's rows
//   partial[split, o, c]  = sum over the split's rows of dx[r, c] as stored: the previous layer's bias gradient
// and head_finish adds the splits in order (no atomics: the result depends only on the launch shape).
//
// Layout: block (32, HB_BY); blockIdx.x picks 64 columns of the chunk [c0, c0 + cc) (2 a thread: one 4-byte
// load / store for 16-bit T, 8-byte for f32; the host needs n even and pre, dx and W aligned to 2 elements),
// blockIdx.y a split of rows_per_split <= HB_SPLIT_MAX rows, whose dy rows the block stages in shared memory
// as f32 (rows padded to NPP, a multiple of 4, zeros past o) before the row loop. Each thread keeps its two
// columns of W (NP x 2, zero past o) and its sums (NP x 2 for dW, 2 for the bias) in registers. Thread row y
// walks the split's rows y, y + HB_BY, ... in order, HB_U at a time (all their loads issued before any
// arithmetic, no branch between them). Lanes past the chunk's last column work on a clamped (valid) column and store nothing.
//
// NaN in, NaN out, but the kernels do not keep NaN payloads (ld_fast, rnd_fast).
//
// The host refuses any overlap of dx with dy, W or pre.

#define HB_BY 8
#define HB_U 4
#define HB_SPLIT_MAX 256

// Loads that widen without common.cuh's NaN payload handling (f16: one cvt; a NaN stays a NaN, its payload
// becomes the canonical one): for values the kernels only compute with. bf16 and f32 widen exactly either way.
__device__ __forceinline__ float ld_fast(const float* p, u64 i) { return p[i]; }
__device__ __forceinline__ float ld_fast(const bf16* p, u64 i) { return ld(p, i); }
__device__ __forceinline__ float ld_fast(const f16* p, u64 i) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(p[i].bits));
    return f;
}

// Two consecutive elements of T as one raw word (4 bytes for 16-bit T, 8 for f32).
template <typename T>
struct HbIo {  // f16, bf16
    typedef unsigned R;
    static __device__ __forceinline__ float get(R r, int i) {
        T h;
        h.bits = (unsigned short)(i ? (r >> 16) : (r & 0xffffu));
        return ld_fast(&h, 0);
    }
    static __device__ __forceinline__ R pack(const T (&d)[2]) { return (unsigned)d[0].bits | ((unsigned)d[1].bits << 16); }
};
template <>
struct HbIo<float> {
    typedef float2 R;
    static __device__ __forceinline__ float get(R r, int i) { return i ? r.y : r.x; }
    static __device__ __forceinline__ R pack(const float (&d)[2]) { return make_float2(d[0], d[1]); }
};

// act(x) and act'(x) for storage type T. f32: the reference's tanh-form expressions with one tanhf (see the file
// comment; common.cuh's act_derivative takes the sigmoid form instead, within the tests' tolerances of both).
// 16-bit T: GELU with the hardware tanh (tanh.approx.f32, relative error at most 2^-10.99) and fused
// multiply-adds, about a tenth of the instructions of tanhf and the IEEE expression; its error is below one
// rounding of bf16 (2^-9) and about one of f16 (2^-11), where the result is rounded to anyway. ReLU is exact.
template <typename T, int ACT>
__device__ __forceinline__ void act_both(float x, float& y, float& d) {
    if (ACT == ACT_RELU) {
        y = act_forward(ACT_RELU, x);
        d = act_derivative(ACT_RELU, x);
    } else if (sizeof(T) == 4) {
        const float x2 = x * x;
        const float u = GELU_S * (x + GELU_C * x2 * x);
        const float t = tanhf(u);
        y = 0.5f * x * (1.0f + t);
        d = 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * GELU_S * (1.0f + 3.0f * GELU_C * x2);
    } else {
        const float x2 = x * x;
        const float u = GELU_S * fmaf(GELU_C * x2, x, x);
        float t;
        asm("tanh.approx.f32 %0, %1;" : "=f"(t) : "f"(u));
        const float hx = 0.5f * x;
        y = fmaf(hx, t, hx);
        const float p = GELU_S * fmaf(3.0f * GELU_C, x2, 1.0f);
        d = fmaf(hx * fmaf(-t, t, 1.0f), p, fmaf(0.5f, t, 0.5f));
    }
}

// v rounded to T and widened back, without the NaN payload handling of common.cuh's rnd (a NaN stays a NaN):
// for values the kernel only computes with.
__device__ __forceinline__ float rnd_fast(const float*, float v) { return v; }
__device__ __forceinline__ float rnd_fast(const bf16*, float v) {
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return __uint_as_float(((unsigned)h) << 16);
}
__device__ __forceinline__ float rnd_fast(const f16*, float v) {
    unsigned short h;
    float f;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// One row of one thread: its two elements of pre (raw word pv) with the row's dy (f32, NPP values in shared
// memory), dx stored at dst when colok; the sums updated.
template <typename T, int NP, int ACT>
__device__ __forceinline__ void head_bwd_row(typename HbIo<T>::R pv, const float* dyrow, T* dst, bool colok,
                                             const float (&wv)[NP][2], float (&aw)[NP][2], float (&ab)[2]) {
    typedef HbIo<T> Io;
    constexpr int NPP = (NP + 3) / 4 * 4;
    float dl[NPP];
    const float4* row = reinterpret_cast<const float4*>(dyrow);
#pragma unroll
    for (int q = 0; q < NPP / 4; q++) {
        const float4 v = row[q];  // the same address in every lane of the warp: a broadcast
        dl[4 * q] = v.x;
        dl[4 * q + 1] = v.y;
        dl[4 * q + 2] = v.z;
        dl[4 * q + 3] = v.w;
    }
    T d[2];
#pragma unroll
    for (int v = 0; v < 2; v++) {
        float h, da;
        act_both<T, ACT>(Io::get(pv, v), h, da);
        h = rnd_fast((const T*)0, h);
        float g = 0.0f;
#pragma unroll
        for (int p = 0; p < NP; p++) g = fmaf(dl[p], wv[p][v], g);
        st(d, v, rnd_fast((const T*)0, g) * da);
        ab[v] += ld_fast(d, v);
#pragma unroll
        for (int p = 0; p < NP; p++) aw[p][v] = fmaf(dl[p], h, aw[p][v]);
    }
    if (colok) *reinterpret_cast<typename Io::R*>(dst) = Io::pack(d);
}

// The row loop of one thread for a compile-time activation: whole groups of HB_U rows, the next group's loads
// in flight while this one computes (and no branch between a group's rows, so their independent chains
// interleave), then the rest one at a time. sdy: the split's dy rows, [rows][NPP] f32, from the split's first
// row r0; r: the thread's first row; off: its first element (r * n + c).
template <typename T, int NP, int ACT>
__device__ __forceinline__ void head_bwd_rows(const T* __restrict__ pre, T* __restrict__ dx, u64 n, bool colok,
                                              u64 r0, u64 r, u64 r1, u64 off, const float* sdy,
                                              const float (&wv)[NP][2], float (&aw)[NP][2], float (&ab)[2]) {
    typedef typename HbIo<T>::R R;
    constexpr int NPP = (NP + 3) / 4 * 4;
    const u64 rs = (u64)HB_BY * n;  // elements from one of the thread's rows to the next
    const u64 mine = r < r1 ? (r1 - r - 1) / HB_BY + 1 : 0;
    const u64 groups = mine / HB_U;
    if (groups > 0) {
        R cur[HB_U];
#pragma unroll
        for (int u = 0; u < HB_U; u++) cur[u] = *reinterpret_cast<const R*>(pre + off + u * rs);
#pragma unroll 1
        for (u64 j = 1; j <= groups; j++) {
            R nxt[HB_U];
            if (j < groups) {
#pragma unroll
                for (int u = 0; u < HB_U; u++) nxt[u] = *reinterpret_cast<const R*>(pre + off + (HB_U + u) * rs);
            }
#pragma unroll
            for (int u = 0; u < HB_U; u++)
                head_bwd_row<T, NP, ACT>(cur[u], sdy + (r + (u64)HB_BY * u - r0) * NPP, dx + off + u * rs, colok,
                                         wv, aw, ab);
#pragma unroll
            for (int u = 0; u < HB_U; u++) cur[u] = nxt[u];
            r += HB_BY * HB_U;
            off += HB_U * rs;
        }
    }
#pragma unroll 1
    for (; r < r1; r += HB_BY, off += rs) {
        const R pv = *reinterpret_cast<const R*>(pre + off);
        head_bwd_row<T, NP, ACT>(pv, sdy + (r - r0) * NPP, dx + off, colok, wv, aw, ab);
    }
}

template <typename T, int NP>
__device__ void head_bwd_impl(int act, const T* __restrict__ dy, u64 o, const T* __restrict__ w,
                              const T* __restrict__ pre, T* __restrict__ dx, float* __restrict__ partial,
                              float* __restrict__ dbp, u64 m, u64 n, u64 c0, u64 cc, u64 rows_per_split) {
    constexpr int NPP = (NP + 3) / 4 * 4;
    // The split's dy rows during the row loop, then the threads' sums: [NP + 1][HB_BY][2][33] (padded: the
    // stores of a warp hit 32 banks).
    constexpr int SDY = HB_SPLIT_MAX * NPP, SH = (NP + 1) * HB_BY * 2 * 33;
    __shared__ __align__(16) float smem[SDY > SH ? SDY : SH];
    float* sdy = smem;
    const u64 r0 = (u64)blockIdx.y * rows_per_split;
    const u64 r1 = min(r0 + rows_per_split, m);
    const unsigned tid = threadIdx.y * 32 + threadIdx.x;
    {
        // Every load in flight at once (a loop of dependent-looking iterations would wait for each in turn).
        constexpr int PER = HB_SPLIT_MAX * NPP / (32 * HB_BY);
        const unsigned count = (unsigned)(r1 - r0) * NPP;
        float v[PER];
#pragma unroll
        for (int k = 0; k < PER; k++) {
            const unsigned e = tid + k * 32 * HB_BY, p = e % NPP;
            v[k] = e < count && p < o ? ld(dy, (r0 + e / NPP) * o + p) : 0.0f;
        }
#pragma unroll
        for (int k = 0; k < PER; k++) {
            const unsigned e = tid + k * 32 * HB_BY;
            if (e < count) sdy[e] = v[k];
        }
    }
    const u64 col = (u64)blockIdx.x * 64 + (u64)threadIdx.x * 2;  // in the chunk
    const bool colok = col < cc;                                  // cc is even
    const u64 c = c0 + (colok ? col : cc - 2);
    float wv[NP][2], aw[NP][2], ab[2] = {0.0f, 0.0f};
#pragma unroll
    for (int p = 0; p < NP; p++) {
        typename HbIo<T>::R q = typename HbIo<T>::R();
        if ((u64)p < o) q = *reinterpret_cast<const typename HbIo<T>::R*>(w + (u64)p * n + c);
#pragma unroll
        for (int v = 0; v < 2; v++) {
            wv[p][v] = HbIo<T>::get(q, v);
            aw[p][v] = 0.0f;
        }
    }
    __syncthreads();
    if (dbp != 0 && blockIdx.x == 0 && tid < o) {
        // This split's part of the layer's own bias gradient: the column sums of dy, rows in order.
        float s = 0.0f;
        for (u64 i = 0; i < r1 - r0; i++) s += sdy[i * NPP + tid];
        dbp[(u64)blockIdx.y * o + tid] = s;
    }
    const u64 r = r0 + threadIdx.y;
    const u64 off = r * n + c;
    if (act == ACT_RELU) {
        head_bwd_rows<T, NP, ACT_RELU>(pre, dx, n, colok, r0, r, r1, off, sdy, wv, aw, ab);
    } else {
        head_bwd_rows<T, NP, ACT_GELU_TANH>(pre, dx, n, colok, r0, r, r1, off, sdy, wv, aw, ab);
    }
    // The thread rows meet in shared memory (over the staged dy, which is no longer read): every thread stores
    // its sums, then output q = p * 64 + j (sum p: dW's row p < o, or the bias at p = o; column j of the
    // block's 64) is added up over the HB_BY thread rows, in order, by thread q % 256.
    __syncthreads();
    float(*sh)[HB_BY][2][33] = reinterpret_cast<float(*)[HB_BY][2][33]>(smem);
#pragma unroll
    for (int p = 0; p < NP; p++) {
        sh[p][threadIdx.y][0][threadIdx.x] = aw[p][0];
        sh[p][threadIdx.y][1][threadIdx.x] = aw[p][1];
    }
    sh[o][threadIdx.y][0][threadIdx.x] = ab[0];
    sh[o][threadIdx.y][1][threadIdx.x] = ab[1];
    __syncthreads();
    float* out = partial + (u64)blockIdx.y * (o + 1) * cc;
    for (unsigned q = tid; q < (o + 1) * 64; q += 32 * HB_BY) {
        const unsigned p = q / 64, j = q % 64;
        const u64 cj = (u64)blockIdx.x * 64 + j;
        if (cj < cc) {
            float s = 0.0f;
#pragma unroll
            for (int t = 0; t < HB_BY; t++) s += sh[p][t][j % 2][j / 2];
            out[(u64)p * cc + cj] = s;
        }
    }
}

// head_finish: common.cuh's split_sum_impl over the rows p < rows of the partial sums (a grid of height rows).
// head_finish3: the three finishing sums of a backward at once, for the usual case (every gradient wanted, one
// dtype): grid (column tiles, o + 1, or o + 2 with db): rows p < o sum dW's partial rows into dw + p ld, row o the
// previous layer's bias into pb (both from `partial`, as two head_finish launches would), and row o + 1 the
// layer's own bias from dbp ([splits, o], in column tile 0: o <= 16) into db. The same sums in the same order as
// the three launches, so the same bits.

// ---- head_fwd: the forward pass, y = act(pre) W^T + b, without storing act(pre) ----
//
// head_fwd{NP}_{T}, for pre [m, n], W [o, n], bias [o] and y [m, o], all of storage type T, o <= NP:
//   x[r, c] = round_T(act(pre[r, c]))                    (act_both's value, rounded as the stored x would be)
//   y[r, p] = st(round_T(sum_c x[r, c] W[p, c]) + bias[p])  (the product rounded to T, then the bias added and
//             rounded again: gemm then add_bias)
// The sums are f32 fmaf: each lane adds its columns in ascending order, then the warp's lanes meet in a fixed
// butterfly (warp_sum), so the result depends only on n.
//
// Layout: block (32, HF_BY); warp w of block b takes rows (b HF_BY + w) HF_R .. + HF_R (rows past m read row
// m - 1 and store nothing); lane l takes the V = 16 / sizeof(T) columns l V + 32 V j, j = 0, 1, ... (one 16-byte
// load of each row and of each of W's o rows a step; the host needs n a multiple of V and pre and W 16-byte
// aligned), the next step's loads of pre in flight while this one computes. Rows of W past o (up to NP) add
// fmaf(x, 0, acc) terms, which leave the sums as they are except that -0 becomes +0 (a zero sum is stored as
// +0; the bias is added after).
#define HF_BY 8
#define HF_R 2

template <typename T>
struct alignas(16) HfVec {
    T v[16 / sizeof(T)];
};

template <typename T>
__device__ __forceinline__ HfVec<T> hf_ld(const T* p) {
    HfVec<T> r;
    *reinterpret_cast<uint4*>(&r) = *reinterpret_cast<const uint4*>(p);
    return r;
}

template <typename T, int NP, int ACT>
__device__ __forceinline__ void head_fwd_cols(const T* __restrict__ pre, const T* __restrict__ w, u64 o, u64 n,
                                              const u64 (&rowoff)[HF_R], float (&acc)[HF_R][NP]) {
    constexpr int V = 16 / sizeof(T);
    u64 c = (u64)threadIdx.x * V;
    if (c >= n) return;
    HfVec<T> cur[HF_R];
#pragma unroll
    for (int r = 0; r < HF_R; r++) cur[r] = hf_ld(pre + rowoff[r] + c);
#pragma unroll 1
    for (; c < n; c += 32 * V) {
        HfVec<T> nxt[HF_R];
        const bool more = c + 32 * V < n;
        if (more) {
#pragma unroll
            for (int r = 0; r < HF_R; r++) nxt[r] = hf_ld(pre + rowoff[r] + c + 32 * V);
        }
        float xv[HF_R][V];
#pragma unroll
        for (int r = 0; r < HF_R; r++) {
#pragma unroll
            for (int e = 0; e < V; e++) {
                float h, d;
                act_both<T, ACT>(ld_fast(cur[r].v, e), h, d);
                xv[r][e] = rnd_fast((const T*)0, h);
            }
        }
        // W's rows without a branch between them, so that their loads are all in flight together: rows past o
        // read row o - 1 and count as zeros.
        HfVec<T> wq[NP];
#pragma unroll
        for (int p = 0; p < NP; p++) wq[p] = hf_ld(w + (u64)((u64)p < o ? p : o - 1) * n + c);
#pragma unroll
        for (int p = 0; p < NP; p++) {
            const bool live = (u64)p < o;
#pragma unroll
            for (int e = 0; e < V; e++) {
                const float wv = live ? ld_fast(wq[p].v, e) : 0.0f;
#pragma unroll
                for (int r = 0; r < HF_R; r++) acc[r][p] = fmaf(xv[r][e], wv, acc[r][p]);
            }
        }
        if (more) {
#pragma unroll
            for (int r = 0; r < HF_R; r++) cur[r] = nxt[r];
        }
    }
}

template <typename T, int NP>
__device__ void head_fwd_impl(int act, const T* __restrict__ pre, const T* __restrict__ w,
                              const T* __restrict__ bias, T* __restrict__ y, u64 o, u64 m, u64 n) {
    const u64 row0 = ((u64)blockIdx.x * HF_BY + threadIdx.y) * HF_R;
    if (row0 >= m) return;  // the whole warp: no block-wide barrier below
    u64 rowoff[HF_R];
#pragma unroll
    for (int r = 0; r < HF_R; r++) rowoff[r] = min(row0 + r, m - 1) * n;
    float acc[HF_R][NP];
#pragma unroll
    for (int r = 0; r < HF_R; r++) {
#pragma unroll
        for (int p = 0; p < NP; p++) acc[r][p] = 0.0f;
    }
    if (act == ACT_RELU) {
        head_fwd_cols<T, NP, ACT_RELU>(pre, w, o, n, rowoff, acc);
    } else {
        head_fwd_cols<T, NP, ACT_GELU_TANH>(pre, w, o, n, rowoff, acc);
    }
    const unsigned lane = threadIdx.x;
#pragma unroll
    for (int r = 0; r < HF_R; r++) {
        float mine = 0.0f;
#pragma unroll
        for (int p = 0; p < NP; p++) {
            const float s = warp_sum(acc[r][p]);
            if (lane == (unsigned)p) mine = s;
        }
        if ((u64)lane < o && row0 + r < m) st(y, (row0 + r) * o + lane, rnd((const T*)0, mine) + ld(bias, lane));
    }
}

#define HEAD_FWD_ONE(tn, T, NP)                                                                              \
    extern "C" __global__ void __launch_bounds__(32 * HF_BY, 2) head_fwd##NP##_##tn(                          \
        int act, const T* pre, const T* w, const T* bias, T* y, u64 o, u64 m, u64 n) {                       \
        PDL_ENTRY();                                                                                         \
        head_fwd_impl<T, NP>(act, pre, w, bias, y, o, m, n);                                                 \
    }

#define HEAD_BWD_ONE(tn, T, NP, MINB)                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * HB_BY, MINB) head_bwd##NP##_##tn(                        \
        int act, const T* dy, u64 o, const T* w, const T* pre, T* dx, float* partial, float* dbp, u64 m, u64 n, \
        u64 c0, u64 cc, u64 rows_per_split) {                                                                  \
        PDL_ENTRY();                                                                                         \
        head_bwd_impl<T, NP>(act, dy, o, w, pre, dx, partial, dbp, m, n, c0, cc, rows_per_split);              \
    }
// At most 128 registers a thread (two blocks a multiprocessor) for 10 and 16 outputs: at three (85) they spill.
#define HEAD(tn, T)                                                                                          \
    HEAD_BWD_ONE(tn, T, 4, 3)                                                                                \
    HEAD_BWD_ONE(tn, T, 10, 2)                                                                               \
    HEAD_BWD_ONE(tn, T, 16, 2)                                                                               \
    extern "C" __global__ void __launch_bounds__(32 * HB_BY)                                                 \
        head_finish_##tn(const float* partial, u64 stride, T* out, u64 ld, u64 cc, u64 splits) {             \
        PDL_ENTRY();                                                                                         \
        split_sum_impl<HB_BY>(partial, stride, out, ld, cc, splits, blockIdx.y);                             \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * HB_BY)                                                 \
        head_finish3_##tn(const float* partial, u64 stride, T* dw, u64 ld, T* pb, u64 cc, u64 splits, u64 o, \
                          const float* dbp, T* db) {                                                         \
        PDL_ENTRY();                                                                                         \
        const u64 p = blockIdx.y;                                                                            \
        if (p < o) {                                                                                         \
            split_sum_impl<HB_BY>(partial, stride, dw, ld, cc, splits, p);                                   \
        } else if (p == o) {                                                                                 \
            split_sum_impl<HB_BY>(partial, stride, pb, 0, cc, splits, p);                                    \
        } else {                                                                                             \
            split_sum_impl<HB_BY>(dbp, o, db, 0, o, splits, 0);                                              \
        }                                                                                                    \
    }
FOR_FLOAT(HEAD)
// The forward pass on CUDA cores for f32 (16-bit types take head_fwd_mma, below).
HEAD_FWD_ONE(f32, float, 4)
HEAD_FWD_ONE(f32, float, 10)
HEAD_FWD_ONE(f32, float, 16)

// ---- head_fwd_mma: the forward pass on tensor cores (16-bit T) ----
//
// head_fwd_mma_{T} computes what head_fwd does (x = round_T(act_both's act(pre)), y = st(round_T(x W^T) + b))
// with mma.sync.m16n8k16 (T inputs, f32 accumulation) for the product: tensor cores add the products of a k
// step in their own order, so y may differ from head_fwd's by f32 summation order. Up to 16 outputs (two
// 8-column tiles of the product).
//
// Layout: a block of HM_WARPS warps takes 16 rows; warp w takes the in-features [w K / HM_WARPS, ...) in chunks
// of 32, and the warps' partial products meet in shared memory, added in warp order. In a chunk, lane (g, t)
// (g = lane / 4, t = lane % 4) loads 16 bytes of rows g and g + 8 (columns 8t .. 8t + 7 of the chunk), applies
// the activation and rounds, and feeds them as the A fragments of two k16 steps: step s takes the lane's
// columns 8t + 4s .. 8t + 4s + 3 as the fragment's logical columns {2t, 2t + 1, 2t + 8, 2t + 9}. Any
// permutation of k serves a dot product as long as B sees the same one: the lane loads 16 bytes of W's row
// 8j + g at the same columns, and those words are the B fragments as they lie in memory. Rows of W past o, and
// columns past n (n a multiple of 8), count as zeros.
#define HM_WARPS 8

// d += A B on tensor cores (m16n8k16, T inputs, f32 accumulation), and two values rounded to T packed as a T
// pair (the first in the low half): one definition per type, the PTX type name its only difference.
template <typename T>
__device__ __forceinline__ void hm_mma(float (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                       unsigned b0, unsigned b1);
#define HM_TYPE_OPS(T, ptx)                                                                                  \
    template <>                                                                                              \
    __device__ __forceinline__ void hm_mma<T>(float (&d)[4], unsigned a0, unsigned a1, unsigned a2,          \
                                              unsigned a3, unsigned b0, unsigned b1) {                       \
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." ptx "." ptx ".f32 {%0, %1, %2, %3}, "           \
                     "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"                                         \
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                        \
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));                                \
    }                                                                                                        \
    __device__ __forceinline__ unsigned hm_pack(const T*, float lo, float hi) {                              \
        unsigned r;                                                                                          \
        asm("cvt.rn." ptx "x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));                                \
        return r;                                                                                            \
    }
HM_TYPE_OPS(bf16, "bf16")
HM_TYPE_OPS(f16, "f16")

// The activation of the 8 values in raw (16 bytes of T), rounded to T and packed in pairs.
template <typename T, int ACT>
__device__ __forceinline__ void hm_act8(const uint4& raw, unsigned (&out)[4]) {
    const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int q = 0; q < 4; q++) {
        float h0, h1, d;
        act_both<T, ACT>(ld_fast(v, 2 * q), h0, d);
        act_both<T, ACT>(ld_fast(v, 2 * q + 1), h1, d);
        out[q] = hm_pack((const T*)0, h0, h1);
    }
}

template <typename T, int ACT>
__device__ __forceinline__ void head_fwd_mma_cols(const T* __restrict__ pre, const T* __restrict__ w, u64 o, u64 n,
                                                  u64 ra, u64 rb, u64 k0, u64 k1, float (&acc)[2][4]) {
    const unsigned lane = threadIdx.x, g = lane / 4, t = lane % 4;
    // W's rows for the two column tiles of the product (clamped; zeroed past o).
    const bool live0 = g < o, live1 = g + 8 < o;
    const T* w0 = w + (u64)(live0 ? g : 0) * n;
    const T* w1 = w + (u64)(live1 ? g + 8 : 0) * n;
    const uint4 zero = make_uint4(0, 0, 0, 0);
    u64 c = k0 + 8 * t;
    uint4 xa = c < k1 ? *reinterpret_cast<const uint4*>(pre + ra + c) : zero;
    uint4 xb = c < k1 ? *reinterpret_cast<const uint4*>(pre + rb + c) : zero;
#pragma unroll 1
    for (; k0 < k1; k0 += 32) {
        c = k0 + 8 * t;
        const bool ok = c < k1;
        // The next chunk's rows in flight while this one computes.
        const u64 cn = c + 32;
        uint4 na = zero, nb = zero;
        if (cn < k1) {
            na = *reinterpret_cast<const uint4*>(pre + ra + cn);
            nb = *reinterpret_cast<const uint4*>(pre + rb + cn);
        }
        const uint4 wa = ok && live0 ? *reinterpret_cast<const uint4*>(w0 + c) : zero;
        const uint4 wb = ok && live1 ? *reinterpret_cast<const uint4*>(w1 + c) : zero;
        unsigned pa[4], pb[4];
        hm_act8<T, ACT>(xa, pa);
        hm_act8<T, ACT>(xb, pb);
        if (!ok) {
#pragma unroll
            for (int q = 0; q < 4; q++) pa[q] = pb[q] = 0;
        }
        // Step 0: the lane's columns 8t .. 8t + 3; step 1: 8t + 4 .. 8t + 7.
        hm_mma<T>(acc[0], pa[0], pb[0], pa[1], pb[1], wa.x, wa.y);
        hm_mma<T>(acc[0], pa[2], pb[2], pa[3], pb[3], wa.z, wa.w);
        if (o > 8) {
            hm_mma<T>(acc[1], pa[0], pb[0], pa[1], pb[1], wb.x, wb.y);
            hm_mma<T>(acc[1], pa[2], pb[2], pa[3], pb[3], wb.z, wb.w);
        }
        xa = na;
        xb = nb;
    }
}

template <typename T>
__device__ void head_fwd_mma_impl(int act, const T* __restrict__ pre, const T* __restrict__ w,
                                  const T* __restrict__ bias, T* __restrict__ y, u64 o, u64 m, u64 n) {
    __shared__ float part[HM_WARPS][2][4][32];
    const unsigned lane = threadIdx.x, warp = threadIdx.y, g = lane / 4, t = lane % 4;
    const u64 r0 = (u64)blockIdx.x * 16;
    const u64 ra = min(r0 + g, m - 1) * n, rb = min(r0 + g + 8, m - 1) * n;
    // This warp's in-features: whole chunks of 32, the warps in order.
    const u64 chunks = (n + 31) / 32, per = (chunks + HM_WARPS - 1) / HM_WARPS;
    const u64 k0 = min(warp * per * 32, n), k1 = min((warp + 1) * per * 32, n);
    float acc[2][4];
#pragma unroll
    for (int j = 0; j < 2; j++) {
#pragma unroll
        for (int e = 0; e < 4; e++) acc[j][e] = 0.0f;
    }
    if (act == ACT_RELU) {
        head_fwd_mma_cols<T, ACT_RELU>(pre, w, o, n, ra, rb, k0, k1, acc);
    } else {
        head_fwd_mma_cols<T, ACT_GELU_TANH>(pre, w, o, n, ra, rb, k0, k1, acc);
    }
#pragma unroll
    for (int j = 0; j < 2; j++) {
#pragma unroll
        for (int e = 0; e < 4; e++) part[warp][j][e][lane] = acc[j][e];
    }
    __syncthreads();
    if (warp != 0) return;
    // acc[j][e]: row g + 8 (e / 2), output 8 j + 2 t + e % 2.
#pragma unroll
    for (int j = 0; j < 2; j++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            float s = 0.0f;
#pragma unroll
            for (int q = 0; q < HM_WARPS; q++) s += part[q][j][e][lane];
            const u64 row = r0 + g + 8 * (e / 2), col = 8 * j + 2 * t + e % 2;
            if (row < m && col < o) st(y, row * o + col, rnd((const T*)0, s) + ld(bias, col));
        }
    }
}

#define HEAD_FWD_MMA(tn, T)                                                                                  \
    extern "C" __global__ void __launch_bounds__(32 * HM_WARPS) head_fwd_mma_##tn(                            \
        int act, const T* pre, const T* w, const T* bias, T* y, u64 o, u64 m, u64 n) {                       \
        PDL_ENTRY();                                                                                         \
        head_fwd_mma_impl<T>(act, pre, w, bias, y, o, m, n);                                                  \
    }
HEAD_FWD_MMA(bf16, bf16)
HEAD_FWD_MMA(f16, f16)

// ---- head_bwd_mma: the backward pass on tensor cores (16-bit T) ----
//
// head_bwd_mma_{T} computes what head_bwd does (see the top of the file; the same partial-sum layout, so the
// same head_finish) with mma.sync.m16n8k16 for its two products: g = dy W (k = the outputs, padded to 16) and
// dW += dy^T x (k = 16 rows at a time). Up to 16 outputs.
//
// Layout: blockIdx.x picks HM_WARPS x 32 columns of the chunk, one 32-column strip a warp; blockIdx.y a split
// of rows_per_split rows (a multiple of 16), which each warp walks in tiles of 16 rows. Lane (g, t) holds
// the 8 physical columns 8t .. 8t + 7 of its strip (one 16-byte load or store a row) for rows g and g + 8 of
// the tile: in the product's tiles j = 0..3 those are its accumulator elements (row g or g + 8, logical column
// 2t + e) at physical column 8t + 2j + e. B fragments use the same map: W's column for logical column n of
// tile j is 8 (n / 2) + 2j + n % 2. x (rounded to T) goes from accumulator layout to B layout for the dW
// product with movmatrix.trans (8x8 b16 transposes). The dy fragments are loaded per tile, in both
// orientations; outputs and rows past their ends count as zeros. Sums per lane, then across the 8 lanes of a
// column (xor shuffles, a fixed order); no atomics.
template <typename T>
__device__ __forceinline__ unsigned hm_bits2(const T* p, u64 i0, u64 i1, bool ok0, bool ok1) {
    const unsigned lo = ok0 ? p[i0].bits : 0u, hi = ok1 ? p[i1].bits : 0u;
    return lo | (hi << 16);
}

__device__ __forceinline__ unsigned hm_trans(unsigned a) {
    unsigned d;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(d) : "r"(a));
    return d;
}

// The dy fragments of the tile of rows r.. (zeros past r1 and past o): f[0..4] as the A fragment of g = dy W
// (rows g, g + 8 x outputs 2t, 2t + 1, 2t + 8, 2t + 9), f[4..8] as the A fragment of dW += dy^T x (outputs g,
// g + 8 x rows 2t, 2t + 1, 2t + 8, 2t + 9).
template <typename T>
__device__ __forceinline__ void hm_dy_frags(const T* __restrict__ dy, u64 o, u64 r, u64 r1, unsigned (&f)[8]) {
    const unsigned lane = threadIdx.x, g = lane / 4, t = lane % 4;
    const bool oka = r + g < r1, okb = r + g + 8 < r1;
    const u64 ia = (r + g) * o, ib = (r + g + 8) * o;
    const unsigned c0 = 2 * t, c1 = 2 * t + 8;
    f[0] = hm_bits2(dy, ia + c0, ia + c0 + 1, oka && c0 < o, oka && c0 + 1 < o);
    f[1] = hm_bits2(dy, ib + c0, ib + c0 + 1, okb && c0 < o, okb && c0 + 1 < o);
    f[2] = hm_bits2(dy, ia + c1, ia + c1 + 1, oka && c1 < o, oka && c1 + 1 < o);
    f[3] = hm_bits2(dy, ib + c1, ib + c1 + 1, okb && c1 < o, okb && c1 + 1 < o);
    const bool q0 = r + 2 * t < r1, q1 = r + 2 * t + 1 < r1, q2 = r + 2 * t + 8 < r1, q3 = r + 2 * t + 9 < r1;
    const bool pg = g < o, ph = g + 8 < o;
    const u64 j0 = (r + 2 * t) * o, j1 = j0 + o, j2 = (r + 2 * t + 8) * o, j3 = j2 + o;
    f[4] = hm_bits2(dy, j0 + g, j1 + g, q0 && pg, q1 && pg);
    f[5] = hm_bits2(dy, j0 + g + 8, j1 + g + 8, q0 && ph, q1 && ph);
    f[6] = hm_bits2(dy, j2 + g, j3 + g, q2 && pg, q3 && pg);
    f[7] = hm_bits2(dy, j2 + g + 8, j3 + g + 8, q2 && ph, q3 && ph);
}

// The rows a split of head_bwd_mma may have (the host's MMA_SPLIT_MAX): the block stages the dy fragments of
// all its tiles in shared memory before the row loop (8 words a lane a tile, 32 KiB at 512 rows), so that the
// loop reads two 16-byte words of shared memory a tile where it made 16 predicated 2-byte loads of dy with their
// index arithmetic (the kernel is bound by instruction issue, not by memory: Nsight Compute, session 5).
#define HM_SPLIT_MAX 512

// The row loop of one warp: tiles of 16 rows, the next tile's pre loads in flight while this one computes.
// sdy: the split's dy fragments ([tile][0] = f[0..4], [tile][1] = f[4..8] of hm_dy_frags, per lane).
template <typename T, int ACT>
__device__ __forceinline__ void head_bwd_mma_rows(const uint4 (*sdy)[2][32], const T* __restrict__ pre,
                                                  T* __restrict__ dx, u64 n, u64 col, bool colok, u64 r0,
                                                  u64 r1, const unsigned (&bw)[4][2], float (&aw)[4][4],
                                                  float (&ab)[8], float (&ady)[2]) {
    const unsigned lane = threadIdx.x, g = lane / 4;
    const uint4 zero = make_uint4(0, 0, 0, 0);
    uint4 za = zero, zb = zero;
    if (r0 < r1 && colok) {
        za = *reinterpret_cast<const uint4*>(pre + min(r0 + g, r1 - 1) * n + col);
        zb = *reinterpret_cast<const uint4*>(pre + min(r0 + g + 8, r1 - 1) * n + col);
    }
#pragma unroll 1
    for (u64 r = r0, tile = 0; r < r1; r += 16, tile++) {
        uint4 na = zero, nb = zero;
        if (r + 16 < r1 && colok) {
            na = *reinterpret_cast<const uint4*>(pre + min(r + 16 + g, r1 - 1) * n + col);
            nb = *reinterpret_cast<const uint4*>(pre + min(r + 16 + g + 8, r1 - 1) * n + col);
        }
        const uint4 fa = sdy[tile][0][lane], fb = sdy[tile][1][lane];
        const unsigned f[8] = {fa.x, fa.y, fa.z, fa.w, fb.x, fb.y, fb.z, fb.w};
        const bool oka = r + g < r1, okb = r + g + 8 < r1;
        // The layer's own bias gradient: this lane's share of dy's column sums (outputs g and g + 8).
        {
            const T* d0 = reinterpret_cast<const T*>(&f[4]);
            const T* d1 = reinterpret_cast<const T*>(&f[5]);
            const T* d2 = reinterpret_cast<const T*>(&f[6]);
            const T* d3 = reinterpret_cast<const T*>(&f[7]);
            ady[0] += (ld_fast(d0, 0) + ld_fast(d0, 1)) + (ld_fast(d2, 0) + ld_fast(d2, 1));
            ady[1] += (ld_fast(d1, 0) + ld_fast(d1, 1)) + (ld_fast(d3, 0) + ld_fast(d3, 1));
        }
        const T* pa = reinterpret_cast<const T*>(&za);
        const T* pb = reinterpret_cast<const T*>(&zb);
        HfVec<T> da, db;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            hm_mma<T>(acc, f[0], f[1], f[2], f[3], bw[j][0], bw[j][1]);
            float hx[4];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int k = 2 * j + e % 2;  // the element of the lane's 8 columns
                const float z = ld_fast(e < 2 ? pa : pb, k);
                float h, d;
                act_both<T, ACT>(z, h, d);
                hx[e] = h;
                T* out = e < 2 ? da.v : db.v;
                st(out, k, rnd_fast((const T*)0, acc[e]) * d);
                if (e < 2 ? oka : okb) ab[k] += ld_fast(out, k);
            }
            // x rows g / g + 8 of tile j (zero past the split) to B layout for dW.
            const unsigned xt = hm_pack((const T*)0, oka ? hx[0] : 0.0f, oka ? hx[1] : 0.0f);
            const unsigned xb = hm_pack((const T*)0, okb ? hx[2] : 0.0f, okb ? hx[3] : 0.0f);
            hm_mma<T>(aw[j], f[4], f[5], f[6], f[7], hm_trans(xt), hm_trans(xb));
        }
        if (colok) {
            if (oka) *reinterpret_cast<uint4*>(dx + (r + g) * n + col) = *reinterpret_cast<const uint4*>(&da);
            if (okb) *reinterpret_cast<uint4*>(dx + (r + g + 8) * n + col) = *reinterpret_cast<const uint4*>(&db);
        }
        za = na;
        zb = nb;
    }
}

template <typename T>
__device__ void head_bwd_mma_impl(int act, const T* __restrict__ dy, u64 o, const T* __restrict__ w,
                                  const T* __restrict__ pre, T* __restrict__ dx, float* __restrict__ partial,
                                  float* __restrict__ dbp, u64 m, u64 n, u64 c0, u64 cc, u64 rows_per_split) {
    const unsigned lane = threadIdx.x, g = lane / 4, t = lane % 4;
    const u64 strip = ((u64)blockIdx.x * HM_WARPS + threadIdx.y) * 32;  // in the chunk
    const bool colok = strip + 8 * t < cc;                              // cc is a multiple of 8
    const u64 col = c0 + strip + 8 * t;
    const u64 r0 = (u64)blockIdx.y * rows_per_split;
    const u64 r1 = min(r0 + rows_per_split, m);
    // W as the B fragments of g = dy W: outputs (2t, 2t + 1, 2t + 8, 2t + 9) x this lane's column of each tile.
    unsigned bw[4][2];
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const u64 wc = min(c0 + strip + 8 * (g / 2) + 2 * j + g % 2, c0 + cc - 1);
        const bool ok = strip + 8 * (g / 2) + 2 * j + g % 2 < cc;
        bw[j][0] = hm_bits2(w, (u64)(2 * t) * n + wc, (u64)(2 * t + 1) * n + wc, ok && 2 * t < o, ok && 2 * t + 1 < o);
        bw[j][1] = hm_bits2(w, (u64)(2 * t + 8) * n + wc, (u64)(2 * t + 9) * n + wc, ok && 2 * t + 8 < o,
                            ok && 2 * t + 9 < o);
    }
    float aw[4][4], ab[8], ady[2] = {0.0f, 0.0f};
#pragma unroll
    for (int j = 0; j < 4; j++) {
#pragma unroll
        for (int e = 0; e < 4; e++) aw[j][e] = 0.0f;
    }
#pragma unroll
    for (int k = 0; k < 8; k++) ab[k] = 0.0f;
    // The split's dy fragments, tile by tile over the warps (the host keeps r1 - r0 <= HM_SPLIT_MAX).
    __shared__ uint4 sdy[HM_SPLIT_MAX / 16][2][32];
    for (u64 tile = threadIdx.y; r0 + 16 * tile < r1; tile += HM_WARPS) {
        unsigned f[8];
        hm_dy_frags(dy, o, r0 + 16 * tile, r1, f);
        sdy[tile][0][lane] = make_uint4(f[0], f[1], f[2], f[3]);
        sdy[tile][1][lane] = make_uint4(f[4], f[5], f[6], f[7]);
    }
    __syncthreads();
    if (act == ACT_RELU) {
        head_bwd_mma_rows<T, ACT_RELU>(sdy, pre, dx, n, col, colok, r0, r1, bw, aw, ab, ady);
    } else {
        head_bwd_mma_rows<T, ACT_GELU_TANH>(sdy, pre, dx, n, col, colok, r0, r1, bw, aw, ab, ady);
    }
    float* out = partial + (u64)blockIdx.y * (o + 1) * cc;
    // dW: aw[j][e] is output g + 8 (e / 2) at physical column 8t + 2j + e % 2 of the strip.
#pragma unroll
    for (int j = 0; j < 4; j++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const u64 p = g + 8 * (e / 2), cj = strip + 8 * t + 2 * j + e % 2;
            if (p < o && cj < cc) out[p * cc + cj] = aw[j][e];
        }
    }
    // The previous bias: column sums over the 8 lanes of each column (g = 0..7), then lanes g == 0 store.
#pragma unroll
    for (int k = 0; k < 8; k++) {
        float v = ab[k];
        v += __shfl_xor_sync(0xffffffffu, v, 4);
        v += __shfl_xor_sync(0xffffffffu, v, 8);
        v += __shfl_xor_sync(0xffffffffu, v, 16);
        ab[k] = v;
    }
    if (g == 0 && colok) {
#pragma unroll
        for (int k = 0; k < 8; k++) out[o * cc + strip + 8 * t + k] = ab[k];
    }
    // This layer's bias, once a split: the first warp of the grid's first column block, summed over t.
    if (dbp != 0 && blockIdx.x == 0 && threadIdx.y == 0) {
#pragma unroll
        for (int q = 0; q < 2; q++) {
            float v = ady[q];
            v += __shfl_xor_sync(0xffffffffu, v, 1);
            v += __shfl_xor_sync(0xffffffffu, v, 2);
            ady[q] = v;
        }
        if (t == 0) {
            if (g < o) dbp[(u64)blockIdx.y * o + g] = ady[0];
            if (g + 8 < o) dbp[(u64)blockIdx.y * o + g + 8] = ady[1];
        }
    }
}

#define HEAD_BWD_MMA(tn, T)                                                                                  \
    extern "C" __global__ void __launch_bounds__(32 * HM_WARPS, 2) head_bwd_mma_##tn(                          \
        int act, const T* dy, u64 o, const T* w, const T* pre, T* dx, float* partial, float* dbp, u64 m,      \
        u64 n, u64 c0, u64 cc, u64 rows_per_split) {                                                         \
        PDL_ENTRY();                                                                                         \
        head_bwd_mma_impl<T>(act, dy, o, w, pre, dx, partial, dbp, m, n, c0, cc, rows_per_split);            \
    }
HEAD_BWD_MMA(bf16, bf16)
HEAD_BWD_MMA(f16, f16)
