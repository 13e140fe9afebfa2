//! What the two CPU engines share: exact moments with Chan's merge, the f32 tile and element
//! loops they are built from, and the multiversioning (baseline, AVX2+FMA+F16C, AVX-512).
//!
//! - the **planes engine** (`ops/planes/cpu.rs`) works on an `(N, C, S)` view in either memory
//!   format and reduces per `(n, c)` plane; BatchNorm, InstanceNorm and GroupNorm differ only in
//!   how planes are merged into statistic groups;
//! - the **rows engine** (`ops/rows/cpu.rs`) works on `(rows, cols)` contiguous data for
//!   LayerNorm and RMSNorm.
//!
//! Accuracy first, speed second: the statistics are the corrected two-pass per 512-value tile (a
//! provisional mean from f32 lanes, deviation sums in f64 lanes added in a fixed order; never
//! E[x²] − E[x]²), tiles and pieces merged with Chan's formula in f64; element work (loads,
//! the affine apply, the backward formula) runs in f32 lanes with the mean subtracted as an f32
//! hi + lo pair, and each output is rounded once from its f32 value. Work is split into pieces
//! whose boundaries depend only on the shape, and partials are merged in index order, so
//! results are bitwise identical for any thread count.

use crate::dtype::Element;

pub(crate) const LANES: usize = 8;
/// Rows of a channels-last `(S, C)` block reduced by one task.
pub(crate) const ROW_CHUNK: usize = 256;
/// Longest contiguous run reduced by one task.
pub(crate) const RUN_CHUNK: usize = 1 << 16;
/// Smallest number of elements worth a rayon task.
pub(crate) const MIN_TASK: usize = 1 << 14;

/// Whether a loop over `elems` values is worth rayon: more than one thread, and 128 K values
/// or more. Otherwise the loop runs in the calling thread: handing a job to rayon's pool from
/// outside it costs two thread switches (~10 µs seen in profiles), more than a small op saves
/// (LayerNorm [64, 1024] took longer on 2 threads than on 1). Either way the work is cut into
/// the same pieces and merged in the same order, so the results are the same bits.
pub(crate) fn worth_parallel(elems: usize) -> bool {
    elems >= 8 * MIN_TASK && rayon::current_num_threads() > 1
}

/// `iter.map_init(init, f).collect()`: on rayon's pool when [`worth_parallel`], else in this
/// thread, item by item in index order.
pub(crate) fn collect_init<I, S, R>(
    iter: I,
    elems: usize,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, I::Item) -> R + Sync + Send,
) -> Vec<R>
where
    I: rayon::iter::IndexedParallelIterator,
    R: Send,
{
    use rayon::iter::ParallelIterator;
    if worth_parallel(elems) {
        return iter.map_init(init, f).collect();
    }
    let mut state = init();
    sequential(iter, |item| f(&mut state, item))
}

/// `iter.for_each_init(init, f)`, as [`collect_init`].
pub(crate) fn for_each_init<I, S>(
    iter: I,
    elems: usize,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, I::Item) + Sync + Send,
) where
    I: rayon::iter::IndexedParallelIterator,
{
    if worth_parallel(elems) {
        return rayon::iter::ParallelIterator::for_each_init(iter, init, f);
    }
    let mut state = init();
    sequential(iter, |item| f(&mut state, item));
}

/// Drives an indexed parallel iterator in this thread: its producer, unsplit, is a plain
/// iterator over all the items in order.
fn sequential<I, R>(iter: I, g: impl FnMut(I::Item) -> R) -> Vec<R>
where
    I: rayon::iter::IndexedParallelIterator,
{
    use rayon::iter::plumbing::{Producer, ProducerCallback};
    struct Each<G>(G);
    impl<T, R, G: FnMut(T) -> R> ProducerCallback<T> for Each<G> {
        type Output = Vec<R>;
        fn callback<P: Producer<Item = T>>(self, producer: P) -> Vec<R> {
            producer.into_iter().map(self.0).collect()
        }
    }
    iter.with_producer(Each(g))
}

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
// Kernels on contiguous runs and row blocks. Each public kernel is compiled three times: for
// the baseline target and, on x86-64, with AVX2/FMA/F16C and with AVX-512 enabled, picked at
// run time (`multiversion!`).
// Loops work on 8-element array chunks so the compiler vectorizes them.
// ---------------------------------------------------------------------------------------------

/// Defines `fn name<T: Element>(args) -> ret` from an `#[inline(always)]` body, compiled for
/// the baseline target and, on x86-64, for AVX2+FMA+F16C and for AVX-512 (F, BW, VL, DQ), the
/// widest the CPU supports picked at run time ([`simd::level`]). The element loops are the same
/// per-element arithmetic at every width, and the hand-written reductions keep the same lanes
/// in the same order, so the AVX-512 and AVX2 versions give the same bits. bf16 kernels get a
/// fourth version, AVX-512 with BF16 ([`simd::Avx512Bf16`]: outputs rounded by
/// `vcvtne2ps2bf16`, the same bits), where [`simd::bf16_hw`] holds; other element types do
/// not compile it (the branch is on a constant of `Element::DTYPE`).
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
                use $crate::ops::engine::simd::{self, Level};
                #[target_feature(enable = "avx,avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512<T: Element>($($a: $t),*) $(-> $ret)? {
                    body::<T, simd::Avx512>($($a),*)
                }
                #[target_feature(enable = "avx,avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512bf16<T: Element>($($a: $t),*) $(-> $ret)? {
                    body::<T, simd::Avx512Bf16>($($a),*)
                }
                #[target_feature(enable = "avx,avx2,fma,f16c")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2<T: Element>($($a: $t),*) $(-> $ret)? {
                    body::<T, simd::Fma>($($a),*)
                }
                match simd::level() {
                    // Only bf16 kernels get this version (the branch is pruned for other T).
                    // SAFETY: the CPU supports AVX-512 F/BW/VL/DQ/BF16, AVX2, FMA and F16C
                    // (checked by `level` and `bf16_hw`).
                    Level::Avx512 if const { matches!(T::DTYPE, $crate::dtype::DType::BF16) } && simd::bf16_hw() => {
                        return unsafe { avx512bf16::<T>($($a),*) }
                    }
                    // SAFETY: the CPU supports AVX-512 F/BW/VL/DQ, AVX2, FMA and F16C
                    // (checked by `level`).
                    Level::Avx512 => return unsafe { avx512::<T>($($a),*) },
                    // SAFETY: the CPU supports AVX2, FMA and F16C (checked by `level`).
                    Level::Avx2 => return unsafe { avx2::<T>($($a),*) },
                    Level::Baseline => {}
                }
            }
            body::<T, $crate::ops::engine::simd::Plain>($($a),*)
        }
    };
}
pub(crate) use multiversion;

pub(crate) mod simd {
    use crate::dtype::Element;

