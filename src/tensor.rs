//! `Tensor<T>`: a shaped buffer of `f32`, `f16` or `bf16` in contiguous or channels-last layout.

use crate::cuda::{CudaBuffer, CudaDevice};
use crate::device::Device;
use crate::dtype::{DType, Element};
use crate::error::{fmt_shape, Error, Result};

/// How the elements of a 3-D/4-D/5-D tensor are laid out in memory.
///
/// For a logical shape `(N, C, *spatial)`:
/// - `Contiguous` (NCHW) stores `C` outside the spatial dimensions;
/// - `ChannelsLast` (NHWC, PyTorch's `channels_last` / `channels_last_3d`) stores `C` innermost.
///
/// Tensors of rank 1 or 2 are always `Contiguous` (both layouts coincide).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum MemoryFormat {
    /// Row-major in logical order (NCHW).
    #[default]
    Contiguous,
    /// Channels innermost (NHWC / NDHWC).
    ChannelsLast,
}

impl MemoryFormat {
    /// Short name used in reports: `nchw` or `nhwc`.
    pub fn name(self) -> &'static str {
        match self {
            MemoryFormat::Contiguous => "nchw",
            MemoryFormat::ChannelsLast => "nhwc",
        }
    }
}

/// Where a tensor's elements live.
#[derive(Clone, Debug)]
pub(crate) enum Storage<T: Element> {
    Cpu(CpuData<T>),
    Cuda(CudaBuffer<T>),
}

/// A CPU tensor's elements: owned, or borrowed from a caller's slice for the length of one call
/// ([`Tensor::with_borrowed`], how the candle ops read candle's storage without copying it).
///
/// A borrowed one never outlives its slice: `with_borrowed` lends the tensor to a closure only as
/// `&Tensor` (so the closure's result cannot hold it), a clone is an owned copy, and a write
/// first makes an owned copy.
pub(crate) struct CpuData<T> {
    owned: Vec<T>,
    /// When set, the elements (and `owned` is empty).
    borrowed: Option<Borrowed<T>>,
}

/// A slice's address and length, alive while [`Tensor::with_borrowed`] runs its closure.
pub(crate) struct Borrowed<T> {
    ptr: std::ptr::NonNull<T>,
    len: usize,
}

// SAFETY: a `Borrowed` stands for a shared `&[T]` whose lifetime `with_borrowed` enforces; a
// `&[T]` may be sent or shared across threads when `T: Sync`.
unsafe impl<T: Sync> Send for Borrowed<T> {}
// SAFETY: as above: only shared reads go through it.
unsafe impl<T: Sync> Sync for Borrowed<T> {}

impl<T> std::ops::Deref for CpuData<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &self.borrowed {
            // SAFETY: made from a live `&[T]` in `with_borrowed`, which outlives every tensor
            // holding it (see `CpuData`).
            Some(b) => unsafe { std::slice::from_raw_parts(b.ptr.as_ptr(), b.len) },
            None => &self.owned,
        }
    }
}

impl<T: Clone> CpuData<T> {
    /// The elements, writable: a borrowed slice is copied first (copy on write).
    fn make_mut(&mut self) -> &mut Vec<T> {
        if self.borrowed.is_some() {
            let copy = self.to_vec();
            self.borrowed = None;
            self.owned = copy;
        }
        &mut self.owned
    }
}

#[cfg(any(feature = "candle", test))]
impl<T: Clone> CpuData<T> {
    /// The elements as a `Vec`: moved when owned, copied when borrowed.
    fn into_vec(mut self) -> Vec<T> {
        match self.borrowed {
            Some(_) => self.to_vec(),
            None => std::mem::take(&mut self.owned),
        }
    }
}

impl<T> Drop for CpuData<T> {
    /// Large owned elements go to `crate::cpu_cache`, for the next output of about their size.
    fn drop(&mut self) {
        crate::cpu_cache::give(std::mem::take(&mut self.owned));
    }
}

impl<T: Clone> Clone for CpuData<T> {
    /// Always an owned copy: a borrowed slice must not outlive its call.
    fn clone(&self) -> Self {
        self.to_vec().into()
    }
}

impl<T> From<Vec<T>> for CpuData<T> {
    fn from(owned: Vec<T>) -> Self {
        CpuData {
            owned,
            borrowed: None,
        }
    }
}

impl<T> std::fmt::Debug for CpuData<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.borrowed.is_some() {
            "borrowed"
        } else {
            "owned"
        };
        write!(f, "CpuData({kind}, {} elements)", self.len())
    }
}

