// Shared by every kernel file (prepended to each before NVRTC compiles it).
//
// Storage types: 16-bit floats are carried as their raw bits, and converted with the PTX `cvt` instructions
// the CUDA headers use, so NVRTC needs no toolkit headers (cuda_fp16.h / cuda_bf16.h) at run time: a machine
// with only the driver and libnvrtc runs the backend. Loads widen exactly; stores round to nearest even, as
// the reference backend does (mantissa_core::dtype).
//
// Kernels are compiled with --fmad=false, IEEE division and square root: element-wise results then match the
// scalar reference bit for bit except where a math-library function (expf, logf, tanhf) differs by an ulp.

typedef unsigned long long u64;

#define INFINITY __int_as_float(0x7f800000)  // no <math.h> without the toolkit headers
typedef long long i64;

struct f16 {
    unsigned short bits;
};
struct bf16 {
    unsigned short bits;
};

__device__ __forceinline__ float ld(const float* p, u64 i) { return p[i]; }
__device__ __forceinline__ float ld(const f16* p, u64 i) {
    const unsigned h = p[i].bits;
    if ((h & 0x7c00u) == 0x7c00u && (h & 0x3ffu)) {
        // NaN: keep sign and payload as the host widens it (cvt.f32.f16 returns the canonical NaN).
        return __uint_as_float(((h & 0x8000u) << 16) | 0x7f800000u | ((h & 0x3ffu) << 13));
    }
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(p[i].bits));
    return f;
}
__device__ __forceinline__ float ld(const bf16* p, u64 i) { return __uint_as_float(((unsigned)p[i].bits) << 16); }

// `N` stored values widened as `ld` widens each: for f16, cvt on every element and one NaN test for them all,
// then, only where one was NaN (cvt returns the canonical NaN), `ld` again for its payload. Per element that is
// a cvt and an FSETP instead of ld's integer test and select.
template <int N>
__device__ __forceinline__ void widen(const f16* p, float* out) {
    bool nan = false;
#pragma unroll
    for (int k = 0; k < N; k++) {
        asm("cvt.f32.f16 %0, %1;" : "=f"(out[k]) : "h"(p[k].bits));
        nan |= out[k] != out[k];
    }
    if (nan) {
#pragma unroll
        for (int k = 0; k < N; k++) out[k] = ld(p, k);
    }
}
template <int N, typename T>
__device__ __forceinline__ void widen(const T* p, float* out) {
#pragma unroll
    for (int k = 0; k < N; k++) out[k] = ld(p, k);
}

__device__ __forceinline__ unsigned short f32_to_f16_bits(float v) {
    // NaN keeps its sign and top payload bits, quieted, as the host's conversion does (cvt.rn.f16.f32 would
    // return the canonical 0x7fff).
    if (v != v) {
        const unsigned u = __float_as_uint(v);
        return (unsigned short)(((u >> 16) & 0x8000u) | 0x7e00u | ((u >> 13) & 0x3ffu));
    }
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
}
__device__ __forceinline__ unsigned short f32_to_bf16_bits(float v) {
#if __CUDA_ARCH__ >= 800
    // NaN keeps its sign and top payload bits, quieted, as the host's conversion (the `half` crate) does;
    // cvt.rn.bf16.f32 would return the canonical 0x7fff for every NaN.
    if (v != v) return (unsigned short)((__float_as_uint(v) >> 16) | 0x40u);
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
#else
    unsigned u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
#endif
}

__device__ __forceinline__ void st(float* p, u64 i, float v) { p[i] = v; }
__device__ __forceinline__ void st(f16* p, u64 i, float v) { p[i].bits = f32_to_f16_bits(v); }
__device__ __forceinline__ void st(bf16* p, u64 i, float v) { p[i].bits = f32_to_bf16_bits(v); }

// Two values rounded to T as `st` rounds them, packed (the first in the low half), for non-NaN values: one
// paired cvt (a NaN becomes the canonical one; `narrow` redoes those).
__device__ __forceinline__ unsigned cvt_pair(const f16*, float lo, float hi) {
    unsigned w;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(w) : "f"(hi), "f"(lo));
    return w;
}
__device__ __forceinline__ unsigned cvt_pair(const bf16*, float lo, float hi) {
#if __CUDA_ARCH__ >= 800
    unsigned w;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(w) : "f"(hi), "f"(lo));
    return w;
#else
    return (unsigned)f32_to_bf16_bits(lo) | ((unsigned)f32_to_bf16_bits(hi) << 16);
