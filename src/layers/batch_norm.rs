use super::{filled, move_opt, set_checked, set_counter, Norm};
use crate::device::Device;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::ops::{batch_norm, batch_norm_backward, Gradients, NormOutput, SavedStats};
use crate::tensor::Tensor;

/// Arguments of `BatchNorm{1,2,3}d`, with PyTorch's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNormConfig {
    /// `C`, the channel count.
    pub num_features: usize,
    /// Added to the variance (default 1e-5).
    pub eps: f64,
    /// Running-statistics momentum (default `Some(0.1)`); `None` means a cumulative average.
    pub momentum: Option<f64>,
    /// Learnable per-channel weight and bias (default true).
    pub affine: bool,
    /// Keep running statistics (default true).
    pub track_running_stats: bool,
}

impl BatchNormConfig {
    /// PyTorch's defaults for `num_features` channels.
    pub fn new(num_features: usize) -> Self {
        BatchNormConfig {
            num_features,
            eps: 1e-5,
            momentum: Some(0.1),
            affine: true,
            track_running_stats: true,
        }
    }
    /// Sets `eps`.
    pub fn with_eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }
    /// Sets `momentum` (`None` = cumulative moving average).
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

/// Batch normalization over `D` spatial dimensions, like `torch.nn.BatchNorm{D}d`.
/// Use the aliases [`BatchNorm1d`], [`BatchNorm2d`], [`BatchNorm3d`].
#[derive(Clone, Debug)]
pub struct BatchNorm<const D: usize> {
    config: BatchNormConfig,
    weight: Option<Tensor<f32>>,
    bias: Option<Tensor<f32>>,
    running_mean: Option<Tensor<f32>>,
    running_var: Option<Tensor<f32>>,
    num_batches_tracked: Option<i64>,
    training: bool,
}

/// `torch.nn.BatchNorm1d`: input `(N, C)` or `(N, C, L)`.
pub type BatchNorm1d = BatchNorm<1>;
/// `torch.nn.BatchNorm2d`: input `(N, C, H, W)`.
pub type BatchNorm2d = BatchNorm<2>;
/// `torch.nn.BatchNorm3d`: input `(N, C, D, H, W)`.
pub type BatchNorm3d = BatchNorm<3>;

impl<const D: usize> BatchNorm<D> {
    fn name() -> String {
        format!("BatchNorm{D}d")
    }

    /// A module with PyTorch's defaults.
    pub fn new(num_features: usize) -> Result<Self> {
        Self::from_config(BatchNormConfig::new(num_features))
    }

    /// A module from a config: weight = 1, bias = 0, running_mean = 0, running_var = 1.
    pub fn from_config(config: BatchNormConfig) -> Result<Self> {
        crate::ops::check_eps(&Self::name(), config.eps)?;
        if let Some(m) = config.momentum {
            crate::ops::check_momentum(&Self::name(), m)?;
        }
        let c = config.num_features;
        let track = config.track_running_stats;
        Ok(BatchNorm {
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
    pub fn config(&self) -> &BatchNormConfig {
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
    /// Training steps counted so far (`None` unless tracking).
    pub fn num_batches_tracked(&self) -> Option<i64> {
        self.num_batches_tracked
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
    /// Sets the step counter (used when momentum is `None`).
    pub fn set_num_batches_tracked(&mut self, n: i64) -> Result<()> {
        set_counter(&Self::name(), &mut self.num_batches_tracked, n)
    }

    fn check_dim(rank: usize) -> Result<()> {
        let ok = match D {
            1 => rank == 2 || rank == 3,
            _ => rank == D + 2,
        };
        if ok {
            return Ok(());
        }
        let expected = match D {
            1 => "2D or 3D".to_string(),
            _ => format!("{}D", D + 2),
        };
        Err(Error::Shape(format!(
            "{}: expected {expected} input (got {rank}D input)",
            Self::name()
        )))
    }
}

impl<const D: usize> Norm for BatchNorm<D> {
    fn forward_with_stats<T: Element>(&mut self, x: &Tensor<T>) -> Result<NormOutput<T>> {
        Self::check_dim(x.rank())?;
        let mut factor = self.config.momentum.unwrap_or(0.0);
        if self.training {
            if let Some(nbt) = &mut self.num_batches_tracked {
                *nbt += 1;
                if self.config.momentum.is_none() {
                    factor = 1.0 / *nbt as f64;
                }
            }
        }
        let use_batch = self.training || self.running_mean.is_none();
        batch_norm(
            x,
            self.running_mean.as_mut(),
            self.running_var.as_mut(),
            self.weight.as_ref(),
            self.bias.as_ref(),
            use_batch,
            factor,
            self.config.eps,
        )
    }

    fn backward<T: Element>(
        &self,
        dy: &Tensor<T>,
        x: &Tensor<T>,
        stats: &SavedStats,
    ) -> Result<Gradients<T>> {
        Self::check_dim(x.rank())?;
        batch_norm_backward(dy, x, self.weight.as_ref(), stats)
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
