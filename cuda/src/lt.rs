//! GEMMs with a fused epilogue on cuBLASLt (issue #5): a linear layer's bias and GELU run inside the matrix
//! product, and so do the GELU backward and the bias gradient of the layer before it.
//!
//! | [`Epilogue`]                     | cuBLASLt epilogue                      | vectors (row-major `[n]`)      |
//! |----------------------------------|----------------------------------------|--------------------------------|
//! | `Bias`                           | `CUBLASLT_EPILOGUE_BIAS`               | bias                           |
//! | `BiasAct` (GELU, tanh)           | `CUBLASLT_EPILOGUE_GELU_AUX_BIAS`      | bias; `pre` is the aux output  |
//! | `ActGrad` (GELU), no `dbias`     | `CUBLASLT_EPILOGUE_DGELU`              | `pre` is the aux input         |
//! | `ActGrad` (GELU), `dbias`        | `CUBLASLT_EPILOGUE_DGELU_BGRAD`        | `pre` aux input; dbias output  |
//!
//! Which version runs is measured, per problem, at its first call outside a recording
//! ([`CudaBackend::set_autotune`], on by default): up to eight of the heuristic's algorithms and the composed
//! version (the GEMM, then the bias/activation kernels; for `ActGrad` the GELU backward and the bias gradient
//! in one pass, `act_grad.rs`; for `ActGrad` with k <= 16 also the kernel that computes the product, the GELU
//! backward and the bias gradient in one pass), the fastest kept. Without a measurement (autotune off, or a problem first seen
//! while recording) a problem takes the heuristic's first algorithm, and `ActGrad` runs composed unless
//! [`CudaBackend::set_fuse_act_grad`]. With [`CudaBackend::set_skinny_all`] and `k <= 16` (where `gemm` itself
//! then takes the small-k kernel of `kernels/skinny.cu`) `ActGrad` runs that kernel with the activation backward
//! fused in, then `bias_grad` (not counted in [`CudaBackend::fused_epilogue_calls`]; off by default: no faster
//! on the H200, numbers on that method).
//!
//! f32 GEMMs run here too, with `CUBLAS_COMPUTE_32F`: strict f32 products and sums (no TF32), as the cuBLAS path.
//!
//! cuBLASLt 13.1 takes the bias and the bias gradient only in C's dtype ("unsupported config of bias pointer
//! type" for an f32 vector with a 16-bit C). A bias in f32 is then composed; a bias gradient in f32 (what the
//! layers keep) runs `DGELU` in the GEMM and `bias_grad` after it. Both are asked for first, in case a later
//! cuBLASLt takes them.
//!
//! Row-major `C[m, n] = op(A) op(B)` is column-major `C^T[n, m] = op(B)^T op(A)^T` (as in `gemm.rs`): cuBLASLt's
//! A is our B, its B our A, its `m` our `n`. Its epilogue vectors have one entry per row of its D, i.e. per
//! row-major column of C, which is what [`Epilogue`] asks for, and BGRAD sums along its D's rows (over our `m`).
//! The aux matrix (`pre`) has C's layout, so its leading dimension is `n` (cuBLASLt wants a multiple of 8).
//!
//! The fused path rounds to 16 bits once where the composed one rounds every intermediate; the bias gradient
//! sums f32 values instead of rounded ones. Everything cuBLASLt does not take here (ReLU, a C dtype
//! other than the inputs', a vector dtype other than C's or f32, unaligned `pre` or vectors, `n % 8 != 0` with
//! an aux matrix, empty problems, overlapping vectors, or no libcublasLt at all) runs
//! the composed version on the same backend.
//!
//! Steady state: one descriptor, three layouts, the heuristic's algorithms and the choice are cached per problem
//! (shape, transposes, dtypes, epilogue, pointer alignments), so a call only sets the two epilogue pointers on
//! the cached descriptor and enqueues `cublasLtMatmul` with the backend's workspace: no synchronisation and no
//! device allocation, so it may be captured into a CUDA graph. The first call of a problem builds its entry
//! (descriptor creation and the heuristic query) and, outside a recording, times the candidates (it waits for
//! the device then: the trainer runs a shape's first step directly and records from the second).

use std::collections::HashMap;
use std::ffi::c_void;

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublaslt::sys;
use mantissa_core::backend::{gemm_fused_composed, Activation, Epilogue, Gemm};
use mantissa_core::{Buf, DType, Error, Result};

use crate::{CudaBackend, WORKSPACE_BYTES};

/// The cuBLASLt entry points used here; all are looked up when the backend opens, so that an old or partial
/// libcublasLt means "compose" rather than cudarc's panic on the first call.
const SYMBOLS: [&str; 12] = [
    "cublasLtCreate",
    "cublasLtDestroy",
    "cublasLtMatmul",
    "cublasLtMatmulAlgoGetHeuristic",
    "cublasLtMatmulDescCreate",
    "cublasLtMatmulDescDestroy",
    "cublasLtMatmulDescSetAttribute",
    "cublasLtMatmulPreferenceCreate",
    "cublasLtMatmulPreferenceDestroy",
    "cublasLtMatmulPreferenceSetAttribute",
    "cublasLtMatrixLayoutCreate",
    "cublasLtMatrixLayoutDestroy",
];

/// The cuBLASLt handle and the per-problem cache. Without libcublasLt `handle` is `None`, and every fused
/// GEMM is composed.
pub(crate) struct Lt {
    handle: Option<sys::cublasLtHandle_t>,
    /// `None`: cuBLASLt offered no algorithm for the variant (asked once).
    plans: HashMap<Key, Option<Plan>>,
    /// What each problem runs, with its cuBLASLt variant resolved (a decided problem's call is one map lookup),
    /// and whether it was measured. Unmeasured entries are the switches' defaults, dropped when a switch changes.
    choices: HashMap<Problem, (Resolved, bool)>,
    /// GEMMs whose epilogue ran inside cuBLASLt.
    fused: u64,
    /// Whether `ActGrad` runs in cuBLASLt where nothing was measured (see [`CudaBackend::set_fuse_act_grad`]).
    act_grad: bool,
    /// Whether a problem's first call outside a recording times its candidates (see [`CudaBackend::set_autotune`]).
    autotune: bool,
    /// Problems with less work than this keep their default untimed (see [`CudaBackend::set_autotune_min_work`]).
    min_work: usize,
    /// Calls per timed sample ([`TUNE_REPS`], or `MANTISSA_CUDA_TUNE_REPS` for experiments: many calls time a
    /// candidate at the clocks the board's power limit leaves it, few at the clocks it starts at).
    reps: usize,
    /// One line per tuned problem, in the order they were tuned.
    log: Vec<String>,
}

