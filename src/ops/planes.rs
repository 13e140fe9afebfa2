//! Shared front half of BatchNorm, InstanceNorm and GroupNorm: the ops that normalize an
//! `(N, C, *spatial)` input per statistic group and apply a per-channel affine.

// Loops run over (n, c) and index several per-plane arrays at once.
#![allow(clippy::needless_range_loop)]

use super::cpu::{self, Grouping, Planes};
use super::{f32_tensor, Gradients, NormOutput, SavedStats};
use crate::device::Device;
use crate::dtype::Element;
use crate::error::Result;
use crate::tensor::{MemoryFormat, Ncs, Storage, Tensor};

/// Running statistics to update from this batch: `r = (1 − factor)·r + factor·stat`.
pub(crate) struct Running<'a> {
    pub mean: &'a mut Tensor<f32>,
    pub var: &'a mut Tensor<f32>,
    pub factor: f64,
}

/// Where the normalization statistics come from.
pub(crate) enum Source<'a> {
    /// From the input itself (training mode); BatchNorm and InstanceNorm may update running
    /// statistics. InstanceNorm's per-plane statistics are averaged over the batch.
    Input { running: Option<Running<'a>> },
    /// Fixed per-channel mean and variance (BatchNorm/InstanceNorm in eval mode).
    Fixed {
        mean: &'a Tensor<f32>,
        var: &'a Tensor<f32>,
    },
}

pub(crate) fn planes_of<T: Element>(x: &Tensor<T>) -> Planes {
    let d = Ncs::of(x.shape());
    Planes {
        n: d.n,
        c: d.c,
        s: d.s,
        format: x.format(),
    }
}

fn param_f64(t: Option<&Tensor<f32>>, c: usize, default: f64) -> Result<Vec<f64>> {
    Ok(match t {
        Some(t) => t.cpu_slice()?.iter().map(|&v| v as f64).collect(),
        None => vec![default; c],
    })
}

/// Number of elements in one statistic group.
fn group_count(p: &Planes, grouping: Grouping) -> f64 {
    match grouping {
        Grouping::Channel => (p.n * p.s) as f64,
        Grouping::Groups(g) => ((p.c / g) * p.s) as f64,
    }
}

/// Normalizes `x`. Shapes were checked by the caller.
pub(crate) fn forward<T: Element>(
    x: &Tensor<T>,
    grouping: Grouping,
    weight: Option<&Tensor<f32>>,
    bias: Option<&Tensor<f32>>,
    eps: f64,
    mut source: Source<'_>,
) -> Result<NormOutput<T>> {
    let device = x.device();
    if let Device::Cuda(dev) = &device {
        return crate::cuda::planes::forward(dev, x, grouping, weight, bias, eps, source);
    }
    let p = planes_of(x);
    let xs = x.cpu_slice()?;
    let w = param_f64(weight, p.c, 1.0)?;
    let b = param_f64(bias, p.c, 0.0)?;
    let planes = p.n * p.c;
    let mut coef_a = vec![0f64; planes];
    let mut coef_m = vec![0f64; planes];
    let mut coef_b = vec![0f64; planes];

    if let (Source::Input { running }, Grouping::Groups(g), MemoryFormat::Contiguous) =
        (&mut source, grouping, p.format)
    {
        // Each group is one contiguous run: statistics and output in one pass over memory.
        let (y, gm) = cpu::groups_fused(xs, p, g, &w, &b, eps);
        if let Some(r) = running.take() {
            if !xs.is_empty() {
                update_running(r, &gm, &p, grouping)?;
            }
        }
        let stats = saved_from_moments(&gm, eps, &device)?;
        return Ok(NormOutput {
            output: Tensor::from_parts(x.shape().to_vec(), x.format(), Storage::Cpu(y)),
            stats,
        });
    }
    let stats = match source {
        Source::Input { running } => {
            let pm = cpu::plane_moments(xs, p);
            let gm = cpu::group_moments(&pm, p, grouping);
            let mean: Vec<f64> = gm.iter().map(|m| m.mean).collect();
            let rstd: Vec<f64> = gm
                .iter()
                .map(|m| 1.0 / (m.var_biased() + eps).sqrt())
                .collect();
            for n in 0..p.n {
                for c in 0..p.c {
                    let (i, g) = (n * p.c + c, grouping.group_of(&p, n, c));
                    coef_a[i] = rstd[g] * w[c];
                    coef_m[i] = mean[g];
                    coef_b[i] = b[c];
                }
            }
            if let Some(r) = running {
                if !xs.is_empty() {
                    update_running(r, &gm, &p, grouping)?;
                }
            }
            saved_from_moments(&gm, eps, &device)?
        }
        Source::Fixed { mean, var } => {
            let rm = mean.cpu_slice()?;
            let rv = var.cpu_slice()?;
            let rstd: Vec<f64> = rv.iter().map(|&v| 1.0 / (v as f64 + eps).sqrt()).collect();
            for n in 0..p.n {
                for c in 0..p.c {
                    let i = n * p.c + c;
                    coef_a[i] = rstd[c] * w[c];
                    coef_m[i] = rm[c] as f64;
                    coef_b[i] = b[c];
                }
            }
            SavedStats {
                mean: Some(mean.clone()),
                rstd: f32_tensor(rstd.iter().map(|&v| v as f32).collect(), &device)?,
                from_input: false,
            }
        }
    };
    let y = cpu::plane_affine(xs, p, &coef_a, &coef_m, &coef_b);
    Ok(NormOutput {
        output: Tensor::from_parts(x.shape().to_vec(), x.format(), Storage::Cpu(y)),
        stats,
    })
}

