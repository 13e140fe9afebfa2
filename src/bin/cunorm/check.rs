//! CUDA-vs-CPU comparison sweep (`cunorm check`, and the CUDA test suite): every op × dtype ×
//! memory format × stage (training forward, running statistics, eval forward, backward) over
//! shapes with 1-sized dims, odd and prime sizes, rows shorter than a warp and longer than
//! 65 536 elements, and mean-1e4 inputs. The CPU path (f64 statistics) is the oracle; CUDA
//! outputs are poisoned with NaN before each run so an unwritten element fails.

use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use cunorm::cuda::CudaDevice;
use cunorm::Device;
use cunorm::Result;
use cunorm::*;
use cunorm::{bf16, f16};
use cunorm::{DType, Element};
use cunorm::{Gradients, NormOutput, SavedStats};
use cunorm::{MemoryFormat, Tensor};

/// Tolerances (max abs error on outputs of unit scale, relative L2 error) per dtype.
pub fn tolerance(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F32 => (1e-4, 1e-5),
        DType::F16 => (4e-3, 1e-3),
        DType::BF16 => (3e-2, 8e-3),
    }
}

/// Relative tolerance of running statistics.
pub const RUNNING_TOL: f64 = 1e-5;

/// One comparison.
#[derive(Clone, Debug)]
pub struct CheckRow {
    /// Layer, e.g. `BatchNorm2d`.
    pub op: String,
    /// Input dtype.
    pub dtype: DType,
    /// Input memory format.
    pub format: MemoryFormat,
    /// Input shape.
    pub shape: Vec<usize>,
    /// What was compared: `train y`, `running_var`, `eval dx`, `repeat` (bitwise), ...
    pub stage: String,
    /// Max |cuda − cpu| / max(1, |cpu|) per element for outputs of unit scale; for sums such
    /// as dweight, max |cuda − cpu| / max(1, max|cpu|).
    pub max_abs: f64,
    /// ‖cuda − cpu‖ / ‖cpu‖.
    pub rel_l2: f64,
    /// The bounds applied (max abs, rel L2), already scaled for mean-offset inputs.
    pub bounds: (f64, f64),
    /// Whether both bounds hold (and no NaN appeared where the CPU has none).
    pub pass: bool,
}

/// Any layer, so one code path drives every type.
#[derive(Clone, Debug)]
#[allow(missing_docs)]
pub enum AnyNorm {
    Bn1(BatchNorm1d),
    Bn2(BatchNorm2d),
    Bn3(BatchNorm3d),
    In1(InstanceNorm1d),
    In2(InstanceNorm2d),
    In3(InstanceNorm3d),
    Ln(LayerNorm),
    Gn(GroupNorm),
    Rms(RMSNorm),
}

macro_rules! each {
    ($s:expr, $l:ident => $body:expr) => {
        match $s {
            AnyNorm::Bn1($l) => $body,
            AnyNorm::Bn2($l) => $body,
            AnyNorm::Bn3($l) => $body,
            AnyNorm::In1($l) => $body,
            AnyNorm::In2($l) => $body,
            AnyNorm::In3($l) => $body,
            AnyNorm::Ln($l) => $body,
            AnyNorm::Gn($l) => $body,
            AnyNorm::Rms($l) => $body,
        }
    };
}

