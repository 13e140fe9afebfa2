//! The CUDA runtime: finding the driver and NVRTC, contexts and streams, device buffers.
//!
//! Nothing here panics when CUDA is missing: every entry point first checks that the driver
//! library is loadable (cudarc would panic on the first FFI call otherwise) and returns
//! [`Error::Unavailable`] with what was tried and how to fix it.

pub(crate) mod planes;
pub(crate) mod rows;

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};

use crate::dtype::Element;
use crate::error::{Error, Result};

pub(crate) fn driver_err(context: &str, e: cudarc::driver::DriverError) -> Error {
    Error::Cuda {
        context: context.to_string(),
        message: e.to_string(),
    }
}

/// Whether the CUDA driver library can be loaded and reports at least one device.
/// On failure the message explains what is missing.
pub fn probe() -> Result<usize> {
    // SAFETY: only attempts to dlopen the driver library by its usual names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::Unavailable(
            "no CUDA driver: libcuda.so could not be loaded (install the NVIDIA driver; cunorm \
             needs no CUDA toolkit)"
                .into(),
        ));
    }
    let count = CudaContext::device_count().map_err(|e| {
        Error::Unavailable(format!(
            "the CUDA driver is installed but reports no usable device ({e}); check \
             nvidia-smi and CUDA_VISIBLE_DEVICES"
        ))
    })?;
    if count <= 0 {
        return Err(Error::Unavailable(
            "the CUDA driver reports 0 devices; check nvidia-smi and CUDA_VISIBLE_DEVICES".into(),
        ));
    }
    Ok(count as usize)
}

struct Inner {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

/// One CUDA device: its context and the stream every cunorm launch on it is queued on.
#[derive(Clone)]
pub struct CudaDevice {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaDevice({})", self.inner.ordinal)
    }
}

impl CudaDevice {
    /// Opens device `ordinal` (its primary context) with a new non-blocking stream.
    pub fn new(ordinal: usize) -> Result<Self> {
        let count = probe()?;
        if ordinal >= count {
            return Err(Error::Unavailable(format!(
                "CUDA device {ordinal} does not exist: the driver reports {count} device(s); pick \
                 an ordinal below {count}"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_err("creating the context", e))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| driver_err("creating a stream", e))?;
        Ok(Self::from_parts(ctx, stream))
    }

    /// Wraps an existing cudarc context and stream (for code that already holds them).
    pub fn from_parts(ctx: Arc<CudaContext>, stream: Arc<CudaStream>) -> Self {
        CudaDevice {
            inner: Arc::new(Inner {
                ordinal: ctx.ordinal(),
                ctx,
                stream,
            }),
        }
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.inner.ordinal
    }

    /// The cudarc context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.inner.ctx
    }

    /// The stream cunorm queues work on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }

    /// The device's name as the driver reports it.
    pub fn name(&self) -> Result<String> {
        self.inner
            .ctx
            .name()
            .map_err(|e| driver_err("reading the device name", e))
    }

    /// Whether two handles refer to the same context.
    pub(crate) fn same(&self, other: &CudaDevice) -> bool {
        Arc::ptr_eq(&self.inner.ctx, &other.inner.ctx)
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        self.inner
            .stream
            .synchronize()
            .map_err(|e| driver_err("synchronizing the stream", e))
    }

    pub(crate) fn upload<T: Element>(&self, data: &[T]) -> Result<CudaBuffer<T>> {
        let slice = self
            .inner
            .stream
            .clone_htod(data)
            .map_err(|e| driver_err("copying host to device", e))?;
        Ok(CudaBuffer {
            slice: Arc::new(slice),
            device: self.clone(),
        })
    }
}

/// A device allocation shared by tensor clones (copy-on-write).
#[derive(Clone)]
pub(crate) struct CudaBuffer<T: Element> {
    pub(crate) slice: Arc<CudaSlice<T>>,
    device: CudaDevice,
}

impl<T: Element> std::fmt::Debug for CudaBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaBuffer({:?}, {} elements)",
            self.device,
            self.slice.len()
        )
    }
}

impl<T: Element> CudaBuffer<T> {
    pub(crate) fn device(&self) -> &CudaDevice {
        &self.device
    }

    pub(crate) fn to_host(&self) -> Result<Vec<T>> {
        self.device
            .stream()
            .clone_dtoh(self.slice.as_ref())
            .map_err(|e| driver_err("copying device to host", e))
    }
}
