//! Every error path returns an `Err` carrying PyTorch's wording and the offending shape; empty
//! inputs give empty outputs; NaN propagates; nothing panics.

use cunorm::functional as F;
use cunorm::*;

fn t(shape: &[usize]) -> Tensor<f32> {
    let n: usize = shape.iter().product();
    Tensor::from_vec((0..n).map(|i| (i as f32 * 0.731).sin()).collect(), shape).unwrap()
}

#[track_caller]
fn expect_err<T: std::fmt::Debug>(r: Result<T>, needle: &str) {
    match r {
        Ok(v) => panic!("expected an error containing {needle:?}, got Ok({v:?})"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(needle),
                "error {msg:?} does not contain {needle:?}"
            );
        }
    }
}

#[test]
fn batch_norm_rank_errors() {
    expect_err(
        BatchNorm1d::new(3).unwrap().forward(&t(&[2, 3, 4, 5])),
        "expected 2D or 3D input (got 4D input)",
    );
    expect_err(
        BatchNorm2d::new(3).unwrap().forward(&t(&[2, 3, 4])),
        "expected 4D input (got 3D input)",
    );
    expect_err(
        BatchNorm3d::new(3).unwrap().forward(&t(&[2, 3, 4, 4])),
        "expected 5D input (got 4D input)",
    );
    expect_err(
        F::batch_norm(&t(&[3]), None, None, None, None, true, 0.1, 1e-5),
        "expected at least 2D input",
    );
}

#[test]
fn batch_norm_one_value_per_channel() {
    let mut bn = BatchNorm1d::new(4).unwrap();
    expect_err(
        bn.forward(&t(&[1, 4])),
        "Expected more than 1 value per channel when training, got input size [1, 4]",
    );
    let mut bn2 = BatchNorm2d::new(4).unwrap();
    expect_err(
        bn2.forward(&t(&[1, 4, 1, 1])),
        "got input size [1, 4, 1, 1]",
    );
    // Legal in eval mode (running statistics are used).
    bn.eval();
    assert_eq!(bn.forward(&t(&[1, 4])).unwrap().shape(), &[1, 4]);
}

#[test]
fn batch_norm_channel_mismatch() {
    let mut bn = BatchNorm2d::new(3).unwrap();
    expect_err(
        bn.forward(&t(&[2, 4, 2, 2])),
        "BatchNorm2d: expected input's size at dim=1 to match num_features (3), but got: 4.",
    );
    let mut bn =
        BatchNorm2d::from_config(BatchNormConfig::new(3).with_track_running_stats(false)).unwrap();
    expect_err(
        bn.forward(&t(&[2, 4, 2, 2])),
        "BatchNorm2d: expected input's size at dim=1 to match num_features (3), but got: 4.",
    );
    // Without parameters or running statistics any channel count works, as in PyTorch.
    let mut bare = BatchNorm2d::from_config(
        BatchNormConfig::new(3)
            .with_affine(false)
            .with_track_running_stats(false),
    )
    .unwrap();
    bare.forward(&t(&[2, 4, 2, 2])).unwrap();
    let w = Tensor::from_slice(&[1.0; 5], &[5]).unwrap();
    expect_err(
        F::batch_norm(&t(&[2, 4, 3]), None, None, None, Some(&w), true, 0.1, 1e-5),
        "bias should contain 4 elements not 5",
    );
    let mut rm = Tensor::from_slice(&[0.0; 4], &[4]).unwrap();
    let mut rv = Tensor::from_slice(&[1.0; 2], &[2]).unwrap();
    expect_err(
        F::batch_norm(
            &t(&[2, 4, 3]),
            Some(&mut rm),
            Some(&mut rv),
            None,
            None,
            true,
            0.1,
            1e-5,
        ),
        "running_var should contain 4 elements not 2",
    );
    expect_err(
        F::batch_norm(&t(&[2, 4, 3]), None, None, None, None, false, 0.1, 1e-5),
        "must be defined when training=false",
    );
}

