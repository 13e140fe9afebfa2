//! The CUDA backend against the CPU oracle: every op × dtype × memory format × stage, NaN-
//! poisoned outputs, bitwise determinism (see the command line's `check`). Without a usable GPU these
//! tests skip with the reason; `CUNORM_REQUIRE_CUDA=1` turns a skip into a failure.

use cunorm::cuda::CudaDevice;
use cunorm::{functional as F, Device, Tensor};

fn device_or_skip(test: &str) -> Option<CudaDevice> {
    match Device::cuda(0) {
        Ok(Device::Cuda(d)) => Some(d),
        Ok(Device::Cpu) => None,
        Err(e) => {
            if std::env::var("CUNORM_REQUIRE_CUDA").as_deref() == Ok("1") {
                panic!("CUNORM_REQUIRE_CUDA=1 but CUDA is unusable: {e}");
            }
            crate::common::report_skip(&format!("cuda::{test}"), &e.to_string());
            None
        }
    }
}

/// Every element finite and within `tol`·max(1, |want|) of the CPU value.
fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{what}: element {i} is {g}");
        assert!(
            (g - w).abs() <= tol * w.abs().max(1.0),
            "{what}: element {i}: cuda {g} vs cpu {w}"
        );
    }
}

#[test]
fn cuda_matches_cpu_everywhere() {
    let Some(dev) = device_or_skip("cuda_matches_cpu_everywhere") else {
        return;
    };
    // Under compute-sanitizer gpu-run.sh sets CUNORM_CHECK_QUICK=1 (the largest shapes are slow there).
    let quick = std::env::var("CUNORM_CHECK_QUICK").as_deref() == Ok("1");
    let rows = crate::check::sweep(&dev, quick).expect("sweep runs");
    let failed: Vec<_> = rows.iter().filter(|r| !r.pass).cloned().collect();
    eprintln!("{}", crate::check::table(&rows));
    assert!(rows.len() > 200, "only {} comparisons ran", rows.len());
    assert!(
        failed.is_empty(),
        "{} of {} comparisons failed:\n{}",
        failed.len(),
        rows.len(),
        crate::check::table(&failed)
    );
}

#[test]
fn cuda_empty_and_errors() {
    let Some(dev) = device_or_skip("cuda_empty_and_errors") else {
        return;
    };
    let d = Device::Cuda(dev);
    let x = Tensor::<f32>::zeros(&[0, 4, 3])
        .unwrap()
        .to_device(&d)
        .unwrap();
    assert_eq!(
        F::group_norm(&x, 2, None, None, 1e-5)
            .unwrap()
            .output
            .numel(),
        0
    );
    let x = Tensor::<f32>::zeros(&[0, 8])
        .unwrap()
        .to_device(&d)
        .unwrap();
    assert_eq!(
        F::layer_norm(&x, &[8], None, None, 1e-5)
            .unwrap()
            .output
            .numel(),
        0
    );
    // A CPU weight with a CUDA input is a clean error.
    let x = Tensor::<f32>::zeros(&[2, 4, 3])
        .unwrap()
        .to_device(&d)
        .unwrap();
    let w = Tensor::full(&[4], 1.0f32).unwrap();
    assert!(F::group_norm(&x, 2, Some(&w), None, 1e-5).is_err());
}

