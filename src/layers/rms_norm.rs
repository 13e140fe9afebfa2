use super::{module_via_state, state_accessors, State};
use crate::device::Device;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::ops::{rms_norm, rms_norm_backward, Gradients, NormOutput, SavedStats};
use crate::tensor::Tensor;

/// Arguments of `RMSNorm`, with PyTorch's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct RMSNormConfig {
    /// The trailing dimensions normalized together.
    pub normalized_shape: Vec<usize>,
    /// Added to `mean(x²)`; `None` (default) means `f32::EPSILON` for every input dtype.
    pub eps: Option<f64>,
    /// Learnable elementwise weight (default true).
    pub elementwise_affine: bool,
}

impl RMSNormConfig {
    /// PyTorch's defaults for `normalized_shape`.
    pub fn new(normalized_shape: &[usize]) -> Self {
        RMSNormConfig {
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

/// `torch.nn.RMSNorm`: input `(*, normalized_shape)`. Holds no running state: every forward
/// takes `&self`.
#[derive(Clone, Debug)]
pub struct RMSNorm {
    config: RMSNormConfig,
    state: State,
}

impl RMSNorm {
    /// A module with PyTorch's defaults.
    pub fn new(normalized_shape: &[usize]) -> Result<Self> {
        Self::from_config(RMSNormConfig::new(normalized_shape))
    }

    /// A module from a config: weight = 1.
    pub fn from_config(config: RMSNormConfig) -> Result<Self> {
        if config.normalized_shape.is_empty() {
            return Err(Error::InvalidArgument(
                "RMSNorm: normalized_shape must have at least one dimension (PyTorch rejects \
                 an empty one); pass the trailing sizes to normalize over, e.g. &[hidden]"
                    .into(),
            ));
        }
        if let Some(e) = config.eps {
            crate::ops::check_eps("RMSNorm", e)?;
        }
        let affine = config.elementwise_affine;
        let state = State::new(
            "RMSNorm".into(),
            &config.normalized_shape,
            affine,
            false,
            false,
        )?;
        Ok(RMSNorm { config, state })
    }

    /// The config the module was built with.
    pub fn config(&self) -> &RMSNormConfig {
        &self.config
    }

    state_accessors!();

    /// The forward pass: output and the statistics for [`RMSNorm::backward`].
    pub fn forward_with_stats<T: Element>(&self, x: &Tensor<T>) -> Result<NormOutput<T>> {
        rms_norm(
            x,
            &self.config.normalized_shape,
            self.state.w(),
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
        rms_norm_backward(dy, x, &self.config.normalized_shape, self.state.w(), stats)
    }
}

module_via_state!(; RMSNorm);
