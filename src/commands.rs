//! What each subcommand does with its validated request: run the stage, print for people (tables,
//! progress on stderr) or for programs (`--json` on stdout).

use crate::cli::GenerateArgs;
use crate::cli::{ProfileArgs, ReportArgs, TrainArgs};
use crate::probe::{COMPONENT_NAMES, ProbeResult};
use crate::spec::catalog_rows;
use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};

/// `memtune models`.
pub fn models(json: bool) -> Result<()> {
    let rows = catalog_rows();
    if json {
        for row in rows {
            println!("{}", serde_json::to_string(&row)?);
        }
        return Ok(());
    }
    println!(
        "{:<40} {:>15} {:>7} {:>7} {:>10} {:>8}",
        "model", "params", "layers", "hidden", "heads/kv", "vocab"
    );
    for r in rows {
        println!(
            "{:<40} {:>15} {:>7} {:>7} {:>10} {:>8}",
            r.name,
            group_digits(r.params),
            r.layers,
            r.hidden,
            format!("{}/{}", r.heads, r.kv_heads),
            r.vocab
        );
    }
    Ok(())
}

/// `memtune gpus`.
pub fn gpus(json: bool) -> Result<()> {
    let cards = crate::gpu_plan::catalog();
    if json {
        for card in cards {
            println!("{}", serde_json::to_string(card)?);
        }
        return Ok(());
    }
    let rate = |r: Option<f64>| r.map_or_else(|| "-".to_string(), |r| format!("{r:.1}"));
    println!(
        "{:<10} {:<30} {:>10} {:>11} {:>7} {:>7} {:>6} {:>6} {:>6} {:>9}",
        "name", "card", "memory", "usable", "bf16", "fp16", "fp32", "tf32", "GB/s", "runtime"
    );
    for c in cards {
        println!(
            "{:<10} {:<30} {:>10} {:>11} {:>7} {:>7} {:>6} {:>6} {:>6.0} {:>9}",
            c.name,
            c.display_name,
            human_bytes(c.memory_bytes),
            format!(
                "{}{}",
                human_bytes(c.usable_bytes),
                if c.usable_is_estimate { "*" } else { "" }
            ),
            rate(c.bf16_tflop_per_s),
            rate(Some(c.fp16_tflop_per_s)),
            rate(Some(c.fp32_tflop_per_s)),
            rate(c.tf32_tflop_per_s),
            c.memory_bandwidth_gb_per_s,
            human_bytes(c.runtime_overhead_bytes)
        );
    }
    println!(
        "memory: nvidia-smi's total; usable: what the CUDA runtime gives a process (* estimated). \
TFLOP/s dense, no sparsity; fp32 is the CUDA-core rate candle uses (it leaves TF32 off). \
runtime: assumed CUDA context and library workspaces. Sources: profiles/gpus/*.json, or --json."
    );
    Ok(())
}

/// 1234567 → "1,234,567".
pub fn group_digits(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `memtune train`.
pub fn train(args: &TrainArgs) -> Result<()> {
    let req = args.to_request()?;
    let bar = ProgressBar::new(req.steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    if !args.json {
        eprintln!(
            "training {} ({} params) on {}: {} {}, precision {}, checkpointing {}, optimizer {}, batch {}×{} accum {}",
            req.spec.name,
            group_digits(req.spec.param_count()),
            req.data.display(),
            req.knobs.method,
            if req.knobs.method == crate::config::Method::Full {
                String::new()
            } else {
                format!("r{}", req.knobs.lora.rank)
            },
            req.knobs.precision,
            req.knobs.checkpointing,
            req.knobs.optimizer,
            req.knobs.batch,
            req.knobs.seq,
            req.knobs.accum,
        );
        eprintln!("{}", crate::train::describe_sources(&req));
    }
    let summary = crate::train::run(&req, &mut |r| {
        bar.set_position(r.step as u64);
        bar.set_message(format!(
            "loss {:.4}  {:.0} tok/s  rss {}",
            r.loss,
            r.tokens_per_s,
            crate::probe::rss_text()
        ));
    })?;
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "done: {} steps, {} tokens in {:.1} s ({:.0} tokens/s); eval loss {:.4} → {:.4}",
            summary.steps,
            summary.tokens,
            summary.wall_s,
            summary.tokens_per_s,
            summary.initial_loss,
            summary.final_loss
        );
        if let Some(dir) = &req.output {
            println!("loss log: {}", dir.join("loss_log.csv").display());
        }
        for dir in &summary.written {
            println!("wrote {}", dir.display());
        }
    }
    Ok(())
}

