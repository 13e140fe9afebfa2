//! The planes engine on the CPU: BatchNorm, InstanceNorm and GroupNorm over an `(N, C, S)`
//! view in either memory format, reduced per `(n, c)` plane and merged into statistic groups.

use rayon::prelude::*;

use super::{Grouping, PlaneShape};
use crate::dtype::{DType, Element};
use crate::ops::engine::*;
use crate::tensor::MemoryFormat;

multiversion! {
    /// Moments of a run (two-pass), long runs in fixed pieces merged in order.
    pub(crate) fn run_moments<T: Element>(bufs: &mut Bufs, x: &[T]) -> Moments {
        if x.len() <= RUN_CHUNK {
            return moments_of::<T, I>(bufs, x);
        }
        let mut acc = Moments::default();
        for piece in x.chunks(RUN_CHUNK) {
            acc = acc.merge(moments_of::<T, I>(bufs, piece));
        }
        acc
    }
}

multiversion! {
    /// `y = a·(x − m) + b` over a run, in f32 lanes (the mean split so that |mean| ≫ std keeps
    /// f32 accuracy, its low part folded into b as in [`ColCoef`]), rounded once.
    fn run_affine<T: Element>(bufs: &mut Bufs, x: &[T], y: &mut [Out<T>], a: f64, m: f64, b: f64) {
        let m = SplitMean::new(m);
        let (a, hi, b) = (a as f32, m.hi, fold_lo(b, a, m.lo));
        map_elems!(bufs, x, y, [], |v| I::fma32(a, v - hi, b));
    }
}

multiversion! {
    /// (Σ g, Σ g·(x − m)) over a run: bf16/f16 in f32 lanes ([`run_grad_sums_f32`]) unless it
    /// declines, else in f64 lanes.
    fn run_grad_sums<T: Element>(bufs: &mut Bufs, g: &[T], x: &[T], m: f64) -> (f64, f64) {
        if T::DTYPE != DType::F32 {
            if let Some(sums) = run_grad_sums_f32::<T, I>(g, x, m) {
                return sums;
            }
        }
        let mut a1 = [0f64; LANES];
        let mut a2 = [0f64; LANES];
        for_tiles2!(bufs, g, x, |_, gt, xt| I::acc_grad(&mut a1, &mut a2, gt, xt, m));
        (lanes_sum(a1), lanes_sum(a2))
    }
}

/// Per-column Σg and Σg·(x − m[j]) of a bf16/f16 block in f32 lanes, added into `s1`, `s2`
/// ([`simd::Isa::cols_dev32`], each f32 partial over at most [`COL32_TILE_ROWS`] values):
/// `x − m` taken against `hi[j]` (`m[j]` rounded to f32) and corrected in f64
/// (`Σ g·(x − m) = Σ g·(x − hi) − (m − hi)·Σ g`, m − hi exact). Errors up to ~9·2⁻²⁴ of Σ|g|
/// and of Σ|g·(x − hi)|, which is at most 2·Σ|g·(x − m)| (every x is an f32 value, so
/// |m − hi| ≤ |x − m|): far below the inputs' rounding. `false` (the caller takes the exact f64
/// path; `s1`, `s2` are then spent) where a mean or a sum is not finite (a NaN or infinite
/// input, or an f32 overflow of a bf16 product).
#[inline(always)]
fn grad_sums_f32<T: Element, I: simd::Isa>(
    g: &[T],
    x: &[T],
    m: &[f64],
    hi: &[f32],
    s1: &mut [f64],
    s2: &mut [f64],
) -> bool {
    if !hi.iter().all(|v| v.is_finite()) {
        return false;
    }
    I::cols_dev32::<T, true>(g, x, m.len(), hi, s1, s2);
    if !(s1.iter().chain(&*s2).all(|v| v.is_finite())) {
        return false;
    }
    for ((q, s), (&m, &h)) in s2.iter_mut().zip(&*s1).zip(m.iter().zip(hi)) {
        *q -= (m - h as f64) * s;
    }
    true
}

/// [`run_grad_sums`] of bf16/f16 in f32 lanes: the run as rows of [`COLS`] values
/// ([`grad_sums_f32`]), the columns' sums and the tail in f64. `None` where
/// [`grad_sums_f32`] declines.
#[inline(always)]
fn run_grad_sums_f32<T: Element, I: simd::Isa>(g: &[T], x: &[T], m: f64) -> Option<(f64, f64)> {
    let n = g.len().min(x.len());
    let full = n / COLS * COLS;
    let (mut s, mut q) = ([0f64; COLS], [0f64; COLS]);
    let (g, x) = (&g[..n], &x[..n]);
    if !grad_sums_f32::<T, I>(
        &g[..full],
        &x[..full],
        &[m; COLS],
        &[m as f32; COLS],
        &mut s,
        &mut q,
    ) {
        return None;
    }
    let (mut s1, mut s2): (f64, f64) = (s.iter().sum(), q.iter().sum());
    for (gv, xv) in g[full..].iter().zip(&x[full..]) {
        let gv = gv.to_f32() as f64;
        s1 += gv;
        s2 = I::fma(gv, xv.to_f32() as f64 - m, s2);
    }
    (s1.is_finite() && s2.is_finite()).then_some((s1, s2))
}

multiversion! {
    /// `dx = a·g + b·(x − m) + k` over a run, in f32 lanes.
    fn run_grad_apply<T: Element>(bufs: &mut Bufs, g: &[T], x: &[T], dx: &mut [Out<T>], a: f64, b: f64, m: f64, k: f64) {
        let m = SplitMean::new(m);
        let (a, b, hi, k) = (a as f32, b as f32, m.hi, fold_lo(k, b, m.lo));
        map_elems2!(bufs, g, x, dx, [], |gv, xv| I::fma32(a, gv, I::fma32(b, xv - hi, k)));
    }
}

