//! Trainer speed and memory against PyTorch + transformers + peft on the same CPU, side by side.
//!
//! For each configuration it runs `memtune profile` (a fresh process: warm-up, then measured steps)
//! and `../shared/peer/train_step.py` (a fresh process, same shapes, same threads), alternating,
//! `--repeats` times (default 3), and prints the median tokens/s of each, the speed ratio and the
//! memory ratios. Each repeat is a pair of runs back to back, memtune first in even repeats and
//! PyTorch first in odd ones; the speed ratio is the median of the pairs' ratios, so a slow phase
//! of a shared host weighs on both runs of a pair rather than on one side's median. The last
//! column lists the pairs' ratios, in the order run.
//!
//! The pairs run in rounds: one pair of every row, then the next round, `--repeats` rounds. A
//! slow spell of the host (they last minutes on these machines) then lands on one pair of each of
//! a few rows, which the median of a row's pairs sets aside, rather than on every pair of one row.
//! After each round the table so far is written to `$TMPDIR/memtune-bench/partial.md` (the rows
//! print when the last round ends). `--row-by-row` runs each row's pairs back to back instead
//! (the order before the twenty-sixth session), printing each row as it ends.
//! `--before PATH` adds another memtune binary (say, one built from an earlier commit) to the same
//! alternation and prints this build's speed against it. Build first, then run from the repo root:
//!
//!     cargo build --release --bins --examples
//!     target/release/examples/bench_vs_pytorch --python /work/peer-venv/bin/python [--quick]
//!         [--repeats N] [--before OLD_MEMTUNE] [--dtype fp32|bf16] [--only TEXT] [--row-by-row]
//!
//! `--dtype` keeps only that precision's half of the matrix (with `--quick`, its four rows: fp32's by
//! default). `--only TEXT` keeps the rows whose first five columns, as one line with single spaces
//! (`L2 h256 V4k 4×256 full on fp32`), contain TEXT. `--update-in-backward` runs this build's rows with `--clip 0 --update-in-backward`
//! (the same updates as PyTorch's peer, which does not clip, each layer's applied as soon as
//! backward has made its gradients); a `--before` binary runs without them.
//!
//! The last column is the share of the machine's CPU time the host stole from this VM while the
//! row ran (`/proc/stat`): rows with more than a few percent measured a contended machine.
//!
//! memtune's memory is its exact allocator peak above the pre-model baseline (and the OS high-water
//! mark); PyTorch's is the peer's ΔRSS (peak RSS minus RSS after imports). Each is the median over
//! that side's runs.

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

impl Config {
    /// The row's first five columns as one line, `L2 h256 V4k 4×256 full on fp32`, which `--only`
    /// matches.
    fn label(&self) -> String {
        let ckpt = if self.checkpointing { "on" } else { "off" };
        format!(
            "{} {}×{} {} {ckpt} {}",
            self.name, self.batch, self.seq, self.method, self.dtype
        )
    }
}

