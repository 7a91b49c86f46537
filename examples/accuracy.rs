//! Prediction accuracy: the cost model, calibrated on its own short reduced-depth probes, against
//! real full-depth probes it was not fitted on — and the closed-form estimators people use today
//! (../shared/peer/estimators.py) on the same configurations.
//!
//!     cargo build --release --examples
//!     target/release/examples/accuracy [--quick] [--peer ../shared/peer] [--cache DIR]
//!
//! Prints a markdown table (one row per held-out configuration) and the median / worst absolute
//! error of memtune's prediction and of each estimator.

use memtune::config::{
    Checkpointing, Knobs, LoraSettings, LossMode, Method, OptimizerKind, Precision, Quant,
};
use memtune::cost::{Prober, calibrate};
use memtune::probe::meter::CpuMeter;
use memtune::probe::runner::{EngineProber, ProbeRequest, run_probe};
use memtune::search::{PolicyRequest, SearchSpace};
use memtune::spec::catalog;
use std::path::PathBuf;
use std::process::Command;

struct Case {
    method: Method,
    precision: Precision,
    checkpointing: Checkpointing,
    loss: LossMode,
    optimizer: OptimizerKind,
    quant: Quant,
    batch: usize,
    accum: usize,
    seq: usize,
}

fn case(
    method: Method,
    precision: Precision,
    checkpointing: Checkpointing,
    loss: LossMode,
    batch: usize,
    seq: usize,
) -> Case {
    Case {
        method,
        precision,
        checkpointing,
        loss,
        optimizer: OptimizerKind::Adamw,
        quant: Quant::Q4,
        batch,
        accum: 1,
        seq,
    }
}

fn knobs(c: &Case) -> Knobs {
    Knobs {
        method: c.method,
        lora: LoraSettings::default(),
        quant: c.quant,
        precision: c.precision,
        checkpointing: c.checkpointing,
        batch: c.batch,
        accum: c.accum,
        seq: c.seq,
        optimizer: c.optimizer,
        loss: c.loss,
    }
}

/// The distinct values of one knob across `cases`.
fn values<T: PartialEq + Copy>(cases: &[Case], f: impl Fn(&Case) -> T) -> Vec<T> {
    let mut out: Vec<T> = Vec::new();
    for c in cases {
        if !out.contains(&f(c)) {
            out.push(f(c));
        }
    }
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// Relative errors of the peer's estimators a–e, parsed from its CLI output.
fn estimators(
    peer: &std::path::Path,
    spec: &memtune::spec::ModelSpec,
    k: &Knobs,
    measured: u64,
) -> Vec<(String, f64)> {
    let trainable = memtune::cost::exact::trainable_params(spec, k);
    let dtype_bytes = if k.precision == Precision::Fp32 { 4 } else { 2 };
    let mut cmd = Command::new("python3");
    cmd.arg(peer.join("estimators.py")).args([
        "--params",
        &(spec.param_count()
            + if k.method == Method::Full {
                0
            } else {
                trainable
            })
        .to_string(),
        "--trainable",
        &trainable.to_string(),
        "--dtype-bytes",
        &dtype_bytes.to_string(),
        "--batch",
        &k.batch.to_string(),
        "--seq",
        &k.seq.to_string(),
        "--hidden",
        &spec.hidden_size.to_string(),
        "--layers",
        &spec.num_hidden_layers.to_string(),
        "--heads",
        &spec.num_attention_heads.to_string(),
        "--vocab",
        &spec.vocab_size.to_string(),
        "--measured-bytes",
        &measured.to_string(),
    ]);
    if matches!(k.precision, Precision::Bf16 | Precision::Fp16) {
        cmd.arg("--mixed-precision");
    }
    if k.checkpointing != Checkpointing::None {
        cmd.arg("--checkpointing");
    }
    let Ok(out) = cmd.output() else { return vec![] };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let name = l.split_whitespace().next()?.to_string();
            let err = l
                .split("rel.err")
                .nth(1)?
                .trim()
                .trim_end_matches('%')
                .parse::<f64>()
                .ok()?;
            Some((name, err / 100.0))
        })
        .collect()
}

