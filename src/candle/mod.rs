//! candle custom ops and drop-in modules over cunorm's engines, **with backward** through
//! candle's autograd (feature `candle`).
//!
//! candle-nn's fused LayerNorm and RmsNorm are applied without a backward (contiguous inputs cut
//! the graph), compute the LayerNorm variance as E\[x²\] − E\[x\]², and candle has no fused GroupNorm.
//! These ops keep candle's graph (gradients for input, weight and bias), with cunorm's statistics
//! (f64 on the CPU, corrected two-pass; never E\[x²\] − E\[x\]²).
//!
//! Switching a candle model is one line: `candle_nn::layer_norm(..)` →
//! `cunorm::candle::layer_norm(..)`, same arguments, same tensor names in the `VarBuilder`.
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//!
//! # fn main() -> candle_core::Result<()> {
//! let map = VarMap::new();
//! let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
//! let ln = cunorm::candle::layer_norm(8, 1e-5, vb.pp("ln"))?;
//! let x = Tensor::randn(0f32, 1.0, (4, 8), &Device::Cpu)?;
//! let y = ln.forward(&x)?;
//! let grads = y.sqr()?.sum_all()?.backward()?;          // the graph is kept
//! assert!(grads.get(ln.weight()).is_some());
//! # Ok(())
//! # }
//! ```
//!
//! BatchNorm and InstanceNorm ([`batch_norm`], [`instance_norm`], [`batch_norm_op`],
//! [`instance_norm_op`]) update their running statistics in place in training mode, as
//! PyTorch's do. Inputs may be contiguous or have channels-last strides (read in place).
//!
//! On candle's CPU device the ops run the crate's CPU engines on candle's storage in place: the
//! forward and the backward read x (and dy) without copying them, and the output moves into
//! candle. GroupNorm, BatchNorm and InstanceNorm keep a channels-last input's layout (their
//! output comes back in memory order and is viewed with channels-last strides, no reorder);
//! LayerNorm and RMSNorm give a contiguous output.
//! With feature `candle-cuda`, all five also run on candle's CUDA device: cunorm's kernels on
//! candle's own stream, over candle's storage, forward and backward, running statistics updated
//! (built against candle-core's CUDA backend, not yet run on a GPU). Without that feature an op
//! on a CUDA device returns candle's error.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor as CTensor, Var};

use crate::dtype::Element;
use crate::ops::{Gradients, NormOutput, Param, SavedStats};
use crate::tensor::{MemoryFormat, Tensor};
use crate::{bf16, f16};

#[cfg(feature = "candle-cuda")]
mod cuda;
mod modules;
pub use modules::{
    batch_norm, group_norm, instance_norm, layer_norm, rms_norm, BatchNorm, GroupNorm,
    InstanceNorm, InstanceNormConfig, LayerNorm, RmsNorm,
};

fn err(e: crate::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("cunorm: {e}"))
}

/// The element types both crates share, and how candle's CPU storage holds them.
trait CandleElem: Element + candle_core::WithDType {
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
    fn storage(v: Vec<Self>) -> CpuStorage;
}

