//! Generic launch helpers: length and size checks that turn a bad launch into an `Err`, grid
//! and block sizing, optional pointer arguments. The op families' launch code is built on these.

use cudarc::driver::{CudaView, LaunchArgs, PushKernelArg};

use super::{driver_err, Kernel};
use crate::dtype::Element;
use crate::error::{Error, Result};

/// Element counts (and so indices) a launch may have: below 2⁵³. The kernels divide 64-bit
/// indices with a double reciprocal and an exact fix-up (`common.cuh` `div_of`, no 64-bit
/// division subroutine), exact in that range; no GPU holds a tensor that large.
pub(crate) const MAX_ELEMENTS: usize = 1 << 53;

const NULL: u64 = 0;

pub(crate) fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got < want {
        return Err(Error::Shape(format!(
            "cuda launch: {what} holds {got} elements but the call needs {want}; pass a larger buffer"
        )));
    }
    Ok(())
}

pub(crate) fn to_i32(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        Error::Shape(format!(
            "cuda launch: {what} = {v} exceeds 2^31 − 1; split the input"
        ))
    })
}

/// Longest row (LayerNorm/RMSNorm columns, a GroupNorm/InstanceNorm group) the row kernels take:
/// their `int` column and pack counters step by up to a block (1024) plus a pack past the last
/// column, which must not wrap.
pub(crate) const MAX_ROW_LEN: usize = i32::MAX as usize - 2048;

/// A row length for the row kernels: an `Err` above [`MAX_ROW_LEN`].
pub(crate) fn row_len(what: &str, v: usize) -> Result<i32> {
    if v > MAX_ROW_LEN {
        return Err(Error::Shape(format!(
            "cuda launch: {what} = {v} exceeds {MAX_ROW_LEN} values per row; split the input"
        )));
    }
    to_i32(what, v)
}

pub(crate) fn grid(blocks: usize) -> Result<u32> {
    u32::try_from(blocks.max(1))
        .ok()
        .filter(|&b| b <= i32::MAX as u32)
        .ok_or_else(|| {
            Error::Shape(format!(
                "cuda launch: {blocks} blocks exceed the grid limit; split the input"
            ))
        })
}

/// Pushes an optional f32 buffer, or a null pointer (the kernels treat null as "absent").
pub(crate) fn arg_or_null<'a, 'b: 'a, 'c: 'b>(
    b: &mut LaunchArgs<'a>,
    v: Option<&'b CudaView<'c, f32>>,
) {
    match v {
        Some(v) => b.arg(v),
        None => b.arg(&NULL),
    };
}

pub(crate) fn launch_err(e: cudarc::driver::DriverError) -> Error {
    driver_err("launching a kernel", e)
}

/// Threads per block for kernel `k`: `want` (rounded up to whole warps, at most 1024) capped by what
/// the kernel's register use allows on this device, so that a 1024-thread launch of a kernel
/// using more than 64 registers (65 536 per block) cannot fail with "too many resources".
pub(crate) fn block_threads(k: &Kernel, want: usize) -> u32 {
    let cap = (k.max_threads as usize) / 32 * 32;
    want.next_multiple_of(32).clamp(32, cap) as u32
}

/// Blocks of `threads` threads that kernel `k` keeps resident on one SM, by its registers (65 536
/// an SM, allocated in multiples of 8 a thread) and threads (2 048 an SM, as on sm_80 and sm_90;
/// fewer on sm_86/sm_89, where the estimate is high and a grid gets more waves); at least 1.
pub(crate) fn resident_blocks(k: &Kernel, threads: usize) -> usize {
    resident_blocks_of(k.regs, threads)
}

/// [`resident_blocks`] for a kernel of `regs` registers a thread.
pub(crate) fn resident_blocks_of(regs: u32, threads: usize) -> usize {
    let threads = threads.max(1);
    let regs = (regs.max(1) as usize).next_multiple_of(8);
    (65_536 / (regs * threads)).min(2_048 / threads).max(1)
}

/// Whether `v` starts on a 16-byte boundary (the 16-byte packs of the kernels that take no
/// unaligned rows).
pub(crate) fn aligned16<T>(v: &CudaView<T>, stream: &cudarc::driver::CudaStream) -> bool {
    use cudarc::driver::DevicePtr;
    let (ptr, _sync) = v.device_ptr(stream);
    ptr % 16 == 0
}

pub(crate) fn pack<T: Element>() -> usize {
    16 / T::DTYPE.size()
}

#[cfg(test)]
mod tests {
    use super::{row_len, MAX_ROW_LEN};

    #[test]
    fn row_len_refuses_rows_whose_counters_would_wrap() {
        assert_eq!(row_len("cols", 4096).unwrap(), 4096);
        assert_eq!(row_len("cols", MAX_ROW_LEN).unwrap() as usize, MAX_ROW_LEN);
        // The kernels' `int` counters step past the last column by up to a block and a pack.
        assert!(MAX_ROW_LEN + 1024 + 8 <= i32::MAX as usize);
        let e = row_len("cols", MAX_ROW_LEN + 1).unwrap_err().to_string();
        assert!(e.contains("cols") && e.contains("split the input"), "{e}");
        assert!(row_len("cols", usize::MAX).is_err());
    }
}
