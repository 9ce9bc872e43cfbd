//! AMX-BF16 kernel: bf16 x bf16 through `tdpbf16ps` on the tile unit, 32x32 f32 register tile held in four
//! 16x16 f32 tiles (`tmm0..tmm3`). Other input types use the AVX-512F f32 kernel.
//!
//! Tiles (palette 1, all eight configured 16 rows x 64 bytes):
//! - `tmm0 tmm1 / tmm2 tmm3`: C rows 0..16 / 16..32, columns 0..16 and 16..32 (f32).
//! - `tmm4`, `tmm5`: A rows 0..16 and 16..32, 32 k each (bf16, row-major).
//! - `tmm6`, `tmm7`: B columns 0..16 and 16..32, 32 k each in VNNI layout: tile row r holds
//!   `(B[2r, j], B[2r + 1, j])` for its 16 columns.
//!
//! One k step (32 k) is 4 tile loads and 4 `tdpbf16ps` (4 x 16 x 16 x 32 multiply-adds). Packed layouts
//! (`pack::pack_amx_a`, `pack::pack_amx_b`), per 32-k step: A is 32 rows x 64 bytes (tiles at +0 and
//! +1 KiB, stride 64 B); B is 16 pair rows x 128 bytes (tiles at +0 and +64 B, stride 128 B).
//!
//! Numerics (Intel SDM, TDPBF16PS): each pair of products is accumulated into the f32 lane with round to
//! nearest even; input subnormals are treated as zero and subnormal results are flushed to zero (DAZ/FTZ,
//! independent of MXCSR). Magnitudes below 2^-126 (~1.2e-38) are therefore lost, as with `vdpbf16ps`.
//!
//! Tile state is per thread: [`run_amx`] loads the configuration (`ldtilecfg`) before the driver and
//! releases it (`tilerelease`) after, so every thread of a split GEMM configures its own tiles and leaves
//! no tile state for the OS to save.

use core::arch::asm;
use core::arch::x86_64::*;

use super::avx512::{run_avx512, Avx512F32};
use super::driver::{gemm_blocked, store_tile_strided};
use super::pack::{pack_amx_a, pack_amx_b};
use super::{is_bf16, scratch_of, tile_of, Elem, GemmKernel, Micro, Task};

/// The AMX kernel family.
pub(crate) struct Amx;

/// 32x32 bf16 tile micro-kernel.
pub(crate) struct AmxBf16;

const MR: usize = 32;
const NR: usize = 32;
/// k per tile step: one 64-byte tile row of bf16.
const KT: usize = 32;
/// u16 per packed step of an A or B panel (32 x 32 bf16, 2 KiB).
const STEP: usize = MR * KT;

/// `ldtilecfg` operand, palette 1: bytes 16.. hold each tile's bytes per row (u16), bytes 48.. its rows.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    const fn new() -> TileConfig {
        let mut b = [0u8; 64];
        b[0] = 1;
        let mut t = 0;
        while t < 8 {
            b[16 + 2 * t] = 64;
            b[48 + t] = 16;
            t += 1;
        }
        TileConfig(b)
    }
}

static CONFIG: TileConfig = TileConfig::new();

/// 32x32 f32 C tile staged for alpha/beta (row stride 128 bytes, as the tiles store it).
#[repr(C, align(64))]
struct CBuf([f32; MR * NR]);

impl Micro for AmxBf16 {
    /// bf16 bits.
    type P = u16;
    const MR: usize = MR;
    const NR: usize = NR;
    const KU: usize = KT;
    // Measured on a 2-core Sapphire Rapids-class Xeon (1024^3, 1 thread): KC 1024 / MC 256 / NC 1024 gave
    // ~1000 GFLOP/s against ~900 for KC 512 (C makes one round trip per KC block, and each tile store
    // drains the tdpbf16ps pipeline) and ~950 for NC 512 (A packed once per NC block). Micro-panels are
    // 64 KiB each (L2), the A block 512 KiB (L2 2 MiB), the B block 2 MiB (L3).
    const KC: usize = 1024;
    const MC: usize = 256;
    const NC: usize = 1024;