    /// What a kernel body may assume of the instruction set.
    pub trait Isa: Sized {
        /// `a·b + c`: fused where the CPU has FMA (the fused form also lets LLVM vectorize the
        /// reductions), plain otherwise (a software fma would be slow).
        fn fma(a: f64, b: f64, c: f64) -> f64;
        /// The same in f32, for the element work.
        fn fma32(a: f32, b: f32, c: f32) -> f32;
        /// Adds Σ (x − m) and Σ (x − m)² of an f32 tile into f64 lanes (lane `i` takes the
        /// values at `i mod 8`).
        #[inline(always)]
        fn acc_dev(a1: &mut [f64; super::LANES], a2: &mut [f64; super::LANES], t: &[f32], m: f64) {
            super::acc_dev_portable::<Self>(a1, a2, t, m)
        }
        /// Whether [`f16x16`](Isa::f16x16) and [`to_f16x16`](Isa::to_f16x16) are vector
        /// instructions (one AVX-512 F or two F16C ones), so that f16 can be converted in
        /// registers.
        const F16C: bool = false;
        /// 16 f16 (bits) as f32.
        #[inline(always)]
        fn f16x16(h: &[u16; 16]) -> [f32; 16] {
            std::array::from_fn(|i| super::f16_widen1(h[i]))
        }
        /// 16 f32 rounded to f16 (nearest even), written to `dst[..16]`.
        #[inline(always)]
        fn to_f16x16(v: &[f32; 16], dst: &mut [std::mem::MaybeUninit<u16>; 16]) {
            for (d, v) in dst.iter_mut().zip(v) {
                d.write(super::f16_narrow1(*v));
            }
        }
        /// Whether [`to_bf16x32`](Isa::to_bf16x32) is one AVX-512 BF16 instruction, so that
        /// the element loops round bf16 outputs 32 at a time with it.
        const BF16: bool = false;
        /// 32 bf16 (bits) as f32: shifts, which LLVM vectorizes at any level.
        #[inline(always)]
        fn bf16x32(h: &[u16; 32]) -> [f32; 32] {
            std::array::from_fn(|i| super::bf16_widen1(h[i]))
        }
        /// 32 f32 rounded to bf16 (nearest even; NaN quiet with its sign and top payload
        /// bits), written to `dst[..32]`: `half::bf16::from_f32`'s results, bit for bit.
        #[inline(always)]
        fn to_bf16x32(v: &[f32; 32], dst: &mut [std::mem::MaybeUninit<u16>; 32]) {
            for (d, v) in dst.iter_mut().zip(v) {
                d.write(super::bf16_narrow1(*v));
            }
        }
        /// Adds Σ g and Σ g·(x − m) of two f32 tiles into f64 lanes (lane `i` takes the
        /// values at `i mod 8`).
        #[inline(always)]
        fn acc_grad(
            a1: &mut [f64; super::LANES],
            a2: &mut [f64; super::LANES],
            g: &[f32],
            x: &[f32],
            m: f64,
        ) {
            super::acc_grad_portable::<Self>(a1, a2, g, x, m)
        }
        /// Column sums of a row-major block of `cols` columns, down the rows, each column's
        /// values in row order, added into `s[j]` and `q[j]` (f64): Σ (x − m[j]) and
        /// Σ (x − m[j])² (`GRAD` false; `g` unused), or Σ g and Σ g·(x − m[j]) (`GRAD` true).
        #[inline(always)]
        fn cols_sums<T: Element, const GRAD: bool>(
            g: &[T],
            x: &[T],
            cols: usize,
            m: &[f64],
            s: &mut [f64],
            q: &mut [f64],
        ) {
            super::cols_sums_portable::<Self, T, GRAD>(g, x, cols, 0, m, s, q)
        }
        /// Column sums Σ (x − m[j]) and Σ (x − m[j])² (`GRAD` false; `g` unused), or Σ g and
        /// Σ g·(x − m[j]) (`GRAD` true), of a row-major block of `cols` columns, as
        /// [`cols_sums`](Isa::cols_sums) but in f32 lanes: each column's values are added
        /// in row order in f32 over tiles of [`COL32_TILE_ROWS`](super::COL32_TILE_ROWS) rows,
        /// and each tile's f32 sums added into `s[j]`, `q[j]` in f64. Not exact: the caller
        /// checks the result ([`f32_col_sums_accurate`](super::f32_col_sums_accurate); for the
        /// gradient sums, that they are finite).
        #[inline(always)]
        fn cols_dev32<T: Element, const GRAD: bool>(
            g: &[T],
            x: &[T],
            cols: usize,
            m: &[f32],
            s: &mut [f64],
            q: &mut [f64],
        ) {
            super::cols_dev32_portable::<Self, T, GRAD>(g, x, cols, 0, m, s, q)
        }
    }
    pub struct Plain;
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
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
    /// The [`Isa`] of a vector instruction set whose hand-written loops are in module `$m`
    /// (f16 converted by F16C, 16 values at a time: `f16x16`/`to_f16x16` of module `$m`).
    macro_rules! vector_isa {
        ($name:ident, $m:ident) => {
            vector_isa!($name, $m, {});
        };
        ($name:ident, $m:ident, { $($extra:item)* }) => {
            impl Isa for $name {
                $($extra)*
                #[inline(always)]
                fn fma(a: f64, b: f64, c: f64) -> f64 {
                    a.mul_add(b, c)
                }
                #[inline(always)]
                fn fma32(a: f32, b: f32, c: f32) -> f32 {
                    a.mul_add(b, c)
                }
                #[cfg(target_arch = "x86_64")]
                #[inline(always)]
                fn acc_dev(
                    a1: &mut [f64; super::LANES],
                    a2: &mut [f64; super::LANES],
                    t: &[f32],
                    m: f64,
                ) {
                    // SAFETY: this type is only used by the kernel version compiled for its
                    // instruction set, which runs only where `level()` includes it (and F16C).
                    unsafe { $m::acc_dev(a1, a2, t, m) }
                }
                #[cfg(target_arch = "x86_64")]
                const F16C: bool = true;
                #[cfg(target_arch = "x86_64")]
                #[inline(always)]
                fn f16x16(h: &[u16; 16]) -> [f32; 16] {
                    // SAFETY: as for `acc_dev`.
                    unsafe { $m::f16x16(h) }
                }
                #[cfg(target_arch = "x86_64")]
                #[inline(always)]
                fn to_f16x16(v: &[f32; 16], dst: &mut [std::mem::MaybeUninit<u16>; 16]) {
                    // SAFETY: as for `acc_dev`.
                    unsafe { $m::to_f16x16(v, dst) }
                }
                #[cfg(target_arch = "x86_64")]
                #[inline(always)]
                fn acc_grad(
                    a1: &mut [f64; super::LANES],
                    a2: &mut [f64; super::LANES],
                    g: &[f32],
                    x: &[f32],
                    m: f64,
                ) {
                    // SAFETY: as for `acc_dev`.
                    unsafe { $m::acc_grad(a1, a2, g, x, m) }
                }
                #[cfg(target_arch = "x86_64")]
                #[inline(always)]
                fn cols_sums<T: Element, const GRAD: bool>(
                    g: &[T],
                    x: &[T],
                    cols: usize,
                    m: &[f64],
                    s: &mut [f64],
                    q: &mut [f64],
                ) {
                    // SAFETY: as for `acc_dev`.
                    unsafe { $m::cols_sums::<T, GRAD>(g, x, cols, m, s, q) }
                }
                #[cfg(target_arch = "x86_64")]
                #[inline(always)]
                fn cols_dev32<T: Element, const GRAD: bool>(
                    g: &[T],
                    x: &[T],
                    cols: usize,
                    m: &[f32],
                    s: &mut [f64],
                    q: &mut [f64],
                ) {
                    // SAFETY: as for `acc_dev`.
                    unsafe { $m::cols_dev32::<T, GRAD>(g, x, cols, m, s, q) }
                }
            }
        };
    }
    vector_isa!(Fma, avx2);
    vector_isa!(Avx512, avx512);
    #[cfg(target_arch = "x86_64")]
    vector_isa!(Avx512Bf16, avx512, {
        const BF16: bool = true;
        #[inline(always)]
        fn to_bf16x32(v: &[f32; 32], dst: &mut [std::mem::MaybeUninit<u16>; 32]) {
            debug_assert!(bf16_hw());
            // SAFETY: this type is only used by the kernel versions compiled for AVX-512 with
            // BF16, which run only where `level()` is Avx512 and `bf16_hw()` holds.
            unsafe { avx512::to_bf16x32(v, dst) }
        }
    });

    /// The AVX-512 kernels' instruction set: the f64 reductions one 8-lane vector wide
    /// ([`avx512`]), f16 converted 16 at a time by AVX-512 F's `vcvtph2ps`/`vcvtps2ph`, and
    /// LLVM's element loops in 512-bit vectors.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub struct Avx512;
    /// [`Avx512`] with AVX-512 BF16 (Zen 4, Sapphire Rapids, Cooper Lake): bf16 outputs rounded
    /// 32 at a time by `vcvtne2ps2bf16`. Used by the kernel versions of bf16 elements only.
    #[cfg(target_arch = "x86_64")]
    pub struct Avx512Bf16;

    /// Whether the bf16 kernels may use AVX-512 BF16: the CPU has it, with the AVX-512 level
    /// (read once; `CUNORM_CPU_ISA` below `avx512`, or `CUNORM_CPU_BF16=0`, turns it off).
    pub fn bf16_hw() -> bool {
        static HW: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HW.get_or_init(|| {
            level() == Level::Avx512
                && detect_bf16()
                && std::env::var("CUNORM_CPU_BF16").as_deref() != Ok("0")
        })
    }

