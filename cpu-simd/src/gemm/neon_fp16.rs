//! AArch64 FEAT_FHM kernel: f16 x f16 through FMLAL / FMLAL2 (by element), 8x12 f32 register tile.
//!
//! Panels stay f16 (half the bytes of the widened panels): A `dst[p * 8 + i]`, B `dst[p * 12 + j]`, f16 bits.
//! Per k step one q register of A (8 rows, picked by lane) and 12 columns of B: `vfmlalq_laneq_low_f16`
//! (`FMLAL Vd.4S, Vn.4H, Vm.H[l]`) multiplies B's columns 0..4 by A row l, `_high_` (`FMLAL2`) columns 4..8,
//! and a second `_low_` columns 8..12, adding the f32 products to the same 8x12 accumulators as the f32
//! NEON kernel. An f16 x f16 product is exact in f32 (22-bit significand, exponent within f32's normal
//! range) and FMLAL rounds the sum once, so each step is `f32::mul_add` of the widened inputs: results are
//! bit-identical to [`super::neon::Neon`] on the same f16 data, and f16 subnormals count (FPCR.FZ16 is off).
//! Other input types use the f32 NEON kernel.

use core::arch::aarch64::*;

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

/// The 8x12 accumulators over `kp` k steps. A function of its own so that the FHM intrinsics inline into
/// code compiled with their features; it inlines in turn into `run_fmlal`.
///
/// # Safety
/// Panels hold `kp * 8` (A) and `kp * 12` (B) u16; the CPU supports FEAT_FP16 and FEAT_FHM.
#[target_feature(enable = "neon,fp16,fhm")]
#[inline]
unsafe fn fmlal_8x12(kp: usize, a: *const u16, b: *const u16) -> Acc {
    // SAFETY: the loads read exactly the panels (B's last 4 columns with a 64-bit load); features enabled.
    unsafe {
        let mut acc: Acc = [[vdupq_n_f32(0.0); 3]; MR];
        for p in 0..kp {
            let bp = b.add(p * NR);
            let b01 = vreinterpretq_f16_u16(vld1q_u16(bp));
            let b2h = vld1_u16(bp.add(8));
            let b2 = vreinterpretq_f16_u16(vcombine_u16(b2h, b2h));
            let av = vreinterpretq_f16_u16(vld1q_u16(a.add(p * MR)));
            macro_rules! row {
                ($i:literal) => {
                    acc[$i][0] = vfmlalq_laneq_low_f16::<$i>(acc[$i][0], b01, av);
                    acc[$i][1] = vfmlalq_laneq_high_f16::<$i>(acc[$i][1], b01, av);
                    acc[$i][2] = vfmlalq_laneq_low_f16::<$i>(acc[$i][2], b2, av);
                };
            }
            row!(0);
            row!(1);
            row!(2);
            row!(3);
            row!(4);
            row!(5);
            row!(6);
            row!(7);
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
