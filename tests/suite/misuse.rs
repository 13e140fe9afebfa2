//! Misuse and edge inputs (issue "Never a panic, never a wrong answer"): each case is a repro of
//! a panic, an abort or a misleading result found by trying the crate as a user would, with the
//! exact outcome asserted. Every call runs under `catch_unwind` so a panic fails the case with
//! its name instead of taking the suite down.

use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::common::compare;
use cunorm::functional as F;
use cunorm::*;

/// Runs `f`, failing the test (not aborting it) if it panics.
#[track_caller]
fn no_panic<R>(what: &str, f: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => panic!("{what}: panicked"),
    }
}

/// Asserts an `Err` whose message contains every one of `needles`.
#[track_caller]
fn err_with<T: std::fmt::Debug>(what: &str, r: Result<T>, needles: &[&str]) {
    match r {
        Ok(v) => panic!("{what}: expected an Err, got Ok({v:?})"),
        Err(e) => {
            let msg = e.to_string();
            for n in needles {
                assert!(msg.contains(n), "{what}: {msg:?} does not contain {n:?}");
            }
        }
    }
}

fn x(shape: &[usize]) -> Tensor<f32> {
    Tensor::randn(shape, 17).unwrap()
}

#[test]
fn saved_statistics_of_another_op_are_an_err() {
    let x4 = x(&[2, 4, 3]);
    let dy = x(&[2, 4, 3]);
    // RMSNorm's statistics (no mean) in the backward of an op that needs a mean.
    let rms = F::rms_norm(&x4, &[3], None, None).unwrap().stats;
    assert_eq!(rms.op(), NormOp::RmsNorm { normalized_dims: 1 });
    assert!(rms.mean().is_none());
    let needles = ["saved by rms_norm", "pass the stats returned by"];
    err_with(
        "rms stats in batch_norm",
        no_panic("rms bn", || F::batch_norm_backward(&dy, &x4, None, &rms)),
        &needles,
    );
    err_with(
        "rms stats in group_norm",
        no_panic("rms gn", || F::group_norm_backward(&dy, &x4, 2, None, &rms)),
        &needles,
    );
    err_with(
        "rms stats in instance_norm",
        no_panic("rms in", || F::instance_norm_backward(&dy, &x4, None, &rms)),
        &needles,
    );
    // Eval-mode BatchNorm statistics (per channel, 4 entries) where GroupNorm needs N·G = 4.
    let x8 = x(&[2, 8, 3]);
    let mut bn = BatchNorm1d::new(4).unwrap();
    bn.eval();
    let fixed = bn.forward_with_stats(&x4).unwrap().stats;
    assert!(!fixed.from_input());
    err_with(
        "group_norm given batch_norm eval stats",
        no_panic("gn eval stats", || {
            F::group_norm_backward(&x8, &x8, 2, None, &fixed)
        }),
        &["saved by batch_norm", "group_norm"],
    );
    // The same count and kind, made for something else: caught by the recorded origin.
    // BatchNorm (C = 4) and InstanceNorm (N·C = 4 with N = 1) on [1, 4, 6].
    let x146 = x(&[1, 4, 6]);
    let bn_stats = F::batch_norm(&x146, None, None, None, None, true, 0.1, 1e-5)
        .unwrap()
        .stats;
    err_with(
        "batch_norm stats in instance_norm",
        no_panic("bn in", || {
            F::instance_norm_backward(&x146, &x146, None, &bn_stats)
        }),
        &["saved by batch_norm", "instance_norm"],
    );
    // GroupNorm with 2 groups on [2, 4, 3] (N·G = 4) against 1 group on [4, 4, 3] (N·G = 4).
    let gn2 = F::group_norm(&x4, 2, None, None, 1e-5).unwrap().stats;
    let x443 = x(&[4, 4, 3]);
    err_with(
        "group_norm stats of other groups",
        no_panic("gn groups", || {
            F::group_norm_backward(&x443, &x443, 1, None, &gn2)
        }),
        &["num_groups = 2", "num_groups = 1"],
    );
    // LayerNorm over [3] of [2, 4, 3] (8 rows) against [4, 2, 3] (8 rows): another input shape.
    let ln = F::layer_norm(&x4, &[3], None, None, 1e-5).unwrap().stats;
    let x423 = x(&[4, 2, 3]);
    err_with(
        "layer_norm stats of another shape",
        no_panic("ln shape", || {
            F::layer_norm_backward(&x423, &x423, &[3], None, false, &ln)
        }),
        &["[2, 4, 3]", "[4, 2, 3]"],
    );
    // LayerNorm over [4, 3] (2 rows) of [2, 4, 3] against normalized_shape [3]: other dims.
    let ln2 = F::layer_norm(&x4, &[4, 3], None, None, 1e-5).unwrap().stats;
    err_with(
        "layer_norm stats over other dims",
        no_panic("ln dims", || {
            F::layer_norm_backward(&dy, &x4, &[3], None, false, &ln2)
        }),
        &["last 2 dimensions", "last 1 dimension"],
    );
    // LayerNorm's statistics in RMSNorm's backward, same rows.
    err_with(
        "layer_norm stats in rms_norm",
        no_panic("ln rms", || F::rms_norm_backward(&dy, &x4, &[3], None, &ln)),
        &["saved by layer_norm", "rms_norm"],
    );
    // The right statistics pass.
    assert!(F::layer_norm_backward(&dy, &x4, &[3], None, false, &ln).is_ok());
    assert!(F::group_norm_backward(&dy, &x4, 2, None, &gn2).is_ok());
}

