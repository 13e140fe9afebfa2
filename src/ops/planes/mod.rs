//! The planes family: BatchNorm, InstanceNorm and GroupNorm, the ops that normalize an
//! `(N, C, *spatial)` input per statistic group and apply a per-channel affine, in either memory
//! format. One vocabulary runs from the op fronts to the kernels: [`PlaneShape`] (the input's
//! `(N, C, S)` and layout), [`Grouping`] (how planes form statistic groups) and [`Source`]
//! (where the statistics come from).
//!
//! - `mod.rs` (here): the family's front half shared by the three ops, CPU dispatch;
//! - `cpu.rs`: the CPU engine;
//! - `cuda.rs`: the CUDA launches (`kernels/planes.cu`).

// Loops run over (n, c) and index several per-plane arrays at once.
#![allow(clippy::needless_range_loop)]

pub(crate) mod cpu;
pub(crate) mod cuda;

use super::{f32_tensor, Gradients, NormOp, NormOutput, SavedStats};
use crate::device::Device;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::tensor::{MemoryFormat, Storage, Tensor};

/// The `(N, C, S)` view of an input of shape `(N, C, *spatial)`: batch, channels, the product
/// of the spatial sizes, and the memory format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlaneShape {
    /// Batch size.
    pub n: usize,
    /// Channels.
    pub c: usize,
    /// Product of the spatial sizes (1 for an `(N, C)` input).
    pub s: usize,
    /// Contiguous (NCHW) or channels-last (NHWC).
    pub format: MemoryFormat,
}

impl PlaneShape {
    /// The view of a tensor `shape` in `format`: an `Err` unless the rank is at least 2 and
    /// every product fits `usize` (every [`crate::Tensor`]'s shape does).
    pub fn of(shape: &[usize], format: MemoryFormat) -> Result<PlaneShape> {
        let [n, c, spatial @ ..] = shape else {
            return Err(Error::Shape(format!(
                "an (N, C, *) input needs at least 2 dimensions, got size {}",
                crate::error::fmt_shape(shape)
            )));
        };
        crate::tensor::checked_numel(shape)?;
        Ok(PlaneShape {
            n: *n,
            c: *c,
            s: crate::tensor::checked_numel(spatial)?,
            format,
        })
    }

    /// `N·C·S`, saturating at `usize::MAX` (the launch layer checks it).
    pub fn numel(&self) -> usize {
        self.n.saturating_mul(self.c).saturating_mul(self.s)
    }

    /// `N·C·S` for the launch layer, whose shapes come from the caller: an `Err` when it (or
    /// `N·C`) overflows or reaches the kernels' index limit (2⁵³).
    pub(crate) fn checked_numel(&self) -> Result<usize> {
        self.n
            .checked_mul(self.c)
            .and_then(|nc| nc.checked_mul(self.s))
            .filter(|&e| e < crate::cuda::launch::MAX_ELEMENTS)
            .ok_or_else(|| {
                Error::Shape(format!(
                    "cuda launch: N·C·S of {self:?} overflows; split the input"
                ))
            })
    }

    pub(crate) fn channels_last(&self) -> bool {
        self.format == MemoryFormat::ChannelsLast
    }

    /// The shape as the planes kernels take it: (N, C, S, channels-last flag).
    pub(crate) fn kernel_args(&self) -> Result<(i64, i32, i64, i32)> {
        Ok((
            self.n as i64,
            crate::cuda::launch::to_i32("C", self.c)?,
            self.s as i64,
            self.channels_last() as i32,
        ))
    }
}

/// How the `(n, c)` planes form statistic groups.
///
/// `Instance` and `Groups(C)` group alike; they differ, as in PyTorch, in a set holding an
/// infinity: InstanceNorm (like BatchNorm) sums, so its mean is ±inf, GroupNorm merges Welford
/// partials, so its mean is NaN (the variance is NaN either way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grouping {
    /// One group per channel over the whole batch (BatchNorm): `C` statistics, group index `c`.
    Channel,
    /// One group per plane (InstanceNorm): `N·C` statistics, group index `n·C + c`.
    Instance,
    /// `G` groups of `C/G` channels per sample (GroupNorm): `N·G` statistics, group index
    /// `n·G + c/(C/G)`.
    Groups(usize),
}

