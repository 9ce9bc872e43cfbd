//! The non-GEMM operations of a training step, one file per op family: [`convert`] (loads, stores, casts),
//! [`conv`] (im2col, col2im, max-pooling),
//! [`elementwise`] (fill, bias, activations), [`softmax`] (the loss head), [`optim`] (gradient statistics and
//! the fused optimizer updates).
//!
//! Each op is one `#[inline(always)]` body generic over its element types and a const `V` naming the
//! instruction set, written over f32 chunks of [`CH`] elements as plain loops; [`multiversion!`] compiles it
//! three times, behind `#[target_feature]` for AVX-512F and AVX2 (+FMA, F16C) and once without, and picks one
//! with the backend's [`Isa`]. The f32 arithmetic is left to LLVM's vectoriser (it has the target's full
//! width inside those functions); the 16-bit conversions, where the vectoriser is weak, use F16C intrinsics.
//! The arithmetic is the reference backend's, operation for operation (Rust never contracts `a * b + c` into
//! an FMA), so most ops are bit-exact with it; the exceptions (vectorised reductions, `exp`) are listed in
//! `tests/backends.rs` with their tolerances.

pub(crate) mod conv;
pub(crate) mod convert;
pub(crate) mod elementwise;
pub(crate) mod optim;
pub(crate) mod softmax;

use crate::detect::{Kernel, KernelId};

/// Elements per chunk: 1 KiB of f32 per operand, so the chunk buffers of an op stay in L1.
pub(crate) const CH: usize = 256;

/// `V` for code compiled without extra target features.
pub(crate) const V_PLAIN: u8 = 0;
/// `V` inside an AVX2 + FMA + F16C function.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const V_AVX2: u8 = 1;
/// `V` inside an AVX-512F (+ AVX2, FMA, F16C) function.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const V_AVX512: u8 = 2;

/// The instruction set the element-wise ops run with. It follows the GEMM kernel (so `MANTISSA_KERNEL`
/// selects, and the kernel script tests, every path), and a [`Kernel`] exists only where the CPU has its
/// instructions: `avx2` implies AVX2, FMA and F16C; `avx512` and `avx512bf16` add AVX-512F.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    Plain,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx2,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx512,
}

impl Isa {
    pub(crate) fn of(kernel: Kernel) -> Isa {
        match kernel.id() {
            KernelId::Scalar => Isa::Plain,
            KernelId::Avx2 => Isa::Avx2,
            KernelId::Avx512 | KernelId::Avx512Bf16 | KernelId::Amx => Isa::Avx512,
            // NEON is baseline on AArch64, so the plain bodies are already vectorised with it.
            #[cfg(target_arch = "aarch64")]
            KernelId::Neon | KernelId::NeonFhm | KernelId::NeonBf16 => Isa::Plain,
        }
    }
}

/// `unsafe fn $name(isa, args)` running `$body::<generics, V>(args)` compiled for `isa`.
///
/// The caller's `isa` must come from [`Isa::of`] (a detected kernel): that is what makes calling the
/// `#[target_feature]` versions sound.
macro_rules! multiversion {
    ($(#[$m:meta])* unsafe fn $name:ident $(<$($g:ident : $bound:path),*>)? ($($arg:ident : $ty:ty),* $(,)?)
        $(-> $ret:ty)? => $body:ident) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        pub(crate) unsafe fn $name $(<$($g: $bound),*>)? (isa: $crate::ops::Isa, $($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx2,fma,f16c")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx512 $(<$($g: $bound),*>)? ($($arg: $ty),*) $(-> $ret)? {
                // SAFETY: forwarded from the caller.
                unsafe { $body::<$($($g,)*)? { $crate::ops::V_AVX512 }>($($arg),*) }
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,f16c")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2 $(<$($g: $bound),*>)? ($($arg: $ty),*) $(-> $ret)? {
                // SAFETY: forwarded from the caller.
                unsafe { $body::<$($($g,)*)? { $crate::ops::V_AVX2 }>($($arg),*) }
            }
            match isa {
                // SAFETY: `isa` comes from a detected kernel, so the CPU has these features.
                #[cfg(target_arch = "x86_64")]
                $crate::ops::Isa::Avx512 => unsafe { avx512 $(::<$($g),*>)? ($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                $crate::ops::Isa::Avx2 => unsafe { avx2 $(::<$($g),*>)? ($($arg),*) },
                // SAFETY: forwarded from the caller.
                #[allow(unreachable_patterns)]
                _ => unsafe { $body::<$($($g,)*)? { $crate::ops::V_PLAIN }>($($arg),*) },
            }
        }
    };
}
pub(crate) use multiversion;
