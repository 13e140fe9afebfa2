//! `cunorm::candle` (feature `candle`) on candle's CPU device: forwards equal to candle-nn's own
//! layers, gradients through candle's autograd equal to cunorm's backward and to finite
//! differences, every dtype, the VarBuilder names of candle-nn, misuse as an `Err`.

use candle_core::{DType, Device, Module, Tensor, Var};
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
    v
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
            _ => {
                let o = F::group_norm(&xc, 3, Some(&wc), Some(&bc), 1e-5).unwrap();
                F::group_norm_backward(&dy, &xc, 3, Some(&wc), &o.stats).unwrap()
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
    candle_nn::layer_norm(8, 1e-5, vb(&theirs).pp("ln")).unwrap();
    candle_nn::rms_norm(8, 1e-6, vb(&theirs).pp("rms")).unwrap();
    candle_nn::group_norm(2, 4, 1e-5, vb(&theirs).pp("gn")).unwrap();
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