impl AnyNorm {
    /// The PyTorch class name.
    pub fn name(&self) -> &'static str {
        match self {
            AnyNorm::Bn1(_) => "BatchNorm1d",
            AnyNorm::Bn2(_) => "BatchNorm2d",
            AnyNorm::Bn3(_) => "BatchNorm3d",
            AnyNorm::In1(_) => "InstanceNorm1d",
            AnyNorm::In2(_) => "InstanceNorm2d",
            AnyNorm::In3(_) => "InstanceNorm3d",
            AnyNorm::Ln(_) => "LayerNorm",
            AnyNorm::Gn(_) => "GroupNorm",
            AnyNorm::Rms(_) => "RMSNorm",
        }
    }
    /// Forward with saved statistics.
    pub fn forward_with_stats<T: Element>(&mut self, x: &Tensor<T>) -> Result<NormOutput<T>> {
        each!(self, l => l.forward_with_stats(x))
    }
    /// Backward.
    pub fn backward<T: Element>(
        &self,
        dy: &Tensor<T>,
        x: &Tensor<T>,
        s: &SavedStats,
    ) -> Result<Gradients<T>> {
        each!(self, l => l.backward(dy, x, s))
    }
    /// Training (`true`) or evaluation mode.
    pub fn set_training(&mut self, on: bool) {
        each!(self, l => l.train(on))
    }
    /// Moves parameters and running statistics.
    pub fn move_to(&mut self, d: &Device) -> Result<()> {
        each!(self, l => l.to_device(d))
    }
    /// (weight, bias, running_mean, running_var).
    pub fn tensors(&self) -> [Option<&Tensor<f32>>; 4] {
        match self {
            AnyNorm::Bn1(l) => [l.weight(), l.bias(), l.running_mean(), l.running_var()],
            AnyNorm::Bn2(l) => [l.weight(), l.bias(), l.running_mean(), l.running_var()],
            AnyNorm::Bn3(l) => [l.weight(), l.bias(), l.running_mean(), l.running_var()],
            AnyNorm::In1(l) => [l.weight(), l.bias(), l.running_mean(), l.running_var()],
            AnyNorm::In2(l) => [l.weight(), l.bias(), l.running_mean(), l.running_var()],
            AnyNorm::In3(l) => [l.weight(), l.bias(), l.running_mean(), l.running_var()],
            AnyNorm::Ln(l) => [l.weight(), l.bias(), None, None],
            AnyNorm::Gn(l) => [l.weight(), l.bias(), None, None],
            AnyNorm::Rms(l) => [l.weight(), None, None, None],
        }
    }
    /// Steps counted by BatchNorm/InstanceNorm with running statistics.
    pub fn num_batches_tracked(&self) -> Option<i64> {
        match self {
            AnyNorm::Bn1(l) => l.num_batches_tracked(),
            AnyNorm::Bn2(l) => l.num_batches_tracked(),
            AnyNorm::Bn3(l) => l.num_batches_tracked(),
            AnyNorm::In1(l) => l.num_batches_tracked(),
            AnyNorm::In2(l) => l.num_batches_tracked(),
            AnyNorm::In3(l) => l.num_batches_tracked(),
            _ => None,
        }
    }
    /// Replaces weight and bias (where the layer has them).
    pub fn set_params(&mut self, w: Tensor<f32>, b: Tensor<f32>) -> Result<()> {
        macro_rules! wb {
            ($l:expr) => {{
                if $l.weight().is_some() {
                    $l.set_weight(w)?;
                }
                if $l.bias().is_some() {
                    $l.set_bias(b)?;
                }
            }};
        }
        match self {
            AnyNorm::Bn1(l) => wb!(l),
            AnyNorm::Bn2(l) => wb!(l),
            AnyNorm::Bn3(l) => wb!(l),
            AnyNorm::In1(l) => wb!(l),
            AnyNorm::In2(l) => wb!(l),
            AnyNorm::In3(l) => wb!(l),
            AnyNorm::Ln(l) => wb!(l),
            AnyNorm::Gn(l) => wb!(l),
            AnyNorm::Rms(l) => {
                if l.weight().is_some() {
                    l.set_weight(w)?;
                }
            }
        }
        Ok(())
    }
}

fn randn(n: usize, seed: u64, mean: f32) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let z: f32 = StandardNormal.sample(&mut rng);
            mean + z
        })
        .collect()
}

