// Layouts of the fused AdamW update, for examples/adamw_layout.rs (compiled after common.cuh and optim.cu, whose
// adamw_elem, Quad, ld4cs, st4cs and st4 these use: the arithmetic is the production kernel's).
//
// adamw_lay_{name}: QPP quads (4 parameters) per thread per pass, all of a pass's loads issued first; CONTIG
// picks which quads a pass takes:
//   CONTIG = 0: quads q + k T (T threads in the grid), k < QPP, as adamw8 does for QPP = 2;
//   CONTIG = 1: warp-contiguous: a warp's pass covers 32 QPP adjacent quads (lane l takes base + 32 k + l), so
//               each array is read and written in runs of 512 QPP bytes.
// PF: 0, or 256 for loads with the .L2::256B prefetch-size hint. n must be a multiple of 4 (no scalar tail).

template <int PF>
__device__ __forceinline__ Quad<float> ld4cs_pf(const float* p, u64 q) {
    Quad<float> r;
    if (PF == 256) {
        asm("ld.global.cs.L2::256B.v4.f32 {%0, %1, %2, %3}, [%4];"
            : "=f"(r.v[0]), "=f"(r.v[1]), "=f"(r.v[2]), "=f"(r.v[3])
            : "l"(p + 4 * q));
    } else {
        r = ld4cs(p, q);
    }
    return r;
}

template <typename W, int QPP, int CONTIG, int PF>
__device__ void adamw_lay_impl(float* master, W* working, const float* grad, float* m, float* v, u64 n,
                               float step_size, float bc2_sqrt, float decay, float beta1, float beta2, float eps,
                               float grad_scale) {
    const u64 quads = n / 4, T = gstride();
    const u64 lane = threadIdx.x & 31, warp = gtid() >> 5, warps = T >> 5;
    // The first quad of this thread's pass p, and the step between its quads.
    const u64 step = CONTIG ? 32 : T;
    const u64 first = CONTIG ? warp * 32 * QPP + lane : gtid();
    const u64 stride = CONTIG ? warps * 32 * QPP : T * QPP;
    for (u64 q0 = first;; q0 += stride) {
        Quad<float> g[QPP], mm[QPP], vv[QPP], ww[QPP];
        bool any = false;
#pragma unroll
        for (int k = 0; k < QPP; k++) {
            const u64 q = q0 + k * step;
            if (q < quads) {
                any = true;
                g[k] = ld4cs_pf<PF>(grad, q);
                mm[k] = ld4cs_pf<PF>(m, q);
                vv[k] = ld4cs_pf<PF>(v, q);
                ww[k] = ld4cs_pf<PF>(master, q);
            }
        }
        if (!any) break;
#pragma unroll
        for (int k = 0; k < QPP; k++) {
            const u64 q = q0 + k * step;
            if (q < quads)
                adamw_quad(master, working, m, v, q, g[k], mm[k], vv[k], ww[k], step_size, bc2_sqrt, decay, beta1,
                           beta2, eps, grad_scale, 1);
        }
    }
}

#define LAYOUT(name, QPP, CONTIG, PF, THREADS, MINB)                                                          \
    extern "C" __global__ void __launch_bounds__(THREADS, MINB)                                                \
        adamw_lay_##name(float* master, bf16* working, const float* grad, float* m, float* v, u64 n,           \
                         float step_size, float bc2_sqrt, float decay, float beta1, float beta2, float eps,    \
                         float grad_scale) {                                                                   \
        adamw_lay_impl<bf16, QPP, CONTIG, PF>(master, working, grad, m, v, n, step_size, bc2_sqrt, decay,      \
                                              beta1, beta2, eps, grad_scale);                                  \
    }

LAYOUT(q2_strided, 2, 0, 0, 256, 4)
LAYOUT(q2_contig, 2, 1, 0, 256, 4)
LAYOUT(q1_contig_8, 1, 1, 0, 256, 8)
LAYOUT(q4_contig_2, 4, 1, 0, 256, 2)
LAYOUT(q4_strided_2, 4, 0, 0, 256, 2)
LAYOUT(q2_strided_pf, 2, 0, 256, 256, 4)
LAYOUT(q2_contig_pf, 2, 1, 256, 256, 4)
LAYOUT(q4_contig_2_pf, 4, 1, 256, 256, 2)

// A copy of n f32 in quads (the bandwidth a streaming pass can get), grid-strided.
extern "C" __global__ void __launch_bounds__(256, 4) copy_quads(const float* src, float* dst, u64 n) {
    for (u64 q = gtid(); q < n / 4; q += gstride()) st4cs(dst, q, ld4cs(src, q));
}
