//! Stateful PyTorch-style modules: parameters, running statistics, train/eval mode.
//!
//! Two traits, so that generic training code can hold any layer as a trait object:
//! - [`Module`]: what does not depend on the input's dtype — mode (`train(mode)`, `eval()`),
//!   named parameters (read and in place), `state_dict()` / `load_state_dict()` with PyTorch's
//!   keys, `reset_parameters()`, `reset_running_stats()`, moving to a device;
//! - [`Norm<T>`]: forward and backward for inputs of element type `T` (every layer implements it
//!   for `f32`, `f16` and `bf16`), so `Vec<Box<dyn Norm<f32>>>` holds any mix of layers.
//!
//! Every module keeps its parameters and running statistics as f32 tensors on one device
//! (CPU at construction; move them with [`Module::to_device`]).
//!
//! ```
//! use cunorm::{BatchNorm2d, GroupNorm, LayerNorm, Module, Norm, Tensor};
//!
//! # fn main() -> cunorm::Result<()> {
//! let mut layers: Vec<Box<dyn Norm<f32>>> = vec![
//!     Box::new(BatchNorm2d::new(4)?),
//!     Box::new(GroupNorm::new(2, 4)?),
//!     Box::new(LayerNorm::new(&[4, 3, 3])?),
//! ];
//! let x = Tensor::<f32>::randn(&[2, 4, 3, 3], 7)?;
//! for layer in &mut layers {
//!     let out = layer.forward_t(&x)?;
//!     let dy = Tensor::<f32>::randn(x.shape(), 8)?;
//!     let grads = layer.backward(&dy, &x, &out.stats)?;
//!     // SGD on every parameter, in place, without knowing the layer's type.
//!     let named = grads.named();
//!     for (name, p) in layer.parameters_mut() {
//!         let g = named.iter().find(|(n, _)| *n == name).expect("a gradient per parameter").1;
//!         let g = g.as_slice().expect("on the CPU");
//!         for (w, dw) in p.as_mut_slice().expect("on the CPU").iter_mut().zip(g) {
//!             *w -= 0.1 * dw;
//!         }
//!     }
//! }
//! assert_eq!(layers[0].state_dict().len(), 5); // weight, bias, running_mean, running_var, num_batches_tracked
//! # Ok(())
//! # }
//! ```

mod batch_norm;
mod group_norm;
mod instance_norm;
mod layer_norm;
mod rms_norm;

pub use batch_norm::{BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d};
pub use group_norm::{GroupNorm, GroupNormConfig};
pub use instance_norm::{InstanceNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d};
pub use layer_norm::{LayerNorm, LayerNormConfig};
pub use rms_norm::{RMSNorm, RMSNormConfig};

use std::collections::BTreeMap;

use crate::device::Device;
use crate::dtype::Element;
use crate::error::{fmt_shape, Error, Result};
use crate::ops::{Gradients, NormOutput, Param, SavedStats};
use crate::tensor::Tensor;

/// Arguments of BatchNorm and InstanceNorm (the same names; PyTorch's defaults differ, so each
/// has its own `new`): use the aliases [`BatchNormConfig`] and [`InstanceNormConfig`].
#[derive(Clone, Debug, PartialEq)]
pub struct PerChannelConfig<K> {
    /// `C`, the channel count.
    pub num_features: usize,
    /// Added to the variance (default 1e-5).
    pub eps: f64,
    /// Running-statistics momentum (default `Some(0.1)`). `None`: BatchNorm keeps a cumulative
    /// average; InstanceNorm leaves the running statistics unchanged.
    pub momentum: Option<f64>,
    /// Learnable per-channel weight and bias (BatchNorm default true, InstanceNorm **false**).
    pub affine: bool,
    /// Keep running statistics (BatchNorm default true, InstanceNorm **false**).
    pub track_running_stats: bool,
    kind: std::marker::PhantomData<K>,
}

/// Marks a [`PerChannelConfig`] as BatchNorm's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchKind;
/// Marks a [`PerChannelConfig`] as InstanceNorm's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct InstanceKind;

