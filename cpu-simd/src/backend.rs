//! [`SimdBackend`]: [`mantissa_core::Backend`] over a borrowed arena, with the packed GEMM kernels of this crate
//! and vectorised element-wise ops ([`crate::ops`]). The byte / i32 copies (and a few degenerate geometries or
//! overlapping buffers, whose element-by-element result the reference defines) run the scalar reference code
//! on the same arena.

use core::marker::PhantomData;

use half::{bf16, f16};
use mantissa_core::arena::{Buf, ALIGN};
use mantissa_core::backend::{
    gemm_fused_composed, validate_softmax_cross_entropy, Activation, AdamWStep, Backend, Capabilities, ConvGeom,
    Epilogue, Gemm, GradStats, ParamBufs, PoolGeom, SgdStep,
};
use mantissa_core::{DType, Error, Reference, Result};

use crate::detect::{detect, Kernel, KernelId};
use crate::gemm::{Elem, Task};
use crate::ops::{conv, convert, elementwise, optim, softmax, Isa};
use crate::threads::Shared;

/// Runs `$body` with `$T` bound to the element type of float dtype `$dt` (I32 is an error naming `$what`).
macro_rules! with_float {
    ($dt:expr, $what:expr, $T:ident => $body:expr) => {
        match $dt {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F16 => {
                type $T = f16;
                $body
            }
            DType::BF16 => {
                type $T = bf16;
                $body
            }
            DType::I32 => return Err(Error::UnsupportedDType { what: $what, dtype: DType::I32 }),
        }
    };
}

/// The SIMD CPU backend over a borrowed buffer: the same arena conventions as [`Reference`] (the start is
/// rounded up to 64 bytes; every handle is checked, a bad one is an `Err`).
///
/// GEMM runs on [`SimdBackend::kernel`] with up to `threads` threads; so do the large element-wise ops (casts,
/// bias, activations, bias gradients, optimizer updates), split into disjoint ranges that run the same
/// per-element code, the convolution and pooling ops (split by images), and the gradient statistics (fixed
/// blocks summed in order), so results are bit-identical for any thread count. A fused GEMM
/// ([`Backend::gemm_fused`]) applies its epilogue on each thread to the block of C it just computed. The rest
/// runs on the calling thread.
#[derive(Debug)]
pub struct SimdBackend<'a> {
    base: *mut u8,
    capacity: usize,
    kernel: Kernel,
    isa: Isa,
    threads: usize,
    _buf: PhantomData<&'a mut [u8]>,
}

// SAFETY: `SimdBackend` holds the only access to the borrowed buffer for `'a` (as `Reference`); moving it to
// another thread moves that exclusive access with it.
unsafe impl Send for SimdBackend<'_> {}

impl From<crate::Error> for Error {
    fn from(e: crate::Error) -> Error {
        match e {
            crate::Error::UnknownKernel => {
                Error::InvalidConfig("MANTISSA_KERNEL names no known kernel (scalar, avx2, avx512, avx512bf16, amx)")
            }
            crate::Error::KernelUnavailable(id) => Error::DeviceUnavailable(match id {
                KernelId::Scalar => "the scalar kernel is unavailable",
                KernelId::Avx2 => "MANTISSA_KERNEL=avx2 but this CPU lacks AVX2, FMA or F16C",
                KernelId::Avx512 => "MANTISSA_KERNEL=avx512 but this CPU lacks AVX-512F",
                KernelId::Avx512Bf16 => "MANTISSA_KERNEL=avx512bf16 but this CPU lacks AVX512_BF16",
                KernelId::Amx => "MANTISSA_KERNEL=amx but this CPU or OS lacks AMX-BF16 (or tile permission)",
                #[cfg(target_arch = "aarch64")]
                KernelId::Neon => "the NEON kernel is unavailable",
                #[cfg(target_arch = "aarch64")]
                KernelId::NeonFhm => "MANTISSA_KERNEL=neon-fhm but this CPU lacks FEAT_FP16 or FEAT_FHM",
                #[cfg(target_arch = "aarch64")]
                KernelId::NeonBf16 => "MANTISSA_KERNEL=neon-bf16 but this CPU lacks FEAT_BF16 or FEAT_FHM",
            }),
            _ => Error::InvalidConfig("cpu-simd GEMM rejected its operands"),
        }
    }
}

impl<'a> SimdBackend<'a> {
    /// The whole buffer as the arena, the kernel chosen by [`detect`] (`MANTISSA_KERNEL` forces one; naming an
    /// unknown kernel or one this CPU lacks is an error), GEMM on `threads` threads (0: one per available core).
    pub fn new(buf: &'a mut [u8], threads: usize) -> core::result::Result<Self, crate::Error> {
        Ok(Self::with_kernel(buf, detect()?, threads))
    }

    /// As [`SimdBackend::new`] with an explicit kernel (a [`Kernel`] exists only where the CPU supports it).
    pub fn with_kernel(buf: &'a mut [u8], kernel: Kernel, threads: usize) -> Self {
        let pad = buf.as_ptr().align_offset(ALIGN).min(buf.len());
        let capacity = buf.len() - pad;
        // SAFETY: `pad <= buf.len()`, so the pointer stays within (or one past the end of) the buffer.
        let base = unsafe { buf.as_mut_ptr().add(pad) };
        let threads = if threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { threads };
        SimdBackend { base, capacity, kernel, isa: Isa::of(kernel), threads, _buf: PhantomData }
    }

