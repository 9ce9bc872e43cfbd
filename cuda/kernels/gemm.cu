// The naive matrix product: the fallback for what cuBLAS does not take (mixed 16-bit dtypes, f32 inputs with
// a 16-bit C, k == 0, leading dimensions cuBLAS rejects, batches whose C overlap) and a cross-check for it.
// Semantics of mantissa_core::backend::Gemm: row-major, op(A) [m, k], op(B) [k, n], C [m, n] with leading
// dimensions lda/ldb/ldc and per-problem element strides; f32 accumulation in order p = 0..k; beta == 0
// does not read C. One thread per (i, j); it walks the batch in order, so batches sharing C (stride 0)
// accumulate as they do in the reference.
template <typename A, typename C>
__device__ void gemm_naive_impl(const A* a, const A* b, C* c, u64 m, u64 n, u64 k, u64 lda, u64 ldb, u64 ldc,
                                int trans_a, int trans_b, float alpha, float beta, u64 batch, u64 sa, u64 sb,
                                u64 sc) {
    for (u64 idx = gtid(); idx < m * n; idx += gstride()) {
        const u64 i = idx / n, j = idx % n;
        for (u64 t = 0; t < batch; t++) {
            const u64 a0 = t * sa, b0 = t * sb, ci = t * sc + i * ldc + j;
            float acc = 0.0f;
            for (u64 p = 0; p < k; p++) {
                const float av = ld(a, trans_a ? a0 + p * lda + i : a0 + i * lda + p);
                const float bv = ld(b, trans_b ? b0 + j * ldb + p : b0 + p * ldb + j);
                acc += av * bv;
            }
            st(c, ci, beta == 0.0f ? alpha * acc : alpha * acc + beta * ld(c, ci));
        }
    }
}

#define GEMM(an, A, cn, C)                                                                                   \
    extern "C" __global__ void gemm_naive_##an##_##cn(const A* a, const A* b, C* c, u64 m, u64 n, u64 k,     \
                                                      u64 lda, u64 ldb, u64 ldc, int trans_a, int trans_b,   \
                                                      float alpha, float beta, u64 batch, u64 sa, u64 sb,    \
                                                      u64 sc) {                                              \
        PDL_ENTRY();                                                                                         \
        gemm_naive_impl(a, b, c, m, n, k, lda, ldb, ldc, trans_a, trans_b, alpha, beta, batch, sa, sb, sc);  \
    }
FOR_FLOAT_PAIR(GEMM)
