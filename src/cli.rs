//! Command-line definitions and their validation into typed requests. Nothing below this module
//! sees a clap type: each command's flags become a `TrainRequest`, `Knobs`, etc. once, here.

use crate::config::{
    self, Checkpointing, Hyper, Knobs, LossMode, Method, OptimizerKind, Precision, Quant, Schedule,
};
use crate::data::BadLinePolicy;
use crate::spec::{self, ModelSpec};
use anyhow::{Context, Result, bail};
use candle_core::Device;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "memtune",
    version,
    about = "Find the fastest fine-tuning configuration that fits in your GPU memory — by measuring it — then run it.",
    long_about = "memtune measures what fine-tuning a language model costs (short instrumented training \
steps of the real architecture), fits a memory and speed model to those measurements, searches \
micro-batch, accumulation, LoRA rank, precision, checkpointing, optimizer and quantization for the \
fastest configuration that fits a memory budget, and runs that configuration with its own trainer.\n\n\
Start with `memtune models` to see the built-in catalog, then `memtune train --model tiny --data FILE`."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process; boxing the large variants would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// List the built-in model catalog (configs only: no weights are needed to tune).
    Models {
        /// Print one JSON object per model (exact parameter counts as integers).
        #[arg(long)]
        json: bool,
    },
    /// Fine-tune a model on a text or JSONL file with the given knobs.
    Train(TrainArgs),
    /// Measure a few real training steps: peak memory split into components, step time, tokens/s.
    Profile(ProfileArgs),
    /// Predict memory and speed of one configuration at full depth from calibration probes.
    Predict(PredictArgs),
    /// Find the fastest configuration that fits a memory budget (and optionally run it).
    Tune(TuneArgs),
    /// Render SVG charts and an index.html from profile / tune CSV outputs.
    Report(ReportArgs),
    /// Generate text with a model and optionally a LoRA adapter (greedy by default).
    Generate(GenerateArgs),
    /// List the built-in GPU catalog (the cards `--target-gpu` plans for).
    Gpus {
        /// Print one JSON object per card.
        #[arg(long)]
        json: bool,
    },
}

/// Where calibrations are cached, and the device probes run on.
#[derive(Args, Debug, Clone)]
pub struct CalibrationArgs {
    /// Device the probes run on: cpu, or cuda / cuda:N (needs the cuda build).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Calibration cache folder (default: $MEMTUNE_CACHE, else ~/.cache/memtune). Calibrations are
    /// reused per model shape, device and memtune version.
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Do not read or write the calibration cache.
    #[arg(long)]
    pub no_cache: bool,
}

