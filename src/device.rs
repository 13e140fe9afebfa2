//! Where tensors live and ops run.

use crate::cuda::CudaDevice;
use crate::error::Result;

/// A compute device: the CPU (always usable) or one CUDA GPU.
#[derive(Clone, Debug)]
pub enum Device {
    /// The CPU reference path, parallel over the rayon thread pool.
    Cpu,
    /// A CUDA GPU, with its context and stream.
    Cuda(CudaDevice),
}

impl Device {
    /// Opens CUDA device `ordinal`. Fails with [`Error::Unavailable`](crate::Error) (never
    /// panics) when the driver, a device or NVRTC is missing.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        Ok(Device::Cuda(CudaDevice::new(ordinal)?))
    }

    /// CUDA device 0 when it is usable, else the CPU together with the one-line reason why CUDA
    /// is not used.
    pub fn auto() -> (Device, Option<String>) {
        match Device::cuda(0) {
            Ok(d) => (d, None),
            Err(e) => (Device::Cpu, Some(e.to_string())),
        }
    }

    /// `true` for [`Device::Cpu`].
    pub fn is_cpu(&self) -> bool {
        matches!(self, Device::Cpu)
    }

    /// A short description: `cpu` or `cuda:0 (NVIDIA H100 ...)`.
    pub fn describe(&self) -> String {
        match self {
            Device::Cpu => format!("cpu ({} threads)", rayon::current_num_threads()),
            Device::Cuda(d) => format!(
                "cuda:{} ({})",
                d.ordinal(),
                d.name().unwrap_or_else(|_| "unknown".into())
            ),
        }
    }

    pub(crate) fn same(&self, other: &Device) -> bool {
        match (self, other) {
            (Device::Cpu, Device::Cpu) => true,
            (Device::Cuda(a), Device::Cuda(b)) => a.same(b),
            _ => false,
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(d) => write!(f, "cuda:{}", d.ordinal()),
        }
    }
}