impl Grouping {
    /// Number of statistics: `C` for [`Grouping::Channel`], `N·C` for [`Grouping::Instance`],
    /// `N·G` for [`Grouping::Groups`] (saturating at `usize::MAX`, which no buffer matches).
    pub fn num_groups(self, p: &PlaneShape) -> usize {
        match self {
            Grouping::Channel => p.c,
            Grouping::Instance => p.n.saturating_mul(p.c),
            Grouping::Groups(g) => p.n.saturating_mul(g),
        }
    }

    #[inline]
    pub(crate) fn group_of(self, p: &PlaneShape, n: usize, c: usize) -> usize {
        match self {
            Grouping::Channel => c,
            Grouping::Instance => n * p.c + c,
            Grouping::Groups(g) => n * g + c / (p.c / g),
        }
    }

    /// The kernels' code for `c` channels: 0 for per-channel, else the groups per sample.
    pub(crate) fn code(self, c: usize) -> i32 {
        self.per_sample(c).map_or(0, |g| g as i32)
    }

    /// The groups per sample of a per-sample grouping (`C` for `Instance`); `None` for
    /// `Channel`.
    pub(crate) fn per_sample(self, c: usize) -> Option<usize> {
        match self {
            Grouping::Channel => None,
            Grouping::Instance => Some(c),
            Grouping::Groups(g) => Some(g),
        }
    }

    /// Whether a set holding an infinity gets a NaN mean (GroupNorm) rather than ±inf.
    pub(crate) fn welford_mean(self) -> bool {
        matches!(self, Grouping::Groups(_))
    }

    /// The grouping of an op of the planes family.
    pub(crate) fn of(op: NormOp) -> Grouping {
        match op {
            NormOp::InstanceNorm => Grouping::Instance,
            NormOp::GroupNorm { num_groups } => Grouping::Groups(num_groups),
            _ => Grouping::Channel,
        }
    }

    /// `Err` unless the groups divide the channels (checked where a grouping enters: the op
    /// fronts and the launch layer).
    pub(crate) fn check(self, op: &str, c: usize) -> Result<()> {
        match self {
            Grouping::Groups(g) if g == 0 || !c.is_multiple_of(g) => {
                Err(Error::InvalidArgument(format!(
                    "{op}: num_groups ({g}) must divide num_channels ({c}); pick a divisor of {c}"
                )))
            }
            _ => Ok(()),
        }
    }
}

/// Running statistics to update from this batch: `r = (1 − factor)·r + factor·stat`, where
/// `stat` is the batch's mean and unbiased variance (InstanceNorm: averaged over the batch).
pub struct Running<M> {
    /// `running_mean`, `[C]`.
    pub mean: M,
    /// `running_var`, `[C]`.
    pub var: M,
    /// The update factor: `momentum`, or `1/num_batches_tracked` for a cumulative average.
    pub factor: f64,
}

/// Where the normalization statistics come from. `M` is a writable per-channel buffer, `V` a
/// readable one: tensors at the op level, cudarc views at the launch level.
pub enum Source<M, V> {
    /// From the input itself (training mode); BatchNorm and InstanceNorm may update running
    /// statistics.
    Input {
        /// Running statistics to update, if any.
        running: Option<Running<M>>,
    },
    /// Fixed per-channel mean and variance (BatchNorm/InstanceNorm in eval mode).
    Fixed {
        /// `running_mean`, `[C]`.
        mean: V,
        /// `running_var`, `[C]`.
        var: V,
    },
}

/// [`Source`] over tensors, as the op fronts pass it.
pub(crate) type TensorSource<'a> = Source<&'a mut Tensor<f32>, &'a Tensor<f32>>;

