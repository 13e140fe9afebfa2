use super::BatchNormConfig;
use super::{module_via_state, running_accessors, state_accessors, State};
use crate::device::Device;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::ops::{batch_norm, batch_norm_backward, Gradients, NormOutput, SavedStats};
use crate::tensor::Tensor;

/// Batch normalization over `D` spatial dimensions, like `torch.nn.BatchNorm{D}d`.
/// Use the aliases [`BatchNorm1d`], [`BatchNorm2d`], [`BatchNorm3d`].
///
/// ```
/// use cunorm::{BatchNorm2d, Module, Tensor};
/// # fn main() -> cunorm::Result<()> {
/// let mut bn = BatchNorm2d::new(3)?;
/// let x = Tensor::<f32>::randn(&[4, 3, 5, 5], 1)?;
/// let out = bn.forward_with_stats(&x)?; // training: batch statistics, running ones updated
/// let dx = bn.backward(&Tensor::<f32>::randn(x.shape(), 2)?, &x, &out.stats)?.dx;
/// assert_eq!(dx.shape(), x.shape());
/// bn.eval();
/// let y = bn.forward_eval(&x)?; // `&self`: uses the running statistics, changes nothing
/// assert_eq!(bn.num_batches_tracked(), Some(1));
/// # let _ = y; Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct BatchNorm<const D: usize> {
    config: BatchNormConfig,
    state: State,
}

/// `torch.nn.BatchNorm1d`: input `(N, C)` or `(N, C, L)`.
pub type BatchNorm1d = BatchNorm<1>;
/// `torch.nn.BatchNorm2d`: input `(N, C, H, W)`.
pub type BatchNorm2d = BatchNorm<2>;
/// `torch.nn.BatchNorm3d`: input `(N, C, D, H, W)`.
pub type BatchNorm3d = BatchNorm<3>;

impl<const D: usize> BatchNorm<D> {
    /// A module with PyTorch's defaults.
    pub fn new(num_features: usize) -> Result<Self> {
        Self::from_config(BatchNormConfig::new(num_features))
    }

    /// A module from a config: weight = 1, bias = 0, running_mean = 0, running_var = 1.
    pub fn from_config(config: BatchNormConfig) -> Result<Self> {
        let name = format!("BatchNorm{D}d");
        let state = State::per_channel(
            name,
            config.num_features,
            config.eps,
            config.momentum,
            config.affine,
            config.track_running_stats,
        )?;
        Ok(BatchNorm { config, state })
    }

    /// The config the module was built with.
    pub fn config(&self) -> &BatchNormConfig {
        &self.config
    }

    state_accessors!();
    running_accessors!();

    /// Parameters and running statistics have num_features entries; without either, any
    /// channel count works (as in PyTorch).
    fn check_channels<T: Element>(&self, x: &Tensor<T>) -> Result<()> {
        if self.config.affine || self.config.track_running_stats {
            self.state.check_channels(x, 1, self.config.num_features)?;
        }
        Ok(())
    }

    fn check_dim(&self, rank: usize) -> Result<()> {
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
            self.state.name
        )))
    }

    /// The forward pass, like calling the PyTorch module: in training mode it normalizes with
    /// the batch statistics and updates the running ones (when tracked); in eval mode it uses
    /// the running statistics. Returns the output and the statistics for [`BatchNorm::backward`].
    /// A failed call changes no state.
    pub fn forward_with_stats<T: Element>(&mut self, x: &Tensor<T>) -> Result<NormOutput<T>> {
        self.check_dim(x.rank())?;
        self.check_channels(x)?;
        let training = self.state.training;
        let momentum = self.config.momentum;
        let (eps, state) = (self.config.eps, &mut self.state);
        // The step counter after this step, checked before anything changes.
        let counted = match &state.running {
            Some(r) if training => Some(r.num_batches_tracked.checked_add(1).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{}: num_batches_tracked is at its maximum; reset_running_stats() or set it",
                    state.name
                ))
            })?),
            _ => None,
        };
        // The update factor of this step: momentum, or a cumulative average over the steps.
        let factor = match (counted, momentum) {
            (_, Some(m)) => m,
            (Some(n), None) => 1.0 / n as f64,
            _ => 0.0,
        };
        let use_batch = training || state.running.is_none();
        let (w, b, rm, rv) = state.op_args();
        let out = batch_norm(x, rm, rv, w, b, use_batch, factor, eps)?;
        if let (Some(n), Some(r)) = (counted, &mut state.running) {
            r.num_batches_tracked = n;
        }
        Ok(out)
    }

    /// The forward pass, output only (see [`BatchNorm::forward_with_stats`]).
    pub fn forward<T: Element>(&mut self, x: &Tensor<T>) -> Result<Tensor<T>> {
        Ok(self.forward_with_stats(x)?.output)
    }

    /// The forward pass through `&self`, for when it changes no state: eval mode, or no running
    /// statistics (`track_running_stats = false`). In training mode with tracked statistics it
    /// is an `Err`: that forward updates them, so call [`BatchNorm::forward`].
    pub fn forward_eval<T: Element>(&self, x: &Tensor<T>) -> Result<NormOutput<T>> {
        self.check_dim(x.rank())?;
        if self.state.training && self.state.running.is_some() {
            return Err(Error::InvalidArgument(format!(
                "{}: forward_eval cannot update the running statistics of a training-mode \
                 module; call eval() first, or forward() (which takes &mut self)",
                self.state.name
            )));
        }
        // Nothing below changes state: eval mode reads the running statistics only.
        self.clone().forward_with_stats(x)
    }

    /// Gradients of the forward pass that produced `stats` from `x`, given `dy`.
    pub fn backward<T: Element>(
        &self,
        dy: &Tensor<T>,
        x: &Tensor<T>,
        stats: &SavedStats,
    ) -> Result<Gradients<T>> {
        self.check_dim(x.rank())?;
        self.check_channels(x)?;
        batch_norm_backward(dy, x, self.state.w(), stats)
    }
}

module_via_state!(D; BatchNorm<D>);