/// Arguments of `BatchNorm{1,2,3}d`, with PyTorch's defaults.
pub type BatchNormConfig = PerChannelConfig<BatchKind>;
/// Arguments of `InstanceNorm{1,2,3}d`, with PyTorch's defaults.
pub type InstanceNormConfig = PerChannelConfig<InstanceKind>;

impl PerChannelConfig<BatchKind> {
    /// PyTorch's BatchNorm defaults for `num_features` channels: eps 1e-5, momentum 0.1,
    /// affine, tracking running statistics.
    pub fn new(num_features: usize) -> Self {
        Self::with_defaults(num_features, true)
    }
}

impl PerChannelConfig<InstanceKind> {
    /// PyTorch's InstanceNorm defaults for `num_features` channels: eps 1e-5, momentum 0.1, no
    /// affine, no running statistics.
    pub fn new(num_features: usize) -> Self {
        Self::with_defaults(num_features, false)
    }
}

impl<K> PerChannelConfig<K> {
    fn with_defaults(num_features: usize, on: bool) -> Self {
        PerChannelConfig {
            num_features,
            eps: 1e-5,
            momentum: Some(0.1),
            affine: on,
            track_running_stats: on,
            kind: std::marker::PhantomData,
        }
    }
    /// Sets `eps`.
    pub fn with_eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }
    /// Sets `momentum` (`None`: see the field).
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

/// One entry of a [`StateDict`]: a float tensor, or `num_batches_tracked` (a long tensor in
/// PyTorch).
#[derive(Clone, Debug)]
pub enum StateEntry {
    /// `weight`, `bias`, `running_mean`, `running_var`.
    Tensor(Tensor<f32>),
    /// `num_batches_tracked`.
    Count(i64),
}

/// A module's state by PyTorch's keys: `weight`, `bias`, `running_mean`, `running_var`,
/// `num_batches_tracked` (those the module has).
pub type StateDict = BTreeMap<String, StateEntry>;

/// What every normalization module has whatever the input's element type (object safe).
///
/// ```
/// use cunorm::{BatchNorm1d, Module, StateEntry, Tensor};
/// # fn main() -> cunorm::Result<()> {
/// let mut bn = BatchNorm1d::new(3)?;
/// bn.forward(&Tensor::<f32>::randn(&[8, 3], 0)?)?;      // one training step
/// let saved = bn.state_dict();                            // PyTorch's keys
/// assert!(matches!(saved["num_batches_tracked"], StateEntry::Count(1)));
///
/// let mut restored = BatchNorm1d::new(3)?;
/// restored.load_state_dict(&saved)?;                     // strict: same keys and shapes
/// assert_eq!(restored.num_batches_tracked(), Some(1));
///
/// restored.reset_running_stats()?;                       // mean 0, var 1, counter 0
/// assert_eq!(restored.num_batches_tracked(), Some(0));
/// restored.train(false);                                 // PyTorch's module.train(mode)
/// assert!(!restored.is_training());
/// # Ok(())
/// # }
/// ```
pub trait Module {
    /// The module's PyTorch name: `BatchNorm2d`, `LayerNorm`, `RMSNorm`, ...
    fn name(&self) -> String;

    /// Training mode on (`true`) or off, like PyTorch's `module.train(mode)`.
    fn train(&mut self, mode: bool);

    /// Evaluation mode (`train(false)`).
    fn eval(&mut self) {
        self.train(false);
    }

    /// Whether the module is in training mode.
    fn is_training(&self) -> bool;

