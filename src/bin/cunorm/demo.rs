//! The seed notebook's experiment: random inputs through BatchNorm2d, LayerNorm,
//! InstanceNorm2d and GroupNorm in training mode, with statistics of inputs and outputs.

use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use cunorm::Device;
use cunorm::Result;
use cunorm::Tensor;
use cunorm::{
    BatchNorm2d, BatchNormConfig, GroupNorm, InstanceNorm2d, InstanceNormConfig, LayerNorm, Module,
};

/// Batch size of the experiment.
pub const N: usize = 2;
/// Channels of the experiment.
pub const C: usize = 4;
/// Per-channel scale of the input.
pub const SCALE: [f32; C] = [1.0, 2.0, 3.0, 4.0];
/// Per-sample offset of the input.
pub const OFFSET: [f32; N] = [0.25, 0.75];

/// Mean and (unbiased) standard deviation over the steps of one output pixel, per sample and channel.
#[derive(Clone, Debug, PartialEq)]
pub struct OutputStats {
    /// `[N][C]` mean over steps of `y[n, c, 0, 0]`.
    pub mean: [[f64; C]; N],
    /// `[N][C]` standard deviation over steps of `y[n, c, 0, 0]`.
    pub std: [[f64; C]; N],
}

/// Running statistics of a layer after the experiment.
#[derive(Clone, Debug, PartialEq)]
pub struct RunningStats {
    /// `running_mean` per channel.
    pub mean: [f64; C],
    /// `√running_var` per channel.
    pub std: [f64; C],
}

/// Everything the notebook printed.
#[derive(Clone, Debug, PartialEq)]
pub struct DemoReport {
    /// Device description.
    pub device: String,
    /// Number of steps.
    pub steps: usize,
    /// Mean of the input per sample over all steps.
    pub input_mean_per_sample: [f64; N],
    /// Unbiased std of the input per channel over all steps.
    pub input_std_per_channel: [f64; C],
    /// BatchNorm2d running statistics.
    pub batch_norm_running: RunningStats,
    /// InstanceNorm2d running statistics.
    pub instance_norm_running: RunningStats,
    /// Output statistics of BatchNorm2d, LayerNorm, InstanceNorm2d, GroupNorm.
    pub outputs: [(String, OutputStats); 4],
}

/// Sums for a mean and unbiased std.
#[derive(Clone, Copy, Default)]
struct Acc {
    n: f64,
    s: f64,
    s2: f64,
    shift: Option<f64>,
}

impl Acc {
    fn push(&mut self, v: f64) {
        let k = *self.shift.get_or_insert(v);
        self.n += 1.0;
        self.s += v - k;
        self.s2 += (v - k) * (v - k);
    }
    fn mean(&self) -> f64 {
        self.shift.unwrap_or(0.0) + self.s / self.n
    }
    fn std(&self) -> f64 {
        ((self.s2 - self.s * self.s / self.n) / (self.n - 1.0))
            .max(0.0)
            .sqrt()
    }
}

fn running(mean: Option<&Tensor<f32>>, var: Option<&Tensor<f32>>) -> Result<RunningStats> {
    let mut r = RunningStats {
        mean: [0.0; C],
        std: [0.0; C],
    };
    if let (Some(m), Some(v)) = (mean, var) {
        let (m, v) = (m.to_vec()?, v.to_vec()?);
        for c in 0..C {
            r.mean[c] = m[c] as f64;
            r.std[c] = (v[c] as f64).sqrt();
        }
    }
    Ok(r)
}

