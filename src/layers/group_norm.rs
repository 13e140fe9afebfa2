use super::{filled, move_opt, set_checked, Norm};
use crate::device::Device;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::ops::{group_norm, group_norm_backward, Gradients, NormOutput, SavedStats};
use crate::tensor::Tensor;

/// Arguments of `GroupNorm`, with PyTorch's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupNormConfig {
    /// Number of groups `G`.
    pub num_groups: usize,
    /// Number of channels `C` (divisible by `G`).
    pub num_channels: usize,
    /// Added to the variance (default 1e-5).
    pub eps: f64,
    /// Learnable per-channel weight and bias (default true).
    pub affine: bool,
}

impl GroupNormConfig {
    /// PyTorch's defaults.
    pub fn new(num_groups: usize, num_channels: usize) -> Self {
        GroupNormConfig {
            num_groups,
            num_channels,
            eps: 1e-5,
            affine: true,
        }
    }
    /// Sets `eps`.
    pub fn with_eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }
    /// Sets `affine`.
    pub fn with_affine(mut self, affine: bool) -> Self {
        self.affine = affine;
        self
    }
}

/// `torch.nn.GroupNorm`: input `(N, C, *)`.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    config: GroupNormConfig,
    weight: Option<Tensor<f32>>,
    bias: Option<Tensor<f32>>,
    training: bool,
}

impl GroupNorm {
    /// A module with PyTorch's defaults.
    pub fn new(num_groups: usize, num_channels: usize) -> Result<Self> {
        Self::from_config(GroupNormConfig::new(num_groups, num_channels))
    }

    /// A module from a config; fails when `num_channels % num_groups != 0`.
    pub fn from_config(config: GroupNormConfig) -> Result<Self> {
        if config.num_groups == 0 || !config.num_channels.is_multiple_of(config.num_groups) {
            return Err(Error::InvalidArgument(format!(
                "GroupNorm: num_channels must be divisible by num_groups (got num_channels={}, \
                 num_groups={})",
                config.num_channels, config.num_groups
            )));
        }
        crate::ops::check_eps("GroupNorm", config.eps)?;
        let c = config.num_channels;
        Ok(GroupNorm {
            weight: config.affine.then(|| filled(c, 1.0)),
            bias: config.affine.then(|| filled(c, 0.0)),
            training: true,
            config,
        })
    }

    /// The config the module was built with.
    pub fn config(&self) -> &GroupNormConfig {
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
    /// Replaces the weight (shape `[C]`).
    pub fn set_weight(&mut self, w: Tensor<f32>) -> Result<()> {
        set_checked("GroupNorm", "weight", &mut self.weight, w)
    }
    /// Replaces the bias (shape `[C]`).
    pub fn set_bias(&mut self, b: Tensor<f32>) -> Result<()> {
        set_checked("GroupNorm", "bias", &mut self.bias, b)
    }
}

impl Norm for GroupNorm {
    fn forward_with_stats<T: Element>(&mut self, x: &Tensor<T>) -> Result<NormOutput<T>> {
        group_norm(
            x,
            self.config.num_groups,
            self.weight.as_ref(),
            self.bias.as_ref(),
            self.config.eps,
        )
    }

    fn backward<T: Element>(
        &self,
        dy: &Tensor<T>,
        x: &Tensor<T>,
        stats: &SavedStats,
    ) -> Result<Gradients<T>> {
        group_norm_backward(dy, x, self.config.num_groups, self.weight.as_ref(), stats)
    }

    fn set_training(&mut self, on: bool) {
        self.training = on;
    }
    fn is_training(&self) -> bool {
        self.training
    }
    fn to_device(&mut self, device: &Device) -> Result<()> {
        move_opt(&mut self.weight, device)?;
        move_opt(&mut self.bias, device)
    }
}