macro_rules! candle_elem {
    ($t:ty, $variant:ident) => {
        impl CandleElem for $t {
            fn slice(s: &CpuStorage) -> Option<&[Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn storage(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(v)
            }
        }
    };
}
candle_elem!(f32, F32);
candle_elem!(f16, F16);
candle_elem!(bf16, BF16);

/// Whether a layout is channels-last (NHWC-style): dimension 1 (channels) has stride 1 and the
/// others are ordered N, spatial..., C in memory with no gaps (dimensions of size 1 may have any
/// stride). candle gives this layout to `x.permute((0, 2, 3, 1))?.contiguous()?.permute((0, 3,
/// 1, 2))?`, the usual way to hold NHWC data as an NCHW-shaped tensor.
fn is_channels_last(l: &Layout) -> bool {
    let (dims, strides) = (l.dims(), l.stride());
    // Ranks 3 to 5, as cunorm's channels-last formats (and PyTorch's channels_last/_3d).
    if !(3..=5).contains(&dims.len()) || l.is_contiguous() {
        return false;
    }
    // Memory order: C fastest, then the spatial dimensions from the last, then N.
    let mut order: Vec<usize> = vec![1];
    order.extend((2..dims.len()).rev());
    order.push(0);
    let mut want = 1usize;
    for &d in &order {
        if dims[d] != 1 && strides[d] != want {
            return false;
        }
        want = want.saturating_mul(dims[d]);
    }
    true
}

/// The storage range `[a, b)` a layout reads, and whether it is channels-last: contiguous
/// first, then channels-last (see [`is_channels_last`]); `None` for any other strides. Both
/// devices read inputs through this.
fn used_range(l: &Layout) -> Option<(usize, usize, bool)> {
    if let Some((a, b)) = l.contiguous_offsets() {
        return Some((a, b, false));
    }
    is_channels_last(l).then(|| {
        let a = l.start_offset();
        (a, a + l.shape().elem_count(), true)
    })
}

/// Runs `f` on a candle CPU storage as a cunorm tensor of `T`, read in place (no copy):
/// contiguous, or channels-last when its strides are (see [`is_channels_last`]).
fn with_storage<T: CandleElem, R>(
    s: &CpuStorage,
    l: &Layout,
    f: impl FnOnce(&Tensor<T>) -> R,
) -> candle_core::Result<R> {
    let Some(v) = T::slice(s) else {
        return Err(candle_core::Error::Msg(format!(
            "cunorm: expected {} storage, got {:?}",
            <T as Element>::DTYPE,
            s.dtype()
        )));
    };
    let Some((a, b, cl)) = used_range(l) else {
        return Err(candle_core::Error::Msg(
            "cunorm: the op needs a contiguous or channels-last input; call .contiguous() first"
                .into(),
        ));
    };
    let format = if cl {
        MemoryFormat::ChannelsLast
    } else {
        MemoryFormat::Contiguous
    };
    let data = v.get(a..b).ok_or_else(|| {
        candle_core::Error::Msg("cunorm: the input's layout runs past its storage".into())
    })?;
    Tensor::with_borrowed(data, l.dims(), format, f).map_err(err)
}

/// `grad` in `x`'s layout, as the backward reads both: as it is when they already agree
/// (candle's usual contiguous case, no copy), else rearranged once.
fn grad_like(grad: &CTensor, x: &CTensor) -> candle_core::Result<CTensor> {
    if is_channels_last(x.layout()) {
        if is_channels_last(grad.layout()) {
            return Ok(grad.clone());
        }
        // (N, C, *s) → (N, *s, C), made contiguous, then viewed back as (N, C, *s).
        let r = grad.rank();
        return grad
            .permute(to_last(r))?
            .contiguous()?
            .permute(from_last(r));
    }
    grad.contiguous()
}

/// The dimension order that takes `(N, C, *s)` to its memory order `(N, *s, C)`, and back.
fn to_last(rank: usize) -> Vec<usize> {
    [0].into_iter().chain(2..rank).chain([1]).collect()
}
fn from_last(rank: usize) -> Vec<usize> {
    [0, rank - 1].into_iter().chain(1..rank - 1).collect()
}

/// The shape an op returns its output in: `dims` for a contiguous output; for a channels-last
/// one (`cl`), its memory order `(N, *s, C)`, which [`CandleNorm::view`] turns back into `(N, C, *s)`
/// with channels-last strides (candle reads a custom op's output as contiguous in the shape it
/// returns, so no reorder is needed).
fn op_shape(dims: &[usize], cl: bool) -> Shape {
    if cl {
        Shape::from(
            to_last(dims.len())
                .iter()
                .map(|&d| dims[d])
                .collect::<Vec<_>>(),
        )
    } else {
        Shape::from(dims)
    }
}

/// A cunorm tensor's elements moved into candle CPU storage, with the shape [`op_shape`] gives
/// for its format.
fn into_output<T: CandleElem>(t: Tensor<T>) -> candle_core::Result<(CpuStorage, Shape)> {
    let shape = op_shape(t.shape(), t.format() == MemoryFormat::ChannelsLast);
    Ok((T::storage(t.into_physical_vec().map_err(err)?), shape))
}

/// An f32 parameter gradient as a candle tensor in `like`'s shape, device and dtype.
fn param_grad(t: Tensor<f32>, like: &CTensor) -> candle_core::Result<CTensor> {
    CTensor::from_vec(
        t.into_physical_vec().map_err(err)?,
        like.shape(),
        like.device(),
    )?
    .to_dtype(like.dtype())
}

/// Which normalization an op runs.
#[derive(Clone, Debug)]
enum Kind {
    /// LayerNorm over the last `cols` elements of each row (`center`), or RMSNorm (no mean).
    Rows { center: bool },
    /// GroupNorm with `groups` groups over dimension 1.
    Groups(usize),
    /// BatchNorm, or InstanceNorm (`instance`), in training mode (`training`: input statistics)
    /// or eval mode (the running statistics; InstanceNorm without them uses the input's).
    Planes {
        instance: bool,
        training: bool,
        momentum: f64,
        running: Option<Arc<Mutex<Running>>>,
        /// On CUDA: the running statistics as f32 device tensors (read by the op), and the slots
        /// the op leaves their updated copies in (training mode).
        #[cfg(feature = "candle-cuda")]
        device_running: Option<cuda::DeviceRunning>,
    },
}

/// Running statistics as f32 values: read by the op, and updated by it in training mode. The
/// module writes them back to its candle `Var`s after the op.
#[derive(Clone, Debug)]
struct Running {
    mean: Vec<f32>,
    var: Vec<f32>,
}

/// One forward of `kind` on (x, weight, bias); keeps the statistics for its backward. The
/// parameters reach the op as f32 (candle's autograd takes their gradients back to the
/// parameters' own dtype through the conversion).
struct CandleNorm {
    kind: Kind,
    eps: f64,
    /// The op reads a weight (ones when the caller gave only a bias: its gradient needs one).
    has_weight: bool,
    /// The caller gave a weight: its gradient is returned.
    weight_grad: bool,
    has_bias: bool,
    saved: Mutex<Option<SavedStats>>,
    #[cfg(feature = "candle-cuda")]
    saved_cuda: Mutex<Option<Arc<cuda::SavedCuda>>>,
}

fn poisoned<T>(_: T) -> candle_core::Error {
    candle_core::Error::Msg("cunorm: a lock was poisoned by an earlier panic".into())
}

impl CandleNorm {
    fn new(kind: Kind, eps: f64, has_bias: bool) -> Self {
        CandleNorm {
            kind,
            eps,
            has_weight: true,
            weight_grad: true,
            has_bias,
            saved: Mutex::new(None),
            #[cfg(feature = "candle-cuda")]
            saved_cuda: Mutex::new(None),
        }
    }

    /// The forward pass. `update_running`: write the updated running statistics back (the
    /// op's own forward); a backward that recomputes the statistics leaves them alone.
    fn forward<T: Element>(
        &self,
        x: &Tensor<T>,
        w: &Tensor<f32>,
        b: &Tensor<f32>,
        update_running: bool,
    ) -> crate::Result<NormOutput<T>> {
        let weight = self.has_weight.then_some(w as &dyn Param);
        let bias = self.has_bias.then_some(b as &dyn Param);
        match &self.kind {
            Kind::Rows { center } => {
                let ns = w.shape().to_vec();
                if *center {
                    crate::functional::layer_norm(x, &ns, weight, bias, self.eps)
                } else {
                    crate::functional::rms_norm(x, &ns, weight, Some(self.eps))
                }
            }
            Kind::Groups(g) => crate::functional::group_norm(x, *g, weight, bias, self.eps),
            Kind::Planes {
                instance,
                training,
                momentum,
                running,
                ..
            } => {
                let mut guard = running
                    .as_ref()
                    .map(|r| r.lock())
                    .transpose()
                    .map_err(|_| {
                        crate::Error::InvalidArgument(
                            "cunorm: running statistics lock poisoned".into(),
                        )
                    })?;
                let mut rs = match guard.as_deref() {
                    Some(r) => {
                        let c = r.mean.len();
                        Some((
                            Tensor::from_vec(r.mean.clone(), &[c])?,
                            Tensor::from_vec(r.var.clone(), &[c])?,
                        ))
                    }
                    None => None,
                };
                let (rm, rv) = match rs.as_mut() {
                    Some((m, v)) => (Some(m), Some(v)),
                    None => (None, None),
                };
                let out = if *instance {
                    crate::functional::instance_norm(
                        x, rm, rv, weight, bias, *training, *momentum, self.eps,
                    )?
                } else {
                    crate::functional::batch_norm(
                        x, rm, rv, weight, bias, *training, *momentum, self.eps,
                    )?
                };
                if let (true, true, Some(r), Some((m, v))) =
                    (update_running, *training, guard.as_deref_mut(), rs)
                {
                    r.mean = m.to_vec()?;
                    r.var = v.to_vec()?;
                }
                Ok(out)
            }
        }
    }

    fn backward<T: Element>(
        &self,
        dy: &Tensor<T>,
        x: &Tensor<T>,
        w: &Tensor<f32>,
        stats: &SavedStats,
    ) -> crate::Result<Gradients<T>> {
        let weight = self.has_weight.then_some(w as &dyn Param);
        match &self.kind {
            Kind::Rows { center } => {
                let ns = w.shape().to_vec();
                if *center {
                    crate::functional::layer_norm_backward(dy, x, &ns, weight, self.has_bias, stats)
                } else {
                    crate::functional::rms_norm_backward(dy, x, &ns, weight, stats)
                }
            }
            Kind::Groups(g) => crate::functional::group_norm_backward(dy, x, *g, weight, stats),
            Kind::Planes { instance: true, .. } => {
                crate::functional::instance_norm_backward(dy, x, weight, stats)
            }
            Kind::Planes { .. } => crate::functional::batch_norm_backward(dy, x, weight, stats),
        }
    }

    fn cpu_fwd_t<T: CandleElem>(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = with_storage::<T, _>(s1, l1, |x| {
            with_storage::<f32, _>(s2, l2, |w| {
                with_storage::<f32, _>(s3, l3, |b| self.forward(x, w, b, true).map_err(err))?
            })?
        })??;
        *self.saved.lock().map_err(poisoned)? = Some(out.stats);
        into_output(out.output)
    }

    /// Whether the op's output on `x` is channels-last (returned as `(N, *s, C)`, see
    /// [`op_shape`]): a planes op (GroupNorm, BatchNorm, InstanceNorm) keeps a channels-last
    /// input's layout, as PyTorch's do; LayerNorm and RMSNorm give a contiguous output.
    fn keeps_channels_last(&self, x: &CTensor) -> bool {
        !matches!(self.kind, Kind::Rows { .. }) && is_channels_last(x.layout())
    }

    /// The op's output (or the gradient op's `dx`) `y` on input `x` as an `(N, C, *s)` tensor:
    /// itself, or a channels-last view of it (see [`op_shape`]).
    fn view(&self, x: &CTensor, y: CTensor) -> candle_core::Result<CTensor> {
        if self.keeps_channels_last(x) {
            y.permute(from_last(y.rank()))
        } else {
            Ok(y)
        }
    }

    /// The gradient of the op's output (in the shape the op returned) as an `(N, C, *s)` tensor
    /// in `x`'s layout: in place when it already is (a contiguous gradient of a contiguous
    /// output, or a channels-last one), else rearranged once.
    fn grad_of(&self, x: &CTensor, grad: &CTensor) -> candle_core::Result<CTensor> {
        if self.keeps_channels_last(x) {
            return grad_like(&grad.permute(from_last(grad.rank()))?, x);
        }
        grad_like(grad, x)
    }

    /// Runs the op on the prepared inputs ([`prepare`]) with candle's autograd.
    fn apply(self, x: &CTensor, w: &CTensor, b: &CTensor) -> candle_core::Result<CTensor> {
        let cl = self.keeps_channels_last(x);
        let y = x.apply_op3(w, b, self)?;
        if cl {
            y.permute(from_last(y.rank()))
        } else {
            Ok(y)
        }
    }

    /// The CPU backward: [`CpuGrad`] reads x and dy in candle's storage (no copy).
    fn bwd_t(
        &self,
        x: &CTensor,
        w: &CTensor,
        b: &CTensor,
        grad: &CTensor,
    ) -> candle_core::Result<(Option<CTensor>, Option<CTensor>, Option<CTensor>)> {
        #[cfg(feature = "candle-cuda")]
        if x.device().is_cuda() {
            return self.cuda_bwd(x, w, b, grad);
        }
        let op = CpuGrad {
            norm: self,
            params: Mutex::new(None),
        };
        let dx = x.apply_op3_no_bwd(&self.grad_of(x, grad)?, w, &op)?;
        let dx = self.view(x, dx)?;
        let (dw, db) = op.params.lock().map_err(poisoned)?.take().ok_or_else(|| {
            candle_core::Error::Msg("cunorm: the gradient op left no parameter gradients".into())
        })?;
        let dw = match (self.weight_grad, dw) {
            (true, Some(t)) => Some(param_grad(t, w)?),
            _ => None,
        };
        let db = match (self.has_bias, db) {
            (true, Some(t)) => Some(param_grad(t, b)?),
            _ => None,
        };
        Ok((Some(dx), dw, db))
    }
}

/// Calls `self.method::<T>(args)` for the element type of candle dtype `dt` (f32, f16, bf16),
/// an error naming the op for any other.
macro_rules! by_dtype {
    ($self:ident, $dt:expr, $method:ident($($arg:expr),*)) => {
        match $dt {
            candle_core::DType::F32 => $self.$method::<f32>($($arg),*),
            candle_core::DType::F16 => $self.$method::<f16>($($arg),*),
            candle_core::DType::BF16 => $self.$method::<bf16>($($arg),*),
            d => Err(candle_core::Error::Msg(format!(
                "cunorm: {} takes f32, f16 or bf16, got {d:?}",
                $self.name()
            ))),
        }
    };
}

/// The CPU gradient op on (x, dy, weight): `dx` as its output, `dweight`/`dbias` left in
/// `params`. As a candle op it is handed the storages, so x and dy are read where they are.
struct CpuGrad<'a> {
    norm: &'a CandleNorm,
    #[allow(clippy::type_complexity)]
    params: Mutex<Option<(Option<Tensor<f32>>, Option<Tensor<f32>>)>>,
}