impl Lt {
    /// Opens cuBLASLt when the library and every symbol used here are present; otherwise (or when creating
    /// the handle fails) the backend composes fused GEMMs.
    pub(crate) fn open() -> Lt {
        let handle = std::panic::catch_unwind(|| {
            // SAFETY: dlopen probes and symbol lookups; the handle is created only when all were found.
            unsafe {
                if !sys::is_culib_present() {
                    return None;
                }
                let lib = sys::culib();
                if SYMBOLS.iter().any(|s| lib.get::<unsafe extern "C" fn()>(s.as_bytes()).is_err()) {
                    return None;
                }
                let mut h = std::ptr::null_mut();
                sys::cublasLtCreate(&mut h).result().ok().map(|_| h)
            }
        })
        .ok()
        .flatten();
        Lt {
            handle,
            plans: HashMap::new(),
            choices: HashMap::new(),
            fused: 0,
            act_grad: false,
            // MANTISSA_CUDA_AUTOTUNE=0 turns it off for a whole process (as PyTorch's PYTORCH_TUNABLEOP_ENABLED).
            autotune: std::env::var("MANTISSA_CUDA_AUTOTUNE").map_or(true, |v| v.trim() != "0"),
            min_work: TUNE_MIN_WORK,
            reps: std::env::var("MANTISSA_CUDA_TUNE_REPS")
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .filter(|&n: &usize| n > 0)
                .unwrap_or(TUNE_REPS),
            log: Vec::new(),
        }
    }
}

impl Lt {
    /// Drops the decisions that were not measured: they follow the switches, which just changed.
    fn forget_defaults(&mut self) {
        self.choices.retain(|_, (_, measured)| *measured);
    }
}

impl Drop for Lt {
    fn drop(&mut self) {
        self.plans.clear();
        self.choices.clear();
        if let Some(h) = self.handle.take() {
            // SAFETY: created in `open`, destroyed once; the descriptors made with it are gone (cleared above).
            let _ = unsafe { sys::cublasLtDestroy(h) };
        }
    }
}

impl CudaBackend {
    /// How many [`mantissa_core::Backend::gemm_fused`] calls ran their epilogue inside cuBLASLt since
    /// [`CudaBackend::new`]; the others were composed from unfused ops. For tests and benchmarks.
    pub fn fused_epilogue_calls(&self) -> u64 {
        self.lt.fused
    }

    /// Whether [`Epilogue::ActGrad`] (the GELU backward, with the bias gradient) runs inside cuBLASLt; off by
    /// default, where it is composed. Measured on the H200 (cuBLASLt 13.1, bf16, `[8192, 4096] x [4096, 4096]`,
    /// `cargo run --release -p mantissa-cuda --example lt_epilogue`, two runs): the DGELU epilogue GEMM plus
    /// `bias_grad` took 0.47 ms, as composed (0.45-0.47 ms); DGELU alone 0.44-0.46 ms against 0.43; DGELU_BGRAD
    /// with a bf16 bias gradient 0.66-0.68 ms against 0.45. The backward epilogue does not pay there; the
    /// forward ones do (bias 1.28x at k = 4096; bias + GELU 1.51-1.56x at k = 784, 1.20-1.30x at k = 4096).
    pub fn set_fuse_act_grad(&mut self, on: bool) {
        self.lt.act_grad = on;
        self.lt.forget_defaults();
    }

    /// Whether a fused GEMM's first call outside a recording measures its candidates (on by default; PyTorch's
    /// TunableOp and cuDNN's benchmark mode are the opt-in equivalents there): every cuBLASLt form of the problem
    /// with up to [`TUNE_CANDIDATES`] algorithms of the heuristic each, the composed version (cuBLAS's GEMM,
    /// then the bias, activation or activation-backward kernels), and for `ActGrad` with k <= 16 the one-pass
    /// small-k kernel (`act_grad.cu`). Each runs once to warm up, then [`TUNE_REPS`]
    /// times between two events, twice; the lowest mean counts. The problem keeps its default (what it runs with
    /// autotune off or when first seen while recording: the heuristic's first algorithm with the epilogue inside;
    /// `ActGrad` composed unless [`CudaBackend::set_fuse_act_grad`]) unless a candidate beats it by
    /// [`TUNE_MARGIN`] and [`TUNE_MIN_GAIN_MS`]. The call's output is then computed once more by the choice.
    /// Different algorithms sum in different orders, so a problem near the margin may round differently from
    /// one run to the next: turn this off for bit-for-bit reproducible runs (or set `MANTISSA_CUDA_AUTOTUNE=0`
    /// in the environment: the backends opened afterwards start with it off).
    pub fn set_autotune(&mut self, on: bool) {
        self.lt.autotune = on;
        self.lt.forget_defaults();
    }

    /// Problems whose work, `max(bytes of A, B and C, FLOPs / 256)`, is under `work` keep their default without
    /// timing anything (default [`TUNE_MIN_WORK`], 16 MiB). They run in microseconds, where an eager call is bound
    /// by launches that a recorded step does not pay, and where another process or test on the same GPU easily
    /// doubles a sample: deciding them by size keeps their choice, and so their rounding, the same from run to
    /// run. For tests (0 tunes everything).
    pub fn set_autotune_min_work(&mut self, work: usize) {
        self.lt.min_work = work;
        self.lt.forget_defaults();
    }

    /// One line per problem tuned so far (`lt_tune: problem=... chosen=... ms=...`), for reports.
    pub fn tuning_log(&self) -> &[String] {
        &self.lt.log
    }
}

