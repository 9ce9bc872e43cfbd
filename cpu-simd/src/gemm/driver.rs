//! The cache-blocked GEMM loop nest (BLIS / Goto order), generic over a [`Micro`]
//! kernel and inlined into each kernel's `#[target_feature]` entry point.
//!
//! Loops, outer to inner: `jc` over N by NC, `pc` over K in equal blocks of about KC
//! ([`k_block`]; pack a kc x NC block of B, sized for L2/L3), `ic` over M by MC (pack an MC x KC block of A,
//! sized for L2), `jr` over NC by NR (one B micro-panel, kept in L1), `ir` over MC
//! by MR (the micro-kernel). For 16-bit C the `ic` loop moves outside `pc` so the
//! MC x NC block accumulates in an f32 buffer and is rounded to C once.

use super::{Elem, ElemKind, Micro, Task};

/// Byte offsets of the packed-A, packed-B and f32 C-accumulator regions in one
/// thread's scratch (each 64-byte aligned), and the bytes it needs in all,
/// including 64 bytes to align an unaligned start.
pub(crate) struct ScratchLayout {
    pub a: usize,
    pub b: usize,
    pub cacc: usize,
    /// Leading dimension (f32 elements) of the C accumulator.
    pub cacc_ld: usize,
    pub total: usize,
}

const fn align64(x: usize) -> usize {
    (x + 63) & !63
}

impl ScratchLayout {
    pub(crate) fn new<M: Micro>(m: usize, n: usize, k: usize, cacc: bool) -> ScratchLayout {
        let kc = k_block::<M>(k);
        let mc = M::MC.min(m.next_multiple_of(M::MR));
        let nc = M::NC.min(n.next_multiple_of(M::NR));
        let p = core::mem::size_of::<M::P>();
        let a_bytes = align64(mc * kc * p);
        let b_bytes = align64(nc * kc * p);
        let cacc_ld = nc.next_multiple_of(16);
        let c_bytes = if cacc { align64(mc * cacc_ld * 4) } else { 0 };
        ScratchLayout { a: 0, b: a_bytes, cacc: a_bytes + b_bytes, cacc_ld, total: 64 + a_bytes + b_bytes + c_bytes }
    }
}

/// The k block for a GEMM of depth `k`: `k` in equal blocks (rounded up to `KU`) of at most `KC + KC / 16`,
/// so 784 runs as 3 x 262 rather than 256, 256, 256, 16. Every block costs one load and store of the C tile,
/// and a thin one does little work for it; the 1/16 slack keeps a B micro-panel in L1 (f32: 272 x 32 x 4 B =
/// 34 KiB of 48 KiB) and lets depths just over KC run as one block.
#[inline(always)]
pub(crate) fn k_block<M: Micro>(k: usize) -> usize {
    let blocks = k.div_ceil(M::KC + M::KC / 16).max(1);
    k.div_ceil(blocks).next_multiple_of(M::KU)
}

/// Largest MR x NR of any micro-kernel (AMX: 32 x 32), for the edge-tile buffer.
const MAX_TILE: usize = 32 * 32;

