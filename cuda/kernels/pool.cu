// 2-D max-pool, NCHW, windows inside the image (the host checks the geometry).
// x: [images, C, H, W] -> y: [images, C, OH, OW]; argmax (i32, like y) holds each max's flat index within its
// image, (c*H + ih)*W + iw. Ties go to the first position in row-major order; NaN propagates (as PyTorch).

// One thread per output element.
template <typename X, typename Y>
__device__ void maxpool_impl(const X* x, Y* y, int* argmax, i64 images, i64 ch, i64 h, i64 w, i64 k, i64 s,
                             i64 oh_n, i64 ow_n) {
    const i64 in_len = ch * h * w, out_len = ch * oh_n * ow_n;
    const u64 n = (u64)(images * out_len);
    for (u64 o = gtid(); o < n; o += gstride()) {
        const i64 ow = (i64)(o % (u64)ow_n), oh = (i64)((o / (u64)ow_n) % (u64)oh_n);
        const i64 c = (i64)((o / (u64)(ow_n * oh_n)) % (u64)ch), img = (i64)(o / (u64)out_len);
        float best = -INFINITY;
        i64 best_i = (c * h + oh * s) * w + ow * s;
        for (i64 ki = 0; ki < k; ki++) {
            for (i64 kj = 0; kj < k; kj++) {
                const i64 i = (c * h + oh * s + ki) * w + ow * s + kj;
                const float v = ld(x, (u64)(img * in_len + i));
                if (!(v <= best) && !isnan(best)) {
                    best = v;
                    best_i = i;
                }
            }
        }
        st(y, o, best);
        argmax[o] = (int)best_i;
    }
}

// dx (overwritten) = dy scattered to the recorded positions. Written as a gather, one thread per input pixel:
// it visits the outputs whose window covers the pixel in increasing output order and adds the gradient of each
// whose argmax is this pixel, rounding to X after every addition as the reference's in-place sum does.
// An argmax that does not point into its own window contributes nothing.
template <typename D, typename X>
__device__ void maxpool_bwd_impl(const D* dy, const int* argmax, X* dx, i64 images, i64 ch, i64 h, i64 w, i64 k,
                                 i64 s, i64 oh_n, i64 ow_n) {
    const i64 in_len = ch * h * w, out_len = ch * oh_n * ow_n;
    const u64 n = (u64)(images * in_len);
    for (u64 i = gtid(); i < n; i += gstride()) {
        const i64 img = (i64)(i / (u64)in_len), pix = (i64)(i % (u64)in_len);
        const i64 iw = pix % w, ih = (pix / w) % h, c = pix / (w * h);
        // Outputs oh with oh*s <= ih < oh*s + k.
        const i64 oh_lo = ih >= k ? (ih - k) / s + 1 : 0, oh_hi = min(ih / s, oh_n - 1);
        const i64 ow_lo = iw >= k ? (iw - k) / s + 1 : 0, ow_hi = min(iw / s, ow_n - 1);
        float acc = 0.0f;
        for (i64 oh = oh_lo; oh <= oh_hi; oh++) {
            for (i64 ow = ow_lo; ow <= ow_hi; ow++) {
                const u64 o = (u64)(img * out_len + (c * oh_n + oh) * ow_n + ow);
                if (argmax[o] == pix) acc = rnd(dx, acc + ld(dy, o));
            }
        }
        st(dx, i, acc);
    }
}

#define POOL(an, A, bn, B)                                                                                   \
    extern "C" __global__ void maxpool_##an##_##bn(const A* x, B* y, int* argmax, i64 images, i64 ch, i64 h, \
                                                   i64 w, i64 k, i64 s, i64 oh, i64 ow) {                    \
        PDL_ENTRY();                                                                                         \
        maxpool_impl(x, y, argmax, images, ch, h, w, k, s, oh, ow);                                          \
    }                                                                                                        \
    extern "C" __global__ void maxpool_bwd_##an##_##bn(const A* dy, const int* argmax, B* dx, i64 images,    \
                                                       i64 ch, i64 h, i64 w, i64 k, i64 s, i64 oh, i64 ow) { \
        PDL_ENTRY();                                                                                         \
        maxpool_bwd_impl(dy, argmax, dx, images, ch, h, w, k, s, oh, ow);                                    \
    }
FOR_FLOAT_PAIR(POOL)
