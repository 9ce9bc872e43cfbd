//! Kernel selection: which instruction sets this CPU has, chosen once.
//!
//! With `std`, detection is at run time (`is_x86_feature_detected!`, `is_aarch64_feature_detected!`) and the
//! environment variable [`KERNEL_ENV`] can force a kernel. Without `std`, only the
//! target features the crate was compiled with (`cfg!(target_feature)`) count.

use crate::error::Error;

/// Environment variable that forces a kernel: `scalar`, `avx2`, `avx512`, `avx512bf16`, `amx`; on AArch64
/// also `neon`, `neon-fhm`, `neon-bf16`.
pub const KERNEL_ENV: &str = "MANTISSA_KERNEL";

/// The GEMM kernel families, one per instruction set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KernelId {
    /// Portable Rust, 4x8 register tile. Always available.
    Scalar,
    /// AVX2 + FMA + F16C, 6x16 f32 tile.
    Avx2,
    /// AVX-512F (+ FMA, F16C), 14x32 f32 tile; bf16 inputs are widened while packing.
    Avx512,
    /// AVX-512F + AVX512_BF16: f32 as [`KernelId::Avx512`], bf16 through `vdpbf16ps`.
    Avx512Bf16,
    /// AVX-512F + AMX-BF16 (Linux x86_64, std): bf16 x bf16 through `tdpbf16ps` on 32x32 f32 tiles; f32 and
    /// f16 inputs as [`KernelId::Avx512`]. Needs the kernel's permission for tile data (`arch_prctl`).
    Amx,
    /// AArch64 NEON, 8x12 f32 tile (`FMLA` by element); bf16/f16 inputs widened while packing. Always
    /// available on AArch64.
    #[cfg(target_arch = "aarch64")]
    Neon,
    /// NEON + FEAT_FP16 + FEAT_FHM: f16 x f16 through `FMLAL`/`FMLAL2` (f16 products into f32 accumulators,
    /// IEEE fused); other inputs as [`KernelId::Neon`].
    #[cfg(target_arch = "aarch64")]
    NeonFhm,
    /// [`KernelId::NeonFhm`] + FEAT_BF16: bf16 x bf16 through `BFMLALB`/`BFMLALT` (IEEE fused, not the
    /// round-to-odd `BFDOT`/`BFMMLA`), in `asm!`.
    #[cfg(target_arch = "aarch64")]
    NeonBf16,
}

impl KernelId {
    /// All kernels, slowest first.
    #[cfg(not(target_arch = "aarch64"))]
    pub const ALL: [KernelId; 5] =
        [KernelId::Scalar, KernelId::Avx2, KernelId::Avx512, KernelId::Avx512Bf16, KernelId::Amx];
    /// All kernels, slowest first: x86's (never available here), then the Arm ones.
    #[cfg(target_arch = "aarch64")]
    pub const ALL: [KernelId; 8] = [
        KernelId::Scalar,
        KernelId::Avx2,
        KernelId::Avx512,
        KernelId::Avx512Bf16,
        KernelId::Amx,
        KernelId::Neon,
        KernelId::NeonFhm,
        KernelId::NeonBf16,
    ];

    /// The name used by [`KERNEL_ENV`].
    pub fn name(self) -> &'static str {
        match self {
            KernelId::Scalar => "scalar",
            KernelId::Avx2 => "avx2",
            KernelId::Avx512 => "avx512",
            KernelId::Avx512Bf16 => "avx512bf16",
            KernelId::Amx => "amx",
            #[cfg(target_arch = "aarch64")]
            KernelId::Neon => "neon",
            #[cfg(target_arch = "aarch64")]
            KernelId::NeonFhm => "neon-fhm",
            #[cfg(target_arch = "aarch64")]
            KernelId::NeonBf16 => "neon-bf16",
        }
    }

    /// Parses a [`KernelId::name`] (ASCII case-insensitive, surrounding blanks ignored).
    pub fn from_name(name: &str) -> Option<KernelId> {
        let name = name.trim();
        KernelId::ALL.into_iter().find(|id| id.name().eq_ignore_ascii_case(name))
    }

    /// Whether this CPU (without `std`: this build's target features) can run it.
    pub fn is_available(self) -> bool {
        match self {
            KernelId::Scalar => true,
            KernelId::Avx2 => has_avx2(),
            KernelId::Avx512 => has_avx512(),
            KernelId::Avx512Bf16 => has_avx512() && has_avx512bf16(),
            KernelId::Amx => has_avx512() && has_amx(),
            #[cfg(target_arch = "aarch64")]
            KernelId::Neon => true,
            #[cfg(target_arch = "aarch64")]
            KernelId::NeonFhm => has_fhm(),
            #[cfg(target_arch = "aarch64")]
            KernelId::NeonBf16 => has_fhm() && has_bf16(),
        }
    }
}