fn configs(quick: bool, quick_dtype: &str) -> Vec<Config> {
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
                        if quick && (checkpointing || dtype != quick_dtype) {
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

/// A run's number under `key` (0 where it has none).
fn number(run: &serde_json::Value, key: &str) -> f64 {
    run[key].as_f64().unwrap_or(0.0)
}

/// The median of `key` over `runs`.
fn median_of(runs: &[serde_json::Value], key: &str) -> f64 {
    median(runs.iter().map(|r| number(r, key)).collect())
}

/// The median (the upper one of an even count; NaN for none).
fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn memtune_args(cfg: &Path, c: &Config) -> Vec<String> {
    let precision = if c.dtype == "bf16" {
        "bf16-pure"
    } else {
        "fp32"
    };
    let ckpt = if c.checkpointing { "full" } else { "none" };
    let mut args: Vec<String> = vec!["profile".into(), "--model".into()];
    args.push(cfg.to_str().expect("utf-8 temp path").into());
    for (flag, value) in [
        ("--method", c.method),
        ("--rank", "8"),
        ("--lora-targets", "q_proj,v_proj"),
        ("--precision", precision),
        ("--checkpointing", ckpt),
        ("--steps", "3"),
        ("--warmup", "1"),
    ] {
        args.push(flag.into());
        args.push(value.into());
    }
    args.extend(["--batch".into(), c.batch.to_string()]);
    args.extend(["--seq".into(), c.seq.to_string()]);
    args.push("--json".into());
    args
}

fn peer_args(peer: &Path, c: &Config) -> Vec<String> {
    let mut args = vec![
        peer.join("train_step.py")
            .to_str()
            .expect("utf-8 path")
            .to_string(),
    ];
    for (flag, value) in [
        ("--layers", c.layers),
        ("--hidden", c.hidden),
        ("--heads", c.heads),
        ("--kv-heads", c.heads),
        ("--intermediate", c.intermediate),
        ("--vocab", c.vocab),
        ("--seq", c.seq),
        ("--batch", c.batch),
    ] {
        args.extend([flag.to_string(), value.to_string()]);
    }
    let ckpt = if c.checkpointing { "on" } else { "off" };
    for (flag, value) in [
        ("--dtype", c.dtype),
        ("--method", c.method),
        ("--lora-rank", "8"),
        ("--checkpointing", ckpt),
        ("--optim", "adamw"),
        ("--steps", "3"),
        ("--threads", "2"),
    ] {
        args.extend([flag.to_string(), value.to_string()]);
    }
    args
}

/// CPU time stolen from this VM and all CPU time so far, in clock ticks (`/proc/stat`'s `cpu` line);
/// zeros where it cannot be read.
fn cpu_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|f| f.parse().ok())
        .collect();
    (
        fields.get(7).copied().unwrap_or(0),
        fields.iter().sum::<u64>(),
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "bench_vs_pytorch [--python PY] [--peer DIR] [--quick] [--repeats N] [--before OLD_MEMTUNE] \
             [--dtype fp32|bf16] [--only TEXT] [--update-in-backward] [--row-by-row]\n\
             memtune's training step against ../shared/peer/train_step.py, side by side \
             (see the header of examples/bench_vs_pytorch.rs)"
        );
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let in_backward = args.iter().any(|a| a == "--update-in-backward");
    let row_by_row = args.iter().any(|a| a == "--row-by-row");
    let arg = |name: &str| args.windows(2).find(|w| w[0] == name).map(|w| w[1].clone());
    let python = arg("--python").unwrap_or_else(|| "python3".into());
    let peer = PathBuf::from(arg("--peer").unwrap_or_else(|| "../shared/peer".into()));
    let repeats: usize = arg("--repeats").map_or(3, |r| r.parse().expect("--repeats N"));
    let before = arg("--before").map(PathBuf::from);
    let only_dtype = arg("--dtype");
    let only = arg("--only");
    if let Some(d) = only_dtype
        .as_deref()
        .filter(|d| !["fp32", "bf16"].contains(d))
    {
        eprintln!("error: --dtype takes fp32 or bf16 (the matrix's precisions), not `{d}`");
        std::process::exit(2);
    }
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
    let before_cols = if before.is_some() {
        " before tok/s | this/before |"
    } else {
        ""
    };
    let header = format!(
        "| model | b×s | method | ckpt | dtype | memtune tok/s | PyTorch tok/s | speed ratio | memtune peak MiB (alloc / ΔRSS) | PyTorch ΔRSS MiB | memory ratio (ΔRSS) |{before_cols} steal | pairs' speed ratios |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|{}\n",
        if before.is_some() { "---|---|" } else { "" }
    );
    print!("{header}");
    let mut rows: Vec<Row> = configs(quick, only_dtype.as_deref().unwrap_or("fp32"))
        .into_iter()
        .filter(|c| only_dtype.as_deref().is_none_or(|d| d == c.dtype))
        .filter(|c| only.as_deref().is_none_or(|o| c.label().contains(o)))
        .map(|c| {
            let cfg = write_config(&dir, &c);
            let base_args = memtune_args(&cfg, &c);
            let mut ours_args = base_args.clone();
            if in_backward {
                ours_args.extend(["--clip", "0", "--update-in-backward"].map(String::from));
            }
            Row {
                peer_args: peer_args(&peer, &c),
                config: c,
                ours_args,
                base_args,
                ours: Vec::new(),
                theirs: Vec::new(),
                old: Vec::new(),
                ratios: Vec::new(),
                ticks: (0, 0),
            }
        })
        .collect();
    // The order of the pairs: every row's pairs back to back (`--row-by-row`), or a round of one
    // pair per row, `repeats` times (the default), so that a slow spell of a shared host lands on
    // one pair of many rows (which the median of each row's pairs sets aside) rather than on
    // every pair of one row.
    let order: Vec<(usize, usize)> = if row_by_row {
        (0..rows.len())
            .flat_map(|i| (0..repeats).map(move |r| (i, r)))
            .collect()
    } else {
        (0..repeats)
            .flat_map(|r| (0..rows.len()).map(move |i| (i, r)))
            .collect()
    };
    let started = std::time::Instant::now();
    let partial = dir.join("partial.md");
    for (i, r) in order {
        let row = &mut rows[i];
        let (stolen0, total0) = cpu_ticks();
        // Each repeat is a pair run back to back, in alternating order (memtune first, then
        // PyTorch first): a host that drifts slower or faster then weighs on both sides of a
        // pair alike, and on each side first as often as second.
        let run_ours = || run_json(Command::new(&memtune).args(&row.ours_args));
        let run_theirs = || run_json(Command::new(&python).args(&row.peer_args));
        let (o, t) = if r % 2 == 0 {
            let o = run_ours();
            (o, run_theirs())
        } else {
            let t = run_theirs();
            (run_ours(), t)
        };
        if let (Some(o), Some(t)) = (&o, &t) {
            row.ratios
                .push(number(o, "tokens_per_s") / number(t, "tokens_per_s").max(1e-9));
        }
        row.ours.extend(o);
        row.theirs.extend(t);
        if let Some(b) = &before {
            row.old
                .extend(run_json(Command::new(b).args(&row.base_args)));
        }
        let (stolen1, total1) = cpu_ticks();
        row.ticks.0 += stolen1.saturating_sub(stolen0);
        row.ticks.1 += total1.saturating_sub(total0);
        if r + 1 == repeats {
            if let Some(line) = row.line() {
                println!("{line}");
            }
        } else if !row_by_row && i + 1 == rows.len() {
            // A round is done: the table so far (each row's pairs until now), written whole
            // then renamed into place, so that an interrupted run keeps what it measured.
            let table: String = rows
                .iter()
                .filter_map(Row::line)
                .map(|l| l + "\n")
                .collect();
            let tmp = partial.with_extension("md.tmp");
            if std::fs::write(&tmp, format!("{header}{table}"))
                .and_then(|()| std::fs::rename(&tmp, &partial))
                .is_ok()
            {
                eprintln!(
                    "round {} of {repeats} done after {:.0} min; the table so far: {}",
                    r + 1,
                    started.elapsed().as_secs_f64() / 60.0,
                    partial.display()
                );
            }
        }
    }
}

