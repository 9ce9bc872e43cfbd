//! AArch64 NEON kernel: 8x12 f32 register tile. 24 accumulators (8 rows x 3 q registers of 4 columns),
//! 3 registers of B, 2 of A (rows 0..4 and 4..8), each FMA `vfmaq_laneq_f32` (`FMLA Vd.4S, Vn.4S, Vm.S[l]`)
//! with one A element picked by lane: 29 of the 32 vector registers. Also serves bf16/f16 inputs, widened
//! exactly to f32 while packing. NEON is part of the AArch64 base ISA, so this kernel is always available.

use core::arch::aarch64::*;

use super::driver::{gemm_blocked, store_tile_strided};
use super::pack::pack_f32;
use super::{scratch_of, tile_of, Elem, GemmKernel, Micro, Task};

/// The NEON f32 kernel family.
pub(crate) struct Neon;

/// 8x12 f32 micro-kernel.
pub(crate) struct NeonF32;

pub(crate) const MR: usize = 8;
pub(crate) const NR: usize = 12;

/// 8 rows x 3 vectors of 4 columns: `acc[i][v]` is C row i, columns `4v..4v + 4`.
pub(crate) type Acc = [[float32x4_t; 3]; MR];

impl Micro for NeonF32 {
    type P = f32;
    const MR: usize = MR;
    const NR: usize = NR;
    const KU: usize = 1;
    // B micro-panel: 256 x 12 x 4 B = 12 KiB (L1d: 64 KiB on Neoverse N1/V1/N2); A block 128 x 256 x 4 B =
    // 128 KiB (L2: 512 KiB-2 MiB); B block 1020 x 256 x 4 B ~ 1 MiB (L2/L3).
    const KC: usize = 256;
    const MC: usize = MR * 16;
    const NC: usize = NR * 85;

    #[inline(always)]
    unsafe fn pack_a<T: Elem>(kc: usize, valid: usize, a: *const T, rs: isize, ks: isize, dst: *mut f32) {
        // SAFETY: forwarded contract; F16C is an x86 flag, off here.
        unsafe { pack_f32::<T, MR, false>(kc, valid, a, rs, ks, dst) }
    }

    #[inline(always)]
    unsafe fn pack_b<T: Elem>(kc: usize, valid: usize, b: *const T, rs: isize, ks: isize, dst: *mut f32) {
        // SAFETY: forwarded contract.
        unsafe { pack_f32::<T, NR, false>(kc, valid, b, rs, ks, dst) }
    }

    #[inline(always)]
    unsafe fn kernel(
        kp: usize,
        alpha: f32,
        a: *const f32,
        b: *const f32,
        beta: f32,
        c: *mut f32,
        rsc: isize,
        csc: isize,
    ) {
        // SAFETY: panels hold kp * 8 and kp * 12 f32 (caller); NEON is baseline on AArch64.
        unsafe {
            let mut acc: Acc = [[vdupq_n_f32(0.0); 3]; MR];
            for p in 0..kp {
                let bp = b.add(p * NR);
                let bv = [vld1q_f32(bp), vld1q_f32(bp.add(4)), vld1q_f32(bp.add(8))];
                let a0 = vld1q_f32(a.add(p * MR));
                let a1 = vld1q_f32(a.add(p * MR + 4));
                // The lane must be a constant: one expansion per row.
                macro_rules! row {
                    ($i:literal, $av:ident, $l:literal) => {
                        for v in 0..3 {
                            acc[$i][v] = vfmaq_laneq_f32::<$l>(acc[$i][v], bv[v], $av);
                        }
                    };
                }
                row!(0, a0, 0);
                row!(1, a0, 1);
                row!(2, a0, 2);
                row!(3, a0, 3);
                row!(4, a1, 0);
                row!(5, a1, 1);
                row!(6, a1, 2);
                row!(7, a1, 3);
            }
            store_acc(&acc, alpha, beta, c, rsc, csc);
        }
    }
}

/// Writes an 8x12 accumulator tile to C: `C = alpha * acc + beta * C`, C not read when beta == 0.
/// Shared by the f16 (FMLAL) and bf16 (BFMLALB/T) kernels, whose accumulators have the same layout.
///
/// # Safety
/// The 8x12 tile of C (`c[i * rsc + j * csc]`) is writable, and readable when beta != 0.
#[inline(always)]
pub(crate) unsafe fn store_acc(acc: &Acc, alpha: f32, beta: f32, c: *mut f32, rsc: isize, csc: isize) {
    // SAFETY: the tile of C is accessible (caller); NEON is baseline.
    unsafe {
        if csc == 1 {
            for (i, row) in acc.iter().enumerate() {
                let cr = c.offset(i as isize * rsc);
                for (v, &x) in row.iter().enumerate() {
                    let mut y = vmulq_n_f32(x, alpha);
                    if beta != 0.0 {
                        // alpha * acc + beta * C, rounded twice as in the scalar kernel's store.
                        y = vaddq_f32(y, vmulq_n_f32(vld1q_f32(cr.add(4 * v)), beta));
                    }
                    vst1q_f32(cr.add(4 * v), y);
                }
            }
        } else {
            let mut tile = [0.0f32; MR * NR];
            for (i, row) in acc.iter().enumerate() {
                for (v, &x) in row.iter().enumerate() {
                    vst1q_f32(tile.as_mut_ptr().add(i * NR + 4 * v), x);
                }
            }
            store_tile_strided(MR, NR, &tile, alpha, beta, c, rsc, csc);
        }
    }
}

/// The blocked driver with the 8x12 f32 micro-kernel.
///
/// # Safety
/// As `gemm_blocked` (NEON needs no check on AArch64).
#[target_feature(enable = "neon")]
pub(crate) unsafe fn run_neon<TA: Elem, TB: Elem, TC: Elem>(t: &Task<TA, TB, TC>, scratch: *mut u8) {
    // SAFETY: forwarded contract.
    unsafe { gemm_blocked::<NeonF32, TA, TB, TC>(t, scratch) }
}

impl GemmKernel for Neon {
    fn tile<TA: Elem, TB: Elem>() -> (usize, usize) {
        tile_of::<NeonF32>()
    }
    fn scratch_len<TA: Elem, TB: Elem, TC: Elem>(m: usize, n: usize, k: usize) -> usize {
        scratch_of::<NeonF32, TC>(m, n, k)
    }
    unsafe fn run<TA: Elem, TB: Elem, TC: Elem>(t: &Task<TA, TB, TC>, scratch: *mut u8) {
        // SAFETY: forwarded contract; NEON is baseline on AArch64.
        unsafe { run_neon(t, scratch) }
    }
}
