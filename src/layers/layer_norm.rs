use super::{module_via_state, state_accessors, State};
use crate::device::Device;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::ops::{layer_norm, layer_norm_backward, Gradients, NormOutput, SavedStats};
use crate::tensor::Tensor;

/// Arguments of `LayerNorm`, with PyTorch's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerNormConfig {
    /// The trailing dimensions normalized together.
    pub normalized_shape: Vec<usize>,
    /// Added to the variance (default 1e-5).
    pub eps: f64,
    /// Learnable elementwise weight (and bias) of shape `normalized_shape` (default true).
    pub elementwise_affine: bool,
    /// Learnable bias, when `elementwise_affine` (default true).
    pub bias: bool,
}

impl LayerNormConfig {
    /// PyTorch's defaults for `normalized_shape` (an int is `&[n]`).
    pub fn new(normalized_shape: &[usize]) -> Self {
        LayerNormConfig {
            normalized_shape: normalized_shape.to_vec(),
            eps: 1e-5,
            elementwise_affine: true,
            bias: true,
        }
    }
    /// Sets `eps`.
    pub fn with_eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }
    /// Sets `elementwise_affine`.
    pub fn with_elementwise_affine(mut self, affine: bool) -> Self {
        self.elementwise_affine = affine;
        self
    }
    /// Sets `bias`.
    pub fn with_bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }
}

/// `torch.nn.LayerNorm`: input `(*, normalized_shape)`. Holds no running state: every forward
/// takes `&self`.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    config: LayerNormConfig,
    state: State,
}

impl LayerNorm {
    /// A module with PyTorch's defaults.
    pub fn new(normalized_shape: &[usize]) -> Result<Self> {
        Self::from_config(LayerNormConfig::new(normalized_shape))
    }

    /// A module from a config: weight = 1, bias = 0.
    pub fn from_config(config: LayerNormConfig) -> Result<Self> {
        if config.normalized_shape.is_empty() {
            return Err(Error::InvalidArgument(
                "LayerNorm: normalized_shape must have at least one dimension (PyTorch rejects \
                 an empty one); pass the trailing sizes to normalize over, e.g. &[hidden]"
                    .into(),
            ));
        }
        crate::ops::check_eps("LayerNorm", config.eps)?;
        let affine = config.elementwise_affine;
        let state = State::new(
            "LayerNorm".into(),
            &config.normalized_shape,
            affine,
            affine && config.bias,
            false,
        )?;
        Ok(LayerNorm { config, state })
    }

    /// The config the module was built with.
    pub fn config(&self) -> &LayerNormConfig {
        &self.config
    }

    state_accessors!();

    /// The forward pass: output and the statistics for [`LayerNorm::backward`].
    pub fn forward_with_stats<T: Element>(&self, x: &Tensor<T>) -> Result<NormOutput<T>> {
        layer_norm(
            x,
            &self.config.normalized_shape,
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
        layer_norm_backward(
            dy,
            x,
            &self.config.normalized_shape,
            self.state.w(),
            self.state.bias.is_some(),
            stats,
        )
    }
}

module_via_state!(; LayerNorm);
