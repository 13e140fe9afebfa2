//! Trains a small candle model whose normalization layers are cunorm's, the way a candle user
//! writes it: layers from a `VarBuilder` over a `VarMap`, candle's autograd, `candle_nn`'s AdamW;
//! and, side by side from the same initial weights on the same batches, the same model with
//! `candle_nn`'s layers.
//!
//! Model (images `[N, 3, 8, 8]` → 4 classes): conv 3→8 → BatchNorm → relu → conv 8→8 →
//! GroupNorm(2) → relu → mean over space → LayerNorm → linear → cross-entropy. The task is
//! synthetic: each class has a fixed random image pattern, and an input is its class's pattern
//! plus as much noise. Three runs:
//!
//! - **cunorm**: `cunorm::candle::{batch_norm, group_norm, layer_norm}`, each the one-line
//!   replacement of its `candle_nn` namesake (same arguments, same tensor names);
//! - **candle-nn composed**: `candle_nn::{batch_norm, group_norm}` and candle-nn's differentiable
//!   LayerNorm (`ops::layer_norm_slow`, what `candle_nn::LayerNorm` falls back to for
//!   non-contiguous inputs): the same mathematics in candle's own ops, so its losses must match
//!   cunorm's;
//! - **candle-nn fused**: `candle_nn::layer_norm` as a model would write it. Its fused op has no
//!   backward for contiguous inputs, so nothing below the LayerNorm learns.
//!
//! Run with `cargo run --release --features candle --example candle_train` on the CPU; built with
//! `--features candle-cuda` it trains on candle's CUDA device 0 when there is one (else on the
//! CPU, saying why). It prints the device, the losses and the time per step of each run,
//! and fails (exit 1) unless cunorm's loss falls below a tenth of its start, its losses match
//! the composed run's (within 2 % over the first 50 steps, while the two still train alike),
//! and the BatchNorm running statistics moved (the in-place update in training mode).

use std::time::Instant;

use candle_core::{DType, Device, Module, ModuleT, Result, Tensor, D};
use candle_nn::{
    conv2d, linear, loss, ops, AdamW, Conv2dConfig, Init, Optimizer, ParamsAdamW, VarBuilder,
    VarMap,
};

const CLASSES: usize = 4;
const BATCH: usize = 32;
const STEPS: u64 = 200;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Norms {
    Cunorm,
    CandleComposed,
    CandleFused,
}

/// candle-nn's LayerNorm arithmetic in candle ops, differentiable.
struct ComposedLayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl Module for ComposedLayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm_slow(x, &self.weight, &self.bias, 1e-5)
    }
}

struct Model {
    conv1: candle_nn::Conv2d,
    bn: Box<dyn ModuleT>,
    conv2: candle_nn::Conv2d,
    gn: Box<dyn Module>,
    ln: Box<dyn Module>,
    head: candle_nn::Linear,
}

