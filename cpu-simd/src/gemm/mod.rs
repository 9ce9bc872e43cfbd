//! GEMM: `C = alpha * A * B + beta * C` for f32, bf16 and f16 inputs, f32 accumulation.
//!
//! Shapes: A is (m, k), B is (k, n), C is (m, n). Strides are in elements: element
//! (i, j) of A is at `a + i * rsa + j * csa`, so a transpose is a swap of strides.
//! `beta == 0` means C is not read (it may hold NaN). 16-bit C is accumulated in
//! f32 over the whole k and rounded to nearest even once.
//!
//! Layers, outer to inner: the entry points here (shape checks, threads, scratch),
//! `driver` (cache blocking and packing, generic), and one micro-kernel per
//! instruction set (`scalar`, `avx2`, `avx512`, `avx512bf16`, `amx`), each a zero-sized
//! type whose `#[target_feature]` entry point instantiates the generic driver.

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avx512bf16;
mod driver;
mod f16c;
#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(target_arch = "aarch64")]
mod neon_bf16;
#[cfg(target_arch = "aarch64")]
mod neon_fp16;
mod pack;
mod scalar;

use half::{bf16, f16};

use crate::detect::Kernel;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use crate::detect::KernelId;
use crate::error::{Error, Operand};

pub(crate) use driver::ScratchLayout;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElemKind {
    F32,
    Bf16,
    F16,
}

/// A GEMM element type: f32, bf16 or f16. Conversions round to nearest even.
pub trait Elem: Copy + Send + Sync + 'static + sealed::Sealed {
    #[doc(hidden)]
    const KIND: ElemKind;
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}

impl Elem for f32 {
    const KIND: ElemKind = ElemKind::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> f32 {
        x
    }
}

impl Elem for bf16 {
    const KIND: ElemKind = ElemKind::Bf16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> bf16 {
        bf16::from_f32(x)
    }
}

impl Elem for f16 {
    const KIND: ElemKind = ElemKind::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> f16 {
        f16::from_f32(x)
    }
}

/// Where a 16-bit GEMM writes C.
#[derive(Clone, Copy, Debug)]
pub enum COut {
    F32(*mut f32),
    BF16(*mut bf16),
    F16(*mut f16),
}

/// One GEMM (or a thread's part of one), raw pointers and element strides.
pub(crate) struct Task<TA, TB, TC> {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub alpha: f32,
    pub a: *const TA,
    pub rsa: isize,
    pub csa: isize,
    pub b: *const TB,
    pub rsb: isize,
    pub csb: isize,
    pub beta: f32,
    pub c: *mut TC,
    pub rsc: isize,
    pub csc: isize,
}

impl<TA, TB, TC> Clone for Task<TA, TB, TC> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<TA, TB, TC> Copy for Task<TA, TB, TC> {}

impl<TA, TB, TC> Task<TA, TB, TC> {
    /// The sub-GEMM computing C rows `i0..i0 + m` and columns `j0..j0 + n`.
    ///
    /// # Safety
    /// The ranges lie inside this task's C.
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    pub(crate) unsafe fn sub(&self, i0: usize, m: usize, j0: usize, n: usize) -> Self {
        debug_assert!(i0 + m <= self.m && j0 + n <= self.n);
        // SAFETY: row i0 of A / column j0 of B / element (i0, j0) of C exist (caller).
        unsafe {
            Task {
                m,
                n,
                a: self.a.offset(i0 as isize * self.rsa),
                b: self.b.offset(j0 as isize * self.csb),
                c: self.c.offset(i0 as isize * self.rsc + j0 as isize * self.csc),
                ..*self
            }
        }
    }
}

impl<TA, TB, TC> Task<TA, TB, TC> {
    /// The same product transposed: `C^T (n, m) = B^T (n, k) A^T (k, m)`, through swapped strides.
    #[cfg(feature = "std")]
    pub(crate) fn transposed(&self) -> Task<TB, TA, TC> {
        Task {
            m: self.n,
            n: self.m,
            k: self.k,
            alpha: self.alpha,
            a: self.b,
            rsa: self.csb,
            csa: self.rsb,
            b: self.a,
            rsb: self.csa,
            csb: self.rsa,
            beta: self.beta,
            c: self.c,
            rsc: self.csc,
            csc: self.rsc,
        }
    }
}