/// A dense tensor with a shape, a memory format and a device.
///
/// Build one from a `Vec<T>` in logical (row-major, NCHW) order with [`Tensor::from_vec`], change
/// its layout with [`Tensor::to_format`], move it with [`Tensor::to_device`], and read it back in
/// logical order with [`Tensor::to_vec`].
#[derive(Clone)]
pub struct Tensor<T: Element> {
    shape: Vec<usize>,
    format: MemoryFormat,
    pub(crate) storage: Storage<T>,
}

fn check_format(shape: &[usize], format: MemoryFormat) -> Result<MemoryFormat> {
    match (format, shape.len()) {
        (MemoryFormat::ChannelsLast, 3..=5) => Ok(format),
        (MemoryFormat::ChannelsLast, 2) => Ok(MemoryFormat::Contiguous),
        (MemoryFormat::ChannelsLast, r) => Err(Error::Shape(format!(
            "channels-last needs a 2-D to 5-D tensor (N, C, *spatial), but got a {r}-D tensor of \
             size {}; use MemoryFormat::Contiguous",
            fmt_shape(shape)
        ))),
        (MemoryFormat::Contiguous, _) => Ok(format),
    }
}

/// Copies between logical (NCHW) and channels-last order. `to_nhwc` selects the direction.
pub(crate) fn permute_layout<T: Copy>(src: &[T], shape: &[usize], to_nhwc: bool) -> Vec<T> {
    if shape.len() < 3 || src.is_empty() {
        return src.to_vec();
    }
    let (n, c) = (shape[0], shape[1]);
    let s: usize = shape[2..].iter().product();
    let mut out = Vec::with_capacity(src.len());
    for i in 0..n {
        let base = i * c * s;
        if to_nhwc {
            for j in 0..s {
                out.extend((0..c).map(|k| src[base + k * s + j]));
            }
        } else {
            for k in 0..c {
                out.extend((0..s).map(|j| src[base + j * c + k]));
            }
        }
    }
    out
}

impl<T: Element> Tensor<T> {
    /// A contiguous CPU tensor from `data` in logical row-major order.
    pub fn from_vec(data: Vec<T>, shape: &[usize]) -> Result<Self> {
        Self::from_vec_with_format(data, shape, MemoryFormat::Contiguous)
    }

    /// A CPU tensor from `data` already in the physical order of `format`
    /// (for `ChannelsLast`: `N, *spatial, C`).
    pub fn from_vec_with_format(
        data: Vec<T>,
        shape: &[usize],
        format: MemoryFormat,
    ) -> Result<Self> {
        let numel = checked_numel(shape)?;
        if data.len() != numel {
            return Err(Error::Shape(format!(
                "shape {} needs {numel} elements but the data has {}; pass a shape whose product \
                 is the data length",
                fmt_shape(shape),
                data.len()
            )));
        }
        let format = check_format(shape, format)?;
        Ok(Tensor {
            shape: shape.to_vec(),
            format,
            storage: Storage::Cpu(data.into()),
        })
    }

    /// Runs `f` on a CPU tensor over `data` (in the physical order of `format`) without copying
    /// it: the tensor lives only for the call, lent as `&Tensor`, so nothing `f` returns can hold
    /// it (a clone of it is an owned copy). An `Err` when `data` does not fit `shape`.
    #[cfg(any(feature = "candle", test))]
    pub(crate) fn with_borrowed<R>(
        data: &[T],
        shape: &[usize],
        format: MemoryFormat,
        f: impl FnOnce(&Tensor<T>) -> R,
    ) -> Result<R> {
        let numel = checked_numel(shape)?;
        if data.len() != numel {
            return Err(Error::Shape(format!(
                "shape {} needs {numel} elements but the data has {}",
                fmt_shape(shape),
                data.len()
            )));
        }
        let t = Tensor {
            shape: shape.to_vec(),
            format: check_format(shape, format)?,
            storage: Storage::Cpu(CpuData {
                owned: Vec::new(),
                borrowed: Some(Borrowed {
                    ptr: std::ptr::NonNull::from(data).cast(),
                    len: data.len(),
                }),
            }),
        };
        Ok(f(&t))
    }

    /// A CPU tensor of the given shape filled with `value`. An `Err` (never an abort) when the
    /// element count overflows or the memory cannot be had.
    pub fn full(shape: &[usize], value: T) -> Result<Self> {
        let numel = checked_numel(shape)?;
        let mut data = Vec::new();
        data.try_reserve_exact(numel).map_err(|_| too_big(shape))?;
        data.resize(numel, value);
        Ok(Tensor {
            shape: shape.to_vec(),
            format: MemoryFormat::Contiguous,
            storage: Storage::Cpu(data.into()),
        })
    }

