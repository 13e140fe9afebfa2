use super::{move_opt, set_checked, Norm};
use crate::device::Device;
use crate::dtype::Element;
use crate::error::Result;
use crate::ops::{rms_norm, rms_norm_backward, Gradients, NormOutput, SavedStats};
use crate::tensor::Tensor;

/// Arguments of `RMSNorm`, with PyTorch's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct RmsNormConfig {
    /// The trailing dimensions normalized together.
    pub normalized_shape: Vec<usize>,
    /// Added to `mean(x²)`; `None` (default) means `f32::EPSILON` for every input dtype.
    pub eps: Option<f64>,
    /// Learnable elementwise weight (default true).
    pub elementwise_affine: bool,
}

impl RmsNormConfig {
    /// PyTorch's defaults for `normalized_shape`.
    pub fn new(normalized_shape: &[usize]) -> Self {
        RmsNormConfig {
            normalized_shape: normalized_shape.to_vec(),
            eps: None,
            elementwise_affine: true,
        }
    }
    /// Sets `eps`.
    pub fn with_eps(mut self, eps: Option<f64>) -> Self {
        self.eps = eps;
        self
    }
    /// Sets `elementwise_affine`.
    pub fn with_elementwise_affine(mut self, affine: bool) -> Self {
        self.elementwise_affine = affine;
        self
    }
}

/// `torch.nn.RMSNorm`: input `(*, normalized_shape)`.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    config: RmsNormConfig,
    weight: Option<Tensor<f32>>,
    training: bool,
}

impl RmsNorm {
    /// A module with PyTorch's defaults.
    pub fn new(normalized_shape: &[usize]) -> Result<Self> {
        Self::from_config(RmsNormConfig::new(normalized_shape))
    }

    /// A module from a config: weight = 1.
    pub fn from_config(config: RmsNormConfig) -> Result<Self> {
        if let Some(e) = config.eps {
            crate::ops::check_eps("RMSNorm", e)?;
        }
        Ok(RmsNorm {
            weight: config
                .elementwise_affine
                .then(|| Tensor::full(&config.normalized_shape, 1.0)),
            training: true,
            config,
        })
    }

    /// The config the module was built with.
    pub fn config(&self) -> &RmsNormConfig {
        &self.config
    }
    /// Elementwise weight (`None` unless elementwise_affine).
    pub fn weight(&self) -> Option<&Tensor<f32>> {
        self.weight.as_ref()
    }
    /// Replaces the weight (shape `normalized_shape`).
    pub fn set_weight(&mut self, w: Tensor<f32>) -> Result<()> {
        set_checked("RMSNorm", "weight", &mut self.weight, w)
    }
}

impl Norm for RmsNorm {
    fn forward_with_stats<T: Element>(&mut self, x: &Tensor<T>) -> Result<NormOutput<T>> {
        rms_norm(
            x,
            &self.config.normalized_shape,
            self.weight.as_ref(),
            self.config.eps,
        )
    }

    fn backward<T: Element>(
        &self,
        dy: &Tensor<T>,
        x: &Tensor<T>,
        stats: &SavedStats,
    ) -> Result<Gradients<T>> {
        rms_norm_backward(
            dy,
            x,
            &self.config.normalized_shape,
            self.weight.as_ref(),
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
        move_opt(&mut self.weight, device)
    }
}
