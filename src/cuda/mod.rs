//! The CUDA runtime: finding the driver and NVRTC, contexts and streams, device buffers.
//!
//! Nothing here panics when CUDA is missing: every entry point first checks that the driver
//! library is loadable (cudarc would panic on the first FFI call otherwise) and returns
//! [`Error::Unavailable`] with what was tried and how to fix it.

pub(crate) mod launch;
pub mod nvrtc;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, LaunchConfig};
use cudarc::nvrtc::Ptx;

use crate::dtype::Element;
use crate::error::{Error, Result};

/// Whether `lib<name>.so` (or `.so.<major>` for one of `majors`) can be loaded: the names cudarc
/// opens the library by under dynamic loading. cunorm's own probe, so that it works whatever
/// cudarc linking mode the dependency graph selects (`fallback-dynamic-loading` beside candle's
/// `dynamic-linking`): cudarc's first FFI call panics when the library is missing.
pub(crate) fn loadable(name: &str, majors: &[u32]) -> bool {
    let names = std::iter::once(format!("lib{name}.so"))
        .chain(majors.iter().map(|m| format!("lib{name}.so.{m}")));
    names.into_iter().any(|n| {
        // SAFETY: loading NVIDIA's driver or NVRTC library, whose initializers have no
        // preconditions; the handle is closed again at once.
        unsafe { libloading::Library::new(n) }.is_ok()
    })
}

/// The error of a failed allocation of `n` elements of `T`: out of memory says how much was asked
/// and what to do (an `Err` the caller can handle, never an abort).
fn alloc_err<T>(n: usize, e: Option<cudarc::driver::DriverError>) -> Error {
    let bytes = n as u128 * std::mem::size_of::<T>() as u128;
    let context = format!("allocating {bytes} bytes of device memory");
    match e {
        Some(e) if e.0 != OOM => driver_err(&context, e),
        _ => Error::Cuda {
            context,
            message: format!(
                "out of memory: {} is more than the device has free; use a smaller batch, or \
                 drop device tensors no longer needed",
                fmt_bytes(bytes)
            ),
        },
    }
}

/// `n` elements of `T` as a byte count cudarc can take (it multiplies unchecked): an `Err`
/// (out of memory) when it would overflow.
fn alloc_len<T>(n: usize) -> Result<usize> {
    n.checked_mul(std::mem::size_of::<T>())
        .filter(|&b| b <= isize::MAX as usize)
        .map(|_| n)
        .ok_or_else(|| alloc_err::<T>(n, None))
}

fn fmt_bytes(b: u128) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{b} bytes")
    }
}

pub(crate) fn driver_err(context: &str, e: cudarc::driver::DriverError) -> Error {
    Error::Cuda {
        context: context.to_string(),
        message: e.to_string(),
    }
}