    /// The GEMM kernel in use (the element-wise ops use the same instruction set).
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// Threads a GEMM may use.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The scalar reference over the same arena, for the ops not vectorised here.
    fn reference(&mut self) -> Reference<'_> {
        // SAFETY: `self` holds the only access to these `capacity` bytes for `'a` (it was built from a `&'a mut`);
        // the slice borrows `self` mutably, so it ends before `self` is used again. The base is already aligned,
        // so `Reference::new` takes the same range.
        Reference::new(unsafe { core::slice::from_raw_parts_mut(self.base, self.capacity) })
    }

    fn check(&self, b: Buf, what: &'static str) -> Result<()> {
        b.check_in(self.capacity, what)
    }

    fn check_len(b: Buf, len: usize, what: &'static str) -> Result<()> {
        b.check_len(len, what)
    }

    /// Typed pointer to a checked buffer (in bounds, aligned for its element size; the base is 64-aligned).
    fn ptr<T>(&self, b: Buf) -> *mut T {
        // SAFETY: `check` has verified `b` lies within the arena.
        unsafe { self.base.add(b.offset) as *mut T }
    }

    fn check_params(&self, p: &ParamBufs, state1: bool, state2: bool) -> Result<usize> {
        let n = p.validate(self.capacity, state1, state2)?;
        let used = [
            (p.master, "optimizer master", true),
            (p.working, "optimizer working", p.working.offset != p.master.offset),
            (p.grad, "optimizer grad", true),
            (p.state1, "optimizer state1", state1),
            (p.state2, "optimizer state2", state2),
        ];
        // The fused loop borrows each vector as its own slice: they must be disjoint.
        for (i, (a, _, on_a)) in used.iter().enumerate() {
            for (b, _, on_b) in &used[i + 1..] {
                if *on_a && *on_b && a.prefix(n).overlaps(&b.prefix(n)) {
                    return Err(Error::InvalidConfig("optimizer buffers overlap"));
                }
            }
        }
        Ok(n)
    }

    /// `(master, grad, state1, state2)` as slices of `n` f32.
    ///
    /// # Safety
    /// `check_params` accepted `p` (in bounds, f32, disjoint); unused states are passed as length 0.
    #[allow(clippy::mut_from_ref)]
    unsafe fn param_slices(&self, p: &ParamBufs, n: usize, s1: usize, s2: usize) -> ParamSlices<'_> {
        // SAFETY: in bounds, aligned and disjoint (caller); the arena is initialised bytes and every f32 bit
        // pattern is valid; `&self` is borrowed for the slices' lifetime and no other access happens meanwhile.
        unsafe {
            (
                core::slice::from_raw_parts_mut(self.ptr::<f32>(p.master), n),
                core::slice::from_raw_parts(self.ptr::<f32>(p.grad), n),
                core::slice::from_raw_parts_mut(self.ptr::<f32>(p.state1), s1),
                core::slice::from_raw_parts_mut(self.ptr::<f32>(p.state2), s2),
            )
        }
    }

    /// The working copy's pointer, or null when the working copy is the master.
    fn working_ptr<T>(&self, p: &ParamBufs) -> *mut T {
        if p.working.offset == p.master.offset {
            core::ptr::null_mut()
        } else {
            self.ptr::<T>(p.working)
        }
    }

    /// # Safety
    /// `g` was validated (extents, dtypes `A` for A and B, `C` for C, C disjoint from A and B, rows of C
    /// disjoint: `ldc >= n` or `m == 1`), with m, n, batch > 0.
    unsafe fn gemm_typed<A: Elem, C: Elem>(&self, g: &Gemm) {
        let p =
            Problem { g: *g, a: self.ptr::<A>(g.a), b: self.ptr::<A>(g.b), c: self.ptr::<C>(g.c), kernel: self.kernel };
        let c_len = (g.m - 1) * g.ldc + g.n;
        let macs = g.batch.saturating_mul(g.m).saturating_mul(g.n).saturating_mul(g.k);
        let workers = self.threads.min(g.batch);
        if workers <= 1 || g.stride_c < c_len || !crate::threads::worth_splitting::<A, A>(self.kernel, macs, workers) {
            // One problem at a time, each split over the threads (also when problems share C: in order).
            for t in 0..g.batch {
                // SAFETY: forwarded.
                unsafe { p.run(t, self.threads) };
            }
            return;
        }
        // Whole problems per pool thread: many small problems (a conv layer's images) cost one hand-off per
        // thread rather than one per problem, and each problem is single-threaded.
        let per = g.batch.div_ceil(workers);
        let p = crate::threads::Shared(p);
        crate::threads::run_parts(g.batch.div_ceil(per), &|w| {
            let range = w * per..((w + 1) * per).min(g.batch);
            // SAFETY: C regions of distinct problems are disjoint (stride_c >= one C's extent); A and B are only
            // read; `run_parts` joins every part before returning.
            range.for_each(|t| unsafe { p.get().run(t, 1) });
        });
    }
}

impl SimdBackend<'_> {
    /// Whether [`SimdBackend::gemm_fused_parts`] may run `g` with `ep`: one dense problem with alpha 1 and beta
    /// 0, every handle in the arena and long enough, dtypes as the composed ops require, and nothing that a
    /// part writes early (C, the pre-activation, the bias gradient) overlapping what another part still reads.
    /// Anything else goes to the composed ops, which also report the errors.
    fn fusable(&self, g: &Gemm, ep: &Epilogue) -> bool {
        let (m, n) = (g.m, g.n);
        if g.batch != 1 || g.alpha != 1.0 || g.beta != 0.0 || g.ldc != n || m == 0 || n == 0 || g.k == 0 {
            return false;
        }
        let len = m * n;
        let target = match *ep {
            Epilogue::BiasAct { pre, .. } => pre,
            _ => g.c,
        };
        let Some((ea, eb, _)) = g.checked_extents() else { return false };
        let (a, b) = (g.a.prefix(ea.min(g.a.len)), g.b.prefix(eb.min(g.b.len)));
        let inside = |x: Buf, at_least: usize| x.check_in(self.capacity, "").is_ok() && x.len >= at_least;
        let apart = |x: Buf, others: &[Buf]| others.iter().all(|o| !x.overlaps(o));
        let c = g.c.prefix(len.min(g.c.len));
        if (Gemm { c: target, ..*g }).validate(self.capacity).is_err()
            || !inside(g.c, len)
            || !g.c.dtype.is_float()
            || !apart(c, &[a, b])
        {
            return false;
        }
        match *ep {
            Epilogue::Bias { bias } => inside(bias, n) && bias.dtype.is_float() && apart(bias.prefix(n), &[c]),
            Epilogue::BiasAct { bias, pre, .. } => {
                let pre = pre.prefix(len.min(pre.len));
                inside(pre, len)
                    && pre.dtype == g.c.dtype
                    && apart(pre, &[c])
                    && inside(bias, n)
                    && bias.dtype.is_float()
                    && apart(bias.prefix(n), &[c, pre])
            }
            Epilogue::ActGrad { pre, dbias, .. } => {
                let pre = pre.prefix(len.min(pre.len));
                let dbias_ok =
                    dbias.is_none_or(|d| inside(d, n) && d.dtype.is_float() && apart(d.prefix(n), &[a, b, c, pre]));
                inside(pre, len) && pre.dtype == g.c.dtype && apart(pre, &[c]) && dbias_ok
            }
        }
    }

    /// The fused GEMM, `fusable` checked: each thread applies the epilogue to its block of C right after
    /// computing it, with the element-wise ops' own per-element code on each row of the block, so every value
    /// (and its rounding to C's dtype after the product, the bias and the activation) is what the composed ops
    /// give. The bias gradient sums each column over all rows in order, as `bias_grad`: within the part when a
    /// part holds whole columns, else after the join. Returns false (nothing done) when the GEMM would run
    /// transposed.
    ///
    /// # Safety
    /// `fusable(g, ep)`; `A` and `C` are the element types of A's and C's dtypes, `BI` of the bias (or the bias
    /// gradient) dtype.
    unsafe fn gemm_fused_parts<A: Elem, C: Elem, BI: Elem>(&mut self, g: &Gemm, ep: &Epilogue) -> Result<bool> {
        if crate::gemm::runs_transposed::<A, A>(self.kernel, g.m, g.n) {
            return Ok(false);
        }
        let (m, n, isa) = (g.m, g.n, self.isa);
        let (rsb, csb) = if g.trans_b { (1, g.ldb) } else { (g.ldb, 1) };
        let (rsa, csa) = if g.trans_a { (1, g.lda) } else { (g.lda, 1) };
        let target = match *ep {
            Epilogue::BiasAct { pre, .. } => pre,
            _ => g.c,
        };
        let task = Task {
            m,
            n,
            k: g.k,
            alpha: 1.0,
            a: self.ptr::<A>(g.a) as *const A,
            rsa: rsa as isize,
            csa: csa as isize,
            b: self.ptr::<A>(g.b) as *const A,
            rsb: rsb as isize,
            csb: csb as isize,
            beta: 0.0,
            c: self.ptr::<C>(target),
            rsc: n as isize,
            csc: 1,
        };
        let c = Shared(self.ptr::<C>(g.c));
        let whole_columns_left = core::sync::atomic::AtomicBool::new(false);
        match *ep {
            Epilogue::Bias { bias } => {
                let bias = Shared(self.ptr::<BI>(bias) as *const BI);
                let after = |p: crate::threads::Part| {
                    // SAFETY: rows p.i0.., columns p.j0.. of C are this part's block; the bias is disjoint.
                    unsafe {
                        let (y, b) = (c.get().add(p.i0 * n + p.j0), bias.get().add(p.j0));
                        elementwise::bias_act_rows::<C, BI>(isa, None, y, b, y, p.m, p.n, n);
                    }
                };
                // SAFETY: fusable (validated operands, C disjoint from A and B); `after` writes its block only.
                unsafe { crate::gemm::run_then(self.kernel, self.threads, &task, &after) };
            }
            Epilogue::BiasAct { bias, act, pre } => {
                let bias = Shared(self.ptr::<BI>(bias) as *const BI);
                let pre = Shared(self.ptr::<C>(pre));
                let after = |p: crate::threads::Part| {
                    // SAFETY: rows p.i0.., columns p.j0.. of pre and C are this part's blocks; pre, C and the
                    // bias are pairwise disjoint.
                    unsafe {
                        let at = p.i0 * n + p.j0;
                        let (x, y, b) = (pre.get().add(at), c.get().add(at), bias.get().add(p.j0));
                        elementwise::bias_act_rows::<C, BI>(isa, Some(act), x, b, y, p.m, p.n, n);
                    }
                };
                // SAFETY: as above, with pre as the GEMM's C.
                unsafe { crate::gemm::run_then(self.kernel, self.threads, &task, &after) };
            }
            Epilogue::ActGrad { act, pre, dbias } => {
                let pre = Shared(self.ptr::<C>(pre) as *const C);
                let db = Shared(dbias.map(|d| self.ptr::<BI>(d)));
                let after = |p: crate::threads::Part| {
                    // SAFETY: rows p.i0.., columns p.j0.. of C are this part's block; pre is disjoint.
                    unsafe {
                        let at = p.i0 * n + p.j0;
                        elementwise::act_grad_rows::<C>(isa, act, pre.get().add(at), c.get().add(at), p.m, p.n, n);
                    }
                    if let Some(db) = *db.get() {
                        if p.i0 == 0 && p.m == m {
                            // SAFETY: the part holds whole columns p.j0..p.j0 + p.n of C (m x n, written
                            // above); it writes only those entries of dbias, which overlaps nothing read.
                            unsafe { elementwise::bias_grad::<C, BI>(isa, *c.get(), db, m, n, 1, p.j0, p.j0 + p.n) };
                        } else {
                            whole_columns_left.store(true, core::sync::atomic::Ordering::Relaxed);
                        }
                    }
                };
                // SAFETY: as above.
                unsafe { crate::gemm::run_then(self.kernel, self.threads, &task, &after) };
                if let (Some(d), true) = (dbias, whole_columns_left.into_inner()) {
                    // Parts split the rows: the sums need every row, so they run now.
                    self.bias_grad(g.c.prefix(m * n), d, m, n, 1)?;
                }
            }
        }
        Ok(true)
    }
}

