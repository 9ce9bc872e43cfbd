// The decision of a training step, made on the device: Backend::step_control's second pass. It performs
// mantissa_core::control::decide operation for operation (that function is the specification), so the
// overflow flag never crosses the bus and a step is a fixed sequence of launches (a CUDA graph can replay it).
//
// ctl: the step-control block, CTL_WORDS u32 words (f32 ones stored as their bits; u64 counters as (low, high)
// pairs); the CTL_* word indices are defined from mantissa_core::control by kernels.rs. One block of 256 threads:
// the threads add up grad_stats_ctl's per-block partials, thread 0 then reads and writes the block.

#define LOSS_SCALE_NONE 0
#define LOSS_SCALE_FIXED 1
#define LOSS_SCALE_DYNAMIC 2
#define CONTROL_THREADS 256

__device__ __forceinline__ float ctl_get_f32(const unsigned* c, int w) { return __uint_as_float(c[w]); }
__device__ __forceinline__ void ctl_set_f32(unsigned* c, int w, float v) { c[w] = __float_as_uint(v); }
__device__ __forceinline__ u64 ctl_get_u64(const unsigned* c, int w) { return (u64)c[w] | ((u64)c[w + 1] << 32); }
__device__ __forceinline__ void ctl_set_u64(unsigned* c, int w, u64 v) {
    c[w] = (unsigned)v;
    c[w + 1] = (unsigned)(v >> 32);
}

// sums, counts: [parts] per-block f64 sums of squares and non-finite counts of the unscaled gradients
// (grad_stats_ctl; parts may be 0: no gradients). loss: [1] (L), copied to LAST_LOSS as the host widens it.
// The StepRule's constants come as arguments: mode (LOSS_SCALE_*), fixed_scale (LossScale::Fixed), the
// DynamicConfig fields, the clip norm (has_clip) and AdamW's betas (has_adam).
template <typename L>
__device__ void step_control_impl(unsigned* ctl, const double* sums, const u64* counts, u64 parts, const L* loss,
                                  int mode, float fixed_scale, float growth_factor, float backoff_factor,
                                  unsigned growth_interval, unsigned hysteresis, float min_scale, int has_clip,
                                  float clip_norm, int has_adam, float beta1, float beta2) {
    __shared__ double sh_sum[CONTROL_THREADS];
    __shared__ u64 sh_cnt[CONTROL_THREADS];
    double s = 0.0;
    u64 bad = 0;
    for (u64 i = threadIdx.x; i < parts; i += CONTROL_THREADS) {
        s += sums[i];
        bad += counts[i];
    }
    sh_sum[threadIdx.x] = s;
    sh_cnt[threadIdx.x] = bad;
    __syncthreads();
    for (unsigned half = CONTROL_THREADS / 2; half > 0; half >>= 1) {
        if (threadIdx.x < half) {
            sh_sum[threadIdx.x] += sh_sum[threadIdx.x + half];
            sh_cnt[threadIdx.x] += sh_cnt[threadIdx.x + half];
        }
        __syncthreads();
    }
    if (threadIdx.x != 0) return;
    const u64 non_finite = sh_cnt[0];
    const double sum_sq = sh_sum[0];

    ctl_set_f32(ctl, CTL_LAST_LOSS, ld(loss, 0));

    // decide(): the scale this step used, adapted as LossScale::update does.
    const float scale = ctl_get_f32(ctl, CTL_SCALE);
    const bool finite = non_finite == 0;
    const float norm = finite ? (float)sqrt(sum_sq) : __uint_as_float(0x7fc00000u);  // f32::NAN
    bool apply = finite;
    float next = 1.0f;  // LossScale::None
    if (mode == LOSS_SCALE_FIXED) {
        next = fixed_scale;
    } else if (mode == LOSS_SCALE_DYNAMIC) {
        // DynamicLossScale::update on the block's state.
        next = scale;
        unsigned good = ctl[CTL_GOOD_STEPS], left = ctl[CTL_HYSTERESIS_LEFT];
        if (finite) {
            good += 1;
            if (good >= growth_interval) {
                const float grown = next * growth_factor;
                if (isfinite(grown)) next = grown;  // keep the old scale when growing would overflow f32
                good = 0;
                left = hysteresis;
            }
            apply = true;
        } else {
            good = 0;
            if (left <= 1) {
                next = fmaxf(next * backoff_factor, min_scale);  // f32::max: a NaN operand loses
            } else {
                left -= 1;
            }
            apply = false;
        }
        ctl[CTL_GOOD_STEPS] = good;
        ctl[CTL_HYSTERESIS_LEFT] = left;
    }
    ctl_set_f32(ctl, CTL_SCALE, next);
    ctl_set_f32(ctl, CTL_LAST_SCALE, scale);
    ctl_set_f32(ctl, CTL_LAST_NORM, norm);
    ctl[CTL_LAST_NON_FINITE] = non_finite > 0xffffffffull ? 0xffffffffu : (unsigned)non_finite;
    ctl[CTL_LAST_APPLIED] = apply ? 1u : 0u;
    if (apply) {
        const float clip = (has_clip && norm > clip_norm) ? clip_norm / (norm + 1e-6f) : 1.0f;
        ctl_set_f32(ctl, CTL_GRAD_MUL, (1.0f / scale) * clip);
        const u64 t = ctl_get_u64(ctl, CTL_UPDATES) + 1;
        ctl_set_u64(ctl, CTL_UPDATES, t);
        if (has_adam) {
            // control::bias_corrections: 1 - beta^t in f64, rounded to f32.
            const double td = (double)(t > 0 ? t : 1);
            ctl_set_f32(ctl, CTL_BIAS_CORRECTION1, (float)(1.0 - pow((double)beta1, td)));
            ctl_set_f32(ctl, CTL_BIAS_CORRECTION2, (float)(1.0 - pow((double)beta2, td)));
        }
    } else {
        ctl_set_u64(ctl, CTL_SKIPPED, ctl_get_u64(ctl, CTL_SKIPPED) + 1);
    }
}

#define STEP_CONTROL(ln, L)                                                                                  \
    extern "C" __global__ void step_control_##ln(                                                            \
        unsigned* ctl, const double* sums, const u64* counts, u64 parts, const L* loss, int mode,            \
        float fixed_scale, float growth_factor, float backoff_factor, unsigned growth_interval,              \
        unsigned hysteresis, float min_scale, int has_clip, float clip_norm, int has_adam, float beta1,      \
        float beta2) {                                                                                       \
        PDL_ENTRY();                                                                                         \
        step_control_impl(ctl, sums, counts, parts, loss, mode, fixed_scale, growth_factor, backoff_factor,  \
                          growth_interval, hysteresis, min_scale, has_clip, clip_norm, has_adam, beta1, beta2); \
    }
FOR_FLOAT(STEP_CONTROL)
