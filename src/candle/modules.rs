//! Drop-in replacements for `candle_nn::{layer_norm, rms_norm, group_norm}`: the same
//! constructor arguments, the same `VarBuilder` tensor names (`weight`, `bias`) and defaults,
//! `candle_core::Module` — and a backward.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, LayerNormConfig, VarBuilder};

use super::{group_norm_op, layer_norm_op, rms_norm_op};

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