impl CpuGrad<'_> {
    fn run<T: CandleElem>(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let norm = self.norm;
        let saved = norm.saved.lock().map_err(poisoned)?.clone();
        let g = with_storage::<T, _>(s1, l1, |x| {
            with_storage::<T, _>(s2, l2, |dy| {
                with_storage::<f32, _>(s3, l3, |w| {
                    let stats = match &saved {
                        Some(s) => s.clone(),
                        // The bias does not enter the statistics: the weight stands in for it.
                        None => norm.forward(x, w, w, false)?.stats,
                    };
                    norm.backward(dy, x, w, &stats)
                })?
                .map_err(err)
            })?
        })??;
        *self.params.lock().map_err(poisoned)? = Some((g.dweight, g.dbias));
        into_output(g.dx)
    }
}

impl CustomOp3 for CpuGrad<'_> {
    fn name(&self) -> &'static str {
        "cunorm-cpu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        by_dtype!(self, s1.dtype(), run(s1, l1, s2, l2, s3, l3))
    }
}

impl CustomOp3 for CandleNorm {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Rows { center: true } => "cunorm-layer-norm",
            Kind::Rows { center: false } => "cunorm-rms-norm",
            Kind::Groups(_) => "cunorm-group-norm",
            Kind::Planes { instance: true, .. } => "cunorm-instance-norm",
            Kind::Planes { .. } => "cunorm-batch-norm",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        by_dtype!(self, s1.dtype(), cpu_fwd_t(s1, l1, s2, l2, s3, l3))
    }

    fn bwd(
        &self,
        x: &CTensor,
        w: &CTensor,
        b: &CTensor,
        _res: &CTensor,
        grad: &CTensor,
    ) -> candle_core::Result<(Option<CTensor>, Option<CTensor>, Option<CTensor>)> {
        self.bwd_t(x, w, b, grad)
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        by_dtype!(self, s1.dtype(), cuda_fwd_t(s1, l1, s2, l2, s3, l3))
    }
}

