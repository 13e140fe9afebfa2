//! `group_norm` / `group_norm_backward` (PyTorch's `F.group_norm`).

use super::planes::{self, PlaneShape, Source};
use super::{
    check_eps, check_grad, check_stats, check_vec, empty_grads, param_f32, Gradients, NormOp,
    NormOutput, Param, SavedStats,
};
use crate::dtype::Element;
use crate::error::{fmt_shape, Error, Result};
use crate::tensor::Tensor;

const OP: &str = "group_norm";

fn check_input<T: Element>(x: &Tensor<T>, num_groups: usize) -> Result<PlaneShape> {
    if x.rank() < 2 {
        return Err(Error::Shape(format!(
            "Expected at least 2 dimensions for input tensor but received {} (input size {}); \
             group_norm takes (N, C, *)",
            x.rank(),
            fmt_shape(x.shape())
        )));
    }
    if num_groups == 0 {
        return Err(Error::InvalidArgument(format!(
            "{OP}: num_groups must be at least 1"
        )));
    }
    let d = PlaneShape::of(x.shape(), x.format())?;
    if !d.c.is_multiple_of(num_groups) {
        return Err(Error::Shape(format!(
            "Expected number of channels in input to be divisible by num_groups, but got input \
             of shape {} and num_groups={num_groups}",
            fmt_shape(x.shape())
        )));
    }
    if d.n.checked_mul(num_groups).is_none() {
        return Err(Error::Shape(format!(
            "{OP}: N·num_groups = {}·{num_groups} statistics overflow for input of size {}; use \
             fewer groups",
            d.n,
            fmt_shape(x.shape())
        )));
    }
    Ok(d)
}

/// Group normalization: the `C` channels of each sample are split into `num_groups` groups and
/// each `(n, group)` set (`C/num_groups · ∏spatial` values) is normalized with its mean and
/// biased variance; then `y = x̂·weight[c] + bias[c]`. Always uses input statistics.
pub fn group_norm<T: Element>(
    x: &Tensor<T>,
    num_groups: usize,
    weight: Option<&dyn Param>,
    bias: Option<&dyn Param>,
    eps: f64,
) -> Result<NormOutput<T>> {
    let weight = param_f32(weight)?;
    let weight = weight.as_deref();
    let bias = param_f32(bias)?;
    let bias = bias.as_deref();
    let d = check_input(x, num_groups)?;
    check_eps(OP, eps)?;
    if (d.n * d.c / num_groups) * d.s == 1 {
        let mut size = vec![d.n * d.c / num_groups, num_groups];
        size.extend_from_slice(&x.shape()[2..]);
        return Err(Error::Shape(format!(
            "Expected more than 1 value per channel when training, got input size {} (each group \
             holds a single value; use fewer groups or a larger input)",
            fmt_shape(&size)
        )));
    }
    let dev = x.device();
    if let Some(t) = weight {
        check_vec(OP, "weight", t, d.c, &dev)?;
    }
    if let Some(t) = bias {
        check_vec(OP, "bias", t, d.c, &dev)?;
    }
    planes::forward(
        x,
        NormOp::GroupNorm { num_groups },
        weight,
        bias,
        eps,
        Source::Input { running: None },
    )
}

/// Backward of [`group_norm`]: `dx`, and `dweight`/`dbias` (`[C]`) when `weight` is given.
pub fn group_norm_backward<T: Element>(
    dy: &Tensor<T>,
    x: &Tensor<T>,
    num_groups: usize,
    weight: Option<&dyn Param>,
    stats: &SavedStats,
) -> Result<Gradients<T>> {
    let weight = param_f32(weight)?;
    let weight = weight.as_deref();
    let d = check_input(x, num_groups)?;
    check_grad(OP, dy, x)?;
    if let Some(t) = weight {
        check_vec(OP, "weight", t, d.c, &x.device())?;
    }
    check_stats(NormOp::GroupNorm { num_groups }, stats, d.n * num_groups, x)?;
    if x.numel() == 0 {
        return empty_grads(x, &[d.c], weight.is_some(), weight.is_some());
    }
    planes::backward(dy, x, weight, weight.is_some(), stats)
}
