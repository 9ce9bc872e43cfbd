// Fused optimizer updates: f32 master weights, f32 gradients and state, updated in place, and the working
// copy (W: the compute dtype) rewritten from the new master when write_working != 0. One thread per
// parameter; the arithmetic is the reference's, operation for operation (compiled without FMA contraction),
// so the results match it bit for bit.

// The per-parameter arithmetic, shared by the scalar and the vectorised kernels (one definition, so both give
// the same bits).

// PyTorch SGD (dampening 0): returns the new weight; `b` (the momentum buffer) is read and updated only when
// momentum != 0.
__device__ __forceinline__ float sgd_elem(float g, float& b, float wi, float lr, float momentum, int nesterov,
                                          float weight_decay, float grad_scale) {
    float gi = g * grad_scale + weight_decay * wi;
    if (momentum != 0.0f) {
        const float bi = momentum * b + gi;
        b = bi;
        gi = nesterov ? gi + momentum * bi : bi;
    }
    return wi - lr * gi;
}

// PyTorch AdamW: returns the new weight and updates `m`, `v`. step_size = lr / bias_correction1,
// bc2_sqrt = sqrt(bias_correction2) and decay = 1 - lr * weight_decay are computed once on the host, as the
// reference does.
__device__ __forceinline__ float adamw_elem(float g, float& m, float& v, float w, float step_size, float bc2_sqrt,
                                            float decay, float beta1, float beta2, float eps, float grad_scale) {
    const float gi = g * grad_scale;
    const float mi = beta1 * m + (1.0f - beta1) * gi;
    const float vi = beta2 * v + (1.0f - beta2) * gi * gi;
    m = mi;
    v = vi;
    const float denom = sqrtf(vi) / bc2_sqrt + eps;
    const float wi = w * decay;
    return wi - step_size * (mi / denom);
}

// PyTorch SGD (dampening 0). mom is unused (may be null) when momentum == 0.
template <typename W>
__device__ void sgd_impl(float* master, W* working, const float* grad, float* mom, u64 n, float lr, float momentum,
                         int nesterov, float weight_decay, float grad_scale, int write_working) {
    for (u64 i = gtid(); i < n; i += gstride()) {
        float b = momentum != 0.0f ? mom[i] : 0.0f;
        const float w = sgd_elem(grad[i], b, master[i], lr, momentum, nesterov, weight_decay, grad_scale);
        if (momentum != 0.0f) mom[i] = b;
        master[i] = w;
        if (write_working) st(working, i, w);
    }
}

// PyTorch AdamW (see adamw_elem).
template <typename W>
__device__ void adamw_impl(float* master, W* working, const float* grad, float* m, float* v, u64 n, float step_size,
                           float bc2_sqrt, float decay, float beta1, float beta2, float eps, float grad_scale,
                           int write_working) {
    for (u64 i = gtid(); i < n; i += gstride()) {
        float mi = m[i], vi = v[i];
        const float w =
            adamw_elem(grad[i], mi, vi, master[i], step_size, bc2_sqrt, decay, beta1, beta2, eps, grad_scale);
        m[i] = mi;
        v[i] = vi;
        master[i] = w;
        if (write_working) st(working, i, w);
    }
}

// ---- The `*8` variants: 8 parameters per thread per pass, as two quads (4 consecutive parameters: 16 bytes of
// each f32 array). Every array is 16-byte aligned (the host checks); the last n % 4 go one by one.
//
// Why this shape (these kernels only move memory: ~30 bytes per AdamW parameter):
// - Pass p of a thread t (T threads in the grid) covers quads 2pT + t and 2pT + T + t, so each warp-wide
//   16-byte load or store covers 512 contiguous bytes: whole 32-byte sectors. (Groups of 8 f32 per thread,
//   moved as two 16-byte halves, left every instruction touching half of each sector, and every store a
//   partial-sector write.)
// - All loads of a pass (8 x 16 bytes for AdamW) are issued before any arithmetic.
// - The f32 arrays are touched once per step, so they are loaded and stored with the streaming (evict-first)
//   hint, as CUDA's __ldcs / __stcs: the ~240 MB passing through do not push the working copy, written with
//   plain stores and read by the next forward pass, out of L2.
// - STREAM_BOUNDS caps the registers so that 4 blocks of 256 threads share an SM. The host launches one pass a
//   thread (control.rs, CudaBackend::optim): on the H200 that beat one wave of 4 blocks an SM looping over the
//   passes by 4% (examples/adamw_layout.rs, which also times other layouts of these loads: none was faster).
#define STREAM_BOUNDS __launch_bounds__(256, 4)