#[test]
fn cuda_kernel_cache_round_trip() {
    let Some(dev) = device_or_skip("cuda_kernel_cache_round_trip") else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("cunorm-cache-{}", std::process::id()));
    std::env::set_var("CUNORM_CACHE_DIR", &dir);
    cunorm::kernels::warm_up(&dev).unwrap();
    let entries: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
    assert!(
        !entries.is_empty(),
        "no cache entries written to {}",
        dir.display()
    );
    // Corrupt every entry: loading must recompile, not trust them.
    for e in &entries {
        std::fs::write(e.path(), b"garbage").unwrap();
    }
    let fresh = CudaDevice::new(0).unwrap();
    cunorm::kernels::warm_up(&fresh).unwrap();
    let x = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0], &[1, 4])
        .unwrap()
        .to_device(&Device::Cuda(fresh))
        .unwrap();
    let y = F::layer_norm(&x, &[4], None, None, 0.0)
        .unwrap()
        .output
        .to_vec()
        .unwrap();
    assert!((y[3] - 1.3416408).abs() < 1e-5, "{y:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// The launch layer over caller-held cudarc buffers, with views that start at odd element
/// offsets (not 16-byte aligned, so the kernels must take their scalar paths), against the CPU
/// path; elements outside the output view stay untouched; a short buffer is an `Err`.
#[test]
fn raw_api_on_unaligned_views() {
    use cunorm::raw::{self, Grouping, PlaneShape, Source};
    use cunorm::MemoryFormat;
    let Some(dev) = device_or_skip("raw_api_on_unaligned_views") else {
        return;
    };
    let stream = dev.stream().clone();
    let data = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 + 11) % 101) as f32 / 25.0 - 2.0)
            .collect()
    };

    // LayerNorm: 64 columns (whole 16-byte packs) but x at offset 1 and y at offset 3.
    let (rows, cols) = (5usize, 64usize);
    let n = rows * cols;
    let host = data(n + 1);
    let w: Vec<f32> = (0..cols).map(|j| 1.0 + j as f32 / 64.0).collect();
    let xbuf = stream.clone_htod(&host).unwrap();
    let wbuf = stream.clone_htod(&w).unwrap();
    let mut ybuf = stream.alloc_zeros::<f32>(n + 5).unwrap();
    let mut mean = stream.alloc_zeros::<f32>(rows).unwrap();
    let mut rstd = stream.alloc_zeros::<f32>(rows).unwrap();
    let x_view = xbuf.slice(1..1 + n);
    raw::layer_norm_forward(
        &dev,
        &x_view,
        &mut ybuf.slice_mut(3..3 + n),
        rows,
        cols,
        Some(&wbuf.as_view()),
        None,
        1e-5,
        &mut mean.as_view_mut(),
        &mut rstd.as_view_mut(),
    )
    .unwrap();
    let y = stream.clone_dtoh(&ybuf).unwrap();
    dev.synchronize().unwrap();
    let xt = Tensor::from_vec(host[1..].to_vec(), &[rows, cols]).unwrap();
    let wt = Tensor::from_vec(w.clone(), &[cols]).unwrap();
    let want = F::layer_norm(&xt, &[cols], Some(&wt), None, 1e-5)
        .unwrap()
        .output
        .to_vec()
        .unwrap();
    assert_close("layer_norm y", &y[3..3 + n], &want, 1e-4);
    assert_eq!(&y[..3], &[0.0; 3], "layer_norm wrote before its view");
    assert_eq!(&y[3 + n..], &[0.0; 2], "layer_norm wrote past its view");
    let short = raw::layer_norm_forward(
        &dev,
        &x_view,
        &mut ybuf.slice_mut(0..n - 1),
        rows,
        cols,
        None,
        None,
        1e-5,
        &mut mean.as_view_mut(),
        &mut rstd.as_view_mut(),
    );
    assert!(short.is_err(), "a short output buffer must be an Err");

    // GroupNorm(2) over [3, 4, 40], both layouts, x at offset 1 and y at offset 2.
    let (bn, c, s, g) = (3usize, 4usize, 40usize, 2usize);
    let n = bn * c * s;
    for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
        let host = data(n + 1);
        let xbuf = stream.clone_htod(&host).unwrap();
        let mut ybuf = stream.alloc_zeros::<f32>(n + 2).unwrap();
        let mut mean = stream.alloc_zeros::<f32>(bn * g).unwrap();
        let mut rstd = stream.alloc_zeros::<f32>(bn * g).unwrap();
        let shape = PlaneShape {
            n: bn,
            c,
            s,
            format,
        };
        raw::planes_forward(
            &dev,
            &xbuf.slice(1..1 + n),
            &mut ybuf.slice_mut(2..2 + n),
            shape,
            Grouping::Groups(g),
            None,
            None,
            1e-5,
            Source::Input { running: None },
            &mut mean.as_view_mut(),
            &mut rstd.as_view_mut(),
        )
        .unwrap();
        let y = stream.clone_dtoh(&ybuf).unwrap();
        dev.synchronize().unwrap();
        let xt = Tensor::from_vec_with_format(host[1..].to_vec(), &[bn, c, s], format).unwrap();
        let want = F::group_norm(&xt, g, None, None, 1e-5)
            .unwrap()
            .output
            .to_vec_physical()
            .unwrap();
        assert_close(
            &format!("group_norm {format:?} y"),
            &y[2..2 + n],
            &want,
            1e-4,
        );
        assert_eq!(&y[..2], &[0.0; 2], "group_norm wrote before its view");
    }
}

