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

/// A statistic's expected value under PyTorch and the standard deviation of one run's value
/// around it (the random numbers differ from `torch.randn`'s, so agreement is statistical).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Band {
    /// Expected value.
    pub value: f64,
    /// Standard deviation of one run's value.
    pub sd: f64,
}

impl Band {
    /// How many standard deviations `x` lies from the expected value.
    pub fn z(&self, x: f64) -> f64 {
        (x - self.value).abs() / self.sd
    }
}

/// Expected mean and std over steps of one output pixel, per sample and channel.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpectedOutput {
    /// `[N][C]` expected mean.
    pub mean: [[Band; C]; N],
    /// `[N][C]` expected standard deviation.
    pub std: [[Band; C]; N],
}

/// PyTorch's expected value and one run's band for every statistic the demo prints.
#[derive(Clone, Debug, PartialEq)]
pub struct Expected {
    /// Input mean per sample: the offsets.
    pub input_mean_per_sample: [Band; N],
    /// Input std per channel: `√(s_c² + 0.25²)`.
    pub input_std_per_channel: [Band; C],
    /// BatchNorm2d `(running_mean, √running_var)` per channel.
    pub batch_norm_running: ([Band; C], [Band; C]),
    /// InstanceNorm2d `(running_mean, √running_var)` per channel.
    pub instance_norm_running: ([Band; C], [Band; C]),
    /// Outputs of BatchNorm2d, LayerNorm, InstanceNorm2d, GroupNorm, in `DemoReport::outputs`'
    /// order.
    pub outputs: [ExpectedOutput; 4],
}

/// Mean, std and kurtosis of one normalized output pixel per channel (the kurtosis sets the
/// band of a std over steps). LayerNorm and GroupNorm std: SEMANTICS §6; the rest (BatchNorm's
/// sample 0, whose mirror image sample 1 is, mean negated) from a 10⁷-sample Monte Carlo of the
/// same normalizations in f64 (`numpy`, eps = 1e-5), which reproduces SEMANTICS' figures to 4
/// digits.
#[allow(clippy::type_complexity)]
const OUTPUT_MOMENTS: [([f64; C], [f64; C], [f64; C]); 4] = [
    (
        [-0.2517, -0.1282, -0.0857, -0.0643],
        [0.9684, 0.9921, 0.9962, 0.9979],
        [2.42, 2.36, 2.34, 2.34],
    ),
    (
        [0.0; C],
        [0.472, 0.792, 1.104, 1.389],
        [3.31, 2.98, 2.61, 2.30],
    ),
    ([0.0; C], [1.0; C], [1.80; C]),
    (
        [0.0; C],
        [0.760, 1.193, 0.901, 1.090],
        [2.83, 2.07, 2.52, 2.19],
    ),
];