/// A kernel this CPU supports: holding one is the proof the GEMM entry points rely on
/// to run instructions behind `#[target_feature]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Kernel(KernelId);

impl Kernel {
    /// The kernel `id`, or [`Error::KernelUnavailable`] if the CPU lacks it.
    pub fn new(id: KernelId) -> Result<Kernel, Error> {
        if id.is_available() {
            Ok(Kernel(id))
        } else {
            Err(Error::KernelUnavailable(id))
        }
    }

    /// The portable kernel, available everywhere.
    pub const fn scalar() -> Kernel {
        Kernel(KernelId::Scalar)
    }

    /// The fastest kernel this CPU supports, ignoring [`KERNEL_ENV`].
    ///
    /// [`KernelId::Avx512Bf16`] is preferred over [`KernelId::Avx512`] only where
    /// `vdpbf16ps` is known to be faster than widening to f32 FMAs: on AMD (Zen 4:
    /// one 512-bit `vdpbf16ps` per cycle, twice the f32 FMA flops). On Intel
    /// (measured on a Sapphire Rapids-class Xeon: 0.5 `vdpbf16ps` zmm per cycle
    /// against 2 FMA zmm, so half the flops) the widening kernel is faster.
    /// [`KernelId::Amx`] comes first where the CPU and OS allow it: its f32 and f16 GEMMs are
    /// [`KernelId::Avx512`]'s, and bf16 runs on the tile unit (~4x the widening kernel's GFLOP/s).
    pub fn best() -> Kernel {
        let prefer = |id: &KernelId| *id != KernelId::Avx512Bf16 || bf16_dot_is_fast();
        let id =
            KernelId::ALL.into_iter().rev().filter(prefer).find(|id| id.is_available()).unwrap_or(KernelId::Scalar);
        Kernel(id)
    }

    pub fn id(self) -> KernelId {
        self.0
    }

    pub fn name(self) -> &'static str {
        self.0.name()
    }
}

/// Chooses the kernel: the one named by `forced` if given (an error if unknown or
/// unsupported), else the fastest available. [`detect`] calls this with the
/// environment variable; tests call it directly.
pub fn detect_from(forced: Option<&str>) -> Result<Kernel, Error> {
    match forced {
        Some(name) if !name.trim().is_empty() => Kernel::new(KernelId::from_name(name).ok_or(Error::UnknownKernel)?),
        _ => Ok(Kernel::best()),
    }
}

/// Chooses the kernel once: [`KERNEL_ENV`] if set (with `std`), else the fastest available.
/// Call it once and keep the [`Kernel`]; it reads the environment each time.
pub fn detect() -> Result<Kernel, Error> {
    #[cfg(feature = "std")]
    {
        let forced = std::env::var(KERNEL_ENV).ok();
        detect_from(forced.as_deref())
    }
    #[cfg(not(feature = "std"))]
    {
        detect_from(None)
    }
}

/// Every kernel this CPU can run, slowest first.
#[cfg(feature = "std")]
pub fn available_kernels() -> Vec<KernelId> {
    KernelId::ALL.into_iter().filter(|id| id.is_available()).collect()
}

/// Whether `vdpbf16ps` outruns f32 FMA on this CPU (see [`Kernel::best`]): AMD only.
#[cfg(target_arch = "x86_64")]
pub(crate) fn bf16_dot_is_fast() -> bool {
    // CPUID leaf 0 exists on every x86_64 CPU; the vendor string is EBX, EDX, ECX.
    let r = core::arch::x86_64::__cpuid(0);
    (r.ebx, r.edx, r.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163) // "AuthenticAMD"
}
#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn bf16_dot_is_fast() -> bool {
    false
}

