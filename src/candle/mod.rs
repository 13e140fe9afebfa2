//! candle custom ops and drop-in modules over cunorm's engines, **with backward** through
//! candle's autograd (feature `candle`).
//!
//! candle-nn's fused LayerNorm and RmsNorm are applied without a backward (contiguous inputs cut
//! the graph), compute the LayerNorm variance as E[x²] − E[x]², and candle has no fused GroupNorm.
//! These ops keep candle's graph (gradients for input, weight and bias), with cunorm's statistics
//! (f64 on the CPU, corrected two-pass; never E[x²] − E[x]²).
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
//! This first version runs on candle's CPU device (the crate's CPU engines); on a CUDA device
//! the ops return an error naming the fix (move the tensors to the CPU).

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor as CTensor};

use crate::dtype::Element;
use crate::ops::{Gradients, NormOutput, Param, SavedStats};
use crate::tensor::Tensor;
use crate::{bf16, f16};

mod modules;
pub use modules::{group_norm, layer_norm, rms_norm, GroupNorm, LayerNorm, RmsNorm};

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

/// A contiguous candle CPU storage as a cunorm tensor of `T` (one copy of the used range).
fn from_storage<T: CandleElem>(s: &CpuStorage, l: &Layout) -> candle_core::Result<Tensor<T>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        return Err(candle_core::Error::Msg(
            "cunorm: the op needs a contiguous input; call .contiguous() first".into(),
        ));
    };
    let Some(v) = T::slice(s) else {
        return Err(candle_core::Error::Msg(format!(
            "cunorm: expected {} storage, got {:?}",
            <T as Element>::DTYPE,
            s.dtype()
        )));
    };
    Tensor::from_vec(v[a..b].to_vec(), l.dims()).map_err(err)
}

/// A candle tensor (any device) as a cunorm CPU tensor of `T`.
fn from_candle<T: CandleElem>(t: &CTensor) -> candle_core::Result<Tensor<T>> {
    let v = t
        .flatten_all()?
        .to_dtype(<T as candle_core::WithDType>::DTYPE)?
        .to_vec1::<T>()?;
    Tensor::from_vec(v, t.dims()).map_err(err)
}

/// A cunorm tensor as a candle tensor on `like`'s device, in `like`'s dtype.
fn to_candle<T: CandleElem>(t: &Tensor<T>, like: &CTensor) -> candle_core::Result<CTensor> {
    let v = t.to_vec().map_err(err)?;
    CTensor::from_vec(v, t.shape(), like.device())?.to_dtype(like.dtype())
}

/// Which normalization an op runs.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// LayerNorm over the last `cols` elements of each row (`center`), or RMSNorm (no mean).
    Rows { center: bool },
    /// GroupNorm with `groups` groups over dimension 1.
    Groups(usize),
}

/// One forward of `kind` on (x, weight, bias); keeps the statistics for its backward.
struct NormOp {
    kind: Kind,
    eps: f64,
    has_bias: bool,
    saved: Mutex<Option<SavedStats>>,
}

impl NormOp {
    fn new(kind: Kind, eps: f64, has_bias: bool) -> Self {
        NormOp {
            kind,
            eps,
            has_bias,
            saved: Mutex::new(None),
        }
    }

    fn forward<T: Element>(
        &self,
        x: &Tensor<T>,
        w: &Tensor<T>,
        b: &Tensor<T>,
    ) -> crate::Result<NormOutput<T>> {
        let bias = self.has_bias.then_some(b as &dyn Param);
        match self.kind {
            Kind::Rows { center } => {
                let ns = w.shape().to_vec();
                if center {
                    crate::functional::layer_norm(x, &ns, Some(w), bias, self.eps)
                } else {
                    crate::functional::rms_norm(x, &ns, Some(w), Some(self.eps))
                }
            }
            Kind::Groups(g) => crate::functional::group_norm(x, g, Some(w), bias, self.eps),
        }
    }

