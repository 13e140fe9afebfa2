//! The rows family: LayerNorm and RMSNorm, the ops that normalize contiguous rows over the
//! trailing `normalized_shape` dimensions with an elementwise affine.
//!
//! - `mod.rs` (here): the checks both fronts share, and the one dispatch to an engine;
//! - `cpu.rs`: the CPU engine;
//! - `cuda.rs`: the CUDA launches (`kernels/rows.cu`).

pub(crate) mod cpu;
pub(crate) mod cuda;

use super::{check_same_device, f32_tensor, Gradients, NormOp, NormOutput, SavedStats};
use crate::device::Device;
use crate::dtype::Element;
use crate::error::{fmt_shape, Error, Result};
use crate::tensor::{MemoryFormat, Storage, Tensor};

/// `(rows, cols)` of an input normalized over its trailing `normalized_shape`.
pub(crate) fn rows_cols<T: Element>(
    x: &Tensor<T>,
    normalized_shape: &[usize],
) -> Result<(usize, usize)> {
    let k = normalized_shape.len();
    if k == 0 {
        return Err(Error::InvalidArgument(
            "Expected normalized_shape to be at least 1-dimensional, i.e., containing at least \
             one element, but got normalized_shape = []; pass the trailing sizes to normalize over"
                .into(),
        ));
    }
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

/// Normalizes the rows of `x` (checked by the front): `op` is LayerNorm or RMSNorm (no mean, no
/// bias).
pub(crate) fn forward<T: Element>(
    x: &Tensor<T>,
    cols: usize,
    weight: Option<&Tensor<f32>>,
    bias: Option<&Tensor<f32>>,
    eps: f64,
    op: NormOp,
) -> Result<NormOutput<T>> {
    let center = op.welford_mean();
    if x.numel() == 0 {
        // Contiguous like every rows output (an empty tensor has no data to move).
        let x = contiguous(x)?.into_owned();
        return super::empty_output(&x, op, true);
    }
    let x = contiguous(x)?;
    let dev = x.device();
    if let Device::Cuda(d) = &dev {
        return cuda::forward(d, &x, cols, weight, bias, eps, op);
    }
    let xs = x.cpu_slice()?;
    let w = weight.map(|t| t.cpu_slice()).transpose()?;
    let (y, mean, rstd) = if center {
        let b = bias.map(|t| t.cpu_slice()).transpose()?;
        let (y, mut mean, rstd) = cpu::layer_norm_fwd(xs, cols, w, b, eps);
        super::nan_for_infinite(&mut mean);
        (y, Some(mean), rstd)
    } else {
        let (y, rstd) = cpu::rms_norm_fwd(xs, cols, w, eps);
        (y, None, rstd)
    };
    Ok(NormOutput {
        output: Tensor::from_parts(
            x.shape().to_vec(),
            MemoryFormat::Contiguous,
            Storage::Cpu(y.into()),
        ),
        stats: SavedStats::new(
            op,
            x.shape(),
            mean.map(|m| f32_tensor(m, &dev)).transpose()?,
            f32_tensor(rstd, &dev)?,
            true,
        ),
    })
}

/// Backward of [`forward`] (arguments checked by the front; `mean` is `None` for RMSNorm):
/// `dx`, `dweight` when `weight` is given and `dbias` when `has_bias`, the parameter gradients
/// of shape `normalized_shape`.
pub(crate) fn backward<T: Element>(
    dy: &Tensor<T>,
    x: &Tensor<T>,
    normalized_shape: &[usize],
    weight: Option<&Tensor<f32>>,
    has_bias: bool,
    mean: Option<&Tensor<f32>>,
    rstd: &Tensor<f32>,
) -> Result<Gradients<T>> {
    let cols: usize = normalized_shape.iter().product();
    let (x, dy) = (contiguous(x)?, contiguous(dy)?);
    let g = if let Device::Cuda(d) = &x.device() {
        cuda::backward(d, &dy, &x, cols, weight, mean, rstd)?
    } else {
        let (gs, xs) = (dy.cpu_slice()?, x.cpu_slice()?);
        let w = weight.map(|t| t.cpu_slice()).transpose()?;
        let m = mean.map(|m| m.cpu_slice()).transpose()?;
        let want = weight.is_some() || has_bias;
        let (dx, dw, db) = cpu::norm_rows_backward(gs, xs, cols, m, rstd.cpu_slice()?, w, want);
        let param =
            |v: Vec<f64>| f32_tensor(v.into_iter().map(|v| v as f32).collect(), &Device::Cpu);
        Gradients {
            dx: Tensor::from_parts(
                x.shape().to_vec(),
                MemoryFormat::Contiguous,
                Storage::Cpu(dx.into()),
            ),
            dweight: Some(param(dw)?),
            dbias: Some(param(db)?),
        }
    };
    let shaped = |p: Option<Tensor<f32>>, keep: bool| match p {
        Some(p) if keep => p.reshape(normalized_shape).map(Some),
        _ => Ok(None),
    };
    Ok(Gradients {
        dx: g.dx,
        dweight: shaped(g.dweight, weight.is_some())?,
        dbias: shaped(g.dbias, has_bias)?,
    })
}