/// A register-blocked micro-kernel and its packing, for one instruction set.
pub(crate) trait Micro {
    /// Packed element: f32, or bf16 bits for `vdpbf16ps`.
    type P: Copy;
    /// Register tile: MR rows of C by NR columns.
    const MR: usize;
    const NR: usize;
    /// k steps consumed per micro-kernel step (2 for bf16 pairs).
    const KU: usize;
    /// Cache blocks: KC (multiple of KU), MC (multiple of MR), NC (multiple of NR).
    const KC: usize;
    const MC: usize;
    const NC: usize;

    /// Packs `valid <= MR` rows of A (k-stride `ks`, row stride `rs`) for `kc` k.
    ///
    /// # Safety
    /// Elements `(i < valid, p < kc)` readable; `dst` holds `kc.next_multiple_of(KU) * MR` P.
    unsafe fn pack_a<T: Elem>(kc: usize, valid: usize, a: *const T, rs: isize, ks: isize, dst: *mut Self::P);
    /// Packs `valid <= NR` columns of B (column stride `rs`, k-stride `ks`).
    ///
    /// # Safety
    /// As [`Micro::pack_a`] with NR.
    unsafe fn pack_b<T: Elem>(kc: usize, valid: usize, b: *const T, rs: isize, ks: isize, dst: *mut Self::P);
    /// Packs an `mc x kc` block of A (element (i, p) at `a[i * rsa + p * csa]`) into MR-row
    /// panels; the default packs panel by panel with [`Micro::pack_a`].
    ///
    /// # Safety
    /// As `driver::pack_a_panels`.
    #[inline(always)]
    unsafe fn pack_a_block<T: Elem>(mc: usize, kc: usize, a: *const T, rsa: isize, csa: isize, dst: *mut Self::P)
    where
        Self: Sized,
    {
        // SAFETY: forwarded contract.
        unsafe { driver::pack_a_panels::<Self, T>(mc, kc, a, rsa, csa, dst) }
    }
    /// Packs a `kc x nc` block of B (element (p, j) at `b[p * rsb + j * csb]`) into NR-column
    /// panels; the default packs panel by panel with [`Micro::pack_b`].
    ///
    /// # Safety
    /// As `driver::pack_b_panels`.
    #[inline(always)]
    unsafe fn pack_b_block<T: Elem>(kc: usize, nc: usize, b: *const T, rsb: isize, csb: isize, dst: *mut Self::P)
    where
        Self: Sized,
    {
        // SAFETY: forwarded contract.
        unsafe { driver::pack_b_panels::<Self, T>(kc, nc, b, rsb, csb, dst) }
    }
    /// `C[MR x NR] = alpha * A_panel * B_panel + beta * C` over `kp` packed k steps;
    /// C is not read when beta == 0.
    ///
    /// # Safety
    /// Panels hold `kp * KU * MR` and `kp * KU * NR` P; the MR x NR tile of C is
    /// writable; the CPU supports the kernel's instructions.
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel(
        kp: usize,
        alpha: f32,
        a: *const Self::P,
        b: *const Self::P,
        beta: f32,
        c: *mut f32,
        rsc: isize,
        csc: isize,
    );
}

/// One kernel family: which micro-kernel serves which input types, and the
/// `#[target_feature]` entry that runs the blocked driver with it.
pub(crate) trait GemmKernel {
    /// (MR, NR) used for inputs `TA` x `TB`.
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    fn tile<TA: Elem, TB: Elem>() -> (usize, usize);
    /// Scratch bytes for one thread (includes 64 bytes of alignment slack).
    fn scratch_len<TA: Elem, TB: Elem, TC: Elem>(m: usize, n: usize, k: usize) -> usize;
    /// Runs `t` on the calling thread.
    ///
    /// # Safety
    /// As [`driver::gemm_blocked`]; the CPU supports this kernel (a [`Kernel`] exists).
    unsafe fn run<TA: Elem, TB: Elem, TC: Elem>(t: &Task<TA, TB, TC>, scratch: *mut u8);
}

