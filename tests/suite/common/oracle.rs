#![allow(clippy::needless_range_loop)]
//! A deliberately naive f64 reference for every op, on logical (NCHW) data: one loop per
//! formula of SEMANTICS §3–4, no shared code with the crate.

/// How elements map to normalized sets and to affine parameters.
pub struct Spec {
    /// Normalized-set index of logical element i.
    pub group: Box<dyn Fn(usize) -> usize>,
    /// Parameter index (weight/bias) of logical element i.
    pub param: Box<dyn Fn(usize) -> usize>,
    pub groups: usize,
    pub params: usize,
    /// Subtract the mean (false for RMSNorm).
    pub center: bool,
}

impl Spec {
    /// BatchNorm (`groups = C`), InstanceNorm (`G = C`) and GroupNorm on (N, C, S).
    pub fn planes(n: usize, c: usize, s: usize, num_groups: Option<usize>) -> Spec {
        match num_groups {
            None => Spec {
                group: Box::new(move |i| (i / s) % c),
                param: Box::new(move |i| (i / s) % c),
                groups: c,
                params: c,
                center: true,
            },
            Some(g) => Spec {
                group: Box::new(move |i| (i / s / c) * g + ((i / s) % c) / (c / g)),
                param: Box::new(move |i| (i / s) % c),
                groups: n * g,
                params: c,
                center: true,
            },
        }
    }

    /// LayerNorm / RMSNorm on (rows, cols).
    pub fn rows(rows: usize, cols: usize, center: bool) -> Spec {
        Spec {
            group: Box::new(move |i| i / cols),
            param: Box::new(move |i| i % cols),
            groups: rows,
            params: cols,
            center,
        }
    }
}

pub struct Fwd {
    pub y: Vec<f64>,
    pub mean: Vec<f64>,
    pub rstd: Vec<f64>,
}

pub fn forward(spec: &Spec, x: &[f64], w: Option<&[f64]>, b: Option<&[f64]>, eps: f64) -> Fwd {
    let mut cnt = vec![0f64; spec.groups];
    let mut sum = vec![0f64; spec.groups];
    for (i, &v) in x.iter().enumerate() {
        cnt[(spec.group)(i)] += 1.0;
        sum[(spec.group)(i)] += v;
    }
    let mean: Vec<f64> = if spec.center {
        sum.iter().zip(&cnt).map(|(s, c)| s / c).collect()
    } else {
        vec![0.0; spec.groups]
    };
    let mut sq = vec![0f64; spec.groups];
    for (i, &v) in x.iter().enumerate() {
        let g = (spec.group)(i);
        sq[g] += (v - mean[g]) * (v - mean[g]);
    }
    let rstd: Vec<f64> = sq
        .iter()
        .zip(&cnt)
        .map(|(s, c)| 1.0 / (s / c + eps).sqrt())
        .collect();
    let y = x
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let (g, p) = ((spec.group)(i), (spec.param)(i));
            (v - mean[g]) * rstd[g] * w.map_or(1.0, |w| w[p]) + b.map_or(0.0, |b| b[p])
        })
        .collect();
    Fwd { y, mean, rstd }
}

pub struct Bwd {
    pub dx: Vec<f64>,
    pub dw: Vec<f64>,
    pub db: Vec<f64>,
}

/// Backward through statistics computed from the input.
pub fn backward(spec: &Spec, x: &[f64], g: &[f64], w: Option<&[f64]>, f: &Fwd) -> Bwd {
    let mut cnt = vec![0f64; spec.groups];
    let mut su = vec![0f64; spec.groups];
    let mut sux = vec![0f64; spec.groups];
    let xhat = |i: usize| (x[i] - f.mean[(spec.group)(i)]) * f.rstd[(spec.group)(i)];
    for i in 0..x.len() {
        let (k, p) = ((spec.group)(i), (spec.param)(i));
        let u = g[i] * w.map_or(1.0, |w| w[p]);
        cnt[k] += 1.0;
        su[k] += u;
        sux[k] += u * xhat(i);
    }
    let mut dw = vec![0f64; spec.params];
    let mut db = vec![0f64; spec.params];
    let dx = (0..x.len())
        .map(|i| {
            let (k, p) = ((spec.group)(i), (spec.param)(i));
            let u = g[i] * w.map_or(1.0, |w| w[p]);
            dw[p] += g[i] * xhat(i);
            db[p] += g[i];
            let r = f.rstd[k];
            if spec.center {
                r * (u - su[k] / cnt[k] - xhat(i) * sux[k] / cnt[k])
            } else {
                r * (u - xhat(i) * sux[k] / cnt[k])
            }
        })
        .collect();
    Bwd { dx, dw, db }
}
