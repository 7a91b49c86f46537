//! Writes the tune-side inputs of the example report (reports/example/input/) from real CPU probes of
//! the tiny model: calibrates the cost model on the probes memtune plans for itself, judges it on
//! held-out probes it was not fitted to (`accuracy.csv`), searches the space under a budget
//! (`candidates.csv`, `tuned.toml`) and prints the pick's flags for `memtune profile`.
//! The profile and timeline CSVs come from the `memtune profile` binary (see reports/example/make.sh).
//!
//!     cargo run --example report_inputs -- reports/example/input 48M

use anyhow::{Context, Result};
use memtune::config::{Hyper, Knobs, Method};
use memtune::cost::{Prober, calibrate, evaluate, holdout_plan};
use memtune::probe::ProbeResult;
use memtune::probe::meter::CpuMeter;
use memtune::probe::runner::{ProbeRequest, run_probe};
use memtune::report::data::{AccuracyRow, accuracy_csv};
use memtune::search::{
    PolicyRequest, SearchSpace, TunedConfig, parse_bytes, search, write_candidates_csv,
    write_tuned_toml,
};
use memtune::spec::ModelSpec;
use std::path::PathBuf;

/// Real probes on the CPU, exactly as `memtune profile` runs them.
struct CpuProber;

impl Prober for CpuProber {
    fn probe(&mut self, spec: &ModelSpec, knobs: &Knobs) -> Result<ProbeResult> {
        run_probe(
            &ProbeRequest {
                spec: spec.clone(),
                knobs: knobs.clone(),
                warmup_steps: 1,
                steps: 2,
                device: candle_core::Device::Cpu,
                seed: 0,
            },
            &CpuMeter::new(),
        )
    }

    fn device(&self) -> String {
        "cpu".to_string()
    }
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "reports/example/input".into()),
    );
    let budget = parse_bytes(&args.next().unwrap_or_else(|| "48M".into()))?;
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;

    let spec = ModelSpec::tiny();
    let space = SearchSpace::from_request(&PolicyRequest {
        effective_batch: 8,
        seq: 256,
        ..PolicyRequest::default()
    })?;
    let mut prober = CpuProber;
    let model = calibrate(&spec, &space, &mut prober, None, &mut |p| {
        eprintln!("[{}/{}] {}", p.done, p.total, p.label)
    })?;

    // Held out: the full depth, the search's sequence length and a larger batch than any fitted probe.
    let mut held_out = Vec::new();
    for (probe_spec, knobs) in holdout_plan(&spec, &space, spec.num_hidden_layers, 256, 2) {
        eprintln!(
            "held-out probe: {}",
            memtune::cost::probe_label(&probe_spec, &knobs)
        );
        held_out.push(prober.probe(&probe_spec, &knobs)?);
    }
    let evaluation = evaluate(&model, &held_out);
    std::fs::write(
        out.join("accuracy.csv"),
        accuracy_csv(&AccuracyRow::from_evaluation(&evaluation))?,
    )?;

    let outcome = search(&model, &spec, &space, budget, 0.1);
    write_candidates_csv(&out.join("candidates.csv"), &outcome)?;
    if let Some(tuned) = TunedConfig::from_outcome("tiny", &outcome, Hyper::default()) {
        write_tuned_toml(&out.join("tuned.toml"), &tuned)?;
        let k = &tuned.knobs;
        // Flags for `memtune profile`, so the pick is measured too.
        println!(
            "--method {} {}--precision {} --checkpointing {} --batch {} --accum {} --seq {} --optimizer {} --loss {}",
            k.method,
            if k.method == Method::Full {
                String::new()
            } else {
                format!("--rank {} ", k.lora.rank)
            },
            k.precision,
            k.checkpointing,
            k.batch,
            k.accum,
            k.seq,
            k.optimizer,
            k.loss
        );
    }
    eprintln!(
        "median |error| {:.1}%, worst {:.1}% over {} held-out probes; {} of {} configurations fit",
        100.0 * evaluation.median_peak_error,
        100.0 * evaluation.worst_peak_error,
        evaluation.rows.len(),
        outcome.fitting,
        outcome.candidates.len()
    );
    Ok(())
}
