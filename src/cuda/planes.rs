//! Tensor-level CUDA path of BatchNorm, InstanceNorm and GroupNorm (over `raw`).

use super::raw::{self, Groups, PlaneShape, Stats};
use super::{tensor_view, CudaDevice};
use crate::dtype::Element;
use crate::error::Result;
use crate::ops::cpu::Grouping;
use crate::ops::planes::{planes_of, Source};
use crate::ops::{Gradients, NormOutput, SavedStats};
use crate::tensor::{MemoryFormat, Tensor};

fn shape_of<T: Element>(x: &Tensor<T>) -> PlaneShape {
    let p = planes_of(x);
    PlaneShape {
        n: p.n,
        c: p.c,
        s: p.s,
        channels_last: p.format == MemoryFormat::ChannelsLast,
    }
}

fn groups_of(g: Grouping) -> Groups {
    match g {
        Grouping::Channel => Groups::PerChannel,
        Grouping::Groups(n) => Groups::PerSample(n),
    }
}

pub(crate) fn forward<T: Element>(
    dev: &CudaDevice,
    x: &Tensor<T>,
    grouping: Grouping,
    weight: Option<&Tensor<f32>>,
    bias: Option<&Tensor<f32>>,
    eps: f64,
    source: Source<'_>,
) -> Result<NormOutput<T>> {
    let s = shape_of(x);
    let numel = x.numel();
    let groups = groups_of(grouping);
    let from_input = matches!(source, Source::Input { .. });
    let ng = match (&source, groups) {
        (Source::Input { .. }, Groups::PerChannel) | (Source::Fixed { .. }, _) => s.c,
        (Source::Input { .. }, Groups::PerSample(g)) => s.n * g,
    };
    let mut y = dev.alloc::<T>(numel)?;
    let mut mean = dev.alloc::<f32>(ng)?;
    let mut rstd = dev.alloc::<f32>(ng)?;
    let xv = tensor_view(x)?;
    let wv = weight.map(tensor_view).transpose()?;
    let bv = bias.map(tensor_view).transpose()?;
    {
        let (mut yv, mut mv, mut rv) = (
            y.slice_mut(0..numel),
            mean.slice_mut(0..ng),
            rstd.slice_mut(0..ng),
        );
        // Views bound here so they outlive the `Stats` that borrows them.
        let (mut rm_v, mut rv_v, fixed);
        let stats = match source {
            Source::Input { running: Some(r) } => {
                rm_v = r.mean.cuda_slice_mut()?.slice_mut(0..s.c);
                rv_v = r.var.cuda_slice_mut()?.slice_mut(0..s.c);
                let per_sample = matches!(grouping, Grouping::Groups(_));
                Stats::Input {
                    running: Some((&mut rm_v, &mut rv_v, r.factor as f32, per_sample)),
                }
            }
            Source::Input { running: None } => Stats::Input { running: None },
            Source::Fixed { mean: rm, var } => {
                fixed = (tensor_view(rm)?, tensor_view(var)?);
                Stats::Fixed {
                    mean: &fixed.0,
                    var: &fixed.1,
                }
            }
        };
        raw::planes_forward(
            dev,
            &xv,
            &mut yv,
            s,
            groups,
            wv.as_ref(),
            bv.as_ref(),
            eps as f32,
            stats,
            &mut mv,
            &mut rv,
        )?;
    }
    Ok(NormOutput {
        output: dev.tensor(y, x.shape(), x.format()),
        stats: SavedStats {
            mean: Some(dev.tensor(mean, &[ng], MemoryFormat::Contiguous)),
            rstd: dev.tensor(rstd, &[ng], MemoryFormat::Contiguous),
            from_input,
        },
    })
}

pub(crate) fn backward<T: Element>(
    dev: &CudaDevice,
    dy: &Tensor<T>,
    x: &Tensor<T>,
    grouping: Grouping,
    weight: Option<&Tensor<f32>>,
    affine: bool,
    stats: &SavedStats,
) -> Result<Gradients<T>> {
    let s = shape_of(x);
    let numel = x.numel();
    let mut dx = dev.alloc::<T>(numel)?;
    let mut dw = dev.alloc::<f32>(s.c)?;
    let mut db = dev.alloc::<f32>(s.c)?;
    let mean = stats.mean.as_ref().ok_or_else(|| {
        crate::Error::InvalidArgument("backward: the saved statistics carry no mean".into())
    })?;
    {
        let (xv, gv) = (tensor_view(x)?, tensor_view(dy)?);
        let (mv, rv) = (tensor_view(mean)?, tensor_view(&stats.rstd)?);
        let wv = weight.map(tensor_view).transpose()?;
        let (mut dxv, mut dwv, mut dbv) = (
            dx.slice_mut(0..numel),
            dw.slice_mut(0..s.c),
            db.slice_mut(0..s.c),
        );
        raw::planes_backward(
            dev,
            &gv,
            &xv,
            s,
            groups_of(grouping),
            wv.as_ref(),
            &mv,
            &rv,
            stats.from_input,
            &mut dxv,
            &mut dwv,
            &mut dbv,
        )?;
    }
    let param = |v| dev.tensor(v, &[s.c], MemoryFormat::Contiguous);
    Ok(Gradients {
        dx: dev.tensor(dx, x.shape(), x.format()),
        dweight: affine.then(|| param(dw)),
        dbias: affine.then(|| param(db)),
    })
}