/// Runs the experiment for `steps` steps with the given seed on `device`.
pub fn run(steps: usize, seed: u64, device: &Device) -> Result<DemoReport> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut bn = BatchNorm2d::from_config(BatchNormConfig::new(C).with_momentum(Some(0.001)))?;
    let mut ln = LayerNorm::new(&[C, 2, 2])?;
    let mut inorm = InstanceNorm2d::from_config(
        InstanceNormConfig::new(C)
            .with_momentum(Some(0.001))
            .with_track_running_stats(true),
    )?;
    let mut gn = GroupNorm::new(2, C)?;
    bn.to_device(device)?;
    ln.to_device(device)?;
    inorm.to_device(device)?;
    gn.to_device(device)?;

    let mut in_mean = [Acc::default(); N];
    let mut in_std = [Acc::default(); C];
    let mut out = [[[Acc::default(); C]; N]; 4];
    for _ in 0..steps {
        let mut data = Vec::with_capacity(N * C * 4);
        for n in 0..N {
            for c in 0..C {
                for _ in 0..4 {
                    let z: f32 = StandardNormal.sample(&mut rng);
                    let v = z * SCALE[c] + OFFSET[n];
                    in_mean[n].push(v as f64);
                    in_std[c].push(v as f64);
                    data.push(v);
                }
            }
        }
        let x = Tensor::from_vec(data, &[N, C, 2, 2])?.to_device(device)?;
        let ys = [
            bn.forward(&x)?,
            ln.forward(&x)?,
            inorm.forward(&x)?,
            gn.forward(&x)?,
        ];
        for (k, y) in ys.iter().enumerate() {
            let y = y.to_vec()?;
            for n in 0..N {
                for c in 0..C {
                    out[k][n][c].push(y[(n * C + c) * 4] as f64);
                }
            }
        }
    }
    let names = ["batch_norm", "layer_norm", "instance_norm", "group_norm"];
    let outputs = std::array::from_fn(|k| {
        let stats = OutputStats {
            mean: std::array::from_fn(|n| std::array::from_fn(|c| out[k][n][c].mean())),
            std: std::array::from_fn(|n| std::array::from_fn(|c| out[k][n][c].std())),
        };
        (names[k].to_string(), stats)
    });
    Ok(DemoReport {
        device: device.describe(),
        steps,
        input_mean_per_sample: std::array::from_fn(|n| in_mean[n].mean()),
        input_std_per_channel: std::array::from_fn(|c| in_std[c].std()),
        batch_norm_running: running(bn.running_mean(), bn.running_var())?,
        instance_norm_running: running(inorm.running_mean(), inorm.running_var())?,
        outputs,
    })
}

impl DemoReport {
    /// The statistics of one output by name (`batch_norm`, `layer_norm`, ...).
    pub fn output(&self, name: &str) -> Option<&OutputStats> {
        self.outputs.iter().find(|(n, _)| n == name).map(|(_, s)| s)
    }

    /// The report as one JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        // `outputs` holds batch_norm, layer_norm, instance_norm, group_norm in that order.
        let out = |k: usize| {
            let s = &self.outputs[k].1;
            (s.mean.to_vec(), s.std.to_vec())
        };
        let (bm, bs) = out(0);
        let (lm, ls) = out(1);
        let (im, is) = out(2);
        let (gm, gs) = out(3);
        json!({
            "device": self.device,
            "steps": self.steps,
            "input_mean_per_sample": self.input_mean_per_sample,
            "input_std_per_channel": self.input_std_per_channel,
            "batch_norm": {
                "running_mean": self.batch_norm_running.mean,
                "running_std": self.batch_norm_running.std,
                "output_mean": bm, "output_std": bs,
            },
            "layer_norm": { "output_mean": lm, "output_std": ls },
            "instance_norm": {
                "running_mean": self.instance_norm_running.mean,
                "running_std": self.instance_norm_running.std,
                "output_mean": im, "output_std": is,
            },
            "group_norm": { "output_mean": gm, "output_std": gs },
        })
    }

    /// The report as the notebook printed it.
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let v = |xs: &[f64]| {
            let items: Vec<String> = xs.iter().map(|x| format!("{x:8.4}")).collect();
            format!("[{}]", items.join(", "))
        };
        let mut s = String::new();
        let _ = writeln!(s, "device: {}", self.device);
        let _ = writeln!(
            s,
            "input shape: [{}, {N}, {C}, 2, 2] (steps, N, C, H, W)",
            self.steps
        );
        let _ = writeln!(
            s,
            "input mean per sample: {}",
            v(&self.input_mean_per_sample)
        );
        let _ = writeln!(
            s,
            "input std per channel: {}",
            v(&self.input_std_per_channel)
        );
        for (name, r) in [
            ("BN", &self.batch_norm_running),
            ("IN", &self.instance_norm_running),
        ] {
            let _ = writeln!(s, "{name} running_mean:      {}", v(&r.mean));
            let _ = writeln!(s, "{name} sqrt(running_var): {}", v(&r.std));
        }
        for (name, o) in &self.outputs {
            let _ = writeln!(s, "{name} output at pixel (0,0), over steps:");
            for n in 0..N {
                let _ = writeln!(
                    s,
                    "  sample {n} mean {}  std {}",
                    v(&o.mean[n]),
                    v(&o.std[n])
                );
            }
        }
        s
    }
}
