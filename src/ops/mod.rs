//! Functional normalization ops, like `torch.nn.functional`: each forward returns the output
//! and the statistics it used ([`SavedStats`]); each backward returns `dx`, `dweight` and `dbias`
//! from `dy`, the input and those statistics.
//!
//! Every front checks shapes, devices and arguments once, then dispatches to the CPU reference
//! path or the CUDA backend by the input's device.

pub(crate) mod engine;
pub mod kernels;
pub(crate) mod planes;
pub(crate) mod rows;

pub mod batch_norm;
pub mod group_norm;
pub mod instance_norm;
pub mod layer_norm;
pub mod rms_norm;

pub use batch_norm::{batch_norm, batch_norm_backward};
pub use group_norm::{group_norm, group_norm_backward};
pub use instance_norm::{instance_norm, instance_norm_backward};
pub use layer_norm::{layer_norm, layer_norm_backward};
pub use rms_norm::{rms_norm, rms_norm_backward};

use crate::device::Device;
use crate::dtype::Element;
use crate::error::{fmt_shape, Error, Result};
use crate::tensor::Tensor;

/// The op that saved a set of statistics ([`SavedStats::op`]), with what fixes their layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NormOp {
    /// `batch_norm`: one statistic per channel.
    BatchNorm,
    /// `instance_norm`: one per (sample, channel) from the input, one per channel in eval mode.
    InstanceNorm,
    /// `group_norm` with `num_groups` groups: one per (sample, group).
    GroupNorm {
        /// The number of groups the forward pass used.
        num_groups: usize,
    },
    /// `layer_norm` over the trailing `normalized_dims` dimensions: one per row.
    LayerNorm {
        /// The length of `normalized_shape` in the forward pass.
        normalized_dims: usize,
    },
    /// `rms_norm` over the trailing `normalized_dims` dimensions: one per row (no mean).
    RmsNorm {
        /// The length of `normalized_shape` in the forward pass.
        normalized_dims: usize,
    },
}

impl NormOp {
    /// The functional op's name (`"batch_norm"`, …).
    pub fn name(self) -> &'static str {
        match self {
            NormOp::BatchNorm => "batch_norm",
            NormOp::InstanceNorm => "instance_norm",
            NormOp::GroupNorm { .. } => "group_norm",
            NormOp::LayerNorm { .. } => "layer_norm",
            NormOp::RmsNorm { .. } => "rms_norm",
        }
    }

    /// PyTorch computes LayerNorm and GroupNorm statistics with Welford merges, so a set holding
    /// an infinity gets a NaN mean; BatchNorm and InstanceNorm sum, so their mean stays ±inf
    /// (and `running_mean` with it). The saved mean follows each (a NaN variance either way).
    pub(crate) fn welford_mean(self) -> bool {
        matches!(self, NormOp::GroupNorm { .. } | NormOp::LayerNorm { .. })
    }
}

/// A LayerNorm or GroupNorm mean of a set holding an infinity is NaN, as PyTorch's Welford merges
/// make it (see [`NormOp::welford_mean`]); the CPU engines of both families apply it.
pub(crate) fn nan_for_infinite(mean: &mut [f32]) {
    for m in mean.iter_mut().filter(|m| m.is_infinite()) {
        *m = f32::NAN;
    }
}

impl std::fmt::Display for NormOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            NormOp::GroupNorm { num_groups } => write!(f, "group_norm (num_groups = {num_groups})"),
            NormOp::LayerNorm { normalized_dims: k } | NormOp::RmsNorm { normalized_dims: k } => {
                write!(
                    f,
                    "{} (over the last {k} dimension{})",
                    self.name(),
                    if k == 1 { "" } else { "s" }
                )
            }
            _ => f.write_str(self.name()),
        }
    }
}