#[cfg(feature = "candle-cuda")]
impl CandleNorm {
    fn cuda_fwd_t<T: cuda::CudaElem>(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (y, shape, saved) = cuda::forward::<T>(
            &self.kind,
            self.eps,
            self.has_weight,
            self.has_bias,
            s1,
            l1,
            s2,
            l2,
            s3,
            l3,
        )?;
        *self.saved_cuda.lock().map_err(poisoned)? = Some(Arc::new(saved));
        Ok((y, shape))
    }

    /// The backward on candle's CUDA device: `dx` from the gradient op, then `dweight` and
    /// `dbias` taken from its slot (see `cuda.rs`).
    fn cuda_bwd(
        &self,
        x: &CTensor,
        w: &CTensor,
        b: &CTensor,
        grad: &CTensor,
    ) -> candle_core::Result<(Option<CTensor>, Option<CTensor>, Option<CTensor>)> {
        let saved = self
            .saved_cuda
            .lock()
            .map_err(poisoned)?
            .clone()
            .ok_or_else(|| {
                candle_core::Error::Msg("cunorm: backward before a forward on CUDA".into())
            })?;
        let op = cuda::GradOp {
            kind: self.kind.clone(),
            has_weight: self.has_weight,
            saved,
            dw: Arc::new(Mutex::new(None)),
            db: Arc::new(Mutex::new(None)),
        };
        // The weight is the op's third input, so candle holds its storage (no second lock).
        let dx = x.apply_op3_no_bwd(&self.grad_of(x, grad)?, w, &op)?;
        let dx = self.view(x, dx)?;
        let take = |slot: &cuda::Slot, p: &CTensor| -> candle_core::Result<CTensor> {
            cuda::take(x, slot, p.elem_count())?.reshape(p.shape())
        };
        let dw = self.weight_grad.then(|| take(&op.dw, w)).transpose()?;
        let db = self.has_bias.then(|| take(&op.db, b)).transpose()?;
        Ok((Some(dx), dw, db))
    }
}