template <typename T>
struct alignas(4 * sizeof(T)) Quad {
    T v[4];
};
// Quad q (elements 4q..4q+3) of an f32 array, streaming.
__device__ __forceinline__ Quad<float> ld4cs(const float* p, u64 q) {
    Quad<float> r;
    asm("ld.global.cs.v4.f32 {%0, %1, %2, %3}, [%4];"
        : "=f"(r.v[0]), "=f"(r.v[1]), "=f"(r.v[2]), "=f"(r.v[3])
        : "l"(p + 4 * q));
    return r;
}
__device__ __forceinline__ void st4cs(float* p, u64 q, const Quad<float>& r) {
    asm volatile("st.global.cs.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p + 4 * q), "f"(r.v[0]), "f"(r.v[1]),
                 "f"(r.v[2]), "f"(r.v[3])
                 : "memory");
}
// The working copy: a plain store of 16 bytes (f32) or 8 (a 16-bit type).
__device__ __forceinline__ void st4(float* p, u64 q, const Quad<float>& r) {
    *reinterpret_cast<uint4*>(p + 4 * q) = *reinterpret_cast<const uint4*>(&r);
}
template <typename H>
__device__ __forceinline__ void st4(H* p, u64 q, const Quad<H>& r) {
    *reinterpret_cast<uint2*>(p + 4 * q) = *reinterpret_cast<const uint2*>(&r);
}

// One loaded quad: the arithmetic, then the stores.
template <typename W>
__device__ __forceinline__ void adamw_quad(float* master, W* working, float* m, float* v, u64 q, const Quad<float>& g,
                                           Quad<float>& mm, Quad<float>& vv, Quad<float>& ww, float step_size,
                                           float bc2_sqrt, float decay, float beta1, float beta2, float eps,
                                           float grad_scale, int write_working) {
    Quad<W> wk;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        ww.v[k] = adamw_elem(g.v[k], mm.v[k], vv.v[k], ww.v[k], step_size, bc2_sqrt, decay, beta1, beta2, eps,
                             grad_scale);
        st(wk.v, k, ww.v[k]);
    }
    st4cs(m, q, mm);
    st4cs(v, q, vv);
    st4cs(master, q, ww);
    if (write_working) st4(working, q, wk);
}

template <typename W>
__device__ void adamw8_impl(float* master, W* working, const float* grad, float* m, float* v, u64 n, float step_size,
                            float bc2_sqrt, float decay, float beta1, float beta2, float eps, float grad_scale,
                            int write_working) {
    const u64 quads = n / 4, T = gstride();
    u64 q = gtid();
    for (; q + T < quads; q += 2 * T) {
        const Quad<float> g0 = ld4cs(grad, q), g1 = ld4cs(grad, q + T);
        Quad<float> m0 = ld4cs(m, q), m1 = ld4cs(m, q + T);
        Quad<float> v0 = ld4cs(v, q), v1 = ld4cs(v, q + T);
        Quad<float> w0 = ld4cs(master, q), w1 = ld4cs(master, q + T);
        adamw_quad(master, working, m, v, q, g0, m0, v0, w0, step_size, bc2_sqrt, decay, beta1, beta2, eps,
                   grad_scale, write_working);
        adamw_quad(master, working, m, v, q + T, g1, m1, v1, w1, step_size, bc2_sqrt, decay, beta1, beta2, eps,
                   grad_scale, write_working);
    }
    if (q < quads) {  // the last pass's second quad is past the end: one quad
        const Quad<float> g0 = ld4cs(grad, q);
        Quad<float> m0 = ld4cs(m, q), v0 = ld4cs(v, q), w0 = ld4cs(master, q);
        adamw_quad(master, working, m, v, q, g0, m0, v0, w0, step_size, bc2_sqrt, decay, beta1, beta2, eps,
                   grad_scale, write_working);
    }
    const u64 done = quads * 4;
    if (gtid() < n - done)
        adamw_impl(master + done, working + done, grad + done, m + done, v + done, n - done, step_size, bc2_sqrt,
                   decay, beta1, beta2, eps, grad_scale, write_working);
}