    #[inline(always)]
    unsafe fn pack_a<T: Elem>(kc: usize, valid: usize, a: *const T, rs: isize, ks: isize, dst: *mut u16) {
        // SAFETY: forwarded contract (kc.next_multiple_of(32) * MR u16 in dst).
        unsafe { pack_amx_a::<T, MR>(kc, valid, a, rs, ks, dst) }
    }

    #[inline(always)]
    unsafe fn pack_b<T: Elem>(kc: usize, valid: usize, b: *const T, rs: isize, ks: isize, dst: *mut u16) {
        // SAFETY: forwarded contract (kc.next_multiple_of(32) * NR u16 in dst).
        unsafe { pack_amx_b::<T, NR>(kc, valid, b, rs, ks, dst) }
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
        // C goes straight between tiles and memory when nothing scales it: the blocked driver's common case
        // (first k block beta = 0, later ones beta = 1; the 16-bit path's f32 accumulator).
        let direct = csc == 1 && alpha == 1.0 && (beta == 0.0 || beta == 1.0);
        // SAFETY: the caller configured the tiles (`run_amx`) and the CPU has AMX-BF16 (a `Kernel` exists);
        // panels hold kp steps of STEP u16 each; the 32x32 tile of C is writable (and readable when
        // beta != 0).
        unsafe {
            if direct && beta == 1.0 {
                load_c(c, rsc * 4);
            } else {
                asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nomem, nostack));
            }
            for p in 0..kp {
                step(a.add(p * STEP), b.add(p * STEP));
            }
            if direct {
                store_c(c, rsc * 4);
            } else {
                let mut buf = CBuf([0.0; MR * NR]);
                store_c(buf.0.as_mut_ptr(), (NR * 4) as isize);
                scale_store(&buf.0, alpha, beta, c, rsc, csc);
            }
        }
    }
}

/// One 32-k step: C(32x32) += A(32x32) * B(32x32) from packed panels.
///
/// # Safety
/// Tiles configured; `a` and `b` each point at STEP readable u16 of a packed step.
#[inline(always)]
unsafe fn step(a: *const u16, b: *const u16) {
    // SAFETY: the loads stay inside the two 2 KiB steps (A: 32 rows of 64 B; B: 16 rows of 128 B); tile
    // registers are not used by compiled code, so they carry the accumulators between asm blocks.
    unsafe {
        asm!(
            "tileloadd tmm4, [{a} + {sa}*1]",
            "tileloadd tmm6, [{b} + {sb}*1]",
            "tileloadd tmm7, [{b} + {sb}*1 + 64]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm5, [{a} + {sa}*1 + 1024]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a = in(reg) a,
            b = in(reg) b,
            sa = in(reg) 64usize,
            sb = in(reg) 128usize,
            options(nostack, readonly),
        )
    }
}

/// Loads the 32x32 f32 C tile at `c` (row stride `stride` bytes) into `tmm0..tmm3`.
///
/// # Safety
/// Tiles configured; rows `c + i * stride`, i < 32, hold 32 readable f32.
#[inline(always)]
unsafe fn load_c(c: *const f32, stride: isize) {
    // SAFETY: each tile reads 16 rows of 64 bytes inside the C tile (caller).
    unsafe {
        let c1 = c.byte_offset(16 * stride);
        asm!(
            "tileloadd tmm0, [{c0} + {s}*1]",
            "tileloadd tmm1, [{c0} + {s}*1 + 64]",
            "tileloadd tmm2, [{c1} + {s}*1]",
            "tileloadd tmm3, [{c1} + {s}*1 + 64]",
            c0 = in(reg) c,
            c1 = in(reg) c1,
            s = in(reg) stride,
            options(nostack, readonly),
        )
    }
}