/// Elements (or parameters) each thread must get before an element-wise op is split: handing a part to a
/// spinning pool worker and joining it costs ~1-2 us, about what one thread spends on 16k elements of a cast.
const MIN_ELEMS_PER_PART: usize = 1 << 14;

/// Elements per block of `grad_stats` (each block is summed on its own, then the blocks in order): 128 KiB
/// of f32, ~10 us on one thread, so splitting the blocks over threads pays.
const GRAD_STATS_BLOCK: usize = 1 << 15;

/// Most `grad_stats` blocks: longer gradients get longer blocks.
const GRAD_STATS_BLOCKS: usize = 64;

/// Element-wise ranges are split on multiples of this (the ops' chunk, a multiple of 64 elements), so every
/// part walks the same chunks as the single-threaded loop.
const ALIGN_ELEMS: usize = crate::ops::CH;

impl SimdBackend<'_> {
    /// Runs `f(lo, hi)` over `0..n` in disjoint ranges that start at multiples of `align`, on up to `threads`
    /// threads when each gets at least `min` units (`min` of at least 1), else `f(0, n)` on this thread. The
    /// caller makes each unit's result independent of the split (same per-element code, disjoint outputs).
    fn split_range(&self, n: usize, align: usize, min: usize, f: &(dyn Fn(usize, usize) + Sync)) {
        let want = self.threads.min(n / min.max(1)).min(n.div_ceil(align.max(1)));
        if want <= 1 {
            f(0, n);
            return;
        }
        let chunk = n.div_ceil(want).next_multiple_of(align.max(1));
        crate::threads::run_parts(n.div_ceil(chunk), &|i| {
            let lo = i * chunk;
            f(lo, (lo + chunk).min(n));
        });
    }
}

type ParamSlices<'s> = (&'s mut [f32], &'s [f32], &'s mut [f32], &'s mut [f32]);

/// One batched GEMM over arena pointers, shareable with worker threads.
struct Problem<A, C> {
    g: Gemm,
    a: *const A,
    b: *const A,
    c: *mut C,
    kernel: Kernel,
}

impl<A, C> Clone for Problem<A, C> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<A, C> Copy for Problem<A, C> {}

impl<A: Elem, C: Elem> Problem<A, C> {
    /// Runs problem `t` on `threads` threads.
    ///
    /// # Safety
    /// As `gemm_typed`; no other thread touches problem `t`'s C meanwhile.
    unsafe fn run(&self, t: usize, threads: usize) {
        let g = &self.g;
        // op(A)[i, p] and op(B)[p, j] as (row stride, column stride); a transpose swaps them.
        let (rsa, csa) = if g.trans_a { (1, g.lda) } else { (g.lda, 1) };
        let (rsb, csb) = if g.trans_b { (1, g.ldb) } else { (g.ldb, 1) };
        // SAFETY: problem t's operands lie within the checked extents; strides fit isize (they index the arena).
        let task = unsafe {
            Task {
                m: g.m,
                n: g.n,
                k: g.k,
                alpha: g.alpha,
                a: self.a.add(t * g.stride_a),
                rsa: rsa as isize,
                csa: csa as isize,
                b: self.b.add(t * g.stride_b),
                rsb: rsb as isize,
                csb: csb as isize,
                beta: g.beta,
                c: self.c.add(t * g.stride_c),
                rsc: g.ldc as isize,
                csc: 1,
            }
        };
        // SAFETY: forwarded; the kernel was detected on this CPU.
        unsafe { crate::gemm::run(self.kernel, threads, &task) }
    }
}

/// The CPU's name from CPUID's brand string (leaves 0x8000_0002..4), read once.
fn cpu_name() -> &'static str {
    static NAME: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    NAME.get_or_init(|| match brand_string() {
        Some(s) if !s.is_empty() => Box::leak(s.into_boxed_str()),
        _ if cfg!(target_arch = "aarch64") => "aarch64 CPU",
        _ => "x86-64 CPU",
    })
}

