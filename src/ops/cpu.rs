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
// Contiguous runs
// ---------------------------------------------------------------------------------------------

#[inline(always)]
fn lanes_sum(acc: [f64; LANES]) -> f64 {
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
}

/// Σ x over a run.
#[inline]
fn run_sum<T: Element>(x: &[T]) -> f64 {
    let mut acc = [0f64; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f64 = chunks.remainder().iter().map(|v| v.to_f64()).sum();
    for ch in chunks {
        for i in 0..LANES {
            acc[i] += ch[i].to_f64();
        }
    }
    lanes_sum(acc) + tail
}

/// (Σ (x − m), Σ (x − m)²) over a run.
#[inline]
fn run_dev_sums<T: Element>(x: &[T], m: f64) -> (f64, f64) {
    let mut a1 = [0f64; LANES];
    let mut a2 = [0f64; LANES];
    let chunks = x.chunks_exact(LANES);
    let (mut t1, mut t2) = (0.0, 0.0);
    for v in chunks.remainder() {
        let d = v.to_f64() - m;
        t1 += d;
        t2 += d * d;
    }
    for ch in chunks {
        for i in 0..LANES {
            let d = ch[i].to_f64() - m;
            a1[i] += d;
            a2[i] += d * d;
        }
    }
    (lanes_sum(a1) + t1, lanes_sum(a2) + t2)
}

/// Moments of a run by the corrected two-pass algorithm.
pub(crate) fn run_moments<T: Element>(x: &[T]) -> Moments {
    if x.is_empty() {
        return Moments::default();
    }
    let n = x.len() as f64;
    let m = run_sum(x) / n;
    let (d1, d2) = run_dev_sums(x, m);
    Moments {
        count: n,
        mean: m + d1 / n,
        m2: (d2 - d1 * d1 / n).max(0.0),
    }
}

/// Moments of a long run, reduced in fixed pieces merged in order.
fn long_run_moments<T: Element>(x: &[T]) -> Moments {
    if x.len() <= RUN_CHUNK {
        return run_moments(x);
    }
    x.chunks(RUN_CHUNK)
        .map(run_moments)
        .fold(Moments::default(), Moments::merge)
}

/// (Σ g, Σ g·(x − m)) over a run.
#[inline]
fn run_grad_sums<T: Element>(g: &[T], x: &[T], m: f64) -> (f64, f64) {
    let mut a1 = [0f64; LANES];
    let mut a2 = [0f64; LANES];
    let (mut t1, mut t2) = (0.0, 0.0);
    let gc = g.chunks_exact(LANES);
    let xc = x.chunks_exact(LANES);
    for (gv, xv) in gc.remainder().iter().zip(xc.remainder()) {
        let gg = gv.to_f64();
        t1 += gg;
        t2 += gg * (xv.to_f64() - m);
    }
    for (gch, xch) in gc.zip(xc) {
        for i in 0..LANES {
            let gg = gch[i].to_f64();
            a1[i] += gg;
            a2[i] += gg * (xch[i].to_f64() - m);
        }
    }
    (lanes_sum(a1) + t1, lanes_sum(a2) + t2)
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
                .map(long_run_moments)
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
                    let block = &x[(n * p.s + r0) * p.c..(n * p.s + r1) * p.c];
                    columns_moments(block, p.c)
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

/// Per-column moments of a row-major `(rows, cols)` block by the corrected two-pass.
fn columns_moments<T: Element>(block: &[T], cols: usize) -> Vec<Moments> {
    let rows = block.len() / cols.max(1);
    let mut sum = vec![0f64; cols];
    for row in block.chunks_exact(cols) {
        for (a, v) in sum.iter_mut().zip(row) {
            *a += v.to_f64();
        }
    }
    let mean: Vec<f64> = sum.iter().map(|s| s / rows as f64).collect();
    let mut d1 = vec![0f64; cols];
    let mut d2 = vec![0f64; cols];
    for row in block.chunks_exact(cols) {
        for c in 0..cols {
            let d = row[c].to_f64() - mean[c];
            d1[c] += d;
            d2[c] += d * d;
        }
    }
    (0..cols)
        .map(|c| {
            let n = rows as f64;
            Moments {
                count: n,
                mean: mean[c] + d1[c] / n,
                m2: (d2[c] - d1[c] * d1[c] / n).max(0.0),
            }
        })
        .collect()
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
    y: &mut [T],
    p: Planes,
    a: &[f64],
    m: &[f64],
    b: &[f64],
) {
    if x.is_empty() {
        return;
    }
    match p.format {
        MemoryFormat::Contiguous => {
            let s = p.s.max(1);
            let min_len = (MIN_TASK / s).max(1);
            y.par_chunks_mut(s)
                .zip(x.par_chunks(s))
                .enumerate()
                .with_min_len(min_len)
                .for_each(|(i, (yr, xr))| {
                    let (ai, mi, bi) = (a[i], m[i], b[i]);
                    for (yv, xv) in yr.iter_mut().zip(xr) {
                        *yv = T::from_f64(ai * (xv.to_f64() - mi) + bi);
                    }
                });
        }
        MemoryFormat::ChannelsLast => {
            let c = p.c;
            y.par_chunks_mut(ROW_CHUNK * c)
                .zip(x.par_chunks(ROW_CHUNK * c))
                .enumerate()
                .for_each(|(k, (yb, xb))| {
                    for (r, (yr, xr)) in yb.chunks_exact_mut(c).zip(xb.chunks_exact(c)).enumerate()
                    {
                        let n = (k * ROW_CHUNK + r) / p.s;
                        let o = n * c;
                        let (ar, mr, br) = (&a[o..o + c], &m[o..o + c], &b[o..o + c]);
                        for j in 0..c {
                            yr[j] = T::from_f64(ar[j] * (xr[j].to_f64() - mr[j]) + br[j]);
                        }
                    }
                });
        }
    }
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
            let min_len = (MIN_TASK / s).max(1);
            let v: Vec<(f64, f64)> = g
                .par_chunks(s)
                .zip(x.par_chunks(s))
                .enumerate()
                .with_min_len(min_len)
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
                    let mr = &m[n * c..n * c + c];
                    let mut s1 = vec![0f64; c];
                    let mut s2 = vec![0f64; c];
                    for (gr, xr) in g[range.clone()].chunks_exact(c).zip(x[range].chunks_exact(c)) {
                        for j in 0..c {
                            let gg = gr[j].to_f64();
                            s1[j] += gg;
                            s2[j] += gg * (xr[j].to_f64() - mr[j]);
                        }
                    }
                    (s1, s2)
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
#[allow(clippy::too_many_arguments)]
pub(crate) fn plane_grad_apply<T: Element>(
    g: &[T],
    x: &[T],
    dx: &mut [T],
    p: Planes,
    a: &[f64],
    b: &[f64],
    m: &[f64],
    k: &[f64],
) {
    if x.is_empty() {
        return;
    }
    match p.format {
        MemoryFormat::Contiguous => {
            let s = p.s.max(1);
            let min_len = (MIN_TASK / s).max(1);
            dx.par_chunks_mut(s)
                .zip(g.par_chunks(s).zip(x.par_chunks(s)))
                .enumerate()
                .with_min_len(min_len)
                .for_each(|(i, (dr, (gr, xr)))| {
                    let (ai, bi, mi, ki) = (a[i], b[i], m[i], k[i]);
                    for ((d, gv), xv) in dr.iter_mut().zip(gr).zip(xr) {
                        *d = T::from_f64(ai * gv.to_f64() + bi * (xv.to_f64() - mi) + ki);
                    }
                });
        }
        MemoryFormat::ChannelsLast => {
            let c = p.c;
            dx.par_chunks_mut(ROW_CHUNK * c)
                .zip(g.par_chunks(ROW_CHUNK * c).zip(x.par_chunks(ROW_CHUNK * c)))
                .enumerate()
                .for_each(|(t, (db, (gb, xb)))| {
                    let rows = db.chunks_exact_mut(c).zip(gb.chunks_exact(c).zip(xb.chunks_exact(c)));
                    for (r, (dr, (gr, xr))) in rows.enumerate() {
                        let o = ((t * ROW_CHUNK + r) / p.s) * c;
                        for j in 0..c {
                            dr[j] = T::from_f64(
                                a[o + j] * gr[j].to_f64()
                                    + b[o + j] * (xr[j].to_f64() - m[o + j])
                                    + k[o + j],
                            );
                        }
                    }
                });
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Row engine (LayerNorm, RMSNorm)
// ---------------------------------------------------------------------------------------------

fn row_min_len(cols: usize) -> usize {
    (MIN_TASK / cols.max(1)).max(1)
}

/// Rows per block of the column reduction for dγ/dβ: at most 64 blocks, fixed by the shape.
fn grad_block_rows(rows: usize) -> usize {
    rows.div_ceil(64).max(1)
}

/// LayerNorm forward: per-row moments, `y = (x − μ)·rstd·γ + β`. Returns (mean, rstd) per row.
pub(crate) fn layer_norm_fwd<T: Element>(
    x: &[T],
    y: &mut [T],
    cols: usize,
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    eps: f64,
) -> (Vec<f32>, Vec<f32>) {
    if x.is_empty() || cols == 0 {
        return (Vec::new(), Vec::new());
    }
    y.par_chunks_mut(cols)
        .zip(x.par_chunks(cols))
        .with_min_len(row_min_len(cols))
        .map(|(yr, xr)| {
            let m = long_run_moments(xr);
            let rstd = 1.0 / (m.var_biased() + eps).sqrt();
            let mean = m.mean;
            match (weight, bias) {
                (Some(w), Some(b)) => {
                    for j in 0..cols {
                        let v = (xr[j].to_f64() - mean) * rstd;
                        yr[j] = T::from_f64(v * w[j] as f64 + b[j] as f64);
                    }
                }
                (Some(w), None) => {
                    for j in 0..cols {
                        let v = (xr[j].to_f64() - mean) * rstd;
                        yr[j] = T::from_f64(v * w[j] as f64);
                    }
                }
                (None, Some(b)) => {
                    for j in 0..cols {
                        let v = (xr[j].to_f64() - mean) * rstd;
                        yr[j] = T::from_f64(v + b[j] as f64);
                    }
                }
                (None, None) => {
                    for j in 0..cols {
                        yr[j] = T::from_f64((xr[j].to_f64() - mean) * rstd);
                    }
                }
            }
            (mean as f32, rstd as f32)
        })
        .unzip()
}

/// Sums per-block column partials in block order.
fn reduce_column_partials(parts: Vec<Vec<f64>>, cols: usize) -> Vec<f64> {
    let mut out = vec![0f64; cols];
    for part in parts {
        for (o, v) in out.iter_mut().zip(part) {
            *o += v;
        }
    }
    out
}

/// LayerNorm backward. Returns (dγ, dβ) over rows (f64); writes dx.
pub(crate) fn layer_norm_bwd<T: Element>(
    g: &[T],
    x: &[T],
    dx: &mut [T],
    cols: usize,
    mean: &[f32],
    rstd: &[f32],
    weight: Option<&[f32]>,
) -> (Vec<f64>, Vec<f64>) {
    if x.is_empty() || cols == 0 {
        return (vec![0.0; cols], vec![0.0; cols]);
    }
    let rows = x.len() / cols;
    let br = grad_block_rows(rows);
    let n = cols as f64;
    let parts: Vec<(Vec<f64>, Vec<f64>)> = dx
        .par_chunks_mut(br * cols)
        .zip(g.par_chunks(br * cols).zip(x.par_chunks(br * cols)))
        .enumerate()
        .map(|(blk, (db, (gb, xb)))| {
            let mut dgamma = vec![0f64; cols];
            let mut dbeta = vec![0f64; cols];
            let rows_iter = db.chunks_exact_mut(cols).zip(gb.chunks_exact(cols).zip(xb.chunks_exact(cols)));
            for (r, (dr, (gr, xr))) in rows_iter.enumerate() {
                let row = blk * br + r;
                let (mu, rs) = (mean[row] as f64, rstd[row] as f64);
                let mut s1 = [0f64; LANES];
                let mut s2 = [0f64; LANES];
                for j in 0..cols {
                    let gg = gr[j].to_f64();
                    let xh = (xr[j].to_f64() - mu) * rs;
                    let u = weight.map_or(gg, |w| gg * w[j] as f64);
                    s1[j % LANES] += u;
                    s2[j % LANES] += u * xh;
                    dgamma[j] += gg * xh;
                    dbeta[j] += gg;
                }
                let (m1, m2) = (lanes_sum(s1) / n, lanes_sum(s2) / n);
                for j in 0..cols {
                    let gg = gr[j].to_f64();
                    let xh = (xr[j].to_f64() - mu) * rs;
                    let u = weight.map_or(gg, |w| gg * w[j] as f64);
                    dr[j] = T::from_f64(rs * (u - m1 - xh * m2));
                }
            }
            (dgamma, dbeta)
        })
        .collect();
    let (pg, pb): (Vec<_>, Vec<_>) = parts.into_iter().unzip();
    (reduce_column_partials(pg, cols), reduce_column_partials(pb, cols))
}

/// RMSNorm forward: `y = x·rsqrt(mean(x²) + eps)·w`. Returns rstd per row.
pub(crate) fn rms_norm_fwd<T: Element>(
    x: &[T],
    y: &mut [T],
    cols: usize,
    weight: Option<&[f32]>,
    eps: f64,
) -> Vec<f32> {
    if x.is_empty() || cols == 0 {
        return Vec::new();
    }
    y.par_chunks_mut(cols)
        .zip(x.par_chunks(cols))
        .with_min_len(row_min_len(cols))
        .map(|(yr, xr)| {
            let mut acc = [0f64; LANES];
            let chunks = xr.chunks_exact(LANES);
            let tail: f64 = chunks.remainder().iter().map(|v| v.to_f64() * v.to_f64()).sum();
            for ch in chunks {
                for i in 0..LANES {
                    let v = ch[i].to_f64();
                    acc[i] += v * v;
                }
            }
            let ms = (lanes_sum(acc) + tail) / cols as f64;
            let r = 1.0 / (ms + eps).sqrt();
            match weight {
                Some(w) => {
                    for j in 0..cols {
                        yr[j] = T::from_f64(xr[j].to_f64() * r * w[j] as f64);
                    }
                }
                None => {
                    for j in 0..cols {
                        yr[j] = T::from_f64(xr[j].to_f64() * r);
                    }
                }
            }
            r as f32
        })
        .collect()
}

/// RMSNorm backward. Returns dw over rows (f64); writes dx.
pub(crate) fn rms_norm_bwd<T: Element>(
    g: &[T],
    x: &[T],
    dx: &mut [T],
    cols: usize,
    rstd: &[f32],
    weight: Option<&[f32]>,
) -> Vec<f64> {
    if x.is_empty() || cols == 0 {
        return vec![0.0; cols];
    }
    let rows = x.len() / cols;
    let br = grad_block_rows(rows);
    let n = cols as f64;
    let parts: Vec<Vec<f64>> = dx
        .par_chunks_mut(br * cols)
        .zip(g.par_chunks(br * cols).zip(x.par_chunks(br * cols)))
        .enumerate()
        .map(|(blk, (db, (gb, xb)))| {
            let mut dw = vec![0f64; cols];
            let rows_iter = db.chunks_exact_mut(cols).zip(gb.chunks_exact(cols).zip(xb.chunks_exact(cols)));
            for (r, (dr, (gr, xr))) in rows_iter.enumerate() {
                let rs = rstd[blk * br + r] as f64;
                let mut s = [0f64; LANES];
                for j in 0..cols {
                    let gg = gr[j].to_f64();
                    let xv = xr[j].to_f64();
                    let u = weight.map_or(gg, |w| gg * w[j] as f64);
                    s[j % LANES] += u * xv;
                    dw[j] += gg * xv * rs;
                }
                let mux = lanes_sum(s) / n;
                for j in 0..cols {
                    let gg = gr[j].to_f64();
                    let xv = xr[j].to_f64();
                    let u = weight.map_or(gg, |w| gg * w[j] as f64);
                    dr[j] = T::from_f64(rs * (u - xv * rs * rs * mux));
                }
            }
            dw
        })
        .collect();
    reduce_column_partials(parts, cols)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chan_merge_equals_whole() {
        let v: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 * 0.25 + 1e4).collect();
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
