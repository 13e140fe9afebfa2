use super::{filled, move_opt, set_checked, set_counter, Norm};
use crate::device::Device;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::ops::{instance_norm, instance_norm_backward, Gradients, NormOutput, SavedStats};
use crate::tensor::{MemoryFormat, Tensor};

/// Arguments of `InstanceNorm{1,2,3}d`, with PyTorch's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceNormConfig {
    /// `C`, the channel count.
    pub num_features: usize,
    /// Added to the variance (default 1e-5).
    pub eps: f64,
    /// Running-statistics momentum (default `Some(0.1)`); `None` leaves them unchanged.
    pub momentum: Option<f64>,
    /// Learnable per-channel weight and bias (default **false**).
    pub affine: bool,
    /// Keep running statistics (default **false**).
    pub track_running_stats: bool,
}

impl InstanceNormConfig {
    /// PyTorch's defaults for `num_features` channels.
    pub fn new(num_features: usize) -> Self {
        InstanceNormConfig {
            num_features,
            eps: 1e-5,
            momentum: Some(0.1),
            affine: false,
            track_running_stats: false,
        }
    }
    /// Sets `eps`.
    pub fn with_eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }
    /// Sets `momentum`.
    pub fn with_momentum(mut self, momentum: Option<f64>) -> Self {
        self.momentum = momentum;
        self
    }
    /// Sets `affine`.
    pub fn with_affine(mut self, affine: bool) -> Self {
        self.affine = affine;
        self
    }
    /// Sets `track_running_stats`.
    pub fn with_track_running_stats(mut self, track: bool) -> Self {
        self.track_running_stats = track;
        self
    }
}

/// Instance normalization over `D` spatial dimensions, like `torch.nn.InstanceNorm{D}d`.
/// Use the aliases [`InstanceNorm1d`], [`InstanceNorm2d`], [`InstanceNorm3d`].
#[derive(Clone, Debug)]
pub struct InstanceNorm<const D: usize> {
    config: InstanceNormConfig,
    weight: Option<Tensor<f32>>,
    bias: Option<Tensor<f32>>,
    running_mean: Option<Tensor<f32>>,
    running_var: Option<Tensor<f32>>,
    num_batches_tracked: Option<i64>,
    training: bool,
}

/// `torch.nn.InstanceNorm1d`: input `(N, C, L)` or unbatched `(C, L)`.
pub type InstanceNorm1d = InstanceNorm<1>;
/// `torch.nn.InstanceNorm2d`: input `(N, C, H, W)` or unbatched `(C, H, W)`.
pub type InstanceNorm2d = InstanceNorm<2>;
/// `torch.nn.InstanceNorm3d`: input `(N, C, D, H, W)` or unbatched `(C, D, H, W)`.
pub type InstanceNorm3d = InstanceNorm<3>;

impl<const D: usize> InstanceNorm<D> {
    fn name() -> String {
        format!("InstanceNorm{D}d")
    }

    /// A module with PyTorch's defaults (no affine, no running statistics).
    pub fn new(num_features: usize) -> Result<Self> {
        Self::from_config(InstanceNormConfig::new(num_features))
    }

    /// A module from a config.
    pub fn from_config(config: InstanceNormConfig) -> Result<Self> {
        crate::ops::check_eps(&Self::name(), config.eps)?;
        if let Some(m) = config.momentum {
            crate::ops::check_momentum(&Self::name(), m)?;
        }
        let c = config.num_features;
        let track = config.track_running_stats;
        Ok(InstanceNorm {
            weight: config.affine.then(|| filled(c, 1.0)),
            bias: config.affine.then(|| filled(c, 0.0)),
            running_mean: track.then(|| filled(c, 0.0)),
            running_var: track.then(|| filled(c, 1.0)),
            num_batches_tracked: track.then_some(0),
            training: true,
            config,
        })
    }