/// Statistics saved by a forward pass for its backward pass (all f32), with what they were made
/// for: the op ([`NormOp`]) and the input's shape. A backward pass checks both, so statistics of
/// another op, another grouping or another input shape are an `Err`, never a wrong gradient.
/// Only a forward pass makes them.
///
/// `mean` and `rstd` have one entry per normalized set: BatchNorm `C`, InstanceNorm `N·C`,
/// GroupNorm `N·G`, LayerNorm and RMSNorm one per row (RMSNorm has no mean).
#[derive(Clone, Debug)]
pub struct SavedStats {
    op: NormOp,
    input_shape: Vec<usize>,
    mean: Option<Tensor<f32>>,
    rstd: Tensor<f32>,
    from_input: bool,
}

impl SavedStats {
    pub(crate) fn new(
        op: NormOp,
        input_shape: &[usize],
        mean: Option<Tensor<f32>>,
        rstd: Tensor<f32>,
        from_input: bool,
    ) -> SavedStats {
        SavedStats {
            op,
            input_shape: input_shape.to_vec(),
            mean,
            rstd,
            from_input,
        }
    }

    /// The op whose forward pass saved these statistics.
    pub fn op(&self) -> NormOp {
        self.op
    }

    /// The shape of the input they were computed for.
    pub fn input_shape(&self) -> &[usize] {
        &self.input_shape
    }

    /// Mean of each normalized set (`None` for RMSNorm).
    pub fn mean(&self) -> Option<&Tensor<f32>> {
        self.mean.as_ref()
    }

    /// `1/√(var + eps)` of each normalized set (RMSNorm: `1/√(mean(x²) + eps)`).
    pub fn rstd(&self) -> &Tensor<f32> {
        &self.rstd
    }

    /// `true` when the statistics were computed from the input (training mode), so the backward
    /// pass differentiates through them; `false` when they were fixed running statistics
    /// (BatchNorm/InstanceNorm in eval mode).
    pub fn from_input(&self) -> bool {
        self.from_input
    }
}

/// The result of a forward pass.
#[derive(Clone, Debug)]
pub struct NormOutput<T: Element> {
    /// The normalized output, same shape and memory format as the input.
    pub output: Tensor<T>,
    /// The statistics to pass to the backward function.
    pub stats: SavedStats,
}

/// The result of a backward pass.
#[derive(Clone, Debug)]
pub struct Gradients<T: Element> {
    /// Gradient with respect to the input, same shape and memory format as the input.
    pub dx: Tensor<T>,
    /// Gradient with respect to the weight (f32), when the op was given a weight.
    pub dweight: Option<Tensor<f32>>,
    /// Gradient with respect to the bias (f32), when the op has a bias.
    pub dbias: Option<Tensor<f32>>,
}

impl<T: Element> Gradients<T> {
    /// `(dweight, dbias)` in element type `W` (the parameters' dtype, e.g. bf16 weights), rounded
    /// once from the f32 accumulation.
    #[allow(clippy::type_complexity)]
    pub fn param_grads_as<W: Element>(&self) -> Result<(Option<Tensor<W>>, Option<Tensor<W>>)> {
        let conv = |g: &Option<Tensor<f32>>| g.as_ref().map(|g| g.to_dtype::<W>()).transpose();
        Ok((conv(&self.dweight)?, conv(&self.dbias)?))
    }

    /// The parameter gradients by parameter name (`weight`, `bias`), in the order of
    /// `Module::parameters`.
    pub fn named(&self) -> Vec<(&'static str, &Tensor<f32>)> {
        let mut out = Vec::new();
        out.extend(self.dweight.as_ref().map(|t| ("weight", t)));
        out.extend(self.dbias.as_ref().map(|t| ("bias", t)));
        out
    }
}

