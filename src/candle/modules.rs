//! Drop-in replacements for `candle_nn::{layer_norm, rms_norm, group_norm, batch_norm}`: the
//! same constructor arguments, the same `VarBuilder` tensor names (`weight`, `bias`,
//! `running_mean`, `running_var`) and defaults, `candle_core::Module` (`ModuleT` for the layers
//! with a training mode) — and a backward. Plus an InstanceNorm, which candle-nn lacks, with
//! PyTorch's names and defaults.

use candle_core::{Module, ModuleT, Result, Tensor, Var};
use candle_nn::{BatchNormConfig, Init, LayerNormConfig, VarBuilder};

use super::{batch_norm_op, group_norm_op, instance_norm_op, layer_norm_op, rms_norm_op};

/// LayerNorm over the last dimension, as `candle_nn::LayerNorm` (and RMSNorm when the config
/// says `remove_mean: false`).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Option<Tensor>,
    remove_mean: bool,
    eps: f64,
}

impl LayerNorm {
    /// From tensors, like `candle_nn::LayerNorm::new`.
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        LayerNorm {
            weight,
            bias: Some(bias),
            remove_mean: true,
            eps,
        }
    }

    /// The weight (`gamma`).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias (`beta`), when the module has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.remove_mean {
            layer_norm_op(x, &self.weight, self.bias.as_ref(), self.eps)
        } else {
            // RMSNorm with an optional bias, as candle_nn's LayerNorm allows.
            let y = rms_norm_op(x, &self.weight, self.eps)?;
            match &self.bias {
                Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
                None => Ok(y),
            }
        }
    }
}

/// `candle_nn::layer_norm`'s signature: `size` features, a config (or just `eps`), weight
/// `weight` (ones) and, when `config.affine`, bias `bias` (zeros) from `vb`.
pub fn layer_norm<C: Into<LayerNormConfig>>(
    size: usize,
    config: C,
    vb: VarBuilder,
) -> Result<LayerNorm> {
    let config = config.into();
    let weight = vb.get_with_hints(size, "weight", Init::Const(1.))?;
    let bias = if config.affine {
        Some(vb.get_with_hints(size, "bias", Init::Const(0.))?)
    } else {
        None
    };
    Ok(LayerNorm {
        weight,
        bias,
        remove_mean: config.remove_mean,
        eps: config.eps,
    })
}

/// RMSNorm over the last dimension, as `candle_nn::RmsNorm`.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// From the weight, like `candle_nn::RmsNorm::new`.
    pub fn new(weight: Tensor, eps: f64) -> Self {
        RmsNorm { weight, eps }
    }

    /// The weight.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm_op(x, &self.weight, self.eps)
    }
}

/// `candle_nn::rms_norm`'s signature: weight `weight` (ones) from `vb`.
pub fn rms_norm(size: usize, eps: f64, vb: VarBuilder) -> Result<RmsNorm> {
    let weight = vb.get_with_hints(size, "weight", Init::Const(1.))?;
    Ok(RmsNorm { weight, eps })
}

/// GroupNorm of `(N, C, *)` inputs, as `candle_nn::GroupNorm`.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    num_groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// From tensors, like `candle_nn::GroupNorm::new`; an error unless `num_groups` divides
    /// `num_channels`.
    pub fn new(
        weight: Tensor,
        bias: Tensor,
        num_channels: usize,
        num_groups: usize,
        eps: f64,
    ) -> Result<Self> {
        if num_groups == 0 || !num_channels.is_multiple_of(num_groups) {
            candle_core::bail!(
                "GroupNorm: num_groups ({num_groups}) must divide num_channels ({num_channels})"
            )
        }
        Ok(GroupNorm {
            weight,
            bias,
            num_groups,
            eps,
        })
    }

    /// The per-channel weight.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The per-channel bias.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        group_norm_op(x, self.num_groups, &self.weight, Some(&self.bias), self.eps)
    }
}

/// `candle_nn::group_norm`'s signature: `weight` (ones) and `bias` (zeros) of `num_channels`
/// from `vb`.
pub fn group_norm(
    num_groups: usize,
    num_channels: usize,
    eps: f64,
    vb: VarBuilder,
) -> Result<GroupNorm> {
    let weight = vb.get_with_hints(num_channels, "weight", Init::Const(1.))?;
    let bias = vb.get_with_hints(num_channels, "bias", Init::Const(0.))?;
    GroupNorm::new(weight, bias, num_channels, num_groups, eps)
}

/// BatchNorm over dimension 1 of `(N, C, *)` inputs, as `candle_nn::BatchNorm`: in training mode
/// (`forward_t(x, true)`) with the batch's statistics, updating `running_mean`/`running_var` in
/// place (PyTorch's update: `momentum`, unbiased variance); in eval mode with them.
#[derive(Clone, Debug)]
pub struct BatchNorm {
    running_mean: Var,
    running_var: Var,
    weight_and_bias: Option<(Tensor, Tensor)>,
    eps: f64,
    momentum: f64,
}