/// The front half BatchNorm and InstanceNorm share: checks eps, momentum, and that the
/// per-channel parameters and running statistics have `C` entries on the input's device, then
/// says where the statistics come from. `input_stats` selects batch statistics (updating the
/// running ones when given) over the running statistics, which must then be given. The
/// op-specific "more than one value" check runs before anything else.
#[allow(clippy::too_many_arguments)]
pub(crate) fn running_source<'a, T: Element>(
    op: &str,
    x: &Tensor<T>,
    running_mean: Option<&'a mut Tensor<f32>>,
    running_var: Option<&'a mut Tensor<f32>>,
    weight: Option<&Tensor<f32>>,
    bias: Option<&Tensor<f32>>,
    input_stats: bool,
    momentum: f64,
    eps: f64,
) -> Result<TensorSource<'a>> {
    use super::{check_eps, check_momentum, check_vec};
    check_eps(op, eps)?;
    check_momentum(op, momentum)?;
    let c = x.shape()[1];
    let dev = x.device();
    for (name, t) in [
        ("running_mean", running_mean.as_deref()),
        ("running_var", running_var.as_deref()),
        ("weight", weight),
        ("bias", bias),
    ] {
        if let Some(t) = t {
            check_vec(op, name, t, c, &dev)?;
        }
    }
    let running = match (running_mean, running_var) {
        (Some(mean), Some(var)) => Some((mean, var)),
        (None, None) => None,
        _ => {
            return Err(Error::InvalidArgument(format!(
                "{op}: running_mean and running_var must be given together (or both omitted)"
            )))
        }
    };
    Ok(match (input_stats, running) {
        (true, running) => Source::Input {
            running: running.map(|(mean, var)| Running {
                mean,
                var,
                factor: momentum,
            }),
        },
        (false, Some((mean, var))) => Source::Fixed {
            mean: &*mean,
            var: &*var,
        },
        (false, None) => {
            return Err(Error::InvalidArgument(format!(
                "{op}: running_mean and running_var must be defined when training=false \
                 (use_input_stats=false); pass them, or use batch statistics"
            )))
        }
    })
}

fn param_f64(t: Option<&Tensor<f32>>, c: usize, default: f64) -> Result<Vec<f64>> {
    Ok(match t {
        Some(t) => t.cpu_slice()?.iter().map(|&v| v as f64).collect(),
        None => vec![default; c],
    })
}

/// Number of elements in one statistic group.
fn group_count(p: &PlaneShape, grouping: Grouping) -> f64 {
    match grouping {
        Grouping::Channel => (p.n * p.s) as f64,
        Grouping::Instance => p.s as f64,
        Grouping::Groups(g) => ((p.c / g) * p.s) as f64,
    }
}