    /// The learnable parameters by name (`weight`, `bias`), like `named_parameters()`.
    fn parameters(&self) -> Vec<(&'static str, &Tensor<f32>)>;

    /// The learnable parameters by name, for in-place updates (see
    /// [`Tensor::as_mut_slice`]). Same names and order as [`Module::parameters`] and
    /// [`Gradients::named`].
    fn parameters_mut(&mut self) -> Vec<(&'static str, &mut Tensor<f32>)>;

    /// Parameters and running statistics by PyTorch's keys (copies).
    fn state_dict(&self) -> StateDict;

    /// Loads a state dict with exactly this module's keys and shapes (like PyTorch's
    /// `strict=True`); tensors are moved to the module's device. On an `Err` nothing changes.
    fn load_state_dict(&mut self, state: &StateDict) -> Result<()>;

    /// Running mean 0, running variance 1, `num_batches_tracked` 0 (when tracked). An `Err`
    /// only when a device copy fails.
    fn reset_running_stats(&mut self) -> Result<()>;

    /// Weight 1 and bias 0 (when present), and the running statistics reset.
    fn reset_parameters(&mut self) -> Result<()>;

    /// Moves parameters and running statistics to `device`.
    fn to_device(&mut self, device: &Device) -> Result<()>;
}

/// Forward and backward for inputs of element type `T` (object safe: `Box<dyn Norm<f32>>`).
///
/// The layers' inherent methods take `&self` where no state changes (`LayerNorm::forward`,
/// `BatchNorm::forward_eval`, ...); this trait's forward takes `&mut self` because a training
/// forward of BatchNorm/InstanceNorm updates running statistics.
pub trait Norm<T: Element>: Module {
    /// The forward pass; in training mode it may update running statistics. Returns the output
    /// and the statistics the backward pass needs.
    fn forward_t(&mut self, x: &Tensor<T>) -> Result<NormOutput<T>>;

    /// Gradients of the forward pass that produced `stats` from `x`, given `dy`.
    fn backward(&self, dy: &Tensor<T>, x: &Tensor<T>, stats: &SavedStats) -> Result<Gradients<T>>;
}

/// `num_batches_tracked` is a step count: `Err` when negative.
fn check_count(layer: &str, n: i64) -> Result<()> {
    if n < 0 {
        return Err(Error::InvalidArgument(format!(
            "{layer}: num_batches_tracked counts steps and cannot be negative, got {n}; use 0 \
             for a fresh start"
        )));
    }
    Ok(())
}

/// Parameters and running statistics of a norm layer: the state all five share.
#[derive(Clone, Debug)]
pub(crate) struct State {
    /// The layer's PyTorch name, for messages.
    pub name: String,
    pub weight: Option<Tensor<f32>>,
    pub bias: Option<Tensor<f32>>,
    pub running: Option<RunningStats>,
    pub training: bool,
}

#[derive(Clone, Debug)]
pub(crate) struct RunningStats {
    pub mean: Tensor<f32>,
    pub var: Tensor<f32>,
    pub num_batches_tracked: i64,
}

impl State {
    /// Weight 1 and bias 0 of `shape` when asked for, running statistics of `[∏shape]` when
    /// tracked, training mode. An `Err` (never an abort) when the memory cannot be had.
    pub fn new(
        name: String,
        shape: &[usize],
        weight: bool,
        bias: bool,
        track: bool,
    ) -> Result<Self> {
        let fill = |on: bool, shape: &[usize], v: f32| -> Result<Option<Tensor<f32>>> {
            on.then(|| Tensor::full(shape, v)).transpose().map_err(|e| {
                Error::InvalidArgument(format!("{name}: cannot allocate its parameters: {e}"))
            })
        };
        let c = crate::tensor::checked_numel(shape)?;
        let running = match (fill(track, &[c], 0.0)?, fill(track, &[c], 1.0)?) {
            (Some(mean), Some(var)) => Some(RunningStats {
                mean,
                var,
                num_batches_tracked: 0,
            }),
            _ => None,
        };
        Ok(State {
            weight: fill(weight, shape, 1.0)?,
            bias: fill(bias, shape, 0.0)?,
            running,
            training: true,
            name,
        })
    }

    /// The state of BatchNorm/InstanceNorm: `eps` and `momentum` checked, per-channel weight
    /// and bias when `affine`, running statistics when `track`.
    pub fn per_channel(
        name: String,
        c: usize,
        eps: f64,
        momentum: Option<f64>,
        affine: bool,
        track: bool,
    ) -> Result<Self> {
        crate::ops::check_eps(&name, eps)?;
        if let Some(m) = momentum {
            crate::ops::check_momentum(&name, m)?;
        }
        State::new(name, &[c], affine, affine, track)
    }

    pub fn running_mean(&self) -> Option<&Tensor<f32>> {
        self.running.as_ref().map(|r| &r.mean)
    }

    pub fn running_var(&self) -> Option<&Tensor<f32>> {
        self.running.as_ref().map(|r| &r.var)
    }

    /// `(weight, bias, running_mean, running_var)` for an op to read, the running statistics
    /// to update.
    #[allow(clippy::type_complexity)]
    pub fn op_args(
        &mut self,
    ) -> (
        Option<&dyn Param>,
        Option<&dyn Param>,
        Option<&mut Tensor<f32>>,
        Option<&mut Tensor<f32>>,
    ) {
        let (rm, rv) = match &mut self.running {
            Some(r) => (Some(&mut r.mean), Some(&mut r.var)),
            None => (None, None),
        };
        let w = self.weight.as_ref().map(|t| t as &dyn Param);
        let b = self.bias.as_ref().map(|t| t as &dyn Param);
        (w, b, rm, rv)
    }

    /// The weight as an op argument.
    pub fn w(&self) -> Option<&dyn Param> {
        self.weight.as_ref().map(|t| t as &dyn Param)
    }

    /// The bias as an op argument.
    pub fn b(&self) -> Option<&dyn Param> {
        self.bias.as_ref().map(|t| t as &dyn Param)
    }

    /// Replaces `name` with `value` after checking its shape (moved to the slot's device).
    pub fn set(&mut self, name: &str, value: Tensor<f32>) -> Result<()> {
        let layer = self.name.clone();
        let slot = match name {
            "weight" => self.weight.as_mut(),
            "bias" => self.bias.as_mut(),
            "running_mean" => self.running.as_mut().map(|r| &mut r.mean),
            "running_var" => self.running.as_mut().map(|r| &mut r.var),
            _ => None,
        };
        let Some(cur) = slot else {
            return Err(Error::InvalidArgument(format!(
                "{layer}: this module has no {name} (it was built without it)"
            )));
        };
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

    /// Sets `num_batches_tracked`, which exists only when running statistics are tracked; an
    /// `Err` for a negative count (a step count; with `momentum = None` the next step would
    /// average with a weight of 1/0).
    pub fn set_num_batches_tracked(&mut self, n: i64) -> Result<()> {
        check_count(&self.name, n)?;
        match &mut self.running {
            Some(r) => {
                r.num_batches_tracked = n;
                Ok(())
            }
            None => Err(Error::InvalidArgument(format!(
                "{}: num_batches_tracked exists only with track_running_stats=true",
                self.name
            ))),
        }
    }

    /// `Err` unless input `x` (rank ≥ 2) has `c` channels in dimension `dim`: the module was
    /// built for `c` (`num_features` / `num_channels`), not for whatever the input brings.
    pub fn check_channels<T: Element>(&self, x: &Tensor<T>, dim: usize, c: usize) -> Result<()> {
        match x.shape().get(dim) {
            Some(&got) if got != c => Err(Error::Shape(format!(
                "{}: expected input's size at dim={dim} to match num_features ({c}), but got: \
                 {got}. (input of size {}: the module was built for {c} channels; build it for \
                 {got} or fix the input)",
                self.name,
                fmt_shape(x.shape())
            ))),
            _ => Ok(()),
        }
    }

    fn tensors_mut(&mut self) -> Vec<(&'static str, &mut Tensor<f32>)> {
        let mut out: Vec<(&'static str, &mut Tensor<f32>)> = Vec::new();
        out.extend(self.weight.as_mut().map(|t| ("weight", t)));
        out.extend(self.bias.as_mut().map(|t| ("bias", t)));
        if let Some(r) = &mut self.running {
            out.push(("running_mean", &mut r.mean));
            out.push(("running_var", &mut r.var));
        }
        out
    }
}

impl Module for State {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn train(&mut self, mode: bool) {
        self.training = mode;
    }

    fn is_training(&self) -> bool {
        self.training
    }

    fn parameters(&self) -> Vec<(&'static str, &Tensor<f32>)> {
        let mut out = Vec::new();
        out.extend(self.weight.as_ref().map(|t| ("weight", t)));
        out.extend(self.bias.as_ref().map(|t| ("bias", t)));
        out
    }

    fn parameters_mut(&mut self) -> Vec<(&'static str, &mut Tensor<f32>)> {
        let mut out = Vec::new();
        out.extend(self.weight.as_mut().map(|t| ("weight", t)));
        out.extend(self.bias.as_mut().map(|t| ("bias", t)));
        out
    }

    fn state_dict(&self) -> StateDict {
        let mut sd: StateDict = self
            .parameters()
            .into_iter()
            .map(|(k, t)| (k.to_string(), StateEntry::Tensor(t.clone())))
            .collect();
        if let Some(r) = &self.running {
            sd.insert("running_mean".into(), StateEntry::Tensor(r.mean.clone()));
            sd.insert("running_var".into(), StateEntry::Tensor(r.var.clone()));
            sd.insert(
                "num_batches_tracked".into(),
                StateEntry::Count(r.num_batches_tracked),
            );
        }
        sd
    }

    fn load_state_dict(&mut self, state: &StateDict) -> Result<()> {
        let layer = self.name.clone();
        let have = self.state_dict();
        let missing: Vec<&String> = have.keys().filter(|k| !state.contains_key(*k)).collect();
        let unexpected: Vec<&String> = state.keys().filter(|k| !have.contains_key(*k)).collect();
        if !missing.is_empty() || !unexpected.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "{layer}: error loading state_dict: missing keys {missing:?}, unexpected keys \
                 {unexpected:?}; pass the state_dict of a {layer} built with the same config"
            )));
        }
        // Check everything first, convert (which may fail on a device copy), then assign.
        let mut tensors = Vec::new();
        let mut count = None;
        for (key, entry) in state {
            match (entry, &have[key]) {
                (StateEntry::Tensor(t), StateEntry::Tensor(cur)) => {
                    if t.shape() != cur.shape() {
                        return Err(Error::Shape(format!(
                            "{layer}: size mismatch for {key}: copying a param with shape {} \
                             from the state_dict, the shape in this module is {}",
                            fmt_shape(t.shape()),
                            fmt_shape(cur.shape())
                        )));
                    }
                    tensors.push((key.as_str(), t.to_device(&cur.device())?));
                }
                (StateEntry::Count(n), StateEntry::Count(_)) => {
                    check_count(&layer, *n)?;
                    count = Some(*n)
                }
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "{layer}: state_dict entry {key} has the wrong kind (num_batches_tracked \
                         is a count, the others tensors)"
                    )))
                }
            }
        }
        for (key, t) in tensors {
            for (name, slot) in self.tensors_mut() {
                if name == key {
                    *slot = t;
                    break;
                }
            }
        }
        if let (Some(n), Some(r)) = (count, &mut self.running) {
            r.num_batches_tracked = n;
        }
        Ok(())
    }

    fn reset_running_stats(&mut self) -> Result<()> {
        // Both replacements are made before either is assigned: an Err changes nothing.
        if let Some(r) = &mut self.running {
            let (mean, var) = (r.mean.filled(0.0)?, r.var.filled(1.0)?);
            (r.mean, r.var, r.num_batches_tracked) = (mean, var, 0);
        }
        Ok(())
    }

    fn reset_parameters(&mut self) -> Result<()> {
        let w = self.weight.as_ref().map(|w| w.filled(1.0)).transpose()?;
        let b = self.bias.as_ref().map(|b| b.filled(0.0)).transpose()?;
        self.reset_running_stats()?;
        (self.weight, self.bias) = (w, b);
        Ok(())
    }

    fn to_device(&mut self, device: &Device) -> Result<()> {
        // Copy everything first so that a failed copy leaves the module as it was.
        let moved = self
            .tensors_mut()
            .into_iter()
            .map(|(_, t)| t.to_device(device))
            .collect::<Result<Vec<_>>>()?;
        for ((_, slot), t) in self.tensors_mut().into_iter().zip(moved) {
            *slot = t;
        }
        Ok(())
    }
}