multiversion! {
    /// Per-column moments of a row-major `(rows, cols)` block (at most [`ROW_CHUNK`] rows).
    /// bf16/f16 in f32 lanes ([`columns_moments_f32`]) unless it declines; otherwise (and for
    /// f32) exact, in one pass by the column kernel ([`simd::Isa::cols_sums`], which widens
    /// bf16/f16 in registers), each column shifted by its
    /// value in the first row, Σ (x − s) and Σ (x − s)² summed in f64 down the rows (groups of
    /// [`COLS`] columns in registers), and the shift corrected (`Moments::two_pass`). Since s
    /// is one of the values, (mean − s)² ≤ rows·var, so the correction loses at most a factor
    /// of about rows² in f64 (≈ 1e-11 relative at 256 rows): no cancellation for |mean| ≫ std.
    fn columns_moments<T: Element>(block: &[T], cols: usize) -> Vec<Moments> {
        let rows = block.len() / cols.max(1);
        let n = rows as f64;
        if T::DTYPE != DType::F32 && rows > 0 {
            if let Some(m) = columns_moments_f32::<T, I>(block, cols, rows) {
                return m;
            }
        }
        // A non-finite first value would make every deviation NaN or infinite: shift by 0
        // instead (the sums then carry the infinities and NaNs as plain sums do).
        let mean: Vec<f64> = (0..cols)
            .map(|c| block.get(c).map(|v| v.to_f32()).filter(|v| v.is_finite()).map_or(0.0, |v| v as f64))
            .collect();
        let (mut d1, mut d2) = (vec![0f64; cols], vec![0f64; cols]);
        I::cols_sums::<T, false>(block, block, cols, &mean, &mut d1, &mut d2);
        (0..cols).map(|i| Moments::two_pass(n, mean[i], d1[i], d2[i])).collect()
    }
}

/// [`columns_moments`] of a bf16 or f16 block in f32 lanes ([`simd::Isa::cols_dev32`]: no f64
/// widening per value; 1.05-1.6x on the channels-last forward cases of `cpu_cases.json`,
/// interleaved A/B), each column shifted by the f32 mean of its first
/// [`COL32_TILE_ROWS`] values (near the column's mean unless the block's first rows are
/// unlike the rest). `None` (the caller takes the exact f64 path) unless every column's sums
/// pass [`f32_col_sums_accurate`], which bounds the variance's relative error by ~1.3e-5 and
/// rejects non-finite sums: an input's bf16/f16 rounding (2⁻⁹ / 2⁻¹² relative) is far larger.
/// f32 inputs always take the exact path.
#[inline(always)]
fn columns_moments_f32<T: Element, I: simd::Isa>(
    block: &[T],
    cols: usize,
    rows: usize,
) -> Option<Vec<Moments>> {
    // The shifts: the first rows' sums by the same kernel, shifted by 0.
    let head = rows.min(COL32_TILE_ROWS);
    let (mut d1, mut d2) = (vec![0f64; cols], vec![0f64; cols]);
    let mut shift = vec![0f32; cols];
    let first = &block[..head * cols];
    I::cols_dev32::<T, false>(first, first, cols, &shift, &mut d1, &mut d2);
    for (a, s) in shift.iter_mut().zip(&d1) {
        let v = (s / head as f64) as f32;
        *a = if v.is_finite() { v } else { 0.0 };
    }
    d1.fill(0.0);
    d2.fill(0.0);
    I::cols_dev32::<T, false>(block, block, cols, &shift, &mut d1, &mut d2);
    let n = rows as f64;
    let ok = |i: usize| {
        f32_col_sums_accurate(n, shift[i], d1[i], d2[i])
            || (d1[i] == 0.0 && d2[i] == 0.0 && column_is(block, cols, i, shift[i]))
    };
    if !(0..cols).all(ok) {
        return None;
    }
    Some(
        (0..cols)
            .map(|i| Moments::two_pass(n, shift[i] as f64, d1[i], d2[i]))
            .collect(),
    )
}

/// Per-`(n, c)` coefficients of the channels-last element loops, in f32: the mean split
/// into `hi + lo` (so that |mean| ≫ std keeps f32 accuracy), the low part folded into the
/// constant term in f64 (`a·(x − hi − lo) + b = a·(x − hi) + (b − a·lo)`; for the backward,
/// `b·(x − hi − lo) + k = b·(x − hi) + (k − b·lo)`): one stream and one subtraction fewer per
/// element.
struct ColCoef {
    a: Vec<f32>,
    b: Vec<f32>,
    hi: Vec<f32>,
    k: Vec<f32>,
}

/// `c − f·lo` in f64, as f32; `c` itself where `lo` is 0 or `f` is not finite (an infinite
/// factor times a zero `lo` would turn every output into NaN).
fn fold_lo(c: f64, f: f64, lo: f32) -> f32 {
    if lo == 0.0 || !f.is_finite() {
        c as f32
    } else {
        (c - f * lo as f64) as f32
    }
}

impl ColCoef {
    /// Forward `y = a·(x − m) + b`.
    fn affine(a: &[f64], m: &[f64], b: &[f64]) -> ColCoef {
        let split: Vec<SplitMean> = m.iter().map(|&m| SplitMean::new(m)).collect();
        ColCoef {
            a: a.iter().map(|&v| v as f32).collect(),
            b: b.iter()
                .zip(a)
                .zip(&split)
                .map(|((&b, &a), s)| fold_lo(b, a, s.lo))
                .collect(),
            hi: split.iter().map(|s| s.hi).collect(),
            k: Vec::new(),
        }
    }

    /// Backward `dx = a·g + b·(x − m) + k`.
    fn grad(a: &[f64], b: &[f64], m: &[f64], k: &[f64]) -> ColCoef {
        let split: Vec<SplitMean> = m.iter().map(|&m| SplitMean::new(m)).collect();
        ColCoef {
            a: a.iter().map(|&v| v as f32).collect(),
            b: b.iter().map(|&v| v as f32).collect(),
            hi: split.iter().map(|s| s.hi).collect(),
            k: k.iter()
                .zip(b)
                .zip(&split)
                .map(|((&k, &b), s)| fold_lo(k, b, s.lo))
                .collect(),
        }
    }
}

/// The coefficient offset `n·C` of each of `rows` rows from `r0` of a channels-last
/// `(N·S, C)` view (no division per row; an iterator, not a closure, so that the row loop stays
/// inside the multiversioned kernel).
struct SampleOffsets {
    n: usize,
    left: usize,
    s: usize,
    c: usize,
    rows: usize,
}