/// Bytes as MiB or GiB, for people.
pub fn human_bytes(bytes: u64) -> String {
    let mib = bytes as f64 / (1024.0 * 1024.0);
    if mib >= 1024.0 {
        format!("{:.2} GiB", mib / 1024.0)
    } else {
        format!("{mib:.1} MiB")
    }
}

/// The meter for `device`: the counting allocator on CPU, the driver on CUDA.
pub fn meter_for(
    device: &candle_core::Device,
) -> Result<Box<dyn crate::probe::meter::MemoryMeter>> {
    match device {
        candle_core::Device::Cuda(_) => {
            let ordinal = match device.location() {
                candle_core::DeviceLocation::Cuda { gpu_id } => gpu_id,
                _ => 0,
            };
            Ok(Box::new(crate::probe::meter::CudaMeter::new(ordinal)?))
        }
        _ => Ok(Box::new(crate::probe::meter::CpuMeter::new())),
    }
}

/// `memtune profile`.
pub fn profile(args: &ProfileArgs) -> Result<()> {
    let req = args.to_request()?;
    let hyper = args.hyper(&req.knobs)?;
    // Fail on a bad output path before the work, not after.
    for path in [&args.csv, &args.timeline_csv].into_iter().flatten() {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| anyhow::anyhow!("cannot write `{}`: {e}", path.display()))?;
    }
    let meter = meter_for(&req.device)?;
    if !args.json {
        eprintln!(
            "probing {} at {} layers on {}: {} steps after {} warm-up…",
            req.spec.name,
            req.spec.num_hidden_layers,
            meter.device_name(),
            req.steps,
            req.warmup_steps
        );
    }
    let rss_before = crate::probe::meter::os_current_rss_bytes();
    let (clip, in_backward) = (hyper.clip, hyper.update_in_backward);
    let result = crate::probe::runner::run_probe_with(&req, hyper, meter.as_ref())?;
    let rss_peak = crate::probe::meter::os_peak_rss_bytes();
    let probe_id = probe_id(&result);
    if let Some(path) = &args.csv {
        crate::report::profile_csv::append_profile(
            path,
            &crate::report::profile_csv::profile_rows(&probe_id, &result),
        )?;
    }
    if let Some(dir) = &args.report {
        let data = crate::report::ReportData::from_probe(&probe_id, &result);
        let written = crate::report::write_report_dir(&data, dir)?;
        if !args.json {
            eprintln!(
                "report: {} ({} files)",
                dir.join("index.html").display(),
                written.len()
            );
        }
    }
    if let Some(path) = &args.timeline_csv {
        crate::train::write_atomic(
            path,
            crate::report::profile_csv::render_timeline(&probe_id, &result).as_bytes(),
        )?;
    }
    if args.json {
        let mut j = profile_json(&result);
        // The OS view, for comparison with tools measured by RSS (the peer harness).
        if let (Some(before), Some(peak)) = (rss_before, rss_peak) {
            j["rss_baseline_bytes"] = before.into();
            j["rss_peak_minus_baseline_bytes"] = peak.saturating_sub(before).into();
        }
        j["clip"] = clip.into();
        j["update_in_backward"] = in_backward.into();
        println!("{}", serde_json::to_string(&j)?);
    } else {
        print_profile(&result);
        let when = if in_backward { ", in backward" } else { "" };
        println!("updates: clip {clip}{when}");
    }
    Ok(())
}

/// A probe's identity in CSV files: model, depth, a hash of the knobs, and the time.
pub fn probe_id(p: &ProbeResult) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(&p.knobs)
        .unwrap_or_default()
        .hash(&mut h);
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!(
        "{}-L{}-{:08x}-{}",
        p.spec.name.replace('/', "_"),
        p.spec.num_hidden_layers,
        h.finish() as u32,
        secs
    )
}

/// The six components as a JSON object, by name.
fn components_json(c: &crate::probe::Components) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> = COMPONENT_NAMES
        .iter()
        .zip(c.as_array())
        .map(|(n, b)| (n.to_string(), serde_json::Value::from(b)))
        .collect();
    serde_json::Value::Object(map)
}

