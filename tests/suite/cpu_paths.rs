//! The CPU path against a naive f64 oracle (tests/common/oracle.rs) on random shapes —
//! including long rows that are reduced in pieces, channels-last blocks of many rows, and
//! mean-1e4 inputs — plus layout equivalence and bitwise determinism across thread counts.

use crate::common::oracle::{self, Spec};
use crate::common::*;
use cunorm::functional as F;
use cunorm::*;
use std::result::Result;

fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// Rounds through T so oracle inputs equal what the op sees.
fn rounded<T: Element>(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| T::from_f32(x).to_f32()).collect()
}

fn tensor<T: Element>(v: &[f32], shape: &[usize], fmt: MemoryFormat) -> Tensor<T> {
    let t = Tensor::from_vec(v.iter().map(|&x| T::from_f32(x)).collect(), shape).unwrap();
    if shape.len() >= 3 {
        t.to_format(fmt).unwrap()
    } else {
        t
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Batch,
    Instance,
    Group(usize),
    Layer(usize),
    Rms(usize),
}

/// Runs one op forward and backward through the functional API and the oracle; returns errors.
fn check_op<T: Element>(
    op: Op,
    shape: &[usize],
    fmt: MemoryFormat,
    mean: f32,
    seed: u64,
) -> Result<(), String> {
    let numel: usize = shape.iter().product();
    let xv = rounded::<T>(&randn(numel, seed, mean, 1.0));
    let gv = rounded::<T>(&randn(numel, seed + 1, 0.0, 1.0));
    let (n, c) = (shape[0], shape.get(1).copied().unwrap_or(1));
    let s: usize = shape.iter().skip(2).product();
    let (spec, nparams) = match op {
        Op::Batch => (Spec::planes(n, c, s, None), c),
        Op::Instance => (Spec::planes(n, c, s, Some(c)), c),
        Op::Group(g) => (Spec::planes(n, c, s, Some(g)), c),
        Op::Layer(cols) => (Spec::rows(numel / cols, cols, true), cols),
        Op::Rms(cols) => (Spec::rows(numel / cols, cols, false), cols),
    };
    let wv = randn(nparams, seed + 2, 1.0, 0.5);
    let bv = randn(nparams, seed + 3, 0.0, 0.5);
    let with_bias = !matches!(op, Op::Rms(_));
    let eps = 1e-5;
    let x = tensor::<T>(&xv, shape, fmt);
    let dy = tensor::<T>(&gv, shape, fmt);
    let pshape: Vec<usize> = match op {
        Op::Layer(cols) | Op::Rms(cols) => vec![cols],
        _ => vec![c],
    };
    let w = Tensor::from_vec(wv.clone(), &pshape).unwrap();
    let b = Tensor::from_vec(bv.clone(), &pshape).unwrap();
    let e = |e: Error| e.to_string();
    let (out, grads) = match op {
        Op::Batch => {
            let o = F::batch_norm(&x, None, None, Some(&w), Some(&b), true, 0.1, eps).map_err(e)?;
            let g = F::batch_norm_backward(&dy, &x, Some(&w), &o.stats).map_err(e)?;
            (o, g)
        }
        Op::Instance => {
            let o =
                F::instance_norm(&x, None, None, Some(&w), Some(&b), true, 0.1, eps).map_err(e)?;
            let g = F::instance_norm_backward(&dy, &x, Some(&w), &o.stats).map_err(e)?;
            (o, g)
        }
        Op::Group(gr) => {
            let o = F::group_norm(&x, gr, Some(&w), Some(&b), eps).map_err(e)?;
            let g = F::group_norm_backward(&dy, &x, gr, Some(&w), &o.stats).map_err(e)?;
            (o, g)
        }
        Op::Layer(cols) => {
            let o = F::layer_norm(&x, &[cols], Some(&w), Some(&b), eps).map_err(e)?;
            let g =
                F::layer_norm_backward(&dy, &x, &[cols], Some(&w), true, &o.stats).map_err(e)?;
            (o, g)
        }
        Op::Rms(cols) => {
            let o = F::rms_norm(&x, &[cols], Some(&w), Some(eps)).map_err(e)?;
            let g = F::rms_norm_backward(&dy, &x, &[cols], Some(&w), &o.stats).map_err(e)?;
            (o, g)
        }
    };
    let (wv64, bv64) = (to_f64(&wv), to_f64(&bv));
    let f = oracle::forward(
        &spec,
        &to_f64(&xv),
        Some(&wv64),
        with_bias.then_some(&bv64[..]),
        eps,
    );
    let bw = oracle::backward(&spec, &to_f64(&xv), &to_f64(&gv), Some(&wv64), &f);
    let (atol, rtol) = tol(T::DTYPE);
    // Saved statistics are f32; dx and dweight computed from them carry eps32·|mean|/std.
    let scale = 1.0 + mean.abs() as f64;
    let want_y: Vec<f32> = f.y.iter().map(|&v| T::from_f64(v).to_f32()).collect();
    let want_dx: Vec<f32> = bw.dx.iter().map(|&v| T::from_f64(v).to_f32()).collect();
    compare("y", &out.output.to_f32_vec().unwrap(), &want_y, atol, rtol)?;
    compare(
        "rstd",
        &out.stats.rstd().to_vec().unwrap(),
        &f32s(&f.rstd),
        1e-6,
        1e-6,
    )?;
    compare(
        "dx",
        &grads.dx.to_f32_vec().unwrap(),
        &want_dx,
        atol * scale,
        rtol,
    )?;
    // Parameter gradients sum over many elements: bound relative to the sum of magnitudes.
    let mag: f64 = gv.iter().map(|v| v.abs() as f64).sum::<f64>() / nparams as f64;
    let ptol = 1e-6 * mag.max(1.0) * scale;
    compare(
        "dweight",
        &grads.dweight.unwrap().to_vec().unwrap(),
        &f32s(&bw.dw),
        ptol,
        1e-6,
    )?;
    if with_bias {
        compare(
            "dbias",
            &grads.dbias.unwrap().to_vec().unwrap(),
            &f32s(&bw.db),
            ptol,
            1e-6,
        )?;
    }
    Ok(())
}

fn sweep<T: Element>() {
    let cases: Vec<(Op, Vec<usize>, f32)> = vec![
        (Op::Batch, vec![3, 5, 7, 11], 0.0),
        (Op::Batch, vec![2, 3, 300], 0.0), // channels-last: 600 rows > one piece
        (Op::Batch, vec![1, 2, 70_001], 0.0), // planes longer than one reduction piece
        (Op::Batch, vec![13, 1], 0.0),
        (Op::Batch, vec![2, 3, 2, 3, 5], 0.0),
        (Op::Instance, vec![2, 3, 17, 1], 0.0),
        (Op::Instance, vec![1, 4, 513], 0.0),
        (Op::Group(3), vec![2, 6, 9, 7], 0.0),
        (Op::Group(1), vec![3, 5, 2], 0.0),
        (Op::Group(2), vec![1, 4, 40, 40], 0.0),
        // Channels-last with 16 channels and more (the column kernels, 16 columns at a time,
        // and their tail), over a sample longer than one 256-row chunk, with one sample
        // (statistics across chunks) and several (each sample fused with its output).
        (Op::Batch, vec![3, 35, 9, 7], 0.0),
        (Op::Instance, vec![3, 16, 19, 19], 0.0),
        (Op::Group(5), vec![2, 40, 300], 0.0),
        (Op::Group(4), vec![1, 32, 300], 0.0),
        (Op::Layer(1), vec![7, 1], 0.0),
        (Op::Layer(31), vec![5, 31], 0.0),
        (Op::Layer(70_000), vec![2, 70_000], 0.0),
        (Op::Rms(3), vec![100, 3], 0.0),
        (Op::Rms(65_537), vec![2, 65_537], 0.0),
    ];
    let mut bad = Vec::new();
    for (k, (op, shape, mean)) in cases.iter().enumerate() {
        for fmt in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
            if let Err(e) = check_op::<T>(*op, shape, fmt, *mean, 100 + k as u64) {
                bad.push(format!("{op:?} {shape:?} {} {}: {e}", T::DTYPE, fmt.name()));
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn oracle_sweep_f32() {
    sweep::<f32>();
}

#[test]
fn oracle_sweep_f16() {
    sweep::<f16>();
}

#[test]
fn oracle_sweep_bf16() {
    sweep::<bf16>();
}

/// x = 1e4 + N(0, 1) in f32: E[x²] − E[x]² would lose every digit; the two-pass f64 statistics
/// must give forward outputs at the unscaled f32 tolerance.
#[test]
fn mean_1e4_has_no_cancellation() {
    let mut bad = Vec::new();
    let ops = [
        (Op::Batch, vec![4, 3, 25, 25]),
        (Op::Instance, vec![2, 3, 300]),
        (Op::Group(2), vec![2, 4, 5, 5]),
        // 16 channels and more: the column kernels (channels-last).
        (Op::Batch, vec![4, 19, 13, 13]),
        (Op::Group(4), vec![2, 32, 17, 17]),
        (Op::Layer(4099), vec![3, 4099]),
    ];
    for (op, shape) in ops {
        for fmt in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
            if let Err(e) = check_op::<f32>(op, &shape, fmt, 1e4, 7) {
                bad.push(format!("{op:?} {shape:?} {}: {e}", fmt.name()));
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// Every op forward and backward on `x` in its layout: BatchNorm, InstanceNorm and GroupNorm
/// with a per-channel weight (also the bias), LayerNorm without a weight (dβ only), RMSNorm
/// with a per-column weight; each op's output, dx and parameter gradients, as f32.
fn run_all<T: Element>(x: &Tensor<T>, dy: &Tensor<T>) -> Vec<Vec<f32>> {
    let c = x.shape()[1];
    let cols = *x.shape().last().unwrap();
    let w = Tensor::from_vec(randn(c, 5, 1.0, 0.3), &[c]).unwrap();
    let wr = Tensor::from_vec(randn(cols, 7, 1.0, 0.3), &[cols]).unwrap();
    let wp = Some(&w as &dyn Param);
    let mut out = Vec::new();
    let mut push = |o: NormOutput<T>, g: Gradients<T>| {
        let f32s = |t: Tensor<T>| t.to_vec().unwrap().iter().map(|v| v.to_f32()).collect();
        out.extend([f32s(o.output), f32s(g.dx)]);
        out.extend(
            [g.dweight, g.dbias]
                .into_iter()
                .flatten()
                .map(|p| p.to_vec().unwrap()),
        );
    };
    let o = F::batch_norm(x, None, None, wp, wp, true, 0.1, 1e-5).unwrap();
    let g = F::batch_norm_backward(dy, x, wp, &o.stats).unwrap();
    push(o, g);
    let o = F::instance_norm(x, None, None, wp, wp, true, 0.1, 1e-5).unwrap();
    let g = F::instance_norm_backward(dy, x, wp, &o.stats).unwrap();
    push(o, g);
    let o = F::group_norm(x, 2, wp, wp, 1e-5).unwrap();
    let g = F::group_norm_backward(dy, x, 2, wp, &o.stats).unwrap();
    push(o, g);
    let o = F::layer_norm(x, &[cols], None, None, 1e-5).unwrap();
    let g = F::layer_norm_backward(dy, x, &[cols], None, true, &o.stats).unwrap();
    push(o, g);
    let o = F::rms_norm(x, &[cols], Some(&wr), None).unwrap();
    let g = F::rms_norm_backward(dy, x, &[cols], Some(&wr), &o.stats).unwrap();
    push(o, g);
    out
}

#[test]
fn deterministic_across_calls_and_thread_counts() {
    // Over 128 K values, so that 3 threads really split the work (smaller inputs run in the
    // calling thread) while 1 thread runs it in order; 20 channels for the channels-last
    // column kernels; 6 samples, so that 8 threads take channels-last GroupNorm's unfused path
    // (fewer samples than threads) and 1 or 3 its per-sample fused one.
    let shape = [6, 20, 37, 29];
    let n: usize = shape.iter().product();
    for fmt in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
        let x = tensor::<f32>(&randn(n, 1, 0.5, 2.0), &shape, fmt);
        let dy = tensor::<f32>(&randn(n, 2, 0.0, 1.0), &shape, fmt);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| run_all(&x, &dy));
        let three = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap()
            .install(|| run_all(&x, &dy));
        let eight = rayon::ThreadPoolBuilder::new()
            .num_threads(8)
            .build()
            .unwrap()
            .install(|| run_all(&x, &dy));
        let again = run_all(&x, &dy);
        let bits = |v: &Vec<Vec<f32>>| v.iter().flatten().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&one), bits(&three), "1 vs 3 threads ({})", fmt.name());
        assert_eq!(bits(&one), bits(&eight), "1 vs 8 threads ({})", fmt.name());
        assert_eq!(bits(&one), bits(&again), "repeat ({})", fmt.name());
    }
}

#[test]
fn channels_last_equals_contiguous() {
    let shape = [3, 6, 7, 9];
    let n: usize = shape.iter().product();
    let xv = randn(n, 11, 0.0, 1.0);
    let gv = randn(n, 12, 0.0, 1.0);
    let a = run_all(
        &tensor::<f32>(&xv, &shape, MemoryFormat::Contiguous),
        &tensor(&gv, &shape, MemoryFormat::Contiguous),
    );
    let b = run_all(
        &tensor::<f32>(&xv, &shape, MemoryFormat::ChannelsLast),
        &tensor(&gv, &shape, MemoryFormat::ChannelsLast),
    );
    for (k, (u, v)) in a.iter().zip(&b).enumerate() {
        compare(&format!("output {k}"), v, u, 1e-6, 1e-6).unwrap();
    }
}

/// The bits of [`run_all`] in element type `T`, both layouts, on one input of 20 channels (the
/// column kernels and their tail) and 6 samples.
fn op_bits<T: Element>(out: &mut Vec<u32>) {
    let shape = [6, 20, 13, 11];
    let n: usize = shape.iter().product();
    for fmt in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
        let x = tensor::<T>(&randn(n, 1, 0.5, 2.0), &shape, fmt);
        let dy = tensor::<T>(&randn(n, 2, 0.0, 1.0), &shape, fmt);
        out.extend(run_all(&x, &dy).iter().flatten().map(|f| f.to_bits()));
    }
    // Rows of 300: RMSNorm's bf16/f16 sum of squares in f32 lanes (groups of 8 chunks of 16, a
    // partial group, a tail of 12).
    let x = tensor::<T>(
        &randn(5 * 300, 3, 0.5, 2.0),
        &[5, 300],
        MemoryFormat::Contiguous,
    );
    let dy = tensor::<T>(
        &randn(5 * 300, 4, 0.0, 1.0),
        &[5, 300],
        MemoryFormat::Contiguous,
    );
    let w = Tensor::from_vec(randn(300, 7, 1.0, 0.3), &[300]).unwrap();
    let o = F::rms_norm(&x, &[300], Some(&w), None).unwrap();
    let g = F::rms_norm_backward(&dy, &x, &[300], Some(&w), &o.stats).unwrap();
    for t in [o.output, g.dx] {
        out.extend(t.to_vec().unwrap().iter().map(|v| v.to_f32().to_bits()));
    }
}

/// [`op_bits`] of f32, bf16 and f16, as bytes.
fn standard_bits() -> Vec<u8> {
    let mut bits = Vec::new();
    op_bits::<f32>(&mut bits);
    op_bits::<bf16>(&mut bits);
    op_bits::<f16>(&mut bits);
    bits.iter().flat_map(|b| b.to_le_bytes()).collect()
}

/// Runs this test binary again with `CUNORM_CPU_ISA=isa` on the tests `names` (full names;
/// each must run and pass), with `every_instruction_set` among them checking that the child
/// runs that version and, with `bits_out`, writing [`standard_bits`] there.
fn run_with_isa(isa: &str, names: &[&str], bits_out: Option<&std::path::Path>) {
    run_child(isa, false, names, bits_out)
}

/// [`run_with_isa`], with `CUNORM_CPU_BF16=0` when `bf16_off` (the AVX-512 kernels without
/// AVX-512 BF16's rounding).
fn run_child(isa: &str, bf16_off: bool, names: &[&str], bits_out: Option<&std::path::Path>) {
    let me = "cpu_paths::every_instruction_set";
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(names)
        .arg(me)
        .args(["--exact", "--test-threads", "2"]);
    cmd.env("CUNORM_CPU_ISA", isa)
        .env("CUNORM_TEST_CHILD_ISA", isa);
    if bf16_off {
        cmd.env("CUNORM_CPU_BF16", "0");
    } else {
        cmd.env_remove("CUNORM_CPU_BF16");
    }
    match bits_out {
        Some(p) => cmd.env("CUNORM_TEST_BITS_OUT", p),
        None => cmd.env_remove("CUNORM_TEST_BITS_OUT"),
    };
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the tests {names:?} failed with CUNORM_CPU_ISA={isa}:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Each test must have run (a misspelt name would pass on zero tests).
    for name in names.iter().chain([&me]) {
        assert!(
            text.contains(&format!("test {name} ... ok")),
            "{name} did not run:\n{text}"
        );
    }
}

/// Each CPU kernel version this machine has (AVX-512, AVX2, baseline; see
/// `cunorm::cpu_instruction_set`) passes the oracle sweeps and the mean-1e4 test in a child
/// process capped with `CUNORM_CPU_ISA` (which checks that it runs that version), and the AVX2
/// version gives the AVX-512 version's bits on every op, forward and backward, in f32, bf16
/// and f16, both layouts (the same per-element arithmetic, the reductions in the same lanes and
/// order).
#[test]
fn every_instruction_set() {
    if let Some(isa) = std::env::var_os("CUNORM_TEST_CHILD_ISA") {
        // A child: it must run the version it was asked for, and report its bits if asked.
        assert_eq!(cunorm::cpu_instruction_set(), isa.to_str().unwrap());
        if std::env::var_os("CUNORM_CPU_BF16").is_some_and(|v| v == "0") {
            assert!(!cunorm::cpu_bf16_rounding_in_hardware());
        }
        if let Some(path) = std::env::var_os("CUNORM_TEST_BITS_OUT") {
            std::fs::write(path, standard_bits()).unwrap();
        }
        return;
    }
    let sweeps = [
        "cpu_paths::oracle_sweep_f32",
        "cpu_paths::oracle_sweep_bf16",
        "cpu_paths::oracle_sweep_f16",
        "cpu_paths::mean_1e4_has_no_cancellation",
    ];
    match cunorm::cpu_instruction_set() {
        "avx512" => {
            let own = standard_bits();
            let path = std::env::temp_dir().join(format!("cunorm-bits-{}", std::process::id()));
            // AVX2; and, where this process rounds bf16 with AVX-512 BF16, AVX-512 without it.
            let mut children = vec![("avx2", false, "AVX2")];
            if cunorm::cpu_bf16_rounding_in_hardware() {
                children.push(("avx512", true, "AVX-512 without BF16"));
            }
            for (isa, bf16_off, what) in children {
                run_child(isa, bf16_off, &sweeps, Some(&path));
                let child = std::fs::read(&path).unwrap();
                let _ = std::fs::remove_file(&path);
                assert!(
                    child.len() == own.len() && !own.is_empty(),
                    "no bits from the child"
                );
                let first = own.iter().zip(&child).position(|(a, b)| a != b);
                assert_eq!(
                    first, None,
                    "{what} and AVX-512 outputs differ (first byte differing)"
                );
            }
        }
        "avx2" => eprintln!("no AVX-512 on this CPU: its kernels are not run"),
        _ => eprintln!("baseline CPU (or CUNORM_CPU_ISA=baseline): only its kernels run"),
    }
    if cunorm::cpu_instruction_set() != "baseline" {
        run_with_isa("baseline", &sweeps, None);
    }
}

/// Every op forward and backward over NaN-filled buffers taken from the buffer cache gives the
/// bits of fresh buffers: no element is left unwritten. `batch` makes the tensor 32 MiB of `T`
/// (the size from which the elements of a dropped tensor are kept for reuse).
fn reused_buffers_written_in_full<T: Element>(batch: usize) {
    if std::env::var("CUNORM_CPU_CACHE_MB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|mb| mb < 32)
    {
        eprintln!("skipped: CUNORM_CPU_CACHE_MB keeps no 32 MiB buffer");
        return;
    }
    let shape = [batch, 16, 512, 512];
    let n: usize = shape.iter().product();
    let nan = T::from_f32(f32::NAN);
    let poison = || drop(Tensor::from_vec(vec![nan; n], &shape).unwrap());
    empty_cpu_cache();
    poison();
    assert!(
        empty_cpu_cache() >= n * std::mem::size_of::<T>(),
        "a dropped 32 MiB tensor is kept"
    );
    let w = Tensor::from_vec(randn(16, 5, 1.0, 0.3), &[16]).unwrap();
    let wr = Tensor::from_vec(randn(512, 7, 1.0, 0.3), &[512]).unwrap();
    let wp = Some(&w as &dyn Param);
    for fmt in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
        let x = tensor::<T>(&randn(n, 1, 0.5, 2.0), &shape, fmt);
        let dy = tensor::<T>(&randn(n, 2, 0.0, 1.0), &shape, fmt);
        for op in ["batch", "instance", "group", "layer", "rms"] {
            // The output and dx's bits (physical order), each op forward then backward.
            let run = || -> Vec<u32> {
                let (o, g) = match op {
                    "batch" => {
                        let o = F::batch_norm(&x, None, None, wp, wp, true, 0.1, 1e-5).unwrap();
                        let g = F::batch_norm_backward(&dy, &x, wp, &o.stats).unwrap();
                        (o, g)
                    }
                    "instance" => {
                        let o = F::instance_norm(&x, None, None, wp, wp, true, 0.1, 1e-5).unwrap();
                        let g = F::instance_norm_backward(&dy, &x, wp, &o.stats).unwrap();
                        (o, g)
                    }
                    "group" => {
                        let o = F::group_norm(&x, 4, wp, wp, 1e-5).unwrap();
                        let g = F::group_norm_backward(&dy, &x, 4, wp, &o.stats).unwrap();
                        (o, g)
                    }
                    "layer" => {
                        let o = F::layer_norm(&x, &[512], Some(&wr), None, 1e-5).unwrap();
                        let g = F::layer_norm_backward(&dy, &x, &[512], Some(&wr), true, &o.stats)
                            .unwrap();
                        (o, g)
                    }
                    _ => {
                        let o = F::rms_norm(&x, &[512], Some(&wr), None).unwrap();
                        let g = F::rms_norm_backward(&dy, &x, &[512], Some(&wr), &o.stats).unwrap();
                        (o, g)
                    }
                };
                let bits = |t: &Tensor<T>| {
                    t.to_vec_physical()
                        .unwrap()
                        .into_iter()
                        .map(|v| v.to_f32().to_bits())
                };
                bits(&o.output).chain(bits(&g.dx)).collect()
            };
            empty_cpu_cache();
            let fresh = run();
            // Two NaN buffers in the cache: the output and dx are written over them.
            empty_cpu_cache();
            poison();
            poison();
            let reused = run();
            assert!(
                fresh == reused,
                "{op} ({}): an element left unwritten",
                fmt.name()
            );
            assert!(fresh.iter().all(|&b| f32::from_bits(b).is_finite()));
        }
    }
    empty_cpu_cache();
}

#[test]
fn outputs_over_reused_buffers_are_written_in_full() {
    reused_buffers_written_in_full::<f32>(2);
    // bf16: the 32-at-a-time rounding of AVX-512 BF16 where the CPU has it.
    reused_buffers_written_in_full::<bf16>(4);
}