impl SampleOffsets {
    fn new(r0: usize, rows: usize, s: usize, c: usize) -> SampleOffsets {
        let s = s.max(1);
        SampleOffsets {
            n: r0 / s,
            left: s - r0 % s,
            s,
            c,
            rows,
        }
    }
}

impl Iterator for SampleOffsets {
    type Item = usize;
    #[inline(always)]
    fn next(&mut self) -> Option<usize> {
        if self.rows == 0 {
            return None;
        }
        self.rows -= 1;
        let o = self.n * self.c;
        self.left -= 1;
        if self.left == 0 {
            self.n += 1;
            self.left = self.s;
        }
        Some(o)
    }
}

multiversion! {
    /// Channels-last rows `r0..` of `(N·S, C)`: `y = a·(x − m) + b` with per-(n, c)
    /// coefficients (`coef.a`, the split mean, `coef.b`), in f32 lanes, row by row.
    fn rows_affine<T: Element>(x: &[T], y: &mut [Out<T>], c: usize, r0: usize, s: usize, coef: &ColCoef, bufs: &mut Bufs) {
        let rows = x.len() / c.max(1);
        for (r, o) in SampleOffsets::new(r0, rows, s, c).enumerate() {
            let (xr, yr) = (&x[r * c..(r + 1) * c], &mut y[r * c..(r + 1) * c]);
            let at = o..o + c;
            let (a, hi, b) = (&coef.a[at.clone()], &coef.hi[at.clone()], &coef.b[at]);
            map_elems!(bufs, xr, yr, [av = a, hv = hi, bv = b], |v| I::fma32(av, v - hv, bv));
        }
    }
}

multiversion! {
    /// Channels-last block of one sample: per-column (Σ g, Σ g·(x − m[c])), summed in f64,
    /// each group of [`COLS`] columns reduced down the rows in registers.
    fn columns_grad_sums<T: Element>(g: &[T], x: &[T], m: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let c = m.len();
        let (mut s1, mut s2) = (vec![0f64; c], vec![0f64; c]);
        // bf16/f16 in f32 lanes, unless a mean or a sum is not finite.
        if T::DTYPE != DType::F32 {
            let hi: Vec<f32> = m.iter().map(|&v| v as f32).collect();
            if grad_sums_f32::<T, I>(g, x, m, &hi, &mut s1, &mut s2) {
                return (s1, s2);
            }
            s1.fill(0.0);
            s2.fill(0.0);
        }
        I::cols_sums::<T, true>(g, x, c, m, &mut s1, &mut s2);
        (s1, s2)
    }
}

