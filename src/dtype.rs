//! Element types: `f32`, `half::f16` and `half::bf16`.

use half::{bf16, f16};

/// The element type of a [`Tensor`](crate::Tensor).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE single precision.
    F32,
    /// IEEE half precision (`half::f16`).
    F16,
    /// Brain float 16 (`half::bf16`).
    BF16,
}

impl DType {
    /// The suffix used in kernel names and reports: `f32`, `f16`, `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An element type cunorm normalizes. Statistics are always computed in a wider type; values
/// are converted on load and the output is rounded once to `Self`.
pub trait Element:
    Copy + Default + Send + Sync + PartialEq + std::fmt::Debug + 'static + cudarc::driver::DeviceRepr
{
    /// The runtime tag of this type.
    const DTYPE: DType;
    /// Exact widening conversion.
    fn to_f32(self) -> f32;
    /// Round to nearest even from f32.
    fn from_f32(v: f32) -> Self;
    /// Round to nearest even from f64 (one rounding, not via f32).
    fn from_f64(v: f64) -> Self;
    /// Exact widening conversion to f64.
    #[inline(always)]
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