#[test]
fn overflowing_and_huge_shapes_are_an_err() {
    let big = (1usize << 63) + 1;
    err_with(
        "from_vec overflow",
        no_panic("from_vec", || {
            Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0], &[big, 2, 2])
        }),
        &["[9223372036854775809, 2, 2]"],
    );
    err_with(
        "full overflow",
        no_panic("full", || Tensor::full(&[1 << 33, 1 << 31], 0.0f32)),
        &["smaller shape"],
    );
    err_with(
        "zeros 4 TiB",
        no_panic("zeros", || Tensor::<f32>::zeros(&[1 << 40])),
        &["[1099511627776]"],
    );
    err_with(
        "from_fn overflow",
        no_panic("from_fn", || Tensor::<f32>::from_fn(&[big, 2], |_| 0.0)),
        &["smaller shape"],
    );
    let t = x(&[2, 2]);
    err_with(
        "reshape overflow",
        no_panic("reshape", || t.reshape(&[big, 2, 2])),
        &["smaller shape"],
    );
    err_with(
        "BatchNorm2d 2^40",
        no_panic("bn", || BatchNorm2d::new(1 << 40)),
        &["BatchNorm2d", "cannot allocate"],
    );
    err_with(
        "BatchNorm2d usize::MAX",
        no_panic("bn max", || BatchNorm2d::new(usize::MAX)),
        &["BatchNorm2d"],
    );
    err_with(
        "GroupNorm 2^40",
        no_panic("gn", || GroupNorm::new(1, 1 << 40)),
        &["GroupNorm", "cannot allocate"],
    );
    err_with(
        "LayerNorm 2^40",
        no_panic("ln", || LayerNorm::new(&[1 << 20, 1 << 20])),
        &["LayerNorm", "cannot allocate"],
    );
}