impl Model {
    fn new(norms: Norms, vb: VarBuilder) -> Result<Model> {
        let pad = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let (bn, gn, ln): (Box<dyn ModuleT>, Box<dyn Module>, Box<dyn Module>) = match norms {
            Norms::Cunorm => (
                Box::new(cunorm::candle::batch_norm(8, 1e-5, vb.pp("bn"))?),
                Box::new(cunorm::candle::group_norm(2, 8, 1e-5, vb.pp("gn"))?),
                Box::new(cunorm::candle::layer_norm(8, 1e-5, vb.pp("ln"))?),
            ),
            Norms::CandleComposed => (
                Box::new(candle_nn::batch_norm(8, 1e-5, vb.pp("bn"))?),
                Box::new(candle_nn::group_norm(2, 8, 1e-5, vb.pp("gn"))?),
                Box::new(ComposedLayerNorm {
                    weight: vb.pp("ln").get_with_hints(8, "weight", Init::Const(1.))?,
                    bias: vb.pp("ln").get_with_hints(8, "bias", Init::Const(0.))?,
                }),
            ),
            Norms::CandleFused => (
                Box::new(candle_nn::batch_norm(8, 1e-5, vb.pp("bn"))?),
                Box::new(candle_nn::group_norm(2, 8, 1e-5, vb.pp("gn"))?),
                Box::new(candle_nn::layer_norm(8, 1e-5, vb.pp("ln"))?),
            ),
        };
        Ok(Model {
            conv1: conv2d(3, 8, 3, pad, vb.pp("conv1"))?,
            bn,
            conv2: conv2d(8, 8, 3, pad, vb.pp("conv2"))?,
            gn,
            ln,
            head: linear(8, CLASSES, vb.pp("head"))?,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.bn.forward_t(&self.conv1.forward(x)?, train)?.relu()?;
        let h = self.gn.forward(&self.conv2.forward(&h)?)?.relu()?;
        let h = h.mean(D::Minus1)?.mean(D::Minus1)?; // [N, 8]
        self.head.forward(&self.ln.forward(&h)?)
    }
}

fn wrap(e: cunorm::Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// Seeded standard normal values on `dev` (candle's generators cannot be seeded).
fn randn(dims: &[usize], seed: u64, dev: &Device) -> Result<Tensor> {
    let t = cunorm::Tensor::<f32>::randn(dims, seed).map_err(wrap)?;
    Tensor::from_vec(t.to_vec().map_err(wrap)?, dims, dev)
}

/// candle's CUDA device 0 with feature `candle-cuda` when it opens, else the CPU and why.
fn device() -> (Device, String) {
    #[cfg(feature = "candle-cuda")]
    {
        match Device::new_cuda(0) {
            Ok(d) => (d, "candle's CUDA device 0".into()),
            Err(e) => (Device::Cpu, format!("the CPU (no CUDA device: {e})")),
        }
    }
    #[cfg(not(feature = "candle-cuda"))]
    (
        Device::Cpu,
        "the CPU (built without feature candle-cuda)".into(),
    )
}

/// A batch of images and their labels: image = noise + the pattern of its class (`patterns`,
/// `[CLASSES, 3, 8, 8]`, fixed), the class cycling through the batch.
fn batch(patterns: &Tensor, step: u64) -> Result<(Tensor, Tensor)> {
    let dev = patterns.device();
    let noise = randn(&[BATCH, 3, 8, 8], 1000 + step, dev)?;
    let labels: Vec<u32> = (0..BATCH as u64)
        .map(|i| ((i * 7 + step) % CLASSES as u64) as u32)
        .collect();
    let labels = Tensor::from_vec(labels, BATCH, dev)?;
    let x = (noise + patterns.index_select(&labels, 0)?)?;
    Ok((x, labels))
}

/// One run: the losses of every step, the eval accuracy, the mean time per step, and the sum
/// of |running_mean| of the BatchNorm at the end.
struct Run {
    losses: Vec<f32>,
    correct: f32,
    ms_per_step: f64,
    running_mean_l1: f32,
}

fn train(norms: Norms, patterns: &Tensor) -> Result<Run> {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, patterns.device());
    let model = Model::new(norms, vb)?;
    // The same initial weights in every run: conv and linear weights drawn again from a seeded
    // generator by name (scale 1/√fan_in), biases zero; norm parameters start at ones/zeros.
    let mut named: Vec<_> = map.data().lock().unwrap().clone().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    for (seed, (name, var)) in named.iter().enumerate() {
        if !(name.starts_with("conv") || name.starts_with("head")) {
            continue;
        }
        if name.ends_with(".bias") {
            var.set(&var.zeros_like()?)?;
        } else {
            let dims = var.dims().to_vec();
            let fan_in: usize = dims[1..].iter().product();
            let w = randn(&dims, 100 + seed as u64, patterns.device())?;
            var.set(&(w / (fan_in as f64).sqrt())?)?;
        }
    }
    let params = ParamsAdamW {
        lr: 1e-2,
        ..Default::default()
    };
    // Running statistics are Vars of the VarMap too; they get no gradient, so AdamW leaves them.
    let mut opt = AdamW::new(map.all_vars(), params)?;
    let mut losses = Vec::new();
    let start = Instant::now();
    for step in 0..STEPS {
        let (x, labels) = batch(patterns, step)?;
        let l = loss::cross_entropy(&model.forward(&x, true)?, &labels)?;
        opt.backward_step(&l)?;
        losses.push(l.to_scalar::<f32>()?);
    }
    let ms_per_step = start.elapsed().as_secs_f64() * 1e3 / STEPS as f64;
    // Accuracy on fresh data in eval mode (BatchNorm on its running statistics).
    let (x, labels) = batch(patterns, 99_999)?;
    let pred = model.forward(&x, false)?.argmax(D::Minus1)?;
    let correct = pred
        .eq(&labels)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    let running_mean_l1 = map.data().lock().unwrap()["bn.running_mean"]
        .as_tensor()
        .abs()?
        .sum_all()?
        .to_scalar::<f32>()?;
    Ok(Run {
        losses,
        correct,
        ms_per_step,
        running_mean_l1,
    })
}

/// Mean of the last 20 losses.
fn tail(l: &[f32]) -> f32 {
    l[l.len() - 20..].iter().sum::<f32>() / 20.0
}

fn main() -> Result<()> {
    let (dev, why) = device();
    println!("training on {why}");
    let patterns = randn(&[CLASSES, 3, 8, 8], 7, &dev)?;
    let runs = [
        (Norms::Cunorm, train(Norms::Cunorm, &patterns)?),
        (
            Norms::CandleComposed,
            train(Norms::CandleComposed, &patterns)?,
        ),
        (Norms::CandleFused, train(Norms::CandleFused, &patterns)?),
    ];
    println!("step   cunorm   candle-nn composed   candle-nn fused LayerNorm");
    for s in [0, 1, 2, 5, 10, 25, 50, 100, 150, STEPS as usize - 1] {
        println!(
            "{s:4}   {:.4}   {:.4}               {:.4}",
            runs[0].1.losses[s], runs[1].1.losses[s], runs[2].1.losses[s]
        );
    }
    for (norms, r) in &runs {
        println!(
            "{norms:?}: loss {:.4} -> {:.4} (mean of the last 20 steps); eval accuracy {}/{BATCH}; \
             {:.2} ms/step",
            r.losses[0],
            tail(&r.losses),
            r.correct,
            r.ms_per_step
        );
    }
    let (ours, composed) = (&runs[0].1, &runs[1].1);
    let worst = ours.losses[..50]
        .iter()
        .zip(&composed.losses[..50])
        .map(|(a, b)| (a - b).abs() / b.abs().max(1e-3))
        .fold(0f32, f32::max);
    println!("largest relative loss difference to candle-nn composed over steps 0-49: {worst:.2e}");
    let learned = tail(&ours.losses) < 0.1 * ours.losses[0]; // false for a NaN loss too
    let matches = worst <= 0.02;
    if !learned || !matches || ours.running_mean_l1 == 0.0 {
        eprintln!(
            "candle_train: learned {learned}, matches candle-nn {matches}, running statistics \
             moved {}",
            ours.running_mean_l1 != 0.0
        );
        std::process::exit(1);
    }
    Ok(())
}