#[cfg(all(target_arch = "x86_64", feature = "std"))]
fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}
#[cfg(all(target_arch = "x86_64", feature = "std"))]
fn has_avx512() -> bool {
    has_avx2() && is_x86_feature_detected!("avx512f")
}
#[cfg(all(target_arch = "x86_64", feature = "std"))]
fn has_avx512bf16() -> bool {
    is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512bf16")
}

#[cfg(all(target_arch = "x86_64", not(feature = "std")))]
fn has_avx2() -> bool {
    cfg!(all(target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))
}
#[cfg(all(target_arch = "x86_64", not(feature = "std")))]
fn has_avx512() -> bool {
    has_avx2() && cfg!(target_feature = "avx512f")
}
#[cfg(all(target_arch = "x86_64", not(feature = "std")))]
fn has_avx512bf16() -> bool {
    cfg!(all(target_feature = "avx512bw", target_feature = "avx512bf16"))
}

/// AMX-BF16 and AMX-TILE (CPUID leaf 7: EDX bits 22 and 24), tile state enabled by the OS (XCR0 bits 17, 18),
/// and Linux's per-process permission to use tile data, requested once (`arch_prctl(ARCH_REQ_XCOMP_PERM,
/// XFEATURE_XTILEDATA)`); without it the first tile instruction would kill the process with SIGILL.
/// Cached: later calls are one atomic load.
#[cfg(all(target_arch = "x86_64", target_os = "linux", feature = "std"))]
fn has_amx() -> bool {
    static AMX: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AMX.get_or_init(|| {
        use core::arch::x86_64::{__cpuid, __cpuid_count};
        // CPUID leaf 0 always exists; leaf 7 only if its max leaf says so.
        if __cpuid(0).eax < 7 {
            return false;
        }
        let edx = __cpuid_count(7, 0).edx;
        let osxsave = __cpuid(1).ecx & (1 << 27) != 0;
        if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 || !osxsave {
            return false;
        }
        let xcr0: u64 = {
            let (lo, hi): (u32, u32);
            // SAFETY: OSXSAVE is set, so XGETBV is enabled; XCR0 (ecx = 0) is readable at any privilege.
            unsafe {
                core::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi, options(nomem, nostack))
            };
            (u64::from(hi) << 32) | u64::from(lo)
        };
        if xcr0 & (0b11 << 17) != 0b11 << 17 {
            return false;
        }
        const SYS_ARCH_PRCTL: usize = 158;
        const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
        const XFEATURE_XTILEDATA: usize = 18;
        let ret: isize;
        // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM) only changes this process's permission set; the syscall
        // clobbers rcx and r11 and returns in rax, as declared.
        unsafe {
            core::arch::asm!(
                "syscall",
                inlateout("rax") SYS_ARCH_PRCTL => ret,
                in("rdi") ARCH_REQ_XCOMP_PERM,
                in("rsi") XFEATURE_XTILEDATA,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            )
        };
        ret == 0
    })
}
/// Without `std` (no one-time permission request) or off Linux, AMX is not used.
#[cfg(all(target_arch = "x86_64", not(all(target_os = "linux", feature = "std"))))]
fn has_amx() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx2() -> bool {
    false
}
#[cfg(not(target_arch = "x86_64"))]
fn has_avx512() -> bool {
    false
}
#[cfg(not(target_arch = "x86_64"))]
fn has_avx512bf16() -> bool {
    false
}
#[cfg(not(target_arch = "x86_64"))]
fn has_amx() -> bool {
    false
}

/// FEAT_FHM (`FMLAL`) with FEAT_FP16, which it extends.
#[cfg(all(target_arch = "aarch64", feature = "std"))]
fn has_fhm() -> bool {
    std::arch::is_aarch64_feature_detected!("fp16") && std::arch::is_aarch64_feature_detected!("fhm")
}
/// FEAT_BF16 (`BFMLALB`/`BFMLALT`).
#[cfg(all(target_arch = "aarch64", feature = "std"))]
fn has_bf16() -> bool {
    std::arch::is_aarch64_feature_detected!("bf16")
}
#[cfg(all(target_arch = "aarch64", not(feature = "std")))]
fn has_fhm() -> bool {
    cfg!(all(target_feature = "fp16", target_feature = "fhm"))
}
#[cfg(all(target_arch = "aarch64", not(feature = "std")))]
fn has_bf16() -> bool {
    cfg!(target_feature = "bf16")
}