/// Per segment kind: the mean measured delta and excess of the full-depth run against the replay's.
fn print_segments(model: &memtune::cost::CostModel, measured: &memtune::probe::ProbeResult) {
    use memtune::cost::segments::observations;
    let mib = |v: f64| v / 1048576.0;
    let Some(obs) = observations(measured) else {
        return;
    };
    let replay = model
        .segments
        .replay(&measured.spec, &measured.knobs)
        .unwrap_or_default();
    let mut kinds: Vec<_> = obs.iter().map(|o| o.kind).collect();
    kinds.dedup();
    kinds.sort();
    kinds.dedup();
    eprintln!("  segment: measured delta/excess MiB | replayed delta/excess MiB");
    for kind in kinds {
        let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let m: Vec<_> = obs.iter().filter(|o| o.kind == kind).collect();
        let r: Vec<_> = replay.iter().filter(|o| o.kind == kind).collect();
        eprintln!(
            "  {:>22} ×{:<3}: {:>9.2} {:>9.2} | {:>9.2} {:>9.2}",
            kind.name(),
            m.len(),
            mib(mean(m.iter().map(|o| o.delta).collect())),
            mib(mean(m.iter().map(|o| o.excess.unwrap_or(0.0)).collect())),
            mib(mean(r.iter().map(|o| o.delta).collect())),
            mib(mean(r.iter().map(|o| o.excess).collect())),
        );
    }
}

/// A held-out full-depth run, reused from `cache` when it holds one for the same configuration and
/// the same engine (the engine's bytes are deterministic; calibration changes do not change them,
/// but engine changes do, and they bump the cost model's version).
fn measured_run(
    req: &ProbeRequest,
    meter: &CpuMeter,
    cache: Option<&std::path::Path>,
) -> anyhow::Result<memtune::probe::ProbeResult> {
    let label = format!(
        "{} {}",
        req.spec.name,
        memtune::cost::calibrate::probe_label(&req.spec, &req.knobs)
    );
    let path = cache.map(|dir| {
        let key = format!("{} {label}", memtune::cost::version());
        let hash = memtune::cost::fnv1a(key.as_bytes());
        dir.join(format!("heldout-{hash:016x}.json"))
    });
    if let Some(text) = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok())
        && let Ok(result) = serde_json::from_str::<memtune::probe::ProbeResult>(&text)
        && result.spec == req.spec
        && result.knobs == req.knobs
    {
        eprintln!("{label}: measured run reused from the cache");
        return Ok(result);
    }
    let result = run_probe(req, meter)?;
    if let Some(p) = &path {
        memtune::cost::calibrate::write_atomic(p, &serde_json::to_vec(&result)?)?;
    }
    Ok(result)
}

fn main() -> anyhow::Result<()> {
    // SAFETY: first thing in main, before any thread starts.
    unsafe { memtune::engine::configure_cpu_runtime() };
    memtune::engine::on_rayon_worker(run)
}

fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let arg = |name: &str| args.windows(2).find(|w| w[0] == name).map(|w| w[1].clone());
    let peer = PathBuf::from(arg("--peer").unwrap_or_else(|| "../shared/peer".into()));
    let cache = arg("--cache").map(PathBuf::from);
    // `--only MODEL` runs one model's cases; `--segments` prints each segment kind's measured and
    // predicted figures (what the replay got wrong, when a prediction misses).
    let only = arg("--only");
    let show_segments = args.iter().any(|a| a == "--segments");
    use Checkpointing::{Every, Full as Ckpt, None as NoCkpt};
    use LossMode::{Chunked, Full as FullLoss};
    use Method::{Full, Lora, Qlora};
    use Precision::{Bf16, Fp16, Fp32};
    let mut plan: Vec<(&str, Vec<Case>)> = vec![
        (
            "HuggingFaceTB/SmolLM2-135M",
            vec![
                case(Lora, Fp32, NoCkpt, Chunked, 1, 256),
                case(Lora, Bf16, Ckpt, Chunked, 2, 256),
                case(Full, Fp32, NoCkpt, Chunked, 1, 128),
                Case {
                    quant: Quant::Q4,
                    ..case(Qlora, Fp32, Every(2), FullLoss, 1, 256)
                },
                Case {
                    optimizer: OptimizerKind::Adamw8bit,
                    accum: 2,
                    ..case(Full, Bf16, Ckpt, Chunked, 1, 256)
                },
                // A trained head's loss over several chunks (2,048 rows, 341 a chunk): cost
                // model 34 predicted it 40% high.
                case(Full, Bf16, NoCkpt, Chunked, 4, 512),
            ],
        ),
        (
            "Qwen/Qwen2.5-0.5B",
            vec![
                case(Lora, Fp32, NoCkpt, Chunked, 1, 256),
                case(Lora, Fp32, Ckpt, FullLoss, 2, 256),
                Case {
                    quant: Quant::Q8,
                    ..case(Qlora, Bf16, NoCkpt, Chunked, 1, 128)
                },
                // bf16 with the full loss at 512 tokens: the head peaks at its logits-sized
                // gradients, not (as at probe sizes) at the widened vocabulary matrix.
                case(Lora, Bf16, NoCkpt, FullLoss, 2, 256),
                // Five chunks of Qwen's 110 rows: cost model 34 predicted it 36% high.
                case(Full, Bf16, NoCkpt, Chunked, 2, 256),
            ],
        ),
        (
            "HuggingFaceTB/SmolLM2-360M",
            vec![
                case(Lora, Fp32, Every(2), Chunked, 1, 256),
                Case {
                    accum: 2,
                    ..case(Lora, Fp16, NoCkpt, Chunked, 1, 128)
                },
            ],
        ),
    ];
    if quick {
        plan.truncate(1);
        plan[0].1.truncate(2);
    }
    if let Some(only) = &only {
        plan.retain(|(name, _)| name == only);
    }
    let meter = CpuMeter::new();
    let mut ours = Vec::new();
    let mut steps = Vec::new();
    let mut theirs: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    println!(
        "| model | layers | config | measured peak MiB | predicted MiB | error | best closed-form (error) | step s measured / predicted |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, cases) in &plan {
        let spec = catalog::get(name)?;
        let request = PolicyRequest {
            methods: Some(values(cases, |c| c.method)),
            quants: Some(values(cases, |c| c.quant)),
            optimizers: Some(values(cases, |c| c.optimizer)),
            precisions: Some(values(cases, |c| c.precision)),
            checkpointing: Some(values(cases, |c| c.checkpointing)),
            losses: Some(values(cases, |c| c.loss)),
            ..PolicyRequest::default()
        };
        let space = SearchSpace::from_request(&request)?;
        let mut prober = EngineProber {
            device: candle_core::Device::Cpu,
            meter: &meter,
            warmup_steps: 0,
            steps: 1,
            seed: 0,
        };
        let started = std::time::Instant::now();
        let model = calibrate(&spec, &space, &mut prober, cache.as_deref(), &mut |_| {})?;
        eprintln!(
            "{name}: calibrated on {} probes in {:.1} s ({})",
            model.fitted_on.len(),
            started.elapsed().as_secs_f64(),
            prober.device()
        );
        for c in cases {
            let k = knobs(c);
            let predicted = model.predict(&spec, &k);
            let req = ProbeRequest {
                spec: spec.clone(),
                knobs: k.clone(),
                warmup_steps: 1,
                steps: 1,
                device: candle_core::Device::Cpu,
                seed: 0,
            };
            let measured = measured_run(&req, &meter, cache.as_deref())?;
            if show_segments {
                print_segments(&model, &measured);
            }
            let err = (predicted.peak_bytes as f64 - measured.peak_bytes as f64)
                / measured.peak_bytes as f64;
            ours.push(err.abs());
            let step_err = predicted.step_s / measured.step_s - 1.0;
            steps.push(step_err.abs());
            let est = estimators(&peer, &spec, &k, measured.peak_bytes);
            for (n, e) in &est {
                theirs.entry(n.clone()).or_default().push(e.abs());
            }
            let best = est.iter().min_by(|a, b| a.1.abs().total_cmp(&b.1.abs()));
            println!(
                "| {} | {} | {} {} ckpt {} {} loss {} b{}×{} accum {} | {:.1} | {:.1} | {:+.2}% | {} | {:.2} / {:.2} ({:+.0}%) |",
                name,
                spec.num_hidden_layers,
                k.method,
                k.precision,
                k.checkpointing,
                k.optimizer,
                k.loss,
                k.batch,
                k.seq,
                k.accum,
                measured.peak_bytes as f64 / 1048576.0,
                predicted.peak_bytes as f64 / 1048576.0,
                100.0 * err,
                best.map(|(n, e)| format!("{n} {:+.1}%", 100.0 * e))
                    .unwrap_or_else(|| "—".into()),
                measured.step_s,
                predicted.step_s,
                100.0 * step_err,
            );
        }
    }
    println!();
    println!("| predictor | median abs error | worst abs error |");
    println!("|---|---|---|");
    let worst = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    println!(
        "| memtune (fitted to its own probes) | {:.2}% | {:.2}% |",
        100.0 * median(ours.clone()),
        100.0 * worst(&ours)
    );
    println!(
        "| memtune step time (same runs; the CPU is shared and noisy) | {:.1}% | {:.1}% |",
        100.0 * median(steps.clone()),
        100.0 * worst(&steps)
    );
    for (n, v) in &theirs {
        println!(
            "| {n} | {:.1}% | {:.1}% |",
            100.0 * median(v.clone()),
            100.0 * worst(v)
        );
    }
    Ok(())
}