/// What users of other kernels hit: f16 rows that are all zero, constant, or near the f16
/// maximum (squares overflow f16, and E[x²] − E[x]² cancels). CUDA must stay finite and agree
/// with the CPU path, forward and backward, in both layouts.
#[test]
fn cuda_extreme_f16_inputs() {
    use cunorm::{f16, MemoryFormat};
    let Some(dev) = device_or_skip("cuda_extreme_f16_inputs") else {
        return;
    };
    let d = Device::Cuda(dev);
    let (n, c, s) = (4usize, 8usize, 96usize);
    // Sample 0: zeros; 1: constant 1000; 2: ±60000 alternating with 0.5 steps; 3: unit values.
    let host: Vec<f16> = (0..n * c * s)
        .map(|i| {
            let (smp, j) = (i / (c * s), i % (c * s));
            f16::from_f32(match smp {
                0 => 0.0,
                1 => 1000.0,
                2 => (if j % 2 == 0 { 60000.0 } else { -60000.0 }) + (j % 7) as f32 * 0.5,
                _ => ((j * 37 % 101) as f32 - 50.0) / 25.0,
            })
        })
        .collect();
    let dy_host: Vec<f16> = (0..n * c * s)
        .map(|i| f16::from_f32(((i * 53 % 97) as f32 - 48.0) / 24.0))
        .collect();
    let compare = |what: &str, got: Vec<f32>, want: Vec<f32>| assert_close(what, &got, &want, 4e-3);
    for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
        let x = Tensor::from_vec(host.clone(), &[n, c, s])
            .unwrap()
            .to_format(format)
            .unwrap();
        let dy = Tensor::from_vec(dy_host.clone(), &[n, c, s])
            .unwrap()
            .to_format(format)
            .unwrap();
        let (xg, dyg) = (x.to_device(&d).unwrap(), dy.to_device(&d).unwrap());
        let tag = |op: &str| format!("{op} {format:?}");
        // GroupNorm(2): groups of 4 channels × 96.
        let (cpu, gpu) = (
            F::group_norm(&x, 2, None, None, 1e-5).unwrap(),
            F::group_norm(&xg, 2, None, None, 1e-5).unwrap(),
        );
        compare(
            &tag("group_norm y"),
            gpu.output.to_f32_vec().unwrap(),
            cpu.output.to_f32_vec().unwrap(),
        );
        let (gc, gg) = (
            F::group_norm_backward(&dy, &x, 2, None, &cpu.stats).unwrap(),
            F::group_norm_backward(&dyg, &xg, 2, None, &gpu.stats).unwrap(),
        );
        compare(
            &tag("group_norm dx"),
            gg.dx.to_f32_vec().unwrap(),
            gc.dx.to_f32_vec().unwrap(),
        );
        // BatchNorm statistics over (N, S) per channel: every channel mixes all four samples.
        let (cpu, gpu) = (
            F::batch_norm(&x, None, None, None, None, true, 0.1, 1e-5).unwrap(),
            F::batch_norm(&xg, None, None, None, None, true, 0.1, 1e-5).unwrap(),
        );
        compare(
            &tag("batch_norm y"),
            gpu.output.to_f32_vec().unwrap(),
            cpu.output.to_f32_vec().unwrap(),
        );
    }
    // LayerNorm / RMSNorm over each sample's 8×96 values.
    let x = Tensor::from_vec(host, &[n, c * s]).unwrap();
    let xg = x.to_device(&d).unwrap();
    compare(
        "layer_norm y",
        F::layer_norm(&xg, &[c * s], None, None, 1e-5)
            .unwrap()
            .output
            .to_f32_vec()
            .unwrap(),
        F::layer_norm(&x, &[c * s], None, None, 1e-5)
            .unwrap()
            .output
            .to_f32_vec()
            .unwrap(),
    );
    compare(
        "rms_norm y",
        F::rms_norm(&xg, &[c * s], None, None)
            .unwrap()
            .output
            .to_f32_vec()
            .unwrap(),
        F::rms_norm(&x, &[c * s], None, None)
            .unwrap()
            .output
            .to_f32_vec()
            .unwrap(),
    );
}