multiversion! {
    /// Channels-last rows `r0..`: `dx = a·g + b·(x − m) + k` with per-(n, c) coefficients,
    /// in f32 lanes, row by row.
    fn rows_grad_apply<T: Element>(g: &[T], x: &[T], dx: &mut [Out<T>], c: usize, r0: usize, s: usize, coef: &ColCoef, bufs: &mut Bufs) {
        let rows = x.len() / c.max(1);
        for (r, o) in SampleOffsets::new(r0, rows, s, c).enumerate() {
            let span = r * c..(r + 1) * c;
            let (gr, xr, dr) = (&g[span.clone()], &x[span.clone()], &mut dx[span]);
            let at = o..o + c;
            let (a, b, k, hi) = (&coef.a[at.clone()], &coef.b[at.clone()], &coef.k[at.clone()], &coef.hi[at]);
            map_elems2!(bufs, gr, xr, dr, [av = a, bv = b, kv = k, hv = hi], |gv, xv| {
                I::fma32(av, gv, I::fma32(bv, xv - hv, kv))
            });
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Plane engine
// ---------------------------------------------------------------------------------------------

/// Per-`(n, c)` moments over the spatial positions (length `N·C`, index `n·C + c`).
pub(crate) fn plane_moments<T: Element>(x: &[T], p: PlaneShape) -> Vec<Moments> {
    let planes = p.n * p.c;
    if x.is_empty() {
        return vec![Moments::default(); planes];
    }
    match p.format {
        MemoryFormat::Contiguous => {
            let min_len = (MIN_TASK / p.s.max(1)).max(1);
            collect_init(
                x.par_chunks(p.s.max(1)).with_min_len(min_len),
                x.len(),
                Bufs::new,
                |b, r| run_moments(b, r),
            )
        }
        MemoryFormat::ChannelsLast => {
            // Each task takes ROW_CHUNK rows of one sample's (S, C) block: a per-column two-pass.
            let chunks = p.s.div_ceil(ROW_CHUNK).max(1);
            let parts: Vec<Vec<Moments>> = collect_init(
                (0..p.n * chunks).into_par_iter(),
                x.len(),
                || (),
                |_, t| {
                    let (n, k) = (t / chunks, t % chunks);
                    let r0 = k * ROW_CHUNK;
                    let r1 = (r0 + ROW_CHUNK).min(p.s);
                    columns_moments(&x[(n * p.s + r0) * p.c..(n * p.s + r1) * p.c], p.c)
                },
            );
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
pub(crate) fn group_moments(planes: &[Moments], p: PlaneShape, grouping: Grouping) -> Vec<Moments> {
    let mut out = vec![Moments::default(); grouping.num_groups(&p)];
    for n in 0..p.n {
        for c in 0..p.c {
            let g = grouping.group_of(&p, n, c);
            out[g] = out[g].merge(planes[n * p.c + c]);
        }
    }
    out
}

/// `y = a[n·C+c]·(x − m[n·C+c]) + b[n·C+c]` over every plane, computed in f32, rounded once.
pub(crate) fn plane_affine<T: Element>(
    x: &[T],
    p: PlaneShape,
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
                for_each_init(
                    y.par_chunks_mut(s)
                        .zip(x.par_chunks(s))
                        .enumerate()
                        .with_min_len((MIN_TASK / s).max(1)),
                    x.len(),
                    Bufs::new,
                    |bufs, (i, (yr, xr))| run_affine(bufs, xr, yr, a[i], m[i], b[i]),
                );
            }
            MemoryFormat::ChannelsLast => {
                let c = p.c;
                let coef = ColCoef::affine(a, m, b);
                for_each_init(
                    y.par_chunks_mut(ROW_CHUNK * c)
                        .zip(x.par_chunks(ROW_CHUNK * c))
                        .enumerate(),
                    x.len(),
                    Bufs::new,
                    |bufs, (k, (yb, xb))| rows_affine(xb, yb, c, k * ROW_CHUNK, p.s, &coef, bufs),
                );
            }
        }
    })
}

/// Per-plane `(Σ g, Σ g·(x − m[plane]))`.
pub(crate) fn plane_grad_sums<T: Element>(
    g: &[T],
    x: &[T],
    p: PlaneShape,
    m: &[f64],
) -> (Vec<f64>, Vec<f64>) {
    let planes = p.n * p.c;
    if x.is_empty() {
        return (vec![0.0; planes], vec![0.0; planes]);
    }
    match p.format {
        MemoryFormat::Contiguous => {
            let s = p.s.max(1);
            let v: Vec<(f64, f64)> = collect_init(
                g.par_chunks(s)
                    .zip(x.par_chunks(s))
                    .enumerate()
                    .with_min_len((MIN_TASK / s).max(1)),
                x.len(),
                Bufs::new,
                |bufs, (i, (gr, xr))| {
                    gr.chunks(RUN_CHUNK)
                        .zip(xr.chunks(RUN_CHUNK))
                        .map(|(gc, xc)| run_grad_sums(bufs, gc, xc, m[i]))
                        .fold((0.0, 0.0), |u, w| (u.0 + w.0, u.1 + w.1))
                },
            );
            v.into_iter().unzip()
        }
        MemoryFormat::ChannelsLast => {
            let c = p.c;
            let chunks = p.s.div_ceil(ROW_CHUNK).max(1);
            let parts: Vec<(Vec<f64>, Vec<f64>)> = collect_init(
                (0..p.n * chunks).into_par_iter(),
                x.len(),
                || (),
                |_, t| {
                    let (n, k) = (t / chunks, t % chunks);
                    let r0 = k * ROW_CHUNK;
                    let r1 = (r0 + ROW_CHUNK).min(p.s);
                    let range = (n * p.s + r0) * c..(n * p.s + r1) * c;
                    columns_grad_sums(&g[range.clone()], &x[range], &m[n * c..n * c + c])
                },
            );
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

/// `dx = a·g + b·(x − m) + k`, per-plane coefficients, computed in f32, rounded once.
pub(crate) fn plane_grad_apply<T: Element>(
    g: &[T],
    x: &[T],
    p: PlaneShape,
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
                for_each_init(
                    dx.par_chunks_mut(s)
                        .zip(g.par_chunks(s).zip(x.par_chunks(s)))
                        .enumerate()
                        .with_min_len((MIN_TASK / s).max(1)),
                    x.len(),
                    Bufs::new,
                    |bufs, (i, (dr, (gr, xr)))| {
                        run_grad_apply(bufs, gr, xr, dr, a[i], b[i], m[i], k[i])
                    },
                );
            }
            MemoryFormat::ChannelsLast => {
                let c = p.c;
                let coef = ColCoef::grad(a, b, m, k);
                for_each_init(
                    dx.par_chunks_mut(ROW_CHUNK * c)
                        .zip(g.par_chunks(ROW_CHUNK * c).zip(x.par_chunks(ROW_CHUNK * c)))
                        .enumerate(),
                    x.len(),
                    Bufs::new,
                    |bufs, (t, (db, (gb, xb)))| {
                        rows_grad_apply(gb, xb, db, c, t * ROW_CHUNK, p.s, &coef, bufs)
                    },
                );
            }
        }
    })
}

/// Fused GroupNorm/InstanceNorm forward for contiguous input: each `(n, group)` set is a
/// contiguous run of `C/G · S` values, so its statistics and its output are computed while it
/// is in cache (x is read from memory once). Returns y and the per-group moments.
pub(crate) fn groups_fused<T: Element>(
    x: &[T],
    p: PlaneShape,
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
        moments = collect_init(
            y.par_chunks_mut(len)
                .zip(x.par_chunks(len))
                .enumerate()
                .with_min_len((MIN_TASK / len).max(1)),
            x.len(),
            Bufs::new,
            |bufs, (gi, (yg, xg))| {
                let m = run_moments(bufs, xg);
                let rstd = 1.0 / (m.var_biased() + eps).sqrt();
                let c0 = (gi % groups) * d;
                for (j, (yc, xc)) in yg
                    .chunks_mut(p.s.max(1))
                    .zip(xg.chunks(p.s.max(1)))
                    .enumerate()
                {
                    run_affine(bufs, xc, yc, rstd * w[c0 + j], m.mean, b[c0 + j]);
                }
                m
            },
        );
    });
    (y, moments)
}

/// The forward's per-plane coefficients from per-group moments, for the `p.n` samples of `p`
/// (the whole batch, or one sample of the fused path: the same bits either way): `rstd·w[c]`
/// and the mean.
pub(crate) fn affine_coefs(
    p: PlaneShape,
    grouping: Grouping,
    gm: &[Moments],
    w: &[f64],
    eps: f64,
) -> (Vec<f64>, Vec<f64>) {
    let (mut a, mut m) = (vec![0f64; p.n * p.c], vec![0f64; p.n * p.c]);
    for n in 0..p.n {
        for c in 0..p.c {
            let (i, g) = (n * p.c + c, &gm[grouping.group_of(&p, n, c)]);
            a[i] = 1.0 / (g.var_biased() + eps).sqrt() * w[c];
            m[i] = g.mean;
        }
    }
    (a, m)
}

