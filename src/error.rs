//! The one error type of the crate.

/// Everything that can go wrong in cunorm. Messages follow PyTorch's wording where PyTorch has
/// one, name the offending shape, and say how to fix the call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The input, a parameter or a running statistic has the wrong shape or rank.
    #[error("{0}")]
    Shape(String),
    /// An argument is out of range (eps < 0, num_groups = 0, ...).
    #[error("{0}")]
    InvalidArgument(String),
    /// Tensors passed to one call live on different devices.
    #[error("{0}")]
    DeviceMismatch(String),
    /// The requested backend cannot be used on this machine; the message says why and how to fix it.
    #[error("{0}")]
    Unavailable(String),
    /// A CUDA driver call failed.
    #[error("CUDA driver error in {context}: {message}")]
    Cuda {
        /// What cunorm was doing.
        context: String,
        /// The driver's error.
        message: String,
    },
    /// NVRTC failed to compile a kernel module; carries the compiler log.
    #[error("NVRTC failed to compile {module}: {log}")]
    Compile {
        /// Kernel module name.
        module: String,
        /// The NVRTC log.
        log: String,
    },
    /// An I/O error (kernel cache).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// `Result` with cunorm's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Formats a shape the way PyTorch prints `input.size()`: `[2, 3, 4]`.
pub(crate) fn fmt_shape(shape: &[usize]) -> String {
    format!("{shape:?}")
}
