//! Shared test helpers: tolerances stated once per dtype, comparison with reports, and a
//! dispatcher over every layer type.
#![allow(dead_code)]

pub mod oracle;

use cunorm::*;
use std::result::Result;

/// Max |a − b| ≤ atol + rtol·|b| per dtype (PyTorch's own test tolerances).
pub fn tol(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F32 => (1e-5, 1.3e-6),
        DType::F16 => (1e-5, 1e-3),
        DType::BF16 => (1e-5, 1.6e-2),
    }
}

/// Tolerance for f32 parameter gradients (sums over the batch, in f32 for every input dtype).
pub const PARAM_TOL: (f64, f64) = (2e-5, 2e-6);

/// Compares two arrays; returns a description of the worst element when out of tolerance.
pub fn compare(what: &str, got: &[f32], want: &[f32], atol: f64, rtol: f64) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{what}: length {} != {}", got.len(), want.len()));
    }
    let mut worst: Option<(usize, f64)> = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (g as f64, w as f64);
        let bound = atol + rtol * w.abs();
        let err = (g - w).abs();
        // NaN matches NaN, and an infinity the same infinity.
        let same_special = (g.is_nan() && w.is_nan()) || g == w;
        let within = err <= bound;
        let bad = !within && !same_special;
        if bad && worst.is_none_or(|(_, e)| err / bound > e) {
            worst = Some((i, err / bound));
        }
    }
    match worst {
        None => Ok(()),
        Some((i, ratio)) => Err(format!(
            "{what}: element {i}: got {} want {} ({ratio:.1}x the tolerance atol {atol:e} rtol {rtol:e})",
            got[i], want[i]
        )),
    }
}

/// Deterministic pseudo-random normal values.
pub fn randn(n: usize, seed: u64, mean: f32, std: f32) -> Vec<f32> {
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let z: f32 = StandardNormal.sample(&mut rng);
            mean + std * z
        })
        .collect()
}

/// Says that a test skipped, and why, where the test runner shows it: straight to the process's
/// stderr, which libtest does not capture (a skipped GPU test must never read as a pass).
pub fn report_skip(test: &str, reason: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
}
