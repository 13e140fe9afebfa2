//! CUDA launches for BatchNorm, InstanceNorm and GroupNorm.

use super::CudaDevice;
use crate::dtype::Element;
use crate::error::Result;
use crate::ops::cpu::Grouping;
use crate::ops::planes::Source;
use crate::ops::{cuda_pending, Gradients, NormOutput, SavedStats};
use crate::tensor::Tensor;

pub(crate) fn forward<T: Element>(
    _dev: &CudaDevice,
    _x: &Tensor<T>,
    _grouping: Grouping,
    _weight: Option<&Tensor<f32>>,
    _bias: Option<&Tensor<f32>>,
    _eps: f64,
    _source: Source<'_>,
) -> Result<NormOutput<T>> {
    Err(cuda_pending("normalization"))
}

pub(crate) fn backward<T: Element>(
    _dev: &CudaDevice,
    _dy: &Tensor<T>,
    _x: &Tensor<T>,
    _grouping: Grouping,
    _weight: Option<&Tensor<f32>>,
    _affine: bool,
    _stats: &SavedStats,
) -> Result<Gradients<T>> {
    Err(cuda_pending("normalization backward"))
}
