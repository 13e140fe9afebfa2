//! A small cache of large freed CPU buffers, so that a loop which makes and drops tensors of the
//! same sizes (a training step) does not map and zero fresh memory on every call.
//!
//! glibc serves every allocation of 32 MiB or more with a fresh `mmap`, and the kernel zeroes
//! each page on first write: for a GroupNorm over a 32 MiB f32 tensor that zeroing took more of
//! the op's time than either of its passes (35 % of the profile). A CPU tensor's elements, when
//! dropped, come here instead if they take at least [`MIN_BYTES`]; the next output of about that
//! size takes them back. Bounded: at most `CUNORM_CPU_CACHE_MB` mebibytes (default
//! [`DEFAULT_CAP_MB`]; 0 turns the cache off) in at most [`MAX_BLOCKS`] buffers, the oldest freed
//! first; [`empty_cpu_cache`] gives everything back.
//!
//! Smaller buffers are left to the allocator: glibc raises its mmap threshold to the largest
//! size freed, up to 32 MiB, and then reuses such buffers itself; and on the development VM
//! outputs of 16–25 MiB taken from this cache ran 1.2–1.35x slower than glibc's reuse (LayerNorm
//! [4096, 1024] f32 backward, BatchNorm channels-last forward; docs/PERF.md, "This session's
//! CPU changes", has the figures and the suspected cause).
//!
//! An output may get a buffer up to 1.25x its size; where its `Vec` leaves cunorm (candle's
//! storage takes it) that spare capacity goes with it and is freed by its new owner.
//!
//! A reused buffer keeps the bytes of its last tensor until the op writes it: every user
//! ([`crate::ops::engine::filled_vec`]) writes all of its elements.

use std::ptr::NonNull;
use std::sync::{Mutex, OnceLock};

/// Buffers smaller than this go straight back to the allocator (glibc reuses them itself).
pub(crate) const MIN_BYTES: usize = 32 << 20;
/// The default bound on the bytes kept, in MiB.
pub const DEFAULT_CAP_MB: usize = 256;
/// The most buffers kept at once.
pub(crate) const MAX_BLOCKS: usize = 16;

/// A freed `Vec`'s allocation: its address, its element size and alignment, its capacity, and
/// the function that frees it as the `Vec<T>` it was.
struct Block {
    ptr: NonNull<u8>,
    size: usize,
    align: usize,
    cap: usize,
    free: unsafe fn(NonNull<u8>, usize),
}

impl Block {
    fn bytes(&self) -> usize {
        self.size * self.cap
    }
}

// SAFETY: a `Block` is the sole owner of an allocation no one else can reach (a `Vec` given up to
// the cache); moving that ownership between threads is as safe as moving the `Vec`.
unsafe impl Send for Block {}

/// Frees a block as the `Vec<T>` it came from (the allocator and layout `Vec` itself uses).
///
/// # Safety
/// `ptr` and `cap` come from a `Vec<T>` whose ownership was given up.
unsafe fn free_as<T>(ptr: NonNull<u8>, cap: usize) {
    // SAFETY: by the contract, this rebuilds the original `Vec<T>` (length 0: its elements need
    // no drop, they are plain floats) and drops it.
    drop(unsafe { Vec::<T>::from_raw_parts(ptr.cast::<T>().as_ptr(), 0, cap) });
}

/// The cache itself; one per process ([`global`]), others in tests.
pub(crate) struct BufferCache {
    blocks: Vec<Block>,
    bytes: usize,
    cap_bytes: usize,
}

impl BufferCache {
    pub(crate) const fn new(cap_bytes: usize) -> Self {
        BufferCache {
            blocks: Vec::new(),
            bytes: 0,
            cap_bytes,
        }
    }

    /// An empty `Vec<T>` with room for at least `n` elements, from a kept buffer of the same
    /// element size and alignment that holds `n` to `1.25 n` elements (the smallest such), or
    /// `None`.
    pub(crate) fn take<T>(&mut self, n: usize) -> Option<Vec<T>> {
        let (size, align) = (std::mem::size_of::<T>(), std::mem::align_of::<T>());
        let want = n.checked_mul(size)?;
        if size == 0 || want < MIN_BYTES {
            return None;
        }
        let slack = n + n / 4;
        let (i, _) = self
            .blocks
            .iter()
            .enumerate()
            .filter(|(_, b)| b.size == size && b.align == align && (n..=slack).contains(&b.cap))
            .min_by_key(|(_, b)| b.cap)?;
        let b = self.blocks.remove(i);
        self.bytes -= b.bytes();
        // SAFETY: the block came from a `Vec<U>` with U's size and alignment equal to T's, so its
        // allocation is what a `Vec<T>` of capacity `cap` holds (same layout, global allocator);
        // length 0, so no element is read before it is written.
        Some(unsafe { Vec::from_raw_parts(b.ptr.cast::<T>().as_ptr(), 0, b.cap) })
    }