#[cfg_attr(not(feature = "std"), allow(dead_code))]
pub(crate) fn tile_of<M: Micro>() -> (usize, usize) {
    (M::MR, M::NR)
}

pub(crate) fn scratch_of<M: Micro, TC: Elem>(m: usize, n: usize, k: usize) -> usize {
    ScratchLayout::new::<M>(m, n, k, !matches!(TC::KIND, ElemKind::F32)).total
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(crate) fn is_bf16<T: Elem>() -> bool {
    matches!(T::KIND, ElemKind::Bf16)
}

#[cfg(target_arch = "aarch64")]
pub(crate) fn is_f16<T: Elem>() -> bool {
    matches!(T::KIND, ElemKind::F16)
}

/// Runs `$body` with `$K` bound to the kernel type of `$kernel`.
macro_rules! dispatch {
    ($kernel:expr, $K:ident => $body:expr) => {
        match $kernel.id() {
            #[cfg(target_arch = "x86_64")]
            KernelId::Avx2 => {
                type $K = avx2::Avx2;
                $body
            }
            #[cfg(target_arch = "x86_64")]
            KernelId::Avx512 => {
                type $K = avx512::Avx512;
                $body
            }
            #[cfg(target_arch = "x86_64")]
            KernelId::Avx512Bf16 => {
                type $K = avx512bf16::Avx512Bf16;
                $body
            }
            #[cfg(target_arch = "x86_64")]
            KernelId::Amx => {
                type $K = amx::Amx;
                $body
            }
            #[cfg(target_arch = "aarch64")]
            KernelId::Neon => {
                type $K = neon::Neon;
                $body
            }
            #[cfg(target_arch = "aarch64")]
            KernelId::NeonFhm => {
                type $K = neon_fp16::NeonFhm;
                $body
            }
            #[cfg(target_arch = "aarch64")]
            KernelId::NeonBf16 => {
                type $K = neon_bf16::NeonBf16;
                $body
            }
            // No other `Kernel` can be constructed on this architecture.
            #[allow(unreachable_patterns)]
            _ => {
                type $K = scalar::Scalar;
                $body
            }
        }
    };
}

#[cfg_attr(not(feature = "std"), allow(dead_code))]
pub(crate) fn kernel_tile<TA: Elem, TB: Elem>(kernel: Kernel) -> (usize, usize) {
    dispatch!(kernel, K => K::tile::<TA, TB>())
}

pub(crate) fn kernel_scratch_len<TA: Elem, TB: Elem, TC: Elem>(kernel: Kernel, m: usize, n: usize, k: usize) -> usize {
    dispatch!(kernel, K => K::scratch_len::<TA, TB, TC>(m, n, k))
}

/// Scratch bytes that the `*_in` functions need for an (m, n, k) GEMM on `kernel`,
/// for any element types. Includes 64 bytes to align an unaligned slice. Bounded by
/// the cache blocks however large the GEMM: at most about 1.3 MiB, 3.5 MiB on
/// [`crate::KernelId::Amx`] (bf16 blocks of 1024 k).
pub fn gemm_scratch_len(m: usize, n: usize, k: usize, kernel: Kernel) -> usize {
    let f = kernel_scratch_len::<f32, f32, bf16>(kernel, m, n, k);
    let h = kernel_scratch_len::<bf16, bf16, bf16>(kernel, m, n, k);
    f.max(h)
}

/// C = beta * C (C not read when beta == 0): the whole GEMM when k == 0 or alpha == 0.
///
/// # Safety
/// C of `t` is valid for reads and writes.
unsafe fn scale_c<TA, TB, TC: Elem>(t: &Task<TA, TB, TC>) {
    if t.beta == 1.0 {
        return;
    }
    for i in 0..t.m {
        for j in 0..t.n {
            // SAFETY: (i, j) lies inside C (caller).
            unsafe {
                let cp = t.c.offset(i as isize * t.rsc + j as isize * t.csc);
                let v = if t.beta == 0.0 { 0.0 } else { t.beta * (*cp).to_f32() };
                *cp = TC::from_f32(v);
            }
        }
    }
}

/// Runs `t` single-threaded in caller scratch.
///
/// # Safety
/// `t` valid as for [`gemm_f32`].
pub(crate) unsafe fn run_in<TA: Elem, TB: Elem, TC: Elem>(
    kernel: Kernel,
    scratch: &mut [u8],
    t: &Task<TA, TB, TC>,
) -> Result<(), Error> {
    if t.m == 0 || t.n == 0 {
        return Ok(());
    }
    if t.k == 0 || t.alpha == 0.0 {
        // SAFETY: C valid (caller).
        unsafe { scale_c(t) };
        return Ok(());
    }
    let need = kernel_scratch_len::<TA, TB, TC>(kernel, t.m, t.n, t.k);
    if scratch.len() < need {
        return Err(Error::ScratchTooSmall { needed: need, got: scratch.len() });
    }
    let pad = scratch.as_ptr().align_offset(64);
    // SAFETY: pad < 64 and need includes 64 bytes of slack, so the aligned region
    // of need - 64 bytes lies in `scratch`; `kernel` proves CPU support; t is valid.
    unsafe {
        let s = scratch.as_mut_ptr().add(pad);
        run_one(kernel, t, s);
    }
    Ok(())
}

/// # Safety
/// As [`GemmKernel::run`]; m, n, k > 0.
pub(crate) unsafe fn run_one<TA: Elem, TB: Elem, TC: Elem>(kernel: Kernel, t: &Task<TA, TB, TC>, scratch: *mut u8) {
    // SAFETY: forwarded from the caller; `kernel` exists only if the CPU supports it.
    dispatch!(kernel, K => unsafe { K::run(t, scratch) })
}

/// Runs `t` with up to `threads` threads (std) — see [`crate::threads`].
///
/// # Safety
/// `t` valid as for [`gemm_f32`].
#[cfg(feature = "std")]
pub(crate) unsafe fn run<TA: Elem, TB: Elem, TC: Elem>(kernel: Kernel, threads: usize, t: &Task<TA, TB, TC>) {
    if t.m == 0 || t.n == 0 {
        return;
    }
    if t.k == 0 || t.alpha == 0.0 {
        // SAFETY: C valid (caller).
        unsafe { scale_c(t) };
        return;
    }
    if runs_transposed::<TA, TB>(kernel, t.m, t.n) {
        // SAFETY: the same elements, read and written through swapped strides.
        unsafe { crate::threads::run_parallel(kernel, threads, &t.transposed()) };
        return;
    }
    // SAFETY: forwarded from the caller.
    unsafe { crate::threads::run_parallel(kernel, threads, t) }
}

/// [`run`] followed by `after(part)` for each part of C, on the thread that computed it (see
/// [`crate::threads::run_parallel_then`]). Never transposes; m, n, k > 0 and alpha != 0.
///
/// # Safety
/// As [`run`]; `after` touches only its part's block of C (and memory no other part writes).
#[cfg(feature = "std")]
pub(crate) unsafe fn run_then<TA: Elem, TB: Elem, TC: Elem>(
    kernel: Kernel,
    threads: usize,
    t: &Task<TA, TB, TC>,
    after: &(dyn Fn(crate::threads::Part) + Sync),
) {
    debug_assert!(t.m > 0 && t.n > 0 && t.k > 0 && t.alpha != 0.0);
    // SAFETY: forwarded from the caller.
    unsafe { crate::threads::run_parallel_then(kernel, threads, t, after) }
}

/// Whether `run` computes `C^T = B^T A^T` instead: when C has fewer columns than the register tile and that
/// tile's rows fit them much better (the cpu-mlp's 10-class layer on AVX-512: 10 of 32 columns used, against
/// 10 of 14 rows transposed; ~2x the GFLOP/s). Every element is the same sum in the same k order, so only
/// which elements fall in edge tiles changes (their `alpha` / `beta` scaling is not fused: equal for
/// `alpha == 1`, `beta` 0 or 1). Depends only on the shape and kernel, never on the thread count.
#[cfg(feature = "std")]
pub(crate) fn runs_transposed<TA: Elem, TB: Elem>(kernel: Kernel, m: usize, n: usize) -> bool {
    let (mr, nr) = kernel_tile::<TA, TB>(kernel);
    n < nr && m >= 2 * nr && 3 * n.next_multiple_of(mr) <= 2 * n.next_multiple_of(nr)
}

macro_rules! task {
    ($m:ident, $n:ident, $k:ident, $alpha:ident, $a:ident, $rsa:ident, $csa:ident, $b:ident,
     $rsb:ident, $csb:ident, $beta:ident, $c:expr, $rsc:ident, $csc:ident) => {
        Task {
            m: $m,
            n: $n,
            k: $k,
            alpha: $alpha,
            a: $a,
            rsa: $rsa,
            csa: $csa,
            b: $b,
            rsb: $rsb,
            csb: $csb,
            beta: $beta,
            c: $c,
            rsc: $rsc,
            csc: $csc,
        }
    };
}

/// `C = alpha * A * B + beta * C` in f32, on `threads` threads (0 and 1 run inline).
///
/// A is (m, k) with element (i, p) at `a + i * rsa + p * csa`; B is (k, n) with
/// (p, j) at `b + p * rsb + j * csb`; C is (m, n) with (i, j) at `c + i * rsc + j * csc`.
/// `beta == 0` means C is only written. Packing scratch comes from a buffer kept per
/// calling thread (grown on demand, reused).
///
/// # Safety
/// Every element of A and B named by the shape and strides is readable, every
/// element of C readable and writable; C does not overlap A or B, and distinct
/// (i, j) of C are distinct memory. No other thread writes A, B or C meanwhile.
#[cfg(feature = "std")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_f32(
    kernel: Kernel,
    threads: usize,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: *const f32,
    rsa: isize,
    csa: isize,
    b: *const f32,
    rsb: isize,
    csb: isize,
    beta: f32,
    c: *mut f32,
    rsc: isize,
    csc: isize,
) {
    let t = task!(m, n, k, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc);
    // SAFETY: the caller guarantees the operands (this function's contract).
    unsafe { run(kernel, threads, &t) }
}