/// The misuse fuzz of `misuse.rs` on the CUDA path: the same `Err`s, and `Ok`s that match the
/// f64 oracle.
#[test]
fn cuda_misuse_fuzz() {
    let Some(dev) = device_or_skip("cuda_misuse_fuzz") else {
        return;
    };
    let checked = crate::misuse::misuse_fuzz_on(&Device::Cuda(dev), 400);
    assert!(checked > 50, "only {checked} cases reached the oracle");
}

/// Misuse repros of `misuse.rs` on CUDA tensors: foreign statistics are an `Err`, empty inputs
/// give zero gradients, a NaN makes its set's statistics NaN.
#[test]
fn cuda_misuse_cases() {
    let Some(dev) = device_or_skip("cuda_misuse_cases") else {
        return;
    };
    let d = Device::Cuda(dev);
    let on = |t: Tensor<f32>| t.to_device(&d).unwrap();
    let x = on(Tensor::randn(&[2, 4, 3], 3).unwrap());
    let rms = F::rms_norm(&x, &[3], None, None).unwrap().stats;
    assert!(F::batch_norm_backward(&x, &x, None, &rms).is_err());
    assert!(F::group_norm_backward(&x, &x, 2, None, &rms).is_err());
    assert!(F::instance_norm_backward(&x, &x, None, &rms).is_err());
    // Empty spatial size: zero parameter gradients, on the device.
    let e = on(Tensor::zeros(&[2, 3, 0]).unwrap());
    let w = on(Tensor::full(&[3], 1.0).unwrap());
    let out = F::batch_norm(&e, None, None, Some(&w), None, true, 0.1, 1e-5).unwrap();
    let g = F::batch_norm_backward(&e, &e, Some(&w), &out.stats).unwrap();
    assert_eq!(g.dweight.unwrap().to_vec().unwrap(), vec![0.0; 3]);
    assert_eq!(g.dx.shape(), &[2, 3, 0]);
    // No channels: empty outputs and parameter gradients, and no kernel reading past the
    // (empty) partials (the parameter-gradient kernel once ran one block on a zero grid).
    let z = on(Tensor::zeros(&[2, 0, 3]).unwrap());
    let wz = on(Tensor::zeros(&[0]).unwrap());
    let out = F::batch_norm(&z, None, None, Some(&wz), None, true, 0.1, 1e-5).unwrap();
    let g = F::batch_norm_backward(&z, &z, Some(&wz), &out.stats).unwrap();
    assert_eq!(
        (g.dx.shape(), g.dweight.unwrap().numel()),
        (&[2, 0, 3][..], 0)
    );
    // A NaN in row 0 of a LayerNorm: that row's statistics are NaN, the others finite.
    let mut v: Vec<f32> = (0..12).map(|i| (i as f32 * 0.37).sin()).collect();
    v[1] = f32::NAN;
    let xn = on(Tensor::from_vec(v, &[3, 4]).unwrap());
    let rstd = F::layer_norm(&xn, &[4], None, None, 1e-5)
        .unwrap()
        .stats
        .rstd()
        .to_vec()
        .unwrap();
    assert!(
        rstd[0].is_nan() && rstd[1..].iter().all(|r| r.is_finite()),
        "{rstd:?}"
    );
    // A +inf: its set's mean is +inf (saved and running), its variance NaN, as on the CPU.
    let mut xb: Vec<f32> = (0..8).map(|i| i as f32 * 0.5).collect();
    xb[5] = f32::INFINITY;
    let xb = Tensor::from_vec(xb, &[1, 2, 4]).unwrap();
    for format in [
        cunorm::MemoryFormat::Contiguous,
        cunorm::MemoryFormat::ChannelsLast,
    ] {
        let xf = xb.to_format(format).unwrap();
        let mut rm = on(Tensor::zeros(&[2]).unwrap());
        let mut rv = on(Tensor::full(&[2], 1.0).unwrap());
        let out = F::batch_norm(
            &on(xf.clone()),
            Some(&mut rm),
            Some(&mut rv),
            None,
            None,
            true,
            0.1,
            1e-5,
        )
        .unwrap();
        let mean = out.stats.mean().unwrap().to_vec().unwrap();
        assert_eq!(mean[1], f32::INFINITY, "{format:?} {mean:?}");
        assert!(mean[0].is_finite(), "{format:?} {mean:?}");
        assert_eq!(rm.to_vec().unwrap()[1], f32::INFINITY);
        assert!(rv.to_vec().unwrap()[1].is_nan());
    }
    let mut v: Vec<f32> = (0..12).map(|i| (i as f32 * 0.37).sin()).collect();
    v[6] = f32::INFINITY;
    let xi = on(Tensor::from_vec(v, &[3, 4]).unwrap());
    let mean = F::layer_norm(&xi, &[4], None, None, 1e-5)
        .unwrap()
        .stats
        .mean()
        .unwrap()
        .to_vec()
        .unwrap();
    // LayerNorm's mean of a row holding +inf is NaN (PyTorch's Welford), the others finite.
    assert!(
        mean[1].is_nan() && mean[0].is_finite() && mean[2].is_finite(),
        "{mean:?}"
    );
}