/// How many of cuBLASLt's heuristic results a tuned problem times. (Asked for 24 on the H200, cuBLASLt 13
/// returned at most 8 for every gpu-mlp problem, 2026-11-29.)
pub const TUNE_CANDIDATES: usize = 8;
/// Calls per timed sample when tuning.
pub const TUNE_REPS: usize = 3;
/// A tuned problem leaves its default (see [`CudaBackend::set_autotune`]) only for a candidate faster by at
/// least this fraction of the default's time...
pub const TUNE_MARGIN: f32 = 0.03;
/// ...and by at least this many milliseconds.
pub const TUNE_MIN_GAIN_MS: f32 = 0.005;
/// Problems with less work are not tuned (see [`CudaBackend::set_autotune_min_work`]).
pub const TUNE_MIN_WORK: usize = 16 << 20;

/// Whether a problem has enough work to be tuned (see [`CudaBackend::set_autotune_min_work`]).
fn worth_tuning(be: &CudaBackend, g: &Gemm) -> bool {
    let (a, c) = (g.a.dtype.size() as f64, g.c.dtype.size() as f64);
    let (m, n, k) = (g.m as f64, g.n as f64, g.k as f64);
    let bytes = (m * k + k * n) * a + m * n * c;
    bytes.max(2.0 * m * n * k / 256.0) >= be.lt.min_work as f64
}

/// What a cached problem runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Choice {
    /// cuBLASLt: the problem's variant of this index, with its plan's algorithm of that index.
    Lt { variant: usize, algo: usize },
    /// The composed version: cuBLAS's GEMM, then the epilogue's kernels.
    Composed,
    /// `ActGrad` with k <= 16: the product, the activation backward and the bias gradient in one kernel
    /// (`act_grad.rs`, `act_grad_bias_small_k`); timed as a candidate, never a default.
    SmallK,
}

/// One cached problem. Owns its descriptors.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    /// cuBLASLt's A (our B), its B (our A), and C/D.
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    /// The heuristic's algorithms, best guess first (at least one).
    algos: Vec<sys::cublasLtMatmulAlgo_t>,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each descriptor was created by cuBLASLt for this plan (or is null) and is destroyed once; no
        // queued matmul reads a descriptor (cuBLASLt copies what it needs when the call is enqueued).
        unsafe {
            for l in self.layouts {
                if !l.is_null() {
                    let _ = sys::cublasLtMatrixLayoutDestroy(l);
                }
            }
            if !self.desc.is_null() {
                let _ = sys::cublasLtMatmulDescDestroy(self.desc);
            }
        }
    }
}

/// What one cached plan is for. Alignments are powers of two up to 256 bytes: the heuristic picks kernels for
/// the alignment it is shown, and a later call may only reuse the algorithm when its pointers align as well.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldb: usize,
    trans_a: bool,
    trans_b: bool,
    dtype: DType,
    c_dtype: DType,
    epilogue: sys::cublasLtEpilogue_t,
    /// Dtype of the bias or bias-gradient vector, when the epilogue has one.
    vector: Option<DType>,
    /// Alignment (bytes) of A, B, C, the vector and the aux matrix (1 when absent).
    align: [u32; 5],
}

/// A fused GEMM as cuBLASLt runs it.
#[derive(Clone, Copy)]
struct Call {
    epilogue: sys::cublasLtEpilogue_t,
    /// Bias (input) or bias gradient (output), `[n]`.
    vector: Option<Buf>,
    /// The pre-activation `[m, n]`: written by GELU_AUX_BIAS, read by DGELU.
    aux: Option<Buf>,
    /// What runs after the GEMM.
    post: Post,
}

/// The kernels that finish a cuBLASLt variant after its GEMM.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Post {
    None,
    /// `bias_grad` of C (DGELU standing in for DGELU_BGRAD).
    BiasGrad,
    /// The GEMM (bias epilogue) wrote the pre-activation; the backend's activation kernel computes C from it
    /// (f32 `BiasAct`: cuBLASLt's GELU may use the hardware tanh approximation, which strict f32 does not take).
    Act,
    /// The GEMM wrote dy into C; the activation backward and the bias gradient follow as one pass
    /// (`act_grad.rs`), as in the composed version.
    ActGradBias,
}

fn lt_type(d: DType) -> sys::cudaDataType {
    match d {
        DType::F16 => sys::cudaDataType::CUDA_R_16F,
        DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
        _ => sys::cudaDataType::CUDA_R_32F,
    }
}

/// Largest power of two (up to 256) dividing the byte offset; the arena's base is 256-byte aligned.
fn align(b: Option<Buf>) -> u32 {
    b.map_or(1, |b| 1u32 << (b.offset | 256).trailing_zeros().min(8))
}

/// The checks [`gemm_fused_composed`] and the ops it calls make, so the fused path rejects exactly what the
/// composed one rejects (plus C overlapping an input, which `gemm` rejects too).
fn validate(capacity: usize, g: &Gemm, ep: &Epilogue) -> Result<()> {
    if g.batch != 1 || g.alpha != 1.0 || g.beta != 0.0 || g.ldc != g.n {
        return Err(Error::InvalidConfig("gemm_fused: one dense problem with alpha 1 and beta 0"));
    }
    g.validate(capacity)?;
    CudaBackend::float(g.a, "gemm A")?;
    CudaBackend::float(g.c, "gemm C")?;
    let len = g.m * g.n; // no overflow: validate() computed C's extent, (m - 1) * n + n.
    g.c.check_len(len, "gemm_fused C")?;
    let vector = |v: Buf, what: &'static str| -> Result<()> {
        v.check_in(capacity, what)?;
        v.check_len(g.n, what)?;
        CudaBackend::float(v, what).map(|_| ())
    };
    let pre_checks = |pre: Buf| -> Result<()> {
        pre.check_len(len, "gemm_fused pre-activation")?;
        if pre.dtype != g.c.dtype || pre.overlaps(&g.c) {
            return Err(Error::InvalidConfig("gemm_fused: pre-activation must match C's dtype and not overlap C"));
        }
        Ok(())
    };
    match *ep {
        Epilogue::Bias { bias } => vector(bias, "add_bias bias"),
        Epilogue::BiasAct { bias, pre, .. } => {
            pre_checks(pre)?;
            // The composed version runs the GEMM into `pre`: the same checks as for C.
            Gemm { c: pre, ..*g }.validate(capacity)?;
            vector(bias, "add_bias bias")
        }
        Epilogue::ActGrad { pre, dbias, .. } => {
            pre_checks(pre)?;
            pre.check_in(capacity, "activation_backward x")?;
            match dbias {
                Some(db) => vector(db, "bias_grad dbias"),
                None => Ok(()),
            }
        }
    }
}

