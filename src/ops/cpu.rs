//! The CPU reference path shared by every op.
//!
//! Two engines cover the five ops:
//! - the **plane engine** works on an `(N, C, S)` view in either memory format and reduces per
//!   `(n, c)` plane; BatchNorm, InstanceNorm and GroupNorm differ only in how planes are merged
//!   into statistic groups ([`Grouping`]);
//! - the **row engine** works on `(rows, cols)` contiguous data for LayerNorm and RMSNorm.
//!
//! Accuracy first: every sum is accumulated in f64 (8 independent lanes, added in a fixed
//! order), variance is the corrected two-pass over deviations (never E[x²] − E[x]²) and pieces
//! are merged with Chan's formula; outputs are computed in f64 and rounded once. Work is split
//! into pieces whose boundaries depend only on the shape, and partials are merged in index order,
//! so results are bitwise identical for any thread count.

use rayon::prelude::*;

use crate::dtype::Element;
use crate::tensor::MemoryFormat;

const LANES: usize = 8;
/// Rows of a channels-last `(S, C)` block reduced by one task.
const ROW_CHUNK: usize = 256;
/// Longest contiguous run reduced by one task.
const RUN_CHUNK: usize = 1 << 16;
/// Smallest number of elements worth a rayon task.
const MIN_TASK: usize = 1 << 14;

/// Count, mean and sum of squared deviations of a set of values (f64).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Moments {
    pub count: f64,
    pub mean: f64,
    pub m2: f64,
}

impl Moments {
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
        Moments {
            count,
            mean: self.mean + d * (o.count / count),
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

/// The `(N, C, S)` view of an input and its memory format.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Planes {
    pub n: usize,
    pub c: usize,
    pub s: usize,
    pub format: MemoryFormat,
}

/// How `(n, c)` planes form statistic groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Grouping {
    /// One group per channel over the whole batch (BatchNorm): group index `c`.
    Channel,
    /// `G` groups of `C/G` channels per sample (GroupNorm; InstanceNorm is `G = C`): group
    /// index `n·G + c/(C/G)`.
    Groups(usize),
}

impl Grouping {
    pub fn num_groups(self, p: &Planes) -> usize {
        match self {
            Grouping::Channel => p.c,
            Grouping::Groups(g) => p.n * g,
        }
    }

    #[inline]
    pub fn group_of(self, p: &Planes, n: usize, c: usize) -> usize {
        match self {
            Grouping::Channel => c,
            Grouping::Groups(g) => n * g + c / (p.c / g),
        }
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
            fn body<T: Element, I: simd::Isa>($($a: $t),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2<T: Element>($($a: $t),*) $(-> $ret)? {
                    body::<T, simd::Fma>($($a),*)
                }
                if simd::has_avx2() {
                    // SAFETY: the CPU supports AVX2 and FMA (checked by has_avx2).
                    return unsafe { avx2::<T>($($a),*) };
                }
            }
            body::<T, simd::Plain>($($a),*)
        }
    };
}