/// The JSON shape `profile --json` and `predict --json` share, so that the two can be diffed.
fn memory_json(
    spec: &crate::spec::ModelSpec,
    knobs: &crate::config::Knobs,
    device: &str,
    peak_bytes: u64,
    components: &crate::probe::Components,
    step_s: f64,
    tokens_per_s: f64,
) -> serde_json::Value {
    serde_json::json!({
        "model": spec.name,
        "layers": spec.num_hidden_layers,
        "device": device,
        "peak_bytes": peak_bytes,
        "components": components_json(components),
        "step_s": step_s,
        "tokens_per_s": tokens_per_s,
        "config": knobs,
    })
}

/// A measured probe in the shared JSON shape.
pub fn profile_json(p: &ProbeResult) -> serde_json::Value {
    memory_json(
        &p.spec,
        &p.knobs,
        &p.device,
        p.peak_bytes,
        &p.components,
        p.step_s,
        p.tokens_per_s,
    )
}

fn print_profile(p: &ProbeResult) {
    let k = &p.knobs;
    println!(
        "{} · {} layers · {} {} · {} · checkpointing {} · {} · loss {} · batch {}×{} accum {} · {}",
        p.spec.name,
        p.spec.num_hidden_layers,
        k.method,
        if k.method == crate::config::Method::Full {
            String::new()
        } else {
            format!("r{}", k.lora.rank)
        },
        k.precision,
        k.checkpointing,
        k.optimizer,
        k.loss,
        k.batch,
        k.seq,
        k.accum,
        p.device
    );
    println!("{:<13} {:>12} {:>7}", "component", "memory", "share");
    for (name, bytes) in COMPONENT_NAMES.iter().zip(p.components.as_array()) {
        let share = 100.0 * bytes as f64 / p.peak_bytes.max(1) as f64;
        println!("{name:<13} {:>12} {share:>6.1}%", human_bytes(bytes));
    }
    println!(
        "{:<13} {:>12}",
        "peak (measured)",
        human_bytes(p.peak_bytes)
    );
    println!("step {:.3} s · {:.0} tokens/s", p.step_s, p.tokens_per_s);
}

/// Runs the calibration probes for `space` (or reuses the cache), printing progress on stderr.
fn calibrate_for(
    spec: &crate::spec::ModelSpec,
    space: &crate::search::SearchSpace,
    calibration: &crate::cli::CalibrationArgs,
    quiet: bool,
) -> Result<(crate::cost::CostModel, String, candle_core::Device)> {
    let device = crate::cli::parse_device(&calibration.device)?;
    let meter = meter_for(&device)?;
    let cache = calibration.cache_dir();
    if let Some(dir) = &cache {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("calibration cache {}: {e}", dir.display()))?;
    }
    let mut prober = crate::probe::runner::EngineProber {
        device: device.clone(),
        meter: meter.as_ref(),
        // On the CPU, the prober's one step per class before the probes is all the warm-up a
        // probe needs (tests/probe_first_step.rs); a GPU's lazy initialisation is not proven so.
        warmup_steps: usize::from(!device.is_cpu()),
        steps: 1,
        seed: 0,
    };
    let started = std::time::Instant::now();
    let mut progress = |p: &crate::cost::CalibrationProgress| {
        if !quiet {
            if p.warm_up {
                eprintln!("[{:>5.1}s] {}", started.elapsed().as_secs_f64(), p.label);
            } else if p.done < p.total {
                eprintln!(
                    "[{:>5.1}s] probe {}/{}: {}",
                    started.elapsed().as_secs_f64(),
                    p.done + 1,
                    p.total,
                    p.label
                );
            } else {
                eprintln!("[{:>5.1}s] {}", started.elapsed().as_secs_f64(), p.label);
            }
        }
    };
    let model = crate::cost::calibrate(spec, space, &mut prober, cache.as_deref(), &mut progress)?;
    Ok((model, meter.device_name(), device))
}

/// A prediction in the shared JSON shape, marked as predicted.
fn prediction_json(
    spec: &crate::spec::ModelSpec,
    knobs: &crate::config::Knobs,
    device: &str,
    p: &crate::cost::Prediction,
) -> serde_json::Value {
    let mut j = memory_json(
        spec,
        knobs,
        device,
        p.peak_bytes,
        &p.components,
        p.step_s,
        p.tokens_per_s,
    );
    j["predicted"] = true.into();
    j
}

