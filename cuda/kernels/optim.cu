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
