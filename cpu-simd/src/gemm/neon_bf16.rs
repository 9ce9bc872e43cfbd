//! AArch64 FEAT_BF16 kernel: bf16 x bf16 through BFMLALB / BFMLALT (by element), 8x12 f32 register tile.
//!
//! Packing interleaves pairs of consecutive k (`pack::pack_bf16_pairs`, as for x86 `vdpbf16ps`): one 32-bit
//! lane of B holds `(B[2p, j], B[2p+1, j])`, so a q register holds 4 columns x 2 k, and A's q registers hold 4
//! rows x 2 k. `BFMLALB Vd.4S, Vn.8H, Vm.H[2i]` adds the even (k = 2p) halves of B times `A[i, 2p]` to the
//! f32 accumulators, `BFMLALT ... Vm.H[2i + 1]` the odd ones times `A[i, 2p + 1]`.
//!
//! Why BFMLALB/T and not BFDOT or BFMMLA (2x and 4x the products per instruction): BFDOT and BFMMLA round
//! to odd and flush subnormals (without FEAT_EBF16), so they drift from the IEEE f32 reference. BFMLALB/T
//! are IEEE fused multiply-adds (a bf16 x bf16 product is exact in f32; one rounding per step, subnormals
//! kept with FPCR.FZ off): each step is `f32::mul_add` of the widened inputs in k order, so results are
//! bit-identical to [`super::neon::Neon`] on the same bf16 data, with half the packed bytes.
//!
//! There are no BF16 intrinsics in Rust 1.95: the inner loop is `asm!` inside `#[target_feature(enable =
//! "bf16")]`. The by-element forms take Vm from v0..v15 (`vreg_low16`). f16 x f16 uses the FHM kernel
//! (this family requires FEAT_FHM as well) and everything else the f32 NEON kernel.

use core::arch::aarch64::*;
use core::arch::asm;

use super::driver::gemm_blocked;
use super::neon::{run_neon, store_acc, Acc, NeonF32, MR, NR};
use super::neon_fp16::{run_fmlal, Fmlal};
use super::pack::pack_bf16_pairs;
use super::{is_bf16, is_f16, scratch_of, tile_of, Elem, GemmKernel, Micro, Task};

/// The FEAT_BF16 kernel family (+ FHM for f16, NEON f32 otherwise).
pub(crate) struct NeonBf16;

/// 8x12 bf16-pair micro-kernel.
pub(crate) struct Bfmlal;

/// 4 rows (A lanes `2r`, `2r + 1` of `$a` for row r) x 12 columns (`$b0..$b2`) for one k pair: 12 BFMLALB
/// then 12 BFMLALT, so that consecutive instructions never depend on each other.
macro_rules! bfmlal_4x12 {
    ($acc:ident, $r:literal, $a:ident, $b0:ident, $b1:ident, $b2:ident) => {
        asm!(
            "bfmlalb {c00:v}.4s, {b0:v}.8h, {a:v}.h[0]",
            "bfmlalb {c01:v}.4s, {b1:v}.8h, {a:v}.h[0]",
            "bfmlalb {c02:v}.4s, {b2:v}.8h, {a:v}.h[0]",
            "bfmlalb {c10:v}.4s, {b0:v}.8h, {a:v}.h[2]",
            "bfmlalb {c11:v}.4s, {b1:v}.8h, {a:v}.h[2]",
            "bfmlalb {c12:v}.4s, {b2:v}.8h, {a:v}.h[2]",
            "bfmlalb {c20:v}.4s, {b0:v}.8h, {a:v}.h[4]",
            "bfmlalb {c21:v}.4s, {b1:v}.8h, {a:v}.h[4]",
            "bfmlalb {c22:v}.4s, {b2:v}.8h, {a:v}.h[4]",
            "bfmlalb {c30:v}.4s, {b0:v}.8h, {a:v}.h[6]",
            "bfmlalb {c31:v}.4s, {b1:v}.8h, {a:v}.h[6]",
            "bfmlalb {c32:v}.4s, {b2:v}.8h, {a:v}.h[6]",
            "bfmlalt {c00:v}.4s, {b0:v}.8h, {a:v}.h[1]",
            "bfmlalt {c01:v}.4s, {b1:v}.8h, {a:v}.h[1]",
            "bfmlalt {c02:v}.4s, {b2:v}.8h, {a:v}.h[1]",
            "bfmlalt {c10:v}.4s, {b0:v}.8h, {a:v}.h[3]",
            "bfmlalt {c11:v}.4s, {b1:v}.8h, {a:v}.h[3]",
            "bfmlalt {c12:v}.4s, {b2:v}.8h, {a:v}.h[3]",
            "bfmlalt {c20:v}.4s, {b0:v}.8h, {a:v}.h[5]",
            "bfmlalt {c21:v}.4s, {b1:v}.8h, {a:v}.h[5]",
            "bfmlalt {c22:v}.4s, {b2:v}.8h, {a:v}.h[5]",
            "bfmlalt {c30:v}.4s, {b0:v}.8h, {a:v}.h[7]",
            "bfmlalt {c31:v}.4s, {b1:v}.8h, {a:v}.h[7]",
            "bfmlalt {c32:v}.4s, {b2:v}.8h, {a:v}.h[7]",
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
            b0 = in(vreg) $b0,
            b1 = in(vreg) $b1,
            b2 = in(vreg) $b2,
            a = in(vreg_low16) $a,
            options(pure, nomem, nostack, preserves_flags),
        )
    };
}