template <typename W>
__device__ __forceinline__ void sgd_quad(float* master, W* working, float* mom, u64 q, const Quad<float>& g,
                                         Quad<float>& mm, Quad<float>& ww, float lr, float momentum, int nesterov,
                                         float weight_decay, float grad_scale, int write_working) {
    Quad<W> wk;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        ww.v[k] = sgd_elem(g.v[k], mm.v[k], ww.v[k], lr, momentum, nesterov, weight_decay, grad_scale);
        st(wk.v, k, ww.v[k]);
    }
    if (momentum != 0.0f) st4cs(mom, q, mm);
    st4cs(master, q, ww);
    if (write_working) st4(working, q, wk);
}

template <typename W>
__device__ void sgd8_impl(float* master, W* working, const float* grad, float* mom, u64 n, float lr, float momentum,
                          int nesterov, float weight_decay, float grad_scale, int write_working) {
    const u64 quads = n / 4, T = gstride();
    const bool has_mom = momentum != 0.0f;
    const Quad<float> zero = {{0.0f, 0.0f, 0.0f, 0.0f}};
    u64 q = gtid();
    for (; q + T < quads; q += 2 * T) {
        const Quad<float> g0 = ld4cs(grad, q), g1 = ld4cs(grad, q + T);
        Quad<float> w0 = ld4cs(master, q), w1 = ld4cs(master, q + T);
        Quad<float> m0 = has_mom ? ld4cs(mom, q) : zero, m1 = has_mom ? ld4cs(mom, q + T) : zero;
        sgd_quad(master, working, mom, q, g0, m0, w0, lr, momentum, nesterov, weight_decay, grad_scale,
                 write_working);
        sgd_quad(master, working, mom, q + T, g1, m1, w1, lr, momentum, nesterov, weight_decay, grad_scale,
                 write_working);
    }
    if (q < quads) {
        const Quad<float> g0 = ld4cs(grad, q);
        Quad<float> w0 = ld4cs(master, q), m0 = has_mom ? ld4cs(mom, q) : zero;
        sgd_quad(master, working, mom, q, g0, m0, w0, lr, momentum, nesterov, weight_decay, grad_scale,
                 write_working);
    }
    const u64 done = quads * 4;
    if (gtid() < n - done)
        sgd_impl(master + done, working + done, grad + done, has_mom ? mom + done : mom, n - done, lr, momentum,
                 nesterov, weight_decay, grad_scale, write_working);
}

#define OPTIM(wn, W)                                                                                         \
    extern "C" __global__ void sgd_##wn(float* master, W* working, const float* grad, float* mom, u64 n,     \
                                        float lr, float momentum, int nesterov, float weight_decay,          \
                                        float grad_scale, int write_working) {                               \
        PDL_ENTRY();                                                                                         \
        sgd_impl(master, working, grad, mom, n, lr, momentum, nesterov, weight_decay, grad_scale,            \
                 write_working);                                                                             \
    }                                                                                                        \
    extern "C" __global__ void adamw_##wn(float* master, W* working, const float* grad, float* m, float* v,  \
                                          u64 n, float step_size, float bc2_sqrt, float decay, float beta1,  \
                                          float beta2, float eps, float grad_scale, int write_working) {     \
        PDL_ENTRY();                                                                                         \
        adamw_impl(master, working, grad, m, v, n, step_size, bc2_sqrt, decay, beta1, beta2, eps,            \
                   grad_scale, write_working);                                                               \
    }
FOR_FLOAT(OPTIM)

#define OPTIM8(wn, W)                                                                                        \
    extern "C" __global__ void STREAM_BOUNDS                                                                 \
    sgd8_##wn(float* master, W* working, const float* grad, float* mom, u64 n, float lr, float momentum,     \
              int nesterov, float weight_decay, float grad_scale, int write_working) {                       \
        PDL_ENTRY();                                                                                         \
        sgd8_impl(master, working, grad, mom, n, lr, momentum, nesterov, weight_decay, grad_scale,           \
                  write_working);                                                                            \
    }                                                                                                        \
    extern "C" __global__ void STREAM_BOUNDS                                                                 \
    adamw8_##wn(float* master, W* working, const float* grad, float* m, float* v, u64 n, float step_size,    \
                float bc2_sqrt, float decay, float beta1, float beta2, float eps, float grad_scale,          \
                int write_working) {                                                                         \
        PDL_ENTRY();                                                                                         \
        adamw8_impl(master, working, grad, m, v, n, step_size, bc2_sqrt, decay, beta1, beta2, eps,           \
                    grad_scale, write_working);                                                              \
    }