/// Found by reading the code after the listed items were fixed (issue 9: "go looking for the
/// ones nobody listed").
#[test]
fn empty_inputs_with_huge_other_dimensions() {
    // An empty input whose channel or column count is huge: an empty output, nothing allocated
    // per channel or column (was a capacity-overflow panic or a 4 TiB abort).
    let huge = 1usize << 62;
    let e2 = Tensor::<f32>::from_vec(vec![], &[0, huge]).unwrap();
    let e3 = Tensor::<f32>::from_vec(vec![], &[0, huge, 2]).unwrap();
    let ln = no_panic("ln", || F::layer_norm(&e2, &[huge], None, None, 1e-5)).unwrap();
    assert_eq!(ln.output.shape(), &[0, huge]);
    assert!(no_panic("rms", || F::rms_norm(&e2, &[huge], None, None)).is_ok());
    let bn = no_panic("bn", || {
        F::batch_norm(&e2, None, None, None, None, true, 0.1, 1e-5)
    })
    .unwrap();
    assert_eq!(bn.output.shape(), &[0, huge]);
    let g = no_panic("bn bwd", || {
        F::batch_norm_backward(&e2, &e2, None, &bn.stats)
    })
    .unwrap();
    assert_eq!(g.dx.shape(), &[0, huge]);
    assert!(no_panic("in", || {
        F::instance_norm(&e3, None, None, None, None, true, 0.1, 1e-5)
    })
    .is_ok());
    assert!(no_panic("gn", || F::group_norm(&e3, 2, None, None, 1e-5)).is_ok());
    let cl = Tensor::<f32>::from_vec(vec![], &[0, huge, 2, 1])
        .unwrap()
        .to_format(MemoryFormat::ChannelsLast)
        .unwrap();
    assert!(no_panic("gn cl", || F::group_norm(&cl, 4, None, None, 1e-5)).is_ok());
    let m = LayerNorm::from_config(LayerNormConfig::new(&[huge]).with_elementwise_affine(false))
        .unwrap();
    assert!(no_panic("LayerNorm module", || m.forward(&e2)).is_ok());
    // C = 0 divides by any num_groups: N·G must still fit (was a capacity overflow, or on CUDA
    // a wrapped allocation size).
    let c0 = Tensor::<f32>::from_vec(vec![], &[2, 0, 2]).unwrap();
    assert!(no_panic("gn c0", || F::group_norm(&c0, 1 << 62, None, None, 1e-5)).is_ok());
    err_with(
        "gn N·G overflow",
        no_panic("gn c0 max", || {
            F::group_norm(&c0, usize::MAX, None, None, 1e-5)
        }),
        &["overflow", "fewer groups"],
    );
    // Sizes whose non-zero product overflows are refused even when one size is 0 (every
    // partial product, N·C or the spatial size, must fit).
    err_with(
        "empty with overflowing strides",
        no_panic("from_vec", || {
            Tensor::<f32>::from_vec(vec![], &[0, 1, 1 << 32, 1 << 32])
        }),
        &["smaller shape"],
    );
    // The public plane view of a shape: an Err, not an index panic.
    err_with(
        "PlaneShape of rank 1",
        no_panic("plane shape", || {
            PlaneShape::of(&[4], MemoryFormat::Contiguous)
        }),
        &["at least 2 dimensions", "[4]"],
    );
}

/// A negative step count is refused where it enters: set or loaded.
#[test]
fn negative_num_batches_tracked_is_an_err() {
    let mut bn = BatchNorm2d::new(3).unwrap();
    err_with(
        "set -1",
        bn.set_num_batches_tracked(-1),
        &["cannot be negative", "-1"],
    );
    let mut sd = bn.state_dict();
    for (k, v) in sd.iter_mut() {
        if k == "num_batches_tracked" {
            *v = StateEntry::Count(-5);
        }
    }
    let before = bn.state_dict().len();
    err_with(
        "load -5",
        bn.load_state_dict(&sd),
        &["cannot be negative", "-5"],
    );
    assert_eq!(bn.num_batches_tracked(), Some(0));
    assert_eq!(bn.state_dict().len(), before);
}

#[test]
fn empty_normalized_shape_in_the_functional_ops_is_an_err() {
    let t = x(&[2, 3]);
    err_with(
        "layer_norm []",
        no_panic("ln", || F::layer_norm(&t, &[], None, None, 1e-5)),
        &["normalized_shape", "at least 1"],
    );
    err_with(
        "rms_norm []",
        no_panic("rms", || F::rms_norm(&t, &[], None, None)),
        &["normalized_shape", "at least 1"],
    );
}