/// Single-threaded GEMM of `t` with micro-kernel `M`.
///
/// # Safety
/// `t` describes valid A, B, C (every element in bounds, C not aliasing A or B or
/// itself), `m, n, k > 0`; `scratch` is 64-byte aligned and holds
/// `ScratchLayout::new::<M>(m, n, k, TC is not f32).total - 64` bytes; the CPU
/// supports `M`'s instructions.
#[inline(always)]
pub(crate) unsafe fn gemm_blocked<M: Micro, TA: Elem, TB: Elem, TC: Elem>(t: &Task<TA, TB, TC>, scratch: *mut u8) {
    let Task { m, n, k, .. } = *t;
    let direct = matches!(TC::KIND, ElemKind::F32);
    let lay = ScratchLayout::new::<M>(m, n, k, !direct);
    let kb = k_block::<M>(k);
    // SAFETY: the regions lie inside scratch (caller) and are 64-byte aligned.
    let (ap, bp, cacc) = unsafe {
        (scratch.add(lay.a) as *mut M::P, scratch.add(lay.b) as *mut M::P, scratch.add(lay.cacc) as *mut f32)
    };
    let at = |i: usize, p: usize| -> *const TA { t.a.wrapping_offset(i as isize * t.rsa + p as isize * t.csa) };
    let bt = |p: usize, j: usize| -> *const TB { t.b.wrapping_offset(p as isize * t.rsb + j as isize * t.csb) };
    for jc in (0..n).step_by(M::NC) {
        let nc = M::NC.min(n - jc);
        if direct {
            let c = t.c as *mut f32;
            for pc in (0..k).step_by(kb) {
                let kc = kb.min(k - pc);
                let beta = if pc == 0 { t.beta } else { 1.0 };
                // SAFETY: the block lies inside B; bp holds nc x kc (rounded) P.
                unsafe { M::pack_b_block::<TB>(kc, nc, bt(pc, jc), t.rsb, t.csb, bp) };
                for ic in (0..m).step_by(M::MC) {
                    let mc = M::MC.min(m - ic);
                    // SAFETY: as for B; C block (ic.., jc..) lies inside C, TC is f32.
                    unsafe {
                        M::pack_a_block::<TA>(mc, kc, at(ic, pc), t.rsa, t.csa, ap);
                        let cb = c.offset(ic as isize * t.rsc + jc as isize * t.csc);
                        macro_kernel::<M>(mc, nc, kc, t.alpha, ap, bp, beta, cb, t.rsc, t.csc);
                    }
                }
            }
        } else {
            for ic in (0..m).step_by(M::MC) {
                let mc = M::MC.min(m - ic);
                for pc in (0..k).step_by(kb) {
                    let kc = kb.min(k - pc);
                    let beta = if pc == 0 { 0.0 } else { 1.0 };
                    // SAFETY: blocks lie inside A and B; cacc holds mc x cacc_ld f32.
                    // B is repacked per ic block only when m > MC.
                    unsafe {
                        M::pack_b_block::<TB>(kc, nc, bt(pc, jc), t.rsb, t.csb, bp);
                        M::pack_a_block::<TA>(mc, kc, at(ic, pc), t.rsa, t.csa, ap);
                        let ld = lay.cacc_ld as isize;
                        macro_kernel::<M>(mc, nc, kc, 1.0, ap, bp, beta, cacc, ld, 1);
                    }
                }
                for i in 0..mc {
                    for j in 0..nc {
                        // SAFETY: (ic + i, jc + j) lies inside C; cacc holds mc x ld.
                        unsafe {
                            let cp = t.c.offset((ic + i) as isize * t.rsc + (jc + j) as isize * t.csc);
                            let mut v = t.alpha * *cacc.add(i * lay.cacc_ld + j);
                            if t.beta != 0.0 {
                                v += t.beta * (*cp).to_f32();
                            }
                            *cp = TC::from_f32(v);
                        }
                    }
                }
            }
        }
    }
}

/// Packs an `mc x kc` block of A into MR-row panels.
///
/// # Safety
/// `a[i * rsa + p * csa]` readable for `i < mc`, `p < kc`; `dst` holds
/// `mc.next_multiple_of(MR) * kc.next_multiple_of(KU)` P.
#[inline(always)]
pub(crate) unsafe fn pack_a_panels<M: Micro, T: Elem>(
    mc: usize,
    kc: usize,
    a: *const T,
    rsa: isize,
    csa: isize,
    dst: *mut M::P,
) {
    let panel = kc.next_multiple_of(M::KU) * M::MR;
    for (s, ir) in (0..mc).step_by(M::MR).enumerate() {
        // SAFETY: panel s reads rows ir.. < mc and writes dst[s * panel..][..panel].
        unsafe {
            let src = a.offset(ir as isize * rsa);
            M::pack_a(kc, M::MR.min(mc - ir), src, rsa, csa, dst.add(s * panel));
        }
    }
}