/// `memtune predict`.
pub fn predict(args: &crate::cli::PredictArgs) -> Result<()> {
    let spec = crate::cli::resolve_model(&args.model)?;
    let knobs = args.knobs.apply(crate::config::Knobs::default(), &spec)?;
    let request = crate::search::PolicyRequest {
        methods: Some(vec![knobs.method]),
        ranks: Some(vec![knobs.lora.rank]),
        quants: Some(vec![knobs.quant]),
        optimizers: Some(vec![knobs.optimizer]),
        precisions: Some(vec![knobs.precision]),
        checkpointing: Some(vec![knobs.checkpointing]),
        losses: Some(vec![knobs.loss]),
        micro_batches: Some(vec![knobs.batch]),
        effective_batch: knobs.batch * knobs.accum,
        seq: knobs.seq,
        lora: knobs.lora.clone(),
    };
    let space = crate::search::SearchSpace::from_request(&request)?;
    let card = crate::cli::resolve_target_gpu(&args.target_gpu)?;
    if let Some(card) = &card {
        if !card.supports(knobs.precision) {
            anyhow::bail!(
                "--target-gpu {}: the card has no {} (compute capability {}); use --precision fp32 or fp16",
                card.name,
                knobs.precision,
                card.compute_capability
            );
        }
        cpu_probes_for_a_gpu(&args.calibration)?;
    }
    let (model, device, _) = calibrate_for(&spec, &space, &args.calibration, false)?;
    if let Some(card) = &card {
        return predict_for_gpu(args, &spec, &knobs, &model, card);
    }
    let p = model.predict(&spec, &knobs);
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&prediction_json(&spec, &knobs, &device, &p))?
        );
    } else {
        println!(
            "{} · {} layers · predicted from {} probes on {device}",
            spec.name,
            spec.num_hidden_layers,
            model.fitted_on.len()
        );
        println!("{:<13} {:>12}", "component", "memory");
        for (name, bytes) in COMPONENT_NAMES.iter().zip(p.components.as_array()) {
            println!("{name:<13} {:>12}", human_bytes(bytes));
        }
        println!("{:<13} {:>12}", "peak", human_bytes(p.peak_bytes));
        println!(
            "step {:.3} s · {:.0} tokens/s (predicted)",
            p.step_s, p.tokens_per_s
        );
    }
    Ok(())
}

/// `--target-gpu` plans from CPU probes: probes on a GPU would count that GPU's runtime in the
/// tensor bytes, and the card's overhead would then be added twice.
/// `--target-gpu`'s probes: on the CPU, taking the engine's GPU code paths
/// ([`crate::engine::set_gpu_paths_on_cpu`]), so that they measure the tensors the card's steps
/// allocate.
fn cpu_probes_for_a_gpu(calibration: &crate::cli::CalibrationArgs) -> Result<()> {
    if !calibration.device.trim().eq_ignore_ascii_case("cpu") {
        anyhow::bail!(
            "--target-gpu plans from CPU probes; leave --device at cpu (on a machine with the GPU, tune on it with --device cuda and without --target-gpu)"
        );
    }
    crate::engine::set_gpu_paths_on_cpu(true);
    Ok(())
}

/// `memtune predict --target-gpu`: the CPU-calibrated tensor bytes, then the plan for the card.
fn predict_for_gpu(
    args: &crate::cli::PredictArgs,
    spec: &crate::spec::ModelSpec,
    knobs: &crate::config::Knobs,
    model: &crate::cost::CostModel,
    card: &crate::gpu_plan::GpuProfile,
) -> Result<()> {
    let projected = crate::gpu_plan::project(model, spec, card);
    let p = projected.predict(spec, knobs);
    let estimate = crate::gpu_plan::estimate(model, spec, knobs, card)
        .ok_or_else(|| anyhow::anyhow!("{} has no {}", card.name, knobs.precision))?;
    if args.json {
        let mut j = prediction_json(spec, knobs, &projected.device, &p);
        j["gpu_plan"] = estimate.to_json(Some(card.usable_bytes));
        println!("{}", serde_json::to_string(&j)?);
        return Ok(());
    }
    println!(
        "{} · {} layers · planned for {} from {} probes on {}",
        spec.name,
        spec.num_hidden_layers,
        card.display_name,
        model.fitted_on.len(),
        model.device
    );
    println!(
        "{:<13} {:>12}  (tensor bytes, measured: CPU probes and the fitted cost model)",
        "component", "memory"
    );
    for (name, bytes) in COMPONENT_NAMES
        .iter()
        .zip(estimate.tensor_components.as_array())
    {
        println!("{name:<13} {:>12}", human_bytes(bytes));
    }
    print!("{}", estimate.describe(Some(card.usable_bytes)));
    Ok(())
}

