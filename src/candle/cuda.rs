//! The candle ops on candle's CUDA device (feature `candle-cuda`): cunorm's kernels launched on
//! candle's own stream, reading candle's storage through views at the layout's offsets (no copy
//! of the input) and writing into buffers candle then owns.
//!
//! One cunorm [`CudaDevice`] per candle stream, cached: it wraps candle's context and stream, so
//! cunorm's launches are ordered with candle's own work and need no synchronization.
//!
//! All five norms run here, forward and backward. GroupNorm, BatchNorm and InstanceNorm read a
//! channels-last input in place and give a channels-last output (returned in its memory order
//! and viewed back by the module, see `op_shape`); LayerNorm and RMSNorm read a contiguous one.
//! The shapes are checked as the CPU fronts check them before anything is launched.
//!
//! A custom op returns one tensor; two things here need more, so an op leaves extra device
//! buffers in shared slots and [`TakeOp`] hands each to candle as a tensor:
//! - backward: the gradient op ([`GradOp`]) returns `dx` and leaves `dweight`/`dbias`;
//! - BatchNorm/InstanceNorm in training mode: the forward updates device copies of the running
//!   statistics (a custom op cannot write a candle `Var`) and leaves them; the module then sets
//!   its `Var`s from them ([`DeviceRunning::write_back`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda::CudaDType;
use candle_core::{CudaStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor as CTensor};
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
    // Streams only the cache still holds belong to candle devices that are gone.
    cache.retain(|_, d| Arc::strong_count(d.stream()) > 1);
    let d = CudaDevice::from_parts(stream.context().clone(), stream).map_err(err)?;
    cache.insert(key, d.clone());
    Ok(d)
}

/// The element types both crates share on CUDA.
pub(super) trait CudaElem: Element + CudaDType + cudarc::driver::DeviceRepr {}
impl CudaElem for f32 {}
impl CudaElem for crate::f16 {}
impl CudaElem for crate::bf16 {}

