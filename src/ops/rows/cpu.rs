//! The rows engine on the CPU: LayerNorm and RMSNorm over contiguous `(rows, cols)` data.

use rayon::prelude::*;

use crate::dtype::{DType, Element};
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

/// Rows summed in f32 per column before their dγ/dβ partials are added into f64.
const COL_FLUSH: usize = 8;

/// Rows up to this many values have the next row prefetched while they are worked on.
const PREFETCH_ROW: usize = 8192;

fn row_min_len(cols: usize) -> usize {
    (MIN_TASK / cols.max(1)).max(1)
}

/// Rows per block of the column reduction for dγ/dβ: at most 64 blocks and at least
/// 16 rows a block (each block has its own column partials to add up), fixed by the shape.
fn grad_block_rows(rows: usize) -> usize {
    rows.div_ceil(64).max(16)
}

multiversion! {
    /// One LayerNorm row: `y = (x − μ)·rstd·w + b` (statistics in f64, element work in f32);
    /// returns (μ, rstd).
    fn layer_norm_row<T: Element>(bufs: &mut Bufs, x: &[T], y: &mut [Out<T>], w: &[f32], b: &[f32], eps: f64) -> (f64, f64) {
        if x.len() <= PREFETCH_ROW {
            prefetch_after(x, x.len());
        }
        let mo = if x.len() <= RUN_CHUNK {
            moments_of::<T, I>(bufs, x)
        } else {
            x.chunks(RUN_CHUNK).map(|c| moments_of::<T, I>(bufs, c)).fold(Moments::default(), Moments::merge)
        };
        let (mean, rstd) = (mo.mean, 1.0 / (mo.var_biased() + eps).sqrt());
        let (m, r) = (SplitMean::new(mean), rstd as f32);
        map_elems!(bufs, x, y, [wv = w, bv = b], |v| I::fma32(m.dev(v) * r, wv, bv));
        (mean, rstd)
    }
}

multiversion! {
    /// One RMSNorm row: `y = x·rstd·w`; returns rstd.
    fn rms_norm_row<T: Element>(bufs: &mut Bufs, x: &[T], y: &mut [Out<T>], w: &[f32], eps: f64) -> f64 {
        let n = x.len() as f64;
        // bf16/f16 squares are exact in f32: summed by the column kernel with shift 0
        // (`run_dev32`: f32 partials of 8 values, then f64; relative error below 8 f32 ulps);
        // kept where no square overflowed (the sum is finite) and, for bf16, the underflowed
        // ones cannot matter (mean square >= 2^-100, each square off by at most 2^-150). An
        // f16 square is at least 2^-48 or exactly 0, so an f16 sum never underflows (a row of
        // zeros keeps its exact 0).
        let sum32 = if T::DTYPE != DType::F32 {
            Some(run_dev32::<T, I>(x, 0.0).1).filter(|&s| s.is_finite() && (T::DTYPE != DType::BF16 || s >= n * 2f64.powi(-100)))
        } else {
            None
        };
        let sum = sum32.unwrap_or_else(|| {
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
            lanes_sum(acc)
        });
        let r = 1.0 / (sum / n + eps).sqrt();
        let r32 = r as f32;
        map_elems!(bufs, x, y, [wv = w], |v| v * r32 * wv);
        r
    }
}

/// The forward driver of both row ops: `f(bufs, x_row, y_row)` normalizes one row and returns
/// its statistics; rows run in parallel when worth it. Returns (y, per-row results).
fn map_rows<T: Element, R: Send>(
    x: &[T],
    cols: usize,
    f: impl Fn(&mut Bufs, &[T], &mut [Out<T>]) -> R + Sync + Send,
) -> (Vec<T>, Vec<R>) {
    let mut stats = Vec::new();
    let y = filled_vec(x.len(), |y| {
        if x.is_empty() || cols == 0 {
            return;
        }
        stats = collect_init(
            y.par_chunks_mut(cols)
                .zip(x.par_chunks(cols))
                .with_min_len(row_min_len(cols)),
            x.len(),
            Bufs::new,
            |bufs, (yr, xr)| f(bufs, xr, yr),
        );
    });
    (y, stats)
}