/// Implements [`Module`] for a layer by delegating to its `state` field, and [`Norm<T>`] for
/// every element type by delegating to the layer's inherent `forward_with_stats` / `backward_impl`.
macro_rules! module_via_state {
    ($($generics:ident)? ; $ty:ty) => {
        impl<$(const $generics: usize)?> $crate::layers::Module for $ty {
            fn name(&self) -> String {
                self.state.name()
            }
            fn train(&mut self, mode: bool) {
                self.state.train(mode)
            }
            fn is_training(&self) -> bool {
                self.state.is_training()
            }
            fn parameters(&self) -> Vec<(&'static str, &Tensor<f32>)> {
                self.state.parameters()
            }
            fn parameters_mut(&mut self) -> Vec<(&'static str, &mut Tensor<f32>)> {
                self.state.parameters_mut()
            }
            fn state_dict(&self) -> $crate::layers::StateDict {
                self.state.state_dict()
            }
            fn load_state_dict(&mut self, state: &$crate::layers::StateDict) -> Result<()> {
                self.state.load_state_dict(state)
            }
            fn reset_running_stats(&mut self) -> Result<()> {
                self.state.reset_running_stats()
            }
            fn reset_parameters(&mut self) -> Result<()> {
                self.state.reset_parameters()
            }
            fn to_device(&mut self, device: &Device) -> Result<()> {
                self.state.to_device(device)
            }
        }

        impl<T: Element, $(const $generics: usize)?> $crate::layers::Norm<T> for $ty {
            fn forward_t(&mut self, x: &Tensor<T>) -> Result<NormOutput<T>> {
                self.forward_with_stats(x)
            }
            fn backward(
                &self,
                dy: &Tensor<T>,
                x: &Tensor<T>,
                stats: &SavedStats,
            ) -> Result<Gradients<T>> {
                self.backward(dy, x, stats)
            }
        }
    };
}
pub(crate) use module_via_state;