/// Empty in, empty (or zero) gradients out, as PyTorch: backward of the crate's own forward on
/// inputs with a zero-sized dimension, both layouts.
#[test]
fn empty_dimensions_give_zero_gradients() {
    fn check(what: &str, g: Result<Gradients<f32>>, dx_shape: &[usize], c: usize) {
        let g = match g {
            Ok(g) => g,
            Err(e) => panic!("{what}: {e}"),
        };
        assert_eq!(g.dx.shape(), dx_shape, "{what}");
        for (name, p) in g.named() {
            let v = p.to_vec().unwrap();
            assert_eq!(v.len(), c, "{what} {name}");
            assert!(v.iter().all(|&v| v == 0.0), "{what} {name} = {v:?}");
        }
    }
    for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
        let xs = x(&[2, 3, 0, 4]);
        let xs = xs.to_format(format).unwrap();
        let mut bn = BatchNorm2d::new(3).unwrap();
        let out = no_panic("bn fwd", || bn.forward_with_stats(&xs)).unwrap();
        check(
            &format!("BatchNorm2d {format:?}"),
            no_panic("bn bwd", || bn.backward(&xs, &xs, &out.stats)),
            &[2, 3, 0, 4],
            3,
        );
        let xi = x(&[2, 2, 0, 3]).to_format(format).unwrap();
        let inorm =
            InstanceNorm2d::from_config(InstanceNormConfig::new(2).with_affine(true)).unwrap();
        let out = no_panic("in fwd", || inorm.forward_eval(&xi)).unwrap();
        check(
            &format!("InstanceNorm2d {format:?}"),
            no_panic("in bwd", || inorm.backward(&xi, &xi, &out.stats)),
            &[2, 2, 0, 3],
            2,
        );
        let xg = x(&[2, 4, 0]).to_format(format).unwrap();
        let gn = GroupNorm::new(2, 4).unwrap();
        let out = no_panic("gn fwd", || gn.forward_with_stats(&xg)).unwrap();
        check(
            &format!("GroupNorm {format:?}"),
            no_panic("gn bwd", || gn.backward(&xg, &xg, &out.stats)),
            &[2, 4, 0],
            4,
        );
    }
    let gn0 = GroupNorm::from_config(GroupNormConfig::new(1, 0).with_affine(false)).unwrap();
    let x0 = x(&[2, 0, 3]);
    let out = no_panic("gn C=0", || gn0.forward_with_stats(&x0)).unwrap();
    check(
        "GroupNorm C=0",
        gn0.backward(&x0, &x0, &out.stats),
        &[2, 0, 3],
        0,
    );
    let ln = LayerNorm::new(&[0]).unwrap();
    let xl = x(&[4, 0]);
    let out = no_panic("ln fwd", || ln.forward_with_stats(&xl)).unwrap();
    check(
        "LayerNorm [0]",
        ln.backward(&xl, &xl, &out.stats),
        &[4, 0],
        0,
    );
    let rms = RMSNorm::new(&[0]).unwrap();
    let xr = x(&[3, 0]);
    let out = no_panic("rms fwd", || rms.forward_with_stats(&xr)).unwrap();
    check(
        "RMSNorm [0]",
        rms.backward(&xr, &xr, &out.stats),
        &[3, 0],
        0,
    );
}

#[test]
fn unbatched_instance_norm_backward_checks_dy() {
    let inorm = InstanceNorm1d::new(3).unwrap();
    let xu = x(&[3, 5]);
    let out = inorm.forward_eval(&xu).unwrap();
    err_with(
        "dy [5, 3]",
        no_panic("in bwd", || inorm.backward(&x(&[5, 3]), &xu, &out.stats)),
        &["grad_output has size [5, 3]", "[3, 5]"],
    );
}

#[test]
fn messages_name_the_real_mismatch() {
    // A [1, 3] running_mean has 3 elements: say it must be 1-D, not "3 elements not 3".
    let mut rm = Tensor::full(&[1, 3], 0.0f32).unwrap();
    let mut rv = Tensor::full(&[3], 1.0f32).unwrap();
    err_with(
        "running_mean [1, 3]",
        F::batch_norm(
            &x(&[2, 3]),
            Some(&mut rm),
            Some(&mut rv),
            None,
            None,
            true,
            0.1,
            1e-5,
        ),
        &["running_mean must be 1-D of size [3]", "[1, 3]"],
    );
    // A module given the wrong channel count names the input and num_features.
    err_with(
        "BatchNorm2d(3) on 4 channels",
        BatchNorm2d::new(3).unwrap().forward(&x(&[2, 4, 2, 2])),
        &["num_features (3)", "got: 4", "[2, 4, 2, 2]"],
    );
    err_with(
        "GroupNorm(2, 4) on 6 channels",
        GroupNorm::new(2, 4).unwrap().forward(&x(&[2, 6, 3])),
        &["(4)", "got: 6"],
    );
}

