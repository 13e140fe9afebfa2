//! The candle ops on candle's CUDA device (feature `candle-cuda`): cunorm's kernels launched on
//! candle's own stream, reading candle's storage through views at the layout's offsets (no copy
//! of the input) and writing into buffers candle then owns.
//!
//! One cunorm [`CudaDevice`] per candle stream, cached: it wraps candle's context and stream, so
//! cunorm's launches are ordered with candle's own work and need no synchronization.
//!
//! LayerNorm, RMSNorm and GroupNorm run here, forward and backward, on contiguous inputs (a
//! channels-last input is made contiguous first: candle reads a custom op's output as
//! contiguous). BatchNorm and InstanceNorm
//! (whose running statistics live in candle `Var`s a custom op cannot write) return an error
//! on a CUDA device for now.
//!
//! Backward: candle's `CustomOp3::bwd` returns three tensors, a custom op one. The gradient op
//! ([`GradOp`]) computes `dx` as its output and leaves `dweight`/`dbias` in a shared slot that a
//! second op ([`TakeOp`]) hands to candle as tensors.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda::CudaDType;
use candle_core::{CudaStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor as CTensor};
use cudarc::driver::{CudaSlice, CudaView};

use crate::cuda::CudaDevice;
use crate::dtype::Element;
use crate::ops::planes::{Grouping, PlaneShape, Source};
use crate::tensor::MemoryFormat;

use super::Kind;

fn err(e: crate::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("cunorm: {e}"))
}

fn msg(s: impl Into<String>) -> candle_core::Error {
    candle_core::Error::Msg(s.into())
}

/// The gradient ops run only on candle's CUDA device (the CPU backward is `CandleNorm::bwd_t`).
fn cpu_tensors() -> candle_core::Error {
    msg("cunorm: the CUDA gradient op got CPU tensors")
}

/// The cunorm device on a candle device's stream (made once per stream).
fn device(c: &candle_core::CudaDevice) -> candle_core::Result<CudaDevice> {
    static CACHE: OnceLock<Mutex<HashMap<usize, CudaDevice>>> = OnceLock::new();
    let stream = c.cuda_stream();
    let key = Arc::as_ptr(&stream) as usize;
    let mut cache = CACHE
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .map_err(|_| msg("cunorm: the device cache lock was poisoned"))?;
    if let Some(d) = cache.get(&key) {
        return Ok(d.clone());
    }
    let d = CudaDevice::from_parts(stream.context().clone(), stream).map_err(err)?;
    cache.insert(key, d.clone());
    Ok(d)
}

/// The element types both crates share on CUDA.
pub(super) trait CudaElem: Element + CudaDType + cudarc::driver::DeviceRepr {}
impl CudaElem for f32 {}
impl CudaElem for crate::f16 {}
impl CudaElem for crate::bf16 {}

/// The used range of a contiguous storage as a view. (Channels-last inputs are made contiguous
/// before the op on CUDA: candle reads a custom op's output as contiguous.)
fn view<'a, T: CudaElem>(
    s: &'a CudaStorage,
    l: &Layout,
) -> candle_core::Result<(CudaView<'a, T>, bool)> {
    let slice = T::as_cuda_slice(s)?;
    let (a, b, cl) = match l.contiguous_offsets() {
        Some((a, b)) => (a, b, false),
        None => {
            return Err(msg(
                "cunorm: the op needs a contiguous input on CUDA; call .contiguous() first",
            ))
        }
    };
    if b > slice.len() {
        return Err(msg("cunorm: the input's layout runs past its storage"));
    }
    Ok((slice.slice(a..b), cl))
}

/// The statistics a forward on CUDA saved for its backward.
pub(super) struct SavedCuda {
    mean: Option<CudaSlice<f32>>,
    rstd: CudaSlice<f32>,
}

/// `(rows, cols)` of a rows op from the input dims and the parameter length.
fn rows_cols(dims: &[usize], cols: usize) -> candle_core::Result<(usize, usize)> {
    let numel: usize = dims.iter().product();
    if cols == 0 || !numel.is_multiple_of(cols) {
        return Err(msg(format!(
            "cunorm: input of shape {dims:?} does not end in the weight's {cols} elements"
        )));
    }
    Ok((numel / cols, cols))
}

/// The `(N, C, S)` view of a planes op's input.
fn plane_shape(dims: &[usize], cl: bool) -> candle_core::Result<PlaneShape> {
    let format = if cl {
        MemoryFormat::ChannelsLast
    } else {
        MemoryFormat::Contiguous
    };
    PlaneShape::of(dims, format).map_err(err)
}

