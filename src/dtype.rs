//! Element types: `f32`, `half::f16` and `half::bf16`.

use std::mem::MaybeUninit;

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

mod sealed {
    /// Only the three types the kernels exist for are elements.
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// An element type cunorm normalizes: `f32`, `f16` or `bf16` (sealed: the kernels exist for
/// these three). Statistics are always computed in a wider type; values are converted on load
/// and the output is rounded once to `Self`.
pub trait Element:
    sealed::Sealed
    + Copy
    + Default
    + Send
    + Sync
    + PartialEq
    + std::fmt::Debug
    + 'static
    + cudarc::driver::DeviceRepr
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
    /// Widens a run to f32 in bulk (`dst` as long as `src`): the CPU engines' load.
    #[doc(hidden)]
    fn widen(src: &[Self], dst: &mut [f32]);
    /// Rounds a run of f32 to `Self` in bulk, to nearest even: the CPU engines' store.
    #[doc(hidden)]
    fn narrow(src: &[f32], dst: &mut [MaybeUninit<Self>]);
    /// The run itself when `Self` is f32, so that loads need no copy.
    #[doc(hidden)]
    #[inline(always)]
    fn as_f32s(_x: &[Self]) -> Option<&[f32]> {
        None
    }
    /// Whether [`widen1`](Element::widen1) and [`narrow1`](Element::narrow1) are plain bit
    /// operations that LLVM vectorizes inside an element loop (f32, bf16), so that a kernel can
    /// convert in registers instead of through an f32 tile.
    #[doc(hidden)]
    const FUSED: bool = false;
    /// One value to f32 (for [`FUSED`](Element::FUSED) types: vectorizable).
    #[doc(hidden)]
    #[inline(always)]
    fn widen1(self) -> f32 {
        self.to_f32()
    }
    /// One value to f32 for a kernel whose every use of it is arithmetic: the same as
    /// [`widen1`](Element::widen1) except that a signaling NaN may stay signaling, which the
    /// first arithmetic operation quiets (with the same payload) as `widen1` would have.
    #[doc(hidden)]
    #[inline(always)]
    fn widen1_arith(self) -> f32 {
        self.widen1()
    }
    /// One f32 rounded to `Self`, nearest even (for [`FUSED`](Element::FUSED) types:
    /// vectorizable, and the same bits as [`narrow`](Element::narrow)).
    #[doc(hidden)]
    #[inline(always)]
    fn narrow1(v: f32) -> Self {
        Self::from_f32(v)
    }
    /// The run's bits when `Self` is f16, for kernels that convert them with F16C in registers.
    #[doc(hidden)]
    #[inline(always)]
    fn f16_bits(_x: &[Self]) -> Option<&[u16]> {
        None
    }
    /// The output run as f16 bits when `Self` is f16.
    #[doc(hidden)]
    #[inline(always)]
    fn f16_bits_out(_x: &mut [MaybeUninit<Self>]) -> Option<&mut [MaybeUninit<u16>]> {
        None
    }
    /// The run's bits when `Self` is bf16.
    #[doc(hidden)]
    #[inline(always)]
    fn bf16_bits(_x: &[Self]) -> Option<&[u16]> {
        None
    }
    /// The output run as bf16 bits when `Self` is bf16.
    #[doc(hidden)]
    #[inline(always)]
    fn bf16_bits_out(_x: &mut [MaybeUninit<Self>]) -> Option<&mut [MaybeUninit<u16>]> {
        None
    }
    /// The output run itself when `Self` is f32, so that stores need no copy.
    #[doc(hidden)]
    #[inline(always)]
    fn as_f32s_out(_x: &mut [MaybeUninit<Self>]) -> Option<&mut [MaybeUninit<f32>]> {
        None
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
    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    #[inline(always)]
    fn narrow(src: &[f32], dst: &mut [MaybeUninit<Self>]) {
        for (d, s) in dst.iter_mut().zip(src) {
            d.write(*s);
        }
    }
    #[inline(always)]
    fn as_f32s(x: &[Self]) -> Option<&[f32]> {
        Some(x)
    }
    const FUSED: bool = true;
    #[inline(always)]
    fn widen1(self) -> f32 {
        self
    }
    #[inline(always)]
    fn narrow1(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn as_f32s_out(x: &mut [MaybeUninit<Self>]) -> Option<&mut [MaybeUninit<f32>]> {
        Some(x)
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
    #[inline(always)]
    fn f16_bits(x: &[Self]) -> Option<&[u16]> {
        use half::slice::HalfFloatSliceExt;
        Some(x.reinterpret_cast())
    }
    #[inline(always)]
    fn f16_bits_out(x: &mut [MaybeUninit<Self>]) -> Option<&mut [MaybeUninit<u16>]> {
        // SAFETY: `f16` is `repr(transparent)` over `u16`, so `MaybeUninit<f16>` and
        // `MaybeUninit<u16>` have the same size, alignment and validity; the length is kept.
        Some(unsafe { &mut *(x as *mut [MaybeUninit<f16>] as *mut [MaybeUninit<u16>]) })
    }
    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if f16c::available() {
            // SAFETY: the CPU has F16C and AVX (checked just above).
            return unsafe { f16c::widen(src, dst) };
        }
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }
    #[inline(always)]
    fn narrow(src: &[f32], dst: &mut [MaybeUninit<Self>]) {
        #[cfg(target_arch = "x86_64")]
        if f16c::available() {
            // SAFETY: the CPU has F16C and AVX (checked just above).
            return unsafe { f16c::narrow(src, dst) };
        }
        for (d, s) in dst.iter_mut().zip(src) {
            d.write(f16::from_f32(*s));
        }
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn bf16_bits(x: &[Self]) -> Option<&[u16]> {
        use half::slice::HalfFloatSliceExt;
        Some(x.reinterpret_cast())
    }
    #[inline(always)]
    fn bf16_bits_out(x: &mut [MaybeUninit<Self>]) -> Option<&mut [MaybeUninit<u16>]> {
        // SAFETY: `bf16` is `repr(transparent)` over `u16`, so `MaybeUninit<bf16>` and
        // `MaybeUninit<u16>` have the same size, alignment and validity; the length is kept.
        Some(unsafe { &mut *(x as *mut [MaybeUninit<bf16>] as *mut [MaybeUninit<u16>]) })
    }
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
    /// A bf16 is the top half of an f32: a shift, which vectorizes.
    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.widen1();
        }
    }
    const FUSED: bool = true;
    /// A signaling NaN comes out quiet, as from `half::bf16::to_f32`.
    #[inline(always)]
    fn widen1(self) -> f32 {
        let b = (self.to_bits() as u32) << 16;
        let quiet = if (b & 0x7fff_ffff) > 0x7f80_0000 {
            0x0040_0000
        } else {
            0
        };
        f32::from_bits(b | quiet)
    }
    /// The bits shifted into place; no quieting (see [`Element::widen1_arith`]).
    #[inline(always)]
    fn widen1_arith(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn narrow1(v: f32) -> Self {
        let b = v.to_bits();
        let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
        let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
        let bits = if nan { (b >> 16) | 0x40 } else { rounded };
        bf16::from_bits(bits as u16)
    }
    /// Round to nearest even on the bits, branch-free so that it vectorizes; NaN stays a quiet
    /// NaN with its sign (`half::bf16::from_f32`'s results, bit for bit).
    #[inline(always)]
    fn narrow(src: &[f32], dst: &mut [MaybeUninit<Self>]) {
        for (d, s) in dst.iter_mut().zip(src) {
            d.write(Self::narrow1(*s));
        }
    }
}

/// Bulk f16 ↔ f32 with the F16C instructions (x86-64; every AVX2 CPU has them).
#[cfg(target_arch = "x86_64")]
mod f16c {
    use super::*;
    use std::arch::x86_64::*;

    #[inline(always)]
    pub fn available() -> bool {
        std::is_x86_feature_detected!("f16c") && std::is_x86_feature_detected!("avx")
    }

    /// # Safety
    /// The CPU must support F16C and AVX.
    #[target_feature(enable = "avx,f16c")]
    pub unsafe fn widen(src: &[f16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let (head, tail) = (n / 8 * 8, n % 8);
        for i in (0..head).step_by(8) {
            // SAFETY: i + 8 <= n, within both slices; unaligned loads and stores.
            unsafe {
                let h = _mm_loadu_si128(src.as_ptr().add(i).cast());
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
        }
        for i in head..head + tail {
            dst[i] = src[i].to_f32();
        }
    }

    /// # Safety
    /// The CPU must support F16C and AVX.
    #[target_feature(enable = "avx,f16c")]
    pub unsafe fn narrow(src: &[f32], dst: &mut [MaybeUninit<f16>]) {
        let n = src.len().min(dst.len());
        let (head, tail) = (n / 8 * 8, n % 8);
        for i in (0..head).step_by(8) {
            // SAFETY: i + 8 <= n, within both slices; unaligned loads and stores. The store
            // writes 8 initialized f16 into the MaybeUninit slots.
            unsafe {
                let v = _mm256_loadu_ps(src.as_ptr().add(i));
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
                _mm_storeu_si128(dst.as_mut_ptr().add(i).cast(), h);
            }
        }
        for i in head..head + tail {
            dst[i].write(f16::from_f32(src[i]));
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// f32 bit patterns for conversion tests: specials, f16's limits, pseudo-random bits and
    /// values near halfway points.
    pub(crate) fn bit_patterns() -> Vec<f32> {
        let mut v: Vec<f32> = [
            0.0,
            -0.0,
            1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
            65504.0,
            65520.0,
            6e-8,
            3e-8,
        ]
        .to_vec();
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            v.push(f32::from_bits(s as u32));
            // Values near halfway points and in f16's subnormal range.
            v.push(f32::from_bits((s as u32 & 0x807f_ffff) | 0x3300_0000));
        }
        v
    }

    fn check<T: Element>(one: impl Fn(f32) -> T, bits: impl Fn(T) -> u64) {
        let v = bit_patterns();
        let mut out = vec![MaybeUninit::<T>::uninit(); v.len()];
        T::narrow(&v, &mut out);
        let got: Vec<T> = out.iter().map(|o| unsafe { o.assume_init() }).collect();
        for (x, g) in v.iter().zip(&got) {
            assert_eq!(bits(*g), bits(one(*x)), "narrow {x:e} ({:#x})", x.to_bits());
        }
        for (x, g) in v.iter().zip(&got) {
            assert_eq!(bits(T::narrow1(*x)), bits(*g), "narrow1 {x:e}");
        }
        let mut back = vec![0f32; got.len()];
        T::widen(&got, &mut back);
        for (g, b) in got.iter().zip(&back) {
            assert_eq!(b.to_bits(), g.to_f32().to_bits(), "widen {g:?}");
            assert_eq!(g.widen1().to_bits(), g.to_f32().to_bits(), "widen1 {g:?}");
        }
    }

    /// The f16 rounding cases: every f16 value, its negation, the midpoint to its neighbour
    /// and the f32 values just below and above that midpoint.
    pub(crate) fn f16_rounding_cases() -> Vec<f32> {
        rounding_cases(|b| f16::from_bits(b).to_f32())
    }

    /// The rounding cases of a 16-bit float type whose bit pattern `b` is the value
    /// `widen(b)`: every value, its negation, the midpoint to its neighbour and the f32
    /// values just below and above that midpoint.
    pub(crate) fn rounding_cases(widen: impl Fn(u16) -> f32) -> Vec<f32> {
        let mut v = Vec::new();
        for b in 0..=u16::MAX {
            let lo = widen(b);
            let hi = widen(b.wrapping_add(1));
            let mid = (lo as f64 * 0.5 + hi as f64 * 0.5) as f32;
            v.extend([lo, -lo, mid]);
            if mid.is_finite() && mid != 0.0 {
                v.extend([
                    f32::from_bits(mid.to_bits() + 1),
                    f32::from_bits(mid.to_bits() - 1),
                ]);
            }
        }
        v
    }

    /// Every f16 and every bf16 widened, and the f16 rounding cases narrowed, against `half`.
    #[test]
    fn scalar_conversions_are_exhaustively_exact() {
        for b in 0..=u16::MAX {
            let (h, g) = (f16::from_bits(b), bf16::from_bits(b));
            assert_eq!(h.widen1().to_bits(), h.to_f32().to_bits(), "f16 {b:#x}");
            assert_eq!(g.widen1().to_bits(), g.to_f32().to_bits(), "bf16 {b:#x}");
        }
        for v in f16_rounding_cases() {
            assert_eq!(
                f16::narrow1(v).to_bits(),
                f16::from_f32(v).to_bits(),
                "{v:e}"
            );
            assert_eq!(
                bf16::narrow1(v).to_bits(),
                bf16::from_f32(v).to_bits(),
                "{v:e}"
            );
        }
    }

    #[test]
    fn bulk_conversions_match_half_bit_for_bit() {
        check::<bf16>(bf16::from_f32, |v| v.to_bits() as u64);
        check::<f16>(f16::from_f32, |v| v.to_bits() as u64);
        check::<f32>(|v| v, |v| v.to_bits() as u64);
    }
}