impl CalibrationArgs {
    pub fn cache_dir(&self) -> Option<PathBuf> {
        if self.no_cache {
            return None;
        }
        if let Some(dir) = &self.cache {
            return Some(dir.clone());
        }
        if let Some(dir) = std::env::var_os("MEMTUNE_CACHE") {
            return Some(PathBuf::from(dir));
        }
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("memtune"))
    }
}

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// A catalog name, a folder holding config.json, or a config.json path.
    #[arg(long)]
    pub model: String,
    #[command(flatten)]
    pub knobs: KnobArgs,
    #[command(flatten)]
    pub calibration: CalibrationArgs,
    /// Plan for this GPU (see `memtune gpus`) from probes on this machine: tensor bytes as
    /// measured, plus the card's runtime overhead and an allocator allowance; speed as a roofline
    /// estimate at the card's rates.
    #[arg(long, value_name = "NAME")]
    pub target_gpu: Option<String>,
    /// Print one JSON object (the same shape as `profile --json`).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct TuneArgs {
    /// A catalog name, a folder holding config.json, or a config.json path.
    #[arg(long)]
    pub model: String,
    /// The memory budget: 24G, 24GB, 24GiB (all GiB: memtune's units are binary), 24000M,
    /// 25769803776 (bytes), or `auto` (the detected GPU's total memory). Optional with
    /// --target-gpu (default: the memory that card gives a process).
    #[arg(long, value_name = "SIZE", required_unless_present = "target_gpu")]
    pub gpu_mem: Option<String>,
    /// Plan for this GPU (see `memtune gpus`) from probes on this machine: tensor bytes as
    /// measured, plus the card's runtime overhead and an allocator allowance; speed as a roofline
    /// estimate at the card's rates.
    #[arg(long, value_name = "NAME")]
    pub target_gpu: Option<String>,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 512)]
    pub seq: usize,
    /// Sequences per optimizer step (micro-batch × accumulation).
    #[arg(long, default_value_t = 8)]
    pub effective_batch: usize,
    /// Methods to consider, comma-separated (full,lora,qlora). Default: lora — full and qlora learn
    /// something different, so they are considered only when you allow them.
    #[arg(long, value_name = "LIST", help_heading = "Policy")]
    pub method: Option<String>,
    /// LoRA ranks to consider, comma-separated. Default: 8.
    #[arg(long, value_name = "LIST", help_heading = "Policy")]
    pub rank: Option<String>,
    /// Base quantizations to consider under qlora (q8,q4). Default: both.
    #[arg(long, value_name = "LIST", help_heading = "Policy")]
    pub quant: Option<String>,
    /// Optimizers to consider (adamw,adamw8bit,adafactor,sgd). Default: adamw.
    #[arg(long, value_name = "LIST", help_heading = "Policy")]
    pub optimizer: Option<String>,
    /// Precisions to consider (fp32,bf16,fp16,bf16-pure). Default: fp32,bf16 (fp32,fp16 for a
    /// --target-gpu without bf16). fp16 holds the same bytes as bf16 with a narrower range.
    #[arg(long, value_name = "LIST", help_heading = "Policy")]
    pub precision: Option<String>,
    /// Checkpointing policies to consider (none,full,every:K). Default: none,every:2,full.
    #[arg(long, value_name = "LIST", help_heading = "Policy")]
    pub checkpointing: Option<String>,
    /// Loss modes to consider (chunked,full). Default: both.
    #[arg(long, value_name = "LIST", help_heading = "Policy")]
    pub loss: Option<String>,
    /// Micro-batch sizes to consider. Default: every divisor of --effective-batch.
    #[arg(long, value_name = "LIST", help_heading = "Policy")]
    pub batch: Option<String>,
    /// LoRA alpha (default 2 × rank) and targets (default all) for LoRA candidates.
    #[arg(long, help_heading = "Policy")]
    pub alpha: Option<f64>,
    #[arg(long, value_name = "LIST", help_heading = "Policy")]
    pub lora_targets: Option<String>,
    /// Safety margin: a pick must fit with its predicted peak × (1 + margin). Default 0.05.
    #[arg(long, default_value_t = 0.05)]
    pub margin: f64,
    #[command(flatten)]
    pub calibration: CalibrationArgs,
    /// Write tuned.toml, candidates.csv, the calibration probes (profile.csv) and accuracy.csv here.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Run the pick for real at full depth for a few steps and compare its measured peak with the
    /// prediction and the budget.
    #[arg(long)]
    pub verify: bool,
    /// Go on to fine-tune with the pick on this data file.
    #[arg(long, value_name = "FILE")]
    pub train: Option<PathBuf>,
    /// Optimizer steps for --train.
    #[arg(long, default_value_t = 100)]
    pub steps: usize,
    #[command(flatten)]
    pub hyper: HyperArgs,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Parses a comma-separated list for `flag`.
pub fn parse_list<T: std::str::FromStr<Err = String>>(
    flag: &str,
    text: &Option<String>,
) -> Result<Option<Vec<T>>> {
    let Some(text) = text else { return Ok(None) };
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        out.push(
            part.parse::<T>()
                .map_err(|e| anyhow::anyhow!("{flag}: {e}"))?,
        );
    }
    if out.is_empty() {
        bail!("{flag} is empty");
    }
    Ok(Some(out))
}

fn parse_numbers(flag: &str, text: &Option<String>) -> Result<Option<Vec<usize>>> {
    let Some(text) = text else { return Ok(None) };
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.parse::<usize>() {
            Ok(n) if n > 0 => out.push(n),
            _ => bail!("{flag}: expected whole numbers ≥ 1, got `{part}`"),
        }
    }
    if out.is_empty() {
        bail!("{flag} is empty");
    }
    Ok(Some(out))
}