    /// A CPU tensor of zeros (see [`Tensor::full`]).
    pub fn zeros(shape: &[usize]) -> Result<Self> {
        Self::full(shape, T::from_f32(0.0))
    }

    pub(crate) fn from_parts(shape: Vec<usize>, format: MemoryFormat, storage: Storage<T>) -> Self {
        Tensor {
            shape,
            format,
            storage,
        }
    }

    /// A tensor of `shape` in `format` over a kernel's output buffer on `dev` (which may hold
    /// more elements: allocations have at least one).
    pub(crate) fn from_cuda(
        dev: &CudaDevice,
        slice: cudarc::driver::CudaSlice<T>,
        shape: &[usize],
        format: MemoryFormat,
    ) -> Self {
        let len = shape.iter().product();
        Self::from_parts(
            shape.to_vec(),
            format,
            Storage::Cuda(CudaBuffer::new(dev, slice, len)),
        )
    }

    /// The logical shape `(N, C, *spatial)` or `(*, normalized_shape)`.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The memory format of the storage.
    pub fn format(&self) -> MemoryFormat {
        self.format
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        T::DTYPE
    }

    /// The device holding the elements.
    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Cuda(b) => Device::Cuda(b.device().clone()),
        }
    }

    /// The raw storage in physical order, when the tensor is on the CPU.
    pub fn as_slice(&self) -> Option<&[T]> {
        match &self.storage {
            Storage::Cpu(v) => Some(v),
            Storage::Cuda(_) => None,
        }
    }

    pub(crate) fn cpu_slice(&self) -> Result<&[T]> {
        match &self.storage {
            Storage::Cpu(v) => Ok(v),
            Storage::Cuda(_) => Err(not_on_cpu()),
        }
    }

    pub(crate) fn cpu_slice_mut(&mut self) -> Result<&mut [T]> {
        match &mut self.storage {
            Storage::Cpu(v) => Ok(v.make_mut()),
            Storage::Cuda(_) => Err(not_on_cpu()),
        }
    }

    pub(crate) fn cuda_slice_mut(&mut self) -> Result<&mut cudarc::driver::CudaSlice<T>> {
        match &mut self.storage {
            Storage::Cuda(b) => b.slice_mut(),
            Storage::Cpu(_) => Err(Error::DeviceMismatch(
                "a CPU tensor was passed to a CUDA op; move it with .to_device()".into(),
            )),
        }
    }

    /// The elements in physical order (copied back from the device if needed).
    pub fn to_vec_physical(&self) -> Result<Vec<T>> {
        match &self.storage {
            Storage::Cpu(v) => Ok(v.to_vec()),
            Storage::Cuda(b) => b.to_host(),
        }
    }

    /// The elements in logical row-major (NCHW) order, whatever the memory format and device.
    pub fn to_vec(&self) -> Result<Vec<T>> {
        let phys = self.to_vec_physical()?;
        Ok(match self.format {
            MemoryFormat::Contiguous => phys,
            MemoryFormat::ChannelsLast => permute_layout(&phys, &self.shape, false),
        })
    }

    /// The elements in physical order (that of its format), moved out without a copy when the
    /// tensor owns CPU storage.
    #[cfg(any(feature = "candle", test))]
    pub(crate) fn into_physical_vec(self) -> Result<Vec<T>> {
        match self.storage {
            Storage::Cpu(d) => Ok(d.into_vec()),
            Storage::Cuda(b) => b.to_host(),
        }
    }

    /// The elements converted to f32 in logical order.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        Ok(self.to_vec()?.into_iter().map(T::to_f32).collect())
    }

    /// A copy in another memory format (a no-op copy when the format is the same). For a CUDA
    /// tensor the permutation currently goes through host memory.
    pub fn to_format(&self, format: MemoryFormat) -> Result<Tensor<T>> {
        let format = check_format(&self.shape, format)?;
        if format == self.format {
            return Ok(self.clone());
        }
        let device = self.device();
        let phys = self.to_vec_physical()?;
        let data = permute_layout(&phys, &self.shape, format == MemoryFormat::ChannelsLast);
        Tensor::from_vec_with_format(data, &self.shape, format)?.to_device(&device)
    }

    /// A copy on `device` (a clone when already there).
    pub fn to_device(&self, device: &Device) -> Result<Tensor<T>> {
        match (device, &self.storage) {
            (Device::Cpu, Storage::Cpu(_)) => Ok(self.clone()),
            (Device::Cpu, Storage::Cuda(b)) => Ok(Tensor {
                shape: self.shape.clone(),
                format: self.format,
                storage: Storage::Cpu(b.to_host()?.into()),
            }),
            (Device::Cuda(dev), Storage::Cpu(v)) => Ok(Tensor {
                shape: self.shape.clone(),
                format: self.format,
                storage: Storage::Cuda(dev.upload(v)?),
            }),
            (Device::Cuda(dev), Storage::Cuda(b)) => {
                if b.device().same(dev) {
                    Ok(self.clone())
                } else {
                    Tensor::from_vec_with_format(b.to_host()?, &self.shape, self.format)?
                        .to_device(device)
                }
            }
        }
    }

    /// The same values rounded to another element type (on the CPU).
    pub fn to_dtype<U: Element>(&self) -> Result<Tensor<U>> {
        let device = self.device();
        let data: Vec<U> = self
            .to_vec_physical()?
            .into_iter()
            .map(|v| U::from_f32(v.to_f32()))
            .collect();
        Tensor::from_vec_with_format(data, &self.shape, self.format)?.to_device(&device)
    }

    /// Reinterprets the shape (same number of elements, contiguous only).
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor<T>> {
        let numel = checked_numel(shape)?;
        if numel != self.numel() || self.format != MemoryFormat::Contiguous {
            return Err(Error::Shape(format!(
                "cannot reshape a {} tensor of size {} to {}; the element counts must match and \
                 the tensor must be contiguous",
                self.format.name(),
                fmt_shape(&self.shape),
                fmt_shape(shape)
            )));
        }
        let mut t = self.clone();
        t.shape = shape.to_vec();
        Ok(t)
    }
}