/// Parameters as f32 and contiguous, the input as the op reads it: a channels-last input in
/// place for a planes op (`keep_channels_last`), else contiguous (a no-op when it is).
fn prepare(
    x: &CTensor,
    w: &CTensor,
    b: Option<&CTensor>,
    keep_channels_last: bool,
) -> candle_core::Result<(CTensor, CTensor, CTensor)> {
    let f32 = candle_core::DType::F32;
    let w = w.to_dtype(f32)?.contiguous()?;
    let b = match b {
        Some(b) => b.to_dtype(f32)?.contiguous()?,
        None => w.zeros_like()?,
    };
    let x = if keep_channels_last && is_channels_last(x.layout()) {
        x.clone()
    } else {
        x.contiguous()?
    };
    Ok((x, w, b))
}

/// LayerNorm over the last dimension(s) of `x` matching `weight`'s shape: `(x − mean)/√(var +
/// eps)·weight + bias`, with backward (input, weight, bias).
pub fn layer_norm_op(
    x: &CTensor,
    weight: &CTensor,
    bias: Option<&CTensor>,
    eps: f64,
) -> candle_core::Result<CTensor> {
    let (x, w, b) = prepare(x, weight, bias, false)?;
    CandleNorm::new(Kind::Rows { center: true }, eps, bias.is_some()).apply(&x, &w, &b)
}

