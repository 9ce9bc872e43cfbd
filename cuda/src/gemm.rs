//! Matrix products: the split-k skinny kernel (`kernels/skinny.cu`) for a single problem with m <= 16 (a
//! classifier layer's weight gradient, which cuBLAS runs at ~10 TFLOP/s), cuBLAS on tensor cores for the rest
//! where it takes the problem (or, with autotune, a cuBLASLt algorithm measured clearly faster at the problem's
//! first call: `lt::gemm_plain`), the naive kernel (`kernels/gemm.cu`) where it does not. The small-n and small-k
//! skinny kernels exist and are tested, but run only with [`CudaBackend::set_skinny_all`] (slower than cuBLAS).
//!
//! Row-major to column-major: cuBLAS sees a row-major `[r, c]` matrix with leading dimension `ld` as a
//! column-major `[c, r]` one, i.e. its transpose. So `C = op(A) op(B)` (row-major) is computed as
//! `C^T = op(B)^T op(A)^T` (column-major): the operands swap, `m` and `n` swap, and each transpose flag
//! carries over to its own operand.

use cudarc::cublas::sys as blas;
use mantissa_core::backend::Gemm;
use mantissa_core::{Buf, DType, Error, Result};

use mantissa_core::backend::Activation;

use crate::kernels::{launch, Arg, Family};
use crate::{CudaBackend, BIG_BYTES, BIG_OFF};

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
    if let Some(shape) = skinny_shape(be, g) {
        return skinny(be, g, shape, None);
    }
    if cublas_takes(g) {
        if crate::lt::gemm_plain(be, g)? {
            return Ok(());
        }
        return cublas(be, g);
    }
    let (a, b, c) = (be.ptr(g.a), be.ptr(g.b), be.ptr(g.c));
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
    launch(be, f, (grid, 1, 1), (256, 1, 1), &args)
}

/// The product on cuBLAS (`cublasGemmStridedBatchedEx`, f32 compute). `g` was validated, `cublas_takes` it and
/// the context is bound.
pub(crate) fn cublas(be: &mut CudaBackend, g: &Gemm) -> Result<()> {
    let (a, b, c) = (be.ptr(g.a), be.ptr(g.b), be.ptr(g.c));
    let (at, ct) = (g.a.dtype, g.c.dtype);
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
    status.result().map_err(|e| Error::Device { what: "cublasGemmStridedBatchedEx", code: e.0 as i32 })
}

// ---- Skinny products (`kernels/skinny.cu`) ----

/// The largest "small" dimension the skinny kernels take (their register arrays are sized for it).
const SKINNY_MAX: usize = 16;

/// Which skinny kernel runs a problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Skinny {
    /// `n <= 16`, A row-major `[m, k]`: a warp per 4 rows of A (the last linear layer's forward, `H W^T`).
    N,
    /// `m <= 16`: k split over blocks, partial sums in the scratch, then a finishing pass (its weight
    /// gradient, `dY^T H`).
    M,
    /// `k <= 16`: element-wise style (its input gradient, `dY W`).
    K,
}

impl CudaBackend {
    /// Whether single GEMMs with m <= 16 (a classifier layer's weight gradient) run on the split-k kernel of
    /// `kernels/skinny.cu` instead of cuBLAS, and `bias_grad` with few channels on its flat layout; on by
    /// default. Measured on the H200 (bf16, the gpu-mlp's 4096 -> 10 layer at batch 8192, `cargo run --release -p
    /// mantissa-cuda --example skinny`, two runs): `10x4096x8192 TN -> f32` 0.055 ms against cuBLAS's 0.061;
    /// `bias_grad [8192, 10]` 0.008 ms against 0.028-0.029.
    pub fn set_skinny_gemm(&mut self, on: bool) {
        self.skinny = on;
    }

    /// Whether the small-n and small-k skinny kernels run too (with [`CudaBackend::set_skinny_gemm`] on), and
    /// `ActGrad` with k <= 16 as one fused kernel; off by default, for tests and benchmarks: on the H200 they
    /// are slower than cuBLAS (same example and runs): `8192x10x4096 NT` 0.098 ms against 0.039, `8192x4096x10
    /// NN` 0.057 against 0.040, the fused GELU backward with an f32 bias gradient 0.144 against 0.137 composed.
    /// Both are bound by something other than DRAM (690 and 1170 GB/s of 4800): op(B) re-read from L1/L2
    /// for every chunk of A, and issue slots (f32 conversions, the exact GELU derivative).
    pub fn set_skinny_all(&mut self, on: bool) {
        self.skinny_all = on;
    }
}

/// The skinny kernel for `g`, if one takes it: one problem with k > 0, A in f32/f16/bf16 and C in A's dtype or
/// f32, one small dimension, and (for `M`) its partial sums fitting the scratch.
fn skinny_shape(be: &CudaBackend, g: &Gemm) -> Option<Skinny> {
    let dtypes = matches!(
        (g.a.dtype, g.c.dtype),
        (DType::F32, DType::F32)
            | (DType::F16, DType::F16)
            | (DType::F16, DType::F32)
            | (DType::BF16, DType::BF16)
            | (DType::BF16, DType::F32)
    );
    if !be.skinny || !dtypes || g.batch != 1 || g.k == 0 || g.m == 0 || g.n == 0 {
        return None;
    }
    if be.skinny_all && g.n <= SKINNY_MAX && !g.trans_a {
        Some(Skinny::N)
    } else if g.m <= SKINNY_MAX && g.m * g.n * 4 <= BIG_BYTES {
        Some(Skinny::M)
    } else if be.skinny_all && g.k <= SKINNY_MAX {
        Some(Skinny::K)
    } else {
        None
    }
}