#[cfg(target_arch = "x86_64")]
fn brand_string() -> Option<String> {
    use core::arch::x86_64::__cpuid;
    // CPUID exists on every x86_64 CPU; leaf 0x8000_0000 reports the highest extended leaf.
    if __cpuid(0x8000_0000).eax < 0x8000_0004 {
        return None;
    }
    let mut bytes = Vec::with_capacity(48);
    for leaf in 0x8000_0002..=0x8000_0004u32 {
        let r = __cpuid(leaf);
        for w in [r.eax, r.ebx, r.ecx, r.edx] {
            bytes.extend_from_slice(&w.to_le_bytes());
        }
    }
    let s = String::from_utf8_lossy(&bytes);
    Some(s.trim_matches(|c: char| c == '\0' || c.is_whitespace()).split_whitespace().collect::<Vec<_>>().join(" "))
}

#[cfg(not(target_arch = "x86_64"))]
fn brand_string() -> Option<String> {
    None
}

impl Backend for SimdBackend<'_> {
    /// `fast_bf16` is true with the AMX kernel (tile bf16 products, ~6x the AVX-512 f32 rate here), and with the
    /// [`KernelId::Avx512Bf16`] kernel on a CPU where `vdpbf16ps` outruns
    /// f32 FMA (AMD Zen 4 and later: twice the f32 flops). On Intel (Sapphire/Granite Rapids) `vdpbf16ps` runs
    /// at half the FMA rate, so bf16 GEMM widens to f32 while packing and gains only the halved memory traffic
    /// (~1.1x on the GEMM), which the casts a mixed step adds (working copy, 16-bit activations) eat up:
    /// `Policy::auto` should then stay with float32. `fast_f16` is false: x86 has no f16 product with f32
    /// accumulation (AVX512_FP16 accumulates in f16), so f16 inputs are widened too.
    fn capabilities(&self) -> Capabilities {
        // AMX tiles multiply bf16 at several times the AVX-512 f32 rate (measured: ~1.0 vs ~0.16 TFLOP/s per
        // core here); vdpbf16ps only where it outruns f32 FMA (AMD Zen 4).
        let fast_bf16 = match self.kernel.id() {
            #[cfg(target_arch = "x86_64")]
            KernelId::Amx => true,
            #[cfg(target_arch = "x86_64")]
            KernelId::Avx512Bf16 => crate::detect::bf16_dot_is_fast(),
            _ => false,
        };
        Capabilities { backend: "cpu-simd", device: cpu_name(), fast_f16: false, fast_bf16 }
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn upload(&mut self, dst: Buf, src: &[f32]) -> Result<()> {
        self.check(dst, "upload")?;
        if src.len() != dst.len {
            return Err(Error::ShapeMismatch { what: "upload", expected: dst.len, got: src.len() });
        }
        with_float!(dst.dtype, "upload", T => {
            // Split like the casts: a training batch (256 x 784 f32, 0.8 MB) is ~2% of an f32 cpu-mlp step.
            let (isa, p) = (self.isa, Shared(self.ptr::<T>(dst)));
            self.split_range(src.len(), ALIGN_ELEMS, MIN_ELEMS_PER_PART, &|lo, hi| {
                // SAFETY: dst is checked to hold src.len() elements; src is a distinct Rust slice; parts write
                // disjoint ranges.
                unsafe { convert::upload::<T>(isa, &src[lo..hi], p.get().add(lo)) };
            });
        });
        Ok(())
    }

    fn upload_i32(&mut self, dst: Buf, src: &[i32]) -> Result<()> {
        self.reference().upload_i32(dst, src)
    }

    fn download(&mut self, src: Buf, dst: &mut [f32]) -> Result<()> {
        self.check(src, "download")?;
        if dst.len() != src.len {
            return Err(Error::ShapeMismatch { what: "download", expected: src.len, got: dst.len() });
        }
        if src.dtype == DType::I32 {
            return self.reference().download(src, dst);
        }
        with_float!(src.dtype, "download", T => {
            // SAFETY: src is checked to hold dst.len() elements; dst is a distinct Rust slice.
            unsafe { convert::download::<T>(self.isa, self.ptr::<T>(src), dst) };
        });
        Ok(())
    }

    fn download_bytes(&mut self, src: Buf, dst: &mut [u8]) -> Result<()> {
        self.reference().download_bytes(src, dst)
    }

    fn upload_bytes(&mut self, dst: Buf, src: &[u8]) -> Result<()> {
        self.reference().upload_bytes(dst, src)
    }

    fn fill(&mut self, dst: Buf, value: f32) -> Result<()> {
        self.check(dst, "fill")?;
        if dst.dtype == DType::I32 {
            return self.reference().fill(dst, value);
        }
        with_float!(dst.dtype, "fill", T => {
            // SAFETY: dst is checked.
            unsafe { elementwise::fill::<T>(self.isa, self.ptr::<T>(dst), dst.len, value) };
        });
        Ok(())
    }

    fn cast(&mut self, src: Buf, dst: Buf) -> Result<()> {
        self.check(src, "cast")?;
        self.check(dst, "cast")?;
        Self::check_len(dst, src.len, "cast")?;
        if src.offset != dst.offset && src.overlaps(&dst.prefix(src.len)) {
            return Err(Error::InvalidConfig("cast: src and dst overlap"));
        }
        with_float!(src.dtype, "cast", S => with_float!(dst.dtype, "cast", D => {
            let (isa, p) = (self.isa, Shared((self.ptr::<S>(src), self.ptr::<D>(dst))));
            self.split_range(src.len, ALIGN_ELEMS, MIN_ELEMS_PER_PART, &|lo, hi| {
                let (s, d) = *p.get();
                // SAFETY: both checked, dst holds src.len elements; partial overlap rejected above (equal
                // starts convert chunk by chunk, each chunk read before it is written); parts are disjoint.
                unsafe { convert::cast::<S, D>(isa, s.add(lo), d.add(lo), hi - lo) };
            });
        }));
        Ok(())
    }

    fn gemm(&mut self, g: &Gemm) -> Result<()> {
        g.validate(self.capacity)?;
        if g.m > 1 && g.ldc < g.n {
            return Err(Error::InvalidConfig("gemm: ldc < n makes rows of C overlap"));
        }
        if g.m == 0 || g.n == 0 || g.batch == 0 {
            return Ok(());
        }
        with_float!(g.a.dtype, "gemm A", A => with_float!(g.c.dtype, "gemm C", C => {
            // SAFETY: validated above.
            unsafe { self.gemm_typed::<A, C>(g) };
        }));
        Ok(())
    }

    /// Applies the epilogue to each thread's block of C as soon as it is computed (see `gemm_fused_parts`),
    /// bit-identical to the composed ops; shapes it does not cover run the composed ops.
    fn gemm_fused(&mut self, g: &Gemm, ep: &Epilogue) -> Result<()> {
        if self.fusable(g, ep) {
            let bias_dtype = match *ep {
                Epilogue::Bias { bias } | Epilogue::BiasAct { bias, .. } => bias.dtype,
                Epilogue::ActGrad { dbias, .. } => dbias.map_or(DType::F32, |d| d.dtype),
            };
            let done = with_float!(g.a.dtype, "gemm A", A => with_float!(g.c.dtype, "gemm C", C => {
                with_float!(bias_dtype, "gemm_fused bias", BI => {
                    // SAFETY: `fusable` accepted g and ep; the types follow the dtypes.
                    unsafe { self.gemm_fused_parts::<A, C, BI>(g, ep)? }
                })
            }));
            if done {
                return Ok(());
            }
        }
        gemm_fused_composed(self, g, ep)
    }

    fn add_bias(&mut self, y: Buf, bias: Buf, outer: usize, channels: usize, inner: usize) -> Result<()> {
        self.check(y, "add_bias y")?;
        self.check(bias, "add_bias bias")?;
        Self::check_len(y, outer * channels * inner, "add_bias y")?;
        Self::check_len(bias, channels, "add_bias bias")?;
        if y.prefix(outer * channels * inner).overlaps(&bias.prefix(channels)) {
            return Err(Error::InvalidConfig("add_bias: y overlaps bias"));
        }
        with_float!(y.dtype, "add_bias", Y => with_float!(bias.dtype, "add_bias", B => {
            let (isa, p) = (self.isa, Shared((self.ptr::<Y>(y), self.ptr::<B>(bias))));
            let row = channels * inner;
            // Whole rows (of `channels * inner` elements) per part.
            self.split_range(outer, 1, MIN_ELEMS_PER_PART.div_ceil(row.max(1)), &|lo, hi| {
                let (y, b) = *p.get();
                // SAFETY: both checked for the lengths used, disjoint; parts write disjoint rows.
                unsafe { elementwise::add_bias::<Y, B>(isa, y.add(lo * row), b, hi - lo, channels, inner) };
            });
        }));
        Ok(())
    }

    fn bias_grad(&mut self, dy: Buf, dbias: Buf, outer: usize, channels: usize, inner: usize) -> Result<()> {
        self.check(dy, "bias_grad dy")?;
        self.check(dbias, "bias_grad dbias")?;
        Self::check_len(dy, outer * channels * inner, "bias_grad dy")?;
        Self::check_len(dbias, channels, "bias_grad dbias")?;
        if dy.prefix(outer * channels * inner).overlaps(&dbias.prefix(channels)) {
            return Err(Error::InvalidConfig("bias_grad: dy overlaps dbias"));
        }
        with_float!(dy.dtype, "bias_grad", Y => with_float!(dbias.dtype, "bias_grad", B => {
            let (isa, p) = (self.isa, Shared((self.ptr::<Y>(dy), self.ptr::<B>(dbias))));
            // Channels per part: each channel is still summed alone, in the same order.
            let per_channel = outer * inner;
            self.split_range(channels, ALIGN_ELEMS, MIN_ELEMS_PER_PART.div_ceil(per_channel.max(1)), &|lo, hi| {
                let (dy, db) = *p.get();
                // SAFETY: both checked for the lengths used, disjoint; parts write disjoint channels of dbias.
                unsafe { elementwise::bias_grad::<Y, B>(isa, dy, db, outer, channels, inner, lo, hi) };
            });
        }));
        Ok(())
    }

    fn activation(&mut self, act: Activation, x: Buf, y: Buf) -> Result<()> {
        self.check(x, "activation x")?;
        self.check(y, "activation y")?;
        Self::check_len(y, x.len, "activation y")?;
        if x.offset != y.offset && x.overlaps(&y.prefix(x.len)) {
            return Err(Error::InvalidConfig("activation: x and y overlap without being equal"));
        }
        with_float!(x.dtype, "activation", X => with_float!(y.dtype, "activation", Y => {
            let (isa, p) = (self.isa, Shared((self.ptr::<X>(x), self.ptr::<Y>(y))));
            self.split_range(x.len, ALIGN_ELEMS, MIN_ELEMS_PER_PART, &|lo, hi| {
                let (x, y) = *p.get();
                // SAFETY: checked; equal or disjoint; parts cover disjoint ranges.
                unsafe { elementwise::activation::<X, Y>(isa, act, x.add(lo), y.add(lo), hi - lo) };
            });
        }));
        Ok(())
    }

    fn activation_backward(&mut self, act: Activation, x: Buf, dy: Buf, dx: Buf) -> Result<()> {
        self.check(x, "activation_backward x")?;
        self.check(dy, "activation_backward dy")?;
        self.check(dx, "activation_backward dx")?;
        Self::check_len(dy, x.len, "activation_backward dy")?;
        Self::check_len(dx, x.len, "activation_backward dx")?;
        let (dyn_, dxn) = (dy.prefix(x.len), dx.prefix(x.len));
        if (dx.offset != dy.offset && dxn.overlaps(&dyn_)) || (dxn.overlaps(&x) && dx.offset != x.offset) {
            return Err(Error::InvalidConfig("activation_backward: dx overlaps an input without being equal"));
        }
        with_float!(x.dtype, "activation_backward", X => with_float!(dy.dtype, "activation_backward", D => {
            let dxp = match dx.dtype {
                d if d == dy.dtype => self.ptr::<D>(dx),
                d => return Err(Error::UnsupportedDType { what: "activation_backward dx (must match dy)", dtype: d }),
            };
            let (isa, p) = (self.isa, Shared((self.ptr::<X>(x), self.ptr::<D>(dy), dxp)));
            self.split_range(x.len, ALIGN_ELEMS, MIN_ELEMS_PER_PART, &|lo, hi| {
                let (x, dy, dx) = *p.get();
                // SAFETY: checked; dx equals or is disjoint from each input; parts cover disjoint ranges.
                unsafe {
                    elementwise::activation_backward::<X, D>(isa, act, x.add(lo), dy.add(lo), dx.add(lo), hi - lo)
                };
            });
        }));
        Ok(())
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
        validate_softmax_cross_entropy(self.capacity, logits, labels, rows, classes, loss, dlogits)?;
        let n = rows * classes;
        if dlogits.prefix(n).overlaps(&logits.prefix(n)) {
            return Err(Error::InvalidConfig("softmax_cross_entropy: dlogits overlaps logits"));
        }
        let lab = self.ptr::<i32>(labels);
        for r in 0..rows {
            // SAFETY: r < rows <= labels.len.
            let l = unsafe { lab.add(r).read() };
            if l < 0 || l as usize >= classes {
                return Err(Error::LabelOutOfRange { label: l, classes });
            }
        }
        let total = with_float!(logits.dtype, "softmax_cross_entropy", L => {
            with_float!(dlogits.dtype, "softmax_cross_entropy", D => {
                // SAFETY: checked, disjoint, labels in range.
                unsafe {
                    softmax::softmax_xent::<L, D>(
                        self.isa, self.ptr(logits), lab, rows, classes, self.ptr(dlogits), grad_scale,
                    )
                }
            })
        });
        // SAFETY: loss is a checked F32 buffer of at least one element.
        unsafe { self.ptr::<f32>(loss).write(total * (1.0 / rows.max(1) as f32)) };
        Ok(())
    }

    fn im2col(&mut self, x: Buf, g: &ConvGeom, images: usize, cols: Buf) -> Result<()> {
        self.check(x, "im2col x")?;
        self.check(cols, "im2col cols")?;
        Self::check_len(x, images * g.in_len(), "im2col x")?;
        let per = g.col_rows() * g.col_cols();
        Self::check_len(cols, images * per, "im2col cols")?;
        if g.stride == 0 {
            return Err(Error::InvalidConfig("im2col: stride 0"));
        }
        if cols.prefix(images * per).overlaps(&x.prefix(images * g.in_len())) {
            return Err(Error::InvalidConfig("im2col: cols overlaps x"));
        }
        with_float!(x.dtype, "im2col", X => with_float!(cols.dtype, "im2col", C => {
            let (isa, p, g) = (self.isa, Shared((self.ptr::<X>(x) as *const X, self.ptr::<C>(cols))), *g);
            let il = g.in_len();
            self.split_range(images, 1, MIN_ELEMS_PER_PART.div_ceil(per.max(1)), &|lo, hi| {
                let (x, c) = *p.get();
                // SAFETY: both checked for the lengths used, disjoint (every read is bounds-checked against H and
                // W); parts take disjoint images.
                unsafe { conv::im2col::<X, C>(isa, x.add(lo * il), &g, hi - lo, c.add(lo * per)) };
            });
        }));
        Ok(())
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
        if g.stride == 0 {
            // The reference's loop divides by the stride: let it report this geometry.
            return self.reference().col2im(cols, g, images, dx);
        }
        with_float!(cols.dtype, "col2im", C => with_float!(dx.dtype, "col2im", X => {
            let (isa, p) = (self.isa, Shared((self.ptr::<C>(cols) as *const C, self.ptr::<X>(dx))));
            let g = *g;
            // Whole images per part: each image's pixels sum only its own columns.
            self.split_range(images, 1, MIN_ELEMS_PER_PART.div_ceil(per.max(1)), &|lo, hi| {
                let (c, x) = *p.get();
                // SAFETY: checked for images * per and images * in_len, disjoint; parts take disjoint images.
                unsafe { conv::col2im::<C, X>(isa, c.add(lo * per), &g, hi - lo, x.add(lo * g.in_len())) };
            });
        }));
        Ok(())
    }

    fn maxpool(&mut self, x: Buf, g: &PoolGeom, images: usize, y: Buf, argmax: Buf) -> Result<()> {
        g.validate_forward(self.capacity, x, y, argmax, images)?;
        let (xn, yn) = (x.prefix(images * g.in_len()), y.prefix(images * g.out_len()));
        let an = argmax.prefix(images * g.out_len());
        if xn.overlaps(&yn) || xn.overlaps(&an) || yn.overlaps(&an) {
            // The reference defines what overlapping buffers give (element by element): let it run them.
            return self.reference().maxpool(x, g, images, y, argmax);
        }
        with_float!(x.dtype, "maxpool", X => with_float!(y.dtype, "maxpool", Y => {
            let ptrs = (self.ptr::<X>(x) as *const X, self.ptr::<Y>(y), self.ptr::<i32>(argmax));
            let (isa, p, g) = (self.isa, Shared(ptrs), *g);
            let (il, ol) = (g.in_len(), g.out_len());
            self.split_range(images, 1, MIN_ELEMS_PER_PART.div_ceil(il.max(1)), &|lo, hi| {
                let (x, y, am) = *p.get();
                // SAFETY: checked lengths, disjoint buffers, windows inside the input; parts take disjoint images.
                unsafe { conv::maxpool::<X, Y>(isa, x.add(lo * il), &g, hi - lo, y.add(lo * ol), am.add(lo * ol)) };
            });
        }));
        Ok(())
    }

    fn maxpool_backward(&mut self, dy: Buf, argmax: Buf, g: &PoolGeom, images: usize, dx: Buf) -> Result<()> {
        g.validate_backward(self.capacity, dy, argmax, dx, images)?;
        let (il, ol) = (g.in_len(), g.out_len());
        let (dyn_, an, dxn) = (dy.prefix(images * ol), argmax.prefix(images * ol), dx.prefix(images * il));
        if argmax.dtype != DType::I32 || dxn.overlaps(&dyn_) || dxn.overlaps(&an) {
            return self.reference().maxpool_backward(dy, argmax, g, images, dx);
        }
        let am = self.ptr::<i32>(argmax) as *const i32;
        // SAFETY: argmax is a checked I32 buffer of at least images * ol elements.
        let recorded = unsafe { core::slice::from_raw_parts(am, images * ol) };
        if recorded.iter().any(|&i| i < 0 || i as usize >= il) {
            return Err(Error::InvalidConfig("maxpool_backward: argmax outside the image"));
        }
        with_float!(dy.dtype, "maxpool_backward", D => with_float!(dx.dtype, "maxpool_backward", X => {
            let (isa, p, g) = (self.isa, Shared((self.ptr::<D>(dy) as *const D, am, self.ptr::<X>(dx))), *g);
            self.split_range(images, 1, MIN_ELEMS_PER_PART.div_ceil(il.max(1)), &|lo, hi| {
                let (d, a, x) = *p.get();
                // SAFETY: checked lengths, dx disjoint from dy and argmax, every index in 0..il (checked above);
                // parts take disjoint images.
                unsafe {
                    conv::maxpool_backward::<D, X>(isa, d.add(lo * ol), a.add(lo * ol), &g, hi - lo, x.add(lo * il))
                };
            });
        }));
        Ok(())
    }

    fn grad_stats(&mut self, grad: Buf, scale: f32) -> Result<GradStats> {
        self.check(grad, "grad_stats")?;
        // Fixed blocks, summed in block order: the same bits for any thread count. The block length depends
        // only on n (at most GRAD_STATS_BLOCKS blocks), so the partial results fit on the stack.
        let n = grad.len;
        let block = GRAD_STATS_BLOCK.max(n.div_ceil(GRAD_STATS_BLOCKS).next_multiple_of(ALIGN_ELEMS));
        let blocks = n.div_ceil(block).max(1);
        let mut parts = [(0usize, 0.0f64); GRAD_STATS_BLOCKS];
        with_float!(grad.dtype, "grad_stats", G => {
            let (isa, p) = (self.isa, Shared((self.ptr::<G>(grad), parts.as_mut_ptr())));
            self.split_range(blocks, 1, 1, &|lo, hi| {
                let (g, out) = *p.get();
                for b in lo..hi {
                    let start = b * block;
                    let len = block.min(n - start.min(n));
                    // SAFETY: checked for n elements; each part writes its own blocks' slots (b < blocks <=
                    // GRAD_STATS_BLOCKS).
                    unsafe { out.add(b).write(optim::grad_stats::<G>(isa, g.add(start), len, scale)) };
                }
            });
        });
        let non_finite = parts[..blocks].iter().map(|p| p.0).sum();
        let sum_sq = parts[..blocks].iter().fold(0.0, |acc, p| acc + p.1);
        Ok(GradStats { non_finite, sum_sq })
    }

    fn sgd_step(&mut self, p: &ParamBufs, s: &SgdStep) -> Result<()> {
        let momentum = s.momentum != 0.0;
        let n = self.check_params(p, momentum, false)?;
        with_float!(p.working.dtype, "optimizer working", W => {
            let working = self.working_ptr::<W>(p);
            // SAFETY: check_params validated and separated the buffers.
            let (w, g, m, _) = unsafe { self.param_slices(p, n, if momentum { n } else { 0 }, 0) };
            let (isa, sh) = (self.isa, Shared((w.as_mut_ptr(), g.as_ptr(), m.as_mut_ptr(), working)));
            self.split_range(n, ALIGN_ELEMS, MIN_ELEMS_PER_PART, &|lo, hi| {
                let (w, g, m, wk) = *sh.get();
                let len = hi - lo;
                // SAFETY: parts take disjoint ranges of the validated, separated buffers (m is empty without
                // momentum); `working` (if not null) holds n elements.
                unsafe {
                    let m = if momentum { core::slice::from_raw_parts_mut(m.add(lo), len) } else { &mut [] };
                    let wk = if wk.is_null() { wk } else { wk.add(lo) };
                    optim::sgd::<W>(
                        isa,
                        core::slice::from_raw_parts_mut(w.add(lo), len),
                        core::slice::from_raw_parts(g.add(lo), len),
                        m,
                        wk,
                        s,
                    );
                }
            });
        });
        Ok(())
    }

    fn adamw_step(&mut self, p: &ParamBufs, s: &AdamWStep) -> Result<()> {
        let n = self.check_params(p, true, true)?;
        with_float!(p.working.dtype, "optimizer working", W => {
            let working = self.working_ptr::<W>(p);
            // SAFETY: check_params validated and separated the buffers.
            let (w, g, m, v) = unsafe { self.param_slices(p, n, n, n) };
            let ptrs = (w.as_mut_ptr(), g.as_ptr(), m.as_mut_ptr(), v.as_mut_ptr(), working);
            let (isa, sh) = (self.isa, Shared(ptrs));
            self.split_range(n, ALIGN_ELEMS, MIN_ELEMS_PER_PART, &|lo, hi| {
                let (w, g, m, v, wk) = *sh.get();
                let len = hi - lo;
                // SAFETY: parts take disjoint ranges of the validated, separated buffers; `working` (if not
                // null) holds n elements.
                unsafe {
                    let wk = if wk.is_null() { wk } else { wk.add(lo) };
                    optim::adamw::<W>(
                        isa,
                        core::slice::from_raw_parts_mut(w.add(lo), len),
                        core::slice::from_raw_parts(g.add(lo), len),
                        core::slice::from_raw_parts_mut(m.add(lo), len),
                        core::slice::from_raw_parts_mut(v.add(lo), len),
                        wk,
                        s,
                    );
                }
            });
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::SimdBackend;
    use mantissa_core::arena::Buf;
    use mantissa_core::backend::{Activation, AdamWStep, Backend, ParamBufs, SgdStep};
    use mantissa_core::DType;

    /// Runs every split element-wise op on `threads` threads over sizes above the split threshold (and not
    /// multiples of the split alignment); returns the bits of every output.
    fn run_ops(threads: usize, dt: DType) -> Vec<u32> {
        const N: usize = 100_003;
        let mut mem = vec![0u8; 64 * N + 4096];
        let mut b = SimdBackend::new(&mut mem, threads).unwrap();
        let mut off = 0;
        let mut alloc = |len: usize, dtype: DType| {
            let buf = Buf { offset: off, len, dtype };
            off = buf.end().next_multiple_of(64);
            buf
        };
        let data = |len: usize, seed: u32| -> Vec<f32> {
            (0..len)
                .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 20) as f32 / 512.0 - 4.0)
                .collect()
        };
        let (x, y, dy, dx) = (alloc(N, dt), alloc(N, dt), alloc(N, dt), alloc(N, dt));
        let bias = alloc(600, DType::F32);
        let dbias = alloc(600, DType::F32);
        let (master, grad, s1, s2, working) =
            (alloc(N, DType::F32), alloc(N, DType::F32), alloc(N, DType::F32), alloc(N, DType::F32), alloc(N, dt));
        b.upload(x, &data(N, 1)).unwrap();
        b.upload(dy, &data(N, 2)).unwrap();
        b.upload(bias, &data(600, 3)).unwrap();
        let mut out = Vec::new();
        let mut read = |b: &mut SimdBackend<'_>, buf: Buf| {
            let mut v = vec![0.0f32; buf.len];
            b.download(buf, &mut v).unwrap();
            out.extend(v.iter().map(|x| x.to_bits()));
        };
        for act in [Activation::GeluTanh, Activation::Relu] {
            b.activation(act, x, y).unwrap();
            read(&mut b, y);
            b.activation_backward(act, x, dy, dx).unwrap();
            read(&mut b, dx);
        }
        b.cast(x, y).unwrap();
        read(&mut b, y);
        for (outer, channels, inner) in [(166, 600, 1), (4, 600, 41)] {
            b.upload(y, &data(N, 4)).unwrap();
            b.add_bias(y, bias, outer, channels, inner).unwrap();
            read(&mut b, y);
            b.bias_grad(y, dbias, outer, channels, inner).unwrap();
            read(&mut b, dbias);
        }
        b.upload(master, &data(N, 5)).unwrap();
        b.upload(grad, &data(N, 6)).unwrap();
        b.fill(s1, 0.25).unwrap();
        b.fill(s2, 0.5).unwrap();
        let p = ParamBufs { master, working, grad, state1: s1, state2: s2 };
        let s = AdamWStep {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            bias_correction1: 0.1,
            bias_correction2: 0.001,
            grad_scale: 0.5,
        };
        b.adamw_step(&p, &s).unwrap();
        for buf in [master, working, s1, s2] {
            read(&mut b, buf);
        }
        for momentum in [0.0, 0.9] {
            let s = SgdStep { lr: 0.1, momentum, nesterov: true, weight_decay: 0.01, grad_scale: 0.5 };
            b.sgd_step(&p, &s).unwrap();
            for buf in [master, working, s1] {
                read(&mut b, buf);
            }
        }
        out
    }

    /// The element-wise ops split over threads give the single-threaded bits.
    #[test]
    fn split_elementwise_ops_are_bit_identical() {
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let one = run_ops(1, dt);
            for threads in [2, 3] {
                assert!(one == run_ops(threads, dt), "{dt:?}, {threads} threads");
            }
        }
    }

    /// Runs every epilogue through `gemm_fused` (`composed == false`) or the composed ops, on `threads`
    /// threads, for shapes split along N (whole columns per part) and along M (the bias gradient after the
    /// join), for C (and the bias) in `dt`; returns the bits of every output.
    fn run_fused(threads: usize, dt: DType, composed: bool) -> Vec<u32> {
        use mantissa_core::backend::{gemm_fused_composed, Epilogue, Gemm};
        const MAX: usize = 600 * 300;
        let mut mem = vec![0u8; 4 * 8 * MAX + 4096];
        let mut b = SimdBackend::new(&mut mem, threads).unwrap();
        let mut off = 0;
        let mut alloc = |len: usize, dtype: DType| {
            let buf = Buf { offset: off, len, dtype };
            off = buf.end().next_multiple_of(64);
            buf
        };
        let data = |len: usize, seed: u32| -> Vec<f32> {
            (0..len)
                .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 20) as f32 / 2048.0 - 1.0)
                .collect()
        };
        let (a, w, c, pre) = (alloc(MAX, dt), alloc(MAX, dt), alloc(MAX, dt), alloc(MAX, dt));
        let (bias, dbias) = (alloc(600, dt), alloc(600, DType::F32));
        b.upload(a, &data(MAX, 1)).unwrap();
        b.upload(w, &data(MAX, 2)).unwrap();
        b.upload(bias, &data(600, 3)).unwrap();
        let mut out = Vec::new();
        let mut read = |b: &mut SimdBackend<'_>, buf: Buf| {
            let mut v = vec![0.0f32; buf.len];
            b.download(buf, &mut v).unwrap();
            out.extend(v.iter().map(|x| x.to_bits()));
        };
        // (m, n, k): split along N, along M (m > n), one part, a k over two cache blocks.
        for (m, n, k) in [(256, 512, 60), (300, 130, 45), (9, 40, 7), (70, 96, 600)] {
            let (c, pre) = (c.prefix(m * n), pre.prefix(m * n));
            let g = Gemm::new(m, n, k, a, w, c).b_t(k);
            let eps = [
                Epilogue::Bias { bias: bias.prefix(n) },
                Epilogue::BiasAct { bias: bias.prefix(n), act: Activation::GeluTanh, pre },
                Epilogue::BiasAct { bias: bias.prefix(n), act: Activation::Relu, pre },
                Epilogue::ActGrad { act: Activation::GeluTanh, pre, dbias: Some(dbias.prefix(n)) },
                Epilogue::ActGrad { act: Activation::Relu, pre, dbias: None },
            ];
            for ep in eps {
                if composed {
                    gemm_fused_composed(&mut b, &g, &ep).unwrap();
                } else {
                    b.gemm_fused(&g, &ep).unwrap();
                }
                for buf in [c, pre, dbias.prefix(n)] {
                    read(&mut b, buf);
                }
            }
        }
        out
    }

    /// `gemm_fused` (epilogue in each thread's block) gives the composed ops' bits, for any thread count.
    #[test]
    fn fused_epilogues_match_the_composed_ops() {
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let want = run_fused(1, dt, true);
            for threads in [1, 2, 3] {
                assert!(want == run_fused(threads, dt, false), "{dt:?}, {threads} threads");
            }
        }
    }

    /// im2col, col2im, max-pooling and its backward on `threads` threads (or the reference) over enough images
    /// to split, for stride 1 and 2, padding, and rows longer than one chunk; returns the bits of every output.
    fn run_conv(threads: Option<usize>, dt: DType) -> Vec<u32> {
        use mantissa_core::backend::{ConvGeom, PoolGeom};
        use mantissa_core::Reference;
        let mut mem = vec![0u8; 24 << 20];
        let mut simd;
        let mut reference;
        let b: &mut dyn Backend = match threads {
            Some(t) => {
                simd = SimdBackend::new(&mut mem, t).unwrap();
                &mut simd
            }
            None => {
                reference = Reference::new(&mut mem);
                &mut reference
            }
        };
        let mut off = 0;
        let mut alloc = |len: usize, dtype: DType| {
            let buf = Buf { offset: off, len, dtype };
            off = buf.end().next_multiple_of(64);
            buf
        };
        let data = |len: usize, seed: u32| -> Vec<f32> {
            (0..len)
                .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 20) as f32 / 1024.0 - 2.0)
                .collect()
        };
        let mut out = Vec::new();
        let mut read = |b: &mut dyn Backend, buf: Buf| {
            let mut v = vec![0u8; buf.bytes()];
            b.download_bytes(buf, &mut v).unwrap();
            out.extend(v.iter().map(|&x| u32::from(x)));
        };
        let (x, cols, dx) = (alloc(600_000, dt), alloc(2_000_000, dt), alloc(600_000, dt));
        for (c, h, w, k, stride, pad, images) in
            [(3, 28, 28, 5, 1, 2, 9), (2, 9, 300, 3, 1, 1, 8), (2, 13, 11, 3, 2, 1, 30), (4, 8, 8, 5, 2, 2, 20)]
        {
            let (oh, ow) = ((h + 2 * pad - k) / stride + 1, (w + 2 * pad - k) / stride + 1);
            let g = ConvGeom {
                channels: c,
                height: h,
                width: w,
                kernel: k,
                stride,
                padding: pad,
                out_height: oh,
                out_width: ow,
            };
            let (xn, cn) = (images * g.in_len(), images * g.col_rows() * g.col_cols());
            b.upload(x.prefix(xn), &data(xn, 1)).unwrap();
            // Signalling NaNs (and a negative one) go through im2col quieted, as through the reference's f32.
            let snan: &[u8] = match dt {
                DType::F32 => &[1, 0, 0x80, 0x7f, 1, 0, 0x80, 0xff],
                DType::BF16 => &[0x81, 0x7f, 0x81, 0xff],
                _ => &[0x01, 0x7c, 0x01, 0xfc],
            };
            b.upload_bytes(x.slice(g.width + 1, 2), snan).unwrap();
            b.im2col(x.prefix(xn), &g, images, cols.prefix(cn)).unwrap();
            read(b, cols.prefix(cn));
            b.upload(cols.prefix(cn), &data(cn, 2)).unwrap();
            b.col2im(cols.prefix(cn), &g, images, dx.prefix(xn)).unwrap();
            read(b, dx.prefix(xn));
        }
        let am = alloc(200_000, DType::I32);
        // The last two: rows over several blocks of outputs, and a window wider than a chunk (the scalar loop).
        let pools = [
            (8, 28, 28, 2, 2, 12),
            (3, 7, 9, 2, 2, 40),
            (2, 9, 9, 3, 2, 30),
            (1, 4, 600, 3, 2, 5),
            (1, 257, 258, 257, 1, 2),
        ];
        for (c, h, w, k, stride, images) in pools {
            let (oh, ow) = ((h - k) / stride + 1, (w - k) / stride + 1);
            let p = PoolGeom { channels: c, height: h, width: w, kernel: k, stride, out_height: oh, out_width: ow };
            let (xn, yn) = (images * p.in_len(), images * p.out_len());
            // Few distinct values: ties (the first wins) and repeated argmax positions (overlapping windows).
            let v: Vec<f32> = data(xn, 3).iter().map(|v| (v * 2.0).round()).collect();
            b.upload(x.prefix(xn), &v).unwrap();
            b.maxpool(x.prefix(xn), &p, images, cols.prefix(yn), am.prefix(yn)).unwrap();
            read(b, cols.prefix(yn));
            read(b, am.prefix(yn));
            b.upload(cols.prefix(yn), &data(yn, 4)).unwrap();
            b.maxpool_backward(cols.prefix(yn), am.prefix(yn), &p, images, dx.prefix(xn)).unwrap();
            read(b, dx.prefix(xn));
        }
        out
    }

    /// The convolution and pooling ops give the reference's bits, split over any number of threads.
    #[test]
    fn conv_and_pool_ops_match_the_reference() {
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let want = run_conv(None, dt);
            for threads in [1, 2, 3] {
                assert!(want == run_conv(Some(threads), dt), "{dt:?}, {threads} threads");
            }
        }
    }
}