impl<T: Element> Tensor<T> {
    /// A contiguous CPU tensor from a slice in logical row-major order (copied).
    pub fn from_slice(data: &[T], shape: &[usize]) -> Result<Self> {
        Self::from_vec(data.to_vec(), shape)
    }

    /// A contiguous CPU tensor whose element at logical index `(i0, i1, ...)` is
    /// `f(&[i0, i1, ...])`.
    ///
    /// ```
    /// use cunorm::Tensor;
    /// let t = Tensor::<f32>::from_fn(&[2, 3], |i| (i[0] * 10 + i[1]) as f32)?;
    /// assert_eq!(t.to_vec()?, vec![0.0, 1.0, 2.0, 10.0, 11.0, 12.0]);
    /// # Ok::<(), cunorm::Error>(())
    /// ```
    pub fn from_fn(shape: &[usize], mut f: impl FnMut(&[usize]) -> T) -> Result<Self> {
        let numel = checked_numel(shape)?;
        let mut data = Vec::new();
        data.try_reserve_exact(numel).map_err(|_| too_big(shape))?;
        let mut index = vec![0usize; shape.len()];
        for _ in 0..numel {
            data.push(f(&index));
            for d in (0..shape.len()).rev() {
                index[d] += 1;
                if index[d] < shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        Self::from_vec(data, shape)
    }

    /// A contiguous CPU tensor of standard normal samples from a seeded generator (the same
    /// seed gives the same tensor; the values are not `torch.randn`'s).
    ///
    /// ```
    /// use cunorm::Tensor;
    /// let a = Tensor::<f32>::randn(&[4, 8], 42)?;
    /// assert_eq!(a.to_vec()?, Tensor::<f32>::randn(&[4, 8], 42)?.to_vec()?);
    /// # Ok::<(), cunorm::Error>(())
    /// ```
    pub fn randn(shape: &[usize], seed: u64) -> Result<Self> {
        use rand::SeedableRng;
        use rand_distr::{Distribution, StandardNormal};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        Self::from_fn(shape, |_| {
            let v: f32 = StandardNormal.sample(&mut rng);
            T::from_f32(v)
        })
    }

    /// The storage in physical order, writable, when the tensor is on the CPU (`None` on a
    /// GPU): for in-place updates such as an optimizer step on a parameter.
    pub fn as_mut_slice(&mut self) -> Option<&mut [T]> {
        match &mut self.storage {
            Storage::Cpu(v) => Some(v.make_mut()),
            Storage::Cuda(_) => None,
        }
    }

    /// A tensor of the same shape and device with every element `value`.
    pub(crate) fn filled(&self, value: T) -> Result<Tensor<T>> {
        Tensor::full(&self.shape, value)?.to_device(&self.device())
    }
}

/// The element count of `shape`, or an `Err` when it overflows `usize`. The product of the
/// non-zero sizes must fit too (as the strides of the shape must, in PyTorch): then every
/// partial product (`N·C`, `∏spatial`, rows, columns) fits, empty or not.
pub(crate) fn checked_numel(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| too_big(shape))?;
    Ok(shape.iter().product())
}

pub(crate) fn too_big(shape: &[usize]) -> Error {
    Error::Shape(format!(
        "a tensor of size {} needs more memory than this machine can give; use a smaller shape",
        fmt_shape(shape)
    ))
}

impl<T: Element> std::fmt::Debug for Tensor<T> {
    /// As `Display`: shape, dtype, layout, device and a few values, never the whole buffer.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// How many values `Display` prints from each end of a tensor.
const SHOWN: usize = 3;

impl<T: Element> std::fmt::Display for Tensor<T> {
    /// `Tensor[2, 3, 4] f32 nchw cpu [0.1000, -1.2000, 0.3000, ..., 2.0000]`: shape, dtype,
    /// layout, device and a few values in logical order (copied from the GPU if needed).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor{} {} {} {}",
            fmt_shape(&self.shape),
            T::DTYPE,
            self.format.name(),
            self.device()
        )?;
        let Ok(v) = self.to_vec() else {
            return f.write_str(" [values unavailable]");
        };
        let show = |vals: &[T]| -> Vec<String> {
            vals.iter().map(|x| format!("{:.4}", x.to_f32())).collect()
        };
        let parts = if v.len() <= 2 * SHOWN {
            show(&v)
        } else {
            let mut p = show(&v[..SHOWN]);
            p.push("...".into());
            p.extend(show(&v[v.len() - SHOWN..]));
            p
        };
        write!(f, " [{}]", parts.join(", "))
    }
}

