use super::InstanceNormConfig;
use super::{module_via_state, running_accessors, state_accessors, State};
use crate::device::Device;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::ops::{instance_norm, instance_norm_backward, Gradients, NormOutput, SavedStats};
use crate::tensor::{MemoryFormat, Tensor};

/// Instance normalization over `D` spatial dimensions, like `torch.nn.InstanceNorm{D}d`.
/// Use the aliases [`InstanceNorm1d`], [`InstanceNorm2d`], [`InstanceNorm3d`].
#[derive(Clone, Debug)]
pub struct InstanceNorm<const D: usize> {
    config: InstanceNormConfig,
    state: State,
}

/// `torch.nn.InstanceNorm1d`: input `(N, C, L)` or unbatched `(C, L)`.
pub type InstanceNorm1d = InstanceNorm<1>;
/// `torch.nn.InstanceNorm2d`: input `(N, C, H, W)` or unbatched `(C, H, W)`.
pub type InstanceNorm2d = InstanceNorm<2>;
/// `torch.nn.InstanceNorm3d`: input `(N, C, D, H, W)` or unbatched `(C, D, H, W)`.
pub type InstanceNorm3d = InstanceNorm<3>;

impl<const D: usize> InstanceNorm<D> {
    /// A module with PyTorch's defaults (no affine, no running statistics).
    pub fn new(num_features: usize) -> Result<Self> {
        Self::from_config(InstanceNormConfig::new(num_features))
    }

    /// A module from a config.
    pub fn from_config(config: InstanceNormConfig) -> Result<Self> {
        let name = format!("InstanceNorm{D}d");
        let state = State::per_channel(
            name,
            config.num_features,
            config.eps,
            config.momentum,
            config.affine,
            config.track_running_stats,
        )?;
        Ok(InstanceNorm { config, state })
    }

    /// The config the module was built with.
    pub fn config(&self) -> &InstanceNormConfig {
        &self.config
    }

    state_accessors!();
    running_accessors!();

    /// Checks the rank; returns the input with a batch dimension (unbatched inputs get N = 1).
    fn batched<T: Element>(&self, x: &Tensor<T>) -> Result<(Tensor<T>, bool)> {
        let (lo, hi) = (D + 1, D + 2);
        if x.rank() != lo && x.rank() != hi {
            return Err(Error::Shape(format!(
                "{}: expected {lo}D or {hi}D input (got {}D input)",
                self.state.name,
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
        // Parameters and running statistics have num_features entries; without either, any
        // channel count works (as in PyTorch).
        if self.config.affine || self.config.track_running_stats {
            self.state
                .check_channels(x, x.rank() - D - 1, self.config.num_features)?;
        }
        Ok((xb, unbatched))
    }

    /// The forward pass, like calling the PyTorch module: per-plane input statistics in
    /// training mode or without running statistics (updating the running ones when tracked and
    /// training), the running statistics otherwise. `num_batches_tracked` exists when tracked
    /// but, as in PyTorch, is never incremented.
    pub fn forward_with_stats<T: Element>(&mut self, x: &Tensor<T>) -> Result<NormOutput<T>> {
        let (xb, unbatched) = self.batched(x)?;
        let use_input = self.state.training || !self.config.track_running_stats;
        let (momentum, eps) = (self.config.momentum.unwrap_or(0.0), self.config.eps);
        let (w, b, rm, rv) = self.state.op_args();
        let mut out = instance_norm(&xb, rm, rv, w, b, use_input, momentum, eps)?;
        if unbatched {
            out.output = out.output.reshape(x.shape())?;
        }
        Ok(out)
    }

    /// The forward pass, output only (see [`InstanceNorm::forward_with_stats`]).
    pub fn forward<T: Element>(&mut self, x: &Tensor<T>) -> Result<Tensor<T>> {
        Ok(self.forward_with_stats(x)?.output)
    }

    /// The forward pass through `&self`, for when it changes no state: eval mode, or no running
    /// statistics. In training mode with tracked statistics it is an `Err` (call `forward`).
    pub fn forward_eval<T: Element>(&self, x: &Tensor<T>) -> Result<NormOutput<T>> {
        if self.state.training && self.state.running.is_some() {
            return Err(Error::InvalidArgument(format!(
                "{}: forward_eval cannot update the running statistics of a training-mode \
                 module; call eval() first, or forward() (which takes &mut self)",
                self.state.name
            )));
        }
        let mut module = self.clone();
        module.forward_with_stats(x)
    }

    /// Gradients of the forward pass that produced `stats` from `x`, given `dy`.
    pub fn backward<T: Element>(
        &self,
        dy: &Tensor<T>,
        x: &Tensor<T>,
        stats: &SavedStats,
    ) -> Result<Gradients<T>> {
        crate::ops::check_grad(&self.state.name, dy, x)?;
        let (xb, unbatched) = self.batched(x)?;
        let dyb = if unbatched {
            dy.to_format(MemoryFormat::Contiguous)?
                .reshape(xb.shape())?
        } else {
            dy.clone()
        };
        let mut g = instance_norm_backward(&dyb, &xb, self.state.w(), stats)?;
        if unbatched {
            g.dx = g.dx.reshape(x.shape())?;
        }
        Ok(g)
    }
}

module_via_state!(D; InstanceNorm<D>);
