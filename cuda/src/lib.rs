//! mantissa-cuda: the NVIDIA backend.
//!
//! - One device allocation per backend: the arena (the same [`Buf`] byte offsets as on the CPU), then the
//!   cuBLAS workspace and a small scratch area for reductions, flags and upload staging. Nothing else is
//!   allocated on the device after [`CudaBackend::new`].
//! - Matrix products on tensor cores through cuBLAS (`cublasGemmStridedBatchedEx`): bf16/f16 inputs, f32
//!   accumulation, C in f32 or the input dtype; f32 inputs in strict f32 (`CUBLAS_COMPUTE_32F`, no TF32, as
//!   PyTorch's default). Reduced-precision split-K reductions are disallowed, so a 16-bit C is rounded once
//!   from f32, as in the reference. What cuBLAS does not take runs on the naive kernel in `kernels/gemm.cu`.
//! - Every other op is a CUDA C kernel in `kernels/*.cu` (one op family per file, instantiated per dtype by
//!   macros), compiled by NVRTC once per process for the device's architecture.
//! - cudarc loads libcuda, libcublas and libnvrtc at run time: this crate builds without CUDA, and
//!   [`CudaBackend::new`] on a machine without them (or without a GPU) returns
//!   [`Error::DeviceUnavailable`].
//!
//! Numerics follow [`mantissa_core::backend`]'s conventions (loads widen to f32, compute in f32, stores round
//! to nearest even); [`mantissa_core::Reference`] is the specification and `cuda/tests` compare every op with it.
//! Ops are queued on one stream; the ones that return data (`download*`, `grad_stats`, and
//! `softmax_cross_entropy`, which reports a bad label) wait for it. A training step needs none of them: its
//! decisions (apply or skip, the loss scale, the optimizer's multipliers) are made by kernels in the step-control
//! block (`control.rs`), and the whole step can be recorded once and replayed as a CUDA graph (`graph.rs`).

use std::sync::Arc;

use cudarc::cublas::{sys as blas, CudaBlas};
use cudarc::driver::{result as cur, sys as cu, CudaContext, CudaStream, DriverError};
use half::bf16;
use mantissa_core::backend::{
    Activation, AdamWStep, Backend, Capabilities, ConvGeom, Gemm, GradStats, LossTo, ParamBufs, PoolGeom, SgdStep,
};
use mantissa_core::control::StepRule;
use mantissa_core::{Buf, DType, Error, Result};

mod act_grad;
mod control;
mod gemm;
mod graph;
mod head;
mod kernels;
mod lt;

/// Autotune's constants (see [`CudaBackend::set_autotune`]).
pub use lt::{TUNE_CANDIDATES, TUNE_MARGIN, TUNE_MIN_GAIN_MS, TUNE_MIN_WORK, TUNE_REPS};

use kernels::{launch, Arg, Family, Kernels};

// Kernel arguments are passed as the low bytes of 8-byte slots, and raw bytes are copied to and from the
// device as they are: both assume a little-endian host, as every host CUDA supports is.
const _: () = assert!(cfg!(target_endian = "little"), "mantissa-cuda needs a little-endian host");

/// cuBLAS workspace, carved from the backend's one allocation (NVIDIA's recommended size for Hopper).
const WORKSPACE_BYTES: usize = 8 << 20;
/// Scratch after the workspace: flags, partial sums and upload staging.
const SCRATCH_BYTES: usize = 8 << 20;
// Scratch layout (byte offsets): the bad-label flag (2 x i32); per-block loss sums (f32); per-block sums of
// squares (f64) and non-finite counts (u64) of grad_stats; then one big region shared by bias_grad's partial
// sums and f32 upload staging (ops run in stream order, so they never use it at the same time).
const FLAG_OFF: usize = 0;
/// Two u64 counters (count_underflow, count_correct), after the label flag.
const COUNT_OFF: usize = 64;
const LOSS_OFF: usize = 4096;
/// grad_stats' per-block sums of squares (f64), followed directly by its per-block non-finite counts (u64).
const STATS_SUM_OFF: usize = 8192;
/// softmax_cross_entropy_to's per-block counts (3 x u32 a block), after grad_stats' 16 KiB.
const LOSS_COUNTS_OFF: usize = 32768;
const BIG_OFF: usize = 65536;
const _: () = assert!(STATS_SUM_OFF + 16 * MAX_PARTIAL_BLOCKS <= LOSS_COUNTS_OFF);
const _: () = assert!(LOSS_COUNTS_OFF + 12 * MAX_PARTIAL_BLOCKS <= BIG_OFF);
const BIG_BYTES: usize = SCRATCH_BYTES - BIG_OFF;
/// At most this many blocks write per-block partial sums (the sizes of the regions above).
const MAX_PARTIAL_BLOCKS: usize = 1024;
/// `bias_grad` with `inner == 1` and at most this many channels reads dy as one flat array (`bias_grad_few`).
const FEW_CHANNELS: usize = 64;

/// Maps a driver error to [`Error::Device`], naming what failed.
pub(crate) fn driver(what: &'static str) -> impl Fn(DriverError) -> Error {
    move |e| Error::Device { what, code: e.0 as i32 }
}

fn blas_err(what: &'static str) -> impl Fn(cudarc::cublas::result::CublasError) -> Error {
    move |e| Error::Device { what, code: e.0 as i32 }
}

/// The device memory of one backend, freed after everything that uses it (it is the last field dropped).
struct DeviceMemory {
    ptr: cu::CUdeviceptr,
    ctx: Arc<CudaContext>,
}

impl Drop for DeviceMemory {
    fn drop(&mut self) {
        // Errors cannot be reported from drop; the context is being torn down anyway.
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `ptr` came from `malloc_sync` in this context and is freed once; the owning backend
        // synchronized its stream before its fields are dropped, and nothing else holds the address.
        let _ = unsafe { cur::free_sync(self.ptr) };
    }
}