/// [`gemm_f32`] single-threaded in caller scratch of [`gemm_scratch_len`] bytes (no
/// allocation; the `no_std` entry point).
///
/// # Safety
/// As [`gemm_f32`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_f32_in(
    kernel: Kernel,
    scratch: &mut [u8],
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: *const f32,
    rsa: isize,
    csa: isize,
    b: *const f32,
    rsb: isize,
    csb: isize,
    beta: f32,
    c: *mut f32,
    rsc: isize,
    csc: isize,
) -> Result<(), Error> {
    let t = task!(m, n, k, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc);
    // SAFETY: the caller guarantees the operands.
    unsafe { run_in(kernel, scratch, &t) }
}

macro_rules! half_gemm {
    ($(#[$doc:meta])* $name:ident, $name_in:ident, $t:ty) => {
        $(#[$doc])*
        ///
        /// # Safety
        /// As [`gemm_f32`], for the pointer inside `c`.
        #[cfg(feature = "std")]
        #[allow(clippy::too_many_arguments)]
        pub unsafe fn $name(
            kernel: Kernel,
            threads: usize,
            m: usize,
            n: usize,
            k: usize,
            alpha: f32,
            a: *const $t,
            rsa: isize,
            csa: isize,
            b: *const $t,
            rsb: isize,
            csb: isize,
            beta: f32,
            c: COut,
            rsc: isize,
            csc: isize,
        ) {
            // SAFETY (all arms): the caller guarantees the operands.
            match c {
                COut::F32(c) => unsafe {
                    run(kernel, threads, &task!(m, n, k, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc))
                },
                COut::BF16(c) => unsafe {
                    run(kernel, threads, &task!(m, n, k, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc))
                },
                COut::F16(c) => unsafe {
                    run(kernel, threads, &task!(m, n, k, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc))
                },
            }
        }

        /// Single-threaded, caller scratch of [`gemm_scratch_len`] bytes (no allocation).
        ///
        /// # Safety
        /// As [`gemm_f32`], for the pointer inside `c`.
        #[allow(clippy::too_many_arguments)]
        pub unsafe fn $name_in(
            kernel: Kernel,
            scratch: &mut [u8],
            m: usize,
            n: usize,
            k: usize,
            alpha: f32,
            a: *const $t,
            rsa: isize,
            csa: isize,
            b: *const $t,
            rsb: isize,
            csb: isize,
            beta: f32,
            c: COut,
            rsc: isize,
            csc: isize,
        ) -> Result<(), Error> {
            // SAFETY (all arms): the caller guarantees the operands.
            match c {
                COut::F32(c) => unsafe {
                    run_in(kernel, scratch, &task!(m, n, k, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc))
                },
                COut::BF16(c) => unsafe {
                    run_in(kernel, scratch, &task!(m, n, k, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc))
                },
                COut::F16(c) => unsafe {
                    run_in(kernel, scratch, &task!(m, n, k, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc))
                },
            }
        }
    };
}

half_gemm!(
    /// `C = alpha * A * B + beta * C` with bf16 A and B, f32 accumulation, C in f32 or
    /// 16 bits (rounded to nearest even once, after the whole k). On
    /// [`crate::KernelId::Avx512Bf16`] products go through `vdpbf16ps`, on [`crate::KernelId::Amx`]
    /// through `tdpbf16ps`; both flush subnormal inputs and results to zero. Other kernels widen to f32
    /// while packing.
    /// Arguments as [`gemm_f32`].
    gemm_bf16,
    gemm_bf16_in,
    bf16
);
half_gemm!(
    /// `C = alpha * A * B + beta * C` with f16 A and B, widened to f32 while packing
    /// (F16C on the x86 kernels), f32 accumulation, C in f32 or 16 bits (rounded to
    /// nearest even once). Arguments as [`gemm_f32`].
    gemm_f16,
    gemm_f16_in,
    f16
);

/// A read-only matrix view: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// A (rows, cols) view with row stride `rs` and column stride `cs`, in elements.
    /// Bounds are checked by the GEMM that uses it.
    pub fn new(data: &'a [T], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        MatRef { data, rows, cols, rs, cs }
    }
    pub fn row_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols, 1)
    }
    pub fn col_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, 1, rows)
    }
    /// The transpose (no copy).
    pub fn t(self) -> Self {
        Self::new(self.data, self.cols, self.rows, self.cs, self.rs)
    }
}

