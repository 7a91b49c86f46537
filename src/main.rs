//! The `memtune` binary: parse, dispatch, print the error chain, exit non-zero on failure.

use clap::Parser;
use memtune::cli::{Cli, Command};
use std::process::ExitCode;

fn main() -> ExitCode {
    // SAFETY: first thing in main, before any thread starts.
    unsafe { memtune::engine::configure_cpu_runtime() };
    let cli = Cli::parse();
    match memtune::engine::on_rayon_worker(move || run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Models { json } => memtune::commands::models(json),
        Command::Train(args) => memtune::commands::train(&args),
        Command::Profile(args) => memtune::commands::profile(&args),
        Command::Predict(args) => memtune::commands::predict(&args),
        Command::Tune(args) => memtune::commands::tune(&args),
        Command::Report(args) => memtune::commands::report(&args),
        Command::Generate(args) => memtune::commands::generate(&args),
        Command::Gpus { json } => memtune::commands::gpus(json),
    }
}