/// RMSNorm over the last dimension(s) of `x` matching `weight`'s shape: `x/√(mean(x²) + eps)·weight`,
/// with backward (input, weight).
pub fn rms_norm_op(x: &CTensor, weight: &CTensor, eps: f64) -> candle_core::Result<CTensor> {
    let (x, w, b) = prepare(x, weight, None, false)?;
    CandleNorm::new(Kind::Rows { center: false }, eps, false).apply(&x, &w, &b)
}

/// GroupNorm of an `(N, C, *)` input with `num_groups` groups and per-channel `weight` and
/// `bias`, with backward (input, weight, bias).
pub fn group_norm_op(
    x: &CTensor,
    num_groups: usize,
    weight: &CTensor,
    bias: Option<&CTensor>,
    eps: f64,
) -> candle_core::Result<CTensor> {
    let (x, w, b) = prepare(x, weight, bias, true)?;
    CandleNorm::new(Kind::Groups(num_groups), eps, bias.is_some()).apply(&x, &w, &b)
}

/// The f32 values of a running statistic `Var` (any float dtype).
fn var_values(v: &Var) -> candle_core::Result<Vec<f32>> {
    v.as_tensor()
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()
}

/// BatchNorm or InstanceNorm through the op, then the running statistics written back.
#[allow(clippy::too_many_arguments)]
fn planes_op(
    instance: bool,
    x: &CTensor,
    running: Option<(&Var, &Var)>,
    weight: Option<&CTensor>,
    bias: Option<&CTensor>,
    training: bool,
    momentum: f64,
    eps: f64,
) -> candle_core::Result<CTensor> {
    let name = if instance {
        "instance_norm"
    } else {
        "batch_norm"
    };
    if x.rank() < 2 {
        candle_core::bail!(
            "cunorm {name}: expected an (N, C, *) input, got shape {:?}",
            x.shape()
        )
    }
    let c = x.dim(1)?;
    let on_cpu = x.device().is_cpu();
    let shared = match running {
        Some((m, v)) if on_cpu => Some(Arc::new(Mutex::new(Running {
            mean: var_values(m)?,
            var: var_values(v)?,
        }))),
        _ => None,
    };
    #[cfg(feature = "candle-cuda")]
    let device_running = match running {
        Some((m, v)) if !on_cpu => Some(cuda::DeviceRunning::new(m, v)?),
        _ => None,
    };
    // Without a weight the op still reads one (ones; a bias alone needs it for its gradient)
    // and returns no gradient for it (`weight_grad`).
    let ones;
    let w = match weight {
        Some(w) => w,
        None => {
            ones = CTensor::ones(c, candle_core::DType::F32, x.device())?;
            &ones
        }
    };
    let (xp, w, b) = prepare(x, w, bias, true)?;
    let op = CandleNorm {
        kind: Kind::Planes {
            instance,
            training,
            momentum,
            running: shared.clone(),
            #[cfg(feature = "candle-cuda")]
            device_running: device_running.clone(),
        },
        eps,
        has_weight: weight.is_some() || bias.is_some(),
        weight_grad: weight.is_some(),
        has_bias: bias.is_some(),
        saved: Mutex::new(None),
        #[cfg(feature = "candle-cuda")]
        saved_cuda: Mutex::new(None),
    };
    let y = op.apply(&xp, &w, &b)?;
    #[cfg(feature = "candle-cuda")]
    if let (true, Some((m, v)), Some(d)) = (training, running, device_running) {
        d.write_back(&y, m, v)?;
    }
    if let (true, Some((m, v)), Some(r)) = (training, running, shared) {
        let r = r.lock().map_err(poisoned)?;
        for (var, vals) in [(m, &r.mean), (v, &r.var)] {
            let t =
                CTensor::from_vec(vals.clone(), var.dims(), var.device())?.to_dtype(var.dtype())?;
            var.set(&t)?;
        }
    }
    Ok(y)
}

