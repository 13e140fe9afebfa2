//! CUDA launches for LayerNorm and RMSNorm.

use super::CudaDevice;
use crate::dtype::Element;
use crate::error::Result;
use crate::ops::{cuda_pending, Gradients, NormOutput, SavedStats};
use crate::tensor::Tensor;

pub(crate) fn layer_norm_fwd<T: Element>(
    _dev: &CudaDevice,
    _x: &Tensor<T>,
    _cols: usize,
    _weight: Option<&Tensor<f32>>,
    _bias: Option<&Tensor<f32>>,
    _eps: f64,
) -> Result<NormOutput<T>> {
    Err(cuda_pending("layer_norm"))
}

pub(crate) fn layer_norm_bwd<T: Element>(
    _dev: &CudaDevice,
    _dy: &Tensor<T>,
    _x: &Tensor<T>,
    _cols: usize,
    _weight: Option<&Tensor<f32>>,
    _has_bias: bool,
    _stats: &SavedStats,
) -> Result<Gradients<T>> {
    Err(cuda_pending("layer_norm backward"))
}

pub(crate) fn rms_norm_fwd<T: Element>(
    _dev: &CudaDevice,
    _x: &Tensor<T>,
    _cols: usize,
    _weight: Option<&Tensor<f32>>,
    _eps: f64,
) -> Result<NormOutput<T>> {
    Err(cuda_pending("rms_norm"))
}

pub(crate) fn rms_norm_bwd<T: Element>(
    _dev: &CudaDevice,
    _dy: &Tensor<T>,
    _x: &Tensor<T>,
    _cols: usize,
    _weight: Option<&Tensor<f32>>,
    _stats: &SavedStats,
) -> Result<Gradients<T>> {
    Err(cuda_pending("rms_norm backward"))
}