/// The cuBLASLt forms of a validated fused GEMM, the epilogue-inside ones first; empty where it only runs
/// composed.
fn candidates(g: &Gemm, ep: &Epilogue) -> Vec<Call> {
    let dt = g.a.dtype;
    let int = |v: usize| v <= i32::MAX as usize;
    let lds = g.ldb >= (if g.trans_b { g.k } else { g.n }) && g.lda >= (if g.trans_a { g.m } else { g.k });
    let shape = g.m > 0 && g.n > 0 && g.k > 0 && [g.m, g.n, g.k, g.lda, g.ldb].into_iter().all(int) && lds;
    if !matches!(dt, DType::BF16 | DType::F16 | DType::F32) || g.c.dtype != dt || !shape {
        return Vec::new();
    }
    // Vectors in C's dtype or f32, 16-byte aligned, not overlapping what the GEMM writes.
    let vector_ok = |v: Buf, written: &[Buf]| {
        (v.dtype == dt || v.dtype == DType::F32) && v.offset % 16 == 0 && !written.iter().any(|w| v.overlaps(w))
    };
    // The aux matrix: 16-byte aligned, leading dimension (n) a multiple of 8.
    let aux_ok = |pre: Buf| pre.offset % 16 == 0 && g.n % 8 == 0;
    use sys::cublasLtEpilogue_t as E;
    let call = |epilogue, vector, aux, post| Call { epilogue, vector, aux, post };
    let mut out = Vec::new();
    match *ep {
        Epilogue::Bias { bias } if vector_ok(bias, &[g.c]) => {
            out.push(call(E::CUBLASLT_EPILOGUE_BIAS, Some(bias), None, Post::None))
        }
        // Strict f32: only the bias inside cuBLASLt (an exact f32 add, one rounding fewer than composed).
        Epilogue::BiasAct { bias, pre, .. } if dt == DType::F32 && vector_ok(bias, &[g.c, pre]) => {
            out.push(call(E::CUBLASLT_EPILOGUE_BIAS, Some(bias), None, Post::Act))
        }
        Epilogue::BiasAct { bias, act: Activation::GeluTanh, pre } if vector_ok(bias, &[g.c, pre]) && aux_ok(pre) => {
            out.push(call(E::CUBLASLT_EPILOGUE_GELU_AUX_BIAS, Some(bias), Some(pre), Post::None))
        }
        Epilogue::ActGrad { act, pre, dbias } => {
            if dt != DType::F32 && act == Activation::GeluTanh && aux_ok(pre) {
                match dbias {
                    None => out.push(call(E::CUBLASLT_EPILOGUE_DGELU, None, Some(pre), Post::None)),
                    Some(db) => {
                        if vector_ok(db, &[g.c, g.a, g.b, pre]) {
                            out.push(call(E::CUBLASLT_EPILOGUE_DGELU_BGRAD, Some(db), Some(pre), Post::None));
                        }
                        out.push(call(E::CUBLASLT_EPILOGUE_DGELU, None, Some(pre), Post::BiasGrad));
                    }
                }
            }
            // The composed version with the GEMM in cuBLASLt (whose algorithms can be timed).
            out.push(call(E::CUBLASLT_EPILOGUE_DEFAULT, None, None, Post::ActGradBias));
        }
        _ => {}
    }
    out
}

/// [`mantissa_core::Backend::gemm_fused`] for the CUDA backend.
pub(crate) fn gemm_fused(be: &mut CudaBackend, g: &Gemm, ep: &Epilogue) -> Result<()> {
    validate(be.capacity, g, ep)?;
    // A small k (the input gradient of a classifier layer, k = 10 classes) with `set_skinny_all`: one kernel for
    // the product and the activation backward, then the bias gradient, whatever `set_fuse_act_grad` says.
    if let Epilogue::ActGrad { act, pre, dbias } = *ep {
        if crate::gemm::skinny_act_grad(be, g, act, pre)? {
            return match dbias {
                Some(db) => mantissa_core::Backend::bias_grad(be, g.c.prefix(g.m * g.n), db, g.m, g.n, 1),
                None => Ok(()),
            };
        }
    }
    let Some(handle) = be.lt.handle else {
        return composed(be, g, ep);
    };
    be.enter()?;
    let problem = problem(g, ep);
    let resolved = match be.lt.choices.get(&problem).copied() {
        Some((r, _)) => r,
        None => {
            // The variants cuBLASLt has an algorithm for (asked once per variant).
            let variants: Vec<Variant> = candidates(g, ep)
                .into_iter()
                .filter_map(|call| {
                    plan(be, handle, &lt_gemm(g, ep, call), call).map(|key| Variant { handle, key, call })
                })
                .collect();
            let measurable = be.lt.autotune && worth_tuning(be, g);
            let tuned = measurable && !variants.is_empty() && !be.graphs.recording();
            let choice = if variants.is_empty() {
                Choice::Composed
            } else if tuned {
                tune(be, g, ep, &variants)?
            } else {
                default_choice(be.lt.act_grad, ep, &variants)
            };
            let r = resolve(choice, &variants);
            // A default is not kept while a measurement is still to come (first seen while recording).
            if tuned || !measurable || variants.is_empty() {
                be.lt.choices.insert(problem, (r, tuned));
            }
            r
        }
    };
    run(be, g, ep, resolved)?;
    if let Resolved::Lt(..) = resolved {
        be.lt.fused += 1;
    }
    Ok(())
}

/// A decided problem, its cuBLASLt variant resolved from the candidate list.
#[derive(Clone, Copy)]
enum Resolved {
    Composed,
    SmallK,
    /// The variant, and the index of its plan's algorithm.
    Lt(Variant, usize),
}

fn resolve(choice: Choice, variants: &[Variant]) -> Resolved {
    match choice {
        Choice::Lt { variant, algo } => Resolved::Lt(variants[variant], algo),
        Choice::SmallK => Resolved::SmallK,
        Choice::Composed => Resolved::Composed,
    }
}

