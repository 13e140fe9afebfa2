//! The integration suite, one test binary (one link instead of six on a fresh clone).
//!
//! - `cpu_paths`: the CPU path against an independent f64 oracle (every op, dtype, layout);
//! - `errors`: every argument check, its `Err` and message;
//! - `golden`: PyTorch's numbers (`tests/data/`, made by `tests/gen_golden.py`);
//! - `seed`: the seed notebook's experiment, statistically against PyTorch's values;
//! - `cuda`: the CUDA path against the CPU oracle (skips without a GPU, visibly);
//! - `nvrtc_compile`: every kernel module compiles with NVRTC (skips without libnvrtc).

mod common;

// The command line's sweep and demo, shared with the tests (the library does not export them).
#[allow(dead_code)]
#[path = "../../src/bin/cunorm/check.rs"]
mod check;
#[allow(dead_code)]
#[path = "../../src/bin/cunorm/demo.rs"]
mod demo;

mod api;
mod architecture;
#[cfg(feature = "candle")]
mod candle_ops;
mod cpu_paths;
mod cuda;
mod errors;
mod golden;
pub mod misuse;
mod nvrtc_compile;
mod seed;