    /// Keeps `v`'s allocation if it is large enough and fits under the bound, dropping the oldest
    /// blocks to make room: `Ok` with the blocks it displaced, to be freed by the caller outside
    /// any lock, or `Err(v)` when not kept.
    pub(crate) fn give<T>(&mut self, v: Vec<T>) -> Result<Freed, Vec<T>> {
        let size = std::mem::size_of::<T>();
        let bytes = v.capacity().saturating_mul(size);
        if size == 0 || bytes < MIN_BYTES || bytes > self.cap_bytes {
            return Err(v);
        }
        let mut v = std::mem::ManuallyDrop::new(v);
        let Some(ptr) = NonNull::new(v.as_mut_ptr().cast::<u8>()) else {
            return Err(std::mem::ManuallyDrop::into_inner(v));
        };
        let block = Block {
            ptr,
            size,
            align: std::mem::align_of::<T>(),
            cap: v.capacity(),
            free: free_as::<T>,
        };
        let mut out = Vec::new();
        while !self.blocks.is_empty()
            && (self.bytes + bytes > self.cap_bytes || self.blocks.len() >= MAX_BLOCKS)
        {
            let old = self.blocks.remove(0);
            self.bytes -= old.bytes();
            out.push(old);
        }
        self.bytes += bytes;
        self.blocks.push(block);
        Ok(Freed(out))
    }

    /// Gives every kept buffer back; returns them to be freed outside any lock.
    fn drain(&mut self) -> Freed {
        self.bytes = 0;
        Freed(std::mem::take(&mut self.blocks))
    }

    /// Bytes kept now.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for BufferCache {
    fn drop(&mut self) {
        drop(self.drain());
    }
}

/// Blocks to free once the cache's lock is released.
pub(crate) struct Freed(Vec<Block>);

impl Freed {
    /// Bytes this frees.
    fn bytes(&self) -> usize {
        self.0.iter().map(Block::bytes).sum()
    }
}

impl Drop for Freed {
    fn drop(&mut self) {
        for b in self.0.drain(..) {
            // SAFETY: each block owns its allocation (taken out of the cache, never handed out
            // again), and `free` is `free_as` of the element type it was made with.
            unsafe { (b.free)(b.ptr, b.cap) };
        }
    }
}

/// The process's cache, bounded by `CUNORM_CPU_CACHE_MB` (read once; an unreadable value keeps
/// the default).
fn global() -> &'static Mutex<BufferCache> {
    static CACHE: OnceLock<Mutex<BufferCache>> = OnceLock::new();
    CACHE.get_or_init(|| {
        let mb = std::env::var("CUNORM_CPU_CACHE_MB")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(DEFAULT_CAP_MB);
        Mutex::new(BufferCache::new(mb.saturating_mul(1 << 20)))
    })
}

fn with_global<R>(f: impl FnOnce(&mut BufferCache) -> R) -> R {
    // A panic cannot happen while the lock is held (nothing in the cache's methods panics), but
    // a poisoned lock still holds a consistent cache: take it rather than panic.
    let mut guard = global().lock().unwrap_or_else(|e| e.into_inner());
    f(&mut guard)
}

/// An empty `Vec<T>` with room for `n` elements: a kept buffer when one fits, else `None`.
pub(crate) fn take<T>(n: usize) -> Option<Vec<T>> {
    if n.saturating_mul(std::mem::size_of::<T>()) < MIN_BYTES {
        return None;
    }
    with_global(|c| c.take(n))
}

/// Hands a dropped tensor's elements to the cache (or frees them).
pub(crate) fn give<T>(mut v: Vec<T>) {
    if v.capacity().saturating_mul(std::mem::size_of::<T>()) < MIN_BYTES {
        return;
    }
    // Only the allocation is kept: elements are dropped here (a no-op for the float types).
    v.clear();
    // Whatever is freed (v, or the blocks it displaced) is freed here, after the lock.
    let freed = with_global(|c| c.give(v));
    drop(freed);
}

