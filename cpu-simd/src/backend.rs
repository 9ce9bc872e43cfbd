//! [`SimdBackend`]: [`mantissa_core::Backend`] over a borrowed arena, with the packed GEMM kernels of this crate
//! and vectorised element-wise ops ([`crate::ops`]). col2im and max-pooling (and the byte / i32 copies) run the
//! scalar reference code on the same arena; they are the next to vectorise (about 30% of a CNN step).

use core::marker::PhantomData;

use half::{bf16, f16};
use mantissa_core::arena::{Buf, ALIGN};
use mantissa_core::backend::{
    Activation, AdamWStep, Backend, Capabilities, ConvGeom, Gemm, GradStats, ParamBufs, PoolGeom, SgdStep,
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
/// per-element code, so results are bit-identical for any thread count. The rest runs on the calling thread.
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
        let n = p.master.len;
        let used = [
            (p.master, "optimizer master", true),
            (p.working, "optimizer working", p.working.offset != p.master.offset),
            (p.grad, "optimizer grad", true),
            (p.state1, "optimizer state1", state1),
            (p.state2, "optimizer state2", state2),
        ];
        for (b, what, on) in used {
            if !on {
                continue;
            }
            self.check(b, what)?;
            Self::check_len(b, n, what)?;
            if b.dtype != DType::F32 && what != "optimizer working" {
                return Err(Error::UnsupportedDType { what, dtype: b.dtype });
            }
        }
        // The fused loop borrows each vector as its own slice: they must be disjoint.
        for (i, (a, _, on_a)) in used.iter().enumerate() {
            for (b, _, on_b) in &used[i + 1..] {
                if *on_a && *on_b && a.prefix(n).overlaps(&b.prefix(n)) {
                    return Err(Error::InvalidConfig("optimizer buffers overlap"));
                }
            }
        }
        if !p.working.dtype.is_float() {
            return Err(Error::UnsupportedDType { what: "optimizer working", dtype: p.working.dtype });
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

/// Elements (or parameters) each thread must get before an element-wise op is split: handing a part to a
/// spinning pool worker and joining it costs ~1-2 us, about what one thread spends on 16k elements of a cast.
const MIN_ELEMS_PER_PART: usize = 1 << 14;

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
            // SAFETY: dst is checked to hold src.len() elements; src is a distinct Rust slice.
            unsafe { convert::upload::<T>(self.isa, src, self.ptr::<T>(dst)) };
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
        self.check(logits, "softmax_cross_entropy logits")?;
        self.check(labels, "softmax_cross_entropy labels")?;
        self.check(loss, "softmax_cross_entropy loss")?;
        self.check(dlogits, "softmax_cross_entropy dlogits")?;
        Self::check_len(logits, rows * classes, "softmax_cross_entropy logits")?;
        Self::check_len(dlogits, rows * classes, "softmax_cross_entropy dlogits")?;
        Self::check_len(labels, rows, "softmax_cross_entropy labels")?;
        Self::check_len(loss, 1, "softmax_cross_entropy loss")?;
        if labels.dtype != DType::I32 {
            return Err(Error::UnsupportedDType { what: "softmax_cross_entropy labels", dtype: labels.dtype });
        }
        if loss.dtype != DType::F32 {
            return Err(Error::UnsupportedDType { what: "softmax_cross_entropy loss", dtype: loss.dtype });
        }
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
            // SAFETY: both checked for the lengths used, disjoint (every read is bounds-checked against H and W).
            unsafe { conv::im2col::<X, C>(self.isa, self.ptr(x), g, images, self.ptr(cols)) };
        }));
        Ok(())
    }

    fn col2im(&mut self, cols: Buf, g: &ConvGeom, images: usize, dx: Buf) -> Result<()> {
        self.reference().col2im(cols, g, images, dx)
    }

    fn maxpool(&mut self, x: Buf, g: &PoolGeom, images: usize, y: Buf, argmax: Buf) -> Result<()> {
        self.reference().maxpool(x, g, images, y, argmax)
    }

    fn maxpool_backward(&mut self, dy: Buf, argmax: Buf, g: &PoolGeom, images: usize, dx: Buf) -> Result<()> {
        self.reference().maxpool_backward(dy, argmax, g, images, dx)
    }

    fn grad_stats(&mut self, grad: Buf, scale: f32) -> Result<GradStats> {
        self.check(grad, "grad_stats")?;
        let (non_finite, sum_sq) = with_float!(grad.dtype, "grad_stats", G => {
            // SAFETY: checked.
            unsafe { optim::grad_stats::<G>(self.isa, self.ptr(grad), grad.len, scale) }
        });
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
}