/// Normalizes `x`. Shapes were checked by the caller.
pub(crate) fn forward<T: Element>(
    x: &Tensor<T>,
    op: NormOp,
    weight: Option<&Tensor<f32>>,
    bias: Option<&Tensor<f32>>,
    eps: f64,
    mut source: TensorSource<'_>,
) -> Result<NormOutput<T>> {
    let grouping = Grouping::of(op);
    let device = x.device();
    let p = PlaneShape::of(x.shape(), x.format())?;
    if p.numel() == 0 {
        return super::empty_output(x, op, matches!(source, Source::Input { .. }));
    }
    if let Device::Cuda(dev) = &device {
        return cuda::forward(dev, x, op, weight, bias, eps, source);
    }
    let xs = x.cpu_slice()?;
    let w = param_f64(weight, p.c, 1.0)?;
    let b = param_f64(bias, p.c, 0.0)?;
    let planes = p.n * p.c;
    let mut coef_a = vec![0f64; planes];
    let mut coef_m = vec![0f64; planes];

    if let (Source::Input { running }, Some(g)) = (&mut source, grouping.per_sample(p.c)) {
        // Statistics and output together while the data is in cache: each contiguous group
        // (one run), or each channels-last sample when there are at least as many samples as
        // threads.
        let fused = match p.format {
            MemoryFormat::Contiguous => Some(cpu::groups_fused(xs, p, g, &w, &b, eps)),
            MemoryFormat::ChannelsLast if p.n >= rayon::current_num_threads() => {
                Some(cpu::samples_fused_cl(xs, p, grouping, &w, &b, eps))
            }
            MemoryFormat::ChannelsLast => None,
        };
        if let Some((y, gm)) = fused {
            if let Some(r) = running.take() {
                update_running(r, &gm, &p, grouping)?;
            }
            let stats = saved_from_moments(op, x.shape(), &gm, eps, &device)?;
            return Ok(NormOutput {
                output: Tensor::from_parts(x.shape().to_vec(), x.format(), Storage::Cpu(y.into())),
                stats,
            });
        }
    }
    let stats = match source {
        Source::Input { running } => {
            let pm = cpu::plane_moments(xs, p);
            let gm = cpu::group_moments(&pm, p, grouping);
            (coef_a, coef_m) = cpu::affine_coefs(p, grouping, &gm, &w, eps);
            if let Some(r) = running {
                if !xs.is_empty() {
                    update_running(r, &gm, &p, grouping)?;
                }
            }
            saved_from_moments(op, x.shape(), &gm, eps, &device)?
        }
        Source::Fixed { mean, var } => {
            let rm = mean.cpu_slice()?;
            let rv = var.cpu_slice()?;
            let rstd: Vec<f64> = rv.iter().map(|&v| 1.0 / (v as f64 + eps).sqrt()).collect();
            for n in 0..p.n {
                for c in 0..p.c {
                    let i = n * p.c + c;
                    coef_a[i] = rstd[c] * w[c];
                    coef_m[i] = rm[c] as f64;
                }
            }
            SavedStats::new(
                op,
                x.shape(),
                Some(mean.clone()),
                f32_tensor(rstd.iter().map(|&v| v as f32).collect(), &device)?,
                false,
            )
        }
    };
    let coef_b: Vec<f64> = (0..p.n).flat_map(|_| b.iter().copied()).collect();
    let y = cpu::plane_affine(xs, p, &coef_a, &coef_m, &coef_b);
    Ok(NormOutput {
        output: Tensor::from_parts(x.shape().to_vec(), x.format(), Storage::Cpu(y.into())),
        stats,
    })
}

fn saved_from_moments(
    op: NormOp,
    shape: &[usize],
    gm: &[crate::ops::engine::Moments],
    eps: f64,
    device: &Device,
) -> Result<SavedStats> {
    let mut mean: Vec<f32> = gm.iter().map(|m| m.mean as f32).collect();
    if op.welford_mean() {
        super::nan_for_infinite(&mut mean);
    }
    let rstd = gm
        .iter()
        .map(|m| (1.0 / (m.var_biased() + eps).sqrt()) as f32)
        .collect();
    Ok(SavedStats::new(
        op,
        shape,
        Some(f32_tensor(mean, device)?),
        f32_tensor(rstd, device)?,
        true,
    ))
}

fn update_running(
    r: Running<&mut Tensor<f32>>,
    gm: &[crate::ops::engine::Moments],
    p: &PlaneShape,
    grouping: Grouping,
) -> Result<()> {
    // BatchNorm: one group per channel. InstanceNorm: groups are planes, averaged over n.
    let (mean, var): (Vec<f64>, Vec<f64>) = match grouping {
        Grouping::Channel => gm.iter().map(|m| (m.mean, m.var_unbiased())).unzip(),
        _ => (0..p.c)
            .map(|c| {
                let (mut sm, mut sv) = (0.0, 0.0);
                for n in 0..p.n {
                    sm += gm[n * p.c + c].mean;
                    sv += gm[n * p.c + c].var_unbiased();
                }
                (sm / p.n as f64, sv / p.n as f64)
            })
            .unzip(),
    };
    let f = r.factor;
    for (dst, src) in [(r.mean, mean), (r.var, var)] {
        for (d, s) in dst.cpu_slice_mut()?.iter_mut().zip(src) {
            *d = ((1.0 - f) * *d as f64 + f * s) as f32;
        }
    }
    Ok(())
}