/// The sweep's cases: (layer, input shape, input mean).
pub fn cases(quick: bool) -> Result<Vec<(AnyNorm, Vec<usize>, f32)>> {
    let bn = |c| BatchNormConfig::new(c).with_momentum(Some(0.3));
    let inn = |c| {
        InstanceNormConfig::new(c)
            .with_affine(true)
            .with_track_running_stats(true)
            .with_momentum(Some(0.3))
    };
    let mut v = vec![
        (
            AnyNorm::Bn2(BatchNorm2d::from_config(bn(3))?),
            vec![4, 3, 5, 7],
            0.0,
        ),
        (
            AnyNorm::Bn2(BatchNorm2d::from_config(bn(5))?),
            vec![2, 5, 1, 1],
            0.0,
        ),
        (
            AnyNorm::Bn1(BatchNorm1d::from_config(bn(8))?),
            vec![33, 8],
            0.0,
        ),
        (
            AnyNorm::Bn3(BatchNorm3d::from_config(bn(3))?),
            vec![2, 3, 3, 4, 5],
            0.0,
        ),
        (
            AnyNorm::Bn2(BatchNorm2d::from_config(bn(3))?),
            vec![4, 3, 5, 5],
            1e4,
        ),
        (
            AnyNorm::In2(InstanceNorm2d::from_config(inn(3))?),
            vec![2, 3, 5, 7],
            0.0,
        ),
        (
            AnyNorm::In2(InstanceNorm2d::from_config(inn(4))?),
            vec![1, 4, 1, 33],
            0.0,
        ),
        (
            AnyNorm::In1(InstanceNorm1d::from_config(inn(5))?),
            vec![3, 5, 31],
            0.0,
        ),
        (
            AnyNorm::In2(InstanceNorm2d::from_config(inn(3))?),
            vec![2, 3, 9, 9],
            1e4,
        ),
        (AnyNorm::Gn(GroupNorm::new(2, 4)?), vec![2, 4, 2, 2], 0.0),
        (AnyNorm::Gn(GroupNorm::new(3, 6)?), vec![3, 6, 5, 7], 0.0),
        (AnyNorm::Gn(GroupNorm::new(1, 5)?), vec![2, 5, 3], 0.0),
        (
            AnyNorm::Gn(GroupNorm::new(8, 32)?),
            vec![2, 32, 17, 19],
            0.0,
        ),
        (AnyNorm::Gn(GroupNorm::new(2, 4)?), vec![2, 4, 5, 5], 1e4),
        (AnyNorm::Ln(LayerNorm::new(&[13])?), vec![5, 13], 0.0),
        (AnyNorm::Ln(LayerNorm::new(&[1])?), vec![7, 1], 0.0),
        (AnyNorm::Ln(LayerNorm::new(&[4, 8])?), vec![3, 4, 8], 0.0),
        (AnyNorm::Ln(LayerNorm::new(&[1024])?), vec![64, 1024], 0.0),
        (AnyNorm::Ln(LayerNorm::new(&[4099])?), vec![3, 4099], 0.0),
        (AnyNorm::Ln(LayerNorm::new(&[129])?), vec![6, 129], 1e4),
        (AnyNorm::Rms(RMSNorm::new(&[13])?), vec![5, 13], 0.0),
        (AnyNorm::Rms(RMSNorm::new(&[1])?), vec![7, 1], 0.0),
        (AnyNorm::Rms(RMSNorm::new(&[1024])?), vec![64, 1024], 0.0),
        (AnyNorm::Rms(RMSNorm::new(&[4099])?), vec![3, 4099], 0.0),
        // Rows of whole packs that reach the rest of the team kernels: 192 columns (the f32
        // team backward with 2 packs a thread), 6 144 (f16/bf16 RMSNorm with 8 packs a
        // thread; LayerNorm's with CUNORM_TEAM_KMAX=8, as scripts/fake-cuda/run.sh runs it).
        (AnyNorm::Ln(LayerNorm::new(&[192])?), vec![5, 192], 0.0),
        (AnyNorm::Rms(RMSNorm::new(&[192])?), vec![5, 192], 0.0),
        (AnyNorm::Ln(LayerNorm::new(&[6144])?), vec![3, 6144], 0.0),
        (AnyNorm::Rms(RMSNorm::new(&[6144])?), vec![3, 6144], 0.0),
        // Rows above 48 KiB of f32 but within the opt-in shared memory: the kernel opts in.
        (
            AnyNorm::Ln(LayerNorm::new(&[20_000])?),
            vec![2, 20_000],
            0.0,
        ),
        (AnyNorm::Rms(RMSNorm::new(&[33_333])?), vec![2, 33_333], 0.0),
        // Rows too long for the register-resident kernels (more than 8 packs per thread of
        // 1024): the shared-memory kernels, cached (f16/bf16) and wide (f32: registers and
        // shared memory; 70 001 is not whole packs, so re-read).
        (
            AnyNorm::Ln(LayerNorm::new(&[70_000])?),
            vec![2, 70_000],
            0.0,
        ),
        (AnyNorm::Rms(RMSNorm::new(&[70_001])?), vec![2, 70_001], 0.0),
        (AnyNorm::Gn(GroupNorm::new(2, 4)?), vec![1, 4, 8_000], 0.0),
        // Groups and planes whose x and dy fit one block with whole 16-byte packs and 32 or more
        // packs a plane: the one-pass backward in both layouts (planes_tile_bwd[_contig]) and
        // forward channels-last (planes_tile_fwd), one of them far from zero mean.
        (
            AnyNorm::In2(InstanceNorm2d::from_config(inn(8))?),
            vec![3, 8, 16, 16],
            0.0,
        ),
        (AnyNorm::Gn(GroupNorm::new(4, 16)?), vec![2, 16, 8, 32], 1e4),
        // f32 rows (groups, planes) of 256 KiB, beyond the 227 KiB of shared memory: the wide
        // forward, registers and shared memory (LayerNorm's [2, 70 000] above too).
        (AnyNorm::Gn(GroupNorm::new(2, 4)?), vec![1, 4, 32_768], 0.0),
        (AnyNorm::Rms(RMSNorm::new(&[65_536])?), vec![2, 65_536], 0.0),
        // Rows and groups of more than 64 KiB of whole packs: the cluster forward (on sm_90; the
        // fake driver is one) in clusters of 4 and 8 blocks, every dtype (with the rows above:
        // LayerNorm [2, 20 000] and [2, 70 000], GroupNorm [1, 4, 32 768], RMSNorm
        // [2, 65 536]); scripts/fake-cuda/run.sh runs the kernels above once with it off.
        (
            AnyNorm::Ln(LayerNorm::new(&[40_000])?),
            vec![2, 40_000],
            0.0,
        ),
        (
            AnyNorm::Rms(RMSNorm::new(&[100_000])?),
            vec![1, 100_000],
            0.0,
        ),
        (AnyNorm::Rms(RMSNorm::new(&[20_000])?), vec![3, 20_000], 0.0),
        (AnyNorm::Gn(GroupNorm::new(2, 4)?), vec![1, 4, 12_000], 1e4),
        (AnyNorm::Gn(GroupNorm::new(2, 4)?), vec![2, 4, 40_000], 0.0),
        (
            AnyNorm::In1(InstanceNorm1d::from_config(inn(2))?),
            vec![1, 2, 65_536],
            0.0,
        ),
    ];
    // Seeded random shapes: odd, prime and 1-sized dimensions in every position.
    let mut rng = StdRng::seed_from_u64(2026);
    let mut dim = |hi: usize| -> usize {
        use rand::Rng;
        [1, 2, 3, 5, 7, 13, 31, 37, 64, 97][rng.random_range(0..10)].min(hi)
    };
    for _ in 0..3 {
        let (n, c, h, w) = (dim(8).max(2), dim(37), dim(97), dim(31));
        v.push((
            AnyNorm::Bn2(BatchNorm2d::from_config(bn(c))?),
            vec![n, c, h, w],
            0.0,
        ));
        let s = (h * w).max(2);
        v.push((
            AnyNorm::In1(InstanceNorm1d::from_config(inn(c))?),
            vec![n, c, s],
            0.0,
        ));
        let g = (2..=c).find(|g| c % g == 0).unwrap_or(1);
        v.push((AnyNorm::Gn(GroupNorm::new(g, c)?), vec![n, c, h, w], 0.0));
        let cols = dim(97) * dim(64);
        v.push((
            AnyNorm::Ln(LayerNorm::new(&[cols])?),
            vec![n * h, cols],
            0.0,
        ));
        v.push((AnyNorm::Rms(RMSNorm::new(&[cols])?), vec![n * w, cols], 0.0));
    }
    if !quick {
        v.extend([
            (
                AnyNorm::Bn1(BatchNorm1d::from_config(bn(3))?),
                vec![2, 3, 70_001],
                0.0,
            ),
            (
                AnyNorm::Bn2(BatchNorm2d::from_config(bn(32))?),
                vec![16, 32, 17, 17],
                0.0,
            ),
            (
                AnyNorm::In1(InstanceNorm1d::from_config(inn(3))?),
                vec![2, 3, 70_001],
                0.0,
            ),
            (AnyNorm::Gn(GroupNorm::new(2, 4)?), vec![1, 4, 70_001], 0.0),
            (
                AnyNorm::Ln(LayerNorm::new(&[70_001])?),
                vec![2, 70_001],
                0.0,
            ),
            (
                AnyNorm::Ln(LayerNorm::new(&[65_536])?),
                vec![3, 65_536],
                0.0,
            ),
            (AnyNorm::Rms(RMSNorm::new(&[70_001])?), vec![2, 70_001], 0.0),
            (AnyNorm::Ln(LayerNorm::new(&[128])?), vec![4096, 128], 0.0),
        ]);
    }
    Ok(v)
}