/// A plain GEMM (`Backend::gemm`, no epilogue) with autotune on: cuBLAS (`gemm.rs`) is its default, and at its
/// first call outside a recording cuBLASLt's algorithms are timed against it; one that wins clearly (see
/// [`CudaBackend::set_autotune`]) runs it from then on. `Ok(true)` when this ran the product; `Ok(false)` (nothing
/// queued) where the caller runs cuBLAS: autotune off, not measured yet while recording, or not one dense
/// problem with alpha 1 and beta 0 (which tuning could not repeat safely). `g` was validated by the caller and
/// `cublas_takes` it.
pub(crate) fn gemm_plain(be: &mut CudaBackend, g: &Gemm) -> Result<bool> {
    let Some(handle) = be.lt.handle else {
        return Ok(false);
    };
    let int = |v: usize| v <= i32::MAX as usize;
    let dense = g.batch == 1 && g.alpha == 1.0 && g.beta == 0.0 && g.m > 0 && g.n > 0 && g.k > 0;
    if !be.lt.autotune || !dense || ![g.m, g.n, g.k, g.lda, g.ldb, g.ldc].into_iter().all(int) {
        return Ok(false);
    }
    let problem = problem_key(g, (3, g.ldc as i32), None, None);
    let resolved = match be.lt.choices.get(&problem).copied() {
        Some((r, _)) => r,
        None if be.graphs.recording() || !worth_tuning(be, g) => return Ok(false),
        None => {
            let r = match plan(be, handle, g, PLAIN) {
                Some(key) => {
                    let v = Variant { handle, key, call: PLAIN };
                    resolve(tune_plain(be, g, v)?, &[v])
                }
                None => Resolved::Composed,
            };
            be.lt.choices.insert(problem, (r, true));
            r
        }
    };
    match resolved {
        Resolved::Lt(v, algo) => matmul(be, g, v, algo).map(|_| true),
        Resolved::Composed | Resolved::SmallK => Ok(false),
    }
}

/// A plain GEMM in cuBLASLt: no epilogue, nothing after it.
const PLAIN: Call =
    Call { epilogue: sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT, vector: None, aux: None, post: Post::None };

/// [`tune`] for a plain GEMM: cuBLAS (the default, `Choice::Composed` here) against cuBLASLt's algorithms.
fn tune_plain(be: &mut CudaBackend, g: &Gemm, v: Variant) -> Result<Choice> {
    let cublas_ms = time(be, |be| crate::gemm::cublas(be, g))?;
    let times = time_algos(be, v, |be, algo| matmul(be, g, v, algo));
    let mut best = (cublas_ms, Choice::Composed);
    for (algo, ms) in times.iter().enumerate() {
        if let Some(ms) = *ms {
            if ms < best.0 {
                best = (ms, Choice::Lt { variant: 0, algo });
            }
        }
    }
    if !clear_win(cublas_ms, best.0) {
        best = (cublas_ms, Choice::Composed);
    }
    let chosen = match best.1 {
        Choice::Lt { algo, .. } => format!("DEFAULT#{algo}"),
        _ => "cublas".to_string(),
    };
    be.lt.log.push(format!(
        "lt_tune: problem={} gemm chosen={chosen} chosen_ms={:.4} default=cublas default_ms={cublas_ms:.4} \
         DEFAULT=[{}]",
        describe(g),
        best.0,
        times.iter().map(|&ms| fmt_ms(ms)).collect::<Vec<_>>().join(","),
    ));
    Ok(best.1)
}

/// The plan's algorithms of `v` timed one by one with `f(be, algo)` (see [`time`]); `None` where one failed.
fn time_algos(
    be: &mut CudaBackend,
    v: Variant,
    mut f: impl FnMut(&mut CudaBackend, usize) -> Result<()>,
) -> Vec<Option<f32>> {
    let count = be.lt.plans.get(&v.key).and_then(|p| p.as_ref()).map_or(0, |p| p.algos.len());
    (0..count).map(|algo| time(be, |be| f(be, algo)).ok()).collect()
}

/// Whether a candidate at `best_ms` beats the default at `default_ms` clearly enough to replace it: the
/// candidates run back to back on the same operands (warm in L2, unlike in a training step), and a near tie
/// would make the choice, and so the rounding, vary between runs.
fn clear_win(default_ms: f32, best_ms: f32) -> bool {
    default_ms - best_ms >= (TUNE_MARGIN * default_ms).max(TUNE_MIN_GAIN_MS)
}

/// A timing for the tuning log.
fn fmt_ms(ms: Option<f32>) -> String {
    ms.map_or("refused".to_string(), |ms| format!("{ms:.4}"))
}

/// What a problem runs without a measurement: the epilogue inside cuBLASLt with the heuristic's first algorithm;
/// `ActGrad` composed unless `fuse_act_grad`.
fn default_choice(fuse_act_grad: bool, ep: &Epilogue, variants: &[Variant]) -> Choice {
    match *ep {
        Epilogue::ActGrad { .. } if !fuse_act_grad => Choice::Composed,
        Epilogue::ActGrad { .. } => variants
            .iter()
            .position(|v| v.call.aux.is_some())
            .map_or(Choice::Composed, |v| Choice::Lt { variant: v, algo: 0 }),
        _ => Choice::Lt { variant: 0, algo: 0 },
    }
}

/// A fused GEMM in one of its cuBLASLt forms, with a plan in the cache under `key`.
#[derive(Clone, Copy)]
struct Variant {
    handle: sys::cublasLtHandle_t,
    key: Key,
    call: Call,
}

/// What a fused GEMM problem (shape, layout, dtypes, epilogue, alignments) runs, once measured or decided.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Problem {
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldb: usize,
    trans: (bool, bool),
    dtypes: (DType, DType),
    /// 0 Bias, 1 BiasAct, 2 ActGrad; then the activation's code (-1: none).
    kind: (u8, i32),
    /// The vector's dtype, if any.
    vector: Option<DType>,
    /// Alignment of A, B, C, the vector and `pre`.
    align: [u32; 5],
}

fn problem(g: &Gemm, ep: &Epilogue) -> Problem {
    let (kind, vector, pre) = match *ep {
        Epilogue::Bias { bias } => ((0, -1), Some(bias), None),
        Epilogue::BiasAct { bias, act, pre } => ((1, crate::act_code(act)), Some(bias), Some(pre)),
        Epilogue::ActGrad { act, pre, dbias } => ((2, crate::act_code(act)), dbias, Some(pre)),
    };
    problem_key(g, kind, vector, pre)
}