/// A mutable matrix view: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Debug)]
pub struct MatMut<'a, T> {
    data: &'a mut [T],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a, T> MatMut<'a, T> {
    /// A (rows, cols) view with row stride `rs` and column stride `cs`, in elements.
    pub fn new(data: &'a mut [T], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        MatMut { data, rows, cols, rs, cs }
    }
    pub fn row_major(data: &'a mut [T], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols, 1)
    }
    pub fn col_major(data: &'a mut [T], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, 1, rows)
    }
    /// The transpose (no copy).
    pub fn t(self) -> Self {
        Self::new(self.data, self.cols, self.rows, self.cs, self.rs)
    }
}

/// Checks that every element of a (rows, cols, rs, cs) view lies in `len`, and that
/// the strides fit `isize`.
fn check_view(len: usize, rows: usize, cols: usize, rs: usize, cs: usize, op: Operand) -> Result<(), Error> {
    let err = Error::OutOfBounds(op);
    if rs > isize::MAX as usize || cs > isize::MAX as usize {
        return Err(err);
    }
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let last = (rows - 1)
        .checked_mul(rs)
        .and_then(|r| (cols - 1).checked_mul(cs).and_then(|c| r.checked_add(c)))
        .ok_or(err)?;
    if last < len && last <= isize::MAX as usize {
        Ok(())
    } else {
        Err(err)
    }
}

