//! The public API as training code uses it: layers as trait objects, named parameters updated in
//! place, state dicts with PyTorch's keys, resets, `&self` forwards, train/eval, and the
//! `Tensor` helpers. Numbers are checked against the functional ops (themselves checked against
//! the f64 oracle and PyTorch elsewhere), never against hard-coded outputs.

use cunorm::functional as F;
use cunorm::*;

#[allow(dead_code)]
#[path = "../../examples/train.rs"]
mod train_example;

/// Every value of a module's state, exactly (Debug prints only a few values, rounded).
fn values(m: &dyn Module) -> Vec<(String, Vec<f32>, Option<i64>)> {
    m.state_dict()
        .into_iter()
        .map(|(k, e)| match e {
            StateEntry::Tensor(t) => (k, t.to_vec().unwrap(), None),
            StateEntry::Count(n) => (k, Vec::new(), Some(n)),
        })
        .collect()
}

/// A layer's parameter as an op argument.
fn as_param(p: Option<&Tensor<f32>>) -> Option<&dyn Param> {
    p.map(|t| t as &dyn Param)
}

fn all_layers() -> Vec<(Box<dyn Norm<f32>>, Vec<usize>)> {
    vec![
        (Box::new(BatchNorm1d::new(3).unwrap()), vec![4, 3, 5]),
        (Box::new(BatchNorm2d::new(3).unwrap()), vec![2, 3, 4, 5]),
        (Box::new(BatchNorm3d::new(3).unwrap()), vec![2, 3, 2, 2, 3]),
        (
            Box::new(
                InstanceNorm2d::from_config(
                    InstanceNormConfig::new(3)
                        .with_affine(true)
                        .with_track_running_stats(true),
                )
                .unwrap(),
            ),
            vec![2, 3, 4, 5],
        ),
        (Box::new(InstanceNorm1d::new(3).unwrap()), vec![2, 3, 7]),
        (Box::new(LayerNorm::new(&[4, 5]).unwrap()), vec![2, 3, 4, 5]),
        (Box::new(GroupNorm::new(3, 6).unwrap()), vec![2, 6, 4]),
        (Box::new(RMSNorm::new(&[5]).unwrap()), vec![3, 5]),
    ]
}

#[test]
fn layers_as_trait_objects_forward_backward_and_update_in_place() {
    for (mut layer, shape) in all_layers() {
        let name = layer.name();
        let x = Tensor::<f32>::randn(&shape, 1).unwrap();
        let dy = Tensor::<f32>::randn(&shape, 2).unwrap();
        let out = layer.forward_t(&x).unwrap();
        let g = layer.backward(&dy, &x, &out.stats).unwrap();
        assert_eq!(g.dx.shape(), x.shape(), "{name}");
        let named: Vec<&str> = g.named().iter().map(|(n, _)| *n).collect();
        let params: Vec<&str> = layer.parameters().iter().map(|(n, _)| *n).collect();
        assert_eq!(
            named, params,
            "{name}: gradients and parameters by the same names"
        );
        // SGD in place through parameters_mut, then read back through parameters.
        let before: Vec<Vec<f32>> = layer
            .parameters()
            .iter()
            .map(|(_, p)| p.to_vec().unwrap())
            .collect();
        let grads: Vec<Vec<f32>> = g.named().iter().map(|(_, t)| t.to_vec().unwrap()).collect();
        for ((_, p), gr) in layer.parameters_mut().into_iter().zip(&grads) {
            for (w, d) in p.as_mut_slice().unwrap().iter_mut().zip(gr) {
                *w -= 0.5 * d;
            }
        }
        for (((_, p), b), gr) in layer.parameters().iter().zip(&before).zip(&grads) {
            let after = p.to_vec().unwrap();
            for ((a, b), d) in after.iter().zip(b).zip(gr) {
                assert_eq!(*a, b - 0.5 * d, "{name}: in-place update not visible");
            }
        }
        // train(mode) / eval through the trait object.
        layer.eval();
        assert!(!layer.is_training(), "{name}");
        layer.train(true);
        assert!(layer.is_training(), "{name}");
    }
}

