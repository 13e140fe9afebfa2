//! # cunorm
//!
//! PyTorch-exact normalization layers — BatchNorm (1d/2d/3d), InstanceNorm (1d/2d/3d),
//! LayerNorm, GroupNorm and RMSNorm — forward and backward, for `f32`, `f16` and `bf16`
//! inputs in contiguous (NCHW) or channels-last (NHWC) layout.
//!
//! Two backends sit behind one API, chosen by where the input lives ([`Device`]):
//! - the **CPU** path (exact statistics, f32 element work, parallel with rayon), always
//!   available, and the oracle the CUDA output is tested against;
//! - the **CUDA** path: hand-written kernels compiled at run time by NVRTC.
//!
//! ```
//! use cunorm::{functional as F, BatchNorm2d, Norm, Tensor};
//!
//! # fn main() -> cunorm::Result<()> {
//! // A batch of 2 images with 4 channels of 2×2 pixels.
//! let data: Vec<f32> = (0..32).map(|i| (i as f32 * 0.37).sin()).collect();
//! let x = Tensor::from_vec(data, &[2, 4, 2, 2])?;
//!
//! // The module: running statistics updated in training mode.
//! let mut bn = BatchNorm2d::new(4)?;
//! let out = bn.forward_with_stats(&x)?;
//! assert_eq!(bn.num_batches_tracked(), Some(1));
//!
//! // Backward from an upstream gradient.
//! let dy = Tensor::<f32>::randn(&[2, 4, 2, 2], 1)?;
//! let grads = bn.backward(&dy, &x, &out.stats)?;
//! assert_eq!(grads.dx.shape(), &[2, 4, 2, 2]);
//!
//! // The functional form, like torch.nn.functional.layer_norm.
//! let y = F::layer_norm(&x, &[4, 2, 2], None, None, 1e-5)?.output;
//! assert_eq!(y.shape(), x.shape());
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

#[cfg(feature = "candle")]
pub mod candle;
mod cpu_cache;
pub mod cuda;
mod device;
mod dtype;
mod error;
pub mod layers;
mod ops;
mod tensor;

pub use cpu_cache::empty_cpu_cache;
pub use device::Device;
pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use layers::*;
pub use ops::kernels;
pub use ops::planes::{Grouping, PlaneShape, Running, Source};
pub use ops::{Gradients, NormOp, NormOutput, Param, SavedStats};

/// The launch layer over cudarc buffers, for code that already holds `CudaSlice`/`CudaView`s:
/// every function checks lengths (an `Err`, never a panic or an out-of-bounds launch), queues
/// its kernels on the device's stream and returns without synchronizing. Element type `T` is
/// `f32`, `f16` or `bf16`; parameters, statistics and parameter gradients are `f32`.
pub mod raw {
    pub use crate::ops::planes::cuda::{planes_backward, planes_forward, ViewSource};
    pub use crate::ops::planes::{Grouping, PlaneShape, Running, Source};
    pub use crate::ops::rows::cuda::{
        layer_norm_backward, layer_norm_forward, rms_norm_backward, rms_norm_forward,
    };
}
pub use tensor::{MemoryFormat, Tensor};

/// The instruction set the CPU kernels run with on this machine: `"avx512"` (AVX-512 F, BW,
/// VL and DQ), `"avx2"` (AVX2, FMA and F16C) or `"baseline"`. The widest the CPU supports,
/// capped by the environment variable `CUNORM_CPU_ISA` (one of those names; read once) for
/// comparing them on one machine. The AVX-512 and AVX2 kernels give the same bits; the
/// baseline ones round differently (no fused multiply-add) within the same tolerances. (The
/// bulk f16 conversions use F16C wherever the CPU has it, whatever the cap: the same bits.)
pub fn cpu_instruction_set() -> &'static str {
    ops::engine::simd::level().name()
}

/// Whether the AVX-512 kernels round bf16 outputs with AVX-512 BF16's `vcvtne2ps2bf16` (the
/// CPU has it and the level is `"avx512"`; `CUNORM_CPU_BF16=0` turns it off). The same bits
/// as without it. For `cunorm info`.
#[doc(hidden)]
pub fn cpu_bf16_rounding_in_hardware() -> bool {
    ops::engine::simd::bf16_hw()
}

/// Functional ops, like `torch.nn.functional`: forward (output + saved statistics) and
/// backward (`dx`, `dweight`, `dbias`) for every normalization.
pub mod functional {
    pub use crate::ops::rms_norm::RMS_NORM_DEFAULT_EPS;
    pub use crate::ops::{
        batch_norm, batch_norm_backward, group_norm, group_norm_backward, instance_norm,
        instance_norm_backward, layer_norm, layer_norm_backward, rms_norm, rms_norm_backward,
    };
}

pub use half::{bf16, f16};

/// The README's examples, compiled and run by `cargo test`.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
