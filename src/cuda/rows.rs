//! Tensor-level CUDA path of LayerNorm and RMSNorm (over `raw`).

use super::{raw, tensor_view, CudaDevice};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::ops::{Gradients, NormOutput, SavedStats};
use crate::tensor::{MemoryFormat, Tensor};

pub(crate) fn layer_norm_fwd<T: Element>(
    dev: &CudaDevice,
    x: &Tensor<T>,
    cols: usize,
    weight: Option<&Tensor<f32>>,
    bias: Option<&Tensor<f32>>,
    eps: f64,
) -> Result<NormOutput<T>> {
    rows_fwd(dev, x, cols, weight, bias, eps, true)
}

pub(crate) fn rms_norm_fwd<T: Element>(
    dev: &CudaDevice,
    x: &Tensor<T>,
    cols: usize,
    weight: Option<&Tensor<f32>>,
    eps: f64,
) -> Result<NormOutput<T>> {
    rows_fwd(dev, x, cols, weight, None, eps, false)
}

fn rows_fwd<T: Element>(
    dev: &CudaDevice,
    x: &Tensor<T>,
    cols: usize,
    weight: Option<&Tensor<f32>>,
    bias: Option<&Tensor<f32>>,
    eps: f64,
    center: bool,
) -> Result<NormOutput<T>> {
    let numel = x.numel();
    let rows = numel.checked_div(cols).unwrap_or(0);
    let mut y = dev.alloc::<T>(numel)?;
    let mut mean = dev.alloc::<f32>(rows)?;
    let mut rstd = dev.alloc::<f32>(rows)?;
    {
        let xv = tensor_view(x)?;
        let wv = weight.map(tensor_view).transpose()?;
        let bv = bias.map(tensor_view).transpose()?;
        let (mut yv, mut mv, mut rv) = (
            y.slice_mut(0..numel),
            mean.slice_mut(0..rows),
            rstd.slice_mut(0..rows),
        );
        if center {
            raw::layer_norm_forward(
                dev,
                &xv,
                &mut yv,
                rows,
                cols,
                wv.as_ref(),
                bv.as_ref(),
                eps as f32,
                &mut mv,
                &mut rv,
            )?;
        } else {
            raw::rms_norm_forward(
                dev,
                &xv,
                &mut yv,
                rows,
                cols,
                wv.as_ref(),
                eps as f32,
                &mut rv,
            )?;
        }
    }
    Ok(NormOutput {
        output: dev.tensor(y, x.shape(), MemoryFormat::Contiguous),
        stats: SavedStats {
            mean: center.then(|| dev.tensor(mean, &[rows], MemoryFormat::Contiguous)),
            rstd: dev.tensor(rstd, &[rows], MemoryFormat::Contiguous),
            from_input: true,
        },
    })
}

pub(crate) fn layer_norm_bwd<T: Element>(
    dev: &CudaDevice,
    dy: &Tensor<T>,
    x: &Tensor<T>,
    cols: usize,
    weight: Option<&Tensor<f32>>,
    has_bias: bool,
    stats: &SavedStats,
) -> Result<Gradients<T>> {
    let mean = stats.mean.as_ref().ok_or_else(|| {
        Error::InvalidArgument("layer_norm backward: the saved statistics carry no mean".into())
    })?;
    let mut g = rows_bwd(dev, dy, x, cols, weight, Some(mean), stats)?;
    if !has_bias {
        g.dbias = None;
    }
    Ok(g)
}

pub(crate) fn rms_norm_bwd<T: Element>(
    dev: &CudaDevice,
    dy: &Tensor<T>,
    x: &Tensor<T>,
    cols: usize,
    weight: Option<&Tensor<f32>>,
    stats: &SavedStats,
) -> Result<Gradients<T>> {
    let mut g = rows_bwd(dev, dy, x, cols, weight, None, stats)?;
    g.dbias = None;
    Ok(g)
}

fn rows_bwd<T: Element>(
    dev: &CudaDevice,
    dy: &Tensor<T>,
    x: &Tensor<T>,
    cols: usize,
    weight: Option<&Tensor<f32>>,
    mean: Option<&Tensor<f32>>,
    stats: &SavedStats,
) -> Result<Gradients<T>> {
    let numel = x.numel();
    let rows = numel.checked_div(cols).unwrap_or(0);
    let mut dx = dev.alloc::<T>(numel)?;
    let mut dw = dev.alloc::<f32>(cols)?;
    let mut db = dev.alloc::<f32>(cols)?;
    {
        let (gv, xv, rv) = (tensor_view(dy)?, tensor_view(x)?, tensor_view(&stats.rstd)?);
        let wv = weight.map(tensor_view).transpose()?;
        let (mut dxv, mut dwv, mut dbv) = (
            dx.slice_mut(0..numel),
            dw.slice_mut(0..cols),
            db.slice_mut(0..cols),
        );
        match mean {
            Some(m) => {
                let mv = tensor_view(m)?;
                raw::layer_norm_backward(
                    dev,
                    &gv,
                    &xv,
                    rows,
                    cols,
                    wv.as_ref(),
                    &mv,
                    &rv,
                    &mut dxv,
                    &mut dwv,
                    &mut dbv,
                )?
            }
            None => raw::rms_norm_backward(
                dev,
                &gv,
                &xv,
                rows,
                cols,
                wv.as_ref(),
                &rv,
                &mut dxv,
                &mut dwv,
                &mut dbv,
            )?,
        }
    }
    // Parameter gradients come back as [cols]; the op front gives them normalized_shape.
    Ok(Gradients {
        dx: dev.tensor(dx, x.shape(), MemoryFormat::Contiguous),
        dweight: weight.map(|_| dev.tensor(dw, &[cols], MemoryFormat::Contiguous)),
        dbias: Some(dev.tensor(db, &[cols], MemoryFormat::Contiguous)),
    })
}
