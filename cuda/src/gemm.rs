//! Matrix products: cuBLAS on tensor cores where it takes the problem, the naive kernel (`kernels/gemm.cu`)
//! where it does not.
//!
//! Row-major to column-major: cuBLAS sees a row-major `[r, c]` matrix with leading dimension `ld` as a
//! column-major `[c, r]` one, i.e. its transpose. So `C = op(A) op(B)` (row-major) is computed as
//! `C^T = op(B)^T op(A)^T` (column-major): the operands swap, `m` and `n` swap, and each transpose flag
//! carries over to its own operand.

use cudarc::cublas::sys as blas;
use mantissa_core::backend::Gemm;
use mantissa_core::{DType, Error, Result};

use crate::kernels::{launch, Arg, Family};
use crate::CudaBackend;

fn cuda_type(d: DType) -> blas::cudaDataType {
    match d {
        DType::F16 => blas::cudaDataType::CUDA_R_16F,
        DType::BF16 => blas::cudaDataType::CUDA_R_16BF,
        _ => blas::cudaDataType::CUDA_R_32F,
    }
}

/// Whether `cublasGemmStridedBatchedEx` with f32 compute takes this problem as it is.
fn cublas_takes(g: &Gemm) -> bool {
    let dtypes = matches!(
        (g.a.dtype, g.c.dtype),
        (DType::F32, DType::F32)
            | (DType::F16, DType::F16)
            | (DType::F16, DType::F32)
            | (DType::BF16, DType::BF16)
            | (DType::BF16, DType::F32)
    );
    let int = |v: usize| v <= i32::MAX as usize;
    let fits = [g.m, g.n, g.k, g.lda, g.ldb, g.ldc, g.batch].into_iter().all(int)
        && [g.stride_a, g.stride_b, g.stride_c].into_iter().all(|s| s <= i64::MAX as usize);
    // Column-major leading dimensions must cover the stored rows of each (swapped) operand.
    let lds = g.ldb >= (if g.trans_b { g.k } else { g.n }).max(1)
        && g.lda >= (if g.trans_a { g.m } else { g.k }).max(1)
        && g.ldc >= g.n.max(1);
    // Problems whose C overlap (stride 0 accumulating over the batch) must run in order: the naive kernel.
    let separate_c = g.batch <= 1 || g.stride_c >= (g.m - 1) * g.ldc + g.n;
    dtypes && fits && lds && separate_c && g.k > 0
}

pub(crate) fn gemm(be: &mut CudaBackend, g: &Gemm) -> Result<()> {
    g.validate(be.capacity)?;
    let at = CudaBackend::float(g.a, "gemm A")?;
    let ct = CudaBackend::float(g.c, "gemm C")?;
    if g.m == 0 || g.n == 0 || g.batch == 0 {
        return Ok(());
    }
    be.enter()?;
    let (a, b, c) = (be.ptr(g.a), be.ptr(g.b), be.ptr(g.c));
    if cublas_takes(g) {
        let op = |t: bool| if t { blas::cublasOperation_t::CUBLAS_OP_T } else { blas::cublasOperation_t::CUBLAS_OP_N };
        let (alpha, beta) = (g.alpha, g.beta);
        // SAFETY: every operand's extent was checked against its buffer inside the arena; the dimensions fit
        // cuBLAS's integer types (cublas_takes); alpha and beta are host f32 scalars (host pointer mode,
        // f32 compute), read before the call returns.
        let status = unsafe {
            blas::cublasGemmStridedBatchedEx(
                *be.blas.handle(),
                op(g.trans_b),
                op(g.trans_a),
                g.n as i32,
                g.m as i32,
                g.k as i32,
                &alpha as *const f32 as *const _,
                b as *const _,
                cuda_type(at),
                g.ldb as i32,
                g.stride_b as i64,
                a as *const _,
                cuda_type(at),
                g.lda as i32,
                g.stride_a as i64,
                &beta as *const f32 as *const _,
                c as *mut _,
                cuda_type(ct),
                g.ldc as i32,
                g.stride_c as i64,
                g.batch as i32,
                blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        return status.result().map_err(|e| Error::Device { what: "cublasGemmStridedBatchedEx", code: e.0 as i32 });
    }
    let f = be.kernels.get(Family::Gemm, "gemm_naive", Some(at), Some(ct))?;
    let u = |v: usize| Arg::U64(v as u64);
    let args = [
        Arg::U64(a),
        Arg::U64(b),
        Arg::U64(c),
        u(g.m),
        u(g.n),
        u(g.k),
        u(g.lda),
        u(g.ldb),
        u(g.ldc),
        Arg::I32(g.trans_a as i32),
        Arg::I32(g.trans_b as i32),
        Arg::F32(g.alpha),
        Arg::F32(g.beta),
        u(g.batch),
        u(g.stride_a),
        u(g.stride_b),
        u(g.stride_c),
    ];
    let grid = be.grid(g.m * g.n, 256);
    launch(&be.stream, f, (grid, 1, 1), (256, 1, 1), &args)
}
