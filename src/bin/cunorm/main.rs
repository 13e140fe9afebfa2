//! The cunorm command line: `demo`, `info`, `check`, `bench`, `cpu-bench`, `kernels`.

use std::process::ExitCode;

mod bench;
mod cpu_bench;
mod traffic;
// Parts of these are used only by the test suite (tests/suite/main.rs includes them).
#[allow(dead_code)]
mod check;
#[allow(dead_code)]
mod demo;

use clap::{Parser, Subcommand, ValueEnum};
use cunorm::cuda::nvrtc;
use cunorm::Device;

#[derive(Parser)]
#[command(
    name = "cunorm",
    version,
    about = "PyTorch-exact normalization layers on CPU and CUDA"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    /// CUDA when usable, else the CPU (with the reason printed)
    Auto,
    Cpu,
    Cuda,
}

#[derive(Subcommand)]
enum Command {
    /// Run the seed notebook's experiment (BatchNorm2d, LayerNorm, InstanceNorm2d, GroupNorm)
    Demo {
        /// Number of training steps
        #[arg(long, default_value_t = 1000)]
        steps: usize,
        /// Random seed of the inputs
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Where to run
        #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
        device: DeviceArg,
        /// Print one JSON object instead of text
        #[arg(long)]
        json: bool,
    },
    /// Say which backends are usable and, if CUDA is not, why
    Info,
    /// Compare every CUDA op with the CPU path and print a table (op, dtype, format, shape,
    /// max abs error, rel L2, pass/fail); exits non-zero on any failure
    Check {
        /// Leave out the largest shapes
        #[arg(long)]
        quick: bool,
    },
    /// Time every CUDA op × dtype × format × stage over the standard shapes (CUDA events, L2
    /// flushed, median), with bandwidth as a share of a device-to-device copy
    Bench {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
        /// Also write the JSON to this file (one run gives both the table and the JSON)
        #[arg(long)]
        json_out: Option<std::path::PathBuf>,
        /// PyTorch timings from benches/torch_compare.py, to add the PyTorch/cunorm ratio
        #[arg(long)]
        compare: Option<std::path::PathBuf>,
        /// Only the first shape of each op
        #[arg(long)]
        quick: bool,
        /// Timed runs per case
        #[arg(long, default_value_t = 20)]
        reps: usize,
        /// Only these ops (layer_norm, rms_norm, group_norm, batch_norm, instance_norm)
        #[arg(long, value_delimiter = ',', value_parser = ["layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm"])]
        ops: Vec<String>,
        /// Only these standard shapes, written as 1024x65536 (comma-separated)
        #[arg(long, value_delimiter = ',')]
        shapes: Vec<String>,
        /// Count each stage's DRAM traffic instead of timing it (the fake CUDA driver's traffic
        /// build only: scripts/fake-cuda/traffic.sh)
        #[arg(long)]
        traffic: bool,
        /// With --traffic: scale shapes down along N to at most this many elements (at least
        /// 2^20, so that the tensors stay above the 1 MiB counting threshold)
        #[arg(long, default_value_t = 1 << 22)]
        traffic_cap: usize,
    },
    /// Time CPU cases listed in a JSON file (written by benches/cpu_compare.py) and print
    /// `{key: {threads: median ms}}` as JSON: the cunorm side of the PyTorch CPU comparison
    CpuBench {
        /// The case list
        #[arg(long)]
        cases: std::path::PathBuf,
        /// Worker threads (rayon's global pool; one count per process), at least 1
        #[arg(long, default_value_t = 1, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
        threads: usize,
        /// Timed runs per case (after two warm-up runs)
        #[arg(long, default_value_t = 10)]
        reps: usize,
    },
    /// Compile every kernel module with NVRTC (no GPU needed) and write the PTX of each to a
    /// folder, for ptxas reports
    Kernels {
        /// Target architecture
        #[arg(long, default_value = "sm_90")]
        arch: String,
        /// Where to write <module>.ptx and <module>.cubin
        #[arg(long)]
        ptx_dir: Option<std::path::PathBuf>,
    },
}

fn pick_device(arg: DeviceArg, quiet: bool) -> cunorm::Result<Device> {
    match arg {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Cuda => Device::cuda(0),
        DeviceArg::Auto => {
            let (dev, reason) = Device::auto();
            if let Some(r) = reason {
                if !quiet {
                    // One line: the reason's first sentence carries the fix.
                    let first = r.lines().next().unwrap_or_default();
                    eprintln!("cunorm: running on the CPU: {first}");
                }
            }
            Ok(dev)
        }
    }
}