/// Whether the CUDA driver library can be loaded and reports at least one device.
/// On failure the message explains what is missing.
pub fn probe() -> Result<usize> {
    if !loadable("cuda", &[1]) {
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

/// The device's current memory pool (the one `cuMemAllocAsync`, and so cudarc's stream
/// allocations, draw from: the default pool unless someone called `cuDeviceSetMemPool`), where
/// the device has stream-ordered allocation.
fn mem_pool(ctx: &CudaContext) -> Option<cudarc::driver::sys::CUmemoryPool> {
    if !ctx.has_async_alloc() {
        return None;
    }
    // SAFETY: the context's device handle came from the driver (cuDeviceGet).
    unsafe { cudarc::driver::result::device::get_mem_pool(ctx.cu_device()) }.ok()
}

/// Sets the pool's release threshold to the maximum, so that freed memory stays reserved (see
/// [`CudaDevice::new`]). A driver that refuses leaves the pool as it was: that costs speed,
/// never correctness, so it is not an error.
fn keep_freed_memory(ctx: &CudaContext) {
    if let Some(pool) = mem_pool(ctx) {
        let mut threshold = u64::MAX;
        // SAFETY: RELEASE_THRESHOLD takes a cuuint64_t, which `threshold` is.
        let _ = unsafe {
            cudarc::driver::result::mem_pool::set_attribute(
                pool,
                cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
        };
    }
}

const OOM: cudarc::driver::sys::cudaError_enum =
    cudarc::driver::sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY;

/// A loaded kernel and the most threads per block its register use allows on this device.
#[derive(Clone)]
pub(crate) struct Kernel {
    pub(crate) func: CudaFunction,
    pub(crate) max_threads: u32,
    /// Registers per thread (the driver's count for the loaded CUBIN).
    pub(crate) regs: u32,
    /// Dynamic shared memory a launch may use: the device's opt-in limit less the kernel's
    /// static shared memory, opted in once when the kernel is loaded.
    pub(crate) max_dynamic_smem: usize,
}

struct Inner {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: String,
    sms: u32,
    smem_optin: usize,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// Kernels looked up so far, by module, then name (a kernel every dtype's module of a
    /// file holds is looked up, and loaded, from each module that is asked for it).
    kernels: Mutex<HashMap<&'static str, HashMap<String, Kernel>>>,
    poison: std::sync::atomic::AtomicBool,
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
    ///
    /// Device memory freed by cunorm's tensors stays reserved for the next allocation, as in
    /// PyTorch's caching allocator: the device's current memory pool (which cudarc's stream
    /// allocations come from) is told to keep what it holds instead of returning it to the
    /// driver at every synchronization. Without that, a loop that allocates an output each step
    /// and synchronizes between steps maps fresh device pages every step, which cost as much as
    /// the kernels themselves on large tensors (2026-11-26, H200). The pool is the device's, so
    /// other users of it in the process keep their freed memory too, and what it holds is
    /// unavailable to other allocators (another library's `cudaMalloc`, other processes) until
    /// [`CudaDevice::release_cached_memory`] returns it; an allocation of cunorm's that finds
    /// the device out of memory does that and tries once more. A device wrapped with
    /// [`CudaDevice::from_parts`] keeps its owner's pool settings.
    pub fn new(ordinal: usize) -> Result<Self> {
        let count = probe()?;
        if ordinal >= count {
            return Err(Error::Unavailable(format!(
                "CUDA device {ordinal} does not exist: the driver reports {count} device(s); pick \
                 an ordinal below {count}"
            )));
        }
        nvrtc::ensure_nvrtc()?;
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_err("creating the context", e))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| driver_err("creating a stream", e))?;
        keep_freed_memory(&ctx);
        Self::from_parts(ctx, stream)
    }

    /// Returns the device memory that freed tensors left reserved in the device's current
    /// memory pool to the driver (after waiting for queued work), for a process that wants it
    /// back for something else. Later allocations reserve it again.
    pub fn release_cached_memory(&self) -> Result<()> {
        self.synchronize()?;
        if let Some(pool) = mem_pool(&self.inner.ctx) {
            // SAFETY: `pool` is the device's current pool, valid while the device is.
            unsafe { cudarc::driver::result::mem_pool::trim_to(pool, 0) }
                .map_err(|e| driver_err("releasing cached device memory", e))?;
        }
        Ok(())
    }

    /// Bytes the device's memory pool holds for this process: in use by live buffers plus
    /// cached from freed ones (0 on a device without stream-ordered allocation).
    pub fn pool_reserved_bytes(&self) -> Result<u64> {
        let Some(pool) = mem_pool(&self.inner.ctx) else {
            return Ok(0);
        };
        let mut v = 0u64;
        // SAFETY: RESERVED_MEM_CURRENT writes a cuuint64_t, which `v` is.
        unsafe {
            cudarc::driver::result::mem_pool::get_attribute(
                pool,
                cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT,
                (&mut v as *mut u64).cast(),
            )
        }
        .map_err(|e| driver_err("reading the memory pool's size", e))?;
        Ok(v)
    }

    /// `f` (an allocation); when the driver is out of memory, the pool's cached memory is
    /// handed back ([`CudaDevice::release_cached_memory`]) and `f` runs once more, as PyTorch's
    /// caching allocator empties its cache before it reports out of memory.
    fn retry_oom<R>(
        &self,
        mut f: impl FnMut() -> std::result::Result<R, cudarc::driver::DriverError>,
    ) -> std::result::Result<R, cudarc::driver::DriverError> {
        match f() {
            Err(e) if e.0 == OOM && self.release_cached_memory().is_ok() => f(),
            r => r,
        }
    }

    /// Wraps an existing cudarc context and stream (for code that already holds them).
    pub fn from_parts(ctx: Arc<CudaContext>, stream: Arc<CudaStream>) -> Result<Self> {
        nvrtc::ensure_nvrtc()?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| driver_err("reading the compute capability", e))?;
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(|e| driver_err("reading the SM count", e))?;
        let smem_optin = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(|e| driver_err("reading the shared memory limit", e))?;
        Ok(CudaDevice {
            inner: Arc::new(Inner {
                smem_optin: smem_optin.max(48 * 1024) as usize,
                ordinal: ctx.ordinal(),
                ctx,
                stream,
                arch: format!("sm_{major}{minor}"),
                sms: sms.max(1) as u32,
                modules: Mutex::new(HashMap::new()),
                kernels: Mutex::new(HashMap::new()),
                poison: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }

    /// The architecture kernels are compiled for (`sm_90` on an H100).
    pub fn arch(&self) -> &str {
        &self.inner.arch
    }

    /// Shared memory one block may use after opting in (227 KiB on an H100).
    pub fn smem_per_block(&self) -> usize {
        self.inner.smem_optin
    }

    /// Number of streaming multiprocessors.
    pub fn sm_count(&self) -> u32 {
        self.inner.sms
    }

    /// Whether the GPU runs thread-block clusters (compute capability 9.0 on).
    pub(crate) fn has_clusters(&self) -> bool {
        self.inner
            .arch
            .strip_prefix("sm_")
            .and_then(|v| {
                v.trim_end_matches(|c: char| c.is_ascii_alphabetic())
                    .parse::<u32>()
                    .ok()
            })
            .is_some_and(|v| v >= 90)
    }

    /// Whether at least one cluster of kernel `k` (a cluster kernel: its size is compiled in)
    /// launched as `cfg` can be resident (`cuOccupancyMaxActiveClusters`); false when the
    /// driver cannot say.
    pub(crate) fn clusters_fit(&self, k: &Kernel, cfg: &LaunchConfig) -> bool {
        use cudarc::driver::sys;
        if self.inner.ctx.bind_to_thread().is_err() {
            return false;
        }
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.inner.stream.cu_stream(),
            attrs: std::ptr::null_mut(),
            numAttrs: 0,
        };
        let mut n: std::ffi::c_int = 0;
        // SAFETY: a valid function handle of this context, a filled-in configuration with no
        // attributes, and an out-parameter that lives across the call.
        let r = unsafe { sys::cuOccupancyMaxActiveClusters(&mut n, k.func.cu_function(), &config) };
        r == sys::CUresult::CUDA_SUCCESS && n >= 1
    }

    /// Kernel `name` of module `module`, looked up once per device: the first call compiles
    /// (or loads from the disk cache) the module and reads the kernel's thread limit. A module
    /// that lacks `name` is an `Err` whatever other modules hold it.
    pub(crate) fn kernel(&self, module: &'static str, name: &str) -> Result<Kernel> {
        let lock = || {
            self.inner
                .kernels
                .lock()
                .map_err(|_| Error::Unavailable("kernel cache poisoned by a panic".into()))
        };
        if let Some(k) = lock()?.get(module).and_then(|m| m.get(name)) {
            return Ok(k.clone());
        }
        let func = self.load_function(module, name)?;
        let max_threads = func
            .max_threads_per_block()
            .map_err(|e| driver_err("reading a kernel's thread limit", e))?;
        let regs = func
            .num_regs()
            .map_err(|e| driver_err("reading a kernel's register count", e))?;
        // Opt in to the most dynamic shared memory once, here, rather than per launch: a
        // per-launch attribute set races when two host threads launch the kernel with
        // different sizes.
        let static_smem = func
            .shared_size_bytes()
            .map_err(|e| driver_err("reading a kernel's static shared memory", e))?;
        let max_dynamic_smem = self
            .inner
            .smem_optin
            .saturating_sub(static_smem.max(0) as usize);
        func.set_attribute(
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            max_dynamic_smem as i32,
        )
        .map_err(|e| driver_err("opting in to shared memory", e))?;
        let k = Kernel {
            func,
            max_threads: max_threads.clamp(32, 1024) as u32,
            regs: regs.max(0) as u32,
            max_dynamic_smem,
        };
        lock()?
            .entry(module)
            .or_default()
            .insert(name.to_string(), k.clone());
        Ok(k)
    }

    /// Kernel `name` of module `module` (see [`CudaDevice::kernel`]).
    pub(crate) fn function(&self, module: &'static str, name: &str) -> Result<CudaFunction> {
        Ok(self.kernel(module, name)?.func)
    }

    fn load_function(&self, module: &'static str, name: &str) -> Result<CudaFunction> {
        let m = {
            let mut mods = self.modules()?;
            match mods.get(module) {
                Some(m) => m.clone(),
                None => {
                    let cubin = nvrtc::cubin_cached(module, &self.inner.arch)?;
                    self.load(&mut mods, module, cubin)?
                }
            }
        };
        m.load_function(name)
            .map_err(|e| driver_err(&format!("finding kernel {name}"), e))
    }

    fn modules(&self) -> Result<std::sync::MutexGuard<'_, HashMap<&'static str, Arc<CudaModule>>>> {
        self.inner
            .modules
            .lock()
            .map_err(|_| Error::Unavailable("kernel module cache poisoned by a panic".into()))
    }

    fn load(
        &self,
        mods: &mut HashMap<&'static str, Arc<CudaModule>>,
        module: &'static str,
        cubin: Vec<u8>,
    ) -> Result<Arc<CudaModule>> {
        let m = self
            .inner
            .ctx
            .load_module(Ptx::from_binary(cubin))
            .map_err(|e| driver_err(&format!("loading kernel module {module}"), e))?;
        mods.insert(module, m.clone());
        Ok(m)
    }

    /// Compiles (or loads from the disk cache) the kernel modules of `entries` now rather than at
    /// first use, the modules in parallel (NVRTC programs are independent), then looks up each
    /// `(module, kernel)` of `entries` (an `Err` if one is missing). The op families' list is
    /// [`crate::kernels::entry_points`]; [`crate::Device::warm_up`] passes it.
    pub fn preload(&self, entries: &[(&'static str, String)]) -> Result<()> {
        let missing: Vec<&'static str> = {
            let mods = self.modules()?;
            let mut missing: Vec<&'static str> = Vec::new();
            for &(m, _) in entries {
                if !mods.contains_key(m) && !missing.contains(&m) {
                    missing.push(m);
                }
            }
            missing
        };
        let arch = self.inner.arch.as_str();
        let cubins: Vec<Result<Vec<u8>>> = std::thread::scope(|s| {
            let jobs: Vec<_> = missing
                .iter()
                .map(|&m| s.spawn(move || nvrtc::cubin_cached(m, arch)))
                .collect();
            jobs.into_iter()
                .map(|j| {
                    j.join().unwrap_or_else(|_| {
                        Err(Error::Unavailable(
                            "a kernel compile thread panicked".into(),
                        ))
                    })
                })
                .collect()
        });
        {
            let mut mods = self.modules()?;
            for (module, cubin) in missing.into_iter().zip(cubins) {
                let cubin = cubin?;
                if !mods.contains_key(module) {
                    self.load(&mut mods, module, cubin)?;
                }
            }
        }
        for (module, name) in entries {
            self.function(module, name)?;
        }
        Ok(())
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

    /// Testing aid: when on, every buffer cunorm allocates is filled with NaN (all-ones bytes)
    /// first, so an output element a kernel fails to write shows up as NaN.
    pub fn set_poison(&self, on: bool) {
        self.inner
            .poison
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn alloc<T: Element>(&self, n: usize) -> Result<CudaSlice<T>> {
        let stream = &self.inner.stream;
        // SAFETY: every caller passes the buffer to a kernel that writes all n elements before
        // anything reads it.
        let n = alloc_len::<T>(n.max(1))?;
        let mut slice = self
            .retry_oom(|| unsafe { stream.alloc::<T>(n) })
            .map_err(|e| alloc_err::<T>(n, Some(e)))?;
        if self.inner.poison.load(std::sync::atomic::Ordering::Relaxed) {
            use cudarc::driver::DevicePtrMut;
            let bytes = slice.len() * std::mem::size_of::<T>();
            let (ptr, _sync) = slice.device_ptr_mut(stream);
            // SAFETY: ptr addresses `bytes` bytes of this live allocation, on its own stream;
            // all-ones bytes are a NaN in f32, f16 and bf16.
            unsafe {
                cudarc::driver::result::memset_d8_async(ptr, 0xff, bytes, stream.cu_stream())
            }
            .map_err(|e| driver_err("poisoning a buffer", e))?;
        }
        Ok(slice)
    }

    /// A zero-filled buffer of `n` elements (at least one) on cunorm's stream.
    pub fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<T>> {
        let len = alloc_len::<T>(n.max(1))?;
        self.retry_oom(|| self.inner.stream.alloc_zeros::<T>(len))
            .map_err(|e| alloc_err::<T>(n.max(1), Some(e)))
    }

    pub(crate) fn upload<T: Element>(&self, data: &[T]) -> Result<CudaBuffer<T>> {
        let mut slice = self.alloc::<T>(data.len())?;
        if !data.is_empty() {
            self.inner
                .stream
                .memcpy_htod(data, &mut slice)
                .map_err(|e| driver_err("copying host to device", e))?;
        }
        Ok(CudaBuffer {
            slice: Arc::new(slice),
            len: data.len(),
            device: self.clone(),
        })
    }
}

/// A device allocation shared by tensor clones (copy-on-write).
#[derive(Clone)]
pub(crate) struct CudaBuffer<T: Element> {
    pub(crate) slice: Arc<CudaSlice<T>>,
    /// Logical length (allocations hold at least one element, so empty tensors can exist).
    pub(crate) len: usize,
    device: CudaDevice,
}

/// The benchmark's L2 flush: a buffer bigger than L2 and a kernel (`kernels/util.cu`) that only
/// reads it, so the flush evicts L2 without leaving dirty lines for the next timed kernel to
/// write back (a memset would).
pub struct L2Flush {
    dev: CudaDevice,
    buf: cudarc::driver::CudaSlice<u8>,
    sink: cudarc::driver::CudaSlice<u32>,
}

impl L2Flush {
    /// A flush over `bytes` (rounded up to 16) of zeros on `dev`.
    pub fn new(dev: &CudaDevice, bytes: usize) -> Result<L2Flush> {
        Ok(L2Flush {
            dev: dev.clone(),
            buf: dev.zeros::<u8>(bytes.max(16).next_multiple_of(16))?,
            sink: dev.zeros::<u32>(1)?,
        })
    }

    /// Queues the read of the whole buffer on the device's stream.
    pub fn run(&mut self) -> Result<()> {
        use cudarc::driver::PushKernelArg;
        let k = self.dev.kernel("util", "l2_flush_read")?;
        let words = (self.buf.len() / 16) as u64;
        let threads = launch::block_threads(&k, 256);
        let blocks = launch::grid((words as usize).div_ceil(4 * threads as usize))?;
        // The buffer holds zeros, so the fold of what a thread reads is 0, never 1.
        let never = 1u32;
        let stream = self.dev.stream().clone();
        let mut b = stream.launch_builder(&k.func);
        b.arg(&self.buf).arg(&words).arg(&never).arg(&mut self.sink);
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches util.cu's l2_flush_read: `words` 16-byte words of `buf` (its length
        // is a multiple of 16, and allocations are 256-byte aligned), one u32 in `sink`.
        unsafe { b.launch(cfg) }.map_err(launch::launch_err)?;
        Ok(())
    }
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
    /// Wraps `slice`, of which the first `len` elements are the buffer's.
    pub(crate) fn new(device: &CudaDevice, slice: CudaSlice<T>, len: usize) -> Self {
        CudaBuffer {
            slice: Arc::new(slice),
            len,
            device: device.clone(),
        }
    }

    pub(crate) fn device(&self) -> &CudaDevice {
        &self.device
    }

    pub(crate) fn to_host(&self) -> Result<Vec<T>> {
        let mut v = self
            .device
            .stream()
            .clone_dtoh(self.slice.as_ref())
            .map_err(|e| driver_err("copying device to host", e))?;
        self.device.synchronize()?;
        v.truncate(self.len);
        Ok(v)
    }

    /// Mutable access, copying first when another tensor shares the allocation.
    pub(crate) fn slice_mut(&mut self) -> Result<&mut CudaSlice<T>> {
        if Arc::get_mut(&mut self.slice).is_none() {
            let copy = self
                .slice
                .try_clone()
                .map_err(|e| driver_err("copying a shared device buffer", e))?;
            self.slice = Arc::new(copy);
        }
        Arc::get_mut(&mut self.slice).ok_or_else(|| {
            Error::Unavailable("device buffer is shared and cannot be written".into())
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn probing_a_missing_library_is_false_not_a_panic() {
        assert!(!super::loadable("cunorm-no-such-library", &[13, 12]));
    }
}
