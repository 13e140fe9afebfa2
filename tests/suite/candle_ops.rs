//! `cunorm::candle` (feature `candle`) on candle's CPU device: forwards equal to candle-nn's own
//! layers (or, for InstanceNorm, which candle-nn lacks, to a composition of candle ops),
//! gradients through candle's autograd equal to cunorm's backward and to finite differences,
//! every dtype, channels-last strides, BatchNorm/InstanceNorm running statistics and gradients
//! against PyTorch's goldens over several steps, the VarBuilder names of candle-nn, misuse as an
//! `Err` that changes no running statistic.

use candle_core::{DType, Device, Module, ModuleT, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use cunorm::candle as cc;
use cunorm::functional as F;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let t = cunorm::Tensor::<f32>::randn(shape, seed).unwrap();
    Tensor::from_vec(t.to_vec().unwrap(), shape, &Device::Cpu).unwrap()
}

fn vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn cu(t: &Tensor) -> cunorm::Tensor<f32> {
    cunorm::Tensor::from_vec(vec(t), t.dims()).unwrap()
}

#[track_caller]
fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * w.abs().max(1.0),
            "{what}[{i}]: {g} vs {w}"
        );
    }
}

/// A `ModuleT` in training mode as a `Module`.
struct Train<M>(M);

impl<M: ModuleT> Module for Train<M> {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.0.forward_t(x, true)
    }
}

/// InstanceNorm composed of candle ops (an independent reference: mean and biased variance of
/// each (n, c) over the spatial dimensions), then the affine.
struct ComposedInstanceNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl Module for ComposedInstanceNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, c) = (x.dim(0)?, x.dim(1)?);
        let f = x.reshape((n, c, ()))?.to_dtype(DType::F64)?;
        let mean = f.mean_keepdim(2)?;
        let d = f.broadcast_sub(&mean)?;
        let var = d.sqr()?.mean_keepdim(2)?;
        let xhat = d.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let w = self.weight.to_dtype(DType::F64)?.reshape((1, c, 1))?;
        let b = self.bias.to_dtype(DType::F64)?.reshape((1, c, 1))?;
        xhat.broadcast_mul(&w)?
            .broadcast_add(&b)?
            .reshape(x.shape())?
            .to_dtype(x.dtype())
    }
}

/// One op: its name, input shape, cunorm's module, candle-nn's module, weight, bias.
type Case = (
    &'static str,
    Vec<usize>,
    Box<dyn Module>,
    Box<dyn Module>,
    Var,
    Var,
);