/// BatchNorm of an `(N, C, *)` input, like `torch.nn.functional.batch_norm`: in training mode
/// with the batch's statistics, and, when `running` (`running_mean`, `running_var`, `[C]`) is
/// given, those updated in place (`r = (1 − momentum)·r + momentum·s`, the unbiased variance);
/// in eval mode with `running`. Optional per-channel `weight` and `bias`. Backward gives
/// gradients for the input, weight and bias (through the batch statistics in training mode).
pub fn batch_norm_op(
    x: &CTensor,
    running: Option<(&Var, &Var)>,
    weight: Option<&CTensor>,
    bias: Option<&CTensor>,
    training: bool,
    momentum: f64,
    eps: f64,
) -> candle_core::Result<CTensor> {
    planes_op(false, x, running, weight, bias, training, momentum, eps)
}

/// InstanceNorm of an `(N, C, *)` input (`N, C` and at least one spatial dimension), like
/// `torch.nn.functional.instance_norm`: each (sample, channel) normalized with its own
/// statistics when `use_input_stats` (the running statistics, when given, updated in place
/// with their batch average), else with `running`. Backward as [`batch_norm_op`].
pub fn instance_norm_op(
    x: &CTensor,
    running: Option<(&Var, &Var)>,
    weight: Option<&CTensor>,
    bias: Option<&CTensor>,
    use_input_stats: bool,
    momentum: f64,
    eps: f64,
) -> candle_core::Result<CTensor> {
    planes_op(
        true,
        x,
        running,
        weight,
        bias,
        use_input_stats,
        momentum,
        eps,
    )
}