impl Micro for Bfmlal {
    /// bf16 bits.
    type P = u16;
    const MR: usize = MR;
    const NR: usize = NR;
    const KU: usize = 2;
    // The f32 kernel's blocks, so that C sees the same partial sums in the same order: results are
    // bit-identical to it (tests/gemm.rs checks). B micro-panel 256 x 12 x 2 B = 6 KiB, A block 64 KiB.
    const KC: usize = NeonF32::KC;
    const MC: usize = NeonF32::MC;
    const NC: usize = NeonF32::NC;

    #[inline(always)]
    unsafe fn pack_a<T: Elem>(kc: usize, valid: usize, a: *const T, rs: isize, ks: isize, dst: *mut u16) {
        // SAFETY: forwarded contract.
        unsafe { pack_bf16_pairs::<T, MR>(kc, valid, a, rs, ks, dst) }
    }

    #[inline(always)]
    unsafe fn pack_b<T: Elem>(kc: usize, valid: usize, b: *const T, rs: isize, ks: isize, dst: *mut u16) {
        // SAFETY: forwarded contract.
        unsafe { pack_bf16_pairs::<T, NR>(kc, valid, b, rs, ks, dst) }
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
        // SAFETY: panels hold kp * 2 * 8 and kp * 2 * 12 u16 (caller), exactly what is loaded; BF16 is
        // enabled by the caller's #[target_feature] context (the asm needs it), and the asm only reads and
        // writes the registers it names.
        unsafe {
            let mut acc: Acc = [[vdupq_n_f32(0.0); 3]; MR];
            for p in 0..kp {
                let bp = b.add(p * 2 * NR);
                let (b0, b1, b2) = (vld1q_u16(bp), vld1q_u16(bp.add(8)), vld1q_u16(bp.add(16)));
                let ap = a.add(p * 2 * MR);
                let (a0, a1) = (vld1q_u16(ap), vld1q_u16(ap.add(8)));
                bfmlal_4x12!(acc, 0, a0, b0, b1, b2);
                bfmlal_4x12!(acc, 4, a1, b0, b1, b2);
            }
            store_acc(&acc, alpha, beta, c, rsc, csc);
        }
    }
}

/// The blocked driver with the BFMLALB/T micro-kernel.
///
/// # Safety
/// As `gemm_blocked`; the CPU supports FEAT_BF16.
#[target_feature(enable = "neon,bf16")]
unsafe fn run_bfmlal<TA: Elem, TB: Elem, TC: Elem>(t: &Task<TA, TB, TC>, scratch: *mut u8) {
    // SAFETY: forwarded contract; this function enables the kernel's features.
    unsafe { gemm_blocked::<Bfmlal, TA, TB, TC>(t, scratch) }
}

impl GemmKernel for NeonBf16 {
    fn tile<TA: Elem, TB: Elem>() -> (usize, usize) {
        if is_bf16::<TA>() && is_bf16::<TB>() {
            tile_of::<Bfmlal>()
        } else if is_f16::<TA>() && is_f16::<TB>() {
            tile_of::<Fmlal>()
        } else {
            tile_of::<NeonF32>()
        }
    }
    fn scratch_len<TA: Elem, TB: Elem, TC: Elem>(m: usize, n: usize, k: usize) -> usize {
        if is_bf16::<TA>() && is_bf16::<TB>() {
            scratch_of::<Bfmlal, TC>(m, n, k)
        } else if is_f16::<TA>() && is_f16::<TB>() {
            scratch_of::<Fmlal, TC>(m, n, k)
        } else {
            scratch_of::<NeonF32, TC>(m, n, k)
        }
    }
    unsafe fn run<TA: Elem, TB: Elem, TC: Elem>(t: &Task<TA, TB, TC>, scratch: *mut u8) {
        // SAFETY: the caller holds a `Kernel` for NeonBf16, which requires BF16, FP16 and FHM; scratch sized
        // by `scratch_len` above for the same types.
        unsafe {
            if is_bf16::<TA>() && is_bf16::<TB>() {
                run_bfmlal(t, scratch)
            } else if is_f16::<TA>() && is_f16::<TB>() {
                run_fmlal(t, scratch)
            } else {
                run_neon(t, scratch)
            }
        }
    }
}
