//! `rms_norm` / `rms_norm_backward` (PyTorch's `F.rms_norm`).

use super::rows::{self, check_param, rows_cols};
use super::{
    check_eps, check_grad, check_stats, empty_grads, param_f32, Gradients, NormOp, NormOutput,
    Param, SavedStats,
};
use crate::dtype::Element;
use crate::error::Result;
use crate::tensor::Tensor;

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
    weight: Option<&dyn Param>,
    eps: Option<f64>,
) -> Result<NormOutput<T>> {
    let weight = param_f32(weight)?;
    let weight = weight.as_deref();
    let (_, cols) = rows_cols(x, normalized_shape)?;
    let eps = eps.unwrap_or(RMS_NORM_DEFAULT_EPS);
    check_eps(OP, eps)?;
    let dev = x.device();
    if let Some(t) = weight {
        check_param(OP, "weight", t, normalized_shape, &dev)?;
    }
    let op = NormOp::RmsNorm {
        normalized_dims: normalized_shape.len(),
    };
    rows::forward(x, cols, weight, None, eps, op)
}

/// Backward of [`rms_norm`]: `dx` (contiguous) and `dweight` (shape `normalized_shape`) when
/// `weight` is given. `dbias` is always `None`.
pub fn rms_norm_backward<T: Element>(
    dy: &Tensor<T>,
    x: &Tensor<T>,
    normalized_shape: &[usize],
    weight: Option<&dyn Param>,
    stats: &SavedStats,
) -> Result<Gradients<T>> {
    let weight = param_f32(weight)?;
    let weight = weight.as_deref();
    let (nrows, _) = rows_cols(x, normalized_shape)?;
    check_grad(OP, dy, x)?;
    let dev = x.device();
    if let Some(t) = weight {
        check_param(OP, "weight", t, normalized_shape, &dev)?;
    }
    let op = NormOp::RmsNorm {
        normalized_dims: normalized_shape.len(),
    };
    check_stats(op, stats, nrows, x)?;
    if x.numel() == 0 {
        return empty_grads(x, normalized_shape, weight.is_some(), false);
    }
    rows::backward(dy, x, normalized_shape, weight, false, None, stats.rstd())
}