#endif
}

// `N` values stored as `st` stores each: for the 16-bit types, one paired cvt per two elements and one NaN test
// for them all, then, only where one was NaN, `st` again for every element (for the NaN's payload).
template <int N, typename T>
__device__ __forceinline__ void narrow(const float* v, T* p) {
    bool nan = false;
#pragma unroll
    for (int k = 0; k + 1 < N; k += 2) {
        const unsigned w = cvt_pair(p, v[k], v[k + 1]);
        p[k].bits = (unsigned short)(w & 0xffffu);
        p[k + 1].bits = (unsigned short)(w >> 16);
        nan |= (v[k] != v[k]) | (v[k + 1] != v[k + 1]);
    }
    if (N % 2) st(p, N - 1, v[N - 1]);
    if (nan) {
#pragma unroll
        for (int k = 0; k < N; k++) st(p, k, v[k]);
    }
}
template <int N>
__device__ __forceinline__ void narrow(const float* v, float* p) {
#pragma unroll
    for (int k = 0; k < N; k++) p[k] = v[k];
}

// `v` after a round trip through storage type T (for sums the reference stores after every addition).
__device__ __forceinline__ float rnd(const float*, float v) { return v; }
__device__ __forceinline__ float rnd(const f16*, float v) {
    f16 h;
    h.bits = f32_to_f16_bits(v);
    return ld(&h, 0);
}
__device__ __forceinline__ float rnd(const bf16*, float v) {
    return __uint_as_float(((unsigned)f32_to_bf16_bits(v)) << 16);
}

// Programmatic dependent launch (sm_90 and later; the host launches every kernel with it there, see
// kernels.rs `launch`): the first statement of every kernel. `griddepcontrol.wait` blocks until the kernels
// before this one in the stream have finished and their writes are visible, so nothing a kernel reads can be
// stale; `launch_dependents` then lets the next kernel's blocks be scheduled while this one's last blocks run
// (they wait in their own griddepcontrol.wait), which hides the launch gap between short kernels. Without the
// launch attribute, or before sm_90 (where this expands to nothing), kernels run one after the other as usual.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define PDL_ENTRY() asm volatile("griddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;" ::: "memory")
#else
#define PDL_ENTRY() ((void)0)
#endif

