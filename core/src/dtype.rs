//! Storage types. Every value is *computed* in f32 (or f64 for references); the dtype says how it is *stored*.
//! Stores round to nearest, ties to even (the `half` crate's conversions), as tensor cores and AVX512_BF16 do.

use half::{bf16, f16};

/// The element type a buffer is stored in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum DType {
    F32,
    F16,
    BF16,
    /// Indices: labels, max-pool positions.
    I32,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The name PyTorch, Keras and safetensors users know (`float32`, `float16`, `bfloat16`, `int32`).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::I32 => "int32",
        }
    }

    /// The dtype tag of the safetensors format.
    pub const fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I32 => "I32",
        }
    }

    pub const fn is_float(self) -> bool {
        !matches!(self, DType::I32)
    }

    /// `x` after a round trip through this dtype (round to nearest even; overflow goes to infinity).
    pub fn round(self, x: f32) -> f32 {
        match self {
            DType::F32 | DType::I32 => x,
            DType::F16 => f16_bits_to_f32(f32_to_f16_bits(x)),
            DType::BF16 => bf16::from_f32(x).to_f32(),
        }
    }
}

impl core::fmt::Display for DType {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// A floating-point storage type: loads widen to f32 exactly, stores round to nearest even.
pub trait Element: Copy + Default + 'static {
    const DTYPE: DType;
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16_bits_to_f32(self.to_bits())
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_bits(f32_to_f16_bits(x))
    }
}

/// f16 bits to f32, exactly. Branch-light integer code, so the scalar backend needs no F16C and gives the
/// same results on every target (the `half` crate's portable path is several times slower in inner loops).
#[inline(always)]
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let exp = (h >> 10) & 0x1f;
    let man = h & 0x3ff;
    if exp == 0 {
        // Zero or subnormal: man * 2^-24, exact in f32.
        let v = man as f32 * (1.0 / 16_777_216.0);
        f32::from_bits(sign | v.to_bits())
    } else if exp == 31 {
        f32::from_bits(sign | 0x7f80_0000 | (man << 13))
    } else {
        f32::from_bits(sign | ((exp + 112) << 23) | (man << 13))
    }
}

/// f32 to f16 bits, rounding to nearest even; overflow gives infinity, NaN stays NaN (quiet).
/// (The method of F. Giesen's `float_to_half_fast3_rtne`.)
#[inline(always)]
pub fn f32_to_f16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let abs = bits & 0x7fff_ffff;
    let out = if abs >= 0x4780_0000 {
        // >= 65536 (rounds to inf), inf or NaN.
        if abs > 0x7f80_0000 {
            0x7e00 | ((abs >> 13) & 0x3ff) as u16
        } else {
            0x7c00
        }
    } else if abs < 0x3880_0000 {
        // Below f16's smallest normal 2^-14: let an f32 addition do the rounding to a multiple of 2^-24.
        let magic = f32::from_bits(126 << 23); // 0.5
        let r = f32::from_bits(abs) + magic;
        (r.to_bits() - magic.to_bits()) as u16
    } else {
        let mant_odd = (abs >> 13) & 1;
        // Rebias the exponent (127 -> 15) and add the rounding bias; a carry may round up into inf.
        let r = abs.wrapping_add(((15u32.wrapping_sub(127)) << 23).wrapping_add(0xfff)).wrapping_add(mant_odd);
        (r >> 13) as u16
    };
    sign | out
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // Exact: a bf16 is the top half of an f32.
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}
