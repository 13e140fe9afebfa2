//! The kernel registry of the op families: every CUDA entry point by module, and the one way a
//! launch names a templated kernel (`<op>_<stage>_<dtype>`).

use crate::cuda::CudaDevice;
use crate::device::Device;
use crate::dtype::Element;
use crate::error::Result;

/// The entry points of one kernel module (`kernels/<module>.cu`).
struct Module {
    name: &'static str,
    /// Templated kernels, instantiated once per dtype as `<kernel>_<dtype>`.
    per_dtype: &'static [&'static str],
    /// Kernels instantiated once: on f32 statistics only, for f32 data only, or typeless.
    f32_only: &'static [&'static str],
}

const MODULES: [Module; 3] = [
    Module {
        name: "rows",
        per_dtype: &[
            "layer_norm_fwd",
            "rms_norm_fwd",
            "group_norm_fwd",
            "layer_norm_fwd_wide",
            "rms_norm_fwd_wide",
            "group_norm_fwd_wide",
            "layer_norm_bwd_sums",
            "rms_norm_bwd_sums",
            "layer_norm_bwd_tile",
            "rms_norm_bwd_tile",
            "layer_norm_fwd_reg1",
            "rms_norm_fwd_reg1",
            "layer_norm_bwd_reg1",
            "layer_norm_bwd_reg2",
            "layer_norm_bwd_reg4",
            "rms_norm_bwd_reg1",
            "rms_norm_bwd_reg2",
            "rms_norm_bwd_reg4",
        ],
        f32_only: &[
            "rows_col_sum_f32",
            "layer_norm_fwd_reg2_f32",
            "layer_norm_fwd_reg4_f32",
            "rms_norm_fwd_reg2_f32",
            "rms_norm_fwd_reg4_f32",
        ],
    },
    Module {
        name: "planes",
        per_dtype: &[
            "planes_stats",
            "planes_stats_cl",
            "planes_grad_sums",
            "planes_grad_sums_cl",
            "planes_apply",
            "planes_grad_apply",
        ],
        f32_only: &[
            "planes_finalize_f32",
            "planes_running_update_f32",
            "planes_eval_stats_f32",
            "planes_coef_f32",
            "planes_grad_finalize_f32",
            "planes_grad_params_f32",
        ],
    },
    Module {
        name: "util",
        per_dtype: &[],
        f32_only: &["l2_flush_read"],
    },
];

/// The name of templated kernel `kernel` instantiated for `T`: `layer_norm_fwd` → `layer_norm_fwd_bf16`.
pub(crate) fn name<T: Element>(kernel: &str) -> String {
    format!("{kernel}_{}", T::DTYPE.name())
}

/// Every kernel entry point, as (module, name). `tests/nvrtc_compile.rs` checks this list
/// against the entry points in the compiled PTX, both ways.
pub fn entry_points() -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    for m in &MODULES {
        for k in m.per_dtype {
            out.extend(["f32", "f16", "bf16"].map(|dt| (m.name, format!("{k}_{dt}"))));
        }
        out.extend(m.f32_only.iter().map(|k| (m.name, k.to_string())));
    }
    out
}

/// Compiles every module and loads every entry point on `dev` now rather than at first use.
pub fn warm_up(dev: &CudaDevice) -> Result<()> {
    dev.preload(&entry_points())
}

impl Device {
    /// Compiles and loads every CUDA kernel now rather than at first use (nothing on the CPU).
    pub fn warm_up(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(d) => warm_up(d),
        }
    }
}