/// The [`Problem`] of a GEMM, its kind and epilogue operands.
fn problem_key(g: &Gemm, kind: (u8, i32), vector: Option<Buf>, pre: Option<Buf>) -> Problem {
    Problem {
        m: g.m,
        n: g.n,
        k: g.k,
        lda: g.lda,
        ldb: g.ldb,
        trans: (g.trans_a, g.trans_b),
        dtypes: (g.a.dtype, g.c.dtype),
        kind,
        vector: vector.map(|v| v.dtype),
        align: [align(Some(g.a)), align(Some(g.b)), align(Some(g.c)), align(vector), align(pre)],
    }
}

/// The composed version of a fused GEMM: [`gemm_fused_composed`] (the specification), except that the GELU
/// backward and the bias gradient run as one pass ([`CudaBackend::activation_backward_bias_grad`]: the same `dx` bit for
/// bit, the bias gradient summed in another order).
fn composed(be: &mut CudaBackend, g: &Gemm, ep: &Epilogue) -> Result<()> {
    match *ep {
        Epilogue::ActGrad { act, pre, dbias } => {
            be.enter()?;
            mantissa_core::Backend::gemm(be, g)?;
            let len = g.m * g.n;
            be.activation_backward_bias_grad(act, pre.prefix(len), g.c.prefix(len), dbias, g.m, g.n)
        }
        _ => gemm_fused_composed(be, g, ep),
    }
}

/// The small-k kernel for an `ActGrad` problem; `Ok(false)` (nothing queued) where it does not apply.
fn small_k(be: &mut CudaBackend, g: &Gemm, ep: &Epilogue) -> Result<bool> {
    match *ep {
        Epilogue::ActGrad { act, pre, dbias } if !g.trans_a && !g.trans_b && g.k <= crate::act_grad::SMALL_K_MAX => {
            let len = g.m * g.n;
            be.activation_backward_bias_grad_small_k(
                act,
                g.a,
                g.lda,
                g.b,
                g.ldb,
                g.k,
                pre.prefix(len),
                g.c.prefix(len),
                dbias,
                g.m,
                g.n,
            )
        }
        _ => Ok(false),
    }
}

/// Runs a decided problem.
fn run(be: &mut CudaBackend, g: &Gemm, ep: &Epilogue, resolved: Resolved) -> Result<()> {
    let (v, algo) = match resolved {
        Resolved::Lt(v, algo) => (v, algo),
        Resolved::SmallK if small_k(be, g, ep)? => return Ok(()),
        Resolved::SmallK | Resolved::Composed => return composed(be, g, ep),
    };
    matmul(be, &lt_gemm(g, ep, v.call), v, algo)?;
    let len = g.m * g.n;
    match (v.call.post, *ep) {
        (Post::None, _) => Ok(()),
        (Post::BiasGrad, Epilogue::ActGrad { dbias: Some(db), .. }) => {
            mantissa_core::Backend::bias_grad(be, g.c.prefix(len), db, g.m, g.n, 1)
        }
        (Post::Act, Epilogue::BiasAct { act, pre, .. }) => {
            mantissa_core::Backend::activation(be, act, pre.prefix(len), g.c.prefix(len))
        }
        (Post::ActGradBias, Epilogue::ActGrad { act, pre, dbias }) => {
            be.activation_backward_bias_grad(act, pre.prefix(len), g.c.prefix(len), dbias, g.m, g.n)
        }
        _ => Err(Error::InvalidConfig("internal: a cuBLASLt variant for another epilogue")),
    }
}

/// Mean milliseconds of one call of `f` on the backend's stream: once to warm up, then the best of two samples
/// of [`TUNE_REPS`] calls (see `Lt::reps`) between two events.
fn time(be: &mut CudaBackend, mut f: impl FnMut(&mut CudaBackend) -> Result<()>) -> Result<f32> {
    f(be)?;
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let reps = be.lt.reps;
    let mut best = f32::INFINITY;
    for _ in 0..2 {
        let start = be.stream.record_event(flags).map_err(crate::driver("cuEventRecord"))?;
        for _ in 0..reps {
            f(be)?;
        }
        let end = be.stream.record_event(flags).map_err(crate::driver("cuEventRecord"))?;
        best = best.min(start.elapsed_ms(&end).map_err(crate::driver("cuEventElapsedTime"))? / reps as f32);
    }
    Ok(best)
}

/// Times every candidate of a problem (see [`CudaBackend::set_autotune`]) and logs the outcome; returns the
/// fastest. Algorithms cuBLASLt refuses at run time are left out; the composed version always runs. Every
/// candidate overwrites C (and `pre` or the bias gradient) completely (alpha 1, beta 0, checked by `validate`),
/// so the caller's final run leaves the winner's result.
fn tune(be: &mut CudaBackend, g: &Gemm, ep: &Epilogue, variants: &[Variant]) -> Result<Choice> {
    let default = default_choice(be.lt.act_grad, ep, variants);
    let composed_ms = time(be, |be| composed(be, g, ep))?;
    let mut best = (composed_ms, Choice::Composed);
    let mut default_ms = (default == Choice::Composed).then_some(composed_ms);
    let mut report = Vec::with_capacity(variants.len() + 1);
    // The small-k kernel, where it applies (a refusal is an error here, so it is left out).
    let not_taken = Error::InvalidConfig("small-k kernel does not apply");
    if let Ok(ms) = time(be, |be| small_k(be, g, ep).and_then(|ran| if ran { Ok(()) } else { Err(not_taken) })) {
        if ms < best.0 {
            best = (ms, Choice::SmallK);
        }
        report.push(format!("small_k=[{ms:.4}]"));
    }
    for (vi, &v) in variants.iter().enumerate() {
        let times = time_algos(be, v, |be, algo| run(be, g, ep, Resolved::Lt(v, algo)));
        for (algo, ms) in times.iter().enumerate() {
            let choice = Choice::Lt { variant: vi, algo };
            if let Some(ms) = *ms {
                if ms < best.0 {
                    best = (ms, choice);
                }
                if choice == default {
                    default_ms = Some(ms);
                }
            }
        }
        let times: Vec<String> = times.iter().map(|&ms| fmt_ms(ms)).collect();
        report.push(format!("{}=[{}]", variant_name(v.call), times.join(",")));
    }
    // Leave the default only for a clear win (a default cuBLASLt refused at run time is no default).
    let best = match default_ms {
        Some(d) if !clear_win(d, best.0) => (d, default),
        _ => best,
    };
    let name = |c: Choice| match c {
        Choice::Lt { variant, algo } => format!("{}#{algo}", variant_name(variants[variant].call)),
        Choice::Composed => "composed".to_string(),
        Choice::SmallK => "small_k".to_string(),
    };
    let (chosen, default) = (name(best.1), name(default));
    let default_ms = fmt_ms(default_ms);
    be.lt.log.push(format!(
        "lt_tune: problem={} {} chosen={chosen} chosen_ms={:.4} default={default} default_ms={default_ms} \
         composed_ms={composed_ms:.4} {}",
        describe(g),
        match ep {
            Epilogue::Bias { .. } => "Bias",
            Epilogue::BiasAct { .. } => "BiasAct",
            Epilogue::ActGrad { dbias: Some(_), .. } => "ActGrad+dbias",
            Epilogue::ActGrad { .. } => "ActGrad",
        },
        best.0,
        report.join(" "),
    ));
    Ok(best.1)
}

