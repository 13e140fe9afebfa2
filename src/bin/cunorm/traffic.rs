//! `cunorm bench --traffic`: what each standard case would move through DRAM, counted by the
//! fake CUDA driver's traffic build (`scripts/fake-cuda/traffic.sh`), which runs the kernels'
//! own source on the CPU and counts every access they make (see `scripts/fake-cuda/traffic.h`):
//! the bytes loaded from and stored to buffers larger than 1 MiB (the tensors and any large
//! scratch; no cache reuse assumed; smaller buffers are taken as cached) and the largest number
//! of device-memory accesses any one thread makes. A model of the kernels' traffic, not a
//! measurement of a GPU.

use cunorm::{Error, Result};

/// One stage's counts (totals over its launches).
#[derive(Clone, Copy, Debug, Default)]
pub struct Traffic {
    /// Kernel launches.
    pub launches: u64,
    /// Bytes loaded from buffers larger than 1 MiB.
    pub loaded: u64,
    /// Bytes stored to them.
    pub stored: u64,
    /// The most device-memory accesses one thread made, in any launch.
    pub max_thread: u64,
}

type Take = unsafe extern "C" fn(*mut u64) -> i32;

/// The traffic build's counter (`fakecuda_traffic_take`, exported by the fake driver only).
pub struct Counter {
    take: Take,
    _lib: libloading::Library,
}

impl Counter {
    /// The counter of the loaded driver: an `Err` unless it is the fake driver's traffic build.
    pub fn open() -> Result<Counter> {
        let missing = |why: String| {
            Error::Unavailable(format!(
                "--traffic needs the fake CUDA driver's traffic build \
                 (scripts/fake-cuda/traffic.sh builds and runs it): {why}"
            ))
        };
        // SAFETY: libcuda.so.1 is already loaded (the CUDA device is open); opening it again
        // only adds a reference and runs no initializer.
        let lib = unsafe { libloading::Library::new("libcuda.so.1") }
            .map_err(|e| missing(e.to_string()))?;
        // SAFETY: the symbol, where present, is the traffic build's
        // `int fakecuda_traffic_take(unsigned long long out[4])`.
        let take = unsafe { lib.get::<Take>(b"fakecuda_traffic_take") }
            .map(|s| *s)
            .map_err(|e| missing(e.to_string()))?;
        Ok(Counter { take, _lib: lib })
    }

    /// The counts since the last call (and a fresh start).
    pub fn take(&self) -> Traffic {
        let mut v = [0u64; 4];
        // SAFETY: the function writes four values into `v` (see `open`).
        unsafe { (self.take)(v.as_mut_ptr()) };
        Traffic {
            launches: v[0],
            loaded: v[1],
            stored: v[2],
            max_thread: v[3],
        }
    }
}

/// The fewest elements a scaled shape keeps: 2²⁰ (2 MiB at 2 bytes), so that its tensors stay
/// above the driver's 1 MiB counting threshold.
pub const MIN_CAP: usize = 1 << 20;

/// `shape` with its first dimension divided down so that it holds at most `cap` elements (at
/// least [`MIN_CAP`]; the emulator runs ~10⁷ accesses per second): the same work per row, plane
/// or block, fewer of them. `None` when it already fits.
pub fn scaled(shape: &[usize], cap: usize) -> Option<Vec<usize>> {
    let cap = cap.max(MIN_CAP);
    let numel: usize = shape.iter().product();
    if numel <= cap || shape.is_empty() {
        return None;
    }
    let rest = numel / shape[0].max(1);
    let mut s = shape.to_vec();
    s[0] = (cap / rest.max(1)).max(1);
    Some(s)
}
