//! `instance_norm` / `instance_norm_backward` (PyTorch's `F.instance_norm`).

use super::planes::{self, PlaneShape};
use super::{
    check_grad, check_stats, check_vec, empty_grads, param_f32, Gradients, NormOp, NormOutput,
    Param, SavedStats,
};
use crate::dtype::Element;
use crate::error::{fmt_shape, Error, Result};
use crate::tensor::Tensor;

const OP: &str = "instance_norm";

fn check_input<T: Element>(x: &Tensor<T>) -> Result<()> {
    if x.rank() < 3 {
        return Err(Error::Shape(format!(
            "{OP}: expected at least 3D input (N, C, *spatial) (got {}D input of size {}); add \
             the batch dimension",
            x.rank(),
            fmt_shape(x.shape())
        )));
    }
    Ok(())
}

/// Instance normalization: each `(n, c)` plane of an `(N, C, *spatial)` input is normalized on
/// its own.
///
/// With `use_input_stats` (training, or no running statistics) the plane's mean and biased
/// variance are used, and running statistics, when given, are updated with the batch average
/// of the per-plane mean and unbiased variance. Otherwise the per-channel running statistics
/// are used and must be given. `weight`/`bias` are per-channel (`[C]`).
#[allow(clippy::too_many_arguments)]
pub fn instance_norm<T: Element>(
    x: &Tensor<T>,
    running_mean: Option<&mut Tensor<f32>>,
    running_var: Option<&mut Tensor<f32>>,
    weight: Option<&dyn Param>,
    bias: Option<&dyn Param>,
    use_input_stats: bool,
    momentum: f64,
    eps: f64,
) -> Result<NormOutput<T>> {
    let weight = param_f32(weight)?;
    let weight = weight.as_deref();
    let bias = param_f32(bias)?;
    let bias = bias.as_deref();
    check_input(x)?;
    let d = PlaneShape::of(x.shape(), x.format())?;
    if use_input_stats && d.s == 1 {
        return Err(Error::Shape(format!(
            "Expected more than 1 spatial element when training, got input size {} \
             (instance norm needs a spatial extent > 1)",
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
        use_input_stats,
        momentum,
        eps,
    )?;
    planes::forward(x, NormOp::InstanceNorm, weight, bias, eps, source)
}

/// Backward of [`instance_norm`]: `dx`, and `dweight`/`dbias` (`[C]`, summed over the batch)
/// when `weight` is given.
pub fn instance_norm_backward<T: Element>(
    dy: &Tensor<T>,
    x: &Tensor<T>,
    weight: Option<&dyn Param>,
    stats: &SavedStats,
) -> Result<Gradients<T>> {
    let weight = param_f32(weight)?;
    let weight = weight.as_deref();
    check_input(x)?;
    check_grad(OP, dy, x)?;
    let d = PlaneShape::of(x.shape(), x.format())?;
    if let Some(t) = weight {
        check_vec(OP, "weight", t, d.c, &x.device())?;
    }
    let groups = if stats.from_input() { d.n * d.c } else { d.c };
    check_stats(NormOp::InstanceNorm, stats, groups, x)?;
    if x.numel() == 0 {
        return empty_grads(x, &[d.c], weight.is_some(), weight.is_some());
    }
    planes::backward(dy, x, weight, weight.is_some(), stats)
}