/// The backward's per-plane coefficients with batch statistics, `dx = a·g + b·(x − m) + k`,
/// from the per-plane sums (Σ g, Σ g·(x − m)), for the `p.n` samples of `p` (as
/// [`affine_coefs`]): `a = r·w[c]`, `b = −r³·Σ_group w·Σg(x − m) / cnt`,
/// `k = −r·Σ_group w·Σg / cnt`, `cnt` the values per group.
#[allow(clippy::too_many_arguments)]
pub(crate) fn grad_coefs(
    p: PlaneShape,
    grouping: Grouping,
    w: &[f64],
    sg: &[f64],
    sgx: &[f64],
    r: &[f64],
    cnt: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let groups = grouping.num_groups(&p);
    let (mut ga, mut gb) = (vec![0f64; groups], vec![0f64; groups]);
    for n in 0..p.n {
        for c in 0..p.c {
            let (i, g) = (n * p.c + c, grouping.group_of(&p, n, c));
            ga[g] += w[c] * sg[i];
            gb[g] += w[c] * sgx[i];
        }
    }
    let planes = p.n * p.c;
    let (mut a, mut b, mut k) = (vec![0f64; planes], vec![0f64; planes], vec![0f64; planes]);
    for n in 0..p.n {
        for c in 0..p.c {
            let (i, g) = (n * p.c + c, grouping.group_of(&p, n, c));
            a[i] = r[i] * w[c];
            b[i] = -r[i] * r[i] * r[i] * gb[g] / cnt;
            k[i] = -r[i] * ga[g] / cnt;
        }
    }
    (a, b, k)
}

/// Fused GroupNorm/InstanceNorm forward for channels-last input: each sample's statistics
/// (its `(S, C)` block in chunks of `ROW_CHUNK` rows, merged as [`plane_moments`] merges them)
/// and then its output, while the sample is still in cache (the apply re-reads it from L2/L3
/// rather than from memory). The same pieces, merges and coefficients as the unfused path, so
/// the same bits. Returns y and the per-`(n, group)` moments.
pub(crate) fn samples_fused_cl<T: Element>(
    x: &[T],
    p: PlaneShape,
    grouping: Grouping,
    w: &[f64],
    b: &[f64],
    eps: f64,
) -> (Vec<T>, Vec<Moments>) {
    let c = p.c;
    let len = (p.s * c).max(1);
    let one = PlaneShape { n: 1, ..p };
    let mut parts: Vec<Vec<Moments>> = Vec::new();
    let y = filled_vec(x.len(), |y| {
        if x.is_empty() {
            return;
        }
        parts = collect_init(
            y.par_chunks_mut(len).zip(x.par_chunks(len)),
            x.len(),
            Bufs::new,
            |bufs, (ys, xs)| {
                let mut planes = vec![Moments::default(); c];
                for chunk in xs.chunks(ROW_CHUNK * c) {
                    for (pl, m) in planes.iter_mut().zip(columns_moments(chunk, c)) {
                        *pl = pl.merge(m);
                    }
                }
                let gm = group_moments(&planes, one, grouping);
                let (a, m) = affine_coefs(one, grouping, &gm, w, eps);
                let coef = ColCoef::affine(&a, &m, b);
                rows_affine(xs, ys, c, 0, p.s, &coef, bufs);
                gm
            },
        );
    });
    (y, parts.into_iter().flatten().collect())
}

/// Fused GroupNorm/InstanceNorm backward for channels-last input with batch statistics: each
/// sample's per-plane sums (chunk by chunk, as [`plane_grad_sums`] takes them) and then its dx,
/// while the sample's dy and x are still in cache. The same pieces, sums and coefficients as
/// the two-pass path (`backward_two_pass`), so the same bits. `m`/`r` are per plane, `cnt`
/// the values per group. Returns dx and the per-plane (Σ g, Σ g·(x − m)).
#[allow(clippy::too_many_arguments)]
pub(crate) fn samples_backward_fused_cl<T: Element>(
    g: &[T],
    x: &[T],
    p: PlaneShape,
    grouping: Grouping,
    w: &[f64],
    m: &[f64],
    r: &[f64],
    cnt: f64,
) -> (Vec<T>, Vec<f64>, Vec<f64>) {
    let c = p.c;
    let len = (p.s * c).max(1);
    let one = PlaneShape { n: 1, ..p };
    let mut parts: Vec<(Vec<f64>, Vec<f64>)> = Vec::new();
    let dx = filled_vec(x.len(), |dx| {
        if x.is_empty() {
            return;
        }
        parts = collect_init(
            dx.par_chunks_mut(len)
                .zip(g.par_chunks(len).zip(x.par_chunks(len)))
                .enumerate(),
            x.len(),
            Bufs::new,
            |bufs, (n, (ds, (gs, xs)))| {
                let (mn, rn) = (&m[n * c..(n + 1) * c], &r[n * c..(n + 1) * c]);
                let (mut sg, mut sgx) = (vec![0f64; c], vec![0f64; c]);
                for (gc, xc) in gs.chunks(ROW_CHUNK * c).zip(xs.chunks(ROW_CHUNK * c)) {
                    let (s1, s2) = columns_grad_sums(gc, xc, mn);
                    for j in 0..c {
                        sg[j] += s1[j];
                        sgx[j] += s2[j];
                    }
                }
                let (a, b, k) = grad_coefs(one, grouping, w, &sg, &sgx, rn, cnt);
                let coef = ColCoef::grad(&a, &b, mn, &k);
                rows_grad_apply(gs, xs, ds, c, 0, p.s, &coef, bufs);
                (sg, sgx)
            },
        );
    });
    let (sg, sgx): (Vec<Vec<f64>>, Vec<Vec<f64>>) = parts.into_iter().unzip();
    (dx, sg.concat(), sgx.concat())
}