/// The three ops with random weight and bias, and candle-nn's layer for the same.
fn cases() -> Vec<Case> {
    let mut v: Vec<Case> = Vec::new();
    let (w, b) = (randn(&[16], 1), randn(&[16], 2));
    let (wv, bv) = (Var::from_tensor(&w).unwrap(), Var::from_tensor(&b).unwrap());
    v.push((
        "layer_norm",
        vec![5, 3, 16],
        Box::new(cc::LayerNorm::new(
            wv.as_tensor().clone(),
            bv.as_tensor().clone(),
            1e-5,
        )),
        Box::new(candle_nn::LayerNorm::new(w.clone(), b.clone(), 1e-5)),
        wv,
        bv,
    ));
    let w = randn(&[16], 3);
    let wv = Var::from_tensor(&w).unwrap();
    let unused = Var::from_tensor(&randn(&[16], 4)).unwrap();
    v.push((
        "rms_norm",
        vec![7, 16],
        Box::new(cc::RmsNorm::new(wv.as_tensor().clone(), 1e-6)),
        Box::new(candle_nn::RmsNorm::new(w.clone(), 1e-6)),
        wv,
        unused,
    ));
    let (w, b) = (randn(&[6], 5), randn(&[6], 6));
    let (wv, bv) = (Var::from_tensor(&w).unwrap(), Var::from_tensor(&b).unwrap());
    v.push((
        "group_norm",
        vec![2, 6, 5, 3],
        Box::new(
            cc::GroupNorm::new(wv.as_tensor().clone(), bv.as_tensor().clone(), 6, 3, 1e-5).unwrap(),
        ),
        Box::new(candle_nn::GroupNorm::new(w.clone(), b.clone(), 6, 3, 1e-5).unwrap()),
        wv,
        bv,
    ));
    // BatchNorm in training mode (batch statistics; the running ones are updated as a side
    // effect), against candle-nn's.
    let (w, b) = (randn(&[4], 7), randn(&[4], 8));
    let (wv, bv) = (Var::from_tensor(&w).unwrap(), Var::from_tensor(&b).unwrap());
    let stats = || {
        (
            Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
            Tensor::ones(4, DType::F32, &Device::Cpu).unwrap(),
        )
    };
    let ((m1, v1), (m2, v2)) = (stats(), stats());
    v.push((
        "batch_norm",
        vec![3, 4, 5, 2],
        Box::new(Train(
            cc::BatchNorm::new(
                4,
                m1,
                v1,
                wv.as_tensor().clone(),
                bv.as_tensor().clone(),
                1e-5,
            )
            .unwrap(),
        )),
        Box::new(Train(
            candle_nn::BatchNorm::new(4, m2, v2, w.clone(), b.clone(), 1e-5).unwrap(),
        )),
        wv,
        bv,
    ));
    // InstanceNorm (affine, training mode), against the composition of candle ops.
    let (w, b) = (randn(&[3], 9), randn(&[3], 10));
    let (wv, bv) = (Var::from_tensor(&w).unwrap(), Var::from_tensor(&b).unwrap());
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let config = cc::InstanceNormConfig {
        affine: true,
        ..Default::default()
    };
    let inorm = cc::instance_norm(3, config, vb).unwrap();
    let mut map = map;
    map.set_one("weight", wv.as_tensor()).unwrap();
    map.set_one("bias", bv.as_tensor()).unwrap();
    // The module reads the VarMap's Vars: point the case's Vars at them.
    let data = map.data().lock().unwrap();
    let (wv, bv) = (data["weight"].clone(), data["bias"].clone());
    drop(data);
    v.push((
        "instance_norm",
        vec![2, 3, 4, 5],
        Box::new(Train(inorm)),
        Box::new(ComposedInstanceNorm {
            weight: w,
            bias: b,
            eps: 1e-5,
        }),
        wv,
        bv,
    ));
    v
}

/// `x` with channels-last strides (NHWC memory, NCHW shape), as candle gives it after
/// `permute`s; the same logical values.
fn channels_last(x: &Tensor) -> Tensor {
    let r = x.rank();
    let mut to: Vec<usize> = vec![0];
    to.extend(2..r);
    to.push(1);
    let mut back: Vec<usize> = vec![0, r - 1];
    back.extend(1..r - 1);
    x.permute(to)
        .unwrap()
        .contiguous()
        .unwrap()
        .permute(back)
        .unwrap()
}