/// Frees every CPU buffer cunorm keeps for reuse (large outputs of dropped tensors, up to
/// `CUNORM_CPU_CACHE_MB` MiB, default 256), and returns how many bytes that was. The cache
/// refills as tensors are dropped; set `CUNORM_CPU_CACHE_MB=0` to never keep any.
pub fn empty_cpu_cache() -> usize {
    let freed = with_global(BufferCache::drain);
    freed.bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BIG: usize = MIN_BYTES / 4; // f32 elements in MIN_BYTES

    fn keep<T>(c: &mut BufferCache, v: Vec<T>) -> usize {
        c.give(v).ok().expect("kept").bytes()
    }

    #[test]
    fn a_freed_buffer_is_reused_for_the_same_size_and_layout_only() {
        let mut c = BufferCache::new(256 << 20);
        let v: Vec<f32> = Vec::with_capacity(2 * BIG);
        let p = v.as_ptr() as usize;
        assert_eq!(keep(&mut c, v), 0);
        assert_eq!(c.bytes(), 2 * MIN_BYTES);
        // Another element size, a request below the minimum, one too large or one the block
        // would hold with more than a quarter to spare: a miss, and the block stays.
        assert!(c.take::<half::f16>(4 * BIG).is_none());
        assert!(c.take::<f32>(BIG - 1).is_none());
        assert!(c.take::<f32>(2 * BIG + 1).is_none());
        assert!(c.take::<f32>(2 * BIG * 4 / 5 - 4).is_none());
        // Same size and alignment as f32: a hit (handed back).
        let v = c.take::<u32>(2 * BIG).expect("same layout");
        assert_eq!(v.as_ptr() as usize, p);
        assert_eq!(keep(&mut c, v), 0);
        let v = c
            .take::<f32>(2 * BIG * 4 / 5 + 4)
            .expect("within the slack");
        assert_eq!(
            (v.as_ptr() as usize, v.len(), v.capacity()),
            (p, 0, 2 * BIG)
        );
        assert_eq!(c.bytes(), 0);
        assert!(c.take::<f32>(2 * BIG).is_none(), "a taken block is gone");
    }

    #[test]
    fn the_bound_holds_and_the_oldest_goes_first() {
        let cap = 3 * MIN_BYTES + 64;
        let mut c = BufferCache::new(cap);
        let mut ptrs = Vec::new();
        for k in 0..4 {
            let v: Vec<f32> = Vec::with_capacity(BIG + k);
            ptrs.push(v.as_ptr() as usize);
            assert_eq!(
                keep(&mut c, v),
                if k < 3 { 0 } else { MIN_BYTES },
                "k = {k}"
            );
            assert!(c.bytes() <= cap);
        }
        // The first block was displaced; the last three remain, the smallest fit taken first.
        let got: Vec<usize> = (0..3)
            .map(|_| {
                let v = c.take::<f32>(BIG).expect("kept");
                v.as_ptr() as usize
            })
            .collect();
        assert_eq!(got, ptrs[1..].to_vec());
        // A buffer above the bound or below the minimum is not kept; nor anything at bound 0.
        let mut small = BufferCache::new(MIN_BYTES);
        assert!(small.give(Vec::<f32>::with_capacity(BIG + 1)).is_err());
        assert!(small.give(Vec::<f32>::with_capacity(BIG - 1)).is_err());
        assert_eq!(small.bytes(), 0);
        assert!(BufferCache::new(0)
            .give(Vec::<f32>::with_capacity(BIG))
            .is_err());
    }

    #[test]
    fn no_more_than_max_blocks_are_kept() {
        let mut c = BufferCache::new(usize::MAX);
        for _ in 0..MAX_BLOCKS + 3 {
            let _ = keep(&mut c, Vec::<half::bf16>::with_capacity(2 * BIG));
        }
        assert_eq!(c.bytes(), MAX_BLOCKS * MIN_BYTES);
        let freed = c.drain();
        assert_eq!(freed.bytes(), MAX_BLOCKS * MIN_BYTES);
        assert_eq!(c.bytes(), 0);
    }
}