impl TuneArgs {
    /// The policy request the flags describe, validated against `spec`.
    pub fn policy(&self, spec: &ModelSpec) -> Result<crate::search::PolicyRequest> {
        if self.seq == 0 || self.seq > spec.max_position_embeddings {
            bail!(
                "--seq {} must be between 1 and model `{}`'s {} positions",
                self.seq,
                spec.name,
                spec.max_position_embeddings
            );
        }
        if self.effective_batch == 0 {
            bail!("--effective-batch must be at least 1");
        }
        if !(0.0..1.0).contains(&self.margin) {
            bail!("--margin must be in [0, 1), got {}", self.margin);
        }
        let ranks = parse_numbers("--rank", &self.rank)?;
        let mut lora = config::LoraSettings::default();
        if let Some(targets) = &self.lora_targets {
            lora.targets = config::parse_targets(targets)
                .map_err(|e| anyhow::anyhow!("--lora-targets: {e}"))?;
        }
        if let Some(alpha) = self.alpha {
            if alpha.is_nan() || alpha <= 0.0 {
                bail!("--alpha must be positive");
            }
            lora.alpha = alpha;
        } else if let Some(r) = ranks.as_ref().and_then(|r| r.first()) {
            lora.alpha = 2.0 * *r as f64;
        }
        let methods: Option<Vec<Method>> = parse_list("--method", &self.method)?;
        if methods.as_ref().is_some_and(|m| m.contains(&Method::Qlora)) {
            for (what, width) in [
                ("hidden_size", spec.hidden_size),
                ("intermediate_size", spec.intermediate_size),
            ] {
                if !width.is_multiple_of(32) {
                    bail!(
                        "--method qlora needs {what} divisible by 32; model `{}` has {width}",
                        spec.name
                    );
                }
            }
        }
        Ok(crate::search::PolicyRequest {
            methods,
            ranks,
            quants: parse_list("--quant", &self.quant)?,
            optimizers: parse_list("--optimizer", &self.optimizer)?,
            precisions: parse_list("--precision", &self.precision)?,
            checkpointing: parse_list("--checkpointing", &self.checkpointing)?,
            losses: parse_list("--loss", &self.loss)?,
            micro_batches: parse_numbers("--batch", &self.batch)?,
            effective_batch: self.effective_batch,
            seq: self.seq,
            lora,
        })
    }

    /// The budget in bytes (`--gpu-mem`, which is required without `--target-gpu`).
    pub fn budget_bytes(&self) -> Result<u64> {
        let Some(gpu_mem) = &self.gpu_mem else {
            bail!("--gpu-mem is required (or --target-gpu NAME, to plan for that card's memory)");
        };
        if gpu_mem.trim().eq_ignore_ascii_case("auto") {
            let gpus = crate::device::detect_gpus().map_err(|e| {
                anyhow::anyhow!(
                    "--gpu-mem auto: {e}; give the budget explicitly, e.g. --gpu-mem 24G"
                )
            })?;
            return Ok(gpus[0].total_bytes);
        }
        let bytes = crate::search::parse_bytes(gpu_mem)
            .map_err(|e| anyhow::anyhow!("--gpu-mem {gpu_mem}: {e}"))?;
        if bytes == 0 {
            bail!("--gpu-mem must be more than 0 bytes");
        }
        Ok(bytes)
    }
}

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// A folder holding any of profile.csv, timeline CSVs, candidates.csv, accuracy.csv (recognised by
    /// their header) and tuned.toml, or one such CSV file.
    #[arg(long, value_name = "DIR|FILE.csv")]
    pub from: PathBuf,
    /// Folder to write the charts and index.html into (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Memory budget to draw (e.g. 24G), overriding tuned.toml's; probes are then judged against it.
    #[arg(long, value_name = "SIZE")]
    pub budget: Option<String>,
}