/// The expected value and band of every statistic after `steps` steps (SEMANTICS §6):
/// - running statistics are `(1 − f)·init + f·E[batch statistic]` with `f = 1 − 0.999^steps`,
///   and vary by `√(Σ w_t²)` times the batch statistic's sd, `w_t = 0.001·0.999^(steps−t)`;
///   BatchNorm's batch variance (8 values, two sample offsets) has mean `s_c² + 0.5/7` and
///   sd `√(2/7)·(s_c² + 0.5/7)`, InstanceNorm's (two planes of 4) mean `s_c²`, sd `s_c²/√3`;
///   both batch means have sd `s_c/√8`;
/// - a mean over steps has sd `std/√steps`, a std over steps `std·√((κ − 1)/(4·steps))`
///   (κ the kurtosis).
pub fn expected(steps: usize) -> Expected {
    let t = steps as f64;
    let f = 1.0 - 0.999f64.powf(t);
    let w2 = 1e-6 * (1.0 - 0.999f64.powf(2.0 * t)) / (1.0 - 0.999f64 * 0.999);
    let s = |c: usize| SCALE[c] as f64;
    let running = |c: usize, batch_var: f64, var_sd: f64| {
        let rv = (1.0 - f) + f * batch_var;
        (
            Band {
                value: 0.5 * f,
                sd: w2.sqrt() * s(c) / 8f64.sqrt(),
            },
            Band {
                value: rv.sqrt(),
                sd: w2.sqrt() * var_sd / (2.0 * rv.sqrt()),
            },
        )
    };
    let bn = |c: usize| {
        let v = s(c) * s(c) + 0.5 / 7.0;
        running(c, v, (2.0f64 / 7.0).sqrt() * v)
    };
    let inn = |c: usize| running(c, s(c) * s(c), s(c) * s(c) / 3f64.sqrt());
    let mean_band = |value: f64, std: f64| Band {
        value,
        sd: std / t.sqrt(),
    };
    let std_band = |value: f64, kurtosis: f64| Band {
        value,
        sd: value * ((kurtosis - 1.0) / (4.0 * t)).sqrt(),
    };
    let outputs = std::array::from_fn(|k| {
        let (m, sd, kurt) = OUTPUT_MOMENTS[k];
        // Sample 1 mirrors sample 0 (offsets ±0.25 around the batch mean).
        let sign = |n: usize| if n == 0 { 1.0 } else { -1.0 };
        ExpectedOutput {
            mean: std::array::from_fn(|n| {
                std::array::from_fn(|c| mean_band(sign(n) * m[c] + 0.0, sd[c]))
            }),
            std: std::array::from_fn(|_| std::array::from_fn(|c| std_band(sd[c], kurt[c]))),
        }
    });
    // One step's sample mean averages 4 pixels of each of the C channels.
    let pooled: f64 = (0..C).map(|c| 4.0 * s(c) * s(c)).sum::<f64>() / (4 * C * 4 * C) as f64;
    Expected {
        input_mean_per_sample: std::array::from_fn(|n| Band {
            value: OFFSET[n] as f64,
            sd: (pooled / t).sqrt(),
        }),
        input_std_per_channel: std::array::from_fn(|c| {
            let v = (s(c) * s(c) + 0.0625).sqrt();
            Band {
                value: v,
                sd: v / (16.0 * t).sqrt(),
            }
        }),
        batch_norm_running: (
            std::array::from_fn(|c| bn(c).0),
            std::array::from_fn(|c| bn(c).1),
        ),
        instance_norm_running: (
            std::array::from_fn(|c| inn(c).0),
            std::array::from_fn(|c| inn(c).1),
        ),
        outputs,
    }
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

/// Runs the experiment for `steps` steps with the given seed on `device`. Needs at least two
/// steps: the demo reports standard deviations over steps.
pub fn run(steps: usize, seed: u64, device: &Device) -> Result<DemoReport> {
    if steps < 2 {
        return Err(cunorm::Error::InvalidArgument(format!(
            "demo: --steps {steps} is too few: the standard deviation over steps needs at least \
             2 steps (the notebook ran 1000)"
        )));
    }
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

    /// The report as the notebook printed it, each row followed by what PyTorch gives for it:
    /// the expected value ± one run's standard deviation, and a flag on any value beyond 5 sd.
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let e = expected(self.steps);
        let (mut within3, mut total, mut outside5) = (0usize, 0usize, Vec::new());
        let mut s = String::new();
        let mut row = |s: &mut String, label: &str, got: &[f64], want: &[Band]| {
            let items: Vec<String> = got.iter().map(|x| format!("{x:8.4}")).collect();
            let bands: Vec<String> = want
                .iter()
                .map(|b| format!("{:8.4} ±{:.4}", b.value, b.sd))
                .collect();
            let mut flag = String::new();
            for (x, b) in got.iter().zip(want) {
                total += 1;
                let z = b.z(*x);
                within3 += (z <= 3.0) as usize;
                if z > 5.0 {
                    outside5.push(label.trim().to_string());
                    flag = "   <- beyond 5 sd".into();
                }
            }
            let _ = writeln!(s, "{label}[{}]{flag}", items.join(", "));
            let pad = " ".repeat(label.len().saturating_sub(9));
            let _ = writeln!(s, "{pad}PyTorch: [{}]", bands.join(", "));
        };
        let _ = writeln!(s, "device: {}", self.device);
        let _ = writeln!(
            s,
            "input shape: [{}, {N}, {C}, 2, 2] (steps, N, C, H, W)",
            self.steps
        );
        let _ = writeln!(
            s,
            "random numbers: a seeded StdRng, not torch.randn, so agreement with PyTorch is \
             statistical: each row is followed by PyTorch's expected value ± the sd of one run"
        );
        row(
            &mut s,
            "input mean per sample: ",
            &self.input_mean_per_sample,
            &e.input_mean_per_sample,
        );
        row(
            &mut s,
            "input std per channel: ",
            &self.input_std_per_channel,
            &e.input_std_per_channel,
        );
        for (name, r, (m, v)) in [
            ("BN", &self.batch_norm_running, &e.batch_norm_running),
            ("IN", &self.instance_norm_running, &e.instance_norm_running),
        ] {
            row(&mut s, &format!("{name} running_mean:      "), &r.mean, m);
            row(&mut s, &format!("{name} sqrt(running_var): "), &r.std, v);
        }
        for ((name, o), w) in self.outputs.iter().zip(&e.outputs) {
            let _ = writeln!(s, "{name} output at pixel (0,0), over steps:");
            for n in 0..N {
                row(
                    &mut s,
                    &format!("  sample {n} mean: "),
                    &o.mean[n],
                    &w.mean[n],
                );
                row(
                    &mut s,
                    &format!("  sample {n} std:  "),
                    &o.std[n],
                    &w.std[n],
                );
            }
        }
        let _ = writeln!(
            s,
            "{within3} of {total} statistics within 3 sd of PyTorch's expectation (about 99.7% \
             expected){}",
            if outside5.is_empty() {
                String::new()
            } else {
                format!("; beyond 5 sd: {}", outside5.join(", "))
            }
        );
        s
    }
}
