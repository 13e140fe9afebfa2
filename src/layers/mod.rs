//! Stateful PyTorch-style modules: parameters, running statistics, train/eval mode.
//!
//! Every module keeps its parameters and running statistics as f32 tensors on one device
//! (CPU at construction; move them with [`Norm::to_device`]) and accepts f32, f16 and bf16
//! inputs on that device.

mod batch_norm;
mod group_norm;
mod instance_norm;
mod layer_norm;
mod rms_norm;

pub use batch_norm::{BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormConfig};
pub use group_norm::{GroupNorm, GroupNormConfig};
pub use instance_norm::{
    InstanceNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, InstanceNormConfig,
};
pub use layer_norm::{LayerNorm, LayerNormConfig};
pub use rms_norm::{RmsNorm, RmsNormConfig};

use crate::device::Device;
use crate::dtype::Element;
use crate::error::{fmt_shape, Error, Result};
use crate::ops::{Gradients, NormOutput, SavedStats};
use crate::tensor::Tensor;

/// What every normalization module does.
pub trait Norm {
    /// The forward pass; in training mode it may update running statistics. Returns the output
    /// and the statistics the backward pass needs.
    fn forward_with_stats<T: Element>(&mut self, x: &Tensor<T>) -> Result<NormOutput<T>>;

    /// The forward pass, output only.
    fn forward<T: Element>(&mut self, x: &Tensor<T>) -> Result<Tensor<T>> {
        Ok(self.forward_with_stats(x)?.output)
    }

    /// Gradients of the forward pass that produced `stats` from `x`, given `dy`.
    fn backward<T: Element>(
        &self,
        dy: &Tensor<T>,
        x: &Tensor<T>,
        stats: &SavedStats,
    ) -> Result<Gradients<T>>;

    /// Training mode on or off (PyTorch's `module.train(mode)`).
    fn set_training(&mut self, on: bool);

    /// Switches to training mode (the default).
    fn train(&mut self) {
        self.set_training(true);
    }

    /// Switches to evaluation mode.
    fn eval(&mut self) {
        self.set_training(false);
    }

    /// Whether the module is in training mode.
    fn is_training(&self) -> bool;

    /// Moves parameters and running statistics to `device`.
    fn to_device(&mut self, device: &Device) -> Result<()>;
}

pub(crate) fn filled(len: usize, v: f32) -> Tensor<f32> {
    Tensor::full(&[len], v)
}

/// Replaces `slot` with `value` after checking its shape matches.
pub(crate) fn set_checked(
    layer: &str,
    name: &str,
    slot: &mut Option<Tensor<f32>>,
    value: Tensor<f32>,
) -> Result<()> {
    match slot {
        None => Err(Error::InvalidArgument(format!(
            "{layer}: this module has no {name} (it was built without it)"
        ))),
        Some(cur) => {
            if cur.shape() != value.shape() {
                return Err(Error::Shape(format!(
                    "{layer}: {name} must have size {}, got {}",
                    fmt_shape(cur.shape()),
                    fmt_shape(value.shape())
                )));
            }
            *cur = value.to_device(&cur.device())?;
            Ok(())
        }
    }
}

/// Sets a `num_batches_tracked` counter, which exists only when running statistics are tracked.
pub(crate) fn set_counter(layer: &str, slot: &mut Option<i64>, n: i64) -> Result<()> {
    match slot {
        Some(v) => {
            *v = n;
            Ok(())
        }
        None => Err(Error::InvalidArgument(format!(
            "{layer}: num_batches_tracked exists only with track_running_stats=true"
        ))),
    }
}

pub(crate) fn move_opt(t: &mut Option<Tensor<f32>>, device: &Device) -> Result<()> {
    if let Some(v) = t {
        *v = v.to_device(device)?;
    }
    Ok(())
}