#[derive(Args, Debug)]
pub struct ProfileArgs {
    /// A catalog name, a folder holding config.json, or a config.json path.
    #[arg(long)]
    pub model: String,
    #[command(flatten)]
    pub knobs: KnobArgs,
    /// Probe at this many decoder layers (default: the model's full depth). Memory per layer is the
    /// same at any depth, so a few layers tell the cost model what it needs.
    #[arg(long, value_name = "N")]
    pub layers: Option<usize>,
    /// Measured steps (the median step time is reported; the peak is the maximum).
    #[arg(long, default_value_t = 2)]
    pub steps: usize,
    /// Untimed steps before measuring (lazy initialisation, first-touch costs).
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Device: cpu, or cuda / cuda:N (needs the cuda build).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Append one row per component to this CSV (created with a header if new).
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
    /// Write the memory timeline of the last measured step to this CSV.
    #[arg(long, value_name = "FILE")]
    pub timeline_csv: Option<PathBuf>,
    /// Render the probe's charts (component breakdown, timeline) and an index.html into this folder.
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Clip the global gradient norm to this value; 0 disables clipping. Default 1.0, as `train`.
    #[arg(long, help_heading = "Optimisation")]
    pub clip: Option<f64>,
    #[command(flatten)]
    pub update: UpdateArgs,
}

impl ProfileArgs {
    /// The optimisation settings the probe of `knobs` trains with: the probe's, with `--clip`
    /// and `--update-in-backward`.
    pub fn hyper(&self, knobs: &Knobs) -> Result<Hyper> {
        let clip = HyperArgs {
            clip: self.clip,
            ..HyperArgs::default()
        };
        let hyper = clip.apply(crate::probe::runner::probe_hyper())?;
        self.update.apply(hyper, knobs)
    }

    pub fn to_request(&self) -> Result<crate::probe::runner::ProbeRequest> {
        let full = resolve_model(&self.model)?;
        let spec = match self.layers {
            Some(0) => bail!("--layers must be at least 1"),
            Some(n) if n > full.num_hidden_layers => {
                bail!(
                    "--layers {n}: model `{}` has only {} layers",
                    full.name,
                    full.num_hidden_layers
                )
            }
            Some(n) => full.with_layers(n),
            None => full,
        };
        let knobs = self.knobs.apply(Knobs::default(), &spec)?;
        if self.steps == 0 {
            bail!("--steps must be at least 1");
        }
        Ok(crate::probe::runner::ProbeRequest {
            spec,
            knobs,
            warmup_steps: self.warmup,
            steps: self.steps,
            device: parse_device(&self.device)?,
            seed: self.seed,
        })
    }
}

/// The knobs every command that builds a model shares. Unset flags take the defaults shown.
#[derive(Args, Debug, Clone, Default)]
pub struct KnobArgs {
    /// What to train: full (every weight), lora (adapters on a frozen base), qlora (adapters on a
    /// quantized frozen base).
    #[arg(long, value_name = "full|lora|qlora", help_heading = "Knobs")]
    pub method: Option<Method>,
    /// LoRA rank r (adapters A: r×in, B: out×r). Default 8.
    #[arg(long, value_name = "R", help_heading = "Knobs")]
    pub rank: Option<usize>,
    /// LoRA alpha; the adapter output is scaled by alpha / r. Default 2 × rank.
    #[arg(long, value_name = "ALPHA", help_heading = "Knobs")]
    pub alpha: Option<f64>,
    /// Dropout on the adapters' input during training. Default 0.
    #[arg(long, value_name = "P", help_heading = "Knobs")]
    pub lora_dropout: Option<f64>,
    /// Linear layers that get adapters: comma-separated from q_proj,k_proj,v_proj,o_proj,gate_proj,
    /// up_proj,down_proj, or `all` (default).
    #[arg(long, value_name = "LIST", help_heading = "Knobs")]
    pub lora_targets: Option<String>,
    /// Storage of the frozen base under qlora: q8 (8-bit blocks) or q4 (4-bit blocks). Default q4.
    #[arg(long, value_name = "q8|q4", help_heading = "Knobs")]
    pub quant: Option<Quant>,
    /// fp32; bf16 / fp16 = mixed (compute and frozen weights in 16 bits, trainable weights, gradients
    /// and optimizer state in fp32; fp16 adds loss scaling); bf16-pure = everything in bf16. Default fp32.
    #[arg(long, value_name = "fp32|bf16|fp16|bf16-pure", help_heading = "Knobs")]
    pub precision: Option<Precision>,
    /// Gradient checkpointing: none, full (recompute every layer in backward), or every:K
    /// (recompute one layer in K). Default none.
    #[arg(long, value_name = "none|full|every:K", help_heading = "Knobs")]
    pub checkpointing: Option<Checkpointing>,
    /// Micro-batch size: sequences per forward/backward. Default 1.
    #[arg(long, value_name = "N", help_heading = "Knobs")]
    pub batch: Option<usize>,
    /// Gradient accumulation: micro-batches per optimizer step. Default 1.
    #[arg(long, value_name = "N", help_heading = "Knobs")]
    pub accum: Option<usize>,
    /// Tokens per sequence. Default 256.
    #[arg(long, value_name = "N", help_heading = "Knobs")]
    pub seq: Option<usize>,
    /// adamw, adamw8bit (block-wise 8-bit moments), adafactor (factored second moments), sgd
    /// (with momentum). Default adamw.
    #[arg(long, value_name = "NAME", help_heading = "Knobs")]
    pub optimizer: Option<OptimizerKind>,
    /// chunked (logits a block of rows at a time, about 16M values: 110 rows at a 152k vocabulary,
    /// 1024 at 16k; a frozen head's, under LoRA and QLoRA, also in blocks of vocabulary columns,
    /// about 1M values; default) or full (the whole fp32 logits tensor).
    #[arg(long, value_name = "chunked|full", help_heading = "Knobs")]
    pub loss: Option<LossMode>,
}

