// A classifier layer's backward through the activation before it, in one pass over the activation's input:
// the backward of `logits = act(pre) W^T + b` for a layer of few outputs (o <= 16 classes), which on the GPU
// is otherwise three memory-bound passes over [rows, i] (cuBLAS's dW = dy^T x reading x, then the small-k
// product dx = dy W with the activation backward reading pre and writing dx; each far from the bandwidth
// bound at o = 10).
//
// head_bwd{NP}_{T}, for dy [m, o], W [o, n] (row-major, the layer's weight [O, I]), pre [m, n], all of storage
// type T, o <= NP (the host picks the smallest NP >= o of 4, 10, 16):
//   h[r, c]    = round_T(act(pre[r, c]))             (the layer's input as the forward pass stored it; GELU: for
//                f32, with act_derivative's tanh argument, which can differ from act_forward's by an ulp; for
//                16-bit T, with the hardware tanh, see act_both)
//   g[r, c]    = round_T(sum_{p < o} dy[r, p] W[p, c])   (f32 from +0, p ascending, one fmaf a term)
//   dx[r, c]   = st(g * act'(pre[r, c]))            (f32: ag_group's expression, dy being the stored g)
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

// act(x) and act'(x) for storage type T. f32: common.cuh's expressions with one tanhf (see the file comment).
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

// out[p * ld + c] = sum over splits s of partial[s * stride + p * cc + c], for p < rows and c < cc (out already
// offset to the chunk's first column): block (32, HB_BY) over 32 columns of one row p = blockIdx.y; thread row
// y adds splits y, y + HB_BY, ... in order, then row 0 adds the HB_BY sums in order.
template <typename B>
__device__ void head_finish_impl(const float* partial, u64 stride, B* out, u64 ld, u64 cc, u64 splits) {
    __shared__ float sh[HB_BY][33];
    const u64 c = (u64)blockIdx.x * 32 + threadIdx.x;
    const u64 p = blockIdx.y;
    float acc = 0.0f;
    if (c < cc) {
#pragma unroll 4
        for (u64 s = threadIdx.y; s < splits; s += HB_BY) acc += partial[s * stride + p * cc + c];
    }
    sh[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < cc) {
        float s = 0.0f;
#pragma unroll
        for (int t = 0; t < HB_BY; t++) s += sh[t][threadIdx.x];
        st(out, p * ld + c, s);
    }
}

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
        head_fwd_impl<T, NP>(act, pre, w, bias, y, o, m, n);                                                 \
    }

#define HEAD_BWD_ONE(tn, T, NP, MINB)                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * HB_BY, MINB) head_bwd##NP##_##tn(                        \
        int act, const T* dy, u64 o, const T* w, const T* pre, T* dx, float* partial, float* dbp, u64 m, u64 n, \
        u64 c0, u64 cc, u64 rows_per_split) {                                                                  \
        head_bwd_impl<T, NP>(act, dy, o, w, pre, dx, partial, dbp, m, n, c0, cc, rows_per_split);              \
    }
// At most 128 registers a thread (two blocks a multiprocessor) for 10 and 16 outputs: at three (85) they spill.
#define HEAD(tn, T)                                                                                          \
    HEAD_BWD_ONE(tn, T, 4, 3)                                                                                \
    HEAD_BWD_ONE(tn, T, 10, 2)                                                                               \
    HEAD_BWD_ONE(tn, T, 16, 2)                                                                               \
    HEAD_FWD_ONE(tn, T, 4)                                                                                   \
    HEAD_FWD_ONE(tn, T, 10)                                                                                  \
    HEAD_FWD_ONE(tn, T, 16)                                                                                  \
    extern "C" __global__ void __launch_bounds__(32 * HB_BY)                                                 \
        head_finish_##tn(const float* partial, u64 stride, T* out, u64 ld, u64 cc, u64 splits) {             \
        head_finish_impl(partial, stride, out, ld, cc, splits);                                              \
    }
FOR_FLOAT(HEAD)