    /// The config the module was built with.
    pub fn config(&self) -> &InstanceNormConfig {
        &self.config
    }
    /// Per-channel weight (`None` unless affine).
    pub fn weight(&self) -> Option<&Tensor<f32>> {
        self.weight.as_ref()
    }
    /// Per-channel bias (`None` unless affine).
    pub fn bias(&self) -> Option<&Tensor<f32>> {
        self.bias.as_ref()
    }
    /// Running mean (`None` unless tracking).
    pub fn running_mean(&self) -> Option<&Tensor<f32>> {
        self.running_mean.as_ref()
    }
    /// Running (unbiased) variance (`None` unless tracking).
    pub fn running_var(&self) -> Option<&Tensor<f32>> {
        self.running_var.as_ref()
    }
    /// Exists when tracking, as in PyTorch, but InstanceNorm never increments it.
    pub fn num_batches_tracked(&self) -> Option<i64> {
        self.num_batches_tracked
    }
    /// Sets the (unused, as in PyTorch) step counter.
    pub fn set_num_batches_tracked(&mut self, n: i64) -> Result<()> {
        set_counter(&Self::name(), &mut self.num_batches_tracked, n)
    }
    /// Replaces the weight (shape `[C]`).
    pub fn set_weight(&mut self, w: Tensor<f32>) -> Result<()> {
        set_checked(&Self::name(), "weight", &mut self.weight, w)
    }
    /// Replaces the bias (shape `[C]`).
    pub fn set_bias(&mut self, b: Tensor<f32>) -> Result<()> {
        set_checked(&Self::name(), "bias", &mut self.bias, b)
    }
    /// Replaces the running mean (shape `[C]`).
    pub fn set_running_mean(&mut self, t: Tensor<f32>) -> Result<()> {
        set_checked(&Self::name(), "running_mean", &mut self.running_mean, t)
    }
    /// Replaces the running variance (shape `[C]`).
    pub fn set_running_var(&mut self, t: Tensor<f32>) -> Result<()> {
        set_checked(&Self::name(), "running_var", &mut self.running_var, t)
    }

    /// Checks the rank; returns the input with a batch dimension (unbatched inputs get N = 1).
    fn batched<T: Element>(&self, x: &Tensor<T>) -> Result<(Tensor<T>, bool)> {
        let (lo, hi) = (D + 1, D + 2);
        if x.rank() != lo && x.rank() != hi {
            return Err(Error::Shape(format!(
                "{}: expected {lo}D or {hi}D input (got {}D input)",
                Self::name(),
                x.rank()
            )));
        }
        let (xb, unbatched) = if x.rank() == lo {
            let mut shape = vec![1];
            shape.extend_from_slice(x.shape());
            (
                x.to_format(MemoryFormat::Contiguous)?.reshape(&shape)?,
                true,
            )
        } else {
            (x.clone(), false)
        };
        let c = xb.shape()[1];
        if self.config.affine && c != self.config.num_features {
            return Err(Error::Shape(format!(
                "expected input's size at dim={} to match num_features ({}), but got: {c}.",
                x.rank() - D - 1,
                self.config.num_features
            )));
        }
        Ok((xb, unbatched))
    }
}

impl<const D: usize> Norm for InstanceNorm<D> {
    fn forward_with_stats<T: Element>(&mut self, x: &Tensor<T>) -> Result<NormOutput<T>> {
        let (xb, unbatched) = self.batched(x)?;
        let use_input = self.training || !self.config.track_running_stats;
        let mut out = instance_norm(
            &xb,
            self.running_mean.as_mut(),
            self.running_var.as_mut(),
            self.weight.as_ref(),
            self.bias.as_ref(),
            use_input,
            self.config.momentum.unwrap_or(0.0),
            self.config.eps,
        )?;
        if unbatched {
            out.output = out.output.reshape(x.shape())?;
        }
        Ok(out)
    }

    fn backward<T: Element>(
        &self,
        dy: &Tensor<T>,
        x: &Tensor<T>,
        stats: &SavedStats,
    ) -> Result<Gradients<T>> {
        let (xb, unbatched) = self.batched(x)?;
        let dyb = if unbatched {
            dy.to_format(MemoryFormat::Contiguous)?
                .reshape(xb.shape())?
        } else {
            dy.clone()
        };
        let mut g = instance_norm_backward(&dyb, &xb, self.weight.as_ref(), stats)?;
        if unbatched {
            g.dx = g.dx.reshape(x.shape())?;
        }
        Ok(g)
    }

    fn set_training(&mut self, on: bool) {
        self.training = on;
    }
    fn is_training(&self) -> bool {
        self.training
    }
    fn to_device(&mut self, device: &Device) -> Result<()> {
        for t in [
            &mut self.weight,
            &mut self.bias,
            &mut self.running_mean,
            &mut self.running_var,
        ] {
            move_opt(t, device)?;
        }
        Ok(())
    }
}