    fn backward<T: Element>(
        &self,
        dy: &Tensor<T>,
        x: &Tensor<T>,
        w: &Tensor<T>,
        stats: &SavedStats,
    ) -> crate::Result<Gradients<T>> {
        match self.kind {
            Kind::Rows { center } => {
                let ns = w.shape().to_vec();
                if center {
                    crate::functional::layer_norm_backward(dy, x, &ns, Some(w), true, stats)
                } else {
                    crate::functional::rms_norm_backward(dy, x, &ns, Some(w), stats)
                }
            }
            Kind::Groups(g) => crate::functional::group_norm_backward(dy, x, g, Some(w), stats),
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
        let (x, w, b) = (
            from_storage::<T>(s1, l1)?,
            from_storage::<T>(s2, l2)?,
            from_storage::<T>(s3, l3)?,
        );
        let out = self.forward(&x, &w, &b).map_err(err)?;
        *self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("cunorm: poisoned".into()))? = Some(out.stats);
        let y = out.output.to_vec().map_err(err)?;
        Ok((T::storage(y), Shape::from(l1.dims())))
    }

    fn bwd_t<T: CandleElem>(
        &self,
        x: &CTensor,
        w: &CTensor,
        b: &CTensor,
        grad: &CTensor,
    ) -> candle_core::Result<(Option<CTensor>, Option<CTensor>, Option<CTensor>)> {
        let (xc, wc, bc, dy) = (
            from_candle::<T>(x)?,
            from_candle::<T>(w)?,
            from_candle::<T>(b)?,
            from_candle::<T>(grad)?,
        );
        let saved = self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("cunorm: poisoned".into()))?
            .clone();
        let stats = match saved {
            Some(s) => s,
            None => self.forward(&xc, &wc, &bc).map_err(err)?.stats,
        };
        let g = self.backward(&dy, &xc, &wc, &stats).map_err(err)?;
        let (dw, db) = g.param_grads_as::<T>().map_err(err)?;
        let dx = to_candle(&g.dx, x)?;
        let dw = dw.map(|t| to_candle(&t, w)).transpose()?;
        let db = match (self.has_bias, db) {
            (true, Some(t)) => Some(to_candle(&t, b)?),
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

impl CustomOp3 for NormOp {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Rows { center: true } => "cunorm-layer-norm",
            Kind::Rows { center: false } => "cunorm-rms-norm",
            Kind::Groups(_) => "cunorm-group-norm",
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
        by_dtype!(self, x.dtype(), bwd_t(x, w, b, grad))
    }
}

/// Parameters in the input's dtype and contiguous, the input contiguous: what the op reads.
fn prepare(
    x: &CTensor,
    w: &CTensor,
    b: Option<&CTensor>,
) -> candle_core::Result<(CTensor, CTensor, CTensor)> {
    let w = w.to_dtype(x.dtype())?.contiguous()?;
    let b = match b {
        Some(b) => b.to_dtype(x.dtype())?.contiguous()?,
        None => w.zeros_like()?,
    };
    Ok((x.contiguous()?, w, b))
}

/// LayerNorm over the last dimension(s) of `x` matching `weight`'s shape: `(x − mean)/√(var +
/// eps)·weight + bias`, with backward (input, weight, bias).
pub fn layer_norm_op(
    x: &CTensor,
    weight: &CTensor,
    bias: Option<&CTensor>,
    eps: f64,
) -> candle_core::Result<CTensor> {
    let (x, w, b) = prepare(x, weight, bias)?;
    x.apply_op3(
        &w,
        &b,
        NormOp::new(Kind::Rows { center: true }, eps, bias.is_some()),
    )
}

/// RMSNorm over the last dimension(s) of `x` matching `weight`'s shape: `x/√(mean(x²) + eps)·weight`,
/// with backward (input, weight).
pub fn rms_norm_op(x: &CTensor, weight: &CTensor, eps: f64) -> candle_core::Result<CTensor> {
    let (x, w, b) = prepare(x, weight, None)?;
    x.apply_op3(
        &w,
        &b,
        NormOp::new(Kind::Rows { center: false }, eps, false),
    )
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
    let (x, w, b) = prepare(x, weight, bias)?;
    x.apply_op3(
        &w,
        &b,
        NormOp::new(Kind::Groups(num_groups), eps, bias.is_some()),
    )
}
