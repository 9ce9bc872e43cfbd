//! AArch64 FEAT_FHM kernel: f16 x f16 through FMLAL / FMLAL2 (by element), 8x12 f32 register tile.
//!
//! Panels stay f16 (half the bytes of the widened panels): A `dst[p * 8 + i]`, B `dst[p * 12 + j]`, f16 bits.
//! Per k step one q register of A (8 rows, picked by lane) and 12 columns of B: `FMLAL Vd.4S, Vn.4H, Vm.H[l]`
//! multiplies B's columns 0..4 by A row l, `FMLAL2` (high half of Vn) columns 4..8, a second `FMLAL` columns
//! 8..12, adding the f32 products to the same 8x12 accumulators as the f32 NEON kernel. An f16 x f16 product
//! is exact in f32 (22-bit significand, exponent within f32's normal range) and FMLAL rounds the sum once, so
//! each step is `f32::mul_add` of the widened inputs: results are bit-identical to [`super::neon::Neon`] on
//! the same f16 data, and f16 subnormals count (FPCR.FZ16 is off).
//!
//! `asm!` rather than `vfmlalq_laneq_low_f16` and friends: the f16 vector types and intrinsics are stable
//! only since Rust 1.94, above this crate's MSRV (1.89); the by-element forms take Vm from v0..v15.
//! Other input types use the f32 NEON kernel.

use core::arch::aarch64::*;
use core::arch::asm;

use super::driver::gemm_blocked;
use super::neon::{run_neon, store_acc, Acc, NeonF32, MR, NR};
use super::{is_f16, scratch_of, tile_of, Elem, ElemKind, GemmKernel, Micro, Task};

/// The FEAT_FHM kernel family (NEON f32 for non-f16 inputs).
pub(crate) struct NeonFhm;

/// 8x12 f16-input micro-kernel.
pub(crate) struct Fmlal;

/// f16 bits of one source element: f16 as is, anything else rounded to nearest even.
///
/// # Safety
/// `p` is readable.
#[inline(always)]
unsafe fn load_f16_bits<T: Elem>(p: *const T) -> u16 {
    if matches!(T::KIND, ElemKind::F16) {
        // SAFETY: T is f16, a 16-bit value; p is readable (caller).
        unsafe { *(p as *const u16) }
    } else {
        // SAFETY: p is readable (caller).
        half::f16::from_f32(unsafe { *p }.to_f32()).to_bits()
    }
}

/// Packs one f16 panel: `dst[p * R + i] = src[i * rs + p * ks]` as f16 bits, rows `valid..R` zero.
///
/// # Safety
/// `src[i * rs + p * ks]` is readable for `i < valid <= R`, `p < kc`; `dst` is writable for `kc * R` u16.
#[inline(always)]
pub(crate) unsafe fn pack_f16_bits<T: Elem, const R: usize>(
    kc: usize,
    valid: usize,
    src: *const T,
    rs: isize,
    ks: isize,
    dst: *mut u16,
) {
    debug_assert!(valid <= R);
    for p in 0..kc {
        for i in 0..R {
            // SAFETY: element (i, p) is readable for i < valid (caller); p * R + i < kc * R.
            unsafe {
                let v = if i < valid { load_f16_bits(src.offset(i as isize * rs + p as isize * ks)) } else { 0 };
                *dst.add(p * R + i) = v;
            }
        }
    }
}

impl Micro for Fmlal {
    /// f16 bits.
    type P = u16;
    const MR: usize = MR;
    const NR: usize = NR;
    const KU: usize = 1;
    // The f32 kernel's blocks, so that C sees the same partial sums in the same order: results are
    // bit-identical to it (tests/gemm.rs checks). B micro-panel 256 x 12 x 2 B = 6 KiB, A block 64 KiB.
    const KC: usize = NeonF32::KC;
    const MC: usize = NeonF32::MC;
    const NC: usize = NeonF32::NC;

    #[inline(always)]
    unsafe fn pack_a<T: Elem>(kc: usize, valid: usize, a: *const T, rs: isize, ks: isize, dst: *mut u16) {
        // SAFETY: forwarded contract.
        unsafe { pack_f16_bits::<T, MR>(kc, valid, a, rs, ks, dst) }
    }

    #[inline(always)]
    unsafe fn pack_b<T: Elem>(kc: usize, valid: usize, b: *const T, rs: isize, ks: isize, dst: *mut u16) {
        // SAFETY: forwarded contract.
        unsafe { pack_f16_bits::<T, NR>(kc, valid, b, rs, ks, dst) }
    }

    #[inline(always)]
    unsafe fn kernel(
        kp: usize,
        alpha: f32,
        a: *const u16,
        b: *const u16,
        beta: f32,
        c: *mut f32,
        rsc: isize,
        csc: isize,
    ) {
        // SAFETY: forwarded contract; the caller's #[target_feature] context (`run_fmlal`) has FP16 and FHM.
        unsafe {
            let acc = fmlal_8x12(kp, a, b);
            store_acc(&acc, alpha, beta, c, rsc, csc);
        }
    }
}