impl KnobArgs {
    /// Applies the flags that were given on top of `base`, then validates the result for `spec`.
    pub fn apply(&self, mut k: Knobs, spec: &ModelSpec) -> Result<Knobs> {
        if let Some(v) = self.method {
            k.method = v;
        }
        if let Some(v) = self.rank {
            k.lora.rank = v;
            if self.alpha.is_none() {
                k.lora.alpha = 2.0 * v as f64;
            }
        }
        if let Some(v) = self.alpha {
            k.lora.alpha = v;
        }
        if let Some(v) = self.lora_dropout {
            k.lora.dropout = v;
        }
        if let Some(v) = &self.lora_targets {
            k.lora.targets =
                config::parse_targets(v).map_err(|e| anyhow::anyhow!("--lora-targets: {e}"))?;
        }
        if let Some(v) = self.quant {
            k.quant = v;
        }
        if let Some(v) = self.precision {
            k.precision = v;
        }
        if let Some(v) = self.checkpointing {
            k.checkpointing = v;
        }
        if let Some(v) = self.batch {
            k.batch = v;
        }
        if let Some(v) = self.accum {
            k.accum = v;
        }
        if let Some(v) = self.seq {
            k.seq = v;
        }
        if let Some(v) = self.optimizer {
            k.optimizer = v;
        }
        if let Some(v) = self.loss {
            k.loss = v;
        }
        validate_knobs(&k, spec)?;
        Ok(k)
    }
}

/// Rejects knob values no run can use, naming the flag.
pub fn validate_knobs(k: &Knobs, spec: &ModelSpec) -> Result<()> {
    if k.lora.rank == 0 {
        bail!("--rank must be at least 1 (the LoRA rank r)");
    }
    if !(k.lora.alpha > 0.0 && k.lora.alpha.is_finite()) {
        bail!("--alpha must be a positive number, got {}", k.lora.alpha);
    }
    if !(0.0..1.0).contains(&k.lora.dropout) {
        bail!("--lora-dropout must be in [0, 1), got {}", k.lora.dropout);
    }
    if k.batch == 0 {
        bail!("--batch must be at least 1 (sequences per micro-batch)");
    }
    if k.accum == 0 {
        bail!("--accum must be at least 1 (micro-batches per optimizer step)");
    }
    if k.seq == 0 {
        bail!("--seq must be at least 1 token");
    }
    if k.seq > spec.max_position_embeddings {
        bail!(
            "--seq {} is beyond model `{}`'s {} positions (max_position_embeddings)",
            k.seq,
            spec.name,
            spec.max_position_embeddings
        );
    }
    if k.method == Method::Qlora {
        for (what, width) in [
            ("hidden_size", spec.hidden_size),
            ("intermediate_size", spec.intermediate_size),
            ("q_dim", spec.q_dim()),
        ] {
            if !width.is_multiple_of(32) {
                bail!(
                    "--method qlora needs {what} divisible by 32 (ggml blocks); model `{}` has {width}",
                    spec.name
                );
            }
        }
    }
    if let Checkpointing::Every(0) = k.checkpointing {
        bail!("--checkpointing every:K needs K ≥ 1");
    }
    Ok(())
}

