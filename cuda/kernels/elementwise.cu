// Element-wise ops: dtype conversion, bias, activations forward and backward.
// n: elements; every kernel is a grid-stride loop, one element per thread per iteration.

// act_forward and act_derivative (and the ACT_* codes) are in common.cuh: act_grad.cu computes the same
// derivative, bit for bit.

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

// The `*8` variants: the same per-element arithmetic over groups of 8 elements with 16-byte loads and stores
// (every array 16-byte aligned: the host checks), then the last n % 8 elements one by one.

template <typename S, typename D>
__device__ void cast8_impl(const S* src, D* dst, u64 n) {
    const u64 groups = n / 8;
    for (u64 g = gtid(); g < groups; g += gstride()) {
        const Pack8<S> a = ld8(src, g);
        Pack8<D> b;
#pragma unroll
        for (int k = 0; k < 8; k++) st(b.v, k, ld(a.v, k));
        st8(dst, g, b);
    }
    for (u64 i = groups * 8 + gtid(); i < n; i += gstride()) st(dst, i, ld(src, i));
}

template <typename Y, typename B>
__device__ void add_bias8_impl(Y* y, const B* bias, u64 n, u64 channels, u64 inner) {
    const u64 groups = n / 8;
    for (u64 g = gtid(); g < groups; g += gstride()) {
        // The channel of element 8g, then stepped along (one division per group).
        const u64 i0 = g * 8, q = i0 / inner;
        u64 r = i0 - q * inner, c = q % channels;
        Pack8<Y> a = ld8(y, g);
#pragma unroll
        for (int k = 0; k < 8; k++) {
            st(a.v, k, ld(a.v, k) + ld(bias, c));
            if (++r == inner) {
                r = 0;
                if (++c == channels) c = 0;
            }
        }
        st8(y, g, a);
    }
    for (u64 i = groups * 8 + gtid(); i < n; i += gstride()) st(y, i, ld(y, i) + ld(bias, (i / inner) % channels));
}

template <typename X, typename Y>
__device__ void act_fwd8_impl(int act, const X* x, Y* y, u64 n) {
    const u64 groups = n / 8;
    for (u64 g = gtid(); g < groups; g += gstride()) {
        const Pack8<X> a = ld8(x, g);
        Pack8<Y> b;
#pragma unroll
        for (int k = 0; k < 8; k++) st(b.v, k, act_forward(act, ld(a.v, k)));
        st8(y, g, b);
    }
    for (u64 i = groups * 8 + gtid(); i < n; i += gstride()) st(y, i, act_forward(act, ld(x, i)));
}

template <typename X, typename D>
__device__ void act_bwd8_impl(int act, const X* x, const D* dy, D* dx, u64 n) {
    const u64 groups = n / 8;
    for (u64 g = gtid(); g < groups; g += gstride()) {
        const Pack8<X> a = ld8(x, g);
        Pack8<D> d = ld8(dy, g);
#pragma unroll
        for (int k = 0; k < 8; k++) st(d.v, k, ld(d.v, k) * act_derivative(act, ld(a.v, k)));
        st8(dx, g, d);
    }
    for (u64 i = groups * 8 + gtid(); i < n; i += gstride()) st(dx, i, ld(dy, i) * act_derivative(act, ld(x, i)));
}

#define ELEMENTWISE(an, A, bn, B)                                                                            \
    extern "C" __global__ void cast_##an##_##bn(const A* src, B* dst, u64 n) {                               \
        PDL_ENTRY();                                                                                         \
        cast_impl(src, dst, n);                                                                              \
    }                                                                                                        \
    extern "C" __global__ void add_bias_##an##_##bn(A* y, const B* bias, u64 n, u64 channels, u64 inner) { \
        PDL_ENTRY();                                                                                         \
        add_bias_impl(y, bias, n, channels, inner);                                                          \
    }                                                                                                        \
    extern "C" __global__ void act_fwd_##an##_##bn(int act, const A* x, B* y, u64 n) {                     \
        PDL_ENTRY();                                                                                         \
        act_fwd_impl(act, x, y, n);                                                                          \
    }                                                                                                        \
    extern "C" __global__ void act_bwd_##an##_##bn(int act, const A* x, const B* dy, B* dx, u64 n) {       \
        PDL_ENTRY();                                                                                         \
        act_bwd_impl(act, x, dy, dx, n);                                                                     \
    }
FOR_FLOAT_PAIR(ELEMENTWISE)

#define ELEMENTWISE8(an, A, bn, B)                                                                           \
    extern "C" __global__ void cast8_##an##_##bn(const A* src, B* dst, u64 n) {                              \
        PDL_ENTRY();                                                                                         \
        cast8_impl(src, dst, n);                                                                             \
    }                                                                                                        \
    extern "C" __global__ void add_bias8_##an##_##bn(A* y, const B* bias, u64 n, u64 channels, u64 inner) {\
        PDL_ENTRY();                                                                                         \
        add_bias8_impl(y, bias, n, channels, inner);                                                         \
    }                                                                                                        \
    extern "C" __global__ void act_fwd8_##an##_##bn(int act, const A* x, B* y, u64 n) {                    \
        PDL_ENTRY();                                                                                         \
        act_fwd8_impl(act, x, y, n);                                                                         \
    }                                                                                                        \
    extern "C" __global__ void act_bwd8_##an##_##bn(int act, const A* x, const B* dy, B* dx, u64 n) {      \
        PDL_ENTRY();                                                                                         \
        act_bwd8_impl(act, x, dy, dx, n);                                                                    \
    }
FOR_FLOAT_PAIR(ELEMENTWISE8)