/// The forward of `kind` on CUDA: `y` and the statistics for the backward.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward<T: CudaElem>(
    kind: &Kind,
    eps: f64,
    has_weight: bool,
    has_bias: bool,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> candle_core::Result<(CudaStorage, Shape, SavedCuda)> {
    let cdev = s1.device.clone();
    let dev = device(&cdev)?;
    let (x, cl) = view::<T>(s1, l1)?;
    let (w, _) = view::<f32>(s2, l2)?;
    let (b, _) = view::<f32>(s3, l3)?;
    let (w, b) = (has_weight.then_some(&w), has_bias.then_some(&b));
    let dims = l1.dims();
    let numel = x.len();
    // SAFETY: every element of y is written by the launch below before candle reads it.
    let mut y = unsafe { cdev.alloc::<T>(numel.max(1)) }?;
    let saved = match kind {
        Kind::Rows { center } => {
            let (rows, cols) = rows_cols(dims, l2.shape().elem_count())?;
            let mut rstd = cdev.alloc_zeros::<f32>(rows.max(1))?;
            let mut yv = y.slice_mut(0..numel);
            let mut rv = rstd.slice_mut(0..rows);
            let mean = if *center {
                let mut mean = cdev.alloc_zeros::<f32>(rows.max(1))?;
                let mut mv = mean.slice_mut(0..rows);
                let eps = eps as f32;
                crate::raw::layer_norm_forward(
                    &dev, &x, &mut yv, rows, cols, w, b, eps, &mut mv, &mut rv,
                )
                .map_err(err)?;
                Some(mean)
            } else {
                crate::raw::rms_norm_forward(&dev, &x, &mut yv, rows, cols, w, eps as f32, &mut rv)
                    .map_err(err)?;
                None
            };
            SavedCuda { mean, rstd }
        }
        Kind::Groups(g) => {
            let shape = plane_shape(dims, cl)?;
            let ng = shape
                .n
                .checked_mul(*g)
                .ok_or_else(|| msg("cunorm: N·G overflows"))?;
            let mut mean = cdev.alloc_zeros::<f32>(ng.max(1))?;
            let mut rstd = cdev.alloc_zeros::<f32>(ng.max(1))?;
            crate::raw::planes_forward(
                &dev,
                &x,
                &mut y.slice_mut(0..numel),
                shape,
                Grouping::Groups(*g),
                w,
                b,
                eps as f32,
                Source::Input { running: None },
                &mut mean.slice_mut(0..ng),
                &mut rstd.slice_mut(0..ng),
            )
            .map_err(err)?;
            SavedCuda {
                mean: Some(mean),
                rstd,
            }
        }
        Kind::Planes { .. } => {
            return Err(msg(
                "cunorm: BatchNorm and InstanceNorm run on candle's CPU device for now (their \
                 running statistics are candle Vars); move the tensors to the CPU, or use \
                 candle_nn's layers on CUDA",
            ))
        }
    };
    Ok((T::wrap_cuda_slice(y, cdev), Shape::from(dims), saved))
}

/// The gradient op: `dx` as its output (from `x`, `dy`), `dweight`/`dbias` into `params`.
pub(super) struct GradOp {
    pub(super) kind: Kind,
    pub(super) has_weight: bool,
    pub(super) weight: Option<CTensor>,
    pub(super) saved: Arc<SavedCuda>,
    pub(super) params: Arc<Mutex<ParamGrads>>,
}

/// `dweight` and `dbias` of a [`GradOp`], until each [`TakeOp`] takes its own.
pub(super) type ParamGrads = (Option<CudaSlice<f32>>, Option<CudaSlice<f32>>);