#[test]
fn state_dict_has_pytorchs_keys_and_round_trips() {
    let keys = |l: &dyn Module| l.state_dict().keys().cloned().collect::<Vec<_>>();
    let bn = BatchNorm2d::new(3).unwrap();
    assert_eq!(
        keys(&bn),
        [
            "bias",
            "num_batches_tracked",
            "running_mean",
            "running_var",
            "weight"
        ]
    );
    assert_eq!(keys(&InstanceNorm2d::new(3).unwrap()), Vec::<String>::new());
    assert_eq!(keys(&GroupNorm::new(1, 3).unwrap()), ["bias", "weight"]);
    assert_eq!(
        keys(&LayerNorm::from_config(LayerNormConfig::new(&[3]).with_bias(false)).unwrap()),
        ["weight"]
    );
    assert_eq!(keys(&RMSNorm::new(&[3]).unwrap()), ["weight"]);

    // Train one module, load its state into a fresh one: identical eval outputs.
    let mut a = BatchNorm2d::new(3).unwrap();
    let x = Tensor::<f32>::randn(&[4, 3, 2, 2], 5).unwrap();
    a.forward(&x).unwrap();
    a.weight_mut().unwrap().as_mut_slice().unwrap()[1] = 2.5;
    let mut b = BatchNorm2d::new(3).unwrap();
    b.load_state_dict(&a.state_dict()).unwrap();
    assert_eq!(b.num_batches_tracked(), Some(1));
    a.eval();
    b.eval();
    assert_eq!(
        a.forward_eval(&x).unwrap().output.to_vec().unwrap(),
        b.forward_eval(&x).unwrap().output.to_vec().unwrap()
    );
}

#[test]
fn load_state_dict_errors_change_nothing() {
    let mut bn = BatchNorm2d::new(3).unwrap();
    let x = Tensor::<f32>::randn(&[4, 3, 2, 2], 6).unwrap();
    bn.forward(&x).unwrap();
    let before = bn.state_dict();
    let snapshot = |l: &BatchNorm2d| values(l);

    let mut missing = before.clone();
    missing.remove("running_var");
    let e = bn.load_state_dict(&missing).unwrap_err().to_string();
    assert!(
        e.contains("missing keys") && e.contains("running_var"),
        "{e}"
    );

    let mut extra = before.clone();
    extra.insert("running_std".into(), StateEntry::Count(0));
    let e = bn.load_state_dict(&extra).unwrap_err().to_string();
    assert!(
        e.contains("unexpected keys") && e.contains("running_std"),
        "{e}"
    );

    // A bad shape in the last key must not leave the earlier keys loaded.
    let mut bad = before.clone();
    bad.insert(
        "bias".into(),
        StateEntry::Tensor(Tensor::full(&[3], 9.0f32).unwrap()),
    );
    bad.insert(
        "weight".into(),
        StateEntry::Tensor(Tensor::full(&[4], 1.0f32).unwrap()),
    );
    let e = bn.load_state_dict(&bad).unwrap_err().to_string();
    assert!(
        e.contains("size mismatch for weight") && e.contains("[4]"),
        "{e}"
    );
    assert_eq!(
        snapshot(&bn),
        values(&{
            let mut b = BatchNorm2d::new(3).unwrap();
            b.load_state_dict(&before).unwrap();
            b
        }),
        "a failed load changed the module"
    );
}

#[test]
fn resets_restore_the_initial_state() {
    let mut bn = BatchNorm1d::new(4).unwrap();
    let fresh = values(&bn);
    let x = Tensor::<f32>::randn(&[8, 4], 3).unwrap();
    bn.forward(&x).unwrap();
    bn.weight_mut().unwrap().as_mut_slice().unwrap()[0] = 3.0;
    bn.reset_running_stats().unwrap();
    assert_eq!(bn.num_batches_tracked(), Some(0));
    assert_eq!(bn.running_mean().unwrap().to_vec().unwrap(), vec![0.0; 4]);
    assert_eq!(bn.running_var().unwrap().to_vec().unwrap(), vec![1.0; 4]);
    assert_eq!(bn.weight().unwrap().to_vec().unwrap()[0], 3.0);
    bn.reset_parameters().unwrap();
    assert_eq!(values(&bn), fresh);
}

#[test]
fn forwards_through_shared_references() {
    let x = Tensor::<f32>::randn(&[2, 4, 3], 9).unwrap();
    // LayerNorm, GroupNorm, RMSNorm hold no running state: &self, usable from many threads.
    let ln = LayerNorm::new(&[3]).unwrap();
    let gn = GroupNorm::new(2, 4).unwrap();
    let rms = RMSNorm::new(&[3]).unwrap();
    let (ln, gn, rms) = (&ln, &gn, &rms);
    std::thread::scope(|s| {
        s.spawn(|| ln.forward(&x).unwrap());
        s.spawn(|| gn.forward(&x).unwrap());
        s.spawn(|| rms.forward(&x).unwrap());
    });
    let want = F::layer_norm(&x, &[3], as_param(ln.weight()), as_param(ln.bias()), 1e-5).unwrap();
    assert_eq!(
        ln.forward(&x).unwrap().to_vec().unwrap(),
        want.output.to_vec().unwrap()
    );

    // BatchNorm: forward_eval(&self) in eval mode equals the eval forward and changes nothing.
    let mut bn = BatchNorm1d::new(4).unwrap();
    bn.forward(&x).unwrap();
    let err = bn.forward_eval(&x).unwrap_err().to_string();
    assert!(err.contains("eval()"), "{err}");
    bn.eval();
    let by_ref = bn.forward_eval(&x).unwrap().output.to_vec().unwrap();
    let state = values(&bn);
    let by_mut = bn.forward(&x).unwrap().to_vec().unwrap();
    assert_eq!(by_ref, by_mut);
    assert_eq!(values(&bn), state);
    // Without tracking, training mode needs no &mut either: batch statistics.
    let untracked =
        BatchNorm1d::from_config(BatchNormConfig::new(4).with_track_running_stats(false)).unwrap();
    let want = F::batch_norm(
        &x,
        None,
        None,
        as_param(untracked.weight()),
        as_param(untracked.bias()),
        true,
        0.1,
        1e-5,
    )
    .unwrap();
    assert_eq!(
        untracked.forward_eval(&x).unwrap().output.to_vec().unwrap(),
        want.output.to_vec().unwrap()
    );
}

