//! `rms_norm` / `rms_norm_backward` (PyTorch's `F.rms_norm`).

use super::layer_norm::{check_param, contiguous, rows_cols};
use super::{check_eps, check_grad, check_stats, f32_tensor, Gradients, NormOutput, SavedStats};
use crate::device::Device;
use crate::dtype::Element;
use crate::error::Result;
use crate::ops::cpu;
use crate::tensor::{MemoryFormat, Storage, Tensor};

const OP: &str = "rms_norm";

/// The eps RMSNorm uses when none is given: `f32::EPSILON` (PyTorch's
/// `torch.finfo(torch.float32).eps`) for every input dtype, f16/bf16 included, since they are
/// computed in f32.
pub const RMS_NORM_DEFAULT_EPS: f64 = f32::EPSILON as f64;

/// RMS normalization over the trailing `normalized_shape` dimensions:
/// `y = x·rsqrt(mean(x²) + eps)·weight`. `eps = None` means [`RMS_NORM_DEFAULT_EPS`].
/// The output is contiguous; the saved statistics hold `rstd` per row and no mean.
pub fn rms_norm<T: Element>(
    x: &Tensor<T>,
    normalized_shape: &[usize],
    weight: Option<&Tensor<f32>>,
    eps: Option<f64>,
) -> Result<NormOutput<T>> {
    let (_, cols) = rows_cols(x, normalized_shape)?;
    let eps = eps.unwrap_or(RMS_NORM_DEFAULT_EPS);
    check_eps(OP, eps)?;
    let dev = x.device();
    if let Some(t) = weight {
        check_param(OP, "weight", t, normalized_shape, &dev)?;
    }
    let x = contiguous(x)?;
    if let Device::Cuda(d) = &dev {
        return crate::cuda::rows::rms_norm_fwd(d, &x, cols, weight, eps);
    }
    let xs = x.cpu_slice()?;
    let w = weight.map(|t| t.cpu_slice()).transpose()?;
    let (y, rstd) = cpu::rms_norm_fwd(xs, cols, w, eps);
    Ok(NormOutput {
        output: Tensor::from_parts(
            x.shape().to_vec(),
            MemoryFormat::Contiguous,
            Storage::Cpu(y),
        ),
        stats: SavedStats {
            mean: None,
            rstd: f32_tensor(rstd, &dev)?,
            from_input: true,
        },
    })
}

/// Backward of [`rms_norm`]: `dx` (contiguous) and `dweight` (shape `normalized_shape`) when
/// `weight` is given. `dbias` is always `None`.
pub fn rms_norm_backward<T: Element>(
    dy: &Tensor<T>,
    x: &Tensor<T>,
    normalized_shape: &[usize],
    weight: Option<&Tensor<f32>>,
    stats: &SavedStats,
) -> Result<Gradients<T>> {
    let (rows, cols) = rows_cols(x, normalized_shape)?;
    check_grad(OP, dy, x)?;
    let dev = x.device();
    if let Some(t) = weight {
        check_param(OP, "weight", t, normalized_shape, &dev)?;
    }
    check_stats(OP, stats, rows, &dev)?;
    let (x, dy) = (contiguous(x)?, contiguous(dy)?);
    if let Device::Cuda(d) = &dev {
        let g = crate::cuda::rows::rms_norm_bwd(d, &dy, &x, cols, weight, stats)?;
        return super::shape_param_grads(g, normalized_shape);
    }
    let (gs, xs) = (dy.cpu_slice()?, x.cpu_slice()?);
    let w = weight.map(|t| t.cpu_slice()).transpose()?;
    let (dx, dw, _) = cpu::norm_rows_backward(gs, xs, cols, None, stats.rstd.cpu_slice()?, w);
    Ok(Gradients {
        dx: Tensor::from_parts(
            x.shape().to_vec(),
            MemoryFormat::Contiguous,
            Storage::Cpu(dx),
        ),
        dweight: match weight {
            Some(_) => Some(Tensor::from_vec(
                dw.into_iter().map(|v| v as f32).collect(),
                normalized_shape,
            )?),
            None => None,
        },
        dbias: None,
    })
}