/// Fused GroupNorm/InstanceNorm backward for contiguous input with batch statistics: each
/// `(n, group)` run of `C/G · S` values is summed and then differentiated while it is in cache
/// (dy and x are read from memory once). `mean`/`rstd` are per `(n, group)`, `w` per channel.
/// Returns dx and the per-plane (Σ g, Σ g·(x − m)) for the parameter gradients.
pub(crate) fn groups_backward_fused<T: Element>(
    g: &[T],
    x: &[T],
    p: PlaneShape,
    groups: usize,
    w: &[f64],
    mean: &[f32],
    rstd: &[f32],
) -> (Vec<T>, Vec<f64>, Vec<f64>) {
    let d = p.c / groups.max(1);
    let s = p.s.max(1);
    let len = (d * s).max(1);
    let cnt = (d * p.s) as f64;
    let mut sums: Vec<Vec<(f64, f64)>> = Vec::new();
    let dx = filled_vec(x.len(), |dx| {
        if x.is_empty() {
            return;
        }
        sums = collect_init(
            dx.par_chunks_mut(len)
                .zip(g.par_chunks(len).zip(x.par_chunks(len)))
                .enumerate()
                .with_min_len((MIN_TASK / len).max(1)),
            x.len(),
            Bufs::new,
            |bufs, (gi, (dg, (gg, xg)))| {
                let (m, r) = (mean[gi] as f64, rstd[gi] as f64);
                let c0 = (gi % groups) * d;
                let per: Vec<(f64, f64)> = gg
                    .chunks(s)
                    .zip(xg.chunks(s))
                    .map(|(gc, xc)| run_grad_sums(bufs, gc, xc, m))
                    .collect();
                let (mut ga, mut gb) = (0.0, 0.0);
                for (j, (sg, sgx)) in per.iter().enumerate() {
                    ga += w[c0 + j] * sg;
                    gb += w[c0 + j] * sgx;
                }
                let (b, k) = (-r * r * r * gb / cnt, -r * ga / cnt);
                let planes = dg.chunks_mut(s).zip(gg.chunks(s).zip(xg.chunks(s)));
                for (j, (dc, (gc, xc))) in planes.enumerate() {
                    run_grad_apply(bufs, gc, xc, dc, r * w[c0 + j], b, m, k);
                }
                per
            },
        );
    });
    let (sg, sgx) = sums.into_iter().flatten().unzip();
    (dx, sg, sgx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Exact-ish f64 two-pass moments of one column.
    fn exact(col: &[f32]) -> (f64, f64) {
        let n = col.len() as f64;
        let mean = col.iter().map(|&v| v as f64).sum::<f64>() / n;
        (mean, col.iter().map(|&v| (v as f64 - mean).powi(2)).sum())
    }

    /// A `rows × cols` block of `T` from f32 values, and each column's exact moments (f64,
    /// of the values as rounded to `T`).
    fn block_of<T: Element>(
        rows: usize,
        cols: usize,
        f: impl Fn(usize, usize) -> f32,
    ) -> (Vec<T>, Vec<(f64, f64)>) {
        let x: Vec<T> = (0..rows * cols)
            .map(|i| T::narrow1(f(i / cols, i % cols)))
            .collect();
        let exact_cols = (0..cols)
            .map(|c| {
                exact(
                    &(0..rows)
                        .map(|r| x[r * cols + c].to_f32())
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        (x, exact_cols)
    }

    /// `got`'s mean and M2 within `tol` (absolute) of `want`.
    fn assert_close(got: &Moments, want: (f64, f64), tol: (f64, f64), at: &str) {
        let (mean, m2) = want;
        assert!(
            (got.mean - mean).abs() <= tol.0,
            "{at}: mean {} vs {mean}",
            got.mean
        );
        assert!((got.m2 - m2).abs() <= tol.1, "{at}: m2 {} vs {m2}", got.m2);
    }

    /// A block's values by (row, column).
    type Gen = Box<dyn Fn(usize, usize) -> f32>;

    /// A value in [-0.5, 0.5) from a fixed hash of (row, column).
    fn noise(r: usize, c: usize) -> f32 {
        ((r * 7919 + c * 104729) % 1013) as f32 / 1013.0 - 0.5
    }

    /// The f32-lane column moments of bf16/f16 blocks, at every instruction set this CPU has:
    /// taken on unit-scale data, with a shift near the mean, at a mean 1e3 std away and where
    /// the first rows (whose mean is the shift) sit 2.5 std from the rest; within the bound
    /// f32_col_sums_accurate promises (variance 1.3e-5 relative; the mean 3e-6 of the std).
    fn f32_column_moments_within_bound<T: Element, I: simd::Isa>() {
        for (rows, cols) in [(1, 16), (7, 5), (8, 33), (9, 16), (256, 37), (200, 64)] {
            let shapes: [(&str, Gen); 4] = [
                ("unit", Box::new(|r, c| 3.0 + noise(r, c))),
                ("mean 1e3", Box::new(|r, c| 1e3 + 8.0 * noise(r, c))),
                (
                    "first rows 2.5 std off",
                    Box::new(|r, c| {
                        if r < COL32_TILE_ROWS {
                            0.72
                        } else {
                            noise(r, c)
                        }
                    }),
                ),
                ("constant", Box::new(|_, c| c as f32)),
            ];
            for (what, f) in shapes {
                let (x, want) = block_of::<T>(rows, cols, f);
                let got = columns_moments_f32::<T, I>(&x, cols, rows).unwrap_or_else(|| {
                    panic!("{} {what} {rows}x{cols}: took the f64 path", T::DTYPE)
                });
                for (c, (g, &(mean, m2))) in got.iter().zip(&want).enumerate() {
                    let sd = (m2 / rows as f64).sqrt();
                    let tol = (3e-6 * sd + 1e-7 * mean.abs(), 1.3e-5 * m2);
                    let at = format!("{} {what} {rows}x{cols} column {c}", T::DTYPE);
                    assert_close(g, (mean, m2), tol, &at);
                }
            }
        }
    }

    /// Where f32 sums could not keep that accuracy, the f32 path declines and the exact path
    /// answers: first rows far from the rest (an f16 maximum as the shift), bf16 deviations
    /// whose squares overflow or underflow f32, NaN and infinities.
    fn f32_column_moments_decline<T: Element, I: simd::Isa>() {
        let (rows, cols) = (256, 37);
        let big = if T::DTYPE == DType::F16 { 6e4 } else { 1e30 };
        let cases: [(&str, Gen); 6] = [
            (
                "outlier first rows",
                Box::new(move |r, c| {
                    if r < 8 && c % 3 == 0 {
                        big
                    } else {
                        noise(r, c)
                    }
                }),
            ),
            ("huge spread", Box::new(move |r, c| big * noise(r, c))),
            // Squares below f32's normal range (subnormal), and below its smallest value.
            ("tiny spread", Box::new(|r, c| 1e-20 * (1.0 + noise(r, c)))),
            ("tiny spread", Box::new(|r, c| 1e-33 * (1.0 + noise(r, c)))),
            // Around a zero shift, deviations whose squares round to 0 in f32: not constant.
            (
                "tiny around 0",
                Box::new(|r, c| if (r + c) % 2 == 0 { 1e-23 } else { -1e-23 }),
            ),
            (
                "non-finite",
                Box::new(|r, c| match (r, c) {
                    (3, 0) => f32::NAN,
                    (5, 1) => f32::INFINITY,
                    _ => noise(r, c),
                }),
            ),
        ];
        for (what, f) in cases {
            let (x, want) = block_of::<T>(rows, cols, f);
            if what.starts_with("tiny") && T::DTYPE == DType::F16 {
                continue; // 0 in f16
            }
            if what == "huge spread" && T::DTYPE == DType::F16 {
                // f16 squares fit f32: taken, and accurate.
                assert!(
                    columns_moments_f32::<T, I>(&x, cols, rows).is_some(),
                    "f16 {what}"
                );
                continue;
            }
            assert!(
                columns_moments_f32::<T, I>(&x, cols, rows).is_none(),
                "{} {what}: took the f32 path",
                T::DTYPE
            );
            let got = columns_moments(&x, cols);
            for (c, (g, &(mean, m2))) in got.iter().zip(&want).enumerate() {
                if what == "non-finite" && c < 2 {
                    continue;
                }
                let tol = (1e-12 * mean.abs().max((m2 / rows as f64).sqrt()), 1e-9 * m2);
                assert_close(
                    g,
                    (mean, m2),
                    tol,
                    &format!("{} {what} column {c}", T::DTYPE),
                );
            }
            if what == "non-finite" {
                assert!(got[0].mean.is_nan() && got[0].m2.is_nan());
                assert_eq!(got[1].mean, f64::INFINITY);
                assert!(got[1].m2.is_nan());
            }
        }
    }

    /// Exact (Σ g, Σ g·(x − m), Σ|g|, Σ|g·(x − m)|) in f64.
    fn exact_grad(g: &[f32], x: &[f32], m: f64) -> [f64; 4] {
        let mut a = [0f64; 4];
        for (&g, &x) in g.iter().zip(x) {
            let (g, d) = (g as f64, x as f64 - m);
            a[0] += g;
            a[1] += g * d;
            a[2] += g.abs();
            a[3] += (g * d).abs();
        }
        a
    }

    /// The gradient sums of bf16/f16 runs and channels-last blocks, taken in f32 lanes, are
    /// within the f32 partials' bound (10·2⁻²⁴ of Σ|g| and Σ|g·(x − m)|); where a product
    /// overflows f32 or the mean is not finite they take the exact f64 path.
    fn f32_grad_sums_within_bound<T: Element>() {
        let u = f32::EPSILON as f64 / 2.0;
        let big = if T::DTYPE == DType::F16 { 200.0 } else { 1e20 };
        let cases = [
            ("unit", 1.0f32, 0.0, 3.0),
            ("products above f32", big, 0.0, 3.0),
            ("g > 0, mean 1e3", 1.0, 1.0, 1e3),
        ];
        for (what, scale, g0, x0) in cases {
            for n in [0, 1, 15, 16, 17, 130, 1000, 4099] {
                let to = |v: f32| T::narrow1(v);
                let g: Vec<T> = (0..n).map(|i| to(g0 + scale * noise(i, 1))).collect();
                let x: Vec<T> = (0..n).map(|i| to(x0 + scale * noise(i, 2))).collect();
                let (gf, xf): (Vec<f32>, Vec<f32>) = (
                    g.iter().map(|v| v.to_f32()).collect(),
                    x.iter().map(|v| v.to_f32()).collect(),
                );
                let m = xf.iter().map(|&v| v as f64).sum::<f64>() / n.max(1) as f64 + 1e-9;
                let [s1, s2, a1, a2] = exact_grad(&gf, &xf, m);
                let (g1, g2) = run_grad_sums(&mut Bufs::new(), &g, &x, m);
                let exact_path = what == "products above f32" && T::DTYPE == DType::BF16;
                let (t1, t2) = if exact_path {
                    (1e-12 * a1, 1e-12 * a2)
                } else {
                    (10.0 * u * a1, 20.0 * u * a2)
                };
                assert!(
                    (g1 - s1).abs() <= t1,
                    "{} {what} run of {n}: Σg {g1} vs {s1}",
                    T::DTYPE
                );
                assert!(
                    (g2 - s2).abs() <= t2,
                    "{} {what} run of {n}: Σg(x-m) {g2} vs {s2}",
                    T::DTYPE
                );
                // The same values as a channels-last block of 37 columns.
                let cols = 37;
                let rows = n / cols;
                let ms: Vec<f64> = (0..cols).map(|c| m + c as f64 * 1e-3).collect();
                let (c1, c2) = columns_grad_sums(&g[..rows * cols], &x[..rows * cols], &ms);
                for c in 0..cols {
                    let gc: Vec<f32> = (0..rows).map(|r| gf[r * cols + c]).collect();
                    let xc: Vec<f32> = (0..rows).map(|r| xf[r * cols + c]).collect();
                    let [s1, s2, a1, a2] = exact_grad(&gc, &xc, ms[c]);
                    let (t1, t2) = if exact_path {
                        (1e-12 * a1, 1e-12 * a2)
                    } else {
                        (10.0 * u * a1, 20.0 * u * a2)
                    };
                    assert!(
                        (c1[c] - s1).abs() <= t1,
                        "{} {what} column {c}: Σg {} vs {s1}",
                        T::DTYPE,
                        c1[c]
                    );
                    assert!(
                        (c2[c] - s2).abs() <= t2,
                        "{} {what} column {c}: Σg(x-m) {} vs {s2}",
                        T::DTYPE,
                        c2[c]
                    );
                }
            }
        }
        // A NaN or infinite mean gives what the exact path gives.
        let g: Vec<T> = (0..100).map(|i| T::narrow1(noise(i, 1))).collect();
        for m in [f64::NAN, f64::INFINITY] {
            let (g1, g2) = run_grad_sums(&mut Bufs::new(), &g, &g, m);
            let mut a = ([0f64; LANES], [0f64; LANES]);
            let gf: Vec<f32> = g.iter().map(|v| v.to_f32()).collect();
            acc_grad_portable::<simd::Plain>(&mut a.0, &mut a.1, &gf, &gf, m);
            let want = (lanes_sum(a.0), lanes_sum(a.1));
            assert_eq!(g1.to_bits(), want.0.to_bits(), "Σg with mean {m}");
            assert_eq!(g2.is_nan(), want.1.is_nan(), "Σg(x-m) with mean {m}");
        }
    }

    #[test]
    fn f32_grad_sums_are_accurate_or_declined() {
        f32_grad_sums_within_bound::<half::bf16>();
        f32_grad_sums_within_bound::<half::f16>();
    }

    /// bf16/f16 runs (GroupNorm, InstanceNorm and BatchNorm on contiguous input) long enough for
    /// the f32 lanes: within the f32 bound on unit-scale data and with outliers scattered over
    /// the first 128 values, and exact (declined to the f64 path) where the first row of 16,
    /// whose mean is the shift, is all outliers.
    fn f32_run_moments<T: Element>() {
        for n in [F32_RUN_MIN - 1, F32_RUN_MIN, 5000, RUN_CHUNK + 4099] {
            for outliers in ["none", "scattered", "first row"] {
                let v: Vec<T> = (0..n)
                    .map(|i| {
                        let out = match outliers {
                            "scattered" => i < 16 * 8 && i % 5 == 0,
                            "first row" => i < 16,
                            _ => false,
                        };
                        T::narrow1(if out { 6e4 } else { 3.0 + noise(i, 7) })
                    })
                    .collect();
                let vf: Vec<f32> = v.iter().map(|v| v.to_f32()).collect();
                let (mean, m2) = exact(&vf);
                let got = run_moments(&mut Bufs::new(), &v);
                let tol = if outliers == "first row" {
                    1e-9
                } else {
                    1.3e-5
                };
                let sd = (m2 / n as f64).sqrt();
                let at = format!("{} run of {n} (outliers: {outliers})", T::DTYPE);
                assert_close(&got, (mean, m2), (tol * sd, tol * m2), &at);
            }
        }
    }

    #[test]
    fn f32_column_moments_are_accurate_or_declined() {
        use simd::Level;
        fn all<T: Element>() {
            f32_column_moments_within_bound::<T, simd::Plain>();
            f32_column_moments_decline::<T, simd::Plain>();
            if simd::level() >= Level::Avx2 {
                f32_column_moments_within_bound::<T, simd::Fma>();
                f32_column_moments_decline::<T, simd::Fma>();
            }
            if simd::level() >= Level::Avx512 {
                f32_column_moments_within_bound::<T, simd::Avx512>();
                f32_column_moments_decline::<T, simd::Avx512>();
            }
        }
        all::<half::bf16>();
        all::<half::f16>();
        f32_run_moments::<half::bf16>();
        f32_run_moments::<half::f16>();
    }

    #[test]
    fn column_moments_shifted_by_an_outlier_keep_f64_accuracy() {
        // 37 columns (two groups of 16 and a tail), 256 rows around 1e4 with unit spread, the
        // first row (the shift) 1e6 away from the rest in some columns and NaN/inf in others.
        let (rows, cols) = (256, 37);
        let mut x: Vec<f32> = (0..rows * cols)
            .map(|i| 1e4 + ((i * 7919) % 1013) as f32 / 1013.0 - 0.5)
            .collect();
        for c in 0..cols {
            x[c] = match c % 4 {
                0 => 1e6,
                1 => -3e5,
                _ => x[c],
            };
        }
        let m = columns_moments(&x, cols);
        for c in 0..cols {
            let col: Vec<f32> = (0..rows).map(|r| x[r * cols + c]).collect();
            let (mean, m2) = exact(&col);
            assert!(
                (m[c].mean - mean).abs() <= 1e-12 * mean.abs(),
                "mean of column {c}"
            );
            assert!(
                (m[c].m2 - m2).abs() <= 1e-9 * m2,
                "m2 of column {c}: {} vs {m2}",
                m[c].m2
            );
        }
        // A non-finite first value: NaN stays NaN; an infinity gives an infinite mean and a
        // NaN variance (PyTorch's results), not a NaN mean from the shift.
        x[0] = f32::NAN;
        x[1] = f32::INFINITY;
        let m = columns_moments(&x, cols);
        assert!(m[0].mean.is_nan() && m[0].m2.is_nan());
        assert_eq!(m[1].mean, f64::INFINITY);
        assert!(m[1].m2.is_nan());
    }

    #[test]
    fn run_moments_shifted_by_an_outlier_keep_f64_accuracy() {
        // Tiles of 512 shifted by their first value: make that value 1e6 away from the rest
        // (at the start of the run and of its second tile), and NaN/inf in other runs.
        let mut v: Vec<f32> = (0..1300)
            .map(|i| 1e4 + ((i * 7919) % 1013) as f32 / 1013.0 - 0.5)
            .collect();
        v[0] = 1e6;
        v[512] = -1e6;
        let m = run_moments(&mut Bufs::new(), &v);
        let (mean, m2) = exact(&v);
        assert!(
            (m.mean - mean).abs() <= 1e-12 * mean.abs(),
            "mean {} vs {mean}",
            m.mean
        );
        assert!((m.m2 - m2).abs() <= 1e-9 * m2, "m2 {} vs {m2}", m.m2);
        v[0] = f32::NAN;
        let m = run_moments(&mut Bufs::new(), &v);
        assert!(m.mean.is_nan() && m.m2.is_nan());
        v[0] = f32::INFINITY;
        let m = run_moments(&mut Bufs::new(), &v);
        assert_eq!(m.mean, f64::INFINITY);
        assert!(m.m2.is_nan());
    }

    #[test]
    fn chan_merge_equals_whole() {
        let v: Vec<f32> = (0..1000)
            .map(|i| ((i * 37) % 101) as f32 * 0.25 + 1e4)
            .collect();
        let whole = run_moments(&mut Bufs::new(), &v);
        let parts = v
            .chunks(77)
            .map(|c| run_moments(&mut Bufs::new(), c))
            .fold(Moments::default(), Moments::merge);
        assert!((whole.mean - parts.mean).abs() < 1e-9 * whole.mean.abs());
        assert!((whole.m2 - parts.m2).abs() < 1e-9 * whole.m2);
        // Against an exact-ish f64 two-pass.
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / 1000.0;
        let m2: f64 = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum();
        assert!((whole.m2 - m2).abs() < 1e-9 * m2);
    }
}