/// Without libnvrtc the error is one sentence with the fix, then the searched places one per
/// line (was a ~1 500-character single line). Where NVRTC is found there is nothing to check.
#[test]
fn missing_nvrtc_is_a_short_sentence_then_the_paths() {
    let Err(e) = cunorm::cuda::nvrtc::ensure_nvrtc() else {
        return;
    };
    let msg = e.to_string();
    let mut lines = msg.lines();
    let first = lines.next().unwrap_or_default();
    assert!(first.len() < 200, "first line too long: {first}");
    assert!(first.contains("CUNORM_NVRTC_DIR"), "{first}");
    let rest: Vec<&str> = lines.collect();
    assert!(rest.len() >= 2, "{msg}");
    assert!(
        rest.iter().all(|l| l.len() < 300),
        "searched places are one per line: {msg}"
    );
}

/// NaN and ±inf statistics propagate as in PyTorch (issue 9's measurements on PyTorch's CPU
/// path): a NaN makes its set's mean and rstd NaN (was an rstd of 1/√eps, the NaN clamped away)
/// and the running statistics NaN; a +inf makes a BatchNorm mean +inf (was NaN) and the variance
/// NaN. Other sets stay finite. (`golden::golden_nonfinite` checks every op against PyTorch's
/// values.)
#[test]
fn nan_and_inf_statistics_propagate() {
    let nan = f32::NAN;
    // LayerNorm: a NaN in row 0.
    let mut v: Vec<f32> = (0..12).map(|i| (i as f32 * 0.37).sin()).collect();
    v[1] = nan;
    let x = Tensor::from_vec(v.clone(), &[3, 4]).unwrap();
    let s = F::layer_norm(&x, &[4], None, None, 1e-5).unwrap().stats;
    let (mean, rstd) = (
        s.mean().unwrap().to_vec().unwrap(),
        s.rstd().to_vec().unwrap(),
    );
    assert!(
        mean[0].is_nan() && rstd[0].is_nan(),
        "row 0: {mean:?} {rstd:?}"
    );
    assert!(rstd[1..].iter().all(|r| r.is_finite()), "{rstd:?}");
    // GroupNorm: a NaN in group (0, 0).
    let xg = Tensor::from_vec(v.clone(), &[1, 4, 3]).unwrap();
    let s = F::group_norm(&xg, 2, None, None, 1e-5).unwrap().stats;
    let rstd = s.rstd().to_vec().unwrap();
    assert!(rstd[0].is_nan() && rstd[1].is_finite(), "{rstd:?}");
    // BatchNorm1d on [1, 2, 4] with one NaN in channel 0: running statistics NaN there.
    let mut xb: Vec<f32> = (0..8).map(|i| i as f32 * 0.5).collect();
    xb[2] = nan;
    let mut bn = BatchNorm1d::new(2).unwrap();
    let out = bn
        .forward_with_stats(&Tensor::from_vec(xb.clone(), &[1, 2, 4]).unwrap())
        .unwrap();
    let (rm, rv) = (
        bn.running_mean().unwrap().to_vec().unwrap(),
        bn.running_var().unwrap().to_vec().unwrap(),
    );
    assert!(rm[0].is_nan() && rv[0].is_nan(), "{rm:?} {rv:?}");
    assert!(rm[1].is_finite() && rv[1].is_finite(), "{rm:?} {rv:?}");
    assert!(out.stats.rstd().to_vec().unwrap()[0].is_nan());
    // +inf in channel 1: mean +inf (saved and running), variance NaN.
    xb[2] = 1.0;
    xb[5] = f32::INFINITY;
    let mut bn = BatchNorm1d::new(2).unwrap();
    let out = bn
        .forward_with_stats(&Tensor::from_vec(xb, &[1, 2, 4]).unwrap())
        .unwrap();
    let mean = out.stats.mean().unwrap().to_vec().unwrap();
    assert_eq!(mean[1], f32::INFINITY, "{mean:?}");
    assert!(mean[0].is_finite());
    assert_eq!(
        bn.running_mean().unwrap().to_vec().unwrap()[1],
        f32::INFINITY
    );
    assert!(bn.running_var().unwrap().to_vec().unwrap()[1].is_nan());
    assert!(out.stats.rstd().to_vec().unwrap()[1].is_nan());
}

