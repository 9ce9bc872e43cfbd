// Convolution data movement: im2col and its adjoint col2im, NCHW.
// x: [images, C, H, W]; cols: [images, C*K*K, OH*OW] with row r = (c*K + ki)*K + kj, column p = oh*OW + ow.

// One thread per element of cols (coalesced writes); zero padding.
template <typename X, typename C>
__device__ void im2col_impl(const X* x, C* cols, i64 images, i64 ch, i64 h, i64 w, i64 k, i64 s, i64 pad, i64 oh_n,
                            i64 ow_n) {
    const u64 pos = (u64)(oh_n * ow_n), per = (u64)(ch * k * k) * pos, n = (u64)images * per;
    for (u64 i = gtid(); i < n; i += gstride()) {
        const i64 img = (i64)(i / per);
        const u64 rem = i % per;
        const i64 r = (i64)(rem / pos), p = (i64)(rem % pos);
        const i64 c = r / (k * k), ki = (r / k) % k, kj = r % k;
        const i64 ih = (p / ow_n) * s + ki - pad, iw = (p % ow_n) * s + kj - pad;
        float v = 0.0f;
        if (ih >= 0 && iw >= 0 && ih < h && iw < w) v = ld(x, (u64)(((img * ch + c) * h + ih) * w + iw));
        st(cols, i, v);
    }
}

// One thread per input pixel: gathers every (tap, output position) that read it, in the reference's order
// (ki, then kj), accumulating in f32 and storing once. No atomics: deterministic and bit-identical to the
// reference.
template <typename C, typename X>
__device__ void col2im_impl(const C* cols, X* dx, i64 images, i64 ch, i64 h, i64 w, i64 k, i64 s, i64 pad,
                            i64 oh_n, i64 ow_n) {
    const i64 pos = oh_n * ow_n, per = ch * k * k * pos;
    const u64 n = (u64)(images * ch * h * w);
    for (u64 i = gtid(); i < n; i += gstride()) {
        const i64 iw = (i64)(i % (u64)w), ih = (i64)((i / (u64)w) % (u64)h);
        const i64 c = (i64)((i / (u64)(w * h)) % (u64)ch), img = (i64)(i / (u64)(w * h * ch));
        const u64 cb = (u64)(img * per);
        float acc = 0.0f;
        for (i64 ki = 0; ki < k; ki++) {
            const i64 oh_num = ih + pad - ki;
            if (oh_num < 0 || oh_num % s != 0) continue;
            const i64 oh = oh_num / s;
            if (oh >= oh_n) continue;
            for (i64 kj = 0; kj < k; kj++) {
                const i64 ow_num = iw + pad - kj;
                if (ow_num < 0 || ow_num % s != 0) continue;
                const i64 ow = ow_num / s;
                if (ow >= ow_n) continue;
                const i64 r = (c * k + ki) * k + kj;
                acc += ld(cols, cb + (u64)(r * pos + oh * ow_n + ow));
            }
        }
        st(dx, i, acc);
    }
}

#define CONV(an, A, bn, B)                                                                                   \
    extern "C" __global__ void im2col_##an##_##bn(const A* x, B* cols, i64 images, i64 ch, i64 h, i64 w,    \
                                                  i64 k, i64 s, i64 pad, i64 oh, i64 ow) {                   \
        PDL_ENTRY();                                                                                         \
        im2col_impl(x, cols, images, ch, h, w, k, s, pad, oh, ow);                                           \
    }                                                                                                        \
    extern "C" __global__ void col2im_##an##_##bn(const A* cols, B* dx, i64 images, i64 ch, i64 h, i64 w,   \
                                                  i64 k, i64 s, i64 pad, i64 oh, i64 ow) {                   \
        PDL_ENTRY();                                                                                         \
        col2im_impl(cols, dx, images, ch, h, w, k, s, pad, oh, ow);                                          \
    }
FOR_FLOAT_PAIR(CONV)