/// `weight` (ones) and `bias` (zeros) of `n` channels from `vb` when `affine`.
fn affine_params(vb: &VarBuilder, n: usize, affine: bool) -> Result<Option<(Tensor, Tensor)>> {
    if !affine {
        return Ok(None);
    }
    Ok(Some((
        vb.get_with_hints(n, "weight", Init::Const(1.))?,
        vb.get_with_hints(n, "bias", Init::Const(0.))?,
    )))
}

/// candle-nn's checks (and messages) of eps and momentum, for layer `name`.
fn check_eps_momentum(name: &str, eps: f64, momentum: f64) -> Result<()> {
    if eps.is_nan() || eps < 0. {
        candle_core::bail!("{name} eps cannot be negative {eps}")
    }
    if !(0.0..=1.0).contains(&momentum) {
        candle_core::bail!("{name} momentum must be between 0 and 1, is {momentum}")
    }
    Ok(())
}

impl BatchNorm {
    fn checked(self, num_features: usize) -> Result<Self> {
        check_eps_momentum("batch-norm", self.eps, self.momentum)?;
        let mut named = vec![
            ("running mean", self.running_mean.as_tensor()),
            ("running variance", self.running_var.as_tensor()),
        ];
        if let Some((w, b)) = &self.weight_and_bias {
            named.extend([("weight", w), ("bias", b)]);
        }
        for (name, t) in named {
            if t.dims() != [num_features] {
                candle_core::bail!(
                    "batch-norm {name} has unexpected shape {:?} should have shape \
                     [{num_features}]",
                    t.shape()
                )
            }
        }
        Ok(self)
    }

    /// From tensors, like `candle_nn::BatchNorm::new` (momentum 0.1).
    pub fn new(
        num_features: usize,
        running_mean: Tensor,
        running_var: Tensor,
        weight: Tensor,
        bias: Tensor,
        eps: f64,
    ) -> Result<Self> {
        Self::new_with_momentum(
            num_features,
            running_mean,
            running_var,
            weight,
            bias,
            eps,
            0.1,
        )
    }

    /// Without weight and bias, like `candle_nn::BatchNorm::new_no_bias`.
    pub fn new_no_bias(
        num_features: usize,
        running_mean: Tensor,
        running_var: Tensor,
        eps: f64,
    ) -> Result<Self> {
        Self::new_no_bias_with_momentum(num_features, running_mean, running_var, eps, 0.1)
    }

    /// Like `candle_nn::BatchNorm::new_with_momentum`.
    pub fn new_with_momentum(
        num_features: usize,
        running_mean: Tensor,
        running_var: Tensor,
        weight: Tensor,
        bias: Tensor,
        eps: f64,
        momentum: f64,
    ) -> Result<Self> {
        let stats = (running_mean, running_var);
        Self::from_parts(num_features, stats, Some((weight, bias)), eps, momentum)
    }

    /// Like `candle_nn::BatchNorm::new_no_bias_with_momentum`.
    pub fn new_no_bias_with_momentum(
        num_features: usize,
        running_mean: Tensor,
        running_var: Tensor,
        eps: f64,
        momentum: f64,
    ) -> Result<Self> {
        Self::from_parts(
            num_features,
            (running_mean, running_var),
            None,
            eps,
            momentum,
        )
    }

    /// The running statistics become `Var`s (shared with the `VarMap` they came from, if any),
    /// then every shape and option is checked.
    fn from_parts(
        num_features: usize,
        (mean, var): (Tensor, Tensor),
        weight_and_bias: Option<(Tensor, Tensor)>,
        eps: f64,
        momentum: f64,
    ) -> Result<Self> {
        BatchNorm {
            running_mean: Var::from_tensor(&mean)?,
            running_var: Var::from_tensor(&var)?,
            weight_and_bias,
            eps,
            momentum,
        }
        .checked(num_features)
    }

    /// The running mean (updated by each training forward).
    pub fn running_mean(&self) -> &Tensor {
        self.running_mean.as_tensor()
    }

    /// The running (unbiased) variance.
    pub fn running_var(&self) -> &Tensor {
        self.running_var.as_tensor()
    }

    /// `eps`.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// The momentum of the running statistics.
    pub fn momentum(&self) -> f64 {
        self.momentum
    }

    /// `(weight, bias)` when the layer is affine.
    pub fn weight_and_bias(&self) -> Option<(&Tensor, &Tensor)> {
        self.weight_and_bias.as_ref().map(|(w, b)| (w, b))
    }

    /// Training mode: the batch's statistics, running statistics updated.
    pub fn forward_train(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, true)
    }
}

impl ModuleT for BatchNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (w, b) = match &self.weight_and_bias {
            Some((w, b)) => (Some(w), Some(b)),
            None => (None, None),
        };
        batch_norm_op(
            x,
            Some((&self.running_mean, &self.running_var)),
            w,
            b,
            train,
            self.momentum,
            self.eps,
        )
    }
}