#[test]
fn instance_norm_errors() {
    expect_err(
        InstanceNorm1d::new(3).unwrap().forward(&t(&[2, 3, 4, 4])),
        "expected 2D or 3D input (got 4D input)",
    );
    expect_err(
        InstanceNorm2d::new(3).unwrap().forward(&t(&[3, 4])),
        "expected 3D or 4D input (got 2D input)",
    );
    expect_err(
        InstanceNorm3d::new(3).unwrap().forward(&t(&[2, 3, 4])),
        "expected 4D or 5D input (got 3D input)",
    );
    let mut affine =
        InstanceNorm2d::from_config(InstanceNormConfig::new(3).with_affine(true)).unwrap();
    expect_err(
        affine.forward(&t(&[2, 4, 3, 3])),
        "expected input's size at dim=1 to match num_features (3), but got: 4.",
    );
    expect_err(
        affine.forward(&t(&[4, 3, 3])),
        "expected input's size at dim=0 to match num_features (3), but got: 4.",
    );
    expect_err(
        InstanceNorm1d::new(3).unwrap().forward(&t(&[2, 3, 1])),
        "Expected more than 1 spatial element when training, got input size [2, 3, 1]",
    );
    let mut tracked =
        InstanceNorm2d::from_config(InstanceNormConfig::new(3).with_track_running_stats(true))
            .unwrap();
    expect_err(
        tracked.forward(&t(&[2, 5, 3, 3])),
        "InstanceNorm2d: expected input's size at dim=1 to match num_features (3), but got: 5.",
    );
    // In eval mode with running statistics, a single spatial element is fine.
    tracked.eval();
    assert!(tracked.forward(&t(&[2, 3, 1, 1])).is_ok());
}

#[test]
fn layer_and_rms_norm_shape_errors() {
    let msg = "Given normalized_shape=[4, 2, 2], expected input with shape [*, 4, 2, 2], but got input of size[2, 3, 2, 2]";
    expect_err(
        LayerNorm::new(&[4, 2, 2])
            .unwrap()
            .forward(&t(&[2, 3, 2, 2])),
        msg,
    );
    expect_err(
        RMSNorm::new(&[4, 2, 2]).unwrap().forward(&t(&[2, 3, 2, 2])),
        msg,
    );
    expect_err(
        LayerNorm::new(&[8]).unwrap().forward(&t(&[4])),
        "but got input of size[4]",
    );
    let w = Tensor::from_slice(&[1.0; 3], &[3]).unwrap();
    expect_err(
        F::layer_norm(&t(&[2, 4]), &[4], Some(&w), None, 1e-5),
        "expected weight of size [4]",
    );
    expect_err(
        F::rms_norm(&t(&[2, 4]), &[4], Some(&w), None),
        "expected weight of size [4]",
    );
    let mut ln = LayerNorm::new(&[4]).unwrap();
    expect_err(ln.set_bias(w.clone()), "bias must have size [4], got [3]");
    let no_bias = LayerNorm::from_config(LayerNormConfig::new(&[4]).with_bias(false)).unwrap();
    assert!(no_bias.bias().is_none() && no_bias.weight().is_some());
}

#[test]
fn group_norm_errors() {
    expect_err(
        GroupNorm::new(2, 4).unwrap().forward(&t(&[4])),
        "Expected at least 2 dimensions for input tensor but received 1",
    );
    expect_err(
        F::group_norm(&t(&[2, 6, 3]), 4, None, None, 1e-5),
        "Expected number of channels in input to be divisible by num_groups, but got input of shape [2, 6, 3] and num_groups=4",
    );
    expect_err(
        F::group_norm(&t(&[1, 4]), 4, None, None, 1e-5),
        "Expected more than 1 value per channel when training, got input size [1, 4]",
    );
    expect_err(
        GroupNorm::new(3, 4),
        "num_channels must be divisible by num_groups",
    );
    expect_err(
        GroupNorm::new(0, 4),
        "num_channels must be divisible by num_groups",
    );
    expect_err(
        GroupNorm::new(2, 4).unwrap().forward(&t(&[2, 6, 3])),
        "GroupNorm: expected input's size at dim=1 to match num_features (4), but got: 6.",
    );
}

#[test]
fn argument_errors() {
    expect_err(
        BatchNorm2d::from_config(BatchNormConfig::new(3).with_eps(-1.0)),
        "eps must be a non-negative number",
    );
    expect_err(
        LayerNorm::from_config(LayerNormConfig::new(&[3]).with_eps(f64::NAN)),
        "eps must be a non-negative number",
    );
    expect_err(
        F::group_norm(&t(&[2, 4, 3]), 2, None, None, -1e-5),
        "eps must be a non-negative number",
    );
    expect_err(
        F::rms_norm(&t(&[2, 4]), &[4], None, Some(-1.0)),
        "eps must be a non-negative number",
    );
    expect_err(
        BatchNorm2d::from_config(BatchNormConfig::new(3).with_momentum(Some(1.5))),
        "momentum must be in [0, 1]",
    );
    expect_err(
        Tensor::from_vec(vec![0.0f32; 5], &[2, 3]),
        "shape [2, 3] needs 6 elements but the data has 5",
    );
    expect_err(
        Tensor::from_vec_with_format(vec![0.0f32; 5], &[5], MemoryFormat::ChannelsLast),
        "channels-last needs",
    );
}