/// Whether distinct elements of a (rows, cols, rs, cs) view are distinct memory:
/// sorted by stride, each stride must exceed the span of the smaller dimension.
fn no_self_alias(rows: usize, cols: usize, rs: usize, cs: usize) -> bool {
    let (mut d1, mut s1, mut d2, mut s2) = (rows, rs, cols, cs);
    if s1 > s2 {
        core::mem::swap(&mut d1, &mut d2);
        core::mem::swap(&mut s1, &mut s2);
    }
    // Dimensions of size 1 never step.
    if d1 <= 1 {
        return d2 <= 1 || s2 > 0;
    }
    if d2 <= 1 {
        return s1 > 0;
    }
    s1 > 0 && (d1 - 1).checked_mul(s1).is_some_and(|span| s2 > span)
}

/// Validates shapes and bounds and builds the task.
fn checked_task<TA: Elem, TB: Elem, TC: Elem>(
    alpha: f32,
    a: &MatRef<'_, TA>,
    b: &MatRef<'_, TB>,
    beta: f32,
    c: &mut MatMut<'_, TC>,
) -> Result<Task<TA, TB, TC>, Error> {
    if a.rows != c.rows || b.cols != c.cols || a.cols != b.rows {
        return Err(Error::ShapeMismatch { a: (a.rows, a.cols), b: (b.rows, b.cols), c: (c.rows, c.cols) });
    }
    check_view(a.data.len(), a.rows, a.cols, a.rs, a.cs, Operand::A)?;
    check_view(b.data.len(), b.rows, b.cols, b.rs, b.cs, Operand::B)?;
    check_view(c.data.len(), c.rows, c.cols, c.rs, c.cs, Operand::C)?;
    if !no_self_alias(c.rows, c.cols, c.rs, c.cs) {
        return Err(Error::AliasingOutput);
    }
    Ok(Task {
        m: c.rows,
        n: c.cols,
        k: a.cols,
        alpha,
        a: a.data.as_ptr(),
        rsa: a.rs as isize,
        csa: a.cs as isize,
        b: b.data.as_ptr(),
        rsb: b.rs as isize,
        csb: b.cs as isize,
        beta,
        c: c.data.as_mut_ptr(),
        rsc: c.rs as isize,
        csc: c.cs as isize,
    })
}