/// `MxNxK TT A->C`, for the tuning log.
fn describe(g: &Gemm) -> String {
    let t = |x: bool| if x { 'T' } else { 'N' };
    format!("{}x{}x{} {}{} {:?}->{:?}", g.m, g.n, g.k, t(g.trans_a), t(g.trans_b), g.a.dtype, g.c.dtype)
}

/// A short name of a cuBLASLt variant, for the tuning log.
fn variant_name(call: Call) -> String {
    use sys::cublasLtEpilogue_t as E;
    let e = match call.epilogue {
        E::CUBLASLT_EPILOGUE_BIAS => "BIAS",
        E::CUBLASLT_EPILOGUE_GELU_AUX_BIAS => "GELU_AUX_BIAS",
        E::CUBLASLT_EPILOGUE_DGELU => "DGELU",
        E::CUBLASLT_EPILOGUE_DGELU_BGRAD => "DGELU_BGRAD",
        E::CUBLASLT_EPILOGUE_DEFAULT => "DEFAULT",
        _ => "other",
    };
    let post = match call.post {
        Post::None => "",
        Post::BiasGrad => "+bias_grad",
        Post::Act => "+activation",
        Post::ActGradBias => "+act_grad_bias",
    };
    format!("{e}{post}")
}

/// The GEMM cuBLASLt runs for a call: into the pre-activation where the activation follows as a kernel.
fn lt_gemm(g: &Gemm, ep: &Epilogue, call: Call) -> Gemm {
    match (call.post, *ep) {
        (Post::Act, Epilogue::BiasAct { pre, .. }) => Gemm { c: pre, ldc: g.n, ..*g },
        _ => *g,
    }
}

/// The cache key of a call.
fn key(g: &Gemm, call: Call) -> Key {
    Key {
        m: g.m,
        n: g.n,
        k: g.k,
        lda: g.lda,
        ldb: g.ldb,
        trans_a: g.trans_a,
        trans_b: g.trans_b,
        dtype: g.a.dtype,
        c_dtype: g.c.dtype,
        epilogue: call.epilogue,
        vector: call.vector.map(|v| v.dtype),
        align: [align(Some(g.a)), align(Some(g.b)), align(Some(g.c)), align(call.vector), align(call.aux)],
    }
}

/// Finds or builds the plan of a call; `None` when cuBLASLt offers no algorithm for it (asked once).
fn plan(be: &mut CudaBackend, handle: sys::cublasLtHandle_t, g: &Gemm, call: Call) -> Option<Key> {
    let key = key(g, call);
    let vector = call.vector.map_or(0, |v| be.ptr(v));
    let aux = call.aux.map_or(0, |p| be.ptr(p));
    // SAFETY: host-side descriptor work on a live handle; the pointers are only used for their alignment.
    let plan = be.lt.plans.entry(key).or_insert_with(|| unsafe { build(handle, g, &key, vector, aux) });
    plan.as_ref().map(|_| key)
}

/// Enqueues the fused GEMM of `v` with the plan's algorithm `algo`.
fn matmul(be: &mut CudaBackend, g: &Gemm, v: Variant, algo: usize) -> Result<()> {
    let call = v.call;
    let (a, b, c) = (be.ptr(g.a), be.ptr(g.b), be.ptr(g.c));
    let vector = call.vector.map_or(0, |v| be.ptr(v));
    let aux = call.aux.map_or(0, |p| be.ptr(p));
    // The workspace sits just before the scratch in the backend's allocation (shared with cuBLAS: one stream).
    let workspace = be.scratch - WORKSPACE_BYTES as u64;
    let stream = be.stream.cu_stream() as sys::cudaStream_t;
    let Some(Some(plan)) = be.lt.plans.get(&v.key) else {
        return Err(Error::InvalidConfig("internal: a fused GEMM ran without its plan"));
    };
    let algo = plan.algos.get(algo).ok_or(Error::InvalidConfig("internal: no such cuBLASLt algorithm"))?;
    let (alpha, beta) = (1.0f32, 0.0f32);
    // SAFETY: the plan's descriptors are live (owned by the cache); every operand was validated against the
    // arena (A, B, C, `pre` for `m * n` elements, the vector for `n`); the epilogue pointers are set on the
    // descriptor right before the call, which reads them when it is enqueued; the workspace is ours (stream
    // order separates it from cuBLAS's use); alpha and beta are host f32 scalars read before the call returns.
    let status = unsafe {
        set_pointers(plan.desc, vector, aux).and_then(|_| {
            sys::cublasLtMatmul(
                v.handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                b as *const c_void,
                plan.layouts[0],
                a as *const c_void,
                plan.layouts[1],
                &beta as *const f32 as *const c_void,
                c as *const c_void,
                plan.layouts[2],
                c as *mut c_void,
                plan.layouts[2],
                algo,
                workspace as *mut c_void,
                WORKSPACE_BYTES,
                stream,
            )
            .result()
        })
    };
    status.map_err(|e| Error::Device { what: "cublasLtMatmul", code: e.0 as i32 })
}