fn run(cli: Cli) -> cunorm::Result<()> {
    match cli.command {
        Command::Demo {
            steps,
            seed,
            device,
            json,
        } => {
            let dev = pick_device(device, false)?;
            // The demo's ops run in f32: compile their modules side by side, not one after
            // another, and not the f16/bf16 ones.
            dev.warm_up_dtypes(&[cunorm::DType::F32])?;
            let report = demo::run(steps, seed, &dev)?;
            if json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.to_text());
            }
        }
        Command::Info => {
            println!("cunorm {}", env!("CARGO_PKG_VERSION"));
            println!(
                "cpu: usable ({} threads, {} kernels{})",
                rayon::current_num_threads(),
                cunorm::cpu_instruction_set(),
                if cunorm::cpu_bf16_rounding_in_hardware() {
                    ", bf16 rounded by AVX-512 BF16"
                } else {
                    ""
                }
            );
            match nvrtc::nvrtc_version() {
                Ok((a, b)) => println!("nvrtc: {a}.{b}"),
                Err(e) => println!("nvrtc: not usable: {e}"),
            }
            if let Some(d) = nvrtc::cache_dir() {
                println!(
                    "kernel cache: {} (sources {:016x})",
                    d.display(),
                    nvrtc::source_hash()
                );
            }
            match Device::cuda(0) {
                Ok(Device::Cuda(d)) => println!(
                    "cuda: usable, {} ({}, {} SMs)",
                    Device::Cuda(d.clone()).describe(),
                    d.arch(),
                    d.sm_count()
                ),
                Ok(_) => {}
                Err(e) => println!("cuda: not usable: {e}"),
            }
        }
        Command::Check { quick } => {
            let Device::Cuda(dev) = Device::cuda(0)? else {
                return Err(cunorm::Error::Unavailable("no CUDA device".into()));
            };
            println!("device: {}", Device::Cuda(dev.clone()).describe());
            let rows = check::sweep(&dev, quick)?;
            print!("{}", check::table(&rows));
            let failed = rows.iter().filter(|r| !r.pass).count();
            println!("{} comparisons, {failed} failed", rows.len());
            if failed > 0 {
                return Err(cunorm::Error::InvalidArgument(format!(
                    "{failed} CUDA-vs-CPU comparisons failed"
                )));
            }
        }
        Command::Bench {
            json,
            json_out,
            compare,
            quick,
            reps,
            ops,
            shapes,
            traffic,
            traffic_cap,
        } => {
            let Device::Cuda(dev) = Device::cuda(0)? else {
                return Err(cunorm::Error::Unavailable("no CUDA device".into()));
            };
            let name = Device::Cuda(dev.clone()).describe();
            let opts = bench::BenchOptions {
                reps,
                ops,
                quick,
                shapes,
                traffic: traffic.then_some(traffic_cap.max(1)),
                ..Default::default()
            };
            let (copy, mut rows) = bench::run(&dev, &opts)?;
            if let Some(path) = compare {
                let text = std::fs::read_to_string(&path)?;
                let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                    cunorm::Error::InvalidArgument(format!(
                        "{}: not JSON from torch_compare.py: {e}",
                        path.display()
                    ))
                })?;
                bench::attach_torch(&mut rows, &v);
            }
            let report = bench::to_json(copy, &name, &rows);
            if let Some(path) = json_out {
                std::fs::write(&path, format!("{report:#}\n"))?;
            }
            if json {
                println!("{report}");
            } else if traffic {
                print!("{}", bench::traffic_table(&name, &rows));
            } else {
                print!("{}", bench::table(copy, &name, &rows));
            }
        }
        Command::CpuBench {
            cases,
            threads,
            reps,
        } => {
            let text = std::fs::read_to_string(&cases)?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                cunorm::Error::InvalidArgument(format!("{}: not JSON: {e}", cases.display()))
            })?;
            let list = cpu_bench::parse_cases(&v)?;
            println!("{}", cpu_bench::run(&list, threads, reps)?);
        }
        Command::Kernels { arch, ptx_dir } => {
            for module in nvrtc::module_names() {
                let src = nvrtc::module_source(module).unwrap_or_default();
                let out = nvrtc::compile(module, &src, &arch)?;
                println!(
                    "{module}: compiled for {arch}, {} bytes of CUBIN",
                    out.cubin.len()
                );
                if let Some(dir) = &ptx_dir {
                    std::fs::create_dir_all(dir)?;
                    std::fs::write(dir.join(format!("{module}.ptx")), out.ptx)?;
                    std::fs::write(dir.join(format!("{module}.cubin")), out.cubin)?;
                }
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    // `cunorm info | head` should end quietly like any Unix tool, not panic on a closed pipe.
    #[cfg(target_os = "linux")]
    // SAFETY: restores the default SIGPIPE disposition before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cunorm: error: {e}");
            ExitCode::FAILURE
        }
    }
}