/// An allocation larger than the device's memory is an `Err` that says so (cuMemAlloc's out of
/// memory; the fake driver has 80 GiB), never an abort, and the device stays usable after it.
#[test]
fn cuda_out_of_memory_is_an_err() {
    let Some(dev) = device_or_skip("cuda_out_of_memory_is_an_err") else {
        return;
    };
    let n = 1usize << 40; // 4 TiB of f32, more than any GPU has
    let e = dev.zeros::<f32>(n).unwrap_err().to_string();
    assert!(
        e.contains("out of memory") && e.contains(&format!("{} bytes", n * 4)),
        "{e}"
    );
    // A byte count that overflows usize is refused before the driver (cudarc would wrap it).
    let e = dev.zeros::<f32>((1 << 62) + 1).unwrap_err().to_string();
    assert!(e.contains("out of memory"), "{e}");
    let x = Tensor::<f32>::randn(&[4, 8], 5)
        .unwrap()
        .to_device(&Device::Cuda(dev))
        .unwrap();
    let y = F::layer_norm(&x, &[8], None, None, 1e-5).unwrap().output;
    assert_eq!(y.to_vec().unwrap().len(), 32);
}

/// Device memory freed by a dropped output stays reserved for the next allocation across a
/// synchronization (the pool's release threshold, set by `CudaDevice::new`), so a loop that
/// allocates each step maps no fresh pages; `release_cached_memory` hands it back. Measured on
/// the pool itself (its reserved bytes: this process's only), which the fake driver models as
/// the driver keeps it. Devices without stream-ordered allocation have no pool: nothing to check.
#[test]
fn cuda_freed_memory_stays_cached_until_released() {
    let Some(dev) = device_or_skip("cuda_freed_memory_stays_cached_until_released") else {
        return;
    };
    if !dev.context().has_async_alloc() {
        eprintln!("cuda_freed_memory_stays_cached_until_released: no memory pools on this device");
        return;
    }
    let reserved = || dev.pool_reserved_bytes().unwrap();
    let bytes = 64usize << 20;
    let (rows, cols) = (4096, bytes / 4 / 4096);
    let x = Tensor::<f32>::full(&[rows, cols], 1.0)
        .unwrap()
        .to_device(&Device::Cuda(dev.clone()))
        .unwrap();
    let y = F::rms_norm(&x, &[cols], None, None).unwrap().output;
    dev.synchronize().unwrap();
    let before_drop = reserved();
    assert!(
        before_drop >= 2 * bytes as u64,
        "the pool holds {before_drop} bytes with x and y live"
    );
    drop(y);
    dev.synchronize().unwrap();
    let after_drop = reserved();
    assert!(
        after_drop + (bytes / 4) as u64 > before_drop,
        "the freed output went back to the driver at the synchronization: the pool held \
         {before_drop} -> {after_drop} bytes"
    );
    dev.release_cached_memory().unwrap();
    let released = reserved();
    assert!(
        released + (bytes / 4 * 3) as u64 <= after_drop,
        "release_cached_memory returned too little: the pool held {after_drop} -> {released} bytes"
    );
    // The device still computes after the release.
    let y = F::rms_norm(&x, &[cols], None, None).unwrap().output;
    assert_eq!(y.to_vec().unwrap().len(), rows * cols);
}

/// The PyTorch golden cases with NaN/±inf inputs (tests/data, see `golden.rs`) on the device:
/// outputs, gradients, saved and running statistics, NaN against NaN and inf against inf.
#[test]
fn cuda_golden_nonfinite() {
    let Some(dev) = device_or_skip("cuda_golden_nonfinite") else {
        return;
    };
    crate::golden::golden_nonfinite_on(&Device::Cuda(dev));
}
