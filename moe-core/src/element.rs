//! Element types: `f32`, `half::f16`, `half::bf16`.
//!
//! The contract: storage in the element type, arithmetic and accumulation in `f32`.

use core::fmt::Debug;
use half::{bf16, f16};

/// The storage type of activations and weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16 (8-bit exponent, 7-bit mantissa).
    BF16,
}

impl DType {
    /// Bytes per element.
    pub const fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Machine epsilon (distance from 1.0 to the next value), as `f64`.
    pub const fn epsilon(self) -> f64 {
        match self {
            DType::F32 => f32::EPSILON as f64,
            DType::F16 => 9.765625e-4,
            DType::BF16 => 7.8125e-3,
        }
    }

    /// Short lowercase name (`"f32"`, `"f16"`, `"bf16"`).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// All supported element types.
    pub const ALL: [DType; 3] = [DType::F32, DType::BF16, DType::F16];
}

/// A storage element: converts to and from `f32`, where all arithmetic happens.
pub trait Element:
    Copy + Default + Debug + PartialEq + Send + Sync + bytemuck::Pod + 'static
{
    /// The runtime tag of this type.
    const DTYPE: DType;
    /// Widen to `f32` (exact).
    fn to_f32(self) -> f32;
    /// Round from `f32` (round to nearest even).
    fn from_f32(v: f32) -> Self;
    /// Round from `f64` (via the nearest `f32` first for the half types).
    fn from_f64(v: f64) -> Self;
    /// Widen to `f64` (exact).
    #[inline]
    fn to_f64(self) -> f64 {
        self.to_f32() as f64
    }
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        f16::from_f64(v)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        bf16::from_f64(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tags() {
        assert_eq!(<f32 as Element>::from_f32(1.5).to_f32(), 1.5);
        assert_eq!(<f16 as Element>::from_f32(1.5).to_f32(), 1.5);
        assert_eq!(<bf16 as Element>::from_f32(1.5).to_f32(), 1.5);
        assert_eq!(<bf16 as Element>::DTYPE.size_bytes(), 2);
        // 1 + eps/2 rounds to 1 (ties to even), 1 + eps does not.
        for d in DType::ALL {
            let one_eps = 1.0 + d.epsilon();
            let back = match d {
                DType::F32 => <f32 as Element>::from_f64(one_eps).to_f64(),
                DType::F16 => <f16 as Element>::from_f64(one_eps).to_f64(),
                DType::BF16 => <bf16 as Element>::from_f64(one_eps).to_f64(),
            };
            assert_eq!(back, one_eps, "{}", d.name());
        }
    }
}