#[test]
fn failed_forward_changes_no_state() {
    let mut bn = BatchNorm2d::from_config(BatchNormConfig::new(3).with_momentum(None)).unwrap();
    // A negative step count is refused where it is set (with momentum None it would make the
    // next step's factor 1/0), and the refusal changes nothing.
    let before = values(&bn);
    let e = bn.set_num_batches_tracked(-1).unwrap_err().to_string();
    assert!(e.contains("cannot be negative"), "{e}");
    assert_eq!(values(&bn), before);
    // A counter at its maximum makes the training forward an Err, before anything changes.
    bn.set_num_batches_tracked(i64::MAX).unwrap();
    let before = values(&bn);
    let x = Tensor::<f32>::randn(&[2, 3, 2, 2], 4).unwrap();
    assert!(bn.forward(&x).is_err(), "the step count cannot grow");
    assert_eq!(values(&bn), before);
    // A wrong channel count fails before anything changes too.
    bn.set_num_batches_tracked(0).unwrap();
    let before = values(&bn);
    assert!(bn
        .forward(&Tensor::<f32>::randn(&[2, 4, 2, 2], 4).unwrap())
        .is_err());
    assert_eq!(values(&bn), before);
}

#[test]
fn empty_normalized_shape_is_rejected() {
    for e in [
        LayerNorm::new(&[]).unwrap_err().to_string(),
        RMSNorm::new(&[]).unwrap_err().to_string(),
    ] {
        assert!(
            e.contains("normalized_shape must have at least one dimension"),
            "{e}"
        );
    }
}

#[test]
fn tensor_helpers() {
    // from_fn visits logical indices in row-major order.
    let t = Tensor::<f32>::from_fn(&[2, 3, 4], |i| (i[0] * 100 + i[1] * 10 + i[2]) as f32).unwrap();
    let v = t.to_vec().unwrap();
    let mut k = 0;
    for a in 0..2 {
        for b in 0..3 {
            for c in 0..4 {
                assert_eq!(v[k], (a * 100 + b * 10 + c) as f32);
                k += 1;
            }
        }
    }
    assert!(Tensor::<f32>::from_fn(&[usize::MAX, 3], |_| 0.0).is_err());

    // randn: seeded, and standard normal (mean within 5 sd of the sampling error, sd near 1).
    let a = Tensor::<f32>::randn(&[100, 100], 11)
        .unwrap()
        .to_vec()
        .unwrap();
    let b = Tensor::<f32>::randn(&[100, 100], 11)
        .unwrap()
        .to_vec()
        .unwrap();
    let c = Tensor::<f32>::randn(&[100, 100], 12)
        .unwrap()
        .to_vec()
        .unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    let n = a.len() as f64;
    let mean = a.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
    assert!(mean.abs() < 5.0 / n.sqrt(), "mean {mean}");
    assert!(
        (var.sqrt() - 1.0).abs() < 5.0 / (2.0 * n).sqrt(),
        "sd {}",
        var.sqrt()
    );

    // from_slice for every dtype.
    let h = Tensor::from_slice(&[f16::from_f32(1.5), f16::from_f32(-2.0)], &[2]).unwrap();
    assert_eq!(h.to_f32_vec().unwrap(), vec![1.5, -2.0]);
    let h = Tensor::from_slice(&[bf16::from_f32(0.5)], &[1, 1]).unwrap();
    assert_eq!(h.dtype(), DType::BF16);

    // Display: shape, dtype, layout, device and a few values, not the whole buffer.
    let big = Tensor::<f32>::from_fn(&[10, 1000], |i| i[1] as f32).unwrap();
    let s = format!("{big}");
    assert!(s.starts_with("Tensor[10, 1000] f32 nchw cpu ["), "{s}");
    assert!(s.contains("..."), "{s}");
    assert!(s.len() < 200, "Display printed {} characters", s.len());
    assert_eq!(format!("{big:?}"), s);
    let small = Tensor::from_slice(&[1.0f32, 2.0], &[2]).unwrap();
    assert_eq!(
        format!("{small}"),
        "Tensor[2] f32 nchw cpu [1.0000, 2.0000]"
    );
}