FOR_FLOAT(OPTIM8)

// The gated variants (Backend::sgd_step_gated / adamw_step_gated): the step-control block `ctl` (u32 words,
// CTL_* from mantissa_core::control) decides on the device. Every thread returns at once when the last step was
// skipped (LAST_APPLIED == 0); otherwise the gradient multiplier and AdamW's bias corrections come from the
// block, and the per-step scalars are derived from them in f32 exactly as the host derives them for adamw_step
// (IEEE division and square root), so a gated update equals the ungated one bit for bit.
__device__ __forceinline__ bool gate_closed(const unsigned* ctl) { return ctl[CTL_LAST_APPLIED] == 0u; }
__device__ __forceinline__ float ctl_word_f32(const unsigned* ctl, int w) { return __uint_as_float(ctl[w]); }

#define OPTIM_GATED(wn, W)                                                                                   \
    extern "C" __global__ void sgd_gated_##wn(float* master, W* working, const float* grad, float* mom, u64 n, \
                                              float lr, float momentum, int nesterov, float weight_decay,    \
                                              const unsigned* ctl, int write_working) {                      \
        PDL_ENTRY();                                                                                         \
        if (gate_closed(ctl)) return;                                                                        \
        sgd_impl(master, working, grad, mom, n, lr, momentum, nesterov, weight_decay,                        \
                 ctl_word_f32(ctl, CTL_GRAD_MUL), write_working);                                            \
    }                                                                                                        \
    extern "C" __global__ void STREAM_BOUNDS                                                                 \
    sgd8_gated_##wn(float* master, W* working, const float* grad, float* mom, u64 n, float lr,               \
                    float momentum, int nesterov, float weight_decay, const unsigned* ctl,                   \
                    int write_working) {                                                                     \
        PDL_ENTRY();                                                                                         \
        if (gate_closed(ctl)) return;                                                                        \
        sgd8_impl(master, working, grad, mom, n, lr, momentum, nesterov, weight_decay,                       \
                  ctl_word_f32(ctl, CTL_GRAD_MUL), write_working);                                           \
    }                                                                                                        \
    extern "C" __global__ void adamw_gated_##wn(float* master, W* working, const float* grad, float* m,      \
                                                float* v, u64 n, float lr, float beta1, float beta2,         \
                                                float eps, float weight_decay, const unsigned* ctl,          \
                                                int write_working) {                                         \
        PDL_ENTRY();                                                                                         \
        if (gate_closed(ctl)) return;                                                                        \
        const float bc1 = ctl_word_f32(ctl, CTL_BIAS_CORRECTION1), bc2 = ctl_word_f32(ctl, CTL_BIAS_CORRECTION2); \
        adamw_impl(master, working, grad, m, v, n, lr / bc1, sqrtf(bc2), 1.0f - lr * weight_decay, beta1,    \
                   beta2, eps, ctl_word_f32(ctl, CTL_GRAD_MUL), write_working);                              \
    }                                                                                                        \
    extern "C" __global__ void STREAM_BOUNDS                                                                 \
    adamw8_gated_##wn(float* master, W* working, const float* grad, float* m, float* v, u64 n, float lr,     \
                      float beta1, float beta2, float eps, float weight_decay, const unsigned* ctl,          \
                      int write_working) {                                                                   \
        PDL_ENTRY();                                                                                         \
        if (gate_closed(ctl)) return;                                                                        \
        const float bc1 = ctl_word_f32(ctl, CTL_BIAS_CORRECTION1), bc2 = ctl_word_f32(ctl, CTL_BIAS_CORRECTION2); \
        adamw8_impl(master, working, grad, m, v, n, lr / bc1, sqrtf(bc2), 1.0f - lr * weight_decay, beta1,   \
                    beta2, eps, ctl_word_f32(ctl, CTL_GRAD_MUL), write_working);                             \
    }
FOR_FLOAT(OPTIM_GATED)
