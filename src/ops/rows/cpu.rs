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

/// Rows up to this many values have the next row prefetched while they are worked on.
const PREFETCH_ROW: usize = 8192;

fn row_min_len(cols: usize) -> usize {
    (MIN_TASK / cols.max(1)).max(1)
}

/// Rows per block of the column reduction for dγ/dβ: at most 64 blocks, fixed by the shape.
fn grad_block_rows(rows: usize) -> usize {
    rows.div_ceil(64).max(1)
}

multiversion! {
    /// One LayerNorm row: `y = (x − μ)·rstd·w + b` (statistics in f64, element work in f32);
    /// returns (μ, rstd).
    fn layer_norm_row<T: Element>(bufs: &mut Bufs, x: &[T], y: &mut [Out<T>], w: &[f32], b: &[f32], eps: f64) -> (f64, f64) {
        if x.len() <= PREFETCH_ROW {
            prefetch_after(x, x.len());
        }
        let mo = if x.len() <= RUN_CHUNK {
            moments_body::<T, I>(bufs, x)
        } else {
            x.chunks(RUN_CHUNK).map(|c| moments_body::<T, I>(bufs, c)).fold(Moments::default(), Moments::merge)
        };
        let (mean, rstd) = (mo.mean, 1.0 / (mo.var_biased() + eps).sqrt());
        let (m, r) = (SplitMean::new(mean), rstd as f32);
        map_tiles!(bufs, x, y, |o, xt, yt| {
            let (w, b) = (&w[o..o + xt.len()], &b[o..o + xt.len()]);
            for (((yv, xv), wv), bv) in yt.iter_mut().zip(xt).zip(w).zip(b) {
                yv.write(I::fma32(m.dev(*xv) * r, *wv, *bv));
            }
        });
        (mean, rstd)
    }
}

multiversion! {
    /// One RMSNorm row: `y = x·rstd·w`; returns rstd.
    fn rms_norm_row<T: Element>(bufs: &mut Bufs, x: &[T], y: &mut [Out<T>], w: &[f32], eps: f64) -> f64 {
        let mut acc = [0f64; LANES];
        for_tiles!(bufs, x, |_, t| {
            let (chunks, tail) = t.as_chunks::<LANES>();
            for ch in chunks {
                let v: [f64; LANES] = std::array::from_fn(|i| ch[i] as f64);
                for i in 0..LANES {
                    acc[i] = I::fma(v[i], v[i], acc[i]);
                }
            }
            for (a, v) in acc.iter_mut().zip(tail) {
                *a += *v as f64 * *v as f64;
            }
        });
        let r = 1.0 / (lanes_sum(acc) / x.len() as f64 + eps).sqrt();
        let r32 = r as f32;
        map_tiles!(bufs, x, y, |o, xt, yt| {
            for ((yv, xv), wv) in yt.iter_mut().zip(xt).zip(&w[o..o + xt.len()]) {
                yv.write(*xv * r32 * *wv);
            }
        });
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
            .map_init(Bufs::new, |bufs, (yr, xr)| {
                let (m, r) = layer_norm_row(bufs, xr, yr, w, b, eps);
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
            .map_init(Bufs::new, |bufs, (yr, xr)| {
                rms_norm_row(bufs, xr, yr, w, eps) as f32
            })
            .collect();
    });
    (y, rstd)
}

multiversion! {
    /// LayerNorm (`mean` given) or RMSNorm backward of one block of rows: writes dx and, when
    /// `dw`/`db` are not empty, accumulates Σ g·x̂ into `dw` and Σ g into `db`. Two passes over
    /// each row (which stays in cache): row and column sums, then dx; element work in f32,
    /// sums in f64.
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
        let col_sums = !dw.is_empty();
        let bufs = &mut Bufs::new();
        let rows = dx.chunks_exact_mut(cols).zip(g.chunks_exact(cols).zip(x.chunks_exact(cols)));
        for (r, (dr, (gr, xr))) in rows.enumerate() {
            let m = SplitMean::new(mean.map_or(0.0, |m| m[r] as f64));
            let rs = rstd[r];
            // Row sums Σu, Σu·x̂ (u = g·w) in f64 lanes; column sums Σg·x̂, Σg.
            let mut s1 = [0f64; LANES];
            let mut s2 = [0f64; LANES];
            let mut u = [0f32; TILE];
            let mut xh = [0f32; TILE];
            for_tiles2!(bufs, gr, xr, |o, gt, xt| {
                let len = gt.len();
                let (u, xh) = (&mut u[..len], &mut xh[..len]);
                for (((uv, hv), (gv, xv)), wv) in
                    u.iter_mut().zip(xh.iter_mut()).zip(gt.iter().zip(xt)).zip(&w[o..o + len])
                {
                    *uv = gv * wv;
                    *hv = m.dev(*xv) * rs;
                }
                let (uc, ut) = u.as_chunks::<LANES>();
                let (hc, ht) = xh.as_chunks::<LANES>();
                for (uv, hv) in uc.iter().zip(hc) {
                    for i in 0..LANES {
                        s1[i] += uv[i] as f64;
                    }
                    for i in 0..LANES {
                        s2[i] = I::fma(uv[i] as f64, hv[i] as f64, s2[i]);
                    }
                }
                for (i, (uv, hv)) in ut.iter().zip(ht).enumerate() {
                    s1[i] += *uv as f64;
                    s2[i] += *uv as f64 * *hv as f64;
                }
                if col_sums {
                    let (dw, db) = (&mut dw[o..o + len], &mut db[o..o + len]);
                    for (((dwv, dbv), gv), hv) in dw.iter_mut().zip(db.iter_mut()).zip(gt).zip(&*xh) {
                        *dwv = I::fma(*gv as f64, *hv as f64, *dwv);
                        *dbv += *gv as f64;
                    }
                }
            });
            let (s1, s2) = (lanes_sum(s1), lanes_sum(s2));
            let m1 = if mean.is_some() { (s1 / n) as f32 } else { 0.0 };
            let m2 = (s2 / n) as f32;
            map_tiles2!(bufs, gr, xr, dr, |o, gt, xt, yt| {
                let w = &w[o..o + gt.len()];
                for (((yv, gv), xv), wv) in yt.iter_mut().zip(gt).zip(xt).zip(w) {
                    // u rounded as in the sums pass (a fused g·w − m1 would leave the rounding
                    // of u, times rstd, where the exact result is 0).
                    let (u, xh) = (*gv * *wv, m.dev(*xv) * rs);
                    yv.write(rs * (u - I::fma32(xh, m2, m1)));
                }
            });
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