/// Max error and relative L2 error of `got` against `want`.
///
/// Outputs of unit scale (`unit`: y, dx): each element's error is divided by max(1, |want|),
/// since a dtype's spacing at magnitude m > 1 is m times coarser (a bf16 output of 4.5 is one
/// ulp = 0.031 from its neighbours). Sums (`!unit`: dweight, dbias, running stats): the max
/// error is divided by max(1, max|want|). For both, the L2 norm of `want` is floored at that of
/// a vector of ones: an output that cancels to near zero (a sum of random terms, dx of a
/// LayerNorm over one element or a BatchNorm over two) is held to its terms' unit scale, not to
/// a relative bound that f32 arithmetic on those terms cannot meet.
fn metrics(got: &[f32], want: &[f32], unit: bool) -> (f64, f64) {
    let mut max_err = 0f64;
    let (mut num, mut den, mut peak) = (0f64, 0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        let (g, w) = (g as f64, w as f64);
        let d = if g.is_nan() != w.is_nan() {
            f64::INFINITY
        } else if w.is_nan() {
            0.0
        } else {
            (g - w).abs()
        };
        let scaled = if unit && w.is_finite() {
            d / w.abs().max(1.0)
        } else {
            d
        };
        max_err = max_err.max(scaled);
        num += d * d;
        if w.is_finite() {
            den += w * w;
            peak = peak.max(w.abs());
        }
    }
    if got.len() != want.len() {
        max_err = f64::INFINITY;
    }
    den = den.max(got.len() as f64);
    let rel = if den > 0.0 {
        (num / den).sqrt()
    } else {
        num.sqrt()
    };
    (
        if unit {
            max_err
        } else {
            max_err / peak.max(1.0)
        },
        rel,
    )
}