/// Packs a `kc x nc` block of B into NR-column panels.
///
/// # Safety
/// `b[p * rsb + j * csb]` readable for `p < kc`, `j < nc`; `dst` holds
/// `nc.next_multiple_of(NR) * kc.next_multiple_of(KU)` P.
#[inline(always)]
pub(crate) unsafe fn pack_b_panels<M: Micro, T: Elem>(
    kc: usize,
    nc: usize,
    b: *const T,
    rsb: isize,
    csb: isize,
    dst: *mut M::P,
) {
    let panel = kc.next_multiple_of(M::KU) * M::NR;
    for (s, jr) in (0..nc).step_by(M::NR).enumerate() {
        // SAFETY: panel s reads columns jr.. < nc and writes dst[s * panel..][..panel].
        unsafe {
            let src = b.offset(jr as isize * csb);
            M::pack_b(kc, M::NR.min(nc - jr), src, csb, rsb, dst.add(s * panel));
        }
    }
}

/// C[mc x nc] = alpha * Apack * Bpack + beta * C (beta == 0: C not read), in tiles.
///
/// # Safety
/// Packed blocks as written by `pack_*_block` for (mc, kc) and (kc, nc); C
/// elements `c[i * rsc + j * csc]` writable for `i < mc`, `j < nc`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn macro_kernel<M: Micro>(
    mc: usize,
    nc: usize,
    kc: usize,
    alpha: f32,
    ap: *const M::P,
    bp: *const M::P,
    beta: f32,
    c: *mut f32,
    rsc: isize,
    csc: isize,
) {
    debug_assert!(M::MR * M::NR <= MAX_TILE);
    let kp = kc.div_ceil(M::KU);
    let (a_panel, b_panel) = (kp * M::KU * M::MR, kp * M::KU * M::NR);
    for (sj, jr) in (0..nc).step_by(M::NR).enumerate() {
        let nr = M::NR.min(nc - jr);
        // SAFETY: panel sj exists in the packed B block.
        let b = unsafe { bp.add(sj * b_panel) };
        for (si, ir) in (0..mc).step_by(M::MR).enumerate() {
            let mr = M::MR.min(mc - ir);
            // SAFETY: panel si exists in the packed A block; tile (ir, jr) in C.
            unsafe {
                let a = ap.add(si * a_panel);
                let ct = c.offset(ir as isize * rsc + jr as isize * csc);
                if mr == M::MR && nr == M::NR {
                    M::kernel(kp, alpha, a, b, beta, ct, rsc, csc);
                } else {
                    // Edge tile: full tile into a buffer, then the valid part.
                    let mut tile = [0.0f32; MAX_TILE];
                    let tp = tile.as_mut_ptr();
                    M::kernel(kp, 1.0, a, b, 0.0, tp, M::NR as isize, 1);
                    for i in 0..mr {
                        for j in 0..nr {
                            let cp = ct.offset(i as isize * rsc + j as isize * csc);
                            let v = alpha * tile[i * M::NR + j];
                            *cp = if beta == 0.0 { v } else { v + beta * *cp };
                        }
                    }
                }
            }
        }
    }
}

/// Writes an MR x NR f32 tile (`tile[i * nr + j]`) to strided C:
/// `C = alpha * tile + beta * C`, C not read when beta == 0.
///
/// # Safety
/// `c[i * rsc + j * csc]` writable for `i < mr`, `j < nr`; `tile` has `mr * nr` f32.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn store_tile_strided(
    mr: usize,
    nr: usize,
    tile: &[f32],
    alpha: f32,
    beta: f32,
    c: *mut f32,
    rsc: isize,
    csc: isize,
) {
    for i in 0..mr {
        for j in 0..nr {
            // SAFETY: (i, j) inside the tile (caller).
            unsafe {
                let cp = c.offset(i as isize * rsc + j as isize * csc);
                let v = alpha * tile[i * nr + j];
                *cp = if beta == 0.0 { v } else { v + beta * *cp };
            }
        }
    }
}