/// The accessors every layer has over its [`State`].
macro_rules! state_accessors {
    () => {
        /// The weight (`None` when the module was built without it).
        pub fn weight(&self) -> Option<&Tensor<f32>> {
            self.state.weight.as_ref()
        }
        /// The bias (`None` when the module was built without it).
        pub fn bias(&self) -> Option<&Tensor<f32>> {
            self.state.bias.as_ref()
        }
        /// The weight, for in-place updates (`weight_mut()?.as_mut_slice()` on the CPU).
        pub fn weight_mut(&mut self) -> Option<&mut Tensor<f32>> {
            self.state.weight.as_mut()
        }
        /// The bias, for in-place updates.
        pub fn bias_mut(&mut self) -> Option<&mut Tensor<f32>> {
            self.state.bias.as_mut()
        }
        /// Replaces the weight (same shape; moved to the module's device).
        pub fn set_weight(&mut self, w: Tensor<f32>) -> Result<()> {
            self.state.set("weight", w)
        }
        /// Replaces the bias (same shape; moved to the module's device).
        pub fn set_bias(&mut self, b: Tensor<f32>) -> Result<()> {
            self.state.set("bias", b)
        }
    };
}
pub(crate) use state_accessors;

/// The running-statistics accessors of BatchNorm and InstanceNorm.
macro_rules! running_accessors {
    () => {
        /// Running mean (`None` unless tracking).
        pub fn running_mean(&self) -> Option<&Tensor<f32>> {
            self.state.running_mean()
        }
        /// Running (unbiased) variance (`None` unless tracking).
        pub fn running_var(&self) -> Option<&Tensor<f32>> {
            self.state.running_var()
        }
        /// Training steps counted so far (`None` unless tracking).
        pub fn num_batches_tracked(&self) -> Option<i64> {
            self.state.running.as_ref().map(|r| r.num_batches_tracked)
        }
        /// Replaces the running mean (shape `[C]`).
        pub fn set_running_mean(&mut self, t: Tensor<f32>) -> Result<()> {
            self.state.set("running_mean", t)
        }
        /// Replaces the running variance (shape `[C]`).
        pub fn set_running_var(&mut self, t: Tensor<f32>) -> Result<()> {
            self.state.set("running_var", t)
        }
        /// Sets the step counter (exists only when tracking).
        pub fn set_num_batches_tracked(&mut self, n: i64) -> Result<()> {
            self.state.set_num_batches_tracked(n)
        }
    };
}
pub(crate) use running_accessors;