struct Ctx<'a> {
    rows: &'a mut Vec<CheckRow>,
    op: String,
    dtype: DType,
    format: MemoryFormat,
    shape: Vec<usize>,
    scale: f64,
}

impl Ctx<'_> {
    fn push(&mut self, stage: &str, got: &[f32], want: &[f32], unit: bool, bounds: (f64, f64)) {
        let (max_abs, rel_l2) = metrics(got, want, unit);
        let bounds = (bounds.0 * self.scale, bounds.1 * self.scale);
        self.rows.push(CheckRow {
            op: self.op.clone(),
            dtype: self.dtype,
            format: self.format,
            shape: self.shape.clone(),
            stage: stage.to_string(),
            max_abs,
            rel_l2,
            bounds,
            pass: max_abs <= bounds.0 && rel_l2 <= bounds.1,
        });
    }
}

fn run_case<T: Element>(
    dev: &CudaDevice,
    layer: &AnyNorm,
    shape: &[usize],
    mean: f32,
    format: MemoryFormat,
    seed: u64,
    rows: &mut Vec<CheckRow>,
) -> Result<()> {
    let cuda = Device::Cuda(dev.clone());
    let numel: usize = shape.iter().product();
    let mut cpu_l = layer.clone();
    let params = cpu_l.tensors()[0].map(|w| w.shape().to_vec());
    if let Some(ps) = params {
        let n = ps.iter().product();
        let w = Tensor::from_vec(randn(n, seed + 7, 1.0), &ps)?;
        let b = Tensor::from_vec(randn(n, seed + 8, 0.0), &ps)?;
        cpu_l.set_params(w, b)?;
    }
    let mut gpu_l = cpu_l.clone();
    gpu_l.move_to(&cuda)?;
    let make = |seed: u64, m: f32| -> Result<Tensor<T>> {
        let t = Tensor::from_vec(
            randn(numel, seed, m).into_iter().map(T::from_f32).collect(),
            shape,
        )?;
        if shape.len() >= 3 {
            t.to_format(format)
        } else {
            Ok(t)
        }
    };
    let (atol, rtol) = tolerance(T::DTYPE);
    let mut cx = Ctx {
        rows,
        op: layer.name().into(),
        dtype: T::DTYPE,
        format,
        shape: shape.to_vec(),
        scale: 1.0 + mean.abs() as f64,
    };
    let f = |t: &Tensor<T>| t.to_f32_vec();
    let v = |t: &Tensor<f32>| t.to_vec();
    for (step, training) in [(0u64, true), (1, true), (2, false)] {
        cpu_l.set_training(training);
        gpu_l.set_training(training);
        let tag = if training { "train" } else { "eval" };
        let x = make(seed + step * 2, mean)?;
        let dy = make(seed + step * 2 + 1, 0.0)?;
        let xg = x.to_device(&cuda)?;
        let dyg = dy.to_device(&cuda)?;
        dev.set_poison(true);
        let og = gpu_l.forward_with_stats(&xg)?;
        let gg = gpu_l.backward(&dyg, &xg, &og.stats)?;
        dev.set_poison(false);
        let oc = cpu_l.forward_with_stats(&x)?;
        let gc = cpu_l.backward(&dy, &x, &oc.stats)?;
        if step == 0 {
            // Same call again on an identical copy: bitwise identical output and gradients.
            // A clone shares device buffers; its running-stat update copies them first.
            let mut again = gpu_l.clone();
            let o2 = again.forward_with_stats(&xg)?;
            let g2 = again.backward(&dyg, &xg, &o2.stats)?;
            let bits = |a: &[f32], b: &[f32]| {
                a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits()) && a.len() == b.len()
            };
            let same = bits(&f(&og.output)?, &f(&o2.output)?)
                && bits(&f(&gg.dx)?, &f(&g2.dx)?)
                && match (&gg.dweight, &g2.dweight) {
                    (Some(a), Some(b)) => bits(&v(a)?, &v(b)?),
                    _ => true,
                };
            cx.rows.push(CheckRow {
                op: cx.op.clone(),
                dtype: cx.dtype,
                format,
                shape: shape.to_vec(),
                stage: "repeat (bitwise)".into(),
                max_abs: if same { 0.0 } else { f64::INFINITY },
                rel_l2: 0.0,
                bounds: (0.0, 0.0),
                pass: same,
            });
        }
        cx.push(
            &format!("{tag} y"),
            &f(&og.output)?,
            &f(&oc.output)?,
            true,
            (atol, rtol),
        );
        cx.push(
            &format!("{tag} dx"),
            &f(&gg.dx)?,
            &f(&gc.dx)?,
            true,
            (atol, rtol),
        );
        for (name, a, b) in [
            ("dweight", &gg.dweight, &gc.dweight),
            ("dbias", &gg.dbias, &gc.dbias),
        ] {
            if let (Some(a), Some(b)) = (a, b) {
                cx.push(
                    &format!("{tag} {name}"),
                    &v(a)?,
                    &v(b)?,
                    false,
                    (1e-4f64.max(atol), 1e-5f64.max(rtol)),
                );
            }
        }
    }
    let (gt, ct) = (gpu_l.tensors(), cpu_l.tensors());
    for (i, name) in [(2, "running_mean"), (3, "running_var")] {
        if let (Some(a), Some(b)) = (gt[i], ct[i]) {
            cx.push(name, &v(a)?, &v(b)?, false, (RUNNING_TOL, RUNNING_TOL));
        }
    }
    Ok(())
}

