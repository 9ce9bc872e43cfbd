// Element-wise ops: dtype conversion, bias, activations forward and backward.
// n: elements; every kernel is a grid-stride loop, one element per thread per iteration.

// Same constants and operation order as mantissa_core::reference (sqrt(2/pi), GELU's cubic coefficient).
#define GELU_S 0.7978846f
#define GELU_C 0.044715f
#define ACT_RELU 0
#define ACT_GELU_TANH 1

__device__ __forceinline__ float act_forward(int act, float x) {
    if (act == ACT_RELU) return x > 0.0f ? x : (isnan(x) ? x : 0.0f);
    const float u = GELU_S * (x + GELU_C * x * x * x);
    return 0.5f * x * (1.0f + tanhf(u));
}

__device__ __forceinline__ float act_derivative(int act, float x) {
    if (act == ACT_RELU) return x > 0.0f ? 1.0f : 0.0f;
    const float x2 = x * x;
    const float u = GELU_S * (x + GELU_C * x2 * x);
    const float t = tanhf(u);
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * GELU_S * (1.0f + 3.0f * GELU_C * x2);
}

// dst[i] = src[i], converted (round to nearest even).
template <typename S, typename D>
__device__ void cast_impl(const S* src, D* dst, u64 n) {
    for (u64 i = gtid(); i < n; i += gstride()) st(dst, i, ld(src, i));
}

// y: [outer, channels, inner] += bias[c], in place. n = outer * channels * inner.
template <typename Y, typename B>
__device__ void add_bias_impl(Y* y, const B* bias, u64 n, u64 channels, u64 inner) {
    for (u64 i = gtid(); i < n; i += gstride()) st(y, i, ld(y, i) + ld(bias, (i / inner) % channels));
}

// y = act(x); x may equal y.
template <typename X, typename Y>
__device__ void act_fwd_impl(int act, const X* x, Y* y, u64 n) {
    for (u64 i = gtid(); i < n; i += gstride()) st(y, i, act_forward(act, ld(x, i)));
}

// dx = dy * act'(x); dx may equal dy (same dtype D).
template <typename X, typename D>
__device__ void act_bwd_impl(int act, const X* x, const D* dy, D* dx, u64 n) {
    for (u64 i = gtid(); i < n; i += gstride()) st(dx, i, ld(dy, i) * act_derivative(act, ld(x, i)));
}

#define ELEMENTWISE(an, A, bn, B)                                                                            \
    extern "C" __global__ void cast_##an##_##bn(const A* src, B* dst, u64 n) { cast_impl(src, dst, n); }    \
    extern "C" __global__ void add_bias_##an##_##bn(A* y, const B* bias, u64 n, u64 channels, u64 inner) { \
        add_bias_impl(y, bias, n, channels, inner);                                                          \
    }                                                                                                        \
    extern "C" __global__ void act_fwd_##an##_##bn(int act, const A* x, B* y, u64 n) {                     \
        act_fwd_impl(act, x, y, n);                                                                          \
    }                                                                                                        \
    extern "C" __global__ void act_bwd_##an##_##bn(int act, const A* x, const B* dy, B* dx, u64 n) {       \
        act_bwd_impl(act, x, dy, dx, n);                                                                     \
    }
FOR_FLOAT_PAIR(ELEMENTWISE)
