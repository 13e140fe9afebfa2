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
        let both_nan = g.is_nan() && w.is_nan();
        let within = err <= bound;
        let bad = !within && !both_nan;
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

/// Any layer, so tests can drive every type through one code path.
pub enum AnyLayer {
    Bn1(BatchNorm1d),
    Bn2(BatchNorm2d),
    Bn3(BatchNorm3d),
    In1(InstanceNorm1d),
    In2(InstanceNorm2d),
    In3(InstanceNorm3d),
    Ln(LayerNorm),
    Gn(GroupNorm),
    Rms(RmsNorm),
}

#[macro_export]
macro_rules! with_layer {
    ($layer:expr, $l:ident => $body:expr) => {
        match $layer {
            AnyLayer::Bn1($l) => $body,
            AnyLayer::Bn2($l) => $body,
            AnyLayer::Bn3($l) => $body,
            AnyLayer::In1($l) => $body,
            AnyLayer::In2($l) => $body,
            AnyLayer::In3($l) => $body,
            AnyLayer::Ln($l) => $body,
            AnyLayer::Gn($l) => $body,
            AnyLayer::Rms($l) => $body,
        }
    };
}

impl AnyLayer {
    pub fn running(&self) -> Option<(Tensor<f32>, Tensor<f32>, Option<i64>)> {
        let get =
            |m: Option<&Tensor<f32>>, v: Option<&Tensor<f32>>, n| Some((m?.clone(), v?.clone(), n));
        match self {
            AnyLayer::Bn1(l) => get(l.running_mean(), l.running_var(), l.num_batches_tracked()),
            AnyLayer::Bn2(l) => get(l.running_mean(), l.running_var(), l.num_batches_tracked()),
            AnyLayer::Bn3(l) => get(l.running_mean(), l.running_var(), l.num_batches_tracked()),
            AnyLayer::In1(l) => get(l.running_mean(), l.running_var(), l.num_batches_tracked()),
            AnyLayer::In2(l) => get(l.running_mean(), l.running_var(), l.num_batches_tracked()),
            AnyLayer::In3(l) => get(l.running_mean(), l.running_var(), l.num_batches_tracked()),
            _ => None,
        }
    }

    pub fn set_weight(&mut self, w: Tensor<f32>) -> cunorm::Result<()> {
        match self {
            AnyLayer::Bn1(l) => l.set_weight(w),
            AnyLayer::Bn2(l) => l.set_weight(w),
            AnyLayer::Bn3(l) => l.set_weight(w),
            AnyLayer::In1(l) => l.set_weight(w),
            AnyLayer::In2(l) => l.set_weight(w),
            AnyLayer::In3(l) => l.set_weight(w),
            AnyLayer::Ln(l) => l.set_weight(w),
            AnyLayer::Gn(l) => l.set_weight(w),
            AnyLayer::Rms(l) => l.set_weight(w),
        }
    }

    pub fn set_bias(&mut self, b: Tensor<f32>) -> cunorm::Result<()> {
        match self {
            AnyLayer::Bn1(l) => l.set_bias(b),
            AnyLayer::Bn2(l) => l.set_bias(b),
            AnyLayer::Bn3(l) => l.set_bias(b),
            AnyLayer::In1(l) => l.set_bias(b),
            AnyLayer::In2(l) => l.set_bias(b),
            AnyLayer::In3(l) => l.set_bias(b),
            AnyLayer::Ln(l) => l.set_bias(b),
            AnyLayer::Gn(l) => l.set_bias(b),
            AnyLayer::Rms(_) => Err(Error::InvalidArgument("RMSNorm has no bias".into())),
        }
    }

    pub fn weight_shape(&self) -> Option<Vec<usize>> {
        let w = match self {
            AnyLayer::Bn1(l) => l.weight(),
            AnyLayer::Bn2(l) => l.weight(),
            AnyLayer::Bn3(l) => l.weight(),
            AnyLayer::In1(l) => l.weight(),
            AnyLayer::In2(l) => l.weight(),
            AnyLayer::In3(l) => l.weight(),
            AnyLayer::Ln(l) => l.weight(),
            AnyLayer::Gn(l) => l.weight(),
            AnyLayer::Rms(l) => l.weight(),
        };
        w.map(|t| t.shape().to_vec())
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