/// Runs the sweep on `dev`. `quick` leaves out the largest shapes.
pub fn sweep(dev: &CudaDevice, quick: bool) -> Result<Vec<CheckRow>> {
    let mut rows = Vec::new();
    for (k, (layer, shape, mean)) in cases(quick)?.into_iter().enumerate() {
        let formats: &[MemoryFormat] =
            if shape.len() >= 3 && !matches!(layer, AnyNorm::Ln(_) | AnyNorm::Rms(_)) {
                &[MemoryFormat::Contiguous, MemoryFormat::ChannelsLast]
            } else {
                &[MemoryFormat::Contiguous]
            };
        for &fmt in formats {
            let seed = 1000 + 10 * k as u64;
            run_case::<f32>(dev, &layer, &shape, mean, fmt, seed, &mut rows)?;
            if mean == 0.0 {
                run_case::<f16>(dev, &layer, &shape, mean, fmt, seed, &mut rows)?;
                run_case::<bf16>(dev, &layer, &shape, mean, fmt, seed, &mut rows)?;
            }
        }
    }
    Ok(rows)
}

/// The sweep as a table.
pub fn table(rows: &[CheckRow]) -> String {
    let mut s = format!(
        "{:<15} {:<5} {:<5} {:<20} {:<18} {:>11} {:>11} {:>11} {:>9}  result\n",
        "op", "dtype", "fmt", "shape", "stage", "max_abs", "rel_l2", "bound_abs", "bound_l2"
    );
    for r in rows {
        s += &format!(
            "{:<15} {:<5} {:<5} {:<20} {:<18} {:>11.3e} {:>11.3e} {:>11.1e} {:>9.1e}  {}\n",
            r.op,
            r.dtype.name(),
            r.format.name(),
            format!("{:?}", r.shape),
            r.stage,
            r.max_abs,
            r.rel_l2,
            r.bounds.0,
            r.bounds.1,
            if r.pass { "pass" } else { "FAIL" }
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every sweep case is a legal input for its layer (checked on the CPU path).
    #[test]
    fn sweep_cases_are_valid_inputs() {
        for (mut layer, shape, mean) in cases(false).unwrap() {
            let n: usize = shape.iter().product();
            let x = Tensor::from_vec(randn(n, 1, mean), &shape).unwrap();
            let out = layer.forward_with_stats(&x);
            assert!(out.is_ok(), "{} {shape:?}: {:?}", layer.name(), out.err());
        }
    }

    #[test]
    fn metrics_scale_errors_by_magnitude() {
        // One bf16 ulp at 4.5 (0.03125) is within the bf16 bound; the same error at 0.5 is not.
        let (bf16_abs, _) = tolerance(DType::BF16);
        assert!(metrics(&[4.53125], &[4.5], true).0 <= bf16_abs);
        assert!(metrics(&[0.53125], &[0.5], true).0 > bf16_abs);
        // A NaN where the reference has a number fails outright.
        assert_eq!(metrics(&[f32::NAN], &[1.0], true).0, f64::INFINITY);
        // A sum that cancels to 0.3 is held to an absolute bound of unit scale, not to 1e-5
        // of 0.3; a sum of 300 keeps its relative bound.
        let (max, rel) = metrics(&[0.300_003], &[0.3], false);
        assert!(max < 4e-6 && rel < 4e-6, "{max} {rel}");
        let (_, rel) = metrics(&[300.003], &[300.0], false);
        assert!((rel - 1e-5).abs() < 1e-6, "{rel}");
        // dx that cancels to ~1e-5: an f32 error of 1e-7 is measured against unit scale.
        let (_, rel) = metrics(&[1.1e-5, -2.0e-5], &[1.0e-5, -2.0e-5], true);
        assert!(rel < 1e-6, "{rel}");
        // Lengths must match.
        assert_eq!(metrics(&[1.0], &[1.0, 2.0], true).0, f64::INFINITY);
    }
}
