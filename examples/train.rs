//! Trains a small two-layer model with a normalization layer between, the way generic training
//! code holds layers: as `Box<dyn Norm<f32>>`, with parameters updated in place through
//! `parameters_mut()` and the gradients matched by name.
//!
//! Model: `y = w2 · relu(norm(W1 · x + b1)) + b2` on a synthetic regression task (a fixed random
//! teacher network), mean-squared-error loss, plain SGD. Run with
//! `cargo run --release --example train`; it trains once with each norm layer and fails (exit 1)
//! if a loss does not fall to a tenth of its start.

use cunorm::{BatchNorm1d, GroupNorm, LayerNorm, Norm, RMSNorm, Result, Tensor};

/// Inputs, hidden units, batch size.
const IN: usize = 8;
const HIDDEN: usize = 16;
const BATCH: usize = 64;

/// A dense layer `y = x·Wᵀ + b` with its gradient buffers.
struct Linear {
    w: Vec<f32>,
    b: Vec<f32>,
    fan_in: usize,
    fan_out: usize,
}

impl Linear {
    fn new(fan_in: usize, fan_out: usize, seed: u64) -> Result<Linear> {
        let scale = (1.0 / fan_in as f32).sqrt();
        let w = Tensor::<f32>::randn(&[fan_out, fan_in], seed)?.to_vec()?;
        Ok(Linear {
            w: w.into_iter().map(|v| v * scale).collect(),
            b: vec![0.0; fan_out],
            fan_in,
            fan_out,
        })
    }

    fn forward(&self, x: &[f32]) -> Vec<f32> {
        let rows = x.len() / self.fan_in;
        let mut y = vec![0.0; rows * self.fan_out];
        for r in 0..rows {
            for o in 0..self.fan_out {
                let wr = &self.w[o * self.fan_in..(o + 1) * self.fan_in];
                let xr = &x[r * self.fan_in..(r + 1) * self.fan_in];
                y[r * self.fan_out + o] =
                    self.b[o] + wr.iter().zip(xr).map(|(a, b)| a * b).sum::<f32>();
            }
        }
        y
    }

    /// Returns dx and applies the SGD step to W and b.
    fn backward_step(&mut self, x: &[f32], dy: &[f32], lr: f32) -> Vec<f32> {
        let rows = x.len() / self.fan_in;
        let mut dx = vec![0.0; x.len()];
        let mut dw = vec![0.0; self.w.len()];
        let mut db = vec![0.0; self.b.len()];
        for r in 0..rows {
            for o in 0..self.fan_out {
                let g = dy[r * self.fan_out + o];
                db[o] += g;
                for i in 0..self.fan_in {
                    dw[o * self.fan_in + i] += g * x[r * self.fan_in + i];
                    dx[r * self.fan_in + i] += g * self.w[o * self.fan_in + i];
                }
            }
        }
        for (w, g) in self.w.iter_mut().zip(&dw) {
            *w -= lr * g;
        }
        for (b, g) in self.b.iter_mut().zip(&db) {
            *b -= lr * g;
        }
        dx
    }
}

/// One SGD step on every parameter of `norm`, in place, without knowing its type.
fn sgd(norm: &mut dyn Norm<f32>, grads: &cunorm::Gradients<f32>, lr: f32) -> Result<()> {
    let named = grads.named();
    for (name, p) in norm.parameters_mut() {
        let Some((_, g)) = named.iter().find(|(n, _)| *n == name) else {
            continue;
        };
        let g = g.to_vec()?;
        let data = p.as_mut_slice().ok_or_else(|| {
            cunorm::Error::InvalidArgument("this example updates CPU parameters".into())
        })?;
        for (w, dw) in data.iter_mut().zip(g) {
            *w -= lr * dw;
        }
    }
    Ok(())
}

/// Trains the model with `norm` between the layers for `steps` SGD steps; returns the loss of
/// the first and the last step.
pub fn train(mut norm: Box<dyn Norm<f32>>, steps: usize) -> Result<(f32, f32)> {
    let teacher1 = Linear::new(IN, HIDDEN, 100)?;
    let teacher2 = Linear::new(HIDDEN, 1, 101)?;
    let mut l1 = Linear::new(IN, HIDDEN, 1)?;
    let mut l2 = Linear::new(HIDDEN, 1, 2)?;
    let lr = 0.05;
    norm.train(true);
    let (mut first, mut last) = (f32::NAN, f32::NAN);
    for step in 0..steps {
        let x = Tensor::<f32>::randn(&[BATCH, IN], 1000 + step as u64)?.to_vec()?;
        let target: Vec<f32> = teacher2.forward(
            &teacher1
                .forward(&x)
                .iter()
                .map(|v| v.tanh())
                .collect::<Vec<_>>(),
        );

        // Forward.
        let h = l1.forward(&x);
        let h_t = Tensor::from_vec(h.clone(), &[BATCH, HIDDEN])?;
        let out = norm.forward_t(&h_t)?;
        let z = out.output.to_vec()?;
        let a: Vec<f32> = z.iter().map(|v| v.max(0.0)).collect();
        let y = l2.forward(&a);
        let loss = y
            .iter()
            .zip(&target)
            .map(|(p, t)| (p - t) * (p - t))
            .sum::<f32>()
            / BATCH as f32;
        if step == 0 {
            first = loss;
        }
        last = loss;

        // Backward.
        let dy: Vec<f32> = y
            .iter()
            .zip(&target)
            .map(|(p, t)| 2.0 * (p - t) / BATCH as f32)
            .collect();
        let da = l2.backward_step(&a, &dy, lr);
        let dz: Vec<f32> = da
            .iter()
            .zip(&z)
            .map(|(g, v)| if *v > 0.0 { *g } else { 0.0 })
            .collect();
        let grads = norm.backward(&Tensor::from_vec(dz, &[BATCH, HIDDEN])?, &h_t, &out.stats)?;
        sgd(norm.as_mut(), &grads, lr)?;
        l1.backward_step(&x, &grads.dx.to_vec()?, lr);
    }
    Ok((first, last))
}

/// The norm layers the example trains with, each behind the same trait object.
pub fn layers() -> Result<Vec<Box<dyn Norm<f32>>>> {
    Ok(vec![
        Box::new(LayerNorm::new(&[HIDDEN])?),
        Box::new(RMSNorm::new(&[HIDDEN])?),
        Box::new(BatchNorm1d::new(HIDDEN)?),
        Box::new(GroupNorm::new(4, HIDDEN)?),
    ])
}

#[allow(dead_code)] // the test suite includes this file for `train` and `layers`
fn main() -> std::process::ExitCode {
    let run = || -> Result<bool> {
        let mut ok = true;
        for norm in layers()? {
            let name = norm.name();
            let (first, last) = train(norm, 400)?;
            let converged = last < 0.1 * first;
            ok &= converged;
            println!(
                "{name:<12} loss {first:.4} -> {last:.4} ({})",
                if converged {
                    "converged"
                } else {
                    "did NOT converge"
                }
            );
        }
        Ok(ok)
    };
    match run() {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("train: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