/// The used range of a storage as a view, and whether its layout is channels-last (read in
/// place, see `is_channels_last`); any other strides are an `Err`.
fn view<'a, T: CudaElem>(
    s: &'a CudaStorage,
    l: &Layout,
) -> candle_core::Result<(CudaView<'a, T>, bool)> {
    let slice = T::as_cuda_slice(s)?;
    let Some((a, b, cl)) = super::used_range(l) else {
        return Err(msg(
            "cunorm: the op needs a contiguous or channels-last input on CUDA; call \
             .contiguous() first",
        ));
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

/// The checks the CPU fronts make, on shapes: the same `Err`s on CUDA, never a launch that
/// reads a parameter of the wrong length. `w` and `b` always reach the op (ones and zeros in
/// place of absent ones), shaped like the parameters.
fn check(kind: &Kind, eps: f64, x: &[usize], w: &[usize], b: &[usize]) -> candle_core::Result<()> {
    crate::ops::check_eps("cunorm", eps).map_err(err)?;
    if w != b {
        return Err(msg(format!(
            "cunorm: weight of shape {w:?} and bias of shape {b:?} must match"
        )));
    }
    match kind {
        Kind::Rows { .. } => {
            if w.is_empty() || !x.ends_with(w) {
                return Err(msg(format!(
                    "cunorm: input of shape {x:?} must end in the weight's shape {w:?} \
                     (normalized_shape, at least one dimension)"
                )));
            }
        }
        _ => {
            let [n, c, spatial @ ..] = x else {
                return Err(msg(format!(
                    "cunorm: expected an (N, C, *) input, got shape {x:?}"
                )));
            };
            if w != [*c] {
                return Err(msg(format!(
                    "cunorm: weight should contain {c} elements (one per channel of the input \
                     of shape {x:?}), got shape {w:?}"
                )));
            }
            let s: usize = spatial.iter().product();
            let per_set = match kind {
                Kind::Groups(g) => {
                    if *g == 0 || c % g != 0 {
                        return Err(msg(format!(
                            "cunorm: num_groups ({g}) must divide the {c} channels"
                        )));
                    }
                    c / g * s
                }
                Kind::Planes { instance: true, .. } => s,
                _ => n * s,
            };
            let training = !matches!(
                kind,
                Kind::Planes {
                    training: false,
                    ..
                }
            );
            if training && per_set == 1 {
                return Err(msg(format!(
                    "cunorm: expected more than 1 value per normalized set when training, got \
                     input of shape {x:?}"
                )));
            }
        }
    }
    Ok(())
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
    check(kind, eps, l1.dims(), l2.dims(), l3.dims())?;
    let cdev = s1.device.clone();
    let dev = device(&cdev)?;
    let (x, cl) = view::<T>(s1, l1)?;
    if cl && matches!(kind, Kind::Rows { .. }) {
        return Err(msg("cunorm: LayerNorm/RMSNorm read a contiguous input"));
    }
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
        Kind::Planes {
            instance,
            training,
            momentum,
            device_running,
            ..
        } => {
            let shape = plane_shape(dims, cl)?;
            let grouping = if *instance {
                Grouping::Instance
            } else {
                Grouping::Channel
            };
            let ng = if *training {
                grouping.num_groups(&shape)
            } else {
                shape.c
            };
            let mut mean = cdev.alloc_zeros::<f32>(ng.max(1))?;
            let mut rstd = cdev.alloc_zeros::<f32>(ng.max(1))?;
            // The op updates copies of the running statistics; the module writes them back.
            let mut copies = match device_running {
                Some(r) => Some((copy_of(&r.mean, &cdev)?, copy_of(&r.var, &cdev)?)),
                None => None,
            };
            let c = shape.c;
            let (mut rm, mut rv, fixed);
            let source: crate::raw::ViewSource =
                match (copies.as_mut(), *training) {
                    (Some((m, v)), true) => {
                        rm = m.slice_mut(0..c);
                        rv = v.slice_mut(0..c);
                        Source::Input {
                            running: Some(crate::raw::Running {
                                mean: &mut rm,
                                var: &mut rv,
                                factor: *momentum,
                            }),
                        }
                    }
                    (None, true) => Source::Input { running: None },
                    (Some((m, v)), false) => {
                        fixed = (m.slice(0..c), v.slice(0..c));
                        Source::Fixed {
                            mean: &fixed.0,
                            var: &fixed.1,
                        }
                    }
                    (None, false) => return Err(msg(
                        "cunorm: eval mode needs running statistics (use the input's statistics \
                         when the layer does not track them)",
                    )),
                };
            crate::raw::planes_forward(
                &dev,
                &x,
                &mut y.slice_mut(0..numel),
                shape,
                grouping,
                w,
                b,
                eps as f32,
                source,
                &mut mean.slice_mut(0..ng),
                &mut rstd.slice_mut(0..ng),
            )
            .map_err(err)?;
            if let (true, Some(r), Some((m, v))) = (*training, device_running, copies) {
                put(&r.new_mean, m)?;
                put(&r.new_var, v)?;
            }
            SavedCuda {
                mean: Some(mean),
                rstd,
            }
        }
    };
    Ok((
        T::wrap_cuda_slice(y, cdev),
        super::op_shape(dims, cl),
        saved,
    ))
}

/// The grouping of a planes-family op, and whether its statistics came from the input.
fn planes_grouping(kind: &Kind) -> Option<(Grouping, bool)> {
    match kind {
        Kind::Groups(g) => Some((Grouping::Groups(*g), true)),
        Kind::Planes {
            instance, training, ..
        } => Some((
            if *instance {
                Grouping::Instance
            } else {
                Grouping::Channel
            },
            *training,
        )),
        Kind::Rows { .. } => None,
    }
}

/// The gradient op: `dx` as its output (from `x`, `dy`), `dweight`/`dbias` into `params`.
pub(super) struct GradOp {
    pub(super) kind: Kind,
    pub(super) has_weight: bool,
    pub(super) saved: Arc<SavedCuda>,
    pub(super) dw: Slot,
    pub(super) db: Slot,
}

/// A device buffer one op leaves for another (a [`TakeOp`]) to hand to candle.
pub(super) type Slot = Arc<Mutex<Option<CudaSlice<f32>>>>;

fn put(slot: &Slot, v: CudaSlice<f32>) -> candle_core::Result<()> {
    *slot
        .lock()
        .map_err(|_| msg("cunorm: a buffer slot was poisoned"))? = Some(v);
    Ok(())
}

impl GradOp {
    fn run<T: CudaElem>(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let cdev = s1.device.clone();
        let dev = device(&cdev)?;
        let (x, cl) = view::<T>(s1, l1)?;
        let (dy, cl_dy) = view::<T>(s2, l2)?;
        if cl != cl_dy {
            return Err(msg("cunorm: x and dy have different layouts"));
        }
        if cl && matches!(self.kind, Kind::Rows { .. }) {
            return Err(msg("cunorm: LayerNorm/RMSNorm read a contiguous input"));
        }
        let (w, _) = view::<f32>(s3, l3)?;
        let wv = self.has_weight.then_some(w);
        let dims = l1.dims();
        let numel = x.len();
        // SAFETY: the launches below write every element of dx, dw and db.
        let mut dx = unsafe { cdev.alloc::<T>(numel.max(1)) }?;
        let mut dxv = dx.slice_mut(0..numel);
        let rstd = self.saved.rstd.as_view();
        let (dw, db) = match &self.kind {
            Kind::Rows { center } => {
                let (rows, cols) = rows_cols(dims, l3.shape().elem_count())?;
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
            kind => {
                let shape = plane_shape(dims, cl)?;
                let (grouping, from_input) = planes_grouping(kind)
                    .ok_or_else(|| msg("cunorm: not an op of the planes family"))?;
                let ng = if from_input {
                    grouping.num_groups(&shape)
                } else {
                    shape.c
                };
                let mean = self
                    .saved
                    .mean
                    .as_ref()
                    .ok_or_else(|| msg("cunorm: these statistics carry a mean"))?;
                let mut dw = cdev.alloc_zeros::<f32>(shape.c.max(1))?;
                let mut db = cdev.alloc_zeros::<f32>(shape.c.max(1))?;
                crate::raw::planes_backward(
                    &dev,
                    &dy,
                    &x,
                    shape,
                    grouping,
                    wv.as_ref(),
                    &mean.slice(0..ng),
                    &rstd.slice(0..ng),
                    from_input,
                    &mut dxv,
                    &mut dw.slice_mut(0..shape.c),
                    &mut db.slice_mut(0..shape.c),
                )
                .map_err(err)?;
                (dw, db)
            }
        };
        put(&self.dw, dw)?;
        put(&self.db, db)?;
        Ok((T::wrap_cuda_slice(dx, cdev), super::op_shape(dims, cl)))
    }
}

impl CustomOp3 for GradOp {
    fn name(&self) -> &'static str {
        "cunorm-grad"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
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
        s3: &CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        match s1.dtype() {
            candle_core::DType::F32 => self.run::<f32>(s1, l1, s2, l2, s3, l3),
            candle_core::DType::F16 => self.run::<crate::f16>(s1, l1, s2, l2, s3, l3),
            candle_core::DType::BF16 => self.run::<crate::bf16>(s1, l1, s2, l2, s3, l3),
            d => Err(msg(format!("cunorm: takes f32, f16 or bf16, got {d:?}"))),
        }
    }
}

/// Hands the buffer a previous op left in `slot` to candle, as an f32 tensor of `len` elements
/// (its input only names the device).
pub(super) struct TakeOp {
    pub(super) slot: Slot,
    pub(super) len: usize,
}

impl CustomOp1 for TakeOp {
    fn name(&self) -> &'static str {
        "cunorm-take"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        Err(cpu_tensors())
    }

    fn cuda_fwd(&self, s: &CudaStorage, _: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let buf = self
            .slot
            .lock()
            .map_err(|_| msg("cunorm: a buffer slot was poisoned"))?
            .take()
            .ok_or_else(|| msg("cunorm: the buffer was never written"))?;
        if buf.len() < self.len {
            return Err(msg("cunorm: the buffer is shorter than its tensor"));
        }
        Ok((
            <f32 as CudaDType>::wrap_cuda_slice(buf, s.device.clone()),
            Shape::from(self.len),
        ))
    }
}