impl GradOp {
    fn run<T: CudaElem>(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let cdev = s1.device.clone();
        let dev = device(&cdev)?;
        let (x, cl) = view::<T>(s1, l1)?;
        let (dy, cl_dy) = view::<T>(s2, l2)?;
        if cl != cl_dy {
            return Err(msg("cunorm: x and dy have different layouts"));
        }
        let wst = match (&self.weight, self.has_weight) {
            (Some(w), true) => Some(w.storage_and_layout()),
            _ => None,
        };
        let wv = match &wst {
            Some((s, l)) => match &**s {
                candle_core::Storage::Cuda(s) => Some(view::<f32>(s, l)?.0),
                _ => return Err(msg("cunorm: the weight is not on the input's CUDA device")),
            },
            None => None,
        };
        let dims = l1.dims();
        let numel = x.len();
        // SAFETY: the launches below write every element of dx, dw and db.
        let mut dx = unsafe { cdev.alloc::<T>(numel.max(1)) }?;
        let mut dxv = dx.slice_mut(0..numel);
        let rstd = self.saved.rstd.as_view();
        let (dw, db) = match &self.kind {
            Kind::Rows { center } => {
                let cols = self
                    .weight
                    .as_ref()
                    .map(|w| w.elem_count())
                    .ok_or_else(|| msg("cunorm: a rows op always has a weight"))?;
                let (rows, cols) = rows_cols(dims, cols)?;
                let mut dw = cdev.alloc_zeros::<f32>(cols.max(1))?;
                let mut db = cdev.alloc_zeros::<f32>(cols.max(1))?;
                let (mut dwv, mut dbv) = (dw.slice_mut(0..cols), db.slice_mut(0..cols));
                let rstd = rstd.slice(0..rows);
                match (center, &self.saved.mean) {
                    (true, Some(m)) => crate::raw::layer_norm_backward(
                        &dev,
                        &dy,
                        &x,
                        rows,
                        cols,
                        wv.as_ref(),
                        &m.slice(0..rows),
                        &rstd,
                        &mut dxv,
                        &mut dwv,
                        &mut dbv,
                    ),
                    _ => crate::raw::rms_norm_backward(
                        &dev,
                        &dy,
                        &x,
                        rows,
                        cols,
                        wv.as_ref(),
                        &rstd,
                        &mut dxv,
                        &mut dwv,
                        &mut dbv,
                    ),
                }
                .map_err(err)?;
                (dw, db)
            }
            Kind::Groups(g) => {
                let shape = plane_shape(dims, cl)?;
                let ng = shape.n * g;
                let mean = self
                    .saved
                    .mean
                    .as_ref()
                    .ok_or_else(|| msg("cunorm: GroupNorm statistics carry a mean"))?;
                let mut dw = cdev.alloc_zeros::<f32>(shape.c.max(1))?;
                let mut db = cdev.alloc_zeros::<f32>(shape.c.max(1))?;
                crate::raw::planes_backward(
                    &dev,
                    &dy,
                    &x,
                    shape,
                    Grouping::Groups(*g),
                    wv.as_ref(),
                    &mean.slice(0..ng),
                    &rstd.slice(0..ng),
                    true,
                    &mut dxv,
                    &mut dw.slice_mut(0..shape.c),
                    &mut db.slice_mut(0..shape.c),
                )
                .map_err(err)?;
                (dw, db)
            }
            Kind::Planes { .. } => {
                return Err(msg("cunorm: BatchNorm/InstanceNorm run on the CPU"))
            }
        };
        *self
            .params
            .lock()
            .map_err(|_| msg("cunorm: gradient slot poisoned"))? = (Some(dw), Some(db));
        Ok((T::wrap_cuda_slice(dx, cdev), Shape::from(dims)))
    }
}

impl CustomOp2 for GradOp {
    fn name(&self) -> &'static str {
        "cunorm-grad"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        Err(cpu_tensors())
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        match s1.dtype() {
            candle_core::DType::F32 => self.run::<f32>(s1, l1, s2, l2),
            candle_core::DType::F16 => self.run::<crate::f16>(s1, l1, s2, l2),
            candle_core::DType::BF16 => self.run::<crate::bf16>(s1, l1, s2, l2),
            d => Err(msg(format!("cunorm: takes f32, f16 or bf16, got {d:?}"))),
        }
    }
}

/// Hands one of the parameter gradients a [`GradOp`] left in its slot to candle, as an f32
/// tensor of `len` elements (its input only names the device).
pub(super) struct TakeOp {
    pub(super) params: Arc<Mutex<ParamGrads>>,
    pub(super) bias: bool,
    pub(super) len: usize,
}

impl CustomOp1 for TakeOp {
    fn name(&self) -> &'static str {
        "cunorm-take-grad"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        Err(cpu_tensors())
    }

    fn cuda_fwd(&self, s: &CudaStorage, _: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let mut slot = self
            .params
            .lock()
            .map_err(|_| msg("cunorm: gradient slot poisoned"))?;
        let mine = if self.bias {
            slot.1.take()
        } else {
            slot.0.take()
        };
        let mine = mine.ok_or_else(|| msg("cunorm: no parameter gradient was computed"))?;
        Ok((
            <f32 as CudaDType>::wrap_cuda_slice(mine, s.device.clone()),
            Shape::from(self.len),
        ))
    }
}