/// `memtune tune`.
pub fn tune(args: &crate::cli::TuneArgs) -> Result<()> {
    use crate::search::{
        SearchSpace, TunedConfig, format_bytes, search, write_candidates_csv, write_tuned_toml,
    };
    let started = std::time::Instant::now();
    let spec = crate::cli::resolve_model(&args.model)?;
    let request = args.policy(&spec)?;
    let mut space = SearchSpace::from_request(&request)?;
    let card = crate::cli::resolve_target_gpu(&args.target_gpu)?;
    let mut budget_note = None;
    let budget = match &card {
        Some(card) => {
            cpu_probes_for_a_gpu(&args.calibration)?;
            crate::gpu_plan::restrict_space(&mut space, card)
                .map_err(|e| anyhow::anyhow!("--target-gpu: {e}"))?;
            let given = match &args.gpu_mem {
                Some(_) => Some(args.budget_bytes()?),
                None => None,
            };
            let (budget, note) = crate::gpu_plan::budget_for(card, given);
            budget_note = note;
            budget
        }
        None => args.budget_bytes()?,
    };
    let hyper = args.hyper.apply(crate::config::Hyper::default())?;
    if let Some(data) = &args.train
        && !data.is_file()
    {
        anyhow::bail!("--train {}: no such file", data.display());
    }
    // Create the output folder before the work, so that a bad path fails now.
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).map_err(|e| {
            anyhow::anyhow!("--out {}: cannot create the folder: {e}", dir.display())
        })?;
    }
    if !args.json {
        if let Some(note) = &budget_note {
            eprintln!("note: {note}");
        }
        eprintln!(
            "tuning {} ({} params) for {}{} at seq {} × effective batch {}",
            spec.name,
            group_digits(spec.param_count()),
            format_bytes(budget),
            card.as_ref()
                .map(|c| format!(" on {} (planned from CPU probes)", c.display_name))
                .unwrap_or_default(),
            args.seq,
            args.effective_batch
        );
    }
    let (model, device_name, device) = calibrate_for(&spec, &space, &args.calibration, args.json)?;
    // With --target-gpu the search ranks the card's figures: the CPU-calibrated tensor bytes plus
    // the card's estimates, and the roofline's speed.
    let planned = card
        .as_ref()
        .map(|card| crate::gpu_plan::project(&model, &spec, card));
    let outcome = search(
        planned.as_ref().unwrap_or(&model),
        &spec,
        &space,
        budget,
        args.margin,
    );
    let tune_s = started.elapsed().as_secs_f64();

    if let Some(dir) = &args.out {
        write_candidates_csv(&dir.join("candidates.csv"), &outcome)?;
        let rows: Vec<_> = model
            .fitted_on
            .iter()
            .enumerate()
            .flat_map(|(i, p)| {
                crate::report::profile_csv::profile_rows(&format!("calibration-{i:02}"), p)
            })
            .collect();
        crate::train::write_atomic(
            &dir.join("profile.csv"),
            crate::report::profile_csv::render_profile(&rows, true)?.as_bytes(),
        )?;
        if let Ok(loo) = crate::cost::leave_one_out(&model) {
            let mut text = String::from("label,predicted_peak_bytes,measured_peak_bytes\n");
            for r in &loo.rows {
                text.push_str(&format!(
                    "\"{}\",{},{}\n",
                    r.label.replace('"', "'"),
                    r.predicted_peak_bytes,
                    r.measured_peak_bytes
                ));
            }
            crate::train::write_atomic(&dir.join("accuracy.csv"), text.as_bytes())?;
        }
        if let Some(tuned) = TunedConfig::from_outcome(&args.model, &outcome, hyper.clone()) {
            write_tuned_toml(&dir.join("tuned.toml"), &tuned)?;
        }
    }

    let Some(best) = outcome.best().cloned() else {
        if args.json {
            let closest = outcome.closest().map(|(c, over)| serde_json::json!({"config": c.knobs, "required_bytes": c.required_bytes, "over_budget_bytes": over}));
            println!(
                "{}",
                serde_json::json!({"chosen": null, "budget_bytes": budget, "candidates_evaluated": outcome.candidates.len(), "closest": closest})
            );
        } else {
            print!("{}", outcome.explain());
        }
        anyhow::bail!(
            "no configuration of {} fits in {}",
            spec.name,
            format_bytes(budget)
        );
    };
    let gpu_estimate = card
        .as_ref()
        .and_then(|card| crate::gpu_plan::estimate(&model, &spec, &best.knobs, card));
    if !args.json {
        if let Some(card) = &card {
            println!(
                "Planned for {} without a GPU: memory = tensor bytes measured by CPU probes + the card's estimated CUDA runtime and allocator allowance; speed = an estimated roofline at the card's rates. Every figure below is for the card.",
                card.display_name
            );
        }
        print!("{}", outcome.explain());
        if let Some(estimate) = &gpu_estimate {
            print!("{}", estimate.describe(Some(budget)));
        }
        println!(
            "Tuned in {tune_s:.1} s ({} calibration probes on {device_name}).",
            model.fitted_on.len()
        );
        if let Some(dir) = &args.out {
            println!(
                "Wrote {}/tuned.toml, candidates.csv, profile.csv, accuracy.csv",
                dir.display()
            );
        }
    }

    let mut verified = serde_json::Value::Null;
    if args.verify {
        if !args.json {
            eprintln!(
                "verifying the pick at full depth ({} layers)…",
                spec.num_hidden_layers
            );
        }
        let meter = meter_for(&device)?;
        let req = crate::probe::runner::ProbeRequest {
            spec: spec.clone(),
            knobs: best.knobs.clone(),
            warmup_steps: 1,
            steps: 2,
            device: device.clone(),
            seed: 0,
        };
        let measured = crate::probe::runner::run_probe(&req, meter.as_ref())?;
        // With --target-gpu the run is on the CPU: it checks the measured part of the plan (tensor
        // bytes) against the CPU prediction, and the budget with the card's estimates added.
        let (expected, gpu_extra) = match &planned {
            Some(_) => {
                let tensors = model.predict(&spec, &best.knobs);
                let extra = best
                    .prediction
                    .peak_bytes
                    .saturating_sub(tensors.peak_bytes);
                (tensors, extra)
            }
            None => (best.prediction, 0),
        };
        let error = (expected.peak_bytes as f64 - measured.peak_bytes as f64)
            / measured.peak_bytes.max(1) as f64;
        let within = measured.peak_bytes + gpu_extra <= budget;
        if !args.json && planned.is_some() {
            println!(
                "Verified on {}: measured tensor peak {} vs predicted {} ({:+.2}%); plus the card's estimated runtime and allowance ({}): {} of {} — {}. The GPU figures stay estimates.",
                measured.device,
                format_bytes(measured.peak_bytes),
                format_bytes(expected.peak_bytes),
                100.0 * error,
                format_bytes(gpu_extra),
                format_bytes(measured.peak_bytes + gpu_extra),
                format_bytes(budget),
                if within {
                    "within budget"
                } else {
                    "OVER BUDGET"
                }
            );
        } else if !args.json {
            println!(
                "Verified: measured peak {} vs predicted {} ({:+.2}%), budget {} — {}; measured {:.0} tokens/s vs predicted {:.0}",
                format_bytes(measured.peak_bytes),
                format_bytes(best.prediction.peak_bytes),
                100.0 * error,
                format_bytes(budget),
                if within {
                    "within budget"
                } else {
                    "OVER BUDGET"
                },
                measured.tokens_per_s,
                best.prediction.tokens_per_s
            );
        }
        if let Some(dir) = &args.out {
            let id = format!("verify-{}", probe_id(&measured));
            crate::report::profile_csv::append_profile(
                &dir.join("profile.csv"),
                &crate::report::profile_csv::profile_rows(&id, &measured),
            )?;
            crate::train::write_atomic(
                &dir.join("timeline.csv"),
                crate::report::profile_csv::render_timeline(&id, &measured).as_bytes(),
            )?;
        }
        verified = serde_json::json!({
            "peak_bytes": measured.peak_bytes,
            "components": components_json(&measured.components),
            "tokens_per_s": measured.tokens_per_s,
            "peak_error": error,
            "within_budget": within,
        });
    }
    if args.json {
        let p = &best.prediction;
        let components = components_json(&p.components);
        println!(
            "{}",
            serde_json::json!({
                "model": spec.name,
                "chosen": best.knobs,
                "predicted": {"components": components, "peak_bytes": p.peak_bytes, "tokens_per_s": p.tokens_per_s, "step_s": p.step_s},
                "budget_bytes": budget,
                "margin": args.margin,
                "candidates_evaluated": outcome.candidates.len(),
                "candidates_fitting": outcome.fitting,
                "probes": model.fitted_on.len(),
                "policy": outcome.policy,
                "tune_s": tune_s,
                "device": device_name,
                "verified": verified,
                "target_gpu": gpu_estimate.as_ref().map(|e| e.to_json(Some(budget))),
                "budget_note": budget_note,
            })
        );
    }
    if let Some(dir) = &args.out {
        let data = crate::report::load_report_inputs(dir)?;
        let written = crate::report::write_report_dir(&data, dir)?;
        if !args.json {
            println!(
                "Report: {} ({} files)",
                dir.join("index.html").display(),
                written.len()
            );
        }
    }
    if let Some(data) = &args.train {
        let req = crate::train::TrainRequest {
            model: args.model.clone(),
            options: crate::train::RunOptions::default(),
            spec: spec.clone(),
            knobs: best.knobs.clone(),
            hyper,
            data: data.clone(),
            steps: args.steps,
            seed: 0,
            device,
            output: args.out.clone(),
            eval_fraction: 0.1,
            bad_lines: crate::data::BadLinePolicy::Fail,
        };
        let summary = crate::train::run(&req, &mut |r| {
            if !args.json && (r.step == 1 || r.step % 10 == 0) {
                eprintln!(
                    "step {}: loss {:.4}, {:.0} tokens/s",
                    r.step, r.loss, r.tokens_per_s
                );
            }
        })?;
        if args.json {
            println!("{}", serde_json::to_string(&summary)?);
        } else {
            println!(
                "trained {} steps: eval loss {:.4} → {:.4}",
                summary.steps, summary.initial_loss, summary.final_loss
            );
        }
    }
    Ok(())
}