/// One row of the matrix: its arguments and what its runs measured so far.
struct Row {
    config: Config,
    ours_args: Vec<String>,
    /// `--before`'s arguments (without `--update-in-backward`).
    base_args: Vec<String>,
    peer_args: Vec<String>,
    ours: Vec<serde_json::Value>,
    theirs: Vec<serde_json::Value>,
    old: Vec<serde_json::Value>,
    /// Each pair's tokens/s ratio, memtune's over PyTorch's, in the order run.
    ratios: Vec<f64>,
    /// CPU ticks stolen by the host and in all, over this row's pairs.
    ticks: (u64, u64),
}

impl Row {
    /// The row's table line from its runs so far (none before both sides have a run).
    fn line(&self) -> Option<String> {
        let (ours, theirs, old, c) = (&self.ours, &self.theirs, &self.old, &self.config);
        if ours.is_empty() || theirs.is_empty() {
            return None;
        }
        let mib = |b: f64| b / (1024.0 * 1024.0);
        let steal = 100.0 * self.ticks.0 as f64 / self.ticks.1.max(1) as f64;
        let tps = |runs: &[serde_json::Value]| median_of(runs, "tokens_per_s");
        let (our_tps, their_tps) = (tps(ours), tps(theirs));
        // Memory: each side's median over its runs (the counted peak is the same in every run;
        // the OS figures move by a few MiB, PyTorch's by up to 10% between runs).
        let our_peak = median_of(ours, "peak_bytes");
        let our_rss = median_of(ours, "rss_peak_minus_baseline_bytes");
        let their_rss = median_of(theirs, "peak_rss_minus_baseline_bytes");
        let before_text = if old.is_empty() {
            String::new()
        } else {
            let old_tps = tps(old);
            format!(" {old_tps:.0} | {:.2}× |", our_tps / old_tps.max(1e-9))
        };
        let pairs = self
            .ratios
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(" ");
        Some(format!(
            "| {} | {}×{} | {} | {} | {} | {:.0} | {:.0} | {:.2}× | {:.0} / {:.0} | {:.0} | {:.2}× |{before_text} {steal:.1}% | {pairs} |",
            c.name,
            c.batch,
            c.seq,
            c.method,
            if c.checkpointing { "on" } else { "off" },
            c.dtype,
            our_tps,
            their_tps,
            median(self.ratios.clone()),
            mib(our_peak),
            mib(our_rss),
            mib(their_rss),
            our_rss / their_rss.max(1.0),
        ))
    }
}