fn not_on_cpu() -> Error {
    Error::DeviceMismatch(
        "a CUDA tensor was passed where a CPU tensor is needed; move it with \
         .to_device(&Device::Cpu)"
            .into(),
    )
}

/// A view of a CUDA tensor's elements (an error for a CPU tensor).
pub(crate) fn tensor_view<T: Element>(t: &Tensor<T>) -> Result<cudarc::driver::CudaView<'_, T>> {
    match &t.storage {
        Storage::Cuda(b) => Ok(b.slice.slice(0..b.len)),
        Storage::Cpu(_) => Err(Error::DeviceMismatch(
            "a CPU tensor was passed to a CUDA op; move it with .to_device()".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A borrowed tensor reads the caller's slice in place, in the given format.
    #[test]
    fn borrowed_reads_in_place() {
        let data: Vec<f32> = (0..24).map(|v| v as f32).collect();
        let seen = Tensor::with_borrowed(&data, &[2, 3, 4], MemoryFormat::ChannelsLast, |t| {
            let s = t.as_slice().expect("on the CPU");
            (s.as_ptr(), t.format(), t.to_vec().expect("cpu"))
        })
        .expect("fits");
        assert_eq!(seen.0, data.as_ptr(), "no copy of the slice");
        assert_eq!(seen.1, MemoryFormat::ChannelsLast);
        let logical = Tensor::from_vec_with_format(data.clone(), &[2, 3, 4], seen.1)
            .and_then(|t| t.to_vec())
            .expect("cpu");
        assert_eq!(seen.2, logical);
    }

    /// What leaves the closure is an owned copy, and a write never reaches the slice.
    #[test]
    fn borrowed_clones_and_writes_copy() {
        let data = vec![1.0f32, 2.0, 3.0];
        let (kept, written) = Tensor::with_borrowed(&data, &[3], MemoryFormat::Contiguous, |t| {
            let kept = t.clone();
            let mut w = t.clone();
            w.as_mut_slice().expect("cpu")[0] = 9.0;
            (kept, w)
        })
        .expect("fits");
        assert_eq!(data, [1.0, 2.0, 3.0], "the borrowed slice is unchanged");
        assert_ne!(kept.as_slice().expect("cpu").as_ptr(), data.as_ptr());
        assert_eq!(kept.to_vec().expect("cpu"), data);
        assert_eq!(written.to_vec().expect("cpu"), [9.0, 2.0, 3.0]);
        assert_eq!(kept.into_physical_vec().expect("cpu"), data);
    }

    /// A slice that does not fit the shape is an `Err`, not a tensor over the wrong length.
    #[test]
    fn borrowed_length_is_checked() {
        let data = [0.0f32; 5];
        let e = Tensor::with_borrowed(&data, &[2, 3], MemoryFormat::Contiguous, |_| ())
            .expect_err("5 elements for [2, 3]");
        assert!(e.to_string().contains("[2, 3]"), "{e}");
    }
}