/// Optimisation flags.
#[derive(Args, Debug, Clone, Default)]
pub struct HyperArgs {
    /// Peak learning rate. Default 1e-3 (LoRA) — use ~1e-4 or lower for full fine-tuning of a real model.
    #[arg(long, help_heading = "Optimisation")]
    pub lr: Option<f64>,
    /// Decoupled weight decay. Default 0.
    #[arg(long, help_heading = "Optimisation")]
    pub weight_decay: Option<f64>,
    /// Learning-rate schedule: constant, or cosine (linear warm-up, then cosine to 10% of --lr).
    #[arg(long, value_name = "constant|cosine", help_heading = "Optimisation")]
    pub schedule: Option<Schedule>,
    /// Warm-up steps for the cosine schedule. Default 0.
    #[arg(long, value_name = "N", help_heading = "Optimisation")]
    pub warmup: Option<usize>,
    /// Clip the global gradient norm to this value; 0 disables clipping. Default 1.0.
    #[arg(long, help_heading = "Optimisation")]
    pub clip: Option<f64>,
    /// SGD momentum. Default 0.9.
    #[arg(long, help_heading = "Optimisation")]
    pub momentum: Option<f64>,
}

/// How the update meets backward (shared by `train` and `profile`).
#[derive(Args, Debug, Clone, Default)]
pub struct UpdateArgs {
    /// Update each layer's weights as soon as backward has made their gradients, and free them:
    /// a full fine-tune then holds one layer's gradients at a time instead of all of them until the
    /// end of the step (besides a tied embedding's; the embedding's and the head's too, unless the
    /// optimizer is adamw on the CPU, which updates them by blocks of rows). Same updates as
    /// without it. Needs --clip 0 and --accum 1, and not fp16. `tune`'s predictions do not count
    /// the saving.
    #[arg(long, help_heading = "Optimisation")]
    pub update_in_backward: bool,
}

impl UpdateArgs {
    /// `h` with these flags, refused (naming the flags) where `knobs` or `h` rule them out.
    fn apply(&self, mut h: Hyper, knobs: &Knobs) -> Result<Hyper> {
        if self.update_in_backward {
            h.update_in_backward = true;
        }
        if let Some(why) = h.update_in_backward_conflict(knobs) {
            bail!("{why}");
        }
        Ok(h)
    }
}

