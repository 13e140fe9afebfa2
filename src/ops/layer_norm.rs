//! `layer_norm` / `layer_norm_backward` (PyTorch's `F.layer_norm`).

use super::rows::{self, check_param, rows_cols};
use super::{
    check_eps, check_grad, check_stats, empty_grads, param_f32, Gradients, NormOp, NormOutput,
    Param, SavedStats,
};
use crate::dtype::Element;
use crate::error::Result;
use crate::tensor::Tensor;

const OP: &str = "layer_norm";

/// Layer normalization over the trailing `normalized_shape` dimensions:
/// `y = (x − mean)/√(var + eps)·weight + bias` per row, with the biased variance. `weight` and
/// `bias` have shape `normalized_shape`. The output is contiguous.
pub fn layer_norm<T: Element>(
    x: &Tensor<T>,
    normalized_shape: &[usize],
    weight: Option<&dyn Param>,
    bias: Option<&dyn Param>,
    eps: f64,
) -> Result<NormOutput<T>> {
    let weight = param_f32(weight)?;
    let weight = weight.as_deref();
    let bias = param_f32(bias)?;
    let bias = bias.as_deref();
    let (_, cols) = rows_cols(x, normalized_shape)?;
    check_eps(OP, eps)?;
    let dev = x.device();
    if let Some(t) = weight {
        check_param(OP, "weight", t, normalized_shape, &dev)?;
    }
    if let Some(t) = bias {
        check_param(OP, "bias", t, normalized_shape, &dev)?;
    }
    let op = NormOp::LayerNorm {
        normalized_dims: normalized_shape.len(),
    };
    rows::forward(x, cols, weight, bias, eps, op)
}

/// Backward of [`layer_norm`]: `dx` (contiguous), `dweight` when `weight` is given and `dbias`
/// when `has_bias`, both of shape `normalized_shape`.
pub fn layer_norm_backward<T: Element>(
    dy: &Tensor<T>,
    x: &Tensor<T>,
    normalized_shape: &[usize],
    weight: Option<&dyn Param>,
    has_bias: bool,
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
    let op = NormOp::LayerNorm {
        normalized_dims: normalized_shape.len(),
    };
    let mean = check_stats(op, stats, nrows, x)?;
    if x.numel() == 0 {
        return empty_grads(x, normalized_shape, weight.is_some(), has_bias);
    }
    rows::backward(
        dy,
        x,
        normalized_shape,
        weight,
        has_bias,
        mean,
        stats.rstd(),
    )
}
