//! Trainer speed and memory against PyTorch + transformers + peft on the same CPU, side by side.
//!
//! For each configuration it runs `memtune profile` (a fresh process: warm-up, then measured steps)
//! and `../shared/peer/train_step.py` (a fresh process, same shapes, same threads), alternating, and
//! prints tokens/s and memory ratios. Build first, then run from the repo root:
//!
//!     cargo build --release --examples
//!     target/release/examples/bench_vs_pytorch --python /work/peer-venv/bin/python [--quick]
//!
//! memtune's memory is its exact allocator peak above the pre-model baseline (and the OS high-water
//! mark); PyTorch's is the peer's ΔRSS (peak RSS minus RSS after imports) and its profiler peak.

use std::path::{Path, PathBuf};
use std::process::Command;

struct Config {
    name: &'static str,
    layers: usize,
    hidden: usize,
    heads: usize,
    intermediate: usize,
    vocab: usize,
    batch: usize,
    seq: usize,
    method: &'static str,
    checkpointing: bool,
    dtype: &'static str,
}

fn configs(quick: bool) -> Vec<Config> {
    let mut out = Vec::new();
    let models: &[(&str, usize, usize, usize, usize, usize)] = &[
        ("L2 h256 V4k", 2, 256, 8, 688, 4096),
        ("L4 h512 V32k", 4, 512, 8, 1376, 32000),
    ];
    let shapes: &[(usize, usize)] = if quick {
        &[(4, 256)]
    } else {
        &[(1, 128), (4, 256), (8, 256)]
    };
    for &(name, layers, hidden, heads, intermediate, vocab) in models {
        for &(batch, seq) in shapes {
            for method in ["full", "lora"] {
                for checkpointing in [false, true] {
                    for dtype in ["fp32", "bf16"] {
                        if quick && (checkpointing || dtype == "bf16") {
                            continue;
                        }
                        out.push(Config {
                            name,
                            layers,
                            hidden,
                            heads,
                            intermediate,
                            vocab,
                            batch,
                            seq,
                            method,
                            checkpointing,
                            dtype,
                        });
                    }
                }
            }
        }
    }
    out
}

fn write_config(dir: &Path, c: &Config) -> PathBuf {
    let path = dir.join(format!("{}-{}.json", c.layers, c.vocab));
    let json = serde_json::json!({
        "model_type": "llama", "hidden_size": c.hidden, "intermediate_size": c.intermediate,
        "num_hidden_layers": c.layers, "num_attention_heads": c.heads, "num_key_value_heads": c.heads,
        "vocab_size": c.vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "tie_word_embeddings": false, "hidden_act": "silu"
    });
    std::fs::write(&path, json.to_string()).expect("write config");
    path
}

fn run_json(cmd: &mut Command) -> Option<serde_json::Value> {
    let out = cmd.output().ok()?;
    if !out.status.success() {
        eprintln!(
            "  failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last()?).ok()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let python = args
        .windows(2)
        .find(|w| w[0] == "--python")
        .map(|w| w[1].clone())
        .unwrap_or_else(|| "python3".into());
    let peer = args
        .windows(2)
        .find(|w| w[0] == "--peer")
        .map(|w| PathBuf::from(&w[1]))
        .unwrap_or_else(|| PathBuf::from("../shared/peer"));
    let exe = std::env::current_exe().expect("current exe");
    let memtune = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("memtune"))
        .expect("target dir");
    assert!(
        memtune.exists(),
        "build memtune first: cargo build --release"
    );
    let dir = std::env::temp_dir().join("memtune-bench");
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mib = |b: f64| b / (1024.0 * 1024.0);
    println!(
        "| model | b×s | method | ckpt | dtype | memtune tok/s | PyTorch tok/s | speed ratio | memtune peak MiB (alloc / ΔRSS) | PyTorch ΔRSS MiB | memory ratio (ΔRSS) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for c in configs(quick) {
        let cfg = write_config(&dir, &c);
        let precision = if c.dtype == "bf16" {
            "bf16-pure"
        } else {
            "fp32"
        };
        let ours = run_json(Command::new(&memtune).args([
            "profile",
            "--model",
            cfg.to_str().unwrap(),
            "--method",
            c.method,
            "--rank",
            "8",
            "--lora-targets",
            "q_proj,v_proj",
            "--precision",
            precision,
            "--checkpointing",
            if c.checkpointing { "full" } else { "none" },
            "--batch",
            &c.batch.to_string(),
            "--seq",
            &c.seq.to_string(),
            "--steps",
            "3",
            "--warmup",
            "1",
            "--json",
        ]));
        let theirs = run_json(Command::new(&python).arg(peer.join("train_step.py")).args([
            "--layers",
            &c.layers.to_string(),
            "--hidden",
            &c.hidden.to_string(),
            "--heads",
            &c.heads.to_string(),
            "--kv-heads",
            &c.heads.to_string(),
            "--intermediate",
            &c.intermediate.to_string(),
            "--vocab",
            &c.vocab.to_string(),
            "--seq",
            &c.seq.to_string(),
            "--batch",
            &c.batch.to_string(),
            "--dtype",
            c.dtype,
            "--method",
            c.method,
            "--lora-rank",
            "8",
            "--checkpointing",
            if c.checkpointing { "on" } else { "off" },
            "--optim",
            "adamw",
            "--steps",
            "3",
            "--threads",
            "2",
        ]));
        let (Some(o), Some(t)) = (ours, theirs) else {
            continue;
        };
        let our_tps = o["tokens_per_s"].as_f64().unwrap_or(0.0);
        let their_tps = t["tokens_per_s"].as_f64().unwrap_or(0.0);
        let our_peak = o["peak_bytes"].as_f64().unwrap_or(0.0);
        let our_rss = o["rss_peak_minus_baseline_bytes"].as_f64().unwrap_or(0.0);
        let their_rss = t["peak_rss_minus_baseline_bytes"].as_f64().unwrap_or(0.0);
        println!(
            "| {} | {}×{} | {} | {} | {} | {:.0} | {:.0} | {:.2}× | {:.0} / {:.0} | {:.0} | {:.2}× |",
            c.name,
            c.batch,
            c.seq,
            c.method,
            if c.checkpointing { "on" } else { "off" },
            c.dtype,
            our_tps,
            their_tps,
            our_tps / their_tps.max(1e-9),
            mib(our_peak),
            mib(our_rss),
            mib(their_rss),
            our_rss / their_rss.max(1.0),
        );
    }
}
