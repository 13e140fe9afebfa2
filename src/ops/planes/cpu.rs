//! The planes engine on the CPU: BatchNorm, InstanceNorm and GroupNorm over an `(N, C, S)`
//! view in either memory format, reduced per `(n, c)` plane and merged into statistic groups.

use rayon::prelude::*;

use super::{Grouping, PlaneShape};
use crate::dtype::Element;
use crate::ops::engine::*;
use crate::tensor::MemoryFormat;

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
            .map(|c| Moments::two_pass(n, mean[c], d1[c], d2[c]))
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
pub(crate) fn plane_moments<T: Element>(x: &[T], p: PlaneShape) -> Vec<Moments> {
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

/// `y = a[n·C+c]·(x − m[n·C+c]) + b[n·C+c]` over every plane, computed in f64, rounded once.
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