/// The CUDA backend: one GPU, one stream, one device allocation.
pub struct CudaBackend {
    // Field order is drop order: the recorded graphs, cuBLAS and the modules go before the memory, the memory
    // before the context.
    graphs: graph::Graphs,
    blas: CudaBlas,
    /// cuBLASLt for the fused-epilogue GEMMs and autotune, with its per-problem cache (see `lt.rs`).
    lt: lt::Lt,
    kernels: Kernels,
    _mem: DeviceMemory,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    /// Device address of byte 0 of the arena.
    base: u64,
    capacity: usize,
    /// Device address of the scratch area.
    scratch: u64,
    sm_count: u32,
    device: &'static str,
    compute_capability: (i32, i32),
    /// Host staging for downloads that convert (16-bit and i32 to f32).
    host: Vec<u8>,
    /// Whether GEMMs with m <= 16 run on `kernels/skinny.cu` and `bias_grad` with few channels on its flat
    /// layout (see `gemm.rs`).
    skinny: bool,
    /// Whether the small-n and small-k skinny kernels (and the fused small-k `ActGrad`) run too; off by default:
    /// slower than cuBLAS on the H200 (numbers on `set_skinny_all`).
    skinny_all: bool,
    /// Whether a classifier layer runs as one pass each way (see `head.rs`).
    fused_head: bool,
    /// Classifier forward and backward calls that ran as one pass (for tests and reports).
    head_calls: u64,
    /// Whether `softmax_cross_entropy_to` runs as one pass (see `control.rs`).
    fused_loss: bool,
    /// Whether kernels launch with programmatic dependent launch (see `kernels::launch`): sm_90 and later.
    pdl: bool,
    /// Resident blocks of a kernel on the whole device, by `CUfunction` address (`act_grad::resident_blocks`).
    resident: std::collections::HashMap<usize, usize>,
    /// Taken when the backend is dropped and released after every other field: no graph capture (on another
    /// thread) runs while this backend's memory, modules and handles are freed (see graph.rs).
    closing: Option<graph::Exclusive>,
}

// SAFETY: the raw handles inside (`CUfunction`s, the device address) belong to the CUDA context, not to a
// thread; every op binds the context to the calling thread first, and `&mut self` serialises the ops.
unsafe impl Send for CudaBackend {}

impl core::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("device", &self.device)
            .field("ordinal", &self.ctx.ordinal())
            .field("compute_capability", &self.compute_capability)
            .field("arena_bytes", &self.capacity)
            .finish()
    }
}

impl CudaBackend {
    /// Opens GPU `ordinal` with an arena of `arena_bytes` (plus 48 MiB for the cuBLAS workspace and scratch,
    /// in the same allocation) and compiles the kernels (once per process, about a second).
    ///
    /// No driver, no GPU, a missing cuBLAS or NVRTC library, or no device `ordinal`: [`Error::DeviceUnavailable`].
    /// Not enough device memory: [`Error::OutOfMemory`].
    pub fn new(ordinal: usize, arena_bytes: usize) -> Result<CudaBackend> {
        // cudarc's dynamic loading panics when a library is missing: look for each one first.
        // SAFETY: these only try to open the libraries (dlopen) and close them again.
        let present = unsafe {
            [
                (cu::is_culib_present(), "libcuda (the NVIDIA driver) was not found"),
                (blas::is_culib_present(), "libcublas was not found (add CUDA's lib64 to LD_LIBRARY_PATH)"),
                (
                    cudarc::nvrtc::sys::is_culib_present(),
                    "libnvrtc was not found (add CUDA's lib64 to LD_LIBRARY_PATH)",
                ),
            ]
        };
        for (found, why) in present {
            if !found {
                return Err(Error::DeviceUnavailable(why));
            }
        }
        // Allocating memory, loading modules and creating handles must not overlap another backend's graph
        // capture (see graph.rs).
        let _gate = graph::Exclusive::acquire();
        // A library can still be present but unusable (too old, a symbol missing), which cudarc also reports
        // by panicking on first use; catch that here and answer with an error value. (The panic message is
        // still printed by the panic hook, which says which library and symbol.)
        std::panic::catch_unwind(|| CudaBackend::open(ordinal, arena_bytes))
            .unwrap_or(Err(Error::DeviceUnavailable("a CUDA library failed to load (see the message above)")))
    }