fn saved_from_moments(gm: &[cpu::Moments], eps: f64, device: &Device) -> Result<SavedStats> {
    Ok(SavedStats {
        mean: Some(f32_tensor(
            gm.iter().map(|m| m.mean as f32).collect(),
            device,
        )?),
        rstd: f32_tensor(
            gm.iter()
                .map(|m| (1.0 / (m.var_biased() + eps).sqrt()) as f32)
                .collect(),
            device,
        )?,
        from_input: true,
    })
}

fn update_running(
    r: Running<'_>,
    gm: &[cpu::Moments],
    p: &Planes,
    grouping: Grouping,
) -> Result<()> {
    // BatchNorm: one group per channel. InstanceNorm: groups are planes, averaged over n.
    let (mean, var): (Vec<f64>, Vec<f64>) = match grouping {
        Grouping::Channel => gm.iter().map(|m| (m.mean, m.var_unbiased())).unzip(),
        Grouping::Groups(_) => (0..p.c)
            .map(|c| {
                let (mut sm, mut sv) = (0.0, 0.0);
                for n in 0..p.n {
                    sm += gm[n * p.c + c].mean;
                    sv += gm[n * p.c + c].var_unbiased();
                }
                (sm / p.n as f64, sv / p.n as f64)
            })
            .unzip(),
    };
    let f = r.factor;
    for (dst, src) in [(r.mean, mean), (r.var, var)] {
        for (d, s) in dst.cpu_slice_mut()?.iter_mut().zip(src) {
            *d = ((1.0 - f) * *d as f64 + f * s) as f32;
        }
    }
    Ok(())
}

/// Backward of [`forward`]: `dx`, and per-channel `dweight`/`dbias` when `affine`.
pub(crate) fn backward<T: Element>(
    dy: &Tensor<T>,
    x: &Tensor<T>,
    grouping: Grouping,
    weight: Option<&Tensor<f32>>,
    affine: bool,
    stats: &SavedStats,
) -> Result<Gradients<T>> {
    let device = x.device();
    if let Device::Cuda(dev) = &device {
        return crate::cuda::planes::backward(dev, dy, x, grouping, weight, affine, stats);
    }
    let p = planes_of(x);
    let (gs, xs) = (dy.cpu_slice()?, x.cpu_slice()?);
    let w = param_f64(weight, p.c, 1.0)?;
    let mean = match &stats.mean {
        Some(m) => m.cpu_slice()?,
        None => &[][..],
    };
    let rstd = stats.rstd.cpu_slice()?;
    let planes = p.n * p.c;
    // Statistic index of each plane: its group for batch statistics, its channel for fixed ones.
    let gidx = |n: usize, c: usize| {
        if stats.from_input {
            grouping.group_of(&p, n, c)
        } else {
            c
        }
    };
    let mut m = vec![0f64; planes];
    let mut r = vec![0f64; planes];
    for n in 0..p.n {
        for c in 0..p.c {
            let g = gidx(n, c);
            m[n * p.c + c] = mean[g] as f64;
            r[n * p.c + c] = rstd[g] as f64;
        }
    }
    let (sg, sgx) = cpu::plane_grad_sums(gs, xs, p, &m);

    let mut a = vec![0f64; planes];
    let mut b = vec![0f64; planes];
    let mut k = vec![0f64; planes];
    if stats.from_input {
        let groups = grouping.num_groups(&p);
        let mut ga = vec![0f64; groups];
        let mut gb = vec![0f64; groups];
        for n in 0..p.n {
            for c in 0..p.c {
                let (i, g) = (n * p.c + c, grouping.group_of(&p, n, c));
                ga[g] += w[c] * sg[i];
                gb[g] += w[c] * sgx[i];
            }
        }
        let cnt = group_count(&p, grouping);
        for n in 0..p.n {
            for c in 0..p.c {
                let (i, g) = (n * p.c + c, grouping.group_of(&p, n, c));
                a[i] = r[i] * w[c];
                b[i] = -r[i] * r[i] * r[i] * gb[g] / cnt;
                k[i] = -r[i] * ga[g] / cnt;
            }
        }
    } else {
        for n in 0..p.n {
            for c in 0..p.c {
                let i = n * p.c + c;
                a[i] = r[i] * w[c];
            }
        }
    }
    let dx = cpu::plane_grad_apply(gs, xs, p, [&a, &b, &m, &k]);

    let (dweight, dbias) = if affine {
        let mut dw = vec![0f64; p.c];
        let mut db = vec![0f64; p.c];
        for n in 0..p.n {
            for c in 0..p.c {
                let i = n * p.c + c;
                dw[c] += r[i] * sgx[i];
                db[c] += sg[i];
            }
        }
        (
            Some(f32_tensor(dw.iter().map(|&v| v as f32).collect(), &device)?),
            Some(f32_tensor(db.iter().map(|&v| v as f32).collect(), &device)?),
        )
    } else {
        (None, None)
    };
    Ok(Gradients {
        dx: Tensor::from_parts(x.shape().to_vec(), x.format(), Storage::Cpu(dx)),
        dweight,
        dbias,
    })
}
