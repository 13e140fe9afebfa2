//! Trains a small candle model whose normalization layers are cunorm's, the way a candle user
//! writes it: layers from a `VarBuilder` over a `VarMap`, candle's autograd, `candle_nn`'s AdamW.
//!
//! Model (images `[N, 3, 8, 8]` → 4 classes): conv 3→8 → cunorm BatchNorm → relu → conv 8→8 →
//! cunorm GroupNorm(2) → relu → mean over space → cunorm LayerNorm → linear → cross-entropy. The
//! task is synthetic: each class has a fixed random image pattern, and an input is its class's
//! pattern plus as much noise.
//! Each cunorm layer is the one-line replacement of its `candle_nn` namesake (same arguments,
//! same tensor names), and keeps the autograd graph. (`candle_nn`'s own LayerNorm would cut it
//! here: its fused op has no backward for contiguous inputs.)
//!
//! Run with `cargo run --release --features candle --example candle_train`. It fails (exit 1)
//! unless the loss falls below half its start and the BatchNorm running statistics moved away
//! from their initial values (the in-place update in training mode).

use candle_core::{DType, Device, Module, ModuleT, Result, Tensor, D};
use candle_nn::{
    conv2d, linear, loss, ops, AdamW, Conv2dConfig, Optimizer, ParamsAdamW, VarBuilder, VarMap,
};

const CLASSES: usize = 4;
const BATCH: usize = 32;

struct Model {
    conv1: candle_nn::Conv2d,
    bn: cunorm::candle::BatchNorm,
    conv2: candle_nn::Conv2d,
    gn: cunorm::candle::GroupNorm,
    ln: cunorm::candle::LayerNorm,
    head: candle_nn::Linear,
}

impl Model {
    fn new(vb: VarBuilder) -> Result<Model> {
        let pad = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(Model {
            conv1: conv2d(3, 8, 3, pad, vb.pp("conv1"))?,
            bn: cunorm::candle::batch_norm(8, 1e-5, vb.pp("bn"))?, // was candle_nn::batch_norm
            conv2: conv2d(8, 8, 3, pad, vb.pp("conv2"))?,
            gn: cunorm::candle::group_norm(2, 8, 1e-5, vb.pp("gn"))?, // was candle_nn::group_norm
            ln: cunorm::candle::layer_norm(8, 1e-5, vb.pp("ln"))?,    // was candle_nn::layer_norm
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

/// A batch of images and their labels: image = noise + the pattern of its class (`patterns`,
/// `[CLASSES, 3, 8, 8]`, fixed), the class cycling through the batch.
fn batch(patterns: &Tensor, step: u64) -> Result<(Tensor, Tensor)> {
    let noise = cunorm::Tensor::<f32>::randn(&[BATCH, 3, 8, 8], 1000 + step).map_err(wrap)?;
    let noise = Tensor::from_vec(
        noise.to_vec().map_err(wrap)?,
        (BATCH, 3, 8, 8),
        &Device::Cpu,
    )?;
    let labels: Vec<u32> = (0..BATCH as u64)
        .map(|i| ((i * 7 + step) % CLASSES as u64) as u32)
        .collect();
    let labels = Tensor::from_vec(labels, BATCH, &Device::Cpu)?;
    let x = (noise + patterns.index_select(&labels, 0)?)?;
    Ok((x, labels))
}

fn wrap(e: cunorm::Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

fn main() -> Result<()> {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let model = Model::new(vb)?;
    // candle initializes from an unseeded generator: draw the conv and linear weights again from
    // cunorm's seeded one (same scale, 1/√fan_in), biases zero, so every run is the same.
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
            let w = cunorm::Tensor::<f32>::randn(&dims, 100 + seed as u64).map_err(wrap)?;
            let w = Tensor::from_vec(w.to_vec().map_err(wrap)?, dims, &Device::Cpu)?;
            var.set(&(w / (fan_in as f64).sqrt())?)?;
        }
    }
    let p = cunorm::Tensor::<f32>::randn(&[CLASSES, 3, 8, 8], 7).map_err(wrap)?;
    let patterns = Tensor::from_vec(p.to_vec().map_err(wrap)?, (CLASSES, 3, 8, 8), &Device::Cpu)?;
    let params = ParamsAdamW {
        lr: 1e-2,
        ..Default::default()
    };
    let mut opt = AdamW::new(map.all_vars(), params)?;
    let (mut first, mut last) = (None, 0f32);
    for step in 0..150u64 {
        let (x, labels) = batch(&patterns, step)?;
        let logits = model.forward(&x, true)?;
        let l = loss::cross_entropy(&logits, &labels)?;
        opt.backward_step(&l)?;
        let l = l.to_scalar::<f32>()?;
        first.get_or_insert(l);
        last = 0.9 * last + 0.1 * l;
        if step < 10 {
            last = l;
        }
        if step % 25 == 0 || step == 149 {
            println!("step {step:3}: loss {l:.4} (smoothed {last:.4})");
        }
    }
    // Accuracy on fresh data in eval mode (BatchNorm on its running statistics).
    let (x, labels) = batch(&patterns, 99_999)?;
    let pred = ops::softmax(&model.forward(&x, false)?, D::Minus1)?.argmax(D::Minus1)?;
    let correct = pred
        .eq(&labels)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    let rm = map.data().lock().unwrap()["bn.running_mean"]
        .as_tensor()
        .abs()?
        .sum_all()?
        .to_scalar::<f32>()?;
    let first = first.unwrap_or(f32::NAN);
    println!(
        "loss {first:.4} -> {last:.4}; eval accuracy {correct}/{BATCH}; |running_mean| sum {rm:.4}"
    );
    let learned = last < 0.5 * first; // false for a NaN loss too
    if !learned || rm == 0.0 {
        eprintln!("candle_train: the loss did not halve, or the running statistics did not move");
        std::process::exit(1);
    }
    Ok(())
}