/// A bounded random misuse fuzz: random ops on random shapes (empty and single-element
/// dimensions, both layouts), with random misuse mixed in — wrong parameter lengths, another
/// call's statistics, a wrong `dy`, a bad eps/momentum/num_groups, NaN/Inf inputs. Every call
/// runs under `catch_unwind`: a panic fails. An `Ok` forward on finite input must match the
/// naive f64 oracle (`common::oracle`), and its backward too.
#[test]
fn misuse_fuzz() {
    let checked = misuse_fuzz_on(&Device::Cpu, 3000);
    assert!(checked > 400, "only {checked} cases reached the oracle");
}

/// The fuzz on `device` for `cases` cases; returns how many reached the oracle. Also run on the
/// CUDA path (`cuda::cuda_misuse_fuzz`, through the fake driver in CI).
pub fn misuse_fuzz_on(device: &Device, cases: usize) -> usize {
    use crate::common::oracle::{self, Spec};
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let mut checked = 0;
    let on = |t: Tensor<f32>| t.to_device(device).unwrap();
    for case in 0..cases {
        let op = rng.random_range(0..5);
        let rank = if op >= 3 {
            rng.random_range(1..4)
        } else {
            rng.random_range(2..5)
        };
        let shape: Vec<usize> = (0..rank).map(|_| rng.random_range(0..5)).collect();
        let numel: usize = shape.iter().product();
        let mut data: Vec<f32> = (0..numel).map(|_| rng.random_range(-3.0..3.0)).collect();
        let poison = rng.random_range(0..8) == 0 && numel > 0;
        if poison {
            let i = rng.random_range(0..numel);
            data[i] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][rng.random_range(0..3)];
        }
        let x = Tensor::from_vec(data.clone(), &shape).unwrap();
        let format = if rank >= 3 && rng.random_bool(0.5) {
            MemoryFormat::ChannelsLast
        } else {
            MemoryFormat::Contiguous
        };
        let x = on(x.to_format(format).unwrap());
        let c = if rank >= 2 { shape[1] } else { 0 };
        // Parameters: usually right, sometimes one element off.
        let off = rng.random_range(0..6) == 0;
        let plen = |n: usize| if off { n + 1 } else { n };
        let eps = if rng.random_range(0..20) == 0 {
            -1e-3
        } else {
            1e-5
        };
        let what = format!("case {case}: op {op} shape {shape:?} {format:?} off {off} eps {eps}");
        let dy_shape = if rng.random_range(0..6) == 0 && rank >= 2 {
            let mut s = shape.clone();
            s.swap(0, 1);
            s
        } else {
            shape.clone()
        };
        let dyd: Vec<f32> = (0..numel).map(|_| rng.random_range(-1.0..1.0)).collect();
        let dy = on(Tensor::from_vec(dyd.clone(), &dy_shape)
            .unwrap()
            .to_format(format)
            .unwrap_or_else(|_| Tensor::from_vec(dyd.clone(), &dy_shape).unwrap()));
        let wrong_stats = rng.random_range(0..6) == 0;
        let other = F::rms_norm(
            &on(Tensor::<f32>::randn(&[2, 3], 1).unwrap()),
            &[3],
            None,
            None,
        )
        .unwrap()
        .stats;

        let (out, spec, params) = match op {
            0..=2 => {
                let groups = match op {
                    0 => None,
                    1 => Some(c),
                    _ => Some(rng.random_range(0..4)),
                };
                let w = on(Tensor::<f32>::randn(&[plen(c)], case as u64).unwrap());
                let b = on(Tensor::<f32>::randn(&[plen(c)], case as u64 + 7).unwrap());
                let out = no_panic(&what, || match (op, groups) {
                    (0, _) => F::batch_norm(&x, None, None, Some(&w), Some(&b), true, 0.1, eps),
                    (1, _) => F::instance_norm(&x, None, None, Some(&w), Some(&b), true, 0.1, eps),
                    (_, g) => F::group_norm(&x, g.unwrap_or(1), Some(&w), Some(&b), eps),
                });
                let s: usize = shape[2..].iter().product();
                let spec = groups
                    .filter(|&g| g > 0 && c % g == 0)
                    .map(|g| Spec::planes(shape[0], c, s, Some(g)))
                    .or_else(|| (op == 0).then(|| Spec::planes(shape[0], c, s, None)));
                (out, spec, (w, Some(b)))
            }
            _ => {
                let k = rng.random_range(0..rank + 1).min(rank);
                let ns = shape[rank - k..].to_vec();
                let cols: usize = ns.iter().product();
                let pshape: Vec<usize> = if off { vec![cols + 1] } else { ns.clone() };
                let w = on(Tensor::<f32>::randn(&pshape, case as u64).unwrap());
                let b = on(Tensor::<f32>::randn(&pshape, case as u64 + 7).unwrap());
                let center = op == 3;
                let out = no_panic(&what, || {
                    if center {
                        F::layer_norm(&x, &ns, Some(&w), Some(&b), eps)
                    } else {
                        F::rms_norm(&x, &ns, Some(&w), Some(eps))
                    }
                });
                let spec = (k > 0).then(|| Spec::rows(numel / cols.max(1), cols, center));
                let spec = if cols == 0 { None } else { spec };
                (out, spec, (w, center.then_some(b)))
            }
        };
        let Ok(out) = out else { continue };
        // An Ok must be right: parameters and eps were valid if we got here.
        assert!(!off && eps >= 0.0, "{what}: Ok with bad arguments");
        let stats = if wrong_stats { &other } else { &out.stats };
        let grads = no_panic(&what, || match op {
            0 => F::batch_norm_backward(&dy, &x, Some(&params.0), stats),
            1 => F::instance_norm_backward(&dy, &x, Some(&params.0), stats),
            2 => {
                let g = out.stats.rstd().numel() / shape[0].max(1);
                F::group_norm_backward(&dy, &x, g.max(1), Some(&params.0), stats)
            }
            3 => {
                let ns: Vec<usize> = params.0.shape().to_vec();
                F::layer_norm_backward(&dy, &x, &ns, Some(&params.0), true, stats)
            }
            _ => {
                let ns: Vec<usize> = params.0.shape().to_vec();
                F::rms_norm_backward(&dy, &x, &ns, Some(&params.0), stats)
            }
        });
        let (Some(spec), false) = (spec, poison || numel == 0) else {
            continue;
        };
        let x64: Vec<f64> = data.iter().map(|&v| v as f64).collect();
        let w64: Vec<f64> = params
            .0
            .to_vec()
            .unwrap()
            .iter()
            .map(|&v| v as f64)
            .collect();
        let b64: Option<Vec<f64>> = params
            .1
            .map(|b| b.to_vec().unwrap().iter().map(|&v| v as f64).collect());
        let want = oracle::forward(&spec, &x64, Some(&w64), b64.as_deref(), eps);
        let want_y: Vec<f32> = want.y.iter().map(|&v| v as f32).collect();
        compare(&what, &out.output.to_vec().unwrap(), &want_y, 1e-4, 1e-4).unwrap();
        // Another call's statistics made by the same op for the same input shape are valid
        // statistics (of other values): nothing to assert then. Any other origin is an Err.
        let same_kind =
            other.op() == out.stats.op() && other.input_shape() == out.stats.input_shape();
        if wrong_stats && same_kind {
            continue;
        }
        let good_dy = dy_shape == shape && !wrong_stats;
        match grads {
            Ok(g) => {
                assert!(good_dy, "{what}: backward Ok with a wrong dy or stats");
                let g64: Vec<f64> = dyd.iter().map(|&v| v as f64).collect();
                let wb = oracle::backward(&spec, &x64, &g64, Some(&w64), &want);
                let want_dx: Vec<f32> = wb.dx.iter().map(|&v| v as f32).collect();
                compare(&what, &g.dx.to_vec().unwrap(), &want_dx, 1e-3, 1e-3).unwrap();
                checked += 1;
            }
            Err(e) => assert!(!good_dy, "{what}: backward Err on valid arguments: {e}"),
        }
    }
    checked
}
