use super::{move_opt, set_checked, Norm};
use crate::device::Device;
use crate::dtype::Element;
use crate::error::Result;
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

/// `torch.nn.LayerNorm`: input `(*, normalized_shape)`.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    config: LayerNormConfig,
    weight: Option<Tensor<f32>>,
    bias: Option<Tensor<f32>>,
    training: bool,
}

impl LayerNorm {
    /// A module with PyTorch's defaults.
    pub fn new(normalized_shape: &[usize]) -> Result<Self> {
        Self::from_config(LayerNormConfig::new(normalized_shape))
    }

    /// A module from a config: weight = 1, bias = 0.
    pub fn from_config(config: LayerNormConfig) -> Result<Self> {
        crate::ops::check_eps("LayerNorm", config.eps)?;
        let shape = config.normalized_shape.clone();
        let affine = config.elementwise_affine;
        Ok(LayerNorm {
            weight: affine.then(|| Tensor::full(&shape, 1.0)),
            bias: (affine && config.bias).then(|| Tensor::full(&shape, 0.0)),
            training: true,
            config,
        })
    }

    /// The config the module was built with.
    pub fn config(&self) -> &LayerNormConfig {
        &self.config
    }
    /// Elementwise weight (`None` unless elementwise_affine).
    pub fn weight(&self) -> Option<&Tensor<f32>> {
        self.weight.as_ref()
    }
    /// Elementwise bias (`None` unless elementwise_affine and bias).
    pub fn bias(&self) -> Option<&Tensor<f32>> {
        self.bias.as_ref()
    }
    /// Replaces the weight (shape `normalized_shape`).
    pub fn set_weight(&mut self, w: Tensor<f32>) -> Result<()> {
        set_checked("LayerNorm", "weight", &mut self.weight, w)
    }
    /// Replaces the bias (shape `normalized_shape`).
    pub fn set_bias(&mut self, b: Tensor<f32>) -> Result<()> {
        set_checked("LayerNorm", "bias", &mut self.bias, b)
    }
}

impl Norm for LayerNorm {
    fn forward_with_stats<T: Element>(&mut self, x: &Tensor<T>) -> Result<NormOutput<T>> {
        layer_norm(
            x,
            &self.config.normalized_shape,
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
        layer_norm_backward(
            dy,
            x,
            &self.config.normalized_shape,
            self.weight.as_ref(),
            self.bias.is_some(),
            stats,
        )
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