/// 4 rows (A lanes `$l0..$l3` of `$a`) x 12 columns for one k step: FMLAL takes B columns 0..4 from the low
/// half of `$b01`, FMLAL2 columns 4..8 from its high half, FMLAL columns 8..12 from `$b2` (64 bits).
macro_rules! fmlal_4x12 {
    ($acc:ident, $r:literal, $a:ident, $b01:ident, $b2:ident) => {
        asm!(
            "fmlal  {c00:v}.4s, {b01:v}.4h, {a:v}.h[{l0}]",
            "fmlal2 {c01:v}.4s, {b01:v}.4h, {a:v}.h[{l0}]",
            "fmlal  {c02:v}.4s, {b2:v}.4h, {a:v}.h[{l0}]",
            "fmlal  {c10:v}.4s, {b01:v}.4h, {a:v}.h[{l1}]",
            "fmlal2 {c11:v}.4s, {b01:v}.4h, {a:v}.h[{l1}]",
            "fmlal  {c12:v}.4s, {b2:v}.4h, {a:v}.h[{l1}]",
            "fmlal  {c20:v}.4s, {b01:v}.4h, {a:v}.h[{l2}]",
            "fmlal2 {c21:v}.4s, {b01:v}.4h, {a:v}.h[{l2}]",
            "fmlal  {c22:v}.4s, {b2:v}.4h, {a:v}.h[{l2}]",
            "fmlal  {c30:v}.4s, {b01:v}.4h, {a:v}.h[{l3}]",
            "fmlal2 {c31:v}.4s, {b01:v}.4h, {a:v}.h[{l3}]",
            "fmlal  {c32:v}.4s, {b2:v}.4h, {a:v}.h[{l3}]",
            c00 = inout(vreg) $acc[$r][0],
            c01 = inout(vreg) $acc[$r][1],
            c02 = inout(vreg) $acc[$r][2],
            c10 = inout(vreg) $acc[$r + 1][0],
            c11 = inout(vreg) $acc[$r + 1][1],
            c12 = inout(vreg) $acc[$r + 1][2],
            c20 = inout(vreg) $acc[$r + 2][0],
            c21 = inout(vreg) $acc[$r + 2][1],
            c22 = inout(vreg) $acc[$r + 2][2],
            c30 = inout(vreg) $acc[$r + 3][0],
            c31 = inout(vreg) $acc[$r + 3][1],
            c32 = inout(vreg) $acc[$r + 3][2],
            b01 = in(vreg) $b01,
            b2 = in(vreg) $b2,
            a = in(vreg_low16) $a,
            l0 = const $r,
            l1 = const $r + 1,
            l2 = const $r + 2,
            l3 = const $r + 3,
            options(pure, nomem, nostack, preserves_flags),
        )
    };
}

/// The 8x12 accumulators over `kp` k steps.
///
/// # Safety
/// Panels hold `kp * 8` (A) and `kp * 12` (B) u16; the CPU supports FEAT_FP16 and FEAT_FHM (the caller's
/// #[target_feature] context enables them for the asm).
#[inline(always)]
unsafe fn fmlal_8x12(kp: usize, a: *const u16, b: *const u16) -> Acc {
    // SAFETY: the loads read exactly the panels (B's last 4 columns with a 64-bit load); the asm only reads
    // and writes the registers it names.
    unsafe {
        let mut acc: Acc = [[vdupq_n_f32(0.0); 3]; MR];
        for p in 0..kp {
            let bp = b.add(p * NR);
            let (b01, b2) = (vld1q_u16(bp), vld1_u16(bp.add(8)));
            let av = vld1q_u16(a.add(p * MR));
            fmlal_4x12!(acc, 0, av, b01, b2);
            fmlal_4x12!(acc, 4, av, b01, b2);
        }
        acc
    }
}

/// The blocked driver with the FMLAL micro-kernel.
///
/// # Safety
/// As `gemm_blocked`; the CPU supports FEAT_FP16 and FEAT_FHM.
#[target_feature(enable = "neon,fp16,fhm")]
pub(crate) unsafe fn run_fmlal<TA: Elem, TB: Elem, TC: Elem>(t: &Task<TA, TB, TC>, scratch: *mut u8) {
    // SAFETY: forwarded contract; this function enables the kernel's features.
    unsafe { gemm_blocked::<Fmlal, TA, TB, TC>(t, scratch) }
}

impl GemmKernel for NeonFhm {
    fn tile<TA: Elem, TB: Elem>() -> (usize, usize) {
        if is_f16::<TA>() && is_f16::<TB>() {
            tile_of::<Fmlal>()
        } else {
            tile_of::<NeonF32>()
        }
    }
    fn scratch_len<TA: Elem, TB: Elem, TC: Elem>(m: usize, n: usize, k: usize) -> usize {
        if is_f16::<TA>() && is_f16::<TB>() {
            scratch_of::<Fmlal, TC>(m, n, k)
        } else {
            scratch_of::<NeonF32, TC>(m, n, k)
        }
    }
    unsafe fn run<TA: Elem, TB: Elem, TC: Elem>(t: &Task<TA, TB, TC>, scratch: *mut u8) {
        // SAFETY: the caller holds a `Kernel` for NeonFhm, so FP16 and FHM exist; scratch sized by
        // `scratch_len` above for the same types.
        unsafe {
            if is_f16::<TA>() && is_f16::<TB>() {
                run_fmlal(t, scratch)
            } else {
                run_neon(t, scratch)
            }
        }
    }
}