/// Stores `tmm0..tmm3` to the 32x32 f32 tile at `c` (row stride `stride` bytes).
///
/// # Safety
/// Tiles configured; rows `c + i * stride`, i < 32, hold 32 writable f32.
#[inline(always)]
unsafe fn store_c(c: *mut f32, stride: isize) {
    // SAFETY: each tile writes 16 rows of 64 bytes inside the C tile (caller).
    unsafe {
        let c1 = c.byte_offset(16 * stride);
        asm!(
            "tilestored [{c0} + {s}*1], tmm0",
            "tilestored [{c0} + {s}*1 + 64], tmm1",
            "tilestored [{c1} + {s}*1], tmm2",
            "tilestored [{c1} + {s}*1 + 64], tmm3",
            c0 = in(reg) c,
            c1 = in(reg) c1,
            s = in(reg) stride,
            options(nostack),
        )
    }
}

/// `C = alpha * buf + beta * C` for the 32x32 tile (C not read when beta == 0).
///
/// # Safety
/// The 32x32 tile of C is writable (readable when beta != 0); AVX-512F is enabled in the caller.
#[inline(always)]
unsafe fn scale_store(buf: &[f32; MR * NR], alpha: f32, beta: f32, c: *mut f32, rsc: isize, csc: isize) {
    if csc != 1 {
        // SAFETY: forwarded.
        unsafe { store_tile_strided(MR, NR, buf, alpha, beta, c, rsc, csc) };
        return;
    }
    // SAFETY: rows of 32 contiguous f32 inside the tile of C (caller); buf rows are 32 f32.
    unsafe {
        let (va, vb) = (_mm512_set1_ps(alpha), _mm512_set1_ps(beta));
        for i in 0..MR {
            let row = c.offset(i as isize * rsc);
            for h in [0, 16] {
                let mut x = _mm512_mul_ps(va, _mm512_loadu_ps(buf.as_ptr().add(i * NR + h)));
                if beta != 0.0 {
                    x = _mm512_fmadd_ps(vb, _mm512_loadu_ps(row.add(h)), x);
                }
                _mm512_storeu_ps(row.add(h), x);
            }
        }
    }
}

/// The blocked driver with the AMX micro-kernel, between this thread's `ldtilecfg` and `tilerelease`.
///
/// # Safety
/// As `gemm_blocked`; the CPU supports AVX-512F/BW, AVX2, FMA, F16C and AMX-BF16, and this process has
/// permission to use tile data (`detect::has_amx`).
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn run_amx<TA: Elem, TB: Elem, TC: Elem>(t: &Task<TA, TB, TC>, scratch: *mut u8) {
    // SAFETY: CONFIG is a valid palette-1 configuration (8 tiles of 16 x 64 B, within the palette's limits);
    // the driver's contract is forwarded; tilerelease returns the tiles to their initial state.
    unsafe {
        asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly));
        gemm_blocked::<AmxBf16, TA, TB, TC>(t, scratch);
        asm!("tilerelease", options(nomem, nostack));
    }
}

impl GemmKernel for Amx {
    fn tile<TA: Elem, TB: Elem>() -> (usize, usize) {
        if is_bf16::<TA>() && is_bf16::<TB>() {
            tile_of::<AmxBf16>()
        } else {
            tile_of::<Avx512F32>()
        }
    }
    fn scratch_len<TA: Elem, TB: Elem, TC: Elem>(m: usize, n: usize, k: usize) -> usize {
        if is_bf16::<TA>() && is_bf16::<TB>() {
            scratch_of::<AmxBf16, TC>(m, n, k)
        } else {
            scratch_of::<Avx512F32, TC>(m, n, k)
        }
    }
    unsafe fn run<TA: Elem, TB: Elem, TC: Elem>(t: &Task<TA, TB, TC>, scratch: *mut u8) {
        // SAFETY: the caller holds a `Kernel` for Amx, so AVX-512F, AMX-BF16 and the tile permission exist;
        // scratch sized by `scratch_len` above.
        unsafe {
            if is_bf16::<TA>() && is_bf16::<TB>() {
                run_amx(t, scratch)
            } else {
                run_avx512(t, scratch)
            }
        }
    }
}
