//! The rows engine on the CPU: LayerNorm and RMSNorm over contiguous `(rows, cols)` data.

use rayon::prelude::*;

use crate::dtype::Element;
use crate::ops::engine::*;

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
/// Returns (dx, Σ_rows g·x̂, Σ_rows g), the sums in f64 and in a fixed block order (zeros when
/// `param_grads` is false: not computed).
pub(crate) fn norm_rows_backward<T: Element>(
    g: &[T],
    x: &[T],
    cols: usize,
    mean: Option<&[f32]>,
    rstd: &[f32],
    weight: Option<&[f32]>,
    param_grads: bool,
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
                // Without a weight or bias nobody needs the column sums: skip them (empty
                // slices make the kernel's column loop empty).
                let n = if param_grads { cols } else { 0 };
                let mut pw = vec![0f64; n];
                let mut pb = vec![0f64; n];
                let m = mean.map(|m| &m[r0..r1]);
                norm_rows_bwd(gb, xb, db, cols, m, &rstd[r0..r1], w, &mut pw, &mut pb);
                (pw, pb)
            })
            .collect();
    });
    let mut dw = vec![0f64; cols];
    let mut db = vec![0f64; cols];
    for (pw, pb) in parts {
        for j in 0..pw.len() {
            dw[j] += pw[j];
            db[j] += pb[j];
        }
    }
    (dx, dw, db)
}
