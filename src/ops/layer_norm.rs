//! `layer_norm` / `layer_norm_backward` (PyTorch's `F.layer_norm`).

use super::{
    check_eps, check_grad, check_same_device, check_stats, f32_tensor, Gradients, NormOutput,
    SavedStats,
};
use crate::device::Device;
use crate::dtype::Element;
use crate::error::{fmt_shape, Error, Result};
use crate::ops::cpu;
use crate::tensor::{MemoryFormat, Storage, Tensor};

const OP: &str = "layer_norm";

/// `(rows, cols)` of an input normalized over its trailing `normalized_shape`.
pub(crate) fn rows_cols<T: Element>(
    x: &Tensor<T>,
    normalized_shape: &[usize],
) -> Result<(usize, usize)> {
    let k = normalized_shape.len();
    let shape = x.shape();
    if shape.len() < k || shape[shape.len() - k..] != *normalized_shape {
        let star: Vec<String> = normalized_shape.iter().map(|v| v.to_string()).collect();
        return Err(Error::Shape(format!(
            "Given normalized_shape={}, expected input with shape [*, {}], but got input of size{}",
            fmt_shape(normalized_shape),
            star.join(", "),
            fmt_shape(shape)
        )));
    }
    let cols: usize = normalized_shape.iter().product();
    let rows: usize = shape[..shape.len() - k].iter().product();
    Ok((rows, cols))
}

/// Checks an elementwise parameter of shape `normalized_shape`.
pub(crate) fn check_param(
    op: &str,
    name: &str,
    t: &Tensor<f32>,
    normalized_shape: &[usize],
    x: &Device,
) -> Result<()> {
    if t.shape() != normalized_shape {
        return Err(Error::Shape(format!(
            "{op}: expected {name} of size {} (normalized_shape), but got {name} of size {}",
            fmt_shape(normalized_shape),
            fmt_shape(t.shape())
        )));
    }
    check_same_device(op, name, &t.device(), x)
}

/// Contiguous view of the input: LayerNorm and RMSNorm normalize trailing dimensions, so a
/// channels-last input is copied to contiguous (as PyTorch does); the output is contiguous.
pub(crate) fn contiguous<T: Element>(x: &Tensor<T>) -> Result<std::borrow::Cow<'_, Tensor<T>>> {
    Ok(match x.format() {
        MemoryFormat::Contiguous => std::borrow::Cow::Borrowed(x),
        MemoryFormat::ChannelsLast => {
            std::borrow::Cow::Owned(x.to_format(MemoryFormat::Contiguous)?)
        }
    })
}

/// Layer normalization over the trailing `normalized_shape` dimensions:
/// `y = (x − mean)/√(var + eps)·weight + bias` per row, with the biased variance. `weight` and
/// `bias` have shape `normalized_shape`. The output is contiguous.
pub fn layer_norm<T: Element>(
    x: &Tensor<T>,
    normalized_shape: &[usize],
    weight: Option<&Tensor<f32>>,
    bias: Option<&Tensor<f32>>,
    eps: f64,
) -> Result<NormOutput<T>> {
    let (_, cols) = rows_cols(x, normalized_shape)?;
    check_eps(OP, eps)?;
    let dev = x.device();
    if let Some(t) = weight {
        check_param(OP, "weight", t, normalized_shape, &dev)?;
    }
    if let Some(t) = bias {
        check_param(OP, "bias", t, normalized_shape, &dev)?;
    }
    let x = contiguous(x)?;
    if let Device::Cuda(d) = &dev {
        return crate::cuda::rows::layer_norm_fwd(d, &x, cols, weight, bias, eps);
    }
    let xs = x.cpu_slice()?;
    let (w, b) = (
        weight.map(|t| t.cpu_slice()).transpose()?,
        bias.map(|t| t.cpu_slice()).transpose()?,
    );
    let (y, mean, rstd) = cpu::layer_norm_fwd(xs, cols, w, b, eps);
    Ok(NormOutput {
        output: Tensor::from_parts(
            x.shape().to_vec(),
            MemoryFormat::Contiguous,
            Storage::Cpu(y),
        ),
        stats: SavedStats {
            mean: Some(f32_tensor(mean, &dev)?),
            rstd: f32_tensor(rstd, &dev)?,
            from_input: true,
        },
    })
}

/// Backward of [`layer_norm`]: `dx` (contiguous), `dweight` when `weight` is given and `dbias`
/// when `has_bias`, both of shape `normalized_shape`.
pub fn layer_norm_backward<T: Element>(
    dy: &Tensor<T>,
    x: &Tensor<T>,
    normalized_shape: &[usize],
    weight: Option<&Tensor<f32>>,
    has_bias: bool,
    stats: &SavedStats,
) -> Result<Gradients<T>> {
    let (rows, cols) = rows_cols(x, normalized_shape)?;
    check_grad(OP, dy, x)?;
    let dev = x.device();
    if let Some(t) = weight {
        check_param(OP, "weight", t, normalized_shape, &dev)?;
    }
    check_stats(OP, stats, rows, &dev)?;
    let Some(mean) = &stats.mean else {
        return Err(Error::InvalidArgument(format!(
            "{OP} backward: the saved statistics carry no mean; pass the stats returned by layer_norm"
        )));
    };
    let (x, dy) = (contiguous(x)?, contiguous(dy)?);
    if let Device::Cuda(d) = &dev {
        let g = crate::cuda::rows::layer_norm_bwd(d, &dy, &x, cols, weight, has_bias, stats)?;
        return super::shape_param_grads(g, normalized_shape);
    }
    let (gs, xs) = (dy.cpu_slice()?, x.cpu_slice()?);
    let w = weight.map(|t| t.cpu_slice()).transpose()?;
    let (dx, dw, db) = cpu::norm_rows_backward(
        gs,
        xs,
        cols,
        Some(mean.cpu_slice()?),
        stats.rstd.cpu_slice()?,
        w,
    );
    let to_param = |v: Vec<f64>| -> Result<Tensor<f32>> {
        Tensor::from_vec(v.into_iter().map(|v| v as f32).collect(), normalized_shape)
    };
    Ok(Gradients {
        dx: Tensor::from_parts(
            x.shape().to_vec(),
            MemoryFormat::Contiguous,
            Storage::Cpu(dx),
        ),
        dweight: if weight.is_some() {
            Some(to_param(dw)?)
        } else {
            None
        },
        dbias: if has_bias { Some(to_param(db)?) } else { None },
    })
}