/// Backward of [`forward`] (the grouping is the saved statistics' op's, checked by the front):
/// `dx`, and per-channel `dweight`/`dbias` when `affine`.
pub(crate) fn backward<T: Element>(
    dy: &Tensor<T>,
    x: &Tensor<T>,
    weight: Option<&Tensor<f32>>,
    affine: bool,
    stats: &SavedStats,
) -> Result<Gradients<T>> {
    let grouping = Grouping::of(stats.op());
    let device = x.device();
    if let Device::Cuda(dev) = &device {
        return cuda::backward(dev, dy, x, weight, affine, stats);
    }
    let p = PlaneShape::of(x.shape(), x.format())?;
    let (gs, xs) = (dy.cpu_slice()?, x.cpu_slice()?);
    let w = param_f64(weight, p.c, 1.0)?;
    let mean = match stats.mean() {
        Some(m) => m.cpu_slice()?,
        None => &[][..],
    };
    let rstd = stats.rstd().cpu_slice()?;
    let planes = p.n * p.c;
    // Statistic index of each plane: its group for batch statistics, its channel for fixed ones.
    let gidx = |n: usize, c: usize| {
        if stats.from_input() {
            grouping.group_of(&p, n, c)
        } else {
            c
        }
    };
    let mut m = vec![0f64; planes];
    let mut r = vec![0f64; planes];
    for n in 0..p.n {
        for c in 0..p.c {
            let g = gidx(n, c);
            m[n * p.c + c] = mean[g] as f64;
            r[n * p.c + c] = rstd[g] as f64;
        }
    }
    let (dx, sg, sgx) = match grouping.per_sample(p.c) {
        // Each (n, group) is one contiguous run: sum and differentiate it while it is in cache.
        Some(groups) if stats.from_input() && p.format == MemoryFormat::Contiguous => {
            cpu::groups_backward_fused(gs, xs, p, groups, &w, mean, rstd)
        }
        // Channels-last: each sample summed and differentiated while it is in cache.
        Some(_)
            if stats.from_input()
                && p.format == MemoryFormat::ChannelsLast
                && p.n >= rayon::current_num_threads() =>
        {
            let cnt = group_count(&p, grouping);
            cpu::samples_backward_fused_cl(gs, xs, p, grouping, &w, &m, &r, cnt)
        }
        _ => backward_two_pass(gs, xs, p, grouping, &w, stats.from_input(), &m, &r),
    };

    let (dweight, dbias) = if affine {
        let mut dw = vec![0f64; p.c];
        let mut db = vec![0f64; p.c];
        for n in 0..p.n {
            for c in 0..p.c {
                let i = n * p.c + c;
                dw[c] += r[i] * sgx[i];
                db[c] += sg[i];
            }
        }
        (
            Some(f32_tensor(dw.iter().map(|&v| v as f32).collect(), &device)?),
            Some(f32_tensor(db.iter().map(|&v| v as f32).collect(), &device)?),
        )
    } else {
        (None, None)
    };
    Ok(Gradients {
        dx: Tensor::from_parts(x.shape().to_vec(), x.format(), Storage::Cpu(dx.into())),
        dweight,
        dbias,
    })
}

/// The CPU backward in two passes over memory (BatchNorm, channels-last, fixed statistics):
/// per-plane sums, then dx from per-plane coefficients. `m`/`r` are per plane. Returns dx and
/// the per-plane (Σ g, Σ g·(x − m)).
#[allow(clippy::too_many_arguments)]
fn backward_two_pass<T: Element>(
    gs: &[T],
    xs: &[T],
    p: PlaneShape,
    grouping: Grouping,
    w: &[f64],
    from_input: bool,
    m: &[f64],
    r: &[f64],
) -> (Vec<T>, Vec<f64>, Vec<f64>) {
    let planes = p.n * p.c;
    let (sg, sgx) = cpu::plane_grad_sums(gs, xs, p, m);
    let (a, b, k) = if from_input {
        cpu::grad_coefs(p, grouping, w, &sg, &sgx, r, group_count(&p, grouping))
    } else {
        // Fixed statistics: dx = r·w·g.
        let a = (0..planes).map(|i| r[i] * w[i % p.c.max(1)]).collect();
        (a, vec![0f64; planes], vec![0f64; planes])
    };
    let dx = cpu::plane_grad_apply(gs, xs, p, [&a, &b, m, &k]);
    (dx, sg, sgx)
}