impl HyperArgs {
    pub fn apply(&self, mut h: Hyper) -> Result<Hyper> {
        if let Some(v) = self.lr {
            h.lr = v;
        }
        if let Some(v) = self.weight_decay {
            h.weight_decay = v;
        }
        if let Some(v) = self.schedule {
            h.schedule = v;
        }
        if let Some(v) = self.warmup {
            h.warmup_steps = v;
        }
        if let Some(v) = self.clip {
            h.clip = v;
        }
        if let Some(v) = self.momentum {
            h.momentum = v;
        }
        if !(h.lr > 0.0 && h.lr.is_finite()) {
            bail!("--lr must be a positive number, got {}", h.lr);
        }
        if h.weight_decay < 0.0 || !h.weight_decay.is_finite() {
            bail!("--weight-decay must be ≥ 0, got {}", h.weight_decay);
        }
        if h.clip < 0.0 || !h.clip.is_finite() {
            bail!("--clip must be ≥ 0 (0 disables clipping), got {}", h.clip);
        }
        if !(0.0..1.0).contains(&h.momentum) {
            bail!("--momentum must be in [0, 1), got {}", h.momentum);
        }
        Ok(h)
    }
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// A TOML file with the run's settings: the `tuned.toml` that `memtune tune` writes (`model`,
    /// `[knobs]`, `[hyper]`), plus optional `[data]` (train, eval_fraction, bad_lines), `[output]`
    /// (dir, save_every, eval_every, merged, keep_checkpoints) and `[train]` (steps, seed, device)
    /// tables. Flags override the file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A GGUF file (weights, architecture and tokenizer), a Hugging Face folder (config.json,
    /// model.safetensors or shards, tokenizer.json), a config.json path, or a catalog name (see
    /// `memtune models`). Without weights the model starts from random init and a byte tokenizer.
    #[arg(long)]
    pub model: Option<String>,
    /// Training data: .jsonl (one object a line: `text`; `instruction`/`input`/`output`; or chat
    /// `messages`, rendered with the model's ChatML template) or plain text (one example per paragraph).
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// Optimizer steps to run. Default 100.
    #[arg(long)]
    pub steps: Option<usize>,
    #[command(flatten)]
    pub knobs: KnobArgs,
    #[command(flatten)]
    pub hyper: HyperArgs,
    #[command(flatten)]
    pub update: UpdateArgs,
    /// Random seed (initialisation, data order, dropout). Default 0.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Device: cpu, or cuda / cuda:N (needs the cuda build). Default cpu.
    #[arg(long)]
    pub device: Option<String>,
    /// Share of the examples held out for evaluation loss (0: evaluate on training windows). Default 0.1.
    #[arg(long)]
    pub eval_fraction: Option<f64>,
    /// Malformed JSONL lines: fail (stop with the line number; the default) or skip (count and go on).
    #[arg(long, value_name = "fail|skip")]
    pub bad_lines: Option<String>,
    /// pack: examples back to back in windows of --seq tokens (the default; no compute on padding);
    /// pad: one example per sequence, right-padded or cut to --seq (examples never see each other).
    #[arg(long, value_name = "pack|pad")]
    pub packing: Option<String>,
    /// Folder for results, created if missing: loss_log.csv, summary.json, adapter/ (PEFT),
    /// merged/ (Hugging Face folder), checkpoints/step-N/.
    #[arg(long, value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// Save a checkpoint every N steps under DIR/checkpoints (needs --output). Default: never.
    #[arg(long, value_name = "N")]
    pub save_every: Option<usize>,
    /// Evaluate the held-out loss every N steps (always before the first and after the last).
    #[arg(long, value_name = "N")]
    pub eval_every: Option<usize>,
    /// Continue from a checkpoint folder, or from the newest checkpoint of an output folder. The
    /// run's settings must match the checkpoint's; the loss curve continues exactly.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Do not write merged full weights at the end (they are as large as the model in fp32).
    #[arg(long)]
    pub no_merged: bool,
    /// Checkpoints to keep (the newest). Default 3.
    #[arg(long, value_name = "N")]
    pub keep_checkpoints: Option<usize>,
    /// Stop after step N as if killed (for testing --resume).
    #[arg(long, value_name = "N", hide = true)]
    pub stop_after: Option<usize>,
    /// Print one JSON object at the end instead of a summary.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A GGUF file or a folder with weights (e.g. the `merged` folder `memtune train` writes).
    #[arg(long)]
    pub model: String,
    /// A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    #[arg(long)]
    pub prompt: String,
    /// Most new tokens. Default 64.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 (the default) is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Wrap the prompt in the model's chat template (a user turn, then the assistant's opening).
    #[arg(long)]
    pub chat: bool,
    /// A system prompt for --chat (instead of the template's default one).
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
    /// Seed for sampling (with --temperature above 0).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print one JSON object (prompt, completion, token ids).
    #[arg(long)]
    pub json: bool,
}

impl GenerateArgs {
    pub fn validate(&self) -> Result<Device> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!(
                "--temperature must be ≥ 0 (0 is greedy), got {}",
                self.temperature
            );
        }
        if self.max_tokens == 0 {
            bail!("--max-tokens must be at least 1");
        }
        if self.system.is_some() && !self.chat {
            bail!("--system needs --chat");
        }
        parse_device(&self.device)
    }
}

/// Resolves `--target-gpu`: the catalog card, or an error naming the flag and the closest cards.
pub fn resolve_target_gpu(arg: &Option<String>) -> Result<Option<crate::gpu_plan::GpuProfile>> {
    arg.as_deref()
        .map(|name| {
            crate::gpu_plan::find_gpu(name).map_err(|e| anyhow::anyhow!("--target-gpu: {e}"))
        })
        .transpose()
}

/// Resolves `--model`, turning the spec error into one that names the flag.
pub fn resolve_model(arg: &str) -> Result<ModelSpec> {
    spec::resolve_model(arg).with_context(|| format!("--model {arg}"))
}