#[test]
fn backward_argument_errors() {
    let x = t(&[2, 3, 4]);
    let out = F::batch_norm(&x, None, None, None, None, true, 0.1, 1e-5).unwrap();
    expect_err(
        F::batch_norm_backward(&t(&[2, 3, 5]), &x, None, &out.stats),
        "grad_output has size [2, 3, 5] but the input has size [2, 3, 4]",
    );
    let other = F::batch_norm(&t(&[2, 5, 4]), None, None, None, None, true, 0.1, 1e-5).unwrap();
    expect_err(
        F::batch_norm_backward(&x, &x, None, &other.stats),
        "computed for an input of size [2, 5, 4] but this input has size [2, 3, 4]",
    );
    let dy_cl = x.to_format(MemoryFormat::ChannelsLast).unwrap();
    expect_err(
        F::batch_norm_backward(&dy_cl, &x, None, &out.stats),
        "grad_output is nhwc but the input is nchw",
    );
}

#[test]
fn empty_inputs_give_empty_outputs() {
    let mut bn = BatchNorm2d::new(3).unwrap();
    let y = bn.forward(&t(&[0, 3, 4, 4])).unwrap();
    assert_eq!(y.shape(), &[0, 3, 4, 4]);
    assert_eq!(
        bn.running_mean().unwrap().to_vec().unwrap(),
        vec![0.0; 3],
        "empty batch leaves running stats"
    );
    assert_eq!(bn.running_var().unwrap().to_vec().unwrap(), vec![1.0; 3]);
    assert_eq!(
        LayerNorm::new(&[5])
            .unwrap()
            .forward(&t(&[0, 5]))
            .unwrap()
            .numel(),
        0
    );
    assert_eq!(
        RMSNorm::new(&[5])
            .unwrap()
            .forward(&t(&[0, 5]))
            .unwrap()
            .numel(),
        0
    );
    assert_eq!(
        GroupNorm::new(2, 4)
            .unwrap()
            .forward(&t(&[0, 4, 3]))
            .unwrap()
            .numel(),
        0
    );
    assert_eq!(
        InstanceNorm1d::new(3)
            .unwrap()
            .forward(&t(&[0, 3, 5]))
            .unwrap()
            .numel(),
        0
    );
    assert_eq!(
        InstanceNorm1d::new(0)
            .unwrap()
            .forward(&t(&[2, 0, 5]))
            .unwrap()
            .numel(),
        0
    );
    let x = t(&[0, 3, 4]);
    let out = F::batch_norm(&x, None, None, None, None, true, 0.1, 1e-5).unwrap();
    let g = F::batch_norm_backward(&x, &x, None, &out.stats).unwrap();
    assert_eq!(g.dx.numel(), 0);
    let cl = t(&[0, 3, 4, 4])
        .to_format(MemoryFormat::ChannelsLast)
        .unwrap();
    assert_eq!(
        GroupNorm::new(3, 3).unwrap().forward(&cl).unwrap().numel(),
        0
    );
}

#[test]
fn nan_and_inf_propagate_within_their_group() {
    let mut v: Vec<f32> = (0..24).map(|i| i as f32).collect();
    v[0] = f32::NAN;
    v[13] = f32::INFINITY;
    let x = Tensor::from_vec(v, &[2, 4, 3]).unwrap();
    let y = GroupNorm::new(2, 4)
        .unwrap()
        .forward(&x)
        .unwrap()
        .to_vec()
        .unwrap();
    assert!(
        y[..6].iter().all(|v| v.is_nan()),
        "group (0,0) holds the NaN"
    );
    assert!(
        y[6..12].iter().all(|v| v.is_finite()),
        "group (0,1) is clean"
    );
    assert!(
        y[12..18].iter().all(|v| v.is_nan()),
        "group (1,0) holds the inf"
    );
    let y = LayerNorm::new(&[3])
        .unwrap()
        .forward(&x)
        .unwrap()
        .to_vec()
        .unwrap();
    assert!(y[..3].iter().all(|v| v.is_nan()) && y[3..12].iter().all(|v| v.is_finite()));
}

#[test]
fn cuda_request_without_gpu_is_an_error_not_a_panic() {
    // On a machine with a usable GPU this opens it; without one it must be a clean Err.
    match Device::cuda(0) {
        Ok(d) => assert!(!d.is_cpu()),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    let (dev, reason) = Device::auto();
    assert!(dev.is_cpu() == reason.is_some());
}