/// A candle tensor as the cunorm op's slot content: `x.apply_op1_no_bwd(TakeOp)` on any tensor
/// of the device.
pub(super) fn take(like: &CTensor, slot: &Slot, len: usize) -> candle_core::Result<CTensor> {
    like.apply_op1_no_bwd(&TakeOp {
        slot: slot.clone(),
        len,
    })
}

/// BatchNorm/InstanceNorm running statistics on CUDA: f32 device tensors the op reads, and the
/// slots its updated copies go to (the op cannot write a candle `Var`; the module sets them).
#[derive(Clone, Debug)]
pub(super) struct DeviceRunning {
    mean: CTensor,
    var: CTensor,
    new_mean: Slot,
    new_var: Slot,
}

impl DeviceRunning {
    pub(super) fn new(m: &candle_core::Var, v: &candle_core::Var) -> candle_core::Result<Self> {
        let f32 = candle_core::DType::F32;
        Ok(DeviceRunning {
            mean: m.as_tensor().to_dtype(f32)?.contiguous()?,
            var: v.as_tensor().to_dtype(f32)?.contiguous()?,
            new_mean: Arc::new(Mutex::new(None)),
            new_var: Arc::new(Mutex::new(None)),
        })
    }

    /// After a training forward: the updated copies into the `Var`s, in their own dtype.
    pub(super) fn write_back(
        &self,
        like: &CTensor,
        m: &candle_core::Var,
        v: &candle_core::Var,
    ) -> candle_core::Result<()> {
        for (var, slot) in [(m, &self.new_mean), (v, &self.new_var)] {
            let t = take(like, slot, var.elem_count())?;
            var.set(&t.reshape(var.shape())?.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }
}

/// A device copy of an f32 CUDA tensor's values (contiguous).
fn copy_of(t: &CTensor, cdev: &candle_core::CudaDevice) -> candle_core::Result<CudaSlice<f32>> {
    let (st, l) = t.storage_and_layout();
    let candle_core::Storage::Cuda(s) = &*st else {
        return Err(msg(
            "cunorm: the running statistics are not on the input's CUDA device",
        ));
    };
    let (v, _) = view::<f32>(s, l)?;
    let mut out = cdev.alloc_zeros::<f32>(v.len().max(1))?;
    cdev.memcpy_dtod(&v, &mut out.slice_mut(0..v.len()))?;
    Ok(out)
}