/// Safe GEMM `C = alpha * A * B + beta * C` on `threads` threads, any element types
/// (f32, bf16, f16; 16-bit inputs accumulate in f32, 16-bit C is rounded once).
/// Shapes, bounds and C's strides are checked.
#[cfg(feature = "std")]
pub fn gemm<TA: Elem, TB: Elem, TC: Elem>(
    kernel: Kernel,
    threads: usize,
    alpha: f32,
    a: MatRef<'_, TA>,
    b: MatRef<'_, TB>,
    beta: f32,
    mut c: MatMut<'_, TC>,
) -> Result<(), Error> {
    let t = checked_task(alpha, &a, &b, beta, &mut c)?;
    // SAFETY: checked_task verified every element in bounds and C free of self
    // aliasing; `&mut` C cannot overlap the shared A and B.
    unsafe { run(kernel, threads, &t) };
    Ok(())
}

/// [`gemm`] single-threaded in caller scratch of [`gemm_scratch_len`] bytes (no
/// allocation; works without `std`).
pub fn gemm_in<TA: Elem, TB: Elem, TC: Elem>(
    kernel: Kernel,
    scratch: &mut [u8],
    alpha: f32,
    a: MatRef<'_, TA>,
    b: MatRef<'_, TB>,
    beta: f32,
    mut c: MatMut<'_, TC>,
) -> Result<(), Error> {
    let t = checked_task(alpha, &a, &b, beta, &mut c)?;
    // SAFETY: as in `gemm`.
    unsafe { run_in(kernel, scratch, &t) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_check() {
        assert!(no_self_alias(3, 4, 4, 1));
        assert!(no_self_alias(3, 4, 1, 3));
        assert!(!no_self_alias(3, 4, 3, 1));
        assert!(!no_self_alias(3, 4, 0, 1));
        assert!(no_self_alias(1, 4, 0, 1));
        assert!(no_self_alias(1, 1, 0, 0));
        assert!(!no_self_alias(1, 2, 0, 0));
    }

    #[test]
    fn bounds_check() {
        assert!(check_view(12, 3, 4, 4, 1, Operand::A).is_ok());
        assert!(check_view(11, 3, 4, 4, 1, Operand::A).is_err());
        assert!(check_view(0, 0, 4, 4, 1, Operand::A).is_ok());
        assert!(check_view(10, 2, 2, usize::MAX / 2, 1, Operand::A).is_err());
    }
}