/// Parses `--device`.
pub fn parse_device(arg: &str) -> Result<Device> {
    let arg = arg.trim().to_ascii_lowercase();
    if arg == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match arg.as_str() {
        "cuda" | "gpu" => 0,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => bail!("--device {arg}: expected cpu, cuda or cuda:N"),
        },
    };
    if !cfg!(feature = "cuda") {
        bail!(
            "--device {arg}: this memtune was built without CUDA support; build with `cargo build --release --no-default-features --features cuda` (see scripts/check-cuda.sh), or use --device cpu"
        );
    }
    Device::new_cuda(ordinal)
        .with_context(|| format!("--device {arg}: cannot open CUDA device {ordinal}"))
}

pub fn parse_bad_lines(arg: &str) -> Result<BadLinePolicy> {
    match arg {
        "fail" => Ok(BadLinePolicy::Fail),
        "skip" => Ok(BadLinePolicy::Skip),
        other => bail!("--bad-lines {other}: expected fail or skip"),
    }
}

impl TrainArgs {
    pub fn to_request(&self) -> Result<crate::train::TrainRequest> {
        use crate::train::config::TrainFile;
        let file = match &self.config {
            Some(path) => TrainFile::read(path)?,
            None => TrainFile::default(),
        };
        let data_file = file.data.clone().unwrap_or_default();
        let out_file = file.output.clone().unwrap_or_default();
        let run_file = file.train.clone().unwrap_or_default();
        let from_file = |what: &str| {
            self.config
                .as_ref()
                .map(|c| format!(" (or `{what}` in {})", c.display()))
                .unwrap_or_default()
        };
        let model = self
            .model
            .clone()
            .or(file.model.clone())
            .with_context(|| format!("--model is required{}", from_file("model")))?;
        let data = self
            .data
            .clone()
            .or(data_file.train)
            .with_context(|| format!("--data is required{}", from_file("[data] train")))?;
        let spec = resolve_model(&model)?;
        let knobs = self.knobs.apply(file.knobs(Knobs::default())?, &spec)?;
        let hyper = self.hyper.apply(file.hyper(Hyper::default())?)?;
        let hyper = self.update.apply(hyper, &knobs)?;
        let steps = self.steps.or(run_file.steps).unwrap_or(100);
        if steps == 0 {
            bail!("--steps must be at least 1");
        }
        let eval_fraction = self
            .eval_fraction
            .or(data_file.eval_fraction)
            .unwrap_or(0.1);
        if !(0.0..1.0).contains(&eval_fraction) {
            bail!("--eval-fraction must be in [0, 1), got {eval_fraction}");
        }
        if !data.is_file() {
            bail!("--data {}: no such file", data.display());
        }
        let output = self.output.clone().or(out_file.dir);
        if let Some(dir) = &output {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("--output {}: cannot create the folder", dir.display()))?;
        }
        let save_every = self.save_every.or(out_file.save_every).unwrap_or(0);
        if save_every > 0 && output.is_none() && self.resume.is_none() {
            bail!("--save-every needs --output (the folder checkpoints go under)");
        }
        let defaults = crate::train::RunOptions::default();
        let packing = match self.packing.clone().or(data_file.packing.clone()) {
            Some(p) => p
                .parse()
                .map_err(|e: String| anyhow::anyhow!("--packing: {e}"))?,
            None => crate::data::Packing::default(),
        };
        let options = crate::train::RunOptions {
            packing,
            save_every,
            eval_every: self.eval_every.or(out_file.eval_every).unwrap_or(0),
            resume: self.resume.clone(),
            merged: !self.no_merged && out_file.merged.unwrap_or(defaults.merged),
            keep_checkpoints: self
                .keep_checkpoints
                .or(out_file.keep_checkpoints)
                .unwrap_or(defaults.keep_checkpoints),
            stop_after: self.stop_after,
            ..defaults
        };
        let bad_lines = self
            .bad_lines
            .clone()
            .or(data_file.bad_lines.clone())
            .unwrap_or_else(|| "fail".to_string());
        let device = self
            .device
            .clone()
            .or(run_file.device)
            .unwrap_or_else(|| "cpu".to_string());
        Ok(crate::train::TrainRequest {
            model,
            spec,
            knobs,
            hyper,
            data,
            steps,
            seed: self.seed.or(run_file.seed).unwrap_or(0),
            device: parse_device(&device)?,
            output,
            eval_fraction,
            bad_lines: parse_bad_lines(&bad_lines)?,
            options,
        })
    }
}
