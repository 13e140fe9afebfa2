//! What the two CPU engines share: f64 moments with Chan's merge, the run kernels they are
//! built from, and the AVX2/FMA multiversioning.
//!
//! - the **planes engine** (`ops/planes/cpu.rs`) works on an `(N, C, S)` view in either memory
//!   format and reduces per `(n, c)` plane; BatchNorm, InstanceNorm and GroupNorm differ only in
//!   how planes are merged into statistic groups;
//! - the **rows engine** (`ops/rows/cpu.rs`) works on `(rows, cols)` contiguous data for
//!   LayerNorm and RMSNorm.
//!
//! Accuracy first: every sum is accumulated in f64 (8 independent lanes, added in a fixed
//! order), variance is the corrected two-pass over deviations (never E[x²] − E[x]²) and pieces
//! are merged with Chan's formula; outputs are computed in f64 and rounded once. Work is split
//! into pieces whose boundaries depend only on the shape, and partials are merged in index order,
//! so results are bitwise identical for any thread count.

use crate::dtype::Element;

pub(crate) const LANES: usize = 8;
/// Rows of a channels-last `(S, C)` block reduced by one task.
pub(crate) const ROW_CHUNK: usize = 256;
/// Longest contiguous run reduced by one task.
pub(crate) const RUN_CHUNK: usize = 1 << 16;
/// Smallest number of elements worth a rayon task.
pub(crate) const MIN_TASK: usize = 1 << 14;

/// Count, mean and sum of squared deviations of a set of values (f64).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Moments {
    pub count: f64,
    pub mean: f64,
    pub m2: f64,
}

impl Moments {
    /// The corrected two-pass moments of `n` values from their first-pass mean `m` and the
    /// sums of deviations `d1 = Σ(x − m)`, `d2 = Σ(x − m)²`. NaN and infinities propagate as in
    /// PyTorch: a NaN makes mean and variance NaN (never clamped away), an infinite mean stays
    /// infinite (`m + d1/n` would make it NaN) with a NaN variance.
    #[inline(always)]
    pub fn two_pass(n: f64, m: f64, d1: f64, d2: f64) -> Moments {
        let m2 = d2 - d1 * d1 / n;
        Moments {
            count: n,
            mean: if m.is_finite() { m + d1 / n } else { m },
            // Rounding can leave a tiny negative; `f64::max` would also turn NaN into 0.
            m2: if m2 < 0.0 { 0.0 } else { m2 },
        }
    }

    /// Chan et al.'s pairwise merge: exact in exact arithmetic, stable in floating point.
    pub fn merge(self, o: Moments) -> Moments {
        if o.count == 0.0 {
            return self;
        }
        if self.count == 0.0 {
            return o;
        }
        let count = self.count + o.count;
        let d = o.mean - self.mean;
        // An infinite mean (an infinite input) stays infinite, or NaN for +inf with -inf, as a
        // plain sum gives: `mean + d·w` would be inf − inf.
        let mean = if self.mean.is_finite() && o.mean.is_finite() {
            self.mean + d * (o.count / count)
        } else {
            self.mean * (self.count / count) + o.mean * (o.count / count)
        };
        Moments {
            count,
            mean,
            m2: self.m2 + o.m2 + d * d * (self.count * o.count / count),
        }
    }

    pub fn var_biased(&self) -> f64 {
        self.m2 / self.count
    }

    /// Unbiased variance; NaN for a single value (as PyTorch, which gives NaN/inf there).
    pub fn var_unbiased(&self) -> f64 {
        self.m2 / (self.count - 1.0)
    }
}

// ---------------------------------------------------------------------------------------------
// Kernels on contiguous runs and row blocks. Each public kernel is compiled twice: for the
// baseline target and, on x86-64, with AVX2/FMA enabled, picked at run time (`multiversion!`).
// Loops work on 8-element array chunks so the compiler vectorizes them.
// ---------------------------------------------------------------------------------------------

/// Defines `fn name<T: Element>(args) -> ret` from an `#[inline(always)]` body, compiled for
/// the baseline target and for AVX2+FMA (x86-64), dispatched on what the CPU supports.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident<T: Element>($($a:ident: $t:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name<T: Element>($($a: $t),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body<T: Element, I: $crate::ops::engine::simd::Isa>($($a: $t),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2<T: Element>($($a: $t),*) $(-> $ret)? {
                    body::<T, $crate::ops::engine::simd::Fma>($($a),*)
                }
                if $crate::ops::engine::simd::has_avx2() {
                    // SAFETY: the CPU supports AVX2 and FMA (checked by has_avx2).
                    return unsafe { avx2::<T>($($a),*) };
                }
            }
            body::<T, $crate::ops::engine::simd::Plain>($($a),*)
        }
    };
}
pub(crate) use multiversion;