/// # Safety
/// `desc` is a live matmul descriptor.
unsafe fn set_attr<T>(
    desc: sys::cublasLtMatmulDesc_t,
    attr: sys::cublasLtMatmulDescAttributes_t,
    value: &T,
) -> std::result::Result<(), cudarc::cublaslt::result::CublasError> {
    sys::cublasLtMatmulDescSetAttribute(desc, attr, value as *const T as *const c_void, std::mem::size_of::<T>())
        .result()
}

/// Points the epilogue at this call's vector and aux matrix (0: the epilogue has none).
///
/// # Safety
/// `desc` is a live matmul descriptor.
unsafe fn set_pointers(
    desc: sys::cublasLtMatmulDesc_t,
    vector: u64,
    aux: u64,
) -> std::result::Result<(), cudarc::cublaslt::result::CublasError> {
    use sys::cublasLtMatmulDescAttributes_t as A;
    if vector != 0 {
        set_attr(desc, A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &(vector as *const c_void))?;
    }
    if aux != 0 {
        set_attr(desc, A::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &(aux as *const c_void))?;
    }
    Ok(())
}

/// Creates the descriptor and layouts of `key` and asks the heuristic for its best algorithm; `None` when
/// cuBLASLt refuses any step (the problem is then composed).
///
/// # Safety
/// `handle` is a live cuBLASLt handle. `vector` and `aux` are the device addresses of this call's epilogue
/// operands (0 when absent); they are not dereferenced.
unsafe fn build(handle: sys::cublasLtHandle_t, g: &Gemm, key: &Key, vector: u64, aux: u64) -> Option<Plan> {
    use sys::cublasLtMatmulDescAttributes_t as A;
    use sys::cublasLtMatmulPreferenceAttributes_t as P;
    let mut plan = Plan { desc: std::ptr::null_mut(), layouts: [std::ptr::null_mut(); 3], algos: Vec::new() };
    // f32 accumulation and f32 alpha/beta, as the cuBLAS GEMMs.
    sys::cublasLtMatmulDescCreate(
        &mut plan.desc,
        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        sys::cudaDataType::CUDA_R_32F,
    )
    .result()
    .ok()?;
    let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T as i32 } else { cublasOperation_t::CUBLAS_OP_N as i32 };
    // Swapped operands: cuBLASLt's A is our B.
    set_attr(plan.desc, A::CUBLASLT_MATMUL_DESC_TRANSA, &op(g.trans_b)).ok()?;
    set_attr(plan.desc, A::CUBLASLT_MATMUL_DESC_TRANSB, &op(g.trans_a)).ok()?;
    set_attr(plan.desc, A::CUBLASLT_MATMUL_DESC_EPILOGUE, &(key.epilogue as u32)).ok()?;
    if let Some(vt) = key.vector {
        set_attr(plan.desc, A::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &(lt_type(vt) as i32)).ok()?;
    }
    if aux != 0 {
        // `pre` has C's layout: leading dimension n (in elements), C's dtype (cuBLASLt's default aux type).
        set_attr(plan.desc, A::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &(g.n as i64)).ok()?;
    }
    set_pointers(plan.desc, vector, aux).ok()?;

    let t = lt_type(g.a.dtype);
    let (m, n, k) = (g.m as u64, g.n as u64, g.k as u64);
    // Column-major views: our B is [n, k] (or [k, n] stored when transposed), our A [k, m], C [n, m].
    let dims = [
        (if g.trans_b { (k, n) } else { (n, k) }, g.ldb),
        (if g.trans_a { (m, k) } else { (k, m) }, g.lda),
        ((n, m), g.ldc),
    ];
    let types = [t, t, lt_type(g.c.dtype)];
    for ((layout, ((rows, cols), ld)), t) in plan.layouts.iter_mut().zip(dims).zip(types) {
        sys::cublasLtMatrixLayoutCreate(layout, t, rows, cols, ld as i64).result().ok()?;
    }

    let mut pref = std::ptr::null_mut();
    sys::cublasLtMatmulPreferenceCreate(&mut pref).result().ok()?;
    // As the cuBLAS path (CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION): split-K partial sums only in f32.
    let reduction = sys::cublasLtReductionScheme_t::CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE as u32;
    let [al_a, al_b, al_c, _, _] = key.align;
    // Swapped operands again: cuBLASLt's A is our B.
    let prefs = [
        set_pref(pref, P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &(WORKSPACE_BYTES as u64)),
        set_pref(pref, P::CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &reduction),
        set_pref(pref, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_b),
        set_pref(pref, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_a),
        set_pref(pref, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c),
        set_pref(pref, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_c),
    ];
    // SAFETY (of zeroed): a plain C struct of integers and byte arrays, for which all-zero bytes are valid.
    let mut results = vec![std::mem::zeroed::<sys::cublasLtMatmulHeuristicResult_t>(); TUNE_CANDIDATES];
    let mut count = 0;
    let found = prefs.iter().all(|r| r.is_ok())
        && sys::cublasLtMatmulAlgoGetHeuristic(
            handle,
            plan.desc,
            plan.layouts[0],
            plan.layouts[1],
            plan.layouts[2],
            plan.layouts[2],
            pref,
            TUNE_CANDIDATES as i32,
            results.as_mut_ptr(),
            &mut count,
        )
        .result()
        .is_ok()
        && count > 0;
    let _ = sys::cublasLtMatmulPreferenceDestroy(pref);
    if !found {
        return None;
    }
    // The heuristic wrote `count` results, best first; keep those it reports usable within our workspace.
    plan.algos = results
        .iter()
        .take(count.max(0) as usize)
        .filter(|r| r.state.result().is_ok() && r.workspaceSize <= WORKSPACE_BYTES)
        .map(|r| r.algo)
        .collect();
    if plan.algos.is_empty() {
        return None;
    }
    Some(plan)
}

/// # Safety
/// `pref` is a live preference descriptor.
unsafe fn set_pref<T>(
    pref: sys::cublasLtMatmulPreference_t,
    attr: sys::cublasLtMatmulPreferenceAttributes_t,
    value: &T,
) -> std::result::Result<(), cudarc::cublaslt::result::CublasError> {
    sys::cublasLtMatmulPreferenceSetAttribute(pref, attr, value as *const T as *const c_void, std::mem::size_of::<T>())
        .result()
}