mod simd {
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

type Out<T> = std::mem::MaybeUninit<T>;

/// Sums the lanes in index order (a pairwise tree here would make LLVM shuffle the lanes of
/// every vector in the hot loop).
#[inline(always)]
fn lanes_sum(acc: [f64; LANES]) -> f64 {
    acc.iter().sum()
}

/// Large fresh outputs would otherwise take one page fault per 4 KiB on first write (for a
/// 32 MB output, most of the op's time): ask for transparent huge pages, as PyTorch's CPU
/// allocator does. Advisory only; ignored where unsupported.
fn advise_huge_pages<T>(v: &mut Vec<T>) {
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
fn sum_body<T: Element>(x: &[T]) -> f64 {
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
fn dev_sums_body<T: Element, I: simd::Isa>(x: &[T], m: f64) -> (f64, f64) {
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
fn moments_body<T: Element, I: simd::Isa>(x: &[T]) -> Moments {
    if x.is_empty() {
        return Moments::default();
    }
    let n = x.len() as f64;
    let m = sum_body(x) / n;
    let (d1, d2) = dev_sums_body::<T, I>(x, m);
    Moments {
        count: n,
        mean: m + d1 / n,
        m2: (d2 - d1 * d1 / n).max(0.0),
    }
}

multiversion! {
    /// Moments of a run (two-pass), long runs in fixed pieces merged in order.
    pub(crate) fn run_moments<T: Element>(x: &[T]) -> Moments {
        if x.len() <= RUN_CHUNK {
            return moments_body::<T, I>(x);
        }
        let mut acc = Moments::default();
        for piece in x.chunks(RUN_CHUNK) {
            acc = acc.merge(moments_body::<T, I>(piece));
        }
        acc
    }
}

multiversion! {
    /// `y = a·(x − m) + b` over a run, in f64, rounded once.
    fn run_affine<T: Element>(x: &[T], y: &mut [Out<T>], a: f64, m: f64, b: f64) {
        for (yv, xv) in y.iter_mut().zip(x) {
            yv.write(T::from_f64(a * (xv.to_f64() - m) + b));
        }
    }
}

multiversion! {
    /// (Σ g, Σ g·(x − m)) over a run.
    fn run_grad_sums<T: Element>(g: &[T], x: &[T], m: f64) -> (f64, f64) {
        let (gc, gt) = g.as_chunks::<LANES>();
        let (xc, xt) = x.as_chunks::<LANES>();
        let mut a1 = [0f64; LANES];
        let mut a2 = [0f64; LANES];
        for (gv, xv) in gc.iter().zip(xc) {
            let gg: [f64; LANES] = std::array::from_fn(|i| gv[i].to_f64());
            let d: [f64; LANES] = std::array::from_fn(|i| xv[i].to_f64() - m);
            for i in 0..LANES {
                a1[i] += gg[i];
            }
            for i in 0..LANES {
                a2[i] = I::fma(gg[i], d[i], a2[i]);
            }
        }
        let (mut t1, mut t2) = (0.0, 0.0);
        for (gv, xv) in gt.iter().zip(xt) {
            t1 += gv.to_f64();
            t2 += gv.to_f64() * (xv.to_f64() - m);
        }
        (lanes_sum(a1) + t1, lanes_sum(a2) + t2)
    }
}

multiversion! {
    /// `dx = a·g + b·(x − m) + k` over a run.
    fn run_grad_apply<T: Element>(g: &[T], x: &[T], dx: &mut [Out<T>], a: f64, b: f64, m: f64, k: f64) {
        for ((dv, gv), xv) in dx.iter_mut().zip(g).zip(x) {
            dv.write(T::from_f64(a * gv.to_f64() + b * (xv.to_f64() - m) + k));
        }
    }
}

multiversion! {
    /// Per-column moments of a row-major `(rows, cols)` block by the corrected two-pass.
    fn columns_moments<T: Element>(block: &[T], cols: usize) -> Vec<Moments> {
        let rows = block.len() / cols.max(1);
        let mut sum = vec![0f64; cols];
        for row in block.chunks_exact(cols) {
            for (a, v) in sum.iter_mut().zip(row) {
                *a += v.to_f64();
            }
        }
        let n = rows as f64;
        let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
        let mut d1 = vec![0f64; cols];
        let mut d2 = vec![0f64; cols];
        for row in block.chunks_exact(cols) {
            for (((a1, a2), v), m) in d1.iter_mut().zip(d2.iter_mut()).zip(row).zip(&mean) {
                let d = v.to_f64() - m;
                *a1 += d;
                *a2 += d * d;
            }
        }
        (0..cols)
            .map(|c| Moments {
                count: n,
                mean: mean[c] + d1[c] / n,
                m2: (d2[c] - d1[c] * d1[c] / n).max(0.0),
            })
            .collect()
    }
}

multiversion! {
    /// Channels-last rows `r0..` of `(N·S, C)`: `y = a·(x − m) + b` with per-(n, c) coefficients.
    fn rows_affine<T: Element>(x: &[T], y: &mut [Out<T>], c: usize, r0: usize, s: usize, a: &[f64], m: &[f64], b: &[f64]) {
        for (r, (yr, xr)) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)).enumerate() {
            let o = ((r0 + r) / s) * c;
            let (ar, mr, br) = (&a[o..o + c], &m[o..o + c], &b[o..o + c]);
            for ((((yv, xv), av), mv), bv) in yr.iter_mut().zip(xr).zip(ar).zip(mr).zip(br) {
                yv.write(T::from_f64(av * (xv.to_f64() - mv) + bv));
            }
        }
    }
}

multiversion! {
    /// Channels-last block of one sample: per-column (Σ g, Σ g·(x − m[c])).
    fn columns_grad_sums<T: Element>(g: &[T], x: &[T], m: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let c = m.len();
        let mut s1 = vec![0f64; c];
        let mut s2 = vec![0f64; c];
        for (gr, xr) in g.chunks_exact(c).zip(x.chunks_exact(c)) {
            for ((((a1, a2), gv), xv), mv) in s1.iter_mut().zip(s2.iter_mut()).zip(gr).zip(xr).zip(m) {
                let gg = gv.to_f64();
                *a1 += gg;
                *a2 += gg * (xv.to_f64() - mv);
            }
        }
        (s1, s2)
    }
}

multiversion! {
    /// Channels-last rows `r0..`: `dx = a·g + b·(x − m) + k` with per-(n, c) coefficients.
    fn rows_grad_apply<T: Element>(g: &[T], x: &[T], dx: &mut [Out<T>], c: usize, r0: usize, s: usize, coef: [&[f64]; 4]) {
        let [a, b, m, k] = coef;
        let rows = dx.chunks_exact_mut(c).zip(g.chunks_exact(c).zip(x.chunks_exact(c)));
        for (r, (dr, (gr, xr))) in rows.enumerate() {
            let o = ((r0 + r) / s) * c;
            for j in 0..c {
                dr[j].write(T::from_f64(
                    a[o + j] * gr[j].to_f64() + b[o + j] * (xr[j].to_f64() - m[o + j]) + k[o + j],
                ));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Plane engine
// ---------------------------------------------------------------------------------------------

/// Per-`(n, c)` moments over the spatial positions (length `N·C`, index `n·C + c`).
pub(crate) fn plane_moments<T: Element>(x: &[T], p: Planes) -> Vec<Moments> {
    let planes = p.n * p.c;
    if x.is_empty() {
        return vec![Moments::default(); planes];
    }
    match p.format {
        MemoryFormat::Contiguous => {
            let min_len = (MIN_TASK / p.s.max(1)).max(1);
            x.par_chunks(p.s.max(1))
                .with_min_len(min_len)
                .map(run_moments)
                .collect()
        }
        MemoryFormat::ChannelsLast => {
            // Each task takes ROW_CHUNK rows of one sample's (S, C) block: a per-column two-pass.
            let chunks = p.s.div_ceil(ROW_CHUNK).max(1);
            let parts: Vec<Vec<Moments>> = (0..p.n * chunks)
                .into_par_iter()
                .map(|t| {
                    let (n, k) = (t / chunks, t % chunks);
                    let r0 = k * ROW_CHUNK;
                    let r1 = (r0 + ROW_CHUNK).min(p.s);
                    columns_moments(&x[(n * p.s + r0) * p.c..(n * p.s + r1) * p.c], p.c)
                })
                .collect();
            let mut out = vec![Moments::default(); planes];
            for (t, part) in parts.iter().enumerate() {
                let n = t / chunks;
                for (c, m) in part.iter().enumerate() {
                    out[n * p.c + c] = out[n * p.c + c].merge(*m);
                }
            }
            out
        }
    }
}

/// Merges per-plane moments into per-group moments, in index order.
pub(crate) fn group_moments(planes: &[Moments], p: Planes, grouping: Grouping) -> Vec<Moments> {
    let mut out = vec![Moments::default(); grouping.num_groups(&p)];
    for n in 0..p.n {
        for c in 0..p.c {
            let g = grouping.group_of(&p, n, c);
            out[g] = out[g].merge(planes[n * p.c + c]);
        }
    }
    out
}

/// `y = a[n·C+c]·(x − m[n·C+c]) + b[n·C+c]` over every plane, computed in f64, rounded once.
pub(crate) fn plane_affine<T: Element>(
    x: &[T],
    p: Planes,
    a: &[f64],
    m: &[f64],
    b: &[f64],
) -> Vec<T> {
    filled_vec(x.len(), |y| {
        if x.is_empty() {
            return;
        }
        match p.format {
            MemoryFormat::Contiguous => {
                let s = p.s.max(1);
                y.par_chunks_mut(s)
                    .zip(x.par_chunks(s))
                    .enumerate()
                    .with_min_len((MIN_TASK / s).max(1))
                    .for_each(|(i, (yr, xr))| run_affine(xr, yr, a[i], m[i], b[i]));
            }
            MemoryFormat::ChannelsLast => {
                let c = p.c;
                y.par_chunks_mut(ROW_CHUNK * c)
                    .zip(x.par_chunks(ROW_CHUNK * c))
                    .enumerate()
                    .for_each(|(k, (yb, xb))| rows_affine(xb, yb, c, k * ROW_CHUNK, p.s, a, m, b));
            }
        }
    })
}

/// Per-plane `(Σ g, Σ g·(x − m[plane]))`.
pub(crate) fn plane_grad_sums<T: Element>(
    g: &[T],
    x: &[T],
    p: Planes,
    m: &[f64],
) -> (Vec<f64>, Vec<f64>) {
    let planes = p.n * p.c;
    if x.is_empty() {
        return (vec![0.0; planes], vec![0.0; planes]);
    }
    match p.format {
        MemoryFormat::Contiguous => {
            let s = p.s.max(1);
            let v: Vec<(f64, f64)> = g
                .par_chunks(s)
                .zip(x.par_chunks(s))
                .enumerate()
                .with_min_len((MIN_TASK / s).max(1))
                .map(|(i, (gr, xr))| {
                    gr.chunks(RUN_CHUNK)
                        .zip(xr.chunks(RUN_CHUNK))
                        .map(|(gc, xc)| run_grad_sums(gc, xc, m[i]))
                        .fold((0.0, 0.0), |u, w| (u.0 + w.0, u.1 + w.1))
                })
                .collect();
            v.into_iter().unzip()
        }
        MemoryFormat::ChannelsLast => {
            let c = p.c;
            let chunks = p.s.div_ceil(ROW_CHUNK).max(1);
            let parts: Vec<(Vec<f64>, Vec<f64>)> = (0..p.n * chunks)
                .into_par_iter()
                .map(|t| {
                    let (n, k) = (t / chunks, t % chunks);
                    let r0 = k * ROW_CHUNK;
                    let r1 = (r0 + ROW_CHUNK).min(p.s);
                    let range = (n * p.s + r0) * c..(n * p.s + r1) * c;
                    columns_grad_sums(&g[range.clone()], &x[range], &m[n * c..n * c + c])
                })
                .collect();
            let mut sg = vec![0f64; planes];
            let mut sgx = vec![0f64; planes];
            for (t, (s1, s2)) in parts.iter().enumerate() {
                let o = (t / chunks) * c;
                for j in 0..c {
                    sg[o + j] += s1[j];
                    sgx[o + j] += s2[j];
                }
            }
            (sg, sgx)
        }
    }
}

/// `dx = a·g + b·(x − m) + k`, per-plane coefficients, computed in f64, rounded once.
pub(crate) fn plane_grad_apply<T: Element>(
    g: &[T],
    x: &[T],
    p: Planes,
    coef: [&[f64]; 4],
) -> Vec<T> {
    let [a, b, m, k] = coef;
    filled_vec(x.len(), |dx| {
        if x.is_empty() {
            return;
        }
        match p.format {
            MemoryFormat::Contiguous => {
                let s = p.s.max(1);
                dx.par_chunks_mut(s)
                    .zip(g.par_chunks(s).zip(x.par_chunks(s)))
                    .enumerate()
                    .with_min_len((MIN_TASK / s).max(1))
                    .for_each(|(i, (dr, (gr, xr)))| {
                        run_grad_apply(gr, xr, dr, a[i], b[i], m[i], k[i])
                    });
            }
            MemoryFormat::ChannelsLast => {
                let c = p.c;
                dx.par_chunks_mut(ROW_CHUNK * c)
                    .zip(g.par_chunks(ROW_CHUNK * c).zip(x.par_chunks(ROW_CHUNK * c)))
                    .enumerate()
                    .for_each(|(t, (db, (gb, xb)))| {
                        rows_grad_apply(gb, xb, db, c, t * ROW_CHUNK, p.s, coef)
                    });
            }
        }
    })
}

/// Fused GroupNorm/InstanceNorm forward for contiguous input: each `(n, group)` set is a
/// contiguous run of `C/G · S` values, so its statistics and its output are computed while it
/// is in cache (x is read from memory once). Returns y and the per-group moments.
pub(crate) fn groups_fused<T: Element>(
    x: &[T],
    p: Planes,
    groups: usize,
    w: &[f64],
    b: &[f64],
    eps: f64,
) -> (Vec<T>, Vec<Moments>) {
    let d = p.c / groups.max(1);
    let len = (d * p.s).max(1);
    let mut moments = Vec::new();
    let y = filled_vec(x.len(), |y| {
        if x.is_empty() {
            return;
        }
        moments = y
            .par_chunks_mut(len)
            .zip(x.par_chunks(len))
            .enumerate()
            .with_min_len((MIN_TASK / len).max(1))
            .map(|(gi, (yg, xg))| {
                let m = run_moments(xg);
                let rstd = 1.0 / (m.var_biased() + eps).sqrt();
                let c0 = (gi % groups) * d;
                for (j, (yc, xc)) in yg
                    .chunks_mut(p.s.max(1))
                    .zip(xg.chunks(p.s.max(1)))
                    .enumerate()
                {
                    run_affine(xc, yc, rstd * w[c0 + j], m.mean, b[c0 + j]);
                }
                m
            })
            .collect();
    });
    (y, moments)
}

// ---------------------------------------------------------------------------------------------
// Row engine (LayerNorm, RMSNorm)
// ---------------------------------------------------------------------------------------------

/// An optional elementwise parameter, or `cols` copies of its neutral value.
fn param_or(p: Option<&[f32]>, cols: usize, neutral: f32) -> std::borrow::Cow<'_, [f32]> {
    match p {
        Some(p) => std::borrow::Cow::Borrowed(p),
        None => std::borrow::Cow::Owned(vec![neutral; cols]),
    }
}

fn row_min_len(cols: usize) -> usize {
    (MIN_TASK / cols.max(1)).max(1)
}

/// Rows per block of the column reduction for dγ/dβ: at most 64 blocks, fixed by the shape.
fn grad_block_rows(rows: usize) -> usize {
    rows.div_ceil(64).max(1)
}

multiversion! {
    /// One LayerNorm row: `y = (x − μ)·rstd·w + b`; returns (μ, rstd).
    fn layer_norm_row<T: Element>(x: &[T], y: &mut [Out<T>], w: &[f32], b: &[f32], eps: f64) -> (f64, f64) {
        let mo = if x.len() <= RUN_CHUNK {
            moments_body::<T, I>(x)
        } else {
            x.chunks(RUN_CHUNK).map(moments_body::<T, I>).fold(Moments::default(), Moments::merge)
        };
        let (mean, rstd) = (mo.mean, 1.0 / (mo.var_biased() + eps).sqrt());
        for (((yv, xv), wv), bv) in y.iter_mut().zip(x).zip(w).zip(b) {
            yv.write(T::from_f64((xv.to_f64() - mean) * rstd * *wv as f64 + *bv as f64));
        }
        (mean, rstd)
    }
}

multiversion! {
    /// One RMSNorm row: `y = x·rstd·w`; returns rstd.
    fn rms_norm_row<T: Element>(x: &[T], y: &mut [Out<T>], w: &[f32], eps: f64) -> f64 {
        let (chunks, tail) = x.as_chunks::<LANES>();
        let mut acc = [0f64; LANES];
        for ch in chunks {
            let v: [f64; LANES] = std::array::from_fn(|i| ch[i].to_f64());
            for i in 0..LANES {
                acc[i] = I::fma(v[i], v[i], acc[i]);
            }
        }
        let ss = lanes_sum(acc) + tail.iter().map(|v| v.to_f64() * v.to_f64()).sum::<f64>();
        let r = 1.0 / (ss / x.len() as f64 + eps).sqrt();
        for ((yv, xv), wv) in y.iter_mut().zip(x).zip(w) {
            yv.write(T::from_f64(xv.to_f64() * r * *wv as f64));
        }
        r
    }
}

/// LayerNorm forward over contiguous rows. Returns (y, mean, rstd).
pub(crate) fn layer_norm_fwd<T: Element>(
    x: &[T],
    cols: usize,
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    eps: f64,
) -> (Vec<T>, Vec<f32>, Vec<f32>) {
    if x.is_empty() || cols == 0 {
        return (filled_vec(x.len(), |_| {}), Vec::new(), Vec::new());
    }
    let (w, b) = (param_or(weight, cols, 1.0), param_or(bias, cols, 0.0));
    let (w, b) = (&w[..], &b[..]);
    let mut stats = Vec::new();
    let y = filled_vec(x.len(), |y| {
        stats = y
            .par_chunks_mut(cols)
            .zip(x.par_chunks(cols))
            .with_min_len(row_min_len(cols))
            .map(|(yr, xr)| {
                let (m, r) = layer_norm_row(xr, yr, w, b, eps);
                (m as f32, r as f32)
            })
            .collect();
    });
    let (mean, rstd) = stats.into_iter().unzip();
    (y, mean, rstd)
}

/// RMSNorm forward over contiguous rows. Returns (y, rstd).
pub(crate) fn rms_norm_fwd<T: Element>(
    x: &[T],
    cols: usize,
    weight: Option<&[f32]>,
    eps: f64,
) -> (Vec<T>, Vec<f32>) {
    if x.is_empty() || cols == 0 {
        return (filled_vec(x.len(), |_| {}), Vec::new());
    }
    let w = param_or(weight, cols, 1.0);
    let w = &w[..];
    let mut rstd = Vec::new();
    let y = filled_vec(x.len(), |y| {
        rstd = y
            .par_chunks_mut(cols)
            .zip(x.par_chunks(cols))
            .with_min_len(row_min_len(cols))
            .map(|(yr, xr)| rms_norm_row(xr, yr, w, eps) as f32)
            .collect();
    });
    (y, rstd)
}

multiversion! {
    /// LayerNorm (`center`) or RMSNorm backward of one block of rows: writes dx, accumulates
    /// Σ g·x̂ into `dw` and Σ g into `db`.
    fn norm_rows_bwd<T: Element>(
        g: &[T],
        x: &[T],
        dx: &mut [Out<T>],
        cols: usize,
        mean: Option<&[f32]>,
        rstd: &[f32],
        w: &[f32],
        dw: &mut [f64],
        db: &mut [f64],
    ) {
        let n = cols as f64;
        let rows = dx.chunks_exact_mut(cols).zip(g.chunks_exact(cols).zip(x.chunks_exact(cols)));
        for (r, (dr, (gr, xr))) in rows.enumerate() {
            let mu = mean.map_or(0.0, |m| m[r] as f64);
            let rs = rstd[r] as f64;
            // Row sums Σu, Σu·x̂ (u = g·w) in lanes; column sums Σg·x̂, Σg elementwise.
            let mut s1 = [0f64; LANES];
            let mut s2 = [0f64; LANES];
            let (gc, gt) = gr.as_chunks::<LANES>();
            let (xc, xt) = xr.as_chunks::<LANES>();
            let (wc, wt) = w.as_chunks::<LANES>();
            for ((gv, xv), wv) in gc.iter().zip(xc).zip(wc) {
                let u: [f64; LANES] = std::array::from_fn(|i| gv[i].to_f64() * wv[i] as f64);
                let xh: [f64; LANES] = std::array::from_fn(|i| (xv[i].to_f64() - mu) * rs);
                for i in 0..LANES {
                    s1[i] += u[i];
                }
                for i in 0..LANES {
                    s2[i] = I::fma(u[i], xh[i], s2[i]);
                }
            }
            let (mut t1, mut t2) = (0.0, 0.0);
            for ((gv, xv), wv) in gt.iter().zip(xt).zip(wt) {
                let u = gv.to_f64() * *wv as f64;
                t1 += u;
                t2 += u * (xv.to_f64() - mu) * rs;
            }
            let (s1, s2) = (lanes_sum(s1) + t1, lanes_sum(s2) + t2);
            for (((gv, xv), dwv), dbv) in gr.iter().zip(xr).zip(dw.iter_mut()).zip(db.iter_mut()) {
                let gg = gv.to_f64();
                *dwv += gg * (xv.to_f64() - mu) * rs;
                *dbv += gg;
            }
            let (m1, m2) = (if mean.is_some() { s1 / n } else { 0.0 }, s2 / n);
            for (((dv, gv), xv), wv) in dr.iter_mut().zip(gr).zip(xr).zip(w) {
                let xh = (xv.to_f64() - mu) * rs;
                dv.write(T::from_f64(rs * (gv.to_f64() * *wv as f64 - m1 - xh * m2)));
            }
        }
    }
}

/// LayerNorm (`mean` given) or RMSNorm (`mean = None`) backward over contiguous rows.
/// Returns (dx, Σ_rows g·x̂, Σ_rows g), the sums in f64 and in a fixed block order.
pub(crate) fn norm_rows_backward<T: Element>(
    g: &[T],
    x: &[T],
    cols: usize,
    mean: Option<&[f32]>,
    rstd: &[f32],
    weight: Option<&[f32]>,
) -> (Vec<T>, Vec<f64>, Vec<f64>) {
    if x.is_empty() || cols == 0 {
        return (
            filled_vec(x.len(), |_| {}),
            vec![0.0; cols],
            vec![0.0; cols],
        );
    }
    let w = param_or(weight, cols, 1.0);
    let w = &w[..];
    let br = grad_block_rows(x.len() / cols);
    let mut parts: Vec<(Vec<f64>, Vec<f64>)> = Vec::new();
    let dx = filled_vec(x.len(), |dx| {
        parts = dx
            .par_chunks_mut(br * cols)
            .zip(g.par_chunks(br * cols).zip(x.par_chunks(br * cols)))
            .enumerate()
            .map(|(blk, (db, (gb, xb)))| {
                let (r0, r1) = (blk * br, blk * br + db.len() / cols);
                let mut pw = vec![0f64; cols];
                let mut pb = vec![0f64; cols];
                let m = mean.map(|m| &m[r0..r1]);
                norm_rows_bwd(gb, xb, db, cols, m, &rstd[r0..r1], w, &mut pw, &mut pb);
                (pw, pb)
            })
            .collect();
    });
    let mut dw = vec![0f64; cols];
    let mut db = vec![0f64; cols];
    for (pw, pb) in parts {
        for j in 0..cols {
            dw[j] += pw[j];
            db[j] += pb[j];
        }
    }
    (dx, dw, db)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chan_merge_equals_whole() {
        let v: Vec<f32> = (0..1000)
            .map(|i| ((i * 37) % 101) as f32 * 0.25 + 1e4)
            .collect();
        let whole = run_moments(&v);
        let parts = v
            .chunks(77)
            .map(run_moments)
            .fold(Moments::default(), Moments::merge);
        assert!((whole.mean - parts.mean).abs() < 1e-9 * whole.mean.abs());
        assert!((whole.m2 - parts.m2).abs() < 1e-9 * whole.m2);
        // Against an exact-ish f64 two-pass.
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / 1000.0;
        let m2: f64 = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum();
        assert!((whole.m2 - m2).abs() < 1e-9 * m2);
    }
}