/// LayerNorm forward over contiguous rows. Returns (y, mean, rstd).
pub(crate) fn layer_norm_fwd<T: Element>(
    x: &[T],
    cols: usize,
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    eps: f64,
) -> (Vec<T>, Vec<f32>, Vec<f32>) {
    let (w, b) = (param_or(weight, cols, 1.0), param_or(bias, cols, 0.0));
    let (w, b) = (&w[..], &b[..]);
    let (y, stats) = map_rows(x, cols, |bufs, xr, yr| {
        let (m, r) = layer_norm_row(bufs, xr, yr, w, b, eps);
        (m as f32, r as f32)
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
    let w = param_or(weight, cols, 1.0);
    let w = &w[..];
    map_rows(x, cols, |bufs, xr, yr| {
        rms_norm_row(bufs, xr, yr, w, eps) as f32
    })
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
        // Column sums Σg·x̂, Σg: f32 over COL_FLUSH rows, then added into the f64 sums.
        let (mut cw, mut cb) = (vec![0f32; dw.len()], vec![0f32; db.len()]);
        let rows = dx.chunks_exact_mut(cols).zip(g.chunks_exact(cols).zip(x.chunks_exact(cols)));
        for (r, (dr, (gr, xr))) in rows.enumerate() {
            let m = SplitMean::new(mean.map_or(0.0, |m| m[r] as f64));
            let rs = rstd[r];
            // Row sums Σu, Σu·x̂ (u = g·w): f32 lanes within a tile, f64 across tiles.
            let (mut s1, mut s2) = (0f64, 0f64);
            for_tiles2!(bufs, gr, xr, |o, gt, xt| {
                let len = gt.len();
                let wt = &w[o..o + len];
                let mut a1 = [0f32; 2 * LANES];
                let mut a2 = [0f32; 2 * LANES];
                let (gc, gtl) = gt.as_chunks::<{ 2 * LANES }>();
                let (xc, xtl) = xt.as_chunks::<{ 2 * LANES }>();
                let (wc, wtl) = wt.as_chunks::<{ 2 * LANES }>();
                for ((gv, xv), wv) in gc.iter().zip(xc).zip(wc) {
                    for i in 0..2 * LANES {
                        let (u, h) = (gv[i] * wv[i], m.dev(xv[i]) * rs);
                        a1[i] += u;
                        a2[i] = I::fma32(u, h, a2[i]);
                    }
                }
                for (i, ((gv, xv), wv)) in gtl.iter().zip(xtl).zip(wtl).enumerate() {
                    let (u, h) = (gv * wv, m.dev(*xv) * rs);
                    a1[i] += u;
                    a2[i] = I::fma32(u, h, a2[i]);
                }
                s1 += a1.iter().map(|&v| v as f64).sum::<f64>();
                s2 += a2.iter().map(|&v| v as f64).sum::<f64>();
                if col_sums {
                    let (cw, cb) = (&mut cw[o..o + len], &mut cb[o..o + len]);
                    for (((cwv, cbv), gv), xv) in cw.iter_mut().zip(cb.iter_mut()).zip(gt).zip(xt) {
                        *cwv = I::fma32(*gv, m.dev(*xv) * rs, *cwv);
                        *cbv += *gv;
                    }
                }
            });
            if col_sums && ((r + 1) % COL_FLUSH == 0 || r + 1 == rstd.len()) {
                for (((dwv, dbv), cwv), cbv) in dw.iter_mut().zip(db.iter_mut()).zip(&mut cw).zip(&mut cb) {
                    *dwv += std::mem::take(cwv) as f64;
                    *dbv += std::mem::take(cbv) as f64;
                }
            }
            let m1 = if mean.is_some() { (s1 / n) as f32 } else { 0.0 };
            let m2 = (s2 / n) as f32;
            // u rounded as in the sums pass (a fused g·w − m1 would leave the rounding of u,
            // times rstd, where the exact result is 0).
            map_elems2!(bufs, gr, xr, dr, [wv = w], |gv, xv| {
                let (u, xh) = (gv * wv, m.dev(xv) * rs);
                rs * (u - I::fma32(xh, m2, m1))
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
    // Without a weight or bias nobody needs the column sums: skip them (empty slices make the
    // kernel's column loop empty). The partial sums of all blocks live in one allocation.
    let n = if param_grads { cols } else { 0 };
    let blocks = (x.len() / cols).div_ceil(br);
    // One slot of 2·max(n, 1) per block, so that every block has one even when n = 0.
    let mut parts = vec![0f64; 2 * n.max(1) * blocks];
    let dx = filled_vec(x.len(), |dx| {
        for_each_init(
            dx.par_chunks_mut(br * cols)
                .zip(g.par_chunks(br * cols).zip(x.par_chunks(br * cols)))
                .zip(parts.par_chunks_mut(2 * n.max(1)))
                .enumerate(),
            x.len(),
            || (),
            |_, (blk, ((db, (gb, xb)), part))| {
                let (r0, r1) = (blk * br, blk * br + db.len() / cols);
                let (pw, pb) = part.split_at_mut(n);
                let m = mean.map(|m| &m[r0..r1]);
                norm_rows_bwd(gb, xb, db, cols, m, &rstd[r0..r1], w, pw, &mut pb[..n]);
            },
        );
    });
    let mut dw = vec![0f64; cols];
    let mut db = vec![0f64; cols];
    for part in parts.chunks_exact(2 * n.max(1)).filter(|_| n > 0) {
        let (pw, pb) = part.split_at(n);
        for j in 0..n {
            dw[j] += pw[j];
            db[j] += pb[j];
        }
    }
    (dx, dw, db)
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    /// `rms_norm_row`'s rstd for `vals` rounded to `T`, against the exact f64 value.
    fn rstd_error<T: Element>(vals: &[f32], eps: f64) -> (f64, f64) {
        let x: Vec<T> = vals.iter().map(|&v| T::narrow1(v)).collect();
        let exact = {
            let ss: f64 = x.iter().map(|v| (v.to_f32() as f64).powi(2)).sum();
            1.0 / (ss / x.len() as f64 + eps).sqrt()
        };
        let mut y = vec![Out::<T>::uninit(); x.len()];
        let w = vec![1f32; x.len()];
        let r = rms_norm_row(&mut Bufs::new(), &x, &mut y, &w, eps);
        (r, ((r - exact) / exact).abs())
    }

    fn noise(i: usize) -> f32 {
        ((i * 7919) % 1013) as f32 / 1013.0 * 2.0 - 1.0
    }

    /// The bf16/f16 sum of squares in f32 lanes: within its bound (8 f32 ulps on the sum, so
    /// 4 on rstd; 5e-7 here) on rows that end in a partial group of chunks and a tail, and on a
    /// row of 2^22 values (summed in f32 alone, without the f64 flush, it was 2e-6 to 7e-6 off);
    /// bf16 squares that overflow or underflow f32 (values near 3e38, or all near 1e-30 with
    /// eps = 0) fall back to the f64 sums (1e-12). f16 squares cannot leave f32's range: its
    /// tiny row (subnormals near 1e-7) stays in the f32 lanes, whose sums of such squares
    /// (at most 22 significant bits each) are exact; and a row of zeros with eps = 0 gives
    /// rstd = inf, as the f64 sum does.
    fn rms_sum_of_squares<T: Element>() {
        for len in [1, 15, 16, 17, 127, 128, 129, 300, 1000, 4099, 1 << 22] {
            let vals: Vec<f32> = (0..len).map(|i| 1.0 + noise(i)).collect();
            let (_, err) = rstd_error::<T>(&vals, 1e-5);
            assert!(err < 5e-7, "{:?} len {len}: {err:e}", T::DTYPE);
        }
        if T::DTYPE == DType::BF16 {
            let big: Vec<f32> = (0..300).map(|i| 3e38 * noise(i)).collect();
            let (r, err) = rstd_error::<T>(&big, 1e-5);
            assert!(r > 0.0 && err < 1e-12, "overflow: {r:e} {err:e}");
        }
        let tiny_scale = if T::DTYPE == DType::BF16 { 1e-30 } else { 1e-7 };
        let tiny: Vec<f32> = (0..300).map(|i| tiny_scale * (0.5 + noise(i))).collect();
        let (r, err) = rstd_error::<T>(&tiny, 0.0);
        assert!(r.is_finite() && err < 1e-12, "underflow: {r:e} {err:e}");
        let (r, _) = rstd_error::<T>(&[0.0; 300], 0.0);
        assert_eq!(r, f64::INFINITY, "zeros");
    }

    #[test]
    fn rms_sum_of_squares_bf16() {
        rms_sum_of_squares::<bf16>();
    }

    #[test]
    fn rms_sum_of_squares_f16() {
        rms_sum_of_squares::<f16>();
    }
}
