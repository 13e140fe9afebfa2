//! The kernel registry of the op families: every CUDA entry point by module, and the one way a
//! launch names a templated kernel (`<op>_<stage>_<dtype>`).

use crate::cuda::{nvrtc, CudaDevice};
use crate::device::Device;
use crate::dtype::{DType, Element};
use crate::error::Result;

/// The entry points of one kernel file (`kernels/<name>.cu`).
struct Module {
    name: &'static str,
    /// Compiled as one module per dtype (`<name>.<dtype>`: the file's first line says so to
    /// build.rs), each with its dtype's instances of `per_dtype`, so that a program using one
    /// dtype compiles a third of the file at its first use.
    split: bool,
    /// Templated kernels, instantiated once per dtype as `<kernel>_<dtype>`.
    per_dtype: &'static [&'static str],
    /// Kernels instantiated once: on f32 statistics only, for f32 data only, or typeless. In a
    /// split file: in its f32 module only.
    f32_only: &'static [&'static str],
    /// In a split file: kernels in every dtype's module (helpers all dtypes launch).
    shared: &'static [&'static str],
}

const MODULES: [Module; 3] = [
    Module {
        name: "rows",
        split: true,
        per_dtype: &[
            "layer_norm_fwd",
            "rms_norm_fwd",
            "group_norm_fwd",
            "layer_norm_fwd_wide",
            "rms_norm_fwd_wide",
            "group_norm_fwd_wide",
            "layer_norm_fwd_cluster4",
            "layer_norm_fwd_cluster8",
            "rms_norm_fwd_cluster4",
            "rms_norm_fwd_cluster8",
            "group_norm_fwd_cluster4",
            "group_norm_fwd_cluster8",
            "layer_norm_bwd_cluster8",
            "rms_norm_bwd_cluster8",
            "layer_norm_bwd_sums",
            "rms_norm_bwd_sums",
            "layer_norm_bwd_tile",
            "rms_norm_bwd_tile",
            "layer_norm_fwd_reg1",
            "rms_norm_fwd_reg1",
            "layer_norm_bwd_reg1",
            "rms_norm_bwd_reg1",
            "layer_norm_fwd_team1",
            "layer_norm_fwd_team2",
            "layer_norm_fwd_team4",
            "layer_norm_fwd_team8",
            "rms_norm_fwd_team1",
            "rms_norm_fwd_team2",
            "rms_norm_fwd_team4",
            "rms_norm_fwd_team8",
            "layer_norm_bwd_team1",
            "layer_norm_bwd_team2",
            "layer_norm_bwd_team4",
            "rms_norm_bwd_team1",
            "rms_norm_bwd_team2",
            "rms_norm_bwd_team4",
        ],
        f32_only: &[
            "layer_norm_fwd_reg2_f32",
            "layer_norm_fwd_reg4_f32",
            "rms_norm_fwd_reg2_f32",
            "rms_norm_fwd_reg4_f32",
            "layer_norm_bwd_reg2_f32",
            "layer_norm_bwd_reg4_f32",
            "rms_norm_bwd_reg2_f32",
            "rms_norm_bwd_reg4_f32",
        ],
        shared: &["rows_col_sum_f32"],
    },
    Module {
        name: "planes",
        split: true,
        per_dtype: &[
            "planes_stats",
            "planes_stats_cl",
            "planes_grad_sums",
            "planes_grad_sums_cl",
            "planes_apply",
            "planes_grad_apply",
            "planes_tile_fwd",
            "planes_tile_bwd",
            "planes_tile_bwd_contig",
        ],
        f32_only: &[],
        shared: &[
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
        split: false,
        per_dtype: &[],
        f32_only: &["l2_flush_read"],
        shared: &[],
    },
];

/// The name of templated kernel `kernel` instantiated for `T`: `layer_norm_fwd` → `layer_norm_fwd_bf16`.
pub(crate) fn name<T: Element>(kernel: &str) -> String {
    format!("{kernel}_{}", T::DTYPE.name())
}

/// The module of kernel file `file` that holds `T`'s kernels: `rows.bf16` for a split file,
/// else `file` itself.
pub(crate) fn module<T: Element>(file: &'static str) -> &'static str {
    module_for(file, T::DTYPE.name())
}

fn module_for(file: &'static str, dtype: &str) -> &'static str {
    nvrtc::module_names()
        .find(|m| m.strip_prefix(file).and_then(|r| r.strip_prefix('.')) == Some(dtype))
        .unwrap_or(file)
}

/// Every kernel entry point, as (module, name). `tests/nvrtc_compile.rs` checks this list
/// against the entry points in the compiled PTX, both ways.
pub fn entry_points() -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    for m in &MODULES {
        for dt in ["f32", "f16", "bf16"] {
            let module = if m.split {
                module_for(m.name, dt)
            } else {
                m.name
            };
            out.extend(m.per_dtype.iter().map(|k| (module, format!("{k}_{dt}"))));
            if m.split {
                out.extend(m.shared.iter().map(|k| (module, k.to_string())));
            }
        }
        let f32_module = if m.split {
            module_for(m.name, "f32")
        } else {
            m.name
        };
        out.extend(m.f32_only.iter().map(|k| (f32_module, k.to_string())));
    }
    out
}

/// Compiles every module and loads every entry point on `dev` now rather than at first use.
pub fn warm_up(dev: &CudaDevice) -> Result<()> {
    dev.preload(&entry_points())
}

/// The entry points of `dtypes`: those of every module that is not compiled per dtype, and of
/// the per-dtype modules of `dtypes` (`rows.f16`, ...).
pub fn entry_points_for(dtypes: &[DType]) -> Vec<(&'static str, String)> {
    entry_points()
        .into_iter()
        .filter(|(m, _)| match m.split_once('.') {
            Some((_, dt)) => dtypes.iter().any(|d| d.name() == dt),
            None => true,
        })
        .collect()
}

impl Device {
    /// Compiles and loads every CUDA kernel now rather than at first use (nothing on the CPU):
    /// for all three dtypes (NVRTC, modules in parallel; once per machine, as compiled kernels
    /// stay in the disk cache). [`Device::warm_up_dtypes`] compiles fewer.
    pub fn warm_up(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(d) => warm_up(d),
        }
    }

    /// As [`Device::warm_up`], for the kernels of `dtypes` only (the ops of a model that runs
    /// in bf16 need `&[DType::BF16]`): a third of the compile per dtype left out.
    pub fn warm_up_dtypes(&self, dtypes: &[DType]) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(d) => d.preload(&entry_points_for(dtypes)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_points_for_a_dtype_keep_its_modules_and_the_unsplit_ones() {
        let all = entry_points();
        let mut union = Vec::new();
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let some = entry_points_for(&[dt]);
            // Every module of a dtype's list is that dtype's or an unsplit one, and every
            // entry of those modules is there.
            for (m, _) in &some {
                assert!(
                    !m.contains('.') || m.ends_with(&format!(".{}", dt.name())),
                    "{m}"
                );
            }
            let want: Vec<_> = all
                .iter()
                .filter(|(m, _)| some.iter().any(|(n, _)| n == m))
                .cloned()
                .collect();
            assert_eq!(some, want, "{dt:?}");
            // The dtype's own templated kernels are there (one row kernel, one planes kernel).
            for k in ["layer_norm_fwd", "planes_apply"] {
                let name = format!("{k}_{}", dt.name());
                assert!(some.iter().any(|(_, n)| *n == name), "{name}");
            }
            union.extend(some);
        }
        union.sort();
        union.dedup();
        let mut all_sorted = all.clone();
        all_sorted.sort();
        all_sorted.dedup();
        assert_eq!(union, all_sorted);
        // Two dtypes: both lists, nothing else.
        let two = entry_points_for(&[DType::F16, DType::BF16]);
        assert!(two.iter().all(|(m, _)| !m.ends_with(".f32")));
        assert!(two.iter().any(|(m, _)| m.ends_with(".f16")));
        assert!(two.iter().any(|(m, _)| m.ends_with(".bf16")));
    }
}