    #[cfg(target_arch = "x86_64")]
    fn detect_bf16() -> bool {
        std::is_x86_feature_detected!("avx512bf16")
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn detect_bf16() -> bool {
        false
    }
    /// [`Isa::acc_dev`] and [`Isa::acc_grad`] for one instruction set, written once over the
    /// module's 8-lane f64 vector `V8` and its `splat8`/`load8`/`store8`/`wide`/`add8`/`fma8`
    /// (two 4-lane vectors for AVX2, one 8-lane vector for AVX-512): lane `i` takes the values
    /// at `i mod 8` in the same order at either width, so both give the same bits.
    #[cfg(target_arch = "x86_64")]
    macro_rules! lane_sums {
        ($feat:literal) => {
            #[doc = concat!("# Safety\nThe CPU must support the features `", $feat, "`.")]
            #[target_feature(enable = $feat)]
            pub unsafe fn acc_dev(a1: &mut [f64; LANES], a2: &mut [f64; LANES], t: &[f32], m: f64) {
                let mv = splat8(m);
                let (chunks, tail) = t.as_chunks::<LANES>();
                // Two sets of accumulators (even and odd chunks) so that consecutive adds do
                // not wait on each other; added together, in a fixed order, at the end.
                let (mut s0, mut q0) = (load8(a1), load8(a2));
                let (mut s1, mut q1) = (splat8(0.0), splat8(0.0));
                let mut pairs = chunks.chunks_exact(2);
                for pair in &mut pairs {
                    let (v, w) = (wide(&pair[0], mv), wide(&pair[1], mv));
                    s0 = add8(s0, v);
                    s1 = add8(s1, w);
                    q0 = fma8(v, v, q0);
                    q1 = fma8(w, w, q1);
                }
                for ch in pairs.remainder() {
                    let v = wide(ch, mv);
                    s0 = add8(s0, v);
                    q0 = fma8(v, v, q0);
                }
                store8(a1, add8(s0, s1));
                store8(a2, add8(q0, q1));
                for ((x1, x2), v) in a1.iter_mut().zip(a2.iter_mut()).zip(tail) {
                    let d = *v as f64 - m;
                    *x1 += d;
                    *x2 = d.mul_add(d, *x2);
                }
            }

            #[doc = concat!("# Safety\nThe CPU must support the features `", $feat, "`.")]
            #[target_feature(enable = $feat)]
            pub unsafe fn acc_grad(
                a1: &mut [f64; LANES],
                a2: &mut [f64; LANES],
                g: &[f32],
                x: &[f32],
                m: f64,
            ) {
                let n = g.len().min(x.len());
                let (g, x) = (&g[..n], &x[..n]);
                let (mv, zero) = (splat8(m), splat8(0.0));
                let (mut s, mut q) = (load8(a1), load8(a2));
                let (gc, gt) = g.as_chunks::<LANES>();
                let (xc, xt) = x.as_chunks::<LANES>();
                for (gv, xv) in gc.iter().zip(xc) {
                    let (gg, d) = (wide(gv, zero), wide(xv, mv));
                    s = add8(s, gg);
                    q = fma8(gg, d, q);
                }
                store8(a1, s);
                store8(a2, q);
                for (i, (gv, xv)) in gt.iter().zip(xt).enumerate() {
                    a1[i] += *gv as f64;
                    a2[i] = (*gv as f64).mul_add(*xv as f64 - m, a2[i]);
                }
            }
        };
    }

    /// The column kernel ([`Isa::cols_sums`]) for one vector width: `$w` f64 lanes per vector
    /// of type `$v`, `$dev` loading `$w` values of the element type as f64 minus a vector. Row
    /// tiles are walked in memory order; within a tile, each group of COLS columns has its sums
    /// in COLS / `$w` vectors, carried from tile to tile through `s`/`q`, so every column's
    /// values are added in row order at any width (the AVX2 and AVX-512 kernels give the same
    /// bits). The columns after the last full group go through the portable loop of `$isa`.
    #[cfg(target_arch = "x86_64")]
    macro_rules! cols_sums_kernel {
        ($feat:literal, $needs:literal, $isa:ty, $v:ty, $w:literal, $zero:ident, $load:ident,
         $store:ident, $add:ident, $fma:ident, $dev:ident) => {
            #[doc = concat!("# Safety\nThe CPU must support ", $needs, ".")]
            #[target_feature(enable = $feat)]
            pub unsafe fn cols_sums<T: Element, const GRAD: bool>(
                g: &[T],
                x: &[T],
                cols: usize,
                m: &[f64],
                s: &mut [f64],
                q: &mut [f64],
            ) {
                let Some((rows, full, ahead)) = col_kernel_shape(g, x, cols, m.len(), s, q) else {
                    return;
                };
                const K: usize = COLS / $w;
                const _: () = assert!(K * $w == COLS);
                let (gb, xb) = (g.as_ptr(), x.as_ptr());
                let z = $zero();
                for r0 in (0..rows).step_by(COL_TILE_ROWS) {
                    let r1 = (r0 + COL_TILE_ROWS).min(rows);
                    for c0 in (0..full).step_by(COLS) {
                        // SAFETY: c0 + COLS <= cols <= the lengths of m, s and q, and row r's
                        // columns c0..c0 + COLS lie inside x and g (r < rows = x.len() / cols).
                        unsafe {
                            let at = |k: usize| c0 + $w * k;
                            let mv: [$v; K] = std::array::from_fn(|k| $load(m.as_ptr().add(at(k))));
                            let mut sv: [$v; K] =
                                std::array::from_fn(|k| $load(s.as_ptr().add(at(k))));
                            let mut qv: [$v; K] =
                                std::array::from_fn(|k| $load(q.as_ptr().add(at(k))));
                            let line = (c0 * std::mem::size_of::<T>()) % 64 == 0;
                            for r in r0..r1 {
                                let (gp, xp) = (gb.add(r * cols + c0), xb.add(r * cols + c0));
                                if line {
                                    prefetch_row::<T, GRAD>(gp, xp, ahead);
                                }
                                for k in 0..K {
                                    let d = $dev(xp.add($w * k), mv[k]);
                                    let gv = if GRAD { $dev(gp.add($w * k), z) } else { d };
                                    sv[k] = $add(sv[k], gv);
                                    qv[k] = $fma(gv, d, qv[k]);
                                }
                            }
                            for k in 0..K {
                                $store(s.as_mut_ptr().add(at(k)), sv[k]);
                                $store(q.as_mut_ptr().add(at(k)), qv[k]);
                            }
                        }
                    }
                }
                cols_sums_portable::<$isa, T, GRAD>(g, x, cols, full, m, s, q);
            }
        };
    }

    /// The f32 column kernel ([`Isa::cols_dev32`]) for one vector width: `$w` f32 lanes per
    /// vector of type `$v` (`$dev` loads `$w` values of the element type as f32 minus a
    /// vector), each group of COLS columns summed in COLS / `$w` f32 vectors over a tile of
    /// COL32_TILE_ROWS rows, then added into the f64 sums in memory (`$lo`/`$hi`: the low and
    /// high halves of an f32 vector as f64 vectors of `$wd` lanes). Each column's values are
    /// added in the same order at any width, as in the portable loop, so the AVX2 and AVX-512
    /// kernels give the same bits.
    #[cfg(target_arch = "x86_64")]
    macro_rules! cols_dev32_kernel {
        ($feat:literal, $needs:literal, $isa:ty, $v:ty, $w:literal, $wd:literal, $zero:ident,
         $loadm:ident, $add:ident, $fma:ident, $dev:ident, $lo:ident, $hi:ident,
         $loadd:ident, $stored:ident, $addd:ident) => {
            #[doc = concat!("# Safety\nThe CPU must support ", $needs, ".")]
            #[target_feature(enable = $feat)]
            pub unsafe fn cols_dev32<T: Element, const GRAD: bool>(
                g: &[T],
                x: &[T],
                cols: usize,
                m: &[f32],
                s: &mut [f64],
                q: &mut [f64],
            ) {
                let Some((rows, full, ahead)) = col_kernel_shape(g, x, cols, m.len(), s, q) else {
                    return;
                };
                const K: usize = COLS / $w;
                const _: () = assert!(K * $w == COLS && 2 * $wd == $w);
                let (gb, xb) = (g.as_ptr(), x.as_ptr());
                for r0 in (0..rows).step_by(COL32_TILE_ROWS) {
                    let r1 = (r0 + COL32_TILE_ROWS).min(rows);
                    for c0 in (0..full).step_by(COLS) {
                        // SAFETY: c0 + COLS <= cols <= the lengths of m, s and q, and row r's
                        // columns c0..c0 + COLS lie inside x and g (r < rows = x.len() / cols).
                        unsafe {
                            let mv: [$v; K] =
                                std::array::from_fn(|k| $loadm(m.as_ptr().add(c0 + $w * k)));
                            let mut sv: [$v; K] = [$zero(); K];
                            let mut qv: [$v; K] = [$zero(); K];
                            let line = (c0 * std::mem::size_of::<T>()) % 64 == 0;
                            for r in r0..r1 {
                                let (gp, xp) = (gb.add(r * cols + c0), xb.add(r * cols + c0));
                                if line {
                                    prefetch_row::<T, GRAD>(gp, xp, ahead);
                                }
                                for k in 0..K {
                                    let d = $dev(xp.add($w * k), mv[k]);
                                    let gv = if GRAD {
                                        $dev(gp.add($w * k), $zero())
                                    } else {
                                        d
                                    };
                                    sv[k] = $add(sv[k], gv);
                                    qv[k] = $fma(gv, d, qv[k]);
                                }
                            }
                            for k in 0..K {
                                let at = c0 + $w * k;
                                for (acc, v) in [(s.as_mut_ptr(), sv[k]), (q.as_mut_ptr(), qv[k])] {
                                    $stored(acc.add(at), $addd($loadd(acc.add(at)), $lo(v)));
                                    $stored(
                                        acc.add(at + $wd),
                                        $addd($loadd(acc.add(at + $wd)), $hi(v)),
                                    );
                                }
                            }
                        }
                    }
                }
                cols_dev32_portable::<$isa, T, GRAD>(g, x, cols, full, m, s, q);
            }
        };
    }

    /// Hand-written AVX2 loops where LLVM's vectorizer leaves half-width or scalar code (seen
    /// in profiles: the f64 deviation sums came out as a mix of 128-bit and scalar ops).
    #[cfg(target_arch = "x86_64")]
    mod avx2 {
        use super::super::{
            col_kernel_shape, cols_dev32_portable, cols_sums_portable, prefetch_row,
            COL32_TILE_ROWS, COLS, COL_TILE_ROWS, LANES,
        };
        use crate::dtype::{DType, Element};
        use std::arch::x86_64::*;

        /// # Safety
        /// The CPU must support F16C and AVX.
        #[inline]
        #[target_feature(enable = "avx,avx2,fma,f16c")]
        pub unsafe fn f16x16(h: &[u16; 16]) -> [f32; 16] {
            let mut out = [0f32; 16];
            // SAFETY: 16 u16 in, 16 f32 out; unaligned.
            unsafe {
                for k in [0, 8] {
                    let v = _mm256_cvtph_ps(_mm_loadu_si128(h.as_ptr().add(k).cast()));
                    _mm256_storeu_ps(out.as_mut_ptr().add(k), v);
                }
            }
            out
        }

        /// # Safety
        /// The CPU must support F16C and AVX.
        #[inline]
        #[target_feature(enable = "avx,avx2,fma,f16c")]
        pub unsafe fn to_f16x16(v: &[f32; 16], dst: &mut [std::mem::MaybeUninit<u16>; 16]) {
            // SAFETY: 16 f32 in, 16 initialized u16 written; unaligned.
            unsafe {
                for k in [0, 8] {
                    let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(
                        v.as_ptr().add(k),
                    ));
                    _mm_storeu_si128(dst.as_mut_ptr().add(k).cast(), h);
                }
            }
        }

        /// 8 f64 lanes as two 4-lane vectors (lanes 0–3, 4–7).
        type V8 = (__m256d, __m256d);

        #[inline]
        #[target_feature(enable = "avx,avx2,fma")]
        fn splat8(m: f64) -> V8 {
            (_mm256_set1_pd(m), _mm256_set1_pd(m))
        }
        #[inline]
        #[target_feature(enable = "avx,avx2,fma")]
        fn load8(a: &[f64; LANES]) -> V8 {
            // SAFETY: `a` holds 8 f64: two unaligned 4-lane loads.
            unsafe {
                (
                    _mm256_loadu_pd(a.as_ptr()),
                    _mm256_loadu_pd(a.as_ptr().add(4)),
                )
            }
        }
        #[inline]
        #[target_feature(enable = "avx,avx2,fma")]
        fn store8(a: &mut [f64; LANES], v: V8) {
            // SAFETY: `a` holds 8 f64: two unaligned 4-lane stores.
            unsafe {
                _mm256_storeu_pd(a.as_mut_ptr(), v.0);
                _mm256_storeu_pd(a.as_mut_ptr().add(4), v.1);
            }
        }
        /// 8 f32 as f64, minus `m`.
        #[inline]
        #[target_feature(enable = "avx,avx2,fma")]
        fn wide(v: &[f32; LANES], m: V8) -> V8 {
            // SAFETY: `v` holds 8 f32: one unaligned load.
            let v = unsafe { _mm256_loadu_ps(v.as_ptr()) };
            (
                _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), m.0),
                _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v)), m.1),
            )
        }
        #[inline]
        #[target_feature(enable = "avx,avx2,fma")]
        fn add8(a: V8, b: V8) -> V8 {
            (_mm256_add_pd(a.0, b.0), _mm256_add_pd(a.1, b.1))
        }
        #[inline]
        #[target_feature(enable = "avx,avx2,fma")]
        fn fma8(a: V8, b: V8, c: V8) -> V8 {
            (
                _mm256_fmadd_pd(a.0, b.0, c.0),
                _mm256_fmadd_pd(a.1, b.1, c.1),
            )
        }
        lane_sums!("avx,avx2,fma");

        /// 4 values at `p` as f64, minus `m`: f32 loaded, bf16 shifted, f16 converted (F16C).
        #[inline]
        #[target_feature(enable = "avx,avx2,fma,f16c")]
        unsafe fn dev4<T: Element>(p: *const T, m: __m256d) -> __m256d {
            // SAFETY: the caller passes 4 readable values.
            unsafe {
                let f = match T::DTYPE {
                    DType::F32 => _mm_loadu_ps(p.cast()),
                    DType::BF16 => _mm_castsi128_ps(_mm_slli_epi32::<16>(_mm_cvtepu16_epi32(
                        _mm_loadl_epi64(p.cast()),
                    ))),
                    DType::F16 => _mm_cvtph_ps(_mm_loadl_epi64(p.cast())),
                };
                _mm256_sub_pd(_mm256_cvtps_pd(f), m)
            }
        }

        /// 8 values at `p` as f32: f32 loaded, bf16 shifted, f16 converted (F16C).
        ///
        /// # Safety
        /// `p` points to 8 readable values; the CPU supports AVX2 and F16C.
        #[inline]
        #[target_feature(enable = "avx,avx2,fma,f16c")]
        pub unsafe fn load8f<T: Element>(p: *const T) -> __m256 {
            // SAFETY: the caller passes 8 readable values.
            unsafe {
                match T::DTYPE {
                    DType::F32 => _mm256_loadu_ps(p.cast()),
                    DType::BF16 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(
                        _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast())),
                    )),
                    DType::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
                }
            }
        }

        /// 8 values at `p` as f32, minus `m`.
        #[inline]
        #[target_feature(enable = "avx,avx2,fma,f16c")]
        unsafe fn dev8f<T: Element>(p: *const T, m: __m256) -> __m256 {
            // SAFETY: the caller passes 8 readable values.
            unsafe { _mm256_sub_ps(load8f(p), m) }
        }
        #[inline]
        #[target_feature(enable = "avx,avx2,fma")]
        fn lo4(v: __m256) -> __m256d {
            _mm256_cvtps_pd(_mm256_castps256_ps128(v))
        }
        #[inline]
        #[target_feature(enable = "avx,avx2,fma")]
        fn hi4(v: __m256) -> __m256d {
            _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v))
        }

        cols_dev32_kernel!(
            "avx,avx2,fma,f16c",
            "AVX2, FMA and F16C",
            super::Fma,
            __m256,
            8,
            4,
            _mm256_setzero_ps,
            _mm256_loadu_ps,
            _mm256_add_ps,
            _mm256_fmadd_ps,
            dev8f,
            lo4,
            hi4,
            _mm256_loadu_pd,
            _mm256_storeu_pd,
            _mm256_add_pd
        );

        cols_sums_kernel!(
            "avx,avx2,fma,f16c",
            "AVX2, FMA and F16C",
            super::Fma,
            __m256d,
            4,
            _mm256_setzero_pd,
            _mm256_loadu_pd,
            _mm256_storeu_pd,
            _mm256_add_pd,
            _mm256_fmadd_pd,
            dev4
        );
    }

    /// The AVX-512 versions of the AVX2 loops: each pair of 4-lane f64 vectors becomes one
    /// 8-lane vector holding the same lanes, added in the same order, so the results are the
    /// AVX2 loops' bits.
    #[cfg(target_arch = "x86_64")]
    mod avx512 {
        use super::super::{
            col_kernel_shape, cols_dev32_portable, cols_sums_portable, prefetch_row,
            COL32_TILE_ROWS, COLS, COL_TILE_ROWS, LANES,
        };
        use crate::dtype::{DType, Element};
        use std::arch::x86_64::*;

        /// 32 f32 to bf16 by `vcvtne2ps2bf16` (round to nearest even; a NaN comes out quiet
        /// with its sign and top payload bits, as from `half`). The instruction reads f32
        /// subnormals as zero, so a chunk with a subnormal value is rounded in software.
        ///
        /// # Safety
        /// The CPU must support AVX-512 F/BW/VL/DQ and BF16 (the features enabled).
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")]
        pub unsafe fn to_bf16x32(v: &[f32; 32], dst: &mut [std::mem::MaybeUninit<u16>; 32]) {
            // SAFETY: 32 f32 in, 32 initialized u16 written; unaligned.
            unsafe {
                let lo = _mm512_loadu_ps(v.as_ptr());
                let hi = _mm512_loadu_ps(v.as_ptr().add(16));
                // Class 0x20: subnormal.
                let sub = _mm512_fpclass_ps_mask::<0x20>(lo) | _mm512_fpclass_ps_mask::<0x20>(hi);
                if sub != 0 {
                    for (d, v) in dst.iter_mut().zip(v) {
                        d.write(<half::bf16 as Element>::narrow1(*v).to_bits());
                    }
                    return;
                }
                let r: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(dst.as_mut_ptr().cast(), r);
            }
        }

        /// # Safety
        /// The CPU must support AVX-512 F/BW/VL/DQ, AVX2, FMA and F16C (the features enabled).
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
        pub unsafe fn f16x16(h: &[u16; 16]) -> [f32; 16] {
            let mut out = [0f32; 16];
            // SAFETY: 16 u16 in, 16 f32 out; unaligned.
            unsafe {
                let v = _mm512_cvtph_ps(_mm256_loadu_si256(h.as_ptr().cast()));
                _mm512_storeu_ps(out.as_mut_ptr(), v);
            }
            out
        }

        /// # Safety
        /// The CPU must support AVX-512 F/BW/VL/DQ, AVX2, FMA and F16C (the features enabled).
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
        pub unsafe fn to_f16x16(v: &[f32; 16], dst: &mut [std::mem::MaybeUninit<u16>; 16]) {
            // SAFETY: 16 f32 in, 16 initialized u16 written; unaligned.
            unsafe {
                let h = _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm512_loadu_ps(v.as_ptr()));
                _mm256_storeu_si256(dst.as_mut_ptr().cast(), h);
            }
        }

        /// 8 f64 lanes in one vector.
        type V8 = __m512d;

        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
        fn splat8(m: f64) -> V8 {
            _mm512_set1_pd(m)
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
        fn load8(a: &[f64; LANES]) -> V8 {
            // SAFETY: `a` holds 8 f64: one unaligned load.
            unsafe { _mm512_loadu_pd(a.as_ptr()) }
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
        fn store8(a: &mut [f64; LANES], v: V8) {
            // SAFETY: `a` holds 8 f64: one unaligned store.
            unsafe { _mm512_storeu_pd(a.as_mut_ptr(), v) }
        }
        /// 8 f32 as f64, minus `m`.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
        fn wide(v: &[f32; LANES], m: V8) -> V8 {
            // SAFETY: `v` holds 8 f32: one unaligned load.
            let v = unsafe { _mm256_loadu_ps(v.as_ptr()) };
            _mm512_sub_pd(_mm512_cvtps_pd(v), m)
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
        fn add8(a: V8, b: V8) -> V8 {
            _mm512_add_pd(a, b)
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
        fn fma8(a: V8, b: V8, c: V8) -> V8 {
            _mm512_fmadd_pd(a, b, c)
        }
        lane_sums!("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma");

        /// 8 values at `p` as f64, minus `m`: f32 loaded, bf16 shifted, f16 converted (F16C).
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
        unsafe fn dev8<T: Element>(p: *const T, m: __m512d) -> __m512d {
            // SAFETY: the caller passes 8 readable values; this CPU has AVX2 and F16C.
            unsafe { _mm512_sub_pd(_mm512_cvtps_pd(super::avx2::load8f(p)), m) }
        }

        /// 16 values at `p` as f32, minus `m`: f32 loaded, bf16 shifted, f16 converted.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
        unsafe fn dev16f<T: Element>(p: *const T, m: __m512) -> __m512 {
            // SAFETY: the caller passes 16 readable values.
            unsafe {
                let f = match T::DTYPE {
                    DType::F32 => _mm512_loadu_ps(p.cast()),
                    DType::BF16 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(
                        _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast())),
                    )),
                    DType::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())),
                };
                _mm512_sub_ps(f, m)
            }
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
        fn lo8(v: __m512) -> __m512d {
            _mm512_cvtps_pd(_mm512_castps512_ps256(v))
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
        fn hi8(v: __m512) -> __m512d {
            _mm512_cvtps_pd(_mm512_extractf32x8_ps::<1>(v))
        }

        cols_dev32_kernel!(
            "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c",
            "AVX-512 F/BW/VL/DQ, AVX2, FMA and F16C",
            super::Avx512,
            __m512,
            16,
            8,
            _mm512_setzero_ps,
            _mm512_loadu_ps,
            _mm512_add_ps,
            _mm512_fmadd_ps,
            dev16f,
            lo8,
            hi8,
            _mm512_loadu_pd,
            _mm512_storeu_pd,
            _mm512_add_pd
        );

        cols_sums_kernel!(
            "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c",
            "AVX-512 F/BW/VL/DQ, AVX2, FMA and F16C",
            super::Avx512,
            __m512d,
            8,
            _mm512_setzero_pd,
            _mm512_loadu_pd,
            _mm512_storeu_pd,
            _mm512_add_pd,
            _mm512_fmadd_pd,
            dev8
        );
    }

    /// The widest instruction set the kernels use on this CPU.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
    pub enum Level {
        Baseline,
        /// AVX2, FMA and F16C (every AVX2 CPU has F16C; the AVX2 kernels convert f16 with it).
        Avx2,
        /// AVX-512 F, BW, VL and DQ, with AVX2, FMA and F16C.
        Avx512,
    }

    impl Level {
        /// `"baseline"`, `"avx2"` or `"avx512"`: the names `CUNORM_CPU_ISA` takes.
        pub fn name(self) -> &'static str {
            match self {
                Level::Baseline => "baseline",
                Level::Avx2 => "avx2",
                Level::Avx512 => "avx512",
            }
        }
    }

    /// What the CPU supports, capped by the environment variable `CUNORM_CPU_ISA`
    /// (`baseline`, `avx2` or `avx512`; read once; it can only lower the level, and any other
    /// value is ignored): for comparing the versions on one machine, and for the tests that run
    /// every version.
    pub fn level() -> Level {
        static LEVEL: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
        *LEVEL.get_or_init(|| {
            detect().min(match std::env::var("CUNORM_CPU_ISA").as_deref() {
                Ok("baseline") => Level::Baseline,
                Ok("avx2") => Level::Avx2,
                _ => Level::Avx512,
            })
        })
    }

    fn detect() -> Level {
        #[cfg(target_arch = "x86_64")]
        {
            use std::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") && has!("f16c") {
                if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512dq") {
                    return Level::Avx512;
                }
                return Level::Avx2;
            }
        }
        Level::Baseline
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

