use super::{module_via_state, state_accessors, State};
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

/// `torch.nn.GroupNorm`: input `(N, C, *)`. Holds no running state: every forward takes `&self`.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    config: GroupNormConfig,
    state: State,
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
        let state = State::new(
            "GroupNorm".into(),
            &[c],
            config.affine,
            config.affine,
            false,
        )?;
        Ok(GroupNorm { config, state })
    }

    /// The config the module was built with.
    pub fn config(&self) -> &GroupNormConfig {
        &self.config
    }

    state_accessors!();

    /// The forward pass: output and the statistics for [`GroupNorm::backward`].
    pub fn forward_with_stats<T: Element>(&self, x: &Tensor<T>) -> Result<NormOutput<T>> {
        if self.config.affine {
            self.state.check_channels(x, 1, self.config.num_channels)?;
        }
        group_norm(
            x,
            self.config.num_groups,
            self.state.w(),
            self.state.b(),
            self.config.eps,
        )
    }

    /// The forward pass, output only.
    pub fn forward<T: Element>(&self, x: &Tensor<T>) -> Result<Tensor<T>> {
        Ok(self.forward_with_stats(x)?.output)
    }

    /// Gradients of the forward pass that produced `stats` from `x`, given `dy`.
    pub fn backward<T: Element>(
        &self,
        dy: &Tensor<T>,
        x: &Tensor<T>,
        stats: &SavedStats,
    ) -> Result<Gradients<T>> {
        if self.config.affine {
            self.state.check_channels(x, 1, self.config.num_channels)?;
        }
        group_norm_backward(dy, x, self.config.num_groups, self.state.w(), stats)
    }
}

module_via_state!(; GroupNorm);