    fn open(ordinal: usize, arena_bytes: usize) -> Result<CudaBackend> {
        cur::init().map_err(|_| Error::DeviceUnavailable("the CUDA driver found no usable GPU (cuInit failed)"))?;
        let count = cur::device::get_count().map_err(|_| Error::DeviceUnavailable("no CUDA device"))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::DeviceUnavailable("no CUDA device with that ordinal"));
        }
        let ctx = CudaContext::new(ordinal).map_err(driver("creating the CUDA context"))?;
        // SAFETY: cudarc's event tracking orders uses of its `CudaSlice`s across streams; this backend has none
        // (raw addresses into one allocation, one stream), so there is nothing to track. Off, `new_stream` also
        // skips its context-wide synchronize, which could disturb another backend's graph capture.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(driver("creating a stream"))?;
        let name = ctx.name().unwrap_or_else(|_| "NVIDIA GPU".to_string());
        let compute_capability = ctx.compute_capability().map_err(driver("reading the compute capability"))?;
        let sm_count = ctx
            .attribute(cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver("reading the multiprocessor count"))?
            .max(1) as u32;

        let arena = arena_bytes.div_ceil(256) * 256;
        let total = arena
            .checked_add(WORKSPACE_BYTES + SCRATCH_BYTES)
            .ok_or(Error::OutOfMemory { needed: usize::MAX, available: 0 })?;
        // SAFETY: the context is current (CudaContext::new bound it); the result is checked.
        let ptr = match unsafe { cur::malloc_sync(total) } {
            Ok(p) => p,
            Err(e) if e.0 == cu::CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
                let free = ctx.mem_get_info().map(|(free, _)| free).unwrap_or(0);
                return Err(Error::OutOfMemory { needed: total, available: free });
            }
            Err(e) => return Err(driver("allocating the arena")(e)),
        };
        let mem = DeviceMemory { ptr, ctx: ctx.clone() };

        let blas = CudaBlas::new(stream.clone()).map_err(blas_err("creating the cuBLAS handle"))?;
        // SAFETY: the workspace lies inside our allocation, which outlives the handle (field order), and is
        // used by nothing else; the math mode is a plain enum value.
        unsafe {
            blas::cublasSetWorkspace_v2(*blas.handle(), (ptr + arena as u64) as *mut _, WORKSPACE_BYTES)
                .result()
                .map_err(blas_err("setting the cuBLAS workspace"))?;
            // f32 compute with round-once 16-bit outputs: no TF32, no reduced-precision split-K reductions.
            blas::cublasSetMathMode(
                *blas.handle(),
                blas::cublasMath_t::CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION,
            )
            .result()
            .map_err(blas_err("setting the cuBLAS math mode"))?;
        }

        let arch = arch_name(compute_capability);
        // NVRTC may be older than the GPU: then let it pick its default target and the driver JIT the PTX.
        let kernels = match Kernels::load(&ctx, arch) {
            Ok(k) => k,
            Err(_) if arch.is_some() => Kernels::load(&ctx, None)?,
            Err(e) => return Err(e),
        };

        let (major, minor) = compute_capability;
        Ok(CudaBackend {
            graphs: graph::Graphs::new(ctx.clone(), stream.clone()),
            blas,
            lt: lt::Lt::open(),
            kernels,
            _mem: mem,
            stream,
            ctx,
            base: ptr,
            capacity: arena_bytes,
            scratch: ptr + (arena + WORKSPACE_BYTES) as u64,
            sm_count,
            device: Box::leak(format!("{name} (sm_{major}{minor})").into_boxed_str()),
            compute_capability,
            host: Vec::new(),
            skinny: true,
            skinny_all: false,
            fused_head: true,
            head_calls: 0,
            fused_loss: true,
            pdl: major >= 9,
            resident: std::collections::HashMap::new(),
            closing: None,
        })
    }

    /// Device bytes this backend holds: the arena plus the cuBLAS workspace and op scratch (one allocation).
    pub fn device_bytes(&self) -> usize {
        self.capacity.div_ceil(256) * 256 + WORKSPACE_BYTES + SCRATCH_BYTES
    }

    /// The GPU's compute capability, `(major, minor)`: `(9, 0)` on an H100/H200.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// Compiles every kernel file with NVRTC for `arch` (`Some("sm_90")`) without loading it: a check that
    /// needs libnvrtc but no GPU. Returns the number of files compiled.
    pub fn compile_kernels(arch: Option<&'static str>) -> Result<usize> {
        // SAFETY: dlopen probe, as in `new`.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(Error::DeviceUnavailable("libnvrtc was not found"));
        }
        kernels::compile(arch).map(|p| p.len())
    }

    // ---- plumbing ----

    fn enter(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(driver("binding the CUDA context"))
    }

    fn ptr(&self, b: Buf) -> u64 {
        self.base + b.offset as u64
    }

    /// Blocks for a grid-stride loop over `n` items with `block` threads each.
    fn grid(&self, n: usize, block: u32) -> u32 {
        n.div_ceil(block as usize).clamp(1, self.sm_count as usize * 16) as u32
    }

    fn run(
        &mut self,
        fam: Family,
        base: &'static str,
        a: DType,
        b: Option<DType>,
        n: usize,
        args: &[Arg],
    ) -> Result<()> {
        let f = self.kernels.get(fam, base, Some(a), b)?;
        launch(self, f, (self.grid(n, 256), 1, 1), (256, 1, 1), args)
    }

    /// Launches the vectorised `{base8}` kernel (groups of 8 elements, 16-byte loads and stores) when every
    /// array in `ptrs` is 16-byte aligned, else the scalar `{base}` kernel; both take the same arguments and
    /// compute the same per-element results.
    #[allow(clippy::too_many_arguments)]
    fn run_vec(
        &mut self,
        fam: Family,
        (base, base8): (&'static str, &'static str),
        a: DType,
        b: Option<DType>,
        n: usize,
        ptrs: &[u64],
        args: &[Arg],
    ) -> Result<()> {
        if n >= 8 && ptrs.iter().all(|p| p % 16 == 0) {
            let f = self.kernels.get(fam, base8, Some(a), b)?;
            launch(self, f, (self.grid(n.div_ceil(8), 256), 1, 1), (256, 1, 1), args)
        } else {
            self.run(fam, base, a, b, n, args)
        }
    }

    fn sync(&self) -> Result<()> {
        self.graphs.refuse("cannot wait for the device while recording a CUDA graph")?;
        self.stream.synchronize().map_err(driver("stream synchronize"))
    }

    fn htod<T>(&self, dst: u64, src: &[T]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        // A recorded copy would read `src` again at every replay, long after it is gone.
        self.graphs.refuse("cannot copy host memory to the device while recording a CUDA graph")?;
        // SAFETY: callers validated that `dst` addresses `size_of_val(src)` bytes inside our allocation. From
        // pageable memory the call returns once `src` has been staged, so `src` may be reused right after.
        unsafe { cur::memcpy_htod_async(dst, src, self.stream.cu_stream()) }.map_err(driver("copy to the device"))
    }

    /// Copies device bytes to the host and waits for them.
    fn dtoh<T>(&self, dst: &mut [T], src: u64) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        self.graphs.refuse("cannot copy device memory to the host while recording a CUDA graph")?;
        // SAFETY: callers validated that `src` addresses `size_of_val(dst)` bytes inside our allocation; the
        // stream is synchronized before `dst` is read.
        unsafe { cur::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }.map_err(driver("copy to the host"))?;
        self.sync()
    }

    fn check(&self, b: Buf, what: &'static str) -> Result<()> {
        b.check_in(self.capacity, what)
    }

    fn check_len(b: Buf, len: usize, what: &'static str) -> Result<()> {
        b.check_len(len, what)
    }

    fn float(b: Buf, what: &'static str) -> Result<DType> {
        if b.dtype == DType::I32 {
            return Err(Error::UnsupportedDType { what, dtype: DType::I32 });
        }
        Ok(b.dtype)
    }

    fn memset(&self, dst: Buf, value: f32) -> Result<()> {
        if dst.len == 0 {
            return Ok(());
        }
        let (p, s) = (self.ptr(dst), self.stream.cu_stream());
        // SAFETY: `dst` was checked against the arena and is aligned for its element size.
        let r = unsafe {
            match dst.dtype {
                DType::I32 => cu::cuMemsetD32Async(p, value as i32 as u32, dst.len, s),
                DType::F32 => cu::cuMemsetD32Async(p, value.to_bits(), dst.len, s),
                DType::F16 => cu::cuMemsetD16Async(p, mantissa_core::dtype::f32_to_f16_bits(value), dst.len, s),
                DType::BF16 => cu::cuMemsetD16Async(p, bf16::from_f32(value).to_bits(), dst.len, s),
            }
        };
        r.result().map_err(driver("memset"))
    }

    /// Geometry kernel arguments (`i64` each), in the kernels' parameter order.
    fn geometry_args(v: &[usize]) -> impl Iterator<Item = Arg> + '_ {
        v.iter().map(|&x| Arg::I64(x as i64))
    }

    /// The working-copy arguments of a fused optimizer kernel: its dtype, address and whether to write it
    /// (not when it is the master itself, float32 policy).
    fn working(&self, p: &ParamBufs) -> (DType, u64, i32) {
        if p.working.offset == p.master.offset {
            (DType::F32, self.ptr(p.master), 0)
        } else {
            (p.working.dtype, self.ptr(p.working), 1)
        }
    }
}