/// `examples/train.rs`: the two-layer model trains through every norm layer held as
/// `Box<dyn Norm<f32>>`, and the loss falls to a tenth.
#[test]
fn example_training_converges() {
    for norm in train_example::layers().unwrap() {
        let name = norm.name();
        let (first, last) = train_example::train(norm, 400).unwrap();
        assert!(
            last < 0.1 * first,
            "{name}: loss {first} -> {last} did not fall to a tenth"
        );
    }
}

/// Parameters in the input's dtype (bf16/f16 weights, as PyTorch and candle keep them) give
/// exactly what the same values as f32 parameters give (widening is exact; statistics stay f32),
/// and the parameter gradients come back in that dtype rounded once.
#[test]
fn parameters_in_the_inputs_dtype() {
    fn case<T: Element>() {
        let x = Tensor::<T>::randn(&[3, 4, 5], 21).unwrap();
        let dy = Tensor::<T>::randn(&[3, 4, 5], 22).unwrap();
        let w = Tensor::<T>::randn(&[4], 23).unwrap();
        let b = Tensor::<T>::randn(&[4], 24).unwrap();
        let (w32, b32) = (w.to_dtype::<f32>().unwrap(), b.to_dtype::<f32>().unwrap());
        let lw = Tensor::<T>::randn(&[5], 25).unwrap();
        let lw32 = lw.to_dtype::<f32>().unwrap();
        let same = |a: &Tensor<T>, b: &Tensor<T>, what: &str| {
            assert_eq!(
                a.to_f32_vec().unwrap(),
                b.to_f32_vec().unwrap(),
                "{what} {}",
                T::DTYPE
            )
        };
        // Planes family.
        let o = F::group_norm(&x, 2, Some(&w), Some(&b), 1e-5).unwrap();
        let o32 = F::group_norm(&x, 2, Some(&w32), Some(&b32), 1e-5).unwrap();
        same(&o.output, &o32.output, "group_norm y");
        let g = F::group_norm_backward(&dy, &x, 2, Some(&w), &o.stats).unwrap();
        let g32 = F::group_norm_backward(&dy, &x, 2, Some(&w32), &o32.stats).unwrap();
        same(&g.dx, &g32.dx, "group_norm dx");
        let (dw, db) = g.param_grads_as::<T>().unwrap();
        assert_eq!(dw.unwrap().dtype(), T::DTYPE);
        assert_eq!(
            db.unwrap().to_f32_vec().unwrap(),
            g32.dbias
                .unwrap()
                .to_dtype::<T>()
                .unwrap()
                .to_f32_vec()
                .unwrap()
        );
        // Rows family.
        let o = F::layer_norm(&x, &[5], Some(&lw), None, 1e-5).unwrap();
        let o32 = F::layer_norm(&x, &[5], Some(&lw32), None, 1e-5).unwrap();
        same(&o.output, &o32.output, "layer_norm y");
        let o = F::rms_norm(&x, &[5], Some(&lw), None).unwrap();
        let o32 = F::rms_norm(&x, &[5], Some(&lw32), None).unwrap();
        same(&o.output, &o32.output, "rms_norm y");
        // A wrong-shaped parameter of another dtype is still named.
        let bad = Tensor::<T>::randn(&[3], 26).unwrap();
        let e = F::batch_norm(&x, None, None, Some(&bad), None, true, 0.1, 1e-5).unwrap_err();
        assert!(
            e.to_string()
                .contains("weight should contain 4 elements not 3"),
            "{e}"
        );
    }
    case::<f32>();
    case::<f16>();
    case::<bf16>();
}

/// One config type, PyTorch's two sets of defaults.
#[test]
fn batch_and_instance_norm_configs_keep_pytorchs_defaults() {
    let b = BatchNormConfig::new(3);
    let i = InstanceNormConfig::new(3);
    assert!(b.affine && b.track_running_stats, "{b:?}");
    assert!(!i.affine && !i.track_running_stats, "{i:?}");
    assert_eq!((b.eps, b.momentum), (1e-5, Some(0.1)));
    assert_eq!((i.eps, i.momentum), (1e-5, Some(0.1)));
    assert_eq!(BatchNorm2d::new(3).unwrap().state_dict().len(), 5);
    assert_eq!(InstanceNorm2d::new(3).unwrap().state_dict().len(), 0);
}