/// `candle_nn::batch_norm`'s signature: `running_mean` (zeros), `running_var` (ones) and, when
/// `config.affine`, `weight` (ones) and `bias` (zeros) of `num_features` from `vb`. A config with
/// `remove_mean: false` (candle-nn's variant that does not subtract the mean) is an error.
pub fn batch_norm<C: Into<BatchNormConfig>>(
    num_features: usize,
    config: C,
    vb: VarBuilder,
) -> Result<BatchNorm> {
    let config = config.into();
    if !config.remove_mean {
        candle_core::bail!(
            "cunorm BatchNorm always subtracts the mean (PyTorch's BatchNorm); for \
             remove_mean: false use candle_nn::batch_norm"
        )
    }
    let running_mean = vb.get_with_hints(num_features, "running_mean", Init::Const(0.))?;
    let running_var = vb.get_with_hints(num_features, "running_var", Init::Const(1.))?;
    let weight_and_bias = affine_params(&vb, num_features, config.affine)?;
    BatchNorm::from_parts(
        num_features,
        (running_mean, running_var),
        weight_and_bias,
        config.eps,
        config.momentum,
    )
}

/// InstanceNorm's options, with PyTorch's defaults (`torch.nn.InstanceNorm2d`): eps 1e-5,
/// momentum 0.1, no affine parameters, no running statistics.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct InstanceNormConfig {
    /// Added to the variance.
    pub eps: f64,
    /// The momentum of the running statistics.
    pub momentum: f64,
    /// Learnable per-channel `weight` (ones) and `bias` (zeros).
    pub affine: bool,
    /// Keep `running_mean`/`running_var` (updated in training mode, used in eval mode).
    pub track_running_stats: bool,
}

impl Default for InstanceNormConfig {
    fn default() -> Self {
        InstanceNormConfig {
            eps: 1e-5,
            momentum: 0.1,
            affine: false,
            track_running_stats: false,
        }
    }
}

impl From<f64> for InstanceNormConfig {
    fn from(eps: f64) -> Self {
        InstanceNormConfig {
            eps,
            ..Default::default()
        }
    }
}

/// InstanceNorm of `(N, C, *)` inputs (candle-nn has none): each (sample, channel) normalized
/// with its own mean and biased variance, as `torch.nn.InstanceNorm{1,2,3}d` on batched inputs.
/// `ModuleT`: training mode uses the input's statistics (updating the running ones when
/// tracked); eval mode uses the running statistics when tracked, else the input's.
#[derive(Clone, Debug)]
pub struct InstanceNorm {
    running: Option<(Var, Var)>,
    weight_and_bias: Option<(Tensor, Tensor)>,
    config: InstanceNormConfig,
}

impl InstanceNorm {
    /// The running `(mean, var)` when tracked.
    pub fn running_stats(&self) -> Option<(&Tensor, &Tensor)> {
        self.running
            .as_ref()
            .map(|(m, v)| (m.as_tensor(), v.as_tensor()))
    }

    /// `(weight, bias)` when affine.
    pub fn weight_and_bias(&self) -> Option<(&Tensor, &Tensor)> {
        self.weight_and_bias.as_ref().map(|(w, b)| (w, b))
    }

    /// The options.
    pub fn config(&self) -> InstanceNormConfig {
        self.config
    }
}

impl ModuleT for InstanceNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (w, b) = match &self.weight_and_bias {
            Some((w, b)) => (Some(w), Some(b)),
            None => (None, None),
        };
        let running = self.running.as_ref().map(|(m, v)| (m, v));
        instance_norm_op(
            x,
            running,
            w,
            b,
            train || running.is_none(),
            self.config.momentum,
            self.config.eps,
        )
    }
}

/// An InstanceNorm of `num_features` channels from `vb`, with PyTorch's tensor names: `weight`
/// (ones) and `bias` (zeros) when `config.affine`, `running_mean` (zeros) and `running_var`
/// (ones) when `config.track_running_stats`.
pub fn instance_norm<C: Into<InstanceNormConfig>>(
    num_features: usize,
    config: C,
    vb: VarBuilder,
) -> Result<InstanceNorm> {
    let config = config.into();
    check_eps_momentum("instance-norm", config.eps, config.momentum)?;
    let weight_and_bias = affine_params(&vb, num_features, config.affine)?;
    let running = if config.track_running_stats {
        let m = vb.get_with_hints(num_features, "running_mean", Init::Const(0.))?;
        let v = vb.get_with_hints(num_features, "running_var", Init::Const(1.))?;
        Some((Var::from_tensor(&m)?, Var::from_tensor(&v)?))
    } else {
        None
    };
    Ok(InstanceNorm {
        running,
        weight_and_bias,
        config,
    })
}