/// `memtune report`.
pub fn report(args: &ReportArgs) -> Result<()> {
    let mut data = crate::report::load_report_inputs(&args.from)?;
    if let Some(text) = &args.budget {
        let bytes = crate::search::parse_bytes(text)
            .map_err(|e| anyhow::anyhow!("--budget {text}: {e}"))?;
        data.budget_bytes = Some(bytes);
    }
    let rendered = crate::report::render_report(&data)?;
    for s in &rendered.skipped {
        eprintln!("skipped {}: {}", s.chart, s.reason);
    }
    for path in crate::report::write_rendered(&rendered, &args.out)? {
        println!("{}", path.display());
    }
    Ok(())
}

/// `memtune generate`.
pub fn generate(args: &GenerateArgs) -> Result<()> {
    use crate::train::generate::{Generator, PromptFormat, Sampling};
    let device = args.validate()?;
    let generator = Generator::load(&args.model, args.adapter.as_deref(), &device)?;
    let format = PromptFormat {
        chat: args.chat,
        system: args.system.clone(),
    };
    let prompt = generator.prompt_ids(&args.prompt, &format);
    let started = std::time::Instant::now();
    let ids = generator.generate(
        &prompt,
        Sampling {
            max_tokens: args.max_tokens,
            temperature: args.temperature,
            seed: args.seed,
        },
    )?;
    let completion = generator.tokenizer.decode(&ids);
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "prompt": args.prompt,
                "prompt_tokens": prompt.len(),
                "completion": completion,
                "completion_ids": ids,
                "generate_s": started.elapsed().as_secs_f64(),
            })
        );
    } else {
        println!("{completion}");
    }
    Ok(())
}