/// Runs `C = alpha op(A) op(B) + beta C` (or, with `act`, the fused input gradient `C = round(A B) * act'(pre)`,
/// `Skinny::K` only) on a skinny kernel. `g` was validated; the context is bound.
fn skinny(be: &mut CudaBackend, g: &Gemm, shape: Skinny, act: Option<(Activation, Buf)>) -> Result<()> {
    let (at, ct) = (g.a.dtype, g.c.dtype);
    let (a, b, c) = (be.ptr(g.a), be.ptr(g.b), be.ptr(g.c));
    let u = |v: usize| Arg::U64(v as u64);
    // Vector loads of `v` elements need every group of `v` elements aligned to its size (16 bytes at most).
    let aligned = |ptr: u64, ld: usize, dt: DType, v: usize| {
        let bytes = (v * dt.size()).min(16) as u64;
        ptr % bytes == 0 && ld % v == 0
    };
    let sms = be.sm_count as usize;
    match shape {
        Skinny::N => {
            let vec = g.trans_b && g.k % 8 == 0 && aligned(a, g.lda, at, 8) && aligned(b, g.ldb, at, 8);
            let name = if vec { "skinny_n8" } else { "skinny_n" };
            let f = be.kernels.get(Family::Skinny, name, Some(at), Some(ct))?;
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
                Arg::I32(g.trans_b as i32),
                Arg::F32(g.alpha),
                Arg::F32(g.beta),
            ];
            // 4 warps of 128 threads, a warp per 4 rows (grid-stride beyond 16 blocks per multiprocessor).
            let blocks = g.m.div_ceil(4 * 4).clamp(1, sms * 16) as u32;
            launch(be, f, (blocks, 1, 1), (128, 1, 1), &args)
        }
        Skinny::M => {
            let vec = !g.trans_b && g.n % 4 == 0 && aligned(b, g.ldb, at, 4);
            let v = if vec { 4 } else { 1 };
            let name = if vec { "skinny_m_part4" } else { "skinny_m_part" };
            // Blocks of 256 threads over 32 v columns; splits of k so that the grid is one wave of two blocks
            // per multiprocessor, each split at least 64 rows long, the partial sums inside the scratch.
            let bx = g.n.div_ceil(32 * v);
            let room = BIG_BYTES / 4 / (g.m * g.n);
            let want = (sms * 2 / bx).min(g.k.div_ceil(64)).clamp(1, room.min(65535));
            let per = g.k.div_ceil(want);
            let splits = g.k.div_ceil(per);
            let partial = be.scratch + BIG_OFF as u64;
            let f = be.kernels.get(Family::Skinny, name, Some(at), None)?;
            let args = [
                Arg::U64(a),
                Arg::U64(b),
                Arg::U64(partial),
                u(g.m),
                u(g.n),
                u(g.k),
                u(g.lda),
                u(g.ldb),
                Arg::I32(g.trans_a as i32),
                Arg::I32(g.trans_b as i32),
                u(per),
            ];
            launch(be, f, (bx as u32, splits as u32, 1), (256, 1, 1), &args)?;
            let f = be.kernels.get(Family::Skinny, "skinny_m_finish", Some(ct), None)?;
            let args = [
                Arg::U64(partial),
                Arg::U64(c),
                u(g.m),
                u(g.n),
                u(g.ldc),
                u(splits),
                Arg::F32(g.alpha),
                Arg::F32(g.beta),
            ];
            launch(be, f, (be.grid(g.m * g.n, 256), 1, 1), (256, 1, 1), &args)
        }
        Skinny::K => {
            let (code, pre) = match act {
                Some((act, pre)) => (crate::act_code(act), be.ptr(pre)),
                None => (-1, 0),
            };
            let vec = !g.trans_b
                && g.n % 8 == 0
                && aligned(b, g.ldb, at, 8)
                && aligned(c, g.ldc, ct, 8)
                && (act.is_none() || aligned(pre, g.ldc, ct, 8));
            let v = if vec { 8 } else { 1 };
            let name = if vec { "skinny_k8" } else { "skinny_k" };
            let f = be.kernels.get(Family::Skinny, name, Some(at), Some(ct))?;
            let args = [
                Arg::U64(a),
                Arg::U64(b),
                Arg::U64(c),
                Arg::U64(pre),
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
                Arg::I32(code),
            ];
            // Blocks of 128 threads across the columns; about 16 blocks per multiprocessor in all, each walking
            // groups of 4 rows.
            let bx = g.n.div_ceil(v).div_ceil(128);
            let by = (sms * 16).div_ceil(bx).clamp(1, g.m.div_ceil(4).min(65535));
            launch(be, f, (bx as u32, by as u32, 1), (128, 1, 1), &args)
        }
    }
}

/// [`Epilogue::ActGrad`](mantissa_core::backend::Epilogue::ActGrad) with `k <= 16` in one kernel: `C = round_C(A
/// B) * act'(pre)`, equal bit for bit to `gemm` followed by `activation_backward` (the composed version), in one
/// pass over `pre` and C. `Ok(false)` (nothing queued) where the skinny kernel does not take the problem. `g`
/// and `pre` were validated by the caller (`lt::validate`: alpha 1, beta 0, `pre` like C).
pub(crate) fn skinny_act_grad(be: &mut CudaBackend, g: &Gemm, act: Activation, pre: Buf) -> Result<bool> {
    // Only where `gemm` itself would run the small-k kernel: the product is then summed in the same order.
    if skinny_shape(be, g) != Some(Skinny::K) {
        return Ok(false);
    }
    be.enter()?;
    skinny(be, g, Skinny::K, Some((act, pre)))?;
    Ok(true)
}