// Grid-stride loops over 64-bit element counts.
__device__ __forceinline__ u64 gtid() { return (u64)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ u64 gstride() { return (u64)gridDim.x * blockDim.x; }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ unsigned warp_sum(unsigned v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a block of at most 1024 threads (a multiple of 32); the result is valid in thread 0.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float part[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) part[warp] = v;
    __syncthreads();
    const int warps = blockDim.x >> 5;
    v = (threadIdx.x < warps) ? part[threadIdx.x] : 0.0f;
    if (warp == 0) v = warp_sum(v);
    __syncthreads();
    return v;
}

// The finishing pass of the kernels that write per-split partial sums (act_grad.cu, head.cu):
// out[p * ld + c] = sum over splits s of partial[s * stride + p * cc + c], for c < cc and the block's row p (out
// already offset to the chunk's first column). Block (32, BY) over 32 columns: thread row y adds splits y, y + BY,
// ... in order, then row 0 adds the BY sums in order (no atomics: the result depends only on the launch shape).
// Every thread of the block calls it with the same p (it has barriers).
template <int BY, typename B>
__device__ void split_sum_impl(const float* partial, u64 stride, B* out, u64 ld, u64 cc, u64 splits, u64 p) {
    __shared__ float sh[BY][33];
    const u64 c = (u64)blockIdx.x * 32 + threadIdx.x;
    float acc = 0.0f;
    if (c < cc) {
#pragma unroll 4
        for (u64 s = threadIdx.y; s < splits; s += BY) acc += partial[s * stride + p * cc + c];
    }
    sh[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < cc) {
        float s = 0.0f;
#pragma unroll
        for (int t = 0; t < BY; t++) s += sh[t][threadIdx.x];
        st(out, p * ld + c, s);
    }
}

// Activations (codes: crate::act_code), forward and derivative: elementwise.cu's activation kernels and
// act_grad.cu's fused backward call these same functions, so the fused op's dx equals activation_backward's bit
// for bit (all kernels are compiled with the same options), and so does skinny.cu's small-k product. Same
// constants as mantissa_core::reference (sqrt(2/pi), GELU's cubic coefficient); the forward has its operation
// order, the derivative another form (below).
#define GELU_S 0.7978846f
#define GELU_C 0.044715f
#define ACT_RELU 0
#define ACT_GELU_TANH 1

__device__ __forceinline__ float act_forward(int act, float x) {
    if (act == ACT_RELU) return x > 0.0f ? x : (isnan(x) ? x : 0.0f);
    const float u = GELU_S * (x + GELU_C * x * x * x);
    return 0.5f * x * (1.0f + tanhf(u));
}

// GELU's derivative in the sigmoid form, as the SIMD CPU backend computes it: with u = GELU_S (x + GELU_C x^3)
// and s = sigmoid(2u) = (1 + tanh u) / 2, act'(x) = s + 2 x s (1 - s) u'. The reference's tanh form,
// (1 + t) / 2 + x (1 - t^2) u' / 2, cancels in 1 + t for negative x; this one does not (1 - s is e s where
// s > 1/2). 2^z and 1 / y come from the hardware approximations (ex2.approx.ftz, at most 2 ulp; rcp.approx.ftz,
// 1 ulp): 14 instructions an element fewer than with tanhf (act_grad_bias16_bf16's SASS: 1144 against 1480, 2
// MUFU an element either way), and that kernel was bound by instruction issue (Nsight Compute). Its error against the f64 value is at most 1.0e-7 (1 + |x|) over [-12, 12], the tanh
// form's 0.95e-7 (an f32 emulation with correctly rounded 2^z and 1 / y; the approximations add a few f32 ulps
// of s); the backend tests allow 2e-6 (1 + |x|). NaN gives NaN, and so do +-inf, as in the tanh form.
#define GELU_M2LOG2E -2.8853900817779268f  // -2 log2(e): 2^(u * GELU_M2LOG2E) = e^(-2u)
__device__ __forceinline__ float act_derivative(int act, float x) {
    if (act == ACT_RELU) return x > 0.0f ? 1.0f : 0.0f;
    const float x2 = x * x;
    const float u = GELU_S * fmaf(GELU_C * x2, x, x);
    float e, s;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(u * GELU_M2LOG2E));
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(s) : "f"(1.0f + e));
    const float om = e < 1.0f ? e * s : 1.0f - s;  // 1 - s = e / (1 + e)
    const float p = GELU_S * fmaf(3.0f * GELU_C, x2, 1.0f);
    return fmaf((x + x) * om * s, p, s);
}

// Instantiation lists: X(name, type) for each float storage type, and each (source, destination) pair.
#define FOR_FLOAT(X) X(f32, float) X(f16, f16) X(bf16, bf16)
#define FOR_FLOAT_PAIR(X)                                                                                    \
    X(f32, float, f32, float)                                                                                \
    X(f32, float, f16, f16)                                                                                  \
    X(f32, float, bf16, bf16)                                                                                \
    X(f16, f16, f32, float)                                                                                  \
    X(f16, f16, f16, f16)                                                                                    \
    X(f16, f16, bf16, bf16)                                                                                  \
    X(bf16, bf16, f32, float)                                                                                \
    X(bf16, bf16, f16, f16)                                                                                  \
    X(bf16, bf16, bf16, bf16)

// Vectorised access: 8 consecutive elements (16 bytes of a 16-bit type, 32 of f32) of a 16-byte-aligned array,
// moved with 16-byte loads and stores into a register array, then widened and rounded element by element with
// the same ld / st as the scalar kernels (identical per-element results). `g`: the group index (elements 8g..8g+7).
// Kernels named `*8` take this path; the host launches them only when every array they touch is 16-byte aligned,
// and they finish the last n % 8 elements with the scalar loop.
template <typename T>
struct alignas(16) Pack8 {
    T v[8];
};
template <typename T>
__device__ __forceinline__ Pack8<T> ld8(const T* p, u64 g) {
    Pack8<T> r;
    const uint4* q = reinterpret_cast<const uint4*>(p + g * 8);
    uint4* d = reinterpret_cast<uint4*>(&r);
#pragma unroll
    for (int k = 0; k < (int)(sizeof(Pack8<T>) / 16); k++) d[k] = q[k];
    return r;
}
template <typename T>
__device__ __forceinline__ void st8(T* p, u64 g, const Pack8<T>& r) {
    uint4* q = reinterpret_cast<uint4*>(p + g * 8);
    const uint4* s = reinterpret_cast<const uint4*>(&r);
#pragma unroll
    for (int k = 0; k < (int)(sizeof(Pack8<T>) / 16); k++) q[k] = s[k];
}
