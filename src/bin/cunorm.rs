//! The cunorm command line: `demo`, `info`, `check`, `bench`.

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
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
}

fn pick_device(arg: DeviceArg, quiet: bool) -> cunorm::Result<Device> {
    match arg {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Cuda => Device::cuda(0),
        DeviceArg::Auto => {
            let (dev, reason) = Device::auto();
            if let Some(r) = reason {
                if !quiet {
                    eprintln!("cunorm: running on the CPU: {r}");
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
            let report = cunorm::demo::run(steps, seed, &dev)?;
            if json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.to_text());
            }
        }
        Command::Info => {
            println!("cunorm {}", env!("CARGO_PKG_VERSION"));
            println!("cpu: usable ({} threads)", rayon::current_num_threads());
            match Device::cuda(0) {
                Ok(d) => println!("cuda: usable, {}", d.describe()),
                Err(e) => println!("cuda: not usable: {e}"),
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cunorm: error: {e}");
            ExitCode::FAILURE
        }
    }
}
