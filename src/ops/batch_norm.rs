//! `batch_norm` / `batch_norm_backward` (PyTorch's `F.batch_norm`).

use super::planes;
use super::{
    check_grad, check_stats, check_vec, empty_grads, param_f32, Gradients, NormOp, NormOutput,
    Param, SavedStats,
};
use crate::dtype::Element;
use crate::error::{fmt_shape, Error, Result};
use crate::tensor::Tensor;

const OP: &str = "batch_norm";

fn check_input<T: Element>(x: &Tensor<T>) -> Result<()> {
    if x.rank() < 2 {
        return Err(Error::Shape(format!(
            "{OP}: expected at least 2D input (N, C, *) (got {}D input of size {})",
            x.rank(),
            fmt_shape(x.shape())
        )));
    }
    Ok(())
}

/// Batch normalization over every axis but 1 (the channels) of an `(N, C, *)` input.
///
/// - `training = true`: normalizes with the batch mean and biased variance; when running
///   statistics are given they are updated in place with `r = (1 − momentum)·r + momentum·s`
///   (the variance with the unbiased estimate). Needs more than one value per channel.
/// - `training = false`: normalizes with `running_mean` / `running_var`, which must be given.
///
/// `weight` and `bias` are per-channel (`[C]`, f32). Returns the output (same shape and memory
/// format) and the statistics used, for [`batch_norm_backward`].
#[allow(clippy::too_many_arguments)]
pub fn batch_norm<T: Element>(
    x: &Tensor<T>,
    running_mean: Option<&mut Tensor<f32>>,
    running_var: Option<&mut Tensor<f32>>,
    weight: Option<&dyn Param>,
    bias: Option<&dyn Param>,
    training: bool,
    momentum: f64,
    eps: f64,
) -> Result<NormOutput<T>> {
    let weight = param_f32(weight)?;
    let weight = weight.as_deref();
    let bias = param_f32(bias)?;
    let bias = bias.as_deref();
    check_input(x)?;
    if training && x.numel() / x.shape()[1].max(1) == 1 {
        return Err(Error::Shape(format!(
            "Expected more than 1 value per channel when training, got input size {} \
             (use a batch with more than one value per channel, or evaluation mode)",
            fmt_shape(x.shape())
        )));
    }
    let source = planes::running_source(
        OP,
        x,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
    )?;
    planes::forward(x, NormOp::BatchNorm, weight, bias, eps, source)
}

/// Backward of [`batch_norm`]: `dx`, and `dweight`/`dbias` (`[C]`) when `weight` is given.
/// Differentiates through the batch statistics when `stats.from_input()` (training), else treats
/// the running statistics as constants (eval).
pub fn batch_norm_backward<T: Element>(
    dy: &Tensor<T>,
    x: &Tensor<T>,
    weight: Option<&dyn Param>,
    stats: &SavedStats,
) -> Result<Gradients<T>> {
    let weight = param_f32(weight)?;
    let weight = weight.as_deref();
    check_input(x)?;
    check_grad(OP, dy, x)?;
    let c = x.shape()[1];
    if let Some(t) = weight {
        check_vec(OP, "weight", t, c, &x.device())?;
    }
    check_stats(NormOp::BatchNorm, stats, c, x)?;
    if x.numel() == 0 {
        return empty_grads(x, &[c], weight.is_some(), weight.is_some());
    }
    planes::backward(dy, x, weight, weight.is_some(), stats)
}