/// A parameter tensor (weight or bias) of any element type: f32, or the input's f16/bf16 as
/// PyTorch and candle keep them. The ops read it as f32 (statistics and accumulation stay f32
/// inside); an f32 tensor is used as it is, another dtype is widened once per call (the
/// parameter's size, not the input's). `&Tensor<W>` coerces to it: `Some(&w)`.
///
/// ```
/// use cunorm::{bf16, functional as F, Tensor};
/// # fn main() -> cunorm::Result<()> {
/// let x = Tensor::<bf16>::randn(&[4, 8], 0)?;
/// let w = Tensor::<bf16>::randn(&[8], 1)?;                 // bf16 weight, like the input
/// let out = F::layer_norm(&x, &[8], Some(&w), None, 1e-5)?;
/// let dy = Tensor::<bf16>::randn(&[4, 8], 2)?;
/// let g = F::layer_norm_backward(&dy, &x, &[8], Some(&w), false, &out.stats)?;
/// let (dw, _) = g.param_grads_as::<bf16>()?;               // dweight in bf16
/// assert_eq!(dw.unwrap().shape(), &[8]);
/// # Ok(())
/// # }
/// ```
pub trait Param: sealed::Sealed {
    /// The parameter's element type.
    fn dtype(&self) -> crate::dtype::DType;
    /// The parameter as f32: borrowed when it is f32, else a widened copy.
    fn to_f32(&self) -> Result<std::borrow::Cow<'_, Tensor<f32>>>;
}

mod sealed {
    pub trait Sealed {}
    impl<T: crate::dtype::Element> Sealed for crate::tensor::Tensor<T> {}
}

impl<T: Element> Param for Tensor<T> {
    fn dtype(&self) -> crate::dtype::DType {
        T::DTYPE
    }
    fn to_f32(&self) -> Result<std::borrow::Cow<'_, Tensor<f32>>> {
        match (self as &dyn std::any::Any).downcast_ref::<Tensor<f32>>() {
            Some(t) => Ok(std::borrow::Cow::Borrowed(t)),
            None => Ok(std::borrow::Cow::Owned(self.to_dtype::<f32>()?)),
        }
    }
}

pub(crate) fn param_f32(
    p: Option<&dyn Param>,
) -> Result<Option<std::borrow::Cow<'_, Tensor<f32>>>> {
    p.map(|p| p.to_f32()).transpose()
}

pub(crate) fn check_eps(op: &str, eps: f64) -> Result<()> {
    if eps.is_nan() || eps < 0.0 {
        return Err(Error::InvalidArgument(format!(
            "{op}: eps must be a non-negative number, got {eps}; PyTorch's default is 1e-5"
        )));
    }
    Ok(())
}

pub(crate) fn check_momentum(op: &str, momentum: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&momentum) {
        return Err(Error::InvalidArgument(format!(
            "{op}: momentum must be in [0, 1], got {momentum}; PyTorch's default is 0.1"
        )));
    }
    Ok(())
}

/// Checks a per-channel parameter or running statistic: `{name} should contain {c} elements not {n}`.
pub(crate) fn check_vec(op: &str, name: &str, t: &Tensor<f32>, c: usize, x: &Device) -> Result<()> {
    if t.numel() != c {
        return Err(Error::Shape(format!(
            "{op}: {name} should contain {c} elements not {} (its size is {}); give it shape [{c}], \
             one entry per channel of the input",
            t.numel(),
            fmt_shape(t.shape())
        )));
    }
    if t.rank() != 1 {
        return Err(Error::Shape(format!(
            "{op}: {name} must be 1-D of size [{c}], one entry per channel of the input, but its \
             size is {}; reshape it to [{c}]",
            fmt_shape(t.shape())
        )));
    }
    check_same_device(op, name, &t.device(), x)
}

pub(crate) fn check_same_device(op: &str, name: &str, d: &Device, x: &Device) -> Result<()> {
    if !d.same(x) {
        return Err(Error::DeviceMismatch(format!(
            "{op}: {name} is on {d} but the input is on {x}; move it with .to_device()"
        )));
    }
    Ok(())
}

/// `dy` must match `x` in shape, format and device.
pub(crate) fn check_grad<T: Element>(op: &str, dy: &Tensor<T>, x: &Tensor<T>) -> Result<()> {
    if dy.shape() != x.shape() {
        return Err(Error::Shape(format!(
            "{op} backward: grad_output has size {} but the input has size {}; they must match",
            fmt_shape(dy.shape()),
            fmt_shape(x.shape())
        )));
    }
    if dy.format() != x.format() {
        return Err(Error::Shape(format!(
            "{op} backward: grad_output is {} but the input is {}; convert one with .to_format()",
            dy.format().name(),
            x.format().name()
        )));
    }
    check_same_device(op, "grad_output", &dy.device(), &x.device())
}

