// Fused optimizer updates: f32 master weights, f32 gradients and state, updated in place, and the working
// copy (W: the compute dtype) rewritten from the new master when write_working != 0. One thread per
// parameter; the arithmetic is the reference's, operation for operation (compiled without FMA contraction),
// so the results match it bit for bit.

// PyTorch SGD (dampening 0). mom is unused (may be null) when momentum == 0.
template <typename W>
__device__ void sgd_impl(float* master, W* working, const float* grad, float* mom, u64 n, float lr, float momentum,
                         int nesterov, float weight_decay, float grad_scale, int write_working) {
    for (u64 i = gtid(); i < n; i += gstride()) {
        const float wi = master[i];
        float gi = grad[i] * grad_scale + weight_decay * wi;
        if (momentum != 0.0f) {
            const float b = momentum * mom[i] + gi;
            mom[i] = b;
            gi = nesterov ? gi + momentum * b : b;
        }
        const float w = wi - lr * gi;
        master[i] = w;
        if (write_working) st(working, i, w);
    }
}

// PyTorch AdamW. step_size = lr / bias_correction1, bc2_sqrt = sqrt(bias_correction2) and
// decay = 1 - lr * weight_decay are computed once on the host, as the reference does.
template <typename W>
__device__ void adamw_impl(float* master, W* working, const float* grad, float* m, float* v, u64 n, float step_size,
                           float bc2_sqrt, float decay, float beta1, float beta2, float eps, float grad_scale,
                           int write_working) {
    for (u64 i = gtid(); i < n; i += gstride()) {
        const float gi = grad[i] * grad_scale;
        const float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        const float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        const float denom = sqrtf(vi) / bc2_sqrt + eps;
        const float wi = master[i] * decay;
        const float w = wi - step_size * (mi / denom);
        master[i] = w;
        if (write_working) st(working, i, w);
    }
}

// The `*8` variants: groups of 8 parameters with 16-byte loads and stores (every array 16-byte aligned: the
// host checks), the same arithmetic per parameter, then the last n % 8 one by one.
template <typename W>
__device__ void adamw8_impl(float* master, W* working, const float* grad, float* m, float* v, u64 n, float step_size,
                            float bc2_sqrt, float decay, float beta1, float beta2, float eps, float grad_scale,
                            int write_working) {
    const u64 groups = n / 8;
    for (u64 g = gtid(); g < groups; g += gstride()) {
        const Pack8<float> gr = ld8(grad, g);
        Pack8<float> mm = ld8((const float*)m, g), vv = ld8((const float*)v, g), ww = ld8((const float*)master, g);
        Pack8<W> wk;
#pragma unroll
        for (int k = 0; k < 8; k++) {
            const float gi = gr.v[k] * grad_scale;
            const float mi = beta1 * mm.v[k] + (1.0f - beta1) * gi;
            const float vi = beta2 * vv.v[k] + (1.0f - beta2) * gi * gi;
            mm.v[k] = mi;
            vv.v[k] = vi;
            const float denom = sqrtf(vi) / bc2_sqrt + eps;
            const float wi = ww.v[k] * decay;
            const float w = wi - step_size * (mi / denom);
            ww.v[k] = w;
            st(wk.v, k, w);
        }
        st8(m, g, mm);
        st8(v, g, vv);
        st8(master, g, ww);
        if (write_working) st8(working, g, wk);
    }
    const u64 done = groups * 8;
    if (gtid() < n - done)
        adamw_impl(master + done, working + done, grad + done, m + done, v + done, n - done, step_size, bc2_sqrt,
                   decay, beta1, beta2, eps, grad_scale, write_working);
}

template <typename W>
__device__ void sgd8_impl(float* master, W* working, const float* grad, float* mom, u64 n, float lr, float momentum,
                          int nesterov, float weight_decay, float grad_scale, int write_working) {
    const u64 groups = n / 8;
    for (u64 g = gtid(); g < groups; g += gstride()) {
        const Pack8<float> gr = ld8(grad, g);
        Pack8<float> ww = ld8((const float*)master, g), mm;
        if (momentum != 0.0f) mm = ld8((const float*)mom, g);
        Pack8<W> wk;
#pragma unroll
        for (int k = 0; k < 8; k++) {
            const float wi = ww.v[k];
            float gi = gr.v[k] * grad_scale + weight_decay * wi;
            if (momentum != 0.0f) {
                const float b = momentum * mm.v[k] + gi;
                mm.v[k] = b;
                gi = nesterov ? gi + momentum * b : b;
            }
            const float w = wi - lr * gi;
            ww.v[k] = w;
            st(wk.v, k, w);
        }
        if (momentum != 0.0f) st8(mom, g, mm);
        st8(master, g, ww);
        if (write_working) st8(working, g, wk);
    }
    const u64 done = groups * 8;
    if (gtid() < n - done)
        sgd_impl(master + done, working + done, grad + done, momentum != 0.0f ? mom + done : mom, n - done, lr,
                 momentum, nesterov, weight_decay, grad_scale, write_working);
}

