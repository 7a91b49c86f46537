//! What each subcommand does with its validated request: run the stage, print for people (tables,
//! progress on stderr) or for programs (`--json` on stdout).

use crate::cli::TrainArgs;
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
    }
    Ok(())
}