/// Checks that saved statistics were made by `op`'s forward pass on an input of `x`'s shape, on
/// `x`'s device, with `groups` entries each when `x` is not empty (and a mean for every op but
/// RMSNorm). Returns the mean.
pub(crate) fn check_stats<'a, T: Element>(
    op: NormOp,
    stats: &'a SavedStats,
    groups: usize,
    x: &Tensor<T>,
) -> Result<Option<&'a Tensor<f32>>> {
    let name = op.name();
    let fix = format!("pass the stats returned by the {name} forward call on this input");
    if stats.op != op {
        return Err(Error::InvalidArgument(format!(
            "{name} backward: these statistics were saved by {} but this backward is {op}; {fix}",
            stats.op
        )));
    }
    if stats.input_shape != x.shape() {
        return Err(Error::Shape(format!(
            "{name} backward: the saved statistics were computed for an input of size {} but \
             this input has size {}; {fix}",
            fmt_shape(&stats.input_shape),
            fmt_shape(x.shape())
        )));
    }
    let need_mean = !matches!(op, NormOp::RmsNorm { .. });
    if need_mean != stats.mean.is_some() {
        return Err(Error::InvalidArgument(format!(
            "{name} backward: the saved statistics {} a mean; {fix}",
            if need_mean { "carry no" } else { "carry" }
        )));
    }
    let mut parts = vec![("rstd", &stats.rstd)];
    if let Some(m) = &stats.mean {
        parts.push(("mean", m));
    }
    for (part, t) in parts {
        // An empty input's statistics may be empty whatever the set count: nothing reads them.
        if t.numel() != groups && x.numel() != 0 {
            return Err(Error::Shape(format!(
                "{name} backward: saved {part} has {} entries but this input needs {groups}; {fix}",
                t.numel()
            )));
        }
        check_same_device(name, part, &t.device(), &x.device())?;
    }
    Ok(stats.mean.as_ref())
}

/// The gradients of an empty input, as PyTorch gives them: an empty `dx` and zero parameter
/// gradients of `param_shape` (for the parameters the op has).
pub(crate) fn empty_grads<T: Element>(
    x: &Tensor<T>,
    param_shape: &[usize],
    weight: bool,
    bias: bool,
) -> Result<Gradients<T>> {
    let dev = x.device();
    let zeros = |on: bool| -> Result<Option<Tensor<f32>>> {
        on.then(|| Tensor::zeros(param_shape)?.to_device(&dev))
            .transpose()
    };
    Ok(Gradients {
        dx: Tensor::from_vec_with_format(Vec::new(), x.shape(), x.format())?.to_device(&dev)?,
        dweight: zeros(weight)?,
        dbias: zeros(bias)?,
    })
}

/// The forward of an empty input (the front has checked it): an empty output of its shape and
/// format, and empty statistics, allocating nothing per channel or column (those may number
/// 2⁶² when another dimension is 0). A backward reads no statistic of an empty input.
pub(crate) fn empty_output<T: Element>(
    x: &Tensor<T>,
    op: NormOp,
    from_input: bool,
) -> Result<NormOutput<T>> {
    let device = x.device();
    let empty = || f32_tensor(Vec::new(), &device);
    let mean = (!matches!(op, NormOp::RmsNorm { .. }))
        .then(empty)
        .transpose()?;
    Ok(NormOutput {
        output: x.clone(),
        stats: SavedStats::new(op, x.shape(), mean, empty()?, from_input),
    })
}

pub(crate) fn f32_tensor(v: Vec<f32>, device: &Device) -> Result<Tensor<f32>> {
    let n = v.len();
    Tensor::from_vec(v, &[n])?.to_device(device)
}