#define OPTIM(wn, W)                                                                                         \
    extern "C" __global__ void sgd_##wn(float* master, W* working, const float* grad, float* mom, u64 n,     \
                                        float lr, float momentum, int nesterov, float weight_decay,          \
                                        float grad_scale, int write_working) {                               \
        sgd_impl(master, working, grad, mom, n, lr, momentum, nesterov, weight_decay, grad_scale,            \
                 write_working);                                                                             \
    }                                                                                                        \
    extern "C" __global__ void adamw_##wn(float* master, W* working, const float* grad, float* m, float* v,  \
                                          u64 n, float step_size, float bc2_sqrt, float decay, float beta1,  \
                                          float beta2, float eps, float grad_scale, int write_working) {     \
        adamw_impl(master, working, grad, m, v, n, step_size, bc2_sqrt, decay, beta1, beta2, eps,            \
                   grad_scale, write_working);                                                               \
    }
FOR_FLOAT(OPTIM)

#define OPTIM8(wn, W)                                                                                        \
    extern "C" __global__ void sgd8_##wn(float* master, W* working, const float* grad, float* mom, u64 n,    \
                                         float lr, float momentum, int nesterov, float weight_decay,         \
                                         float grad_scale, int write_working) {                              \
        sgd8_impl(master, working, grad, mom, n, lr, momentum, nesterov, weight_decay, grad_scale,           \
                  write_working);                                                                            \
    }                                                                                                        \
    extern "C" __global__ void adamw8_##wn(float* master, W* working, const float* grad, float* m, float* v, \
                                           u64 n, float step_size, float bc2_sqrt, float decay, float beta1, \
                                           float beta2, float eps, float grad_scale, int write_working) {    \
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
        if (gate_closed(ctl)) return;                                                                        \
        sgd_impl(master, working, grad, mom, n, lr, momentum, nesterov, weight_decay,                        \
                 ctl_word_f32(ctl, CTL_GRAD_MUL), write_working);                                            \
    }                                                                                                        \
    extern "C" __global__ void sgd8_gated_##wn(float* master, W* working, const float* grad, float* mom,     \
                                               u64 n, float lr, float momentum, int nesterov,                \
                                               float weight_decay, const unsigned* ctl, int write_working) {  \
        if (gate_closed(ctl)) return;                                                                        \
        sgd8_impl(master, working, grad, mom, n, lr, momentum, nesterov, weight_decay,                       \
                  ctl_word_f32(ctl, CTL_GRAD_MUL), write_working);                                           \
    }                                                                                                        \
    extern "C" __global__ void adamw_gated_##wn(float* master, W* working, const float* grad, float* m,      \
                                                float* v, u64 n, float lr, float beta1, float beta2,         \
                                                float eps, float weight_decay, const unsigned* ctl,          \
                                                int write_working) {                                         \
        if (gate_closed(ctl)) return;                                                                        \
        const float bc1 = ctl_word_f32(ctl, CTL_BIAS_CORRECTION1), bc2 = ctl_word_f32(ctl, CTL_BIAS_CORRECTION2); \
        adamw_impl(master, working, grad, m, v, n, lr / bc1, sqrtf(bc2), 1.0f - lr * weight_decay, beta1,    \
                   beta2, eps, ctl_word_f32(ctl, CTL_GRAD_MUL), write_working);                              \
    }                                                                                                        \
    extern "C" __global__ void adamw8_gated_##wn(float* master, W* working, const float* grad, float* m,     \
                                                 float* v, u64 n, float lr, float beta1, float beta2,        \
                                                 float eps, float weight_decay, const unsigned* ctl,         \
                                                 int write_working) {                                        \
        if (gate_closed(ctl)) return;                                                                        \
        const float bc1 = ctl_word_f32(ctl, CTL_BIAS_CORRECTION1), bc2 = ctl_word_f32(ctl, CTL_BIAS_CORRECTION2); \
        adamw8_impl(master, working, grad, m, v, n, lr / bc1, sqrtf(bc2), 1.0f - lr * weight_decay, beta1,   \
                    beta2, eps, ctl_word_f32(ctl, CTL_GRAD_MUL), write_working);                             \
    }
FOR_FLOAT(OPTIM_GATED)