/// A channels-last input gives the same output (and gradients) as the contiguous one; the planes
/// ops read it in place and give a channels-last output.
#[test]
fn channels_last_strides() {
    for (name, shape, ours, _, wv, _) in cases() {
        if shape.len() < 3 {
            continue;
        }
        let x = Var::from_tensor(&randn(&shape, 20)).unwrap();
        let xc = channels_last(x.as_tensor());
        assert!(!xc.is_contiguous(), "{name}: the input is strided");
        let r = randn(&shape, 21);
        let want = ours.forward(x.as_tensor()).unwrap();
        let got = ours.forward(&xc).unwrap();
        close(&format!("{name} y"), &vec(&got), &vec(&want), 1e-6);
        // GroupNorm/BatchNorm/InstanceNorm keep the input's layout (PyTorch's channels_last
        // propagation, no reorder); LayerNorm/RMSNorm give a contiguous output.
        if name.contains("layer") || name.contains("rms") {
            assert!(got.is_contiguous(), "{name}: a contiguous output");
        } else {
            assert_eq!(got.stride(), xc.stride(), "{name}: a channels-last output");
        }
        let g1 = (want * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (got * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for (what, t) in [("dx", x.as_tensor()), ("dweight", wv.as_tensor())] {
            close(
                &format!("{name} {what}"),
                &vec(g2.get(t).unwrap()),
                &vec(g1.get(t).unwrap()),
                1e-6,
            );
        }
    }
}

#[test]
fn forward_equals_candle_nn() {
    for (name, shape, ours, theirs, _, _) in cases() {
        let x = randn(&shape, 10);
        close(
            name,
            &vec(&ours.forward(&x).unwrap()),
            &vec(&theirs.forward(&x).unwrap()),
            2e-5,
        );
    }
}

/// Gradients from candle's autograd (the op keeps the graph) against cunorm's own backward on
/// the same numbers, and against central finite differences of the loss.
#[test]
fn gradients_through_candle_autograd() {
    for (name, shape, ours, _, wv, bv) in cases() {
        let x = Var::from_tensor(&randn(&shape, 11)).unwrap();
        let r = randn(&shape, 12);
        let loss = |m: &dyn Module, x: &Tensor| -> f64 {
            let y = m.forward(x).unwrap();
            (y.to_dtype(DType::F64).unwrap() * r.to_dtype(DType::F64).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let y = ours.forward(x.as_tensor()).unwrap();
        let grads = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = vec(grads.get(x.as_tensor()).expect("a gradient for x"));
        let gw = vec(grads
            .get(wv.as_tensor())
            .expect("a gradient for the weight"));
        // cunorm's backward on the same numbers.
        let (xc, wc, bc, dy) = (
            cu(x.as_tensor()),
            cu(wv.as_tensor()),
            cu(bv.as_tensor()),
            cu(&r),
        );
        let want = match name {
            "layer_norm" => {
                let o = F::layer_norm(&xc, &[16], Some(&wc), Some(&bc), 1e-5).unwrap();
                F::layer_norm_backward(&dy, &xc, &[16], Some(&wc), true, &o.stats).unwrap()
            }
            "rms_norm" => {
                let o = F::rms_norm(&xc, &[16], Some(&wc), Some(1e-6)).unwrap();
                F::rms_norm_backward(&dy, &xc, &[16], Some(&wc), &o.stats).unwrap()
            }
            "group_norm" => {
                let o = F::group_norm(&xc, 3, Some(&wc), Some(&bc), 1e-5).unwrap();
                F::group_norm_backward(&dy, &xc, 3, Some(&wc), &o.stats).unwrap()
            }
            "batch_norm" => {
                let o =
                    F::batch_norm(&xc, None, None, Some(&wc), Some(&bc), true, 0.1, 1e-5).unwrap();
                F::batch_norm_backward(&dy, &xc, Some(&wc), &o.stats).unwrap()
            }
            _ => {
                let o = F::instance_norm(&xc, None, None, Some(&wc), Some(&bc), true, 0.1, 1e-5)
                    .unwrap();
                F::instance_norm_backward(&dy, &xc, Some(&wc), &o.stats).unwrap()
            }
        };
        close(&format!("{name} dx"), &gx, &want.dx.to_vec().unwrap(), 1e-6);
        close(
            &format!("{name} dweight"),
            &gw,
            &want.dweight.unwrap().to_vec().unwrap(),
            1e-6,
        );
        if name != "rms_norm" {
            let gb = vec(grads.get(bv.as_tensor()).expect("a gradient for the bias"));
            close(
                &format!("{name} dbias"),
                &gb,
                &want.dbias.unwrap().to_vec().unwrap(),
                1e-6,
            );
        }
        // Finite differences in the weight and bias (first and last entries): the op reads the
        // Vars' current values, so perturbing them in place moves the loss.
        let gb = (name != "rms_norm").then(|| vec(grads.get(bv.as_tensor()).unwrap()));
        for (var, g, what) in [(&wv, Some(gw.clone()), "weight"), (&bv, gb, "bias")] {
            let Some(g) = g else { continue };
            let base = vec(var.as_tensor());
            for i in [0, base.len() - 1] {
                let h = 1e-2f32;
                let at = |d: f32| {
                    let mut v = base.clone();
                    v[i] += d;
                    var.set(&Tensor::from_vec(v, base.len(), &Device::Cpu).unwrap())
                        .unwrap();
                    loss(ours.as_ref(), x.as_tensor())
                };
                let fd = ((at(h) - at(-h)) / (2.0 * h as f64)) as f32;
                var.set(&Tensor::from_vec(base.clone(), base.len(), &Device::Cpu).unwrap())
                    .unwrap();
                assert!(
                    (fd - g[i]).abs() <= 2e-2 * g[i].abs().max(1.0),
                    "{name}: d loss/d{what}[{i}] autograd {} vs finite difference {fd}",
                    g[i]
                );
            }
        }
        // Finite differences in x on a few elements (f32 forward, h = 1e-2).
        let base = vec(x.as_tensor());
        for i in [0, 7, base.len() - 1] {
            let h = 1e-2f32;
            let mut plus = base.clone();
            plus[i] += h;
            let mut minus = base.clone();
            minus[i] -= h;
            let xp = Tensor::from_vec(plus, shape.as_slice(), &Device::Cpu).unwrap();
            let xm = Tensor::from_vec(minus, shape.as_slice(), &Device::Cpu).unwrap();
            let fd =
                ((loss(ours.as_ref(), &xp) - loss(ours.as_ref(), &xm)) / (2.0 * h as f64)) as f32;
            assert!(
                (fd - gx[i]).abs() <= 2e-2 * gx[i].abs().max(1.0),
                "{name}: d loss/dx[{i}] autograd {} vs finite difference {fd}",
                gx[i]
            );
        }
    }
}

#[test]
fn half_precision_inputs() {
    for dt in [DType::F16, DType::BF16] {
        for (name, shape, ours, _, _, _) in cases() {
            let x = randn(&shape, 13);
            let want = vec(&ours.forward(&x).unwrap());
            let y = ours.forward(&x.to_dtype(dt).unwrap()).unwrap();
            assert_eq!(y.dtype(), dt, "{name}");
            let tol = if dt == DType::F16 { 4e-3 } else { 3e-2 };
            close(&format!("{name} {dt:?}"), &vec(&y), &want, tol);
        }
    }
}

/// The same VarBuilder names and initial values as candle-nn's constructors.
#[test]
fn var_builder_names_match_candle_nn() {
    let ours = VarMap::new();
    let theirs = VarMap::new();
    let vb = |m: &VarMap| VarBuilder::from_varmap(m, DType::F32, &Device::Cpu);
    cc::layer_norm(8, 1e-5, vb(&ours).pp("ln")).unwrap();
    cc::rms_norm(8, 1e-6, vb(&ours).pp("rms")).unwrap();
    cc::group_norm(2, 4, 1e-5, vb(&ours).pp("gn")).unwrap();
    cc::batch_norm(4, 1e-5, vb(&ours).pp("bn")).unwrap();
    let no_affine = candle_nn::BatchNormConfig {
        affine: false,
        ..Default::default()
    };
    cc::batch_norm(3, no_affine, vb(&ours).pp("bn2")).unwrap();
    candle_nn::layer_norm(8, 1e-5, vb(&theirs).pp("ln")).unwrap();
    candle_nn::rms_norm(8, 1e-6, vb(&theirs).pp("rms")).unwrap();
    candle_nn::group_norm(2, 4, 1e-5, vb(&theirs).pp("gn")).unwrap();
    candle_nn::batch_norm(4, 1e-5, vb(&theirs).pp("bn")).unwrap();
    candle_nn::batch_norm(3, no_affine, vb(&theirs).pp("bn2")).unwrap();
    let names = |m: &VarMap| {
        let data = m.data().lock().unwrap();
        let mut v: Vec<(String, Vec<f32>)> = data
            .iter()
            .map(|(k, t)| (k.clone(), vec(t.as_tensor())))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    assert_eq!(names(&ours), names(&theirs));
}

#[test]
fn misuse_is_an_err() {
    let x = randn(&[2, 6, 4], 14);
    let w = randn(&[5], 15);
    assert!(cc::layer_norm_op(&x, &w, None, 1e-5).is_err());
    assert!(cc::rms_norm_op(&x, &w, 1e-5).is_err());
    assert!(cc::group_norm_op(&x, 4, &randn(&[6], 16), None, 1e-5).is_err());
    assert!(cc::GroupNorm::new(randn(&[6], 1), randn(&[6], 2), 6, 4, 1e-5).is_err());
    let ints = Tensor::zeros((2, 6), DType::U32, &Device::Cpu).unwrap();
    assert!(cc::layer_norm_op(&ints, &randn(&[6], 3), None, 1e-5).is_err());
}

/// BatchNorm and InstanceNorm modules built from a `VarBuilder` run PyTorch's golden cases
/// (tests/data, f32, every case with running statistics): each step's output and gradients
/// (candle's autograd), then the running statistics in the `VarMap`, as PyTorch left them. Both
/// layouts (channels-last strides for the 4-D and 5-D cases).
#[test]
fn golden_running_statistics_through_candle() {
    let g = crate::golden::load();
    let mut ran = 0;
    for case in &g.cases {
        let layer = case["layer"].as_str().unwrap();
        let cfg = &case["config"];
        let momentum = cfg["momentum"].as_f64();
        if !matches!(layer, "batch_norm" | "instance_norm")
            || case["dtype"] != "f32"
            || !cfg["track_running_stats"].as_bool().unwrap()
            || momentum.is_none()
        {
            continue;
        }
        let shape: Vec<usize> = case["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let c = shape[1];
        let (eps, affine) = (
            cfg["eps"].as_f64().unwrap(),
            cfg["affine"].as_bool().unwrap(),
        );
        let scale = 1.0 + case["mean"].as_f64().unwrap().abs() / case["std"].as_f64().unwrap();
        for strided in [false, true] {
            if strided && shape.len() < 3 {
                continue;
            }
            let name = format!("{} strided {strided}", case["name"].as_str().unwrap());
            let mut map = VarMap::new();
            let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
            let m: Box<dyn ModuleT> = if layer == "batch_norm" {
                let config = candle_nn::BatchNormConfig {
                    eps,
                    remove_mean: true,
                    affine,
                    momentum: momentum.unwrap(),
                };
                Box::new(cc::batch_norm(c, config, vb).unwrap())
            } else {
                let config = cc::InstanceNormConfig {
                    eps,
                    momentum: momentum.unwrap(),
                    affine,
                    track_running_stats: true,
                };
                Box::new(cc::instance_norm(c, config, vb).unwrap())
            };
            let t = |v: Vec<f32>, s: &[usize]| Tensor::from_vec(v, s, &Device::Cpu).unwrap();
            for (key, name) in [("weight", "weight"), ("bias", "bias")] {
                if let Some(v) = case.get(key) {
                    map.set_one(name, t(g.arr(v), &[c])).unwrap();
                }
            }
            let var = |k: &str| map.data().lock().unwrap().get(k).cloned();
            for (k, step) in case["steps"].as_array().unwrap().iter().enumerate() {
                let train = step["train"].as_bool().unwrap();
                let x = Var::from_tensor(&t(g.arr(&step["x"]), &shape)).unwrap();
                let xin = if strided {
                    channels_last(x.as_tensor())
                } else {
                    x.as_tensor().clone()
                };
                let y = m.forward_t(&xin, train).unwrap();
                close(
                    &format!("{name} step {k} y"),
                    &vec(&y),
                    &g.arr(&step["y"]),
                    2e-5,
                );
                let dy = t(g.arr(&step["dy"]), &shape);
                let grads = (y * dy).unwrap().sum_all().unwrap().backward().unwrap();
                close(
                    &format!("{name} step {k} dx"),
                    &vec(grads.get(x.as_tensor()).unwrap()),
                    &g.arr(&step["dx"]),
                    2e-5 * scale as f32,
                );
                for key in ["weight", "bias"] {
                    if let (Some(want), Some(v)) = (step.get(format!("d{key}")), var(key)) {
                        close(
                            &format!("{name} step {k} d{key}"),
                            &vec(grads.get(v.as_tensor()).unwrap()),
                            &g.arr(want),
                            2e-5 * scale as f32,
                        );
                    }
                }
            }
            for key in ["running_mean", "running_var"] {
                close(
                    &format!("{name} {key}"),
                    &vec(var(key).unwrap().as_tensor()),
                    &g.arr(&case[key]),
                    1e-6 * scale as f32,
                );
            }
            ran += 1;
        }
    }
    assert!(ran >= 8, "only {ran} golden runs");
}

/// Misuse of the BatchNorm/InstanceNorm modules and ops is an `Err`, and a failed training
/// forward leaves the running statistics as they were.
#[test]
fn planes_misuse_is_an_err_and_changes_nothing() {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let bn = cc::batch_norm(4, 1e-5, vb.pp("bn")).unwrap();
    let before = (vec(bn.running_mean()), vec(bn.running_var()));
    for x in [randn(&[2, 3, 5], 30), randn(&[4], 31)] {
        assert!(bn.forward_t(&x, true).is_err(), "{:?}", x.shape());
        assert!(bn.forward_t(&x, false).is_err(), "{:?}", x.shape());
    }
    // One value per channel in training mode (PyTorch's "Expected more than 1 value").
    assert!(bn.forward_t(&randn(&[1, 4], 32), true).is_err());
    assert_eq!((vec(bn.running_mean()), vec(bn.running_var())), before);
    let remove_mean = candle_nn::BatchNormConfig {
        remove_mean: false,
        ..Default::default()
    };
    assert!(cc::batch_norm(4, remove_mean, vb.pp("bn2")).is_err());
    assert!(cc::BatchNorm::new(
        4,
        randn(&[3], 1),
        randn(&[4], 2),
        randn(&[4], 3),
        randn(&[4], 4),
        1e-5
    )
    .is_err());
    let config = cc::InstanceNormConfig {
        track_running_stats: true,
        ..Default::default()
    };
    let inorm = cc::instance_norm(3, config, vb.pp("in")).unwrap();
    let (m, v) = inorm.running_stats().unwrap();
    let before = (vec(m), vec(v));
    assert!(inorm.forward_t(&randn(&[2, 4, 5], 33), true).is_err());
    assert!(inorm.forward_t(&randn(&[2, 3, 1], 34), true).is_err());
    let (m, v) = inorm.running_stats().unwrap();
    assert_eq!((vec(m), vec(v)), before);
    let bad_eps = cc::InstanceNormConfig {
        eps: -1.0,
        ..Default::default()
    };
    assert!(cc::instance_norm(3, bad_eps, vb.pp("in2")).is_err());
    let ints = Tensor::zeros((2, 3, 4), DType::U32, &Device::Cpu).unwrap();
    assert!(cc::batch_norm_op(&ints, None, None, None, true, 0.1, 1e-5).is_err());
}

/// One functional op on (x, weight, bias, running_mean, running_var).
type Op = fn(&Tensor, &Tensor, &Tensor, &Var, &Var) -> candle_core::Result<Tensor>;

/// Every functional op: name, input shape, channels, the call.
fn functional_ops() -> Vec<(&'static str, Vec<usize>, usize, Op)> {
    vec![
        ("layer_norm", vec![6, 5, 96], 96, |x, w, b, _, _| {
            cc::layer_norm_op(x, w, Some(b), 1e-5)
        }),
        ("rms_norm", vec![9, 1030], 1030, |x, w, _, _, _| {
            cc::rms_norm_op(x, w, 1e-6)
        }),
        ("group_norm", vec![3, 8, 7, 5], 8, |x, w, b, _, _| {
            cc::group_norm_op(x, 4, w, Some(b), 1e-5)
        }),
        ("batch_norm train", vec![4, 6, 9, 7], 6, |x, w, b, m, v| {
            cc::batch_norm_op(x, Some((m, v)), Some(w), Some(b), true, 0.1, 1e-5)
        }),
        ("batch_norm eval", vec![4, 6, 9, 7], 6, |x, w, b, m, v| {
            cc::batch_norm_op(x, Some((m, v)), Some(w), Some(b), false, 0.1, 1e-5)
        }),
        ("batch_norm 3d", vec![2, 3, 4, 5, 6], 3, |x, w, b, m, v| {
            cc::batch_norm_op(x, Some((m, v)), Some(w), Some(b), true, 0.1, 1e-5)
        }),
        ("instance_norm 1d", vec![3, 5, 11], 5, |x, w, b, m, v| {
            cc::instance_norm_op(x, Some((m, v)), Some(w), Some(b), true, 0.1, 1e-5)
        }),
    ]
}

/// What one op gives on `dev`: y, the gradients of x, weight and bias through candle's
/// autograd of sum(y·r), and the running statistics after the call.
type Outcome = (
    Vec<f32>,
    Option<Vec<f32>>,
    Option<Vec<f32>>,
    Option<Vec<f32>>,
    Vec<f32>,
    Vec<f32>,
);

fn run_op(dev: &Device, dt: DType, shape: &[usize], c: usize, op: Op, strided: bool) -> Outcome {
    run_op_rounded(dev, dt, dt, shape, c, op, strided)
}

/// [`run_op`] in `dt` on inputs (x and the loss weights r) first rounded to `via`.
fn run_op_rounded(
    dev: &Device,
    dt: DType,
    via: DType,
    shape: &[usize],
    c: usize,
    op: Op,
    strided: bool,
) -> Outcome {
    let on = |t: Tensor| t.to_device(dev).unwrap();
    let data = |seed| {
        randn(shape, seed)
            .to_dtype(via)
            .unwrap()
            .to_dtype(dt)
            .unwrap()
    };
    let xv = Var::from_tensor(&on(data(31))).unwrap();
    let x = if strided {
        channels_last(xv.as_tensor())
    } else {
        xv.as_tensor().clone()
    };
    let w = Var::from_tensor(&on(randn(&[c], 32))).unwrap();
    let b = Var::from_tensor(&on(randn(&[c], 33))).unwrap();
    let m = Var::from_tensor(&on(randn(&[c], 34))).unwrap();
    let v = Var::from_tensor(&on(randn(&[c], 35).abs().unwrap())).unwrap();
    let r = on(data(36));
    let y = op(&x, w.as_tensor(), b.as_tensor(), &m, &v).unwrap();
    assert_eq!(y.dtype(), dt);
    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let grad = |t: &Var| g.get(t.as_tensor()).map(vec);
    (
        vec(&y),
        grad(&xv),
        grad(&w),
        grad(&b),
        vec(m.as_tensor()),
        vec(v.as_tensor()),
    )
}

/// Two outcomes of the same op agree within `tol` (relative to max(1, |value|)).
fn same_outcome(what: &str, got: &Outcome, want: &Outcome, tol: f32) {
    close(&format!("{what} y"), &got.0, &want.0, tol);
    let parts = [
        ("dx", &got.1, &want.1),
        ("dweight", &got.2, &want.2),
        ("dbias", &got.3, &want.3),
    ];
    for (part, g, w) in parts {
        match (g, w) {
            (Some(g), Some(w)) => close(&format!("{what} {part}"), g, w, tol),
            (None, None) if part == "dbias" && what.starts_with("rms_norm") => {}
            _ => panic!("{what} {part}: a gradient on one side only"),
        }
    }
    close(&format!("{what} running_mean"), &got.4, &want.4, 1e-5);
    close(&format!("{what} running_var"), &got.5, &want.5, 1e-5);
}

/// f16 and bf16 through candle's autograd against f32 on the same (rounded) values: every
/// functional op's output and dx within one or two roundings of the half type, dweight and dbias
/// (accumulated in f32 or better either way) within 1e-4, running statistics within 1e-5.
#[test]
fn half_precision_gradients() {
    for (dt, tol) in [(DType::F16, 2e-3), (DType::BF16, 1.6e-2)] {
        for (name, shape, c, op) in functional_ops() {
            let want = run_op_rounded(&Device::Cpu, DType::F32, dt, &shape, c, op, false);
            let got = run_op_rounded(&Device::Cpu, dt, dt, &shape, c, op, false);
            let what = format!("{name} {dt:?}");
            close(&format!("{what} y"), &got.0, &want.0, tol);
            let dx = |o: &Outcome| o.1.clone().expect("a gradient for x");
            close(&format!("{what} dx"), &dx(&got), &dx(&want), tol);
            for (part, g, w) in [("dweight", &got.2, &want.2), ("dbias", &got.3, &want.3)] {
                match (g, w) {
                    (Some(g), Some(w)) => close(&format!("{what} {part}"), g, w, 1e-4),
                    (None, None) => assert_eq!((name, part), ("rms_norm", "dbias")),
                    _ => panic!("{what} {part}: a gradient in one dtype only"),
                }
            }
            close(&format!("{what} running_mean"), &got.4, &want.4, 1e-5);
            close(&format!("{what} running_var"), &got.5, &want.5, 1e-5);
        }
    }
}

/// On the CPU, in f32, f16 and bf16: every functional op (BatchNorm 2d/3d in training and eval
/// mode, InstanceNorm 1d, GroupNorm) on a channels-last input equals the op on the contiguous
/// one: output, gradients and running statistics.
#[test]
fn layouts_agree_on_cpu() {
    for dt in [DType::F32, DType::F16, DType::BF16] {
        for (name, shape, c, op) in functional_ops() {
            if shape.len() < 3 {
                continue;
            }
            let want = run_op(&Device::Cpu, dt, &shape, c, op, false);
            let got = run_op(&Device::Cpu, dt, &shape, c, op, true);
            // One rounding of the output type apart at most (the layouts sum in other orders).
            let tol = match dt {
                DType::F32 => 1e-6,
                DType::F16 => 1e-3,
                _ => 8e-3,
            };
            same_outcome(&format!("{name} {dt:?} channels-last"), &got, &want, tol);
        }
    }
}

/// With feature `candle-cuda` and a GPU: every op on candle's CUDA device (cunorm's kernels on
/// candle's stream) against the same op on candle's CPU device (cunorm's CPU engines), forward,
/// backward through candle's autograd (dx, dweight, dbias) and the running statistics of
/// BatchNorm/InstanceNorm, in f32, f16 and bf16, contiguous and channels-last. Skips without a
/// CUDA device (`CUNORM_REQUIRE_CUDA=1` makes that a failure).
#[cfg(feature = "candle-cuda")]
#[test]
fn cuda_matches_cpu() {
    let gpu = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            if std::env::var("CUNORM_REQUIRE_CUDA").as_deref() == Ok("1") {
                panic!("CUNORM_REQUIRE_CUDA=1 but candle has no CUDA device: {e}");
            }
            eprintln!("cuda_matches_cpu skipped: candle has no CUDA device ({e})");
            return;
        }
    };
    for dt in [DType::F32, DType::F16, DType::BF16] {
        // The per-dtype bounds of the CUDA suite, relative to max(1, |value|).
        let tol = match dt {
            DType::F32 => 1e-4,
            DType::F16 => 4e-3,
            _ => 3e-2,
        };
        for (name, shape, c, op) in functional_ops() {
            for strided in [false, true] {
                if strided && shape.len() < 3 {
                    continue;
                }
                let what = format!(
                    "{name} {dt:?}{}",
                    if strided { " channels-last" } else { "" }
                );
                let want = run_op(&Device::Cpu, dt, &shape, c, op, strided);
                let got = run_op(&gpu, dt, &shape, c, op, strided);
                same_outcome(&what, &got, &want, tol);
            }
        }
    }
}