/// NVRTC's name for a compute capability (`sm_90`); leaked once per distinct value (NVRTC takes `&'static`).
fn arch_name((major, minor): (i32, i32)) -> Option<&'static str> {
    static NAMES: std::sync::Mutex<Vec<((i32, i32), &'static str)>> = std::sync::Mutex::new(Vec::new());
    if major <= 0 {
        return None;
    }
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(&(_, n)) = names.iter().find(|(cc, _)| *cc == (major, minor)) {
        return Some(n);
    }
    let n: &'static str = Box::leak(format!("sm_{major}{minor}").into_boxed_str());
    names.push(((major, minor), n));
    Some(n)
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // Let queued work finish before the fields (graphs, cuBLAS, modules, then the memory) are released;
        // a capture left open is ended first (a capturing stream cannot be synchronised).
        let _ = self.enter();
        self.graphs.abandon();
        self.closing = Some(graph::Exclusive::acquire());
        let _ = self.stream.synchronize();
    }
}

impl Backend for CudaBackend {
    fn capabilities(&self) -> Capabilities {
        let (major, _) = self.compute_capability;
        // Tensor cores: f16 from Volta (7.0), bf16 from Ampere (8.0).
        Capabilities { backend: "cuda", device: self.device, fast_f16: major >= 7, fast_bf16: major >= 8 }
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn upload(&mut self, dst: Buf, src: &[f32]) -> Result<()> {
        self.check(dst, "upload")?;
        if src.len() != dst.len {
            return Err(Error::ShapeMismatch { what: "upload", expected: dst.len, got: src.len() });
        }
        let dt = Self::float(dst, "upload")?;
        self.enter()?;
        if dt == DType::F32 {
            return self.htod(self.ptr(dst), src);
        }
        // 16-bit: copy the f32 values into the scratch and round on the device (the same round-to-nearest-even
        // as the host's), a chunk at a time. Stream order keeps each chunk's copy after the previous cast.
        let staging = self.scratch + BIG_OFF as u64;
        let chunk = BIG_BYTES / 4;
        for (i, part) in src.chunks(chunk).enumerate() {
            self.htod(staging, part)?;
            let d = self.ptr(dst) + (i * chunk * dt.size()) as u64;
            let args = [Arg::U64(staging), Arg::U64(d), Arg::U64(part.len() as u64)];
            self.run_vec(
                Family::Elementwise,
                ("cast", "cast8"),
                DType::F32,
                Some(dt),
                part.len(),
                &[staging, d],
                &args,
            )?;
        }
        Ok(())
    }

    fn upload_i32(&mut self, dst: Buf, src: &[i32]) -> Result<()> {
        self.check(dst, "upload_i32")?;
        if dst.dtype != DType::I32 {
            return Err(Error::UnsupportedDType { what: "upload_i32", dtype: dst.dtype });
        }
        if src.len() != dst.len {
            return Err(Error::ShapeMismatch { what: "upload_i32", expected: dst.len, got: src.len() });
        }
        self.enter()?;
        self.htod(self.ptr(dst), src)
    }

    fn download(&mut self, src: Buf, dst: &mut [f32]) -> Result<()> {
        self.check(src, "download")?;
        if dst.len() != src.len {
            return Err(Error::ShapeMismatch { what: "download", expected: src.len, got: dst.len() });
        }
        self.enter()?;
        if src.dtype == DType::F32 {
            return self.dtoh(dst, self.ptr(src));
        }
        let mut host = std::mem::take(&mut self.host);
        host.resize(src.bytes(), 0);
        let r = self.dtoh(&mut host[..], self.ptr(src));
        if r.is_ok() {
            let size = src.dtype.size();
            for (d, b) in dst.iter_mut().zip(host.chunks_exact(size)) {
                *d = match src.dtype {
                    DType::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32,
                    DType::F16 => mantissa_core::dtype::f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]])),
                    DType::BF16 => f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16),
                    DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                };
            }
        }
        self.host = host;
        r
    }

    fn download_bytes(&mut self, src: Buf, dst: &mut [u8]) -> Result<()> {
        self.check(src, "download_bytes")?;
        if dst.len() != src.bytes() {
            return Err(Error::ShapeMismatch { what: "download_bytes", expected: src.bytes(), got: dst.len() });
        }
        self.enter()?;
        self.dtoh(dst, self.ptr(src))
    }

    fn upload_bytes(&mut self, dst: Buf, src: &[u8]) -> Result<()> {
        self.check(dst, "upload_bytes")?;
        if src.len() != dst.bytes() {
            return Err(Error::ShapeMismatch { what: "upload_bytes", expected: dst.bytes(), got: src.len() });
        }
        self.enter()?;
        self.htod(self.ptr(dst), src)
    }

    fn fill(&mut self, dst: Buf, value: f32) -> Result<()> {
        self.check(dst, "fill")?;
        self.enter()?;
        // A memset of the value's bit pattern, rounded on the host as the reference rounds it: exact, and no
        // kernel needed.
        self.memset(dst, value)
    }

    fn cast(&mut self, src: Buf, dst: Buf) -> Result<()> {
        self.check(src, "cast")?;
        self.check(dst, "cast")?;
        Self::check_len(dst, src.len, "cast")?;
        let (s, d) = (Self::float(src, "cast")?, Self::float(dst, "cast")?);
        if src.len == 0 || (s == d && src.offset == dst.offset) {
            return Ok(());
        }
        self.enter()?;
        // f32 -> f32 is a copy. A 16-bit -> same 16-bit cast goes through the kernel, which quiets signalling
        // NaNs exactly as the reference's widen-then-round does.
        if s == d && s == DType::F32 {
            // SAFETY: both ranges were checked against the arena.
            return unsafe {
                cur::memcpy_dtod_async(self.ptr(dst), self.ptr(src), src.bytes(), self.stream.cu_stream())
            }
            .map_err(driver("device copy"));
        }
        let (sp, dp) = (self.ptr(src), self.ptr(dst));
        let args = [Arg::U64(sp), Arg::U64(dp), Arg::U64(src.len as u64)];
        self.run_vec(Family::Elementwise, ("cast", "cast8"), s, Some(d), src.len, &[sp, dp], &args)
    }

    fn gemm(&mut self, g: &Gemm) -> Result<()> {
        gemm::gemm(self, g)
    }

    fn gemm_fused(&mut self, g: &Gemm, ep: &mantissa_core::backend::Epilogue) -> Result<()> {
        lt::gemm_fused(self, g, ep)
    }

    fn linear_act_forward(&mut self, op: &mantissa_core::backend::LinearActForward) -> Result<bool> {
        head::linear_act_forward(self, op)
    }

    fn linear_act_backward(&mut self, op: &mantissa_core::backend::LinearActBackward) -> Result<()> {
        head::linear_act_backward(self, op)
    }

    fn add_bias(&mut self, y: Buf, bias: Buf, outer: usize, channels: usize, inner: usize) -> Result<()> {
        self.check(y, "add_bias y")?;
        self.check(bias, "add_bias bias")?;
        Self::check_len(y, outer * channels * inner, "add_bias y")?;
        Self::check_len(bias, channels, "add_bias bias")?;
        let (yt, bt) = (Self::float(y, "add_bias")?, Self::float(bias, "add_bias")?);
        let n = outer * channels * inner;
        if n == 0 {
            return Ok(());
        }
        self.enter()?;
        let yp = self.ptr(y);
        let args = [
            Arg::U64(yp),
            Arg::U64(self.ptr(bias)),
            Arg::U64(n as u64),
            Arg::U64(channels as u64),
            Arg::U64(inner as u64),
        ];
        // The bias is read element by element (cached): only y needs the alignment.
        self.run_vec(Family::Elementwise, ("add_bias", "add_bias8"), yt, Some(bt), n, &[yp], &args)
    }

    fn bias_grad(&mut self, dy: Buf, dbias: Buf, outer: usize, channels: usize, inner: usize) -> Result<()> {
        self.check(dy, "bias_grad dy")?;
        self.check(dbias, "bias_grad dbias")?;
        Self::check_len(dy, outer * channels * inner, "bias_grad dy")?;
        Self::check_len(dbias, channels, "bias_grad dbias")?;
        let (yt, bt) = (Self::float(dy, "bias_grad")?, Self::float(dbias, "bias_grad")?);
        if channels == 0 {
            return Ok(());
        }
        self.enter()?;
        if outer * inner == 0 {
            return self.memset(dbias.prefix(channels), 0.0);
        }
        // Pass 1 writes partial sums [splits, cc] into the scratch for a chunk of cc channels; pass 2 adds them
        // up per channel in split order. Enough splits to give every multiprocessor a few blocks.
        let partial = self.scratch + BIG_OFF as u64;
        let room = BIG_BYTES / 4;
        if inner == 1 && channels <= FEW_CHANNELS && self.skinny {
            // Few channels (a classifier's [8192, 10]): dy read as one flat array, every thread of a block busy;
            // about 2048 values per block, then a warp per channel adds the blocks' sums.
            let per = outer.div_ceil((outer * channels).div_ceil(2048).clamp(1, self.sm_count as usize * 4));
            let blocks = outer.div_ceil(per);
            let f = self.kernels.get(Family::Reduce, "bias_grad_few", Some(yt), None)?;
            let args = [
                Arg::U64(self.ptr(dy)),
                Arg::U64(partial),
                Arg::U64(outer as u64),
                Arg::U64(channels as u64),
                Arg::U64(per as u64),
            ];
            launch(self, f, (blocks as u32, 1, 1), (256, 1, 1), &args)?;
            let f = self.kernels.get(Family::Reduce, "bias_grad_finish_warp", Some(bt), None)?;
            let args =
                [Arg::U64(partial), Arg::U64(self.ptr(dbias)), Arg::U64(channels as u64), Arg::U64(blocks as u64)];
            return launch(self, f, (channels.div_ceil(8) as u32, 1, 1), (256, 1, 1), &args);
        }
        let target_blocks = self.sm_count as usize * 4;
        let mut c0 = 0;
        while c0 < channels {
            let cc = (channels - c0).min(room);
            let max_splits = (room / cc).clamp(1, 65535);
            let splits = if inner == 1 {
                let bx = cc.div_ceil(32);
                let want = target_blocks.div_ceil(bx).min(outer.div_ceil(8)).clamp(1, max_splits);
                let per = outer.div_ceil(want);
                let splits = outer.div_ceil(per);
                let f = self.kernels.get(Family::Reduce, "bias_grad_rows", Some(yt), None)?;
                let args = [
                    Arg::U64(self.ptr(dy)),
                    Arg::U64(partial),
                    Arg::U64(outer as u64),
                    Arg::U64(channels as u64),
                    Arg::U64(c0 as u64),
                    Arg::U64(cc as u64),
                    Arg::U64(per as u64),
                ];
                launch(self, f, (bx as u32, splits as u32, 1), (32, 8, 1), &args)?;
                splits
            } else {
                let want = target_blocks.div_ceil(cc).min(outer).clamp(1, max_splits);
                let per = outer.div_ceil(want);
                let splits = outer.div_ceil(per);
                let f = self.kernels.get(Family::Reduce, "bias_grad_inner", Some(yt), None)?;
                let args = [
                    Arg::U64(self.ptr(dy)),
                    Arg::U64(partial),
                    Arg::U64(outer as u64),
                    Arg::U64(channels as u64),
                    Arg::U64(inner as u64),
                    Arg::U64(c0 as u64),
                    Arg::U64(cc as u64),
                    Arg::U64(per as u64),
                ];
                launch(self, f, (cc as u32, splits as u32, 1), (256, 1, 1), &args)?;
                splits
            };
            let args = [
                Arg::U64(partial),
                Arg::U64(self.ptr(dbias)),
                Arg::U64(c0 as u64),
                Arg::U64(cc as u64),
                Arg::U64(splits as u64),
            ];
            self.run(Family::Reduce, "bias_grad_finish", bt, None, cc, &args)?;
            c0 += cc;
        }
        Ok(())
    }

    fn activation(&mut self, act: Activation, x: Buf, y: Buf) -> Result<()> {
        self.check(x, "activation x")?;
        self.check(y, "activation y")?;
        Self::check_len(y, x.len, "activation y")?;
        let (xt, yt) = (Self::float(x, "activation")?, Self::float(y, "activation")?);
        if x.len == 0 {
            return Ok(());
        }
        self.enter()?;
        let (xp, yp) = (self.ptr(x), self.ptr(y));
        let args = [Arg::I32(act_code(act)), Arg::U64(xp), Arg::U64(yp), Arg::U64(x.len as u64)];
        self.run_vec(Family::Elementwise, ("act_fwd", "act_fwd8"), xt, Some(yt), x.len, &[xp, yp], &args)
    }

    fn activation_backward(&mut self, act: Activation, x: Buf, dy: Buf, dx: Buf) -> Result<()> {
        self.check(x, "activation_backward x")?;
        self.check(dy, "activation_backward dy")?;
        self.check(dx, "activation_backward dx")?;
        Self::check_len(dy, x.len, "activation_backward dy")?;
        Self::check_len(dx, x.len, "activation_backward dx")?;
        if dx.dtype != dy.dtype {
            return Err(Error::UnsupportedDType { what: "activation_backward dx (must match dy)", dtype: dx.dtype });
        }
        let (xt, dt) = (Self::float(x, "activation_backward")?, Self::float(dy, "activation_backward")?);
        if x.len == 0 {
            return Ok(());
        }
        self.enter()?;
        let (xp, dyp, dxp) = (self.ptr(x), self.ptr(dy), self.ptr(dx));
        let args = [Arg::I32(act_code(act)), Arg::U64(xp), Arg::U64(dyp), Arg::U64(dxp), Arg::U64(x.len as u64)];
        self.run_vec(Family::Elementwise, ("act_bwd", "act_bwd8"), xt, Some(dt), x.len, &[xp, dyp, dxp], &args)
    }

    fn softmax_cross_entropy(
        &mut self,
        logits: Buf,
        labels: Buf,
        rows: usize,
        classes: usize,
        loss: Buf,
        dlogits: Buf,
        grad_scale: f32,
    ) -> Result<()> {
        // Waits for the bad-label flag, except while recording (see control::softmax_xent).
        control::softmax_xent(self, logits, labels, rows, classes, loss, dlogits, grad_scale, control::Xent::Plain)
    }

    fn im2col(&mut self, x: Buf, g: &ConvGeom, images: usize, cols: Buf) -> Result<()> {
        self.check(x, "im2col x")?;
        self.check(cols, "im2col cols")?;
        Self::check_len(x, images * g.in_len(), "im2col x")?;
        let per = g.col_rows() * g.col_cols();
        Self::check_len(cols, images * per, "im2col cols")?;
        let (xt, ct) = (Self::float(x, "im2col")?, Self::float(cols, "im2col")?);
        let n = images * per;
        if n == 0 {
            return Ok(());
        }
        self.enter()?;
        let mut args = vec![Arg::U64(self.ptr(x)), Arg::U64(self.ptr(cols))];
        args.extend(Self::geometry_args(&[
            images,
            g.channels,
            g.height,
            g.width,
            g.kernel,
            g.stride,
            g.padding,
            g.out_height,
            g.out_width,
        ]));
        self.run(Family::Conv, "im2col", xt, Some(ct), n, &args)
    }

    fn col2im(&mut self, cols: Buf, g: &ConvGeom, images: usize, dx: Buf) -> Result<()> {
        self.check(cols, "col2im cols")?;
        self.check(dx, "col2im dx")?;
        let per = g.col_rows() * g.col_cols();
        Self::check_len(cols, images * per, "col2im cols")?;
        Self::check_len(dx, images * g.in_len(), "col2im dx")?;
        if cols.overlaps(&dx) {
            return Err(Error::InvalidConfig("col2im: dx overlaps cols"));
        }
        let (ct, xt) = (Self::float(cols, "col2im")?, Self::float(dx, "col2im")?);
        let n = images * g.in_len();
        if n == 0 {
            return Ok(());
        }
        if g.stride == 0 {
            return Err(Error::InvalidConfig("col2im: stride 0"));
        }
        self.enter()?;
        let mut args = vec![Arg::U64(self.ptr(cols)), Arg::U64(self.ptr(dx))];
        args.extend(Self::geometry_args(&[
            images,
            g.channels,
            g.height,
            g.width,
            g.kernel,
            g.stride,
            g.padding,
            g.out_height,
            g.out_width,
        ]));
        self.run(Family::Conv, "col2im", ct, Some(xt), n, &args)
    }

    fn maxpool(&mut self, x: Buf, g: &PoolGeom, images: usize, y: Buf, argmax: Buf) -> Result<()> {
        g.validate_forward(self.capacity, x, y, argmax, images)?;
        let (xt, yt) = (Self::float(x, "maxpool")?, Self::float(y, "maxpool")?);
        let n = images * g.out_len();
        if n == 0 {
            return Ok(());
        }
        self.enter()?;
        let mut args = vec![Arg::U64(self.ptr(x)), Arg::U64(self.ptr(y)), Arg::U64(self.ptr(argmax))];
        args.extend(Self::geometry_args(&[
            images,
            g.channels,
            g.height,
            g.width,
            g.kernel,
            g.stride,
            g.out_height,
            g.out_width,
        ]));
        self.run(Family::Pool, "maxpool", xt, Some(yt), n, &args)
    }

    fn maxpool_backward(&mut self, dy: Buf, argmax: Buf, g: &PoolGeom, images: usize, dx: Buf) -> Result<()> {
        g.validate_backward(self.capacity, dy, argmax, dx, images)?;
        if argmax.dtype != DType::I32 {
            return Err(Error::UnsupportedDType { what: "maxpool_backward argmax", dtype: argmax.dtype });
        }
        let (dt, xt) = (Self::float(dy, "maxpool_backward")?, Self::float(dx, "maxpool_backward")?);
        let n = images * g.in_len();
        if n == 0 {
            return Ok(());
        }
        if g.stride == 0 || g.out_height == 0 || g.out_width == 0 {
            self.enter()?;
            return self.memset(dx.prefix(n), 0.0);
        }
        self.enter()?;
        let mut args = vec![Arg::U64(self.ptr(dy)), Arg::U64(self.ptr(argmax)), Arg::U64(self.ptr(dx))];
        args.extend(Self::geometry_args(&[
            images,
            g.channels,
            g.height,
            g.width,
            g.kernel,
            g.stride,
            g.out_height,
            g.out_width,
        ]));
        self.run(Family::Pool, "maxpool_bwd", dt, Some(xt), n, &args)
    }

    fn argmax(&mut self, logits: Buf, rows: usize, classes: usize, out: &mut [u32]) -> Result<()> {
        self.check(logits, "argmax logits")?;
        let lt = Self::float(logits, "argmax")?;
        if out.len() != rows {
            return Err(Error::ShapeMismatch { what: "argmax output", expected: rows, got: out.len() });
        }
        if logits.len < rows * classes {
            return Err(Error::ShapeMismatch { what: "argmax logits", expected: rows * classes, got: logits.len });
        }
        if rows * 4 > BIG_BYTES {
            return Err(Error::InvalidConfig("argmax: more rows than the scratch area holds"));
        }
        if rows == 0 {
            return Ok(());
        }
        self.enter()?;
        let dst = self.scratch + BIG_OFF as u64;
        let args = [Arg::U64(self.ptr(logits)), Arg::U64(rows as u64), Arg::U64(classes as u64), Arg::U64(dst)];
        self.run(Family::SoftmaxXent, "argmax", lt, None, rows, &args)?;
        let mut idx = vec![0i32; rows];
        self.dtoh(&mut idx, dst)?;
        for (o, i) in out.iter_mut().zip(idx) {
            *o = i as u32;
        }
        Ok(())
    }

    fn count_underflow(&mut self, src: Buf, dtype: DType) -> Result<(usize, usize)> {
        self.check(src, "count_underflow")?;
        let st = Self::float(src, "count_underflow")?;
        let dt = if dtype == DType::I32 { DType::F32 } else { dtype };
        if src.len == 0 {
            return Ok((0, 0));
        }
        self.enter()?;
        let counts = self.scratch + COUNT_OFF as u64;
        // SAFETY: the two counters are inside our scratch.
        unsafe { cu::cuMemsetD32Async(counts, 0, 4, self.stream.cu_stream()) }.result().map_err(driver("memset"))?;
        let args = [Arg::U64(self.ptr(src)), Arg::U64(src.len as u64), Arg::U64(counts)];
        self.run(Family::Reduce, "count_underflow", st, Some(dt), src.len, &args)?;
        let mut c = [0u64; 2];
        self.dtoh(&mut c, counts)?;
        Ok((c[0] as usize, c[1] as usize))
    }

    fn count_correct(&mut self, logits: Buf, labels: Buf, rows: usize, classes: usize) -> Result<usize> {
        self.check(logits, "count_correct logits")?;
        self.check(labels, "count_correct labels")?;
        let lt = Self::float(logits, "count_correct")?;
        if labels.dtype != DType::I32 {
            return Err(Error::UnsupportedDType { what: "count_correct labels", dtype: labels.dtype });
        }
        if logits.len < rows * classes || labels.len < rows {
            return Err(Error::ShapeMismatch { what: "count_correct", expected: rows * classes, got: logits.len });
        }
        if rows == 0 {
            return Ok(0);
        }
        self.enter()?;
        let count = self.scratch + COUNT_OFF as u64;
        // SAFETY: the counter is inside our scratch.
        unsafe { cu::cuMemsetD32Async(count, 0, 2, self.stream.cu_stream()) }.result().map_err(driver("memset"))?;
        let args = [
            Arg::U64(self.ptr(logits)),
            Arg::U64(self.ptr(labels)),
            Arg::U64(rows as u64),
            Arg::U64(classes as u64),
            Arg::U64(count),
        ];
        self.run(Family::SoftmaxXent, "count_correct", lt, None, rows, &args)?;
        let mut c = [0u64; 1];
        self.dtoh(&mut c, count)?;
        Ok(c[0] as usize)
    }

    fn grad_stats(&mut self, grad: Buf, scale: f32) -> Result<GradStats> {
        self.check(grad, "grad_stats")?;
        let gt = Self::float(grad, "grad_stats")?;
        if grad.len == 0 {
            return Ok(GradStats::default());
        }
        self.enter()?;
        let blocks = self.stats_blocks(grad);
        // The per-block counts follow the per-block sums (u64 after f64, both 8 bytes), so one copy (one wait)
        // brings both back.
        let sums = self.scratch + STATS_SUM_OFF as u64;
        let counts = sums + (blocks * 8) as u64;
        let f = self.kernels.get(Family::Reduce, "grad_stats", Some(gt), None)?;
        let args =
            [Arg::U64(self.ptr(grad)), Arg::U64(grad.len as u64), Arg::F32(scale), Arg::U64(sums), Arg::U64(counts)];
        launch(self, f, (blocks as u32, 1, 1), (256, 1, 1), &args)?;
        let mut raw = vec![0u64; 2 * blocks];
        self.dtoh(&mut raw, sums)?;
        let (s, c) = raw.split_at(blocks);
        // Summed on the host in block order, as before.
        Ok(GradStats { non_finite: c.iter().sum::<u64>() as usize, sum_sq: s.iter().map(|&b| f64::from_bits(b)).sum() })
    }

    fn sgd_step(&mut self, p: &ParamBufs, s: &SgdStep) -> Result<()> {
        let n = p.validate(self.capacity, s.momentum != 0.0, false)?;
        if n == 0 {
            return Ok(());
        }
        let mom = if s.momentum != 0.0 { self.ptr(p.state1) } else { 0 };
        let scalars = [
            Arg::F32(s.lr),
            Arg::F32(s.momentum),
            Arg::I32(s.nesterov as i32),
            Arg::F32(s.weight_decay),
            Arg::F32(s.grad_scale),
        ];
        self.optim(("sgd", "sgd8"), p, n, &[mom], &scalars)
    }

    fn adamw_step(&mut self, p: &ParamBufs, s: &AdamWStep) -> Result<()> {
        let n = p.validate(self.capacity, true, true)?;
        if n == 0 {
            return Ok(());
        }
        // Per-step scalars computed as the reference computes them, in f32 on the host.
        let step_size = s.lr / s.bias_correction1;
        let bc2_sqrt = s.bias_correction2.sqrt();
        let decay = 1.0 - s.lr * s.weight_decay;
        let scalars = [
            Arg::F32(step_size),
            Arg::F32(bc2_sqrt),
            Arg::F32(decay),
            Arg::F32(s.beta1),
            Arg::F32(s.beta2),
            Arg::F32(s.eps),
            Arg::F32(s.grad_scale),
        ];
        self.optim(("adamw", "adamw8"), p, n, &[self.ptr(p.state1), self.ptr(p.state2)], &scalars)
    }

    fn synchronize(&mut self) -> Result<()> {
        self.enter()?;
        self.sync()
    }

    // ---- The step-control block (kernels on the device, no wait: see control.rs) and recording (graph.rs).

    fn softmax_cross_entropy_scaled(
        &mut self,
        logits: Buf,
        labels: Buf,
        rows: usize,
        classes: usize,
        loss: Buf,
        dlogits: Buf,
        grad_scale: f32,
        ctl: Buf,
    ) -> Result<()> {
        control::softmax_xent(
            self,
            logits,
            labels,
            rows,
            classes,
            loss,
            dlogits,
            grad_scale,
            control::Xent::Scaled(ctl),
        )
    }

    fn softmax_cross_entropy_to(&mut self, op: &LossTo) -> Result<()> {
        control::softmax_xent_to(self, op)
    }

    fn count_correct_to(&mut self, logits: Buf, labels: Buf, rows: usize, classes: usize, ctl: Buf) -> Result<()> {
        control::count_correct_to(self, logits, labels, rows, classes, ctl)
    }

    fn count_underflow_to(&mut self, src: Buf, dtype: DType, ctl: Buf) -> Result<()> {
        control::count_underflow_to(self, src, dtype, ctl)
    }

    fn step_control(&mut self, ctl: Buf, grad: Buf, loss: Buf, rule: &StepRule) -> Result<()> {
        control::step_control(self, ctl, grad, loss, rule)
    }

    fn adamw_step_gated(&mut self, p: &ParamBufs, s: &AdamWStep, ctl: Buf) -> Result<()> {
        control::adamw_step_gated(self, p, s, ctl)
    }

    fn sgd_step_gated(&mut self, p: &ParamBufs, s: &SgdStep, ctl: Buf) -> Result<()> {
        control::sgd_step_gated(self, p, s, ctl)
    }

    fn record_begin(&mut self) -> Result<bool> {
        self.graphs.begin()
    }

    fn record_end(&mut self, keep: bool) -> Result<Option<usize>> {
        self.graphs.end(keep)
    }

    fn replay(&mut self, id: usize) -> Result<()> {
        self.graphs.replay(id)
    }

    fn clear_recordings(&mut self) {
        self.graphs.clear()
    }
}

pub(crate) fn act_code(act: Activation) -> i32 {
    // ACT_RELU / ACT_GELU_TANH in kernels/common.cuh.
    match act {
        Activation::Relu => 0,
        Activation::GeluTanh => 1,
    }
}