/// Allocates `n` elements (a large one from the buffers of dropped tensors, `crate::cpu_cache`,
/// when one fits) and lets `fill` write every one of them.
pub(crate) fn filled_vec<T: Element>(n: usize, fill: impl FnOnce(&mut [Out<T>])) -> Vec<T> {
    let mut v: Vec<T> = crate::cpu_cache::take(n).unwrap_or_else(|| Vec::with_capacity(n));
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

// The tile loops are macros, not functions taking closures: a closure is compiled as a
// function of its own, without the AVX2/FMA features of the multiversioned kernel around it,
// and LLVM does not always inline it back (a software `fma` call per element, seen in a
// profile). A macro puts the loop body in the kernel itself.

/// `for_tiles!(x, |offset, tile| body)`: runs `body` on consecutive tiles of `x` as f32.
macro_rules! for_tiles {
    ($bufs:expr, $x:expr, |$o:pat_param, $t:ident| $body:expr) => {{
        let (bufs, x): (&mut $crate::ops::engine::Bufs, _) = ($bufs, $x);
        for (k, c) in x.chunks($crate::ops::engine::TILE).enumerate() {
            let $o = k * $crate::ops::engine::TILE;
            let $t: &[f32] = $crate::ops::engine::widened(c, &mut bufs.x);
            $body;
        }
    }};
}
pub(crate) use for_tiles;

/// `for_tiles2!(g, x, |offset, g_tile, x_tile| body)`: the same over two equally long runs.
macro_rules! for_tiles2 {
    ($bufs:expr, $g:expr, $x:expr, |$o:pat_param, $gt:ident, $xt:ident| $body:expr) => {{
        let (bufs, g, x): (&mut $crate::ops::engine::Bufs, _, _) = ($bufs, $g, $x);
        let tiles = g
            .chunks($crate::ops::engine::TILE)
            .zip(x.chunks($crate::ops::engine::TILE));
        for (k, (gc, xc)) in tiles.enumerate() {
            let $o = k * $crate::ops::engine::TILE;
            let $gt: &[f32] = $crate::ops::engine::widened(gc, &mut bufs.g);
            let $xt: &[f32] = $crate::ops::engine::widened(xc, &mut bufs.x);
            $body;
        }
    }};
}
pub(crate) use for_tiles2;

/// `with_out_tile!(bufs, out, s, e, |y_tile| body)`: `body` fills `out[s..e]` as an f32 tile,
/// written in place for f32, else computed in `bufs.y` and rounded into `out`.
macro_rules! with_out_tile {
    ($bufs:expr, $out:expr, $s:expr, $e:expr, |$yt:ident| $body:expr) => {{
        let (s, e) = ($s, $e);
        let direct = $crate::ops::engine::is_f32_out($out);
        {
            let $yt = $crate::ops::engine::out_tile(&mut $out[s..e], &mut $bufs.y);
            $body;
        }
        if !direct {
            $crate::ops::engine::flush(&$bufs.y[..e - s], &mut $out[s..e]);
        }
    }};
}
pub(crate) use with_out_tile;

/// `map_tiles!(x, out, |offset, x_tile, y_tile| body)`: `body` writes every element of the f32
/// output tile (`&mut [Out<f32>]`), which is `out` itself for f32 and is otherwise rounded once
/// to the element type. Tiles are laid out so that `out`'s vector stores are 64-byte aligned.
macro_rules! map_tiles {
    ($bufs:expr, $x:expr, $out:expr, |$o:pat_param, $xt:ident, $yt:ident| $body:expr) => {{
        let (bufs, x, out): (&mut $crate::ops::engine::Bufs, _, _) = ($bufs, $x, $out);
        for (s, e) in $crate::ops::engine::out_tiles(out) {
            let $o = s;
            let $xt: &[f32] = $crate::ops::engine::widened(&x[s..e], &mut bufs.x);
            $crate::ops::engine::with_out_tile!(bufs, out, s, e, |$yt| $body);
        }
    }};
}
pub(crate) use map_tiles;

/// `map_tiles2!(g, x, out, |offset, g_tile, x_tile, y_tile| body)`: [`map_tiles!`] with two
/// inputs.
macro_rules! map_tiles2 {
    ($bufs:expr, $g:expr, $x:expr, $out:expr, |$o:pat_param, $gt:ident, $xt:ident, $yt:ident| $body:expr) => {{
        let (bufs, g, x, out): (&mut $crate::ops::engine::Bufs, _, _, _) = ($bufs, $g, $x, $out);
        for (s, e) in $crate::ops::engine::out_tiles(out) {
            let $o = s;
            let $gt: &[f32] = $crate::ops::engine::widened(&g[s..e], &mut bufs.g);
            let $xt: &[f32] = $crate::ops::engine::widened(&x[s..e], &mut bufs.x);
            $crate::ops::engine::with_out_tile!(bufs, out, s, e, |$yt| $body);
        }
    }};
}
pub(crate) use map_tiles2;

/// The f32 tiles of a kernel: made once per task (zeroing them per row would cost more than
/// a short row's work) and passed to the tile macros.
pub(crate) struct Bufs {
    pub g: [f32; TILE],
    pub x: [f32; TILE],
    pub y: [Out<f32>; TILE],
}

impl Bufs {
    #[inline(always)]
    pub fn new() -> Bufs {
        Bufs {
            g: [0.0; TILE],
            x: [0.0; TILE],
            y: [Out::new(0.0); TILE],
        }
    }
}

/// `map_elems!(bufs, x, out, [c = coef_slice, ...], |v| expr)`: `out[k] = expr` for each
/// value `v = x[k]` as f32, with `c = coef_slice[k]` for each listed slice (as long as `x`),
/// rounded once to the element type. For f32 and bf16 ([`Element::FUSED`]) one loop converts
/// in registers; for f16 the run goes through f32 tiles (bulk F16C conversion). Every slice is
/// cut to the loop's length first, so the indexing has no bounds checks left to stop LLVM
/// vectorizing. `expr` must use `v` only in arithmetic ([`Element::widen1_arith`]).
macro_rules! map_elems {
    ($bufs:expr, $x:expr, $out:expr, [$($cv:ident = $c:expr),*], |$v:ident| $body:expr) => {{
        let (bufs, x, out): (&mut $crate::ops::engine::Bufs, _, _) = ($bufs, $x, $out);
        if let (true, Some(xb), Some(ob)) = (
            <I as $crate::ops::engine::simd::Isa>::BF16,
            $crate::dtype::Element::bf16_bits(x),
            $crate::dtype::Element::bf16_bits_out(&mut *out),
        ) {
            // bf16 with AVX-512 BF16: 32 outputs rounded by one instruction.
            $crate::ops::engine::map_chunks!(32, bf16x32, to_bf16x32, bf16_widen1, bf16_narrow1,
                ob, [xb => $v], [$($cv = $c),*], $body);
        } else if $crate::ops::engine::fused(x) {
            let n = out.len().min(x.len());
            let (out, x) = (&mut out[..n], &x[..n]);
            $(let $cv: &[f32] = &$c[..n];)*
            for k in 0..n {
                $(let $cv = $cv[k];)*
                let $v = $crate::dtype::Element::widen1_arith(x[k]);
                out[k].write($crate::dtype::Element::narrow1($body));
            }
        } else if let (true, Some(xb), Some(ob)) = (
            <I as $crate::ops::engine::simd::Isa>::F16C,
            $crate::dtype::Element::f16_bits(x),
            $crate::dtype::Element::f16_bits_out(&mut *out),
        ) {
            // f16 with F16C: 16 values converted in registers at a time (one AVX-512 or two
            // AVX2 instructions).
            $crate::ops::engine::map_chunks!(16, f16x16, to_f16x16, f16_widen1, f16_narrow1,
                ob, [xb => $v], [$($cv = $c),*], $body);
        } else {
            $crate::ops::engine::map_tiles!(bufs, x, out, |off, xt, yt| {
                let n = yt.len().min(xt.len());
                let (yt, xt) = (&mut yt[..n], &xt[..n]);
                let _ = off;
                $(let $cv: &[f32] = &$c[off..off + n];)*
                for k in 0..n {
                    $(let $cv = $cv[k];)*
                    let $v = xt[k];
                    yt[k].write($body);
                }
            });
        }
    }};
}
pub(crate) use map_elems;

/// `map_elems2!(bufs, g, x, out, [c = coef_slice, ...], |gv, xv| expr)`: [`map_elems!`] with
/// two inputs.
macro_rules! map_elems2 {
    ($bufs:expr, $g:expr, $x:expr, $out:expr, [$($cv:ident = $c:expr),*], |$gv:ident, $xv:ident| $body:expr) => {{
        let (bufs, g, x, out): (&mut $crate::ops::engine::Bufs, _, _, _) = ($bufs, $g, $x, $out);
        if let (true, Some(gb), Some(xb), Some(ob)) = (
            <I as $crate::ops::engine::simd::Isa>::BF16,
            $crate::dtype::Element::bf16_bits(g),
            $crate::dtype::Element::bf16_bits(x),
            $crate::dtype::Element::bf16_bits_out(&mut *out),
        ) {
            // bf16 with AVX-512 BF16: 32 outputs rounded by one instruction.
            $crate::ops::engine::map_chunks!(32, bf16x32, to_bf16x32, bf16_widen1, bf16_narrow1,
                ob, [gb => $gv, xb => $xv], [$($cv = $c),*], $body);
        } else if $crate::ops::engine::fused(x) {
            let n = out.len().min(x.len()).min(g.len());
            let (out, g, x) = (&mut out[..n], &g[..n], &x[..n]);
            $(let $cv: &[f32] = &$c[..n];)*
            for k in 0..n {
                $(let $cv = $cv[k];)*
                let $gv = $crate::dtype::Element::widen1_arith(g[k]);
                let $xv = $crate::dtype::Element::widen1_arith(x[k]);
                out[k].write($crate::dtype::Element::narrow1($body));
            }
        } else if let (true, Some(gb), Some(xb), Some(ob)) = (
            <I as $crate::ops::engine::simd::Isa>::F16C,
            $crate::dtype::Element::f16_bits(g),
            $crate::dtype::Element::f16_bits(x),
            $crate::dtype::Element::f16_bits_out(&mut *out),
        ) {
            // f16 with F16C: 16 values converted in registers at a time.
            $crate::ops::engine::map_chunks!(16, f16x16, to_f16x16, f16_widen1, f16_narrow1,
                ob, [gb => $gv, xb => $xv], [$($cv = $c),*], $body);
        } else {
            $crate::ops::engine::map_tiles2!(bufs, g, x, out, |off, gt, xt, yt| {
                let n = yt.len().min(xt.len()).min(gt.len());
                let (yt, gt, xt) = (&mut yt[..n], &gt[..n], &xt[..n]);
                let _ = off;
                $(let $cv: &[f32] = &$c[off..off + n];)*
                for k in 0..n {
                    $(let $cv = $cv[k];)*
                    let ($gv, $xv) = (gt[k], xt[k]);
                    yt[k].write($body);
                }
            });
        }
    }};
}
pub(crate) use map_elems2;

/// The in-register arm of [`map_elems!`]/[`map_elems2!`] for a 16-bit type held as bits:
/// inputs `$ib` (bits) widened `$w` at a time by `Isa::$widen` and bound to `$iv`, `$w`
/// outputs computed in f32 and rounded by `Isa::$narrow` into `$ob`; the tail value by value
/// with `$widen1`/`$narrow1` (the same rounding, bit for bit).
macro_rules! map_chunks {
    ($w:literal, $widen:ident, $narrow:ident, $widen1:ident, $narrow1:ident,
     $ob:ident, [$($ib:ident => $iv:ident),+], [$($cv:ident = $c:expr),*], $body:expr) => {{
        let n = $ob.len()$(.min($ib.len()))+;
        let $ob = &mut $ob[..n];
        $(let $ib = &$ib[..n];)+
        $(let $cv: &[f32] = &$c[..n];)*
        let full = n / $w * $w;
        for k0 in (0..full).step_by($w) {
            $(let $ib = <I as $crate::ops::engine::simd::Isa>::$widen($ib[k0..k0 + $w].try_into().unwrap());)+
            $(let $cv: &[f32; $w] = $cv[k0..k0 + $w].try_into().unwrap();)*
            let mut ys = [0f32; $w];
            for l in 0..$w {
                $(let $cv = $cv[l];)*
                $(let $iv = $ib[l];)+
                ys[l] = $body;
            }
            <I as $crate::ops::engine::simd::Isa>::$narrow(&ys, (&mut $ob[k0..k0 + $w]).try_into().unwrap());
        }
        for k in full..n {
            $(let $cv = $cv[k];)*
            $(let $iv = $crate::ops::engine::$widen1($ib[k]);)+
            $ob[k].write($crate::ops::engine::$narrow1($body));
        }
    }};
}
pub(crate) use map_chunks;

/// One f16 (bits) as f32.
#[inline(always)]
pub(crate) fn f16_widen1(b: u16) -> f32 {
    half::f16::from_bits(b).to_f32()
}
/// One f32 rounded to f16 (bits).
#[inline(always)]
pub(crate) fn f16_narrow1(v: f32) -> u16 {
    half::f16::from_f32(v).to_bits()
}
/// One bf16 (bits) as f32: a shift, no quieting (every use in the element loops is
/// arithmetic, see `Element::widen1_arith`).
#[inline(always)]
pub(crate) fn bf16_widen1(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}
/// One f32 rounded to bf16 (bits), as `half`.
#[inline(always)]
pub(crate) fn bf16_narrow1(v: f32) -> u16 {
    <half::bf16 as Element>::narrow1(v).to_bits()
}

#[inline(always)]
pub(crate) fn fused<T: Element>(_: &[T]) -> bool {
    T::FUSED
}

/// A run of at most TILE values as f32: itself for f32, else widened into `buf`.
#[inline(always)]
pub(crate) fn widened<'a, T: Element>(x: &'a [T], buf: &'a mut [f32; TILE]) -> &'a [f32] {
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

/// Tile bounds over `out`: a short first tile that brings `out` to a 64-byte boundary (so that
/// the vector stores of every later tile do not straddle cache lines), then full tiles.
#[inline(always)]
pub(crate) fn out_tiles<T>(out: &[Out<T>]) -> impl Iterator<Item = (usize, usize)> {
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

#[inline(always)]
pub(crate) fn is_f32_out<T: Element>(_: &[Out<T>]) -> bool {
    T::DTYPE == crate::DType::F32
}

/// Where an output tile is computed: `out` itself for f32, else `buf` (always initialized).
#[inline(always)]
pub(crate) fn out_tile<'a, T: Element>(
    out: &'a mut [Out<T>],
    buf: &'a mut [Out<f32>; TILE],
) -> &'a mut OutTile {
    let n = out.len();
    match T::as_f32s_out(out) {
        Some(o) => o,
        None => &mut buf[..n],
    }
}

/// Rounds a computed tile (`buf`) into `out`.
#[inline(always)]
pub(crate) fn flush<T: Element>(buf: &[Out<f32>], out: &mut [Out<T>]) {
    // SAFETY: the buffer was created initialized (`Out::new`) and only ever written with
    // values, so every element is an initialized f32.
    let yt: &[f32] = unsafe { &*(buf as *const [Out<f32>] as *const [f32]) };
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

/// Adds Σ (x − m) and Σ (x − m)² of a tile into f64 lanes.
#[inline(always)]
pub(crate) fn acc_dev<I: simd::Isa>(
    a1: &mut [f64; LANES],
    a2: &mut [f64; LANES],
    t: &[f32],
    m: f64,
) {
    I::acc_dev(a1, a2, t, m)
}

/// [`simd::Isa::acc_grad`] in portable code.
#[inline(always)]
pub(crate) fn acc_grad_portable<I: simd::Isa>(
    a1: &mut [f64; LANES],
    a2: &mut [f64; LANES],
    g: &[f32],
    x: &[f32],
    m: f64,
) {
    let (gc, gtl) = g.as_chunks::<LANES>();
    let (xc, xtl) = x.as_chunks::<LANES>();
    for (gv, xv) in gc.iter().zip(xc) {
        let gg: [f64; LANES] = std::array::from_fn(|i| gv[i] as f64);
        let d: [f64; LANES] = std::array::from_fn(|i| xv[i] as f64 - m);
        for i in 0..LANES {
            a1[i] += gg[i];
        }
        for i in 0..LANES {
            a2[i] = I::fma(gg[i], d[i], a2[i]);
        }
    }
    for (i, (gv, xv)) in gtl.iter().zip(xtl).enumerate() {
        a1[i] += *gv as f64;
        a2[i] = I::fma(*gv as f64, *xv as f64 - m, a2[i]);
    }
}

/// [`acc_dev`] in portable code.
#[inline(always)]
pub(crate) fn acc_dev_portable<I: simd::Isa>(
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

/// Columns reduced together by the column kernels ([`simd::Isa::cols_sums`]): one 64-byte line
/// of f32 per row.
pub(crate) const COLS: usize = 16;
/// Rows per tile of the column kernels: the tile's rows are read column group by column group
/// while in L1 (4 rows of 256 f32 columns of dy and x: 8 KiB), and the tiles walked through
/// memory in order. 4 rows measured a little faster than 2, 8 or 32 here.
pub(crate) const COL_TILE_ROWS: usize = 4;

/// [`simd::Isa::cols_sums`] in portable code, for the columns from `c0` (the AVX2 and AVX-512 kernels'
/// remainders after their full groups).
#[inline(always)]
pub(crate) fn cols_sums_portable<I: simd::Isa, T: Element, const GRAD: bool>(
    g: &[T],
    x: &[T],
    cols: usize,
    c0: usize,
    m: &[f64],
    s: &mut [f64],
    q: &mut [f64],
) {
    if cols == 0 {
        return;
    }
    for (gr, xr) in g.chunks_exact(cols).zip(x.chunks_exact(cols)) {
        for j in c0..cols {
            let d = xr[j].widen1_arith() as f64 - m[j];
            let gv = if GRAD { gr[j].widen1_arith() as f64 } else { d };
            s[j] += gv;
            q[j] = I::fma(gv, d, q[j]);
        }
    }
}

/// Rows per tile of the f32 column kernels ([`simd::Isa::cols_dev32`]): each column's f32
/// sums run over this many rows before they are added into f64.
pub(crate) const COL32_TILE_ROWS: usize = 8;
/// The checks and sizes the column kernels share: `None` without columns, else the rows, the
/// columns of the full groups of [`COLS`], and the prefetch distance in elements (whole rows).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn col_kernel_shape<T>(
    g: &[T],
    x: &[T],
    cols: usize,
    m: usize,
    s: &[f64],
    q: &[f64],
) -> Option<(usize, usize, usize)> {
    if cols == 0 {
        return None;
    }
    assert!(
        g.len() >= x.len() && m >= cols && s.len() >= cols && q.len() >= cols,
        "column kernel: {cols} columns"
    );
    let ahead = PF_BYTES.div_ceil(cols * std::mem::size_of::<T>()) * cols;
    Some((x.len() / cols, cols / COLS * COLS, ahead))
}

/// Prefetches the line `ahead` elements after `xp` (and after `gp` for gradient sums) into
/// L2. A hint: the address may lie past the data (never dereferenced; prefetches do not fault).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_row<T, const GRAD: bool>(gp: *const T, xp: *const T, ahead: usize) {
    use std::arch::x86_64::_mm_prefetch;
    // SAFETY: a prefetch reads nothing architecturally and never faults.
    unsafe {
        _mm_prefetch::<PF_HINT>(xp.wrapping_add(ahead).cast::<i8>());
        if GRAD {
            _mm_prefetch::<PF_HINT>(gp.wrapping_add(ahead).cast::<i8>());
        }
    }
}

/// How far ahead the column kernels prefetch (bytes, rounded to whole rows).
#[cfg(target_arch = "x86_64")]
pub(crate) const PF_BYTES: usize = 16 << 10;
/// Into L2: the block is read column group by column group down each tile, a walk the
/// hardware prefetchers did not follow (the f16 statistics pass ran at ~6 GB/s).
#[cfg(target_arch = "x86_64")]
pub(crate) const PF_HINT: i32 = std::arch::x86_64::_MM_HINT_T1;

/// [`simd::Isa::cols_dev32`] in portable code, for the columns from `c0`.
#[inline(always)]
pub(crate) fn cols_dev32_portable<I: simd::Isa, T: Element, const GRAD: bool>(
    g: &[T],
    x: &[T],
    cols: usize,
    c0: usize,
    m: &[f32],
    s: &mut [f64],
    q: &mut [f64],
) {
    if cols == 0 || c0 >= cols {
        return;
    }
    let rows = x.len() / cols;
    for r0 in (0..rows).step_by(COL32_TILE_ROWS) {
        let r1 = (r0 + COL32_TILE_ROWS).min(rows);
        for j in c0..cols {
            let (mut a1, mut a2) = (0f32, 0f32);
            for r in r0..r1 {
                let d = x[r * cols + j].widen1_arith() - m[j];
                let gv = if GRAD {
                    g[r * cols + j].widen1_arith()
                } else {
                    d
                };
                a1 += gv;
                a2 = I::fma32(gv, d, a2);
            }
            s[j] += a1 as f64;
            q[j] += a2 as f64;
        }
    }
}

/// The largest Σ(x − m)² / Σ(x − x̄)² at which [`f32_col_sums_accurate`] takes f32 sums.
pub(crate) const F32_SUMS_RATIO: f64 = 8.0;

/// Whether the f32 column sums `s1 = Σ(x − m)`, `s2 = Σ(x − m)²` of `n` values shifted by
/// `m` ([`simd::Isa::cols_dev32`]) give the variance to f32 accuracy, so that
/// `Moments::two_pass(n, m, s1, s2)` may be used instead of the exact f64 sums.
///
/// With u = 2⁻²⁴ and tiles of k = [`COL32_TILE_ROWS`] rows, each deviation is rounded once,
/// and each tile's f32 sums add k terms: |Δs2| ≤ (k + 2)·u·s2 and
/// |Δs1| ≤ (k + 1)·u·Σ|x − m| ≤ (k + 1)·u·√(n·s2), so M2 = s2 − s1²/n is off by at most
/// (3k + 4)·u·s2 (the f64 additions add ~1e-16). Taking the sums only where
/// s2 ≤ [`F32_SUMS_RATIO`]·M2 bounds M2's relative error by 8·28·u ≈ 1.3e-5 (the variance's
/// error is then far below a bf16 or f16 ulp of any output), and never lets a shift far
/// from the mean cancel catastrophically. Non-finite sums (an infinite or NaN input, or an
/// f32 overflow of a deviation or its square) and any nonzero s2 below n·2⁻¹⁰⁰ (where
/// squares of small deviations could underflow f32 and lose their relative accuracy) fail,
/// and the caller takes the exact f64 path.
///
/// s2 = 0 passes only with s1 = 0 and |m| ≥ 2⁻⁵⁰: then every value equals m (a value x ≠ m
/// lies at least 2⁻⁷⁴ from it, whose square does not round to 0), so the column is constant
/// and its variance exactly 0. Near a zero shift, deviations below ~2⁻⁷⁵ (bf16 has f32's
/// range) square to 0 and a column of ±1e-23 would read as constant: the caller proves such
/// a column constant by a scan ([`column_is`]) or takes the f64 path.
#[inline(always)]
pub(crate) fn f32_col_sums_accurate(n: f64, m: f32, s1: f64, s2: f64) -> bool {
    if !(s1.is_finite() && s2.is_finite()) {
        return false;
    }
    if s2 == 0.0 {
        return s1 == 0.0 && m.abs() >= 1.0 / (1u64 << 50) as f32;
    }
    const TINY: f64 = 1.0 / (1u128 << 100) as f64;
    s2 >= n * TINY && s2 <= F32_SUMS_RATIO * (s2 - s1 * s1 / n)
}

/// The shortest run whose bf16/f16 moments take the f32 lanes.
pub(crate) const F32_RUN_MIN: usize = 256;

/// Moments of a run of at most [`RUN_CHUNK`] values (a LayerNorm row, a planes run's piece):
/// bf16/f16 runs of at least [`F32_RUN_MIN`] values in f32 lanes ([`run_moments_f32`]) where
/// accurate; f32, shorter and declined runs in f64 lanes ([`moments_body`]).
#[inline(always)]
pub(crate) fn moments_of<T: Element, I: simd::Isa>(bufs: &mut Bufs, x: &[T]) -> Moments {
    if T::DTYPE != crate::dtype::DType::F32 && x.len() >= F32_RUN_MIN {
        if let Some(m) = run_moments_f32::<T, I>(x) {
            return m;
        }
    }
    moments_body::<T, I>(bufs, x)
}

/// A bf16/f16 run's moments in f32 lanes: the run as rows of [`COLS`] values through the
/// column kernel ([`simd::Isa::cols_dev32`]), every column shifted by one value (the f32 mean
/// of the first row), the columns' f64 sums and the tail's added into one shifted sum pair.
/// Kept where [`f32_col_sums_accurate`] holds for the run (the kernel's bound does not depend
/// on how its f64 sums are grouped), else `None`.
#[inline(always)]
pub(crate) fn run_moments_f32<T: Element, I: simd::Isa>(x: &[T]) -> Option<Moments> {
    let head = &x[..x.len().min(COLS)];
    let m = head.iter().map(|v| v.widen1_arith()).sum::<f32>() / head.len().max(1) as f32;
    if head.is_empty() || !m.is_finite() {
        return None;
    }
    let (s1, s2) = run_dev32::<T, I>(x, m);
    let n = x.len() as f64;
    f32_col_sums_accurate(n, m, s1, s2).then(|| Moments::two_pass(n, m as f64, s1, s2))
}

/// Σ(x − m) and Σ(x − m)² of a bf16/f16 run in f32 lanes: the run as rows of [`COLS`] values
/// through the column kernel ([`simd::Isa::cols_dev32`]: f32 partials over
/// [`COL32_TILE_ROWS`] values, added into f64), the 16 columns' sums and the tail (in f64)
/// added into one pair. Not checked: the caller decides whether the sums are accurate.
#[inline(always)]
pub(crate) fn run_dev32<T: Element, I: simd::Isa>(x: &[T], m: f32) -> (f64, f64) {
    let full = x.len() / COLS * COLS;
    let (mut s, mut q) = ([0f64; COLS], [0f64; COLS]);
    I::cols_dev32::<T, false>(&x[..full], &x[..full], COLS, &[m; COLS], &mut s, &mut q);
    let (mut s1, mut s2) = (s.iter().sum::<f64>(), q.iter().sum::<f64>());
    for v in &x[full..] {
        let d = v.widen1_arith() as f64 - m as f64;
        s1 += d;
        s2 += d * d;
    }
    (s1, s2)
}

/// Whether every value of column `c` of a row-major block of `cols` columns equals `m`
/// (as f32; -0 equals +0).
#[inline(always)]
pub(crate) fn column_is<T: Element>(block: &[T], cols: usize, c: usize, m: f32) -> bool {
    block
        .iter()
        .skip(c)
        .step_by(cols.max(1))
        .all(|v| v.widen1_arith() == m)
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

/// The shifted two-pass moments of one f32 tile: Σ (x − s) and Σ (x − s)² in f64 lanes,
/// `s` the tile's first value, and the correction `s + Σ(x − s)/n`,
/// `Σ(x − s)² − (Σ(x − s))²/n`. Since `s` is one of the values, (mean − s)² ≤ n·var, so the
/// correction loses at most a factor of about n (≤ 512) to cancellation: f64 accuracy to
/// ~1e-12, never E[x²] − E[x]², and one pass over the tile.
#[inline(always)]
pub(crate) fn tile_moments<I: simd::Isa>(t: &[f32]) -> Moments {
    let n = t.len() as f64;
    // A non-finite first value would make every deviation NaN or infinite: shift by 0 instead
    // (the f64 deviations then carry the infinities and NaNs as the plain sums do).
    let m = t
        .first()
        .filter(|v| v.is_finite())
        .map_or(0.0, |&v| v as f64);
    let (mut a1, mut a2) = ([0f64; LANES], [0f64; LANES]);
    acc_dev::<I>(&mut a1, &mut a2, t, m);
    Moments::two_pass(n, m, lanes_sum(a1), lanes_sum(a2))
}

/// Moments of a run: the corrected two-pass on each f32 tile while it is in L1 (the run is
/// widened and read once), tiles merged in order with Chan's formula in f64.
#[inline(always)]
pub(crate) fn moments_body<T: Element, I: simd::Isa>(bufs: &mut Bufs, x: &[T]) -> Moments {
    let mut acc = Moments::default();
    for_tiles!(bufs, x, |_, t| {
        acc = acc.merge(tile_moments::<I>(t));
    });
    acc
}

#[cfg(test)]
mod tests {
    use super::simd::{self, Isa, Level};
    use super::*;
    use half::{bf16, f16};

    /// Values of unit scale around 3, from a fixed LCG.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                3.0 + ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
            })
            .collect()
    }

    fn column_sums<T: Element, I: Isa, const GRAD: bool>(
        g: &[T],
        x: &[T],
        cols: usize,
    ) -> (Vec<u64>, Vec<u64>) {
        let m: Vec<f64> = (0..cols).map(|j| 2.5 + j as f64 * 1e-3).collect();
        let (mut s, mut q) = (vec![0.25; cols], vec![0.5; cols]);
        I::cols_sums::<T, GRAD>(g, x, cols, &m, &mut s, &mut q);
        let bits = |v: Vec<f64>| v.into_iter().map(f64::to_bits).collect();
        (bits(s), bits(q))
    }

    fn columns_agree<T: Element>() {
        for cols in [1, 7, 16, 17, 33, 40] {
            for rows in [0, 1, 3, 4, 5, 9, 17] {
                let n = rows * cols;
                let (g, x) = (values(n, 1), values(n, 2));
                let (g, x): (Vec<T>, Vec<T>) = (
                    g.iter().map(|&v| T::narrow1(v)).collect(),
                    x.iter().map(|&v| T::narrow1(v)).collect(),
                );
                assert_eq!(
                    column_sums::<T, simd::Avx512, false>(&g, &x, cols),
                    column_sums::<T, simd::Fma, false>(&g, &x, cols),
                    "{} statistics, {rows} x {cols}",
                    T::DTYPE
                );
                assert_eq!(
                    column_sums::<T, simd::Avx512, true>(&g, &x, cols),
                    column_sums::<T, simd::Fma, true>(&g, &x, cols),
                    "{} gradient sums, {rows} x {cols}",
                    T::DTYPE
                );
                // The f32 column kernel: AVX-512, AVX2 and the portable loop (with fused
                // multiply-adds, as the kernels' remainder columns) give the same bits.
                let dev32 = |k: u8| {
                    let m: Vec<f32> = (0..cols).map(|j| 2.5 + j as f32 * 1e-3).collect();
                    let (mut s, mut q) = (vec![0.25; cols], vec![0.5; cols]);
                    match k {
                        0 => simd::Avx512::cols_dev32::<T, false>(&g, &x, cols, &m, &mut s, &mut q),
                        1 => simd::Fma::cols_dev32::<T, false>(&g, &x, cols, &m, &mut s, &mut q),
                        2 => cols_dev32_portable::<simd::Fma, T, false>(
                            &g, &x, cols, 0, &m, &mut s, &mut q,
                        ),
                        3 => simd::Avx512::cols_dev32::<T, true>(&g, &x, cols, &m, &mut s, &mut q),
                        4 => simd::Fma::cols_dev32::<T, true>(&g, &x, cols, &m, &mut s, &mut q),
                        _ => cols_dev32_portable::<simd::Fma, T, true>(
                            &g, &x, cols, 0, &m, &mut s, &mut q,
                        ),
                    }
                    let bits = |v: Vec<f64>| v.into_iter().map(f64::to_bits).collect::<Vec<_>>();
                    (bits(s), bits(q))
                };
                assert_eq!(
                    dev32(0),
                    dev32(1),
                    "{} f32 column sums, {rows} x {cols}",
                    T::DTYPE
                );
                assert_eq!(
                    dev32(1),
                    dev32(2),
                    "{} f32 column sums, {rows} x {cols}",
                    T::DTYPE
                );
                for k in [3, 4] {
                    assert_eq!(
                        dev32(k),
                        dev32(k + 1),
                        "{} f32 gradient sums, {rows} x {cols}",
                        T::DTYPE
                    );
                }
            }
        }
    }

    /// The in-register f16 conversions of each instruction set give half's bits: every f16
    /// value widened, and the f16 rounding cases and the conversion tests' bit patterns
    /// rounded (nearest even; NaN stays NaN).
    #[test]
    fn f16x16_conversions_match_half() {
        fn check<I: Isa>() {
            let all: Vec<u16> = (0..=u16::MAX).collect();
            for h in all.chunks_exact(16) {
                let got = I::f16x16(h.try_into().unwrap());
                for (g, &b) in got.iter().zip(h) {
                    let want = f16::from_bits(b).to_f32();
                    assert!(
                        g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                        "{b:#x}"
                    );
                }
            }
            let mut vals = crate::dtype::tests::f16_rounding_cases();
            vals.extend(crate::dtype::tests::bit_patterns());
            vals.resize(vals.len().div_ceil(16) * 16, 0.0);
            for v in vals.chunks_exact(16) {
                let mut out = [std::mem::MaybeUninit::new(0u16); 16];
                I::to_f16x16(v.try_into().unwrap(), &mut out);
                for (o, &x) in out.iter().zip(v) {
                    // SAFETY: to_f16x16 writes all 16.
                    let got = f16::from_bits(unsafe { o.assume_init() });
                    let want = f16::from_f32(x);
                    assert!(
                        got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                        "{x:e}"
                    );
                }
            }
        }
        check::<simd::Plain>();
        if simd::level() >= Level::Avx2 {
            check::<simd::Fma>();
        }
        if simd::level() >= Level::Avx512 {
            check::<simd::Avx512>();
        }
    }

    /// bf16 rounding 32 at a time (AVX-512 BF16 where the CPU has it, else the portable
    /// default) gives `half::bf16::from_f32`'s bits, NaN payloads included: every bf16 value,
    /// its negation, the midpoint to the next one and the f32 values either side of it; the
    /// conversion tests' bit patterns; every top half with random low bits; f32 subnormals
    /// (which the instruction reads as zero) alone and among normal values in a chunk.
    #[test]
    fn bf16x32_rounding_matches_half() {
        fn check<I: Isa>() {
            let mut vals = crate::dtype::tests::rounding_cases(|b| bf16::from_bits(b).to_f32());
            vals.extend(
                (0..=u16::MAX as u32).map(|b| f32::from_bits((b << 16) | ((b * 40503) & 0xffff))),
            );
            vals.extend(crate::dtype::tests::bit_patterns());
            vals.extend((1..64u32).map(|k| f32::from_bits(k * 0x0001_fffd)));
            vals.extend((1..64u32).map(|k| -f32::from_bits(k * 0x0001_0001)));
            vals.resize(vals.len().div_ceil(32) * 32, 1.0);
            // A subnormal in a chunk of normal values.
            vals[40] = 1e-40;
            for v in vals.chunks_exact(32) {
                let mut out = [std::mem::MaybeUninit::new(0u16); 32];
                I::to_bf16x32(v.try_into().unwrap(), &mut out);
                for (o, &x) in out.iter().zip(v) {
                    // SAFETY: to_bf16x32 writes all 32.
                    let got = unsafe { o.assume_init() };
                    assert_eq!(
                        got,
                        bf16::from_f32(x).to_bits(),
                        "{x:e} ({:#x})",
                        x.to_bits()
                    );
                }
            }
        }
        check::<simd::Plain>();
        #[cfg(target_arch = "x86_64")]
        if simd::bf16_hw() {
            check::<simd::Avx512Bf16>();
        } else {
            eprintln!("no AVX-512 BF16 on this CPU (or it is turned off): its rounding not run");
        }
    }

    /// The AVX-512 reductions keep the AVX2 ones' lanes and order: the same bits, on every
    /// length (full pairs of 8-value chunks, an odd chunk, a tail) and column count.
    #[test]
    fn avx512_reductions_give_the_avx2_bits() {
        if simd::level() < Level::Avx512 {
            eprintln!("skipped: this CPU (or CUNORM_CPU_ISA) has no AVX-512");
            return;
        }
        for n in [0, 1, 7, 8, 9, 16, 23, 24, 31, 512] {
            let (g, x) = (values(n, 3), values(n, 4));
            let run = |dev: bool, wide: bool| {
                let (mut a1, mut a2) = ([0.125f64; LANES], [0.375f64; LANES]);
                match (dev, wide) {
                    (true, true) => simd::Avx512::acc_dev(&mut a1, &mut a2, &x, 2.75),
                    (true, false) => simd::Fma::acc_dev(&mut a1, &mut a2, &x, 2.75),
                    (false, true) => simd::Avx512::acc_grad(&mut a1, &mut a2, &g, &x, 2.75),
                    (false, false) => simd::Fma::acc_grad(&mut a1, &mut a2, &g, &x, 2.75),
                }
                (a1.map(f64::to_bits), a2.map(f64::to_bits))
            };
            assert_eq!(
                run(true, true),
                run(true, false),
                "deviation sums of {n} values"
            );
            assert_eq!(
                run(false, true),
                run(false, false),
                "gradient sums of {n} values"
            );
        }
        columns_agree::<f32>();
        columns_agree::<bf16>();
        columns_agree::<f16>();
    }
}
