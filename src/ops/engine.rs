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
        /// The same in f32, for the element work.
        fn fma32(a: f32, b: f32, c: f32) -> f32;
    }
    pub struct Plain;
    pub struct Fma;
    impl Isa for Plain {
        #[inline(always)]
        fn fma(a: f64, b: f64, c: f64) -> f64 {
            a * b + c
        }
        #[inline(always)]
        fn fma32(a: f32, b: f32, c: f32) -> f32 {
            a * b + c
        }
    }
    impl Isa for Fma {
        #[inline(always)]
        fn fma(a: f64, b: f64, c: f64) -> f64 {
            a.mul_add(b, c)
        }
        #[inline(always)]
        fn fma32(a: f32, b: f32, c: f32) -> f32 {
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

// ---------------------------------------------------------------------------------------------
// f32 tiles. Element work runs on f32 values: each run is widened to f32 a tile at a time
// (bulk conversion, F16C for f16, a shift for bf16; f32 passes through uncopied), statistics
// accumulate those f32 values in f64 lanes, and outputs are computed in f32 lanes and rounded
// once to the element type a tile at a time.
// ---------------------------------------------------------------------------------------------

/// Values per tile: 2 KiB of f32, well inside L1.
pub(crate) const TILE: usize = 512;

/// Calls `f(offset, tile)` on consecutive tiles of `x` as f32.
#[inline(always)]
pub(crate) fn for_tiles<T: Element>(x: &[T], mut f: impl FnMut(usize, &[f32])) {
    if let Some(x) = T::as_f32s(x) {
        for (k, t) in x.chunks(TILE).enumerate() {
            f(k * TILE, t);
        }
        return;
    }
    let mut buf = [0f32; TILE];
    for (k, t) in x.chunks(TILE).enumerate() {
        let b = &mut buf[..t.len()];
        T::widen(t, b);
        f(k * TILE, b);
    }
}

/// Calls `f(offset, g_tile, x_tile)` on consecutive tiles of two equally long runs as f32.
#[inline(always)]
pub(crate) fn for_tiles2<T: Element>(g: &[T], x: &[T], mut f: impl FnMut(usize, &[f32], &[f32])) {
    let (mut gb, mut xb) = ([0f32; TILE], [0f32; TILE]);
    for (k, (gc, xc)) in g.chunks(TILE).zip(x.chunks(TILE)).enumerate() {
        let gt = widened(gc, &mut gb);
        let xt = widened(xc, &mut xb);
        f(k * TILE, gt, xt);
    }
}

/// A run of at most TILE values as f32: itself for f32, else widened into `buf`.
#[inline(always)]
fn widened<'a, T: Element>(x: &'a [T], buf: &'a mut [f32; TILE]) -> &'a [f32] {
    match T::as_f32s(x) {
        Some(t) => t,
        None => {
            let b = &mut buf[..x.len()];
            T::widen(x, b);
            b
        }
    }
}

/// An f32 output tile: the caller writes every element.
pub(crate) type OutTile = [Out<f32>];

/// Tile bounds over `len` values: a short first tile that brings `out` to a 64-byte boundary
/// (so that the vector stores of every later tile do not straddle cache lines), then full tiles.
#[inline(always)]
fn out_tiles<T>(out: &[Out<T>]) -> impl Iterator<Item = (usize, usize)> {
    let size = std::mem::size_of::<T>();
    let mis = out.as_ptr() as usize % 64;
    let head = if mis.is_multiple_of(size) {
        ((64 - mis) % 64) / size
    } else {
        0
    };
    let len = out.len();
    let head = head.min(len);
    std::iter::once((0, head)).filter(|&(_, e)| e > 0).chain(
        (head..len)
            .step_by(TILE)
            .map(move |s| (s, (s + TILE).min(len))),
    )
}

/// `out = f(x)` tile by tile: `f(offset, x_tile, y_tile)` writes every element of the f32
/// tile, which is the output itself for f32 and is otherwise rounded once to T.
#[inline(always)]
pub(crate) fn map_tiles<T: Element>(
    x: &[T],
    out: &mut [Out<T>],
    mut f: impl FnMut(usize, &[f32], &mut OutTile),
) {
    let mut xb = [0f32; TILE];
    let mut yb = [Out::new(0f32); TILE];
    for (s, e) in out_tiles(out) {
        let xt = widened(&x[s..e], &mut xb);
        store_tile(&mut out[s..e], &mut yb, |yt| f(s, xt, yt));
    }
}

/// `out = f(g, x)` tile by tile, as [`map_tiles`] with two inputs.
#[inline(always)]
pub(crate) fn map_tiles2<T: Element>(
    g: &[T],
    x: &[T],
    out: &mut [Out<T>],
    mut f: impl FnMut(usize, &[f32], &[f32], &mut OutTile),
) {
    let (mut gb, mut xb) = ([0f32; TILE], [0f32; TILE]);
    let mut yb = [Out::new(0f32); TILE];
    for (s, e) in out_tiles(out) {
        let gt = widened(&g[s..e], &mut gb);
        let xt = widened(&x[s..e], &mut xb);
        store_tile(&mut out[s..e], &mut yb, |yt| f(s, gt, xt, yt));
    }
}

/// Lets `fill` write an output tile: straight into `out` for f32, else into `buf` (always
/// initialized) and then rounded to T.
#[inline(always)]
fn store_tile<T: Element>(
    out: &mut [Out<T>],
    buf: &mut [Out<f32>; TILE],
    fill: impl FnOnce(&mut OutTile),
) {
    if let Some(o) = T::as_f32s_out(out) {
        return fill(o);
    }
    let yt = &mut buf[..out.len()];
    fill(yt);
    // SAFETY: `buf` was created initialized (`Out::new`) and only ever written with values,
    // so every element is an initialized f32.
    let yt: &[f32] = unsafe { &*(yt as *const [Out<f32>] as *const [f32]) };
    T::narrow(yt, out);
}

/// A mean split into f32 `hi + lo`: `(x − hi) − lo` in f32 keeps the deviation of an f32 `x`
/// from an f64 mean to f32 accuracy even when |mean| ≫ std (x − hi is exact near the mean).
#[derive(Clone, Copy, Debug)]
pub(crate) struct SplitMean {
    pub hi: f32,
    pub lo: f32,
}

impl SplitMean {
    #[inline(always)]
    pub fn new(m: f64) -> SplitMean {
        let hi = m as f32;
        let lo = if hi.is_finite() {
            (m - hi as f64) as f32
        } else {
            0.0
        };
        SplitMean { hi, lo }
    }

    #[inline(always)]
    pub fn dev(self, x: f32) -> f32 {
        (x - self.hi) - self.lo
    }
}

/// Adds the f32 values of a tile into f64 lanes.
#[inline(always)]
pub(crate) fn acc_sum(acc: &mut [f64; LANES], t: &[f32]) {
    let (chunks, tail) = t.as_chunks::<LANES>();
    for ch in chunks {
        for i in 0..LANES {
            acc[i] += ch[i] as f64;
        }
    }
    for (a, v) in acc.iter_mut().zip(tail) {
        *a += *v as f64;
    }
}

/// Adds Σ (x − m) and Σ (x − m)² of a tile into f64 lanes.
#[inline(always)]
pub(crate) fn acc_dev<I: simd::Isa>(
    a1: &mut [f64; LANES],
    a2: &mut [f64; LANES],
    t: &[f32],
    m: f64,
) {
    let (chunks, tail) = t.as_chunks::<LANES>();
    for ch in chunks {
        // One loop per accumulator: the form the SLP vectorizer turns into packed f64 ops.
        let d: [f64; LANES] = std::array::from_fn(|i| ch[i] as f64 - m);
        for i in 0..LANES {
            a1[i] += d[i];
        }
        for i in 0..LANES {
            a2[i] = I::fma(d[i], d[i], a2[i]);
        }
    }
    for ((s1, s2), v) in a1.iter_mut().zip(a2.iter_mut()).zip(tail) {
        let d = *v as f64 - m;
        *s1 += d;
        *s2 += d * d;
    }
}

/// Asks for the `len` values after `x` (the next row) to be brought into cache while this
/// one is worked on: one prefetch per 64-byte line. A hint only: addresses past the end of the
/// data are never dereferenced.
#[inline(always)]
pub(crate) fn prefetch_after<T>(x: &[T], len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let start = x.as_ptr_range().end as *const i8;
        let bytes = len * std::mem::size_of::<T>();
        for off in (0..bytes).step_by(64) {
            // SAFETY: prefetch never faults and never reads the address architecturally.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(off)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (x, len);
}

/// Σ x over a run.
#[inline(always)]
pub(crate) fn sum_body<T: Element>(x: &[T]) -> f64 {
    let mut acc = [0f64; LANES];
    for_tiles(x, |_, t| acc_sum(&mut acc, t));
    lanes_sum(acc)
}

/// (Σ (x − m), Σ (x − m)²) over a run.
#[inline(always)]
pub(crate) fn dev_sums_body<T: Element, I: simd::Isa>(x: &[T], m: f64) -> (f64, f64) {
    let mut a1 = [0f64; LANES];
    let mut a2 = [0f64; LANES];
    for_tiles(x, |_, t| acc_dev::<I>(&mut a1, &mut a2, t, m));
    (lanes_sum(a1), lanes_sum(a2))
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
