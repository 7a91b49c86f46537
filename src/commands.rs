//! What each subcommand does with its validated request: run the stage, print for people (tables,
//! progress on stderr) or for programs (`--json` on stdout).

use crate::cli::{GenerateArgs, ProfileArgs, TrainArgs};
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
    let result = crate::probe::runner::run_probe(&req, meter.as_ref())?;
    let rss_peak = crate::probe::meter::os_peak_rss_bytes();
    let probe_id = probe_id(&result);
    if let Some(path) = &args.csv {
        crate::report::profile_csv::append_profile(
            path,
            &crate::report::profile_csv::profile_rows(&probe_id, &result),
        )?;
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
        println!("{}", serde_json::to_string(&j)?);
    } else {
        print_profile(&result);
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

/// The JSON shape `profile --json` and `predict --json` share.
pub fn profile_json(p: &ProbeResult) -> serde_json::Value {
    let components: serde_json::Map<String, serde_json::Value> = COMPONENT_NAMES
        .iter()
        .zip(p.components.as_array())
        .map(|(n, b)| (n.to_string(), serde_json::Value::from(b)))
        .collect();
    serde_json::json!({
        "model": p.spec.name,
        "layers": p.spec.num_hidden_layers,
        "device": p.device,
        "peak_bytes": p.peak_bytes,
        "components": components,
        "step_s": p.step_s,
        "tokens_per_s": p.tokens_per_s,
        "config": p.knobs,
    })
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