pub(crate) mod simd {
    /// What a kernel body may assume of the instruction set.
    pub trait Isa {
        /// `a·b + c`: fused where the CPU has FMA (the fused form also lets LLVM vectorize the
        /// reductions), plain otherwise (a software fma would be slow).
        fn fma(a: f64, b: f64, c: f64) -> f64;
    }
    pub struct Plain;
    pub struct Fma;
    impl Isa for Plain {
        #[inline(always)]
        fn fma(a: f64, b: f64, c: f64) -> f64 {
            a * b + c
        }
    }
    impl Isa for Fma {
        #[inline(always)]
        fn fma(a: f64, b: f64, c: f64) -> f64 {
            a.mul_add(b, c)
        }
    }

    #[cfg(target_arch = "x86_64")]
    pub fn has_avx2() -> bool {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
}

pub(crate) type Out<T> = std::mem::MaybeUninit<T>;

/// Sums the lanes in index order (a pairwise tree here would make LLVM shuffle the lanes of
/// every vector in the hot loop).
#[inline(always)]
pub(crate) fn lanes_sum(acc: [f64; LANES]) -> f64 {
    acc.iter().sum()
}

/// Large fresh outputs would otherwise take one page fault per 4 KiB on first write (for a
/// 32 MB output, most of the op's time): ask for transparent huge pages, as PyTorch's CPU
/// allocator does. Advisory only; ignored where unsupported.
pub(crate) fn advise_huge_pages<T>(v: &mut Vec<T>) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = v.capacity() * std::mem::size_of::<T>();
        if bytes >= 2 * HUGE {
            let start = v.as_mut_ptr() as usize;
            let aligned = start.next_multiple_of(HUGE);
            let len = (start + bytes - aligned) / HUGE * HUGE;
            // SAFETY: [aligned, aligned + len) lies inside the allocation `v` owns; madvise only
            // changes how the kernel backs those pages, never their contents or validity.
            unsafe {
                libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = v;
}

/// Allocates `n` elements and lets `fill` write every one of them.
pub(crate) fn filled_vec<T: Element>(n: usize, fill: impl FnOnce(&mut [Out<T>])) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(n);
    advise_huge_pages(&mut v);
    fill(&mut v.spare_capacity_mut()[..n]);
    // SAFETY: every caller passes a kernel that writes all `n` elements of the buffer (each
    // kernel iterates over the whole output, chunk by chunk), and T is a plain float type.
    unsafe { v.set_len(n) };
    v
}

/// Σ x over a run.
#[inline(always)]
pub(crate) fn sum_body<T: Element>(x: &[T]) -> f64 {
    let (chunks, tail) = x.as_chunks::<LANES>();
    let mut acc = [0f64; LANES];
    for ch in chunks {
        for i in 0..LANES {
            acc[i] += ch[i].to_f64();
        }
    }
    lanes_sum(acc) + tail.iter().map(|v| v.to_f64()).sum::<f64>()
}

/// (Σ (x − m), Σ (x − m)²) over a run.
#[inline(always)]
pub(crate) fn dev_sums_body<T: Element, I: simd::Isa>(x: &[T], m: f64) -> (f64, f64) {
    let (chunks, tail) = x.as_chunks::<LANES>();
    let mut a1 = [0f64; LANES];
    let mut a2 = [0f64; LANES];
    for ch in chunks {
        // One loop per accumulator: the form the SLP vectorizer turns into packed f64 ops.
        let d: [f64; LANES] = std::array::from_fn(|i| ch[i].to_f64() - m);
        for i in 0..LANES {
            a1[i] += d[i];
        }
        for i in 0..LANES {
            a2[i] = I::fma(d[i], d[i], a2[i]);
        }
    }
    let (mut t1, mut t2) = (0.0, 0.0);
    for v in tail {
        let d = v.to_f64() - m;
        t1 += d;
        t2 += d * d;
    }
    (lanes_sum(a1) + t1, lanes_sum(a2) + t2)
}

/// Moments of a run by the corrected two-pass algorithm.
#[inline(always)]
pub(crate) fn moments_body<T: Element, I: simd::Isa>(x: &[T]) -> Moments {
    if x.is_empty() {
        return Moments::default();
    }
    let n = x.len() as f64;
    let m = sum_body(x) / n;
    let (d1, d2) = dev_sums_body::<T, I>(x, m);
    Moments::two_pass(n, m, d1, d2)
}
