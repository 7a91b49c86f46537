//! The trainer: runs a configuration for real on a dataset. Loads the model's weights and tokenizer
//! when `--model` brings them, tokenizes and windows the data, holds out an evaluation split, runs
//! optimizer steps with accumulation, reports progress, writes the loss log as it goes (each write
//! replaces the file atomically) and checkpoints every N steps, and at the end writes the LoRA
//! adapter (PEFT folder) and merged weights (Hugging Face folder) under the output folder.

pub mod checkpoint;
pub mod config;
pub mod export;
pub mod generate;

use crate::config::{Hyper, Knobs, Method};
use crate::data::{self, BadLinePolicy, ByteTokenizer, HfTokenizer, Packing, Tokenizer, Windows};
use crate::engine::step::{Batch, Engine, NoObserver};
use crate::engine::weights::WeightFiles;
use crate::engine::{Model, RandomInit};
use crate::probe::meter::{CpuMeter, CudaMeter, MemoryMeter};
use crate::spec::ModelSpec;
use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Everything a training run needs, validated.
#[derive(Debug, Clone)]
pub struct TrainRequest {
    /// `--model` as given: where weights and tokenizer are looked for (a GGUF file or a folder
    /// with weights; otherwise the model starts from random initialisation).
    pub model: String,
    pub spec: ModelSpec,
    pub knobs: Knobs,
    pub hyper: Hyper,
    pub data: PathBuf,
    pub steps: usize,
    pub seed: u64,
    pub device: Device,
    pub output: Option<PathBuf>,
    /// Share of windows held out for evaluation (0 evaluates on a fixed sample of training windows).
    pub eval_fraction: f64,
    pub bad_lines: BadLinePolicy,
    pub options: RunOptions,
}

/// How a run lays out its data, what it writes and when, and how it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOptions {
    /// Examples packed back to back into windows, or one per padded sequence.
    pub packing: Packing,
    /// Save a checkpoint every N optimizer steps (0: never). Needs an output folder.
    pub save_every: usize,
    /// Evaluate every N steps (0: only before the first step and after the last).
    pub eval_every: usize,
    /// A checkpoint folder, or an output folder whose newest checkpoint to continue from.
    pub resume: Option<PathBuf>,
    /// Write merged full weights (Hugging Face folder) at the end.
    pub merged: bool,
    /// Checkpoints kept (the newest ones).
    pub keep_checkpoints: usize,
    /// Stop after this step as if the process were killed (no final exports): tests of resume.
    pub stop_after: Option<usize>,
    /// Evaluation micro-batches (the first ones of the held-out windows).
    pub eval_batches: usize,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            packing: Packing::Pack,
            save_every: 0,
            eval_every: 0,
            resume: None,
            merged: true,
            keep_checkpoints: 3,
            stop_after: None,
            eval_batches: 8,
        }
    }
}

/// Progress after each optimizer step.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub step: usize,
    pub loss: f64,
    /// Set on the steps that evaluate (`--eval-every`, and the last).
    pub eval_loss: Option<f64>,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub step_s: f64,
    /// Peak memory during the step, when the device can be measured.
    pub memory_bytes: Option<u64>,
    pub skipped: bool,
}

/// The end of a run, as `--json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub model: String,
    /// Mean loss on the evaluation windows before the first step.
    pub initial_loss: f64,
    /// Mean loss on the evaluation windows after the last step.
    pub final_loss: f64,
    /// Training loss of the first and last optimizer steps.
    pub first_step_loss: f64,
    pub last_step_loss: f64,
    /// Optimizer steps done (all of them, across a resume).
    pub steps: usize,
    /// The step the run resumed from, if it did.
    pub resumed_from_step: Option<usize>,
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub wall_s: f64,
    pub trainable_params: u64,
    pub total_params: u64,
    pub train_windows: usize,
    pub eval_windows: usize,
    pub skipped_lines: usize,
    /// `model` (the model's own tokenizer) or `bytes`.
    pub tokenizer: &'static str,
    /// Folders written at the end (adapter, merged weights).
    pub written: Vec<PathBuf>,
    pub config: RunConfig,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunConfig {
    pub knobs: Knobs,
    pub hyper: Hyper,
    pub seed: u64,
    pub device: String,
    pub precision_means: &'static str,
}

pub fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(_) => "cuda".to_string(),
        Device::Metal(_) => "metal".to_string(),
    }
}

/// Mean loss of `model` over `batches` (forward only).
pub fn eval_loss(model: &Model, batches: &[Batch]) -> Result<f64> {
    let normalizer = batches
        .iter()
        .map(|b| b.counted_tokens)
        .sum::<usize>()
        .max(1) as f64;
    let mut total = 0.0;
    for b in batches {
        let targets = crate::engine::ops::LossTargets {
            ids: b.targets.clone(),
            mask: b.mask.clone(),
            normalizer,
        };
        let mut x = model.embed(&b.ids)?;
        for l in 0..model.layers.len() {
            x = model.layer_forward(l, &x, false)?;
        }
        total += model
            .head_loss(&x, &targets, None, None)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    Ok(total)
}

/// Runs `req`, calling `progress` after every optimizer step.
pub fn run(req: &TrainRequest, progress: &mut dyn FnMut(&StepReport)) -> Result<TrainSummary> {
    let opts = &req.options;
    // The model's own tokenizer when it brings one (GGUF, tokenizer.json), else bytes.
    let hf_tokenizer = HfTokenizer::for_model(&req.model)?;
    let tokenizer: &dyn Tokenizer = match &hf_tokenizer {
        Some(t) => t,
        None => &ByteTokenizer,
    };
    data::tokenizer::check_fits(tokenizer, req.spec.vocab_size, &req.spec.name)?;
    let (examples, skipped_lines) = data::load_examples(&req.data, tokenizer, req.bad_lines)?;
    let (train_examples, eval_examples) = split(&examples, req.eval_fraction);
    let windows_of = |ex: &[data::Example]| {
        Windows::with_packing(ex, req.knobs.seq, req.seed, tokenizer.pad(), opts.packing)
            .with_context(|| format!("data file `{}`", req.data.display()))
    };
    let mut windows = windows_of(train_examples)?;
    let eval_windows = windows_of(eval_examples.unwrap_or(train_examples))?;
    let mut eval_batches = eval_windows.all_batches(req.knobs.batch, &req.device)?;
    eval_batches.truncate(opts.eval_batches.max(1));

    // Fail on a bad checkpoint or output folder before loading the model.
    let checkpoint = match &opts.resume {
        Some(dir) => Some(checkpoint::Checkpoint::read(&checkpoint::resolve(dir)?)?),
        None => None,
    };
    let output = match (&req.output, &checkpoint) {
        (Some(dir), _) => Some(dir.clone()),
        // Resuming without --output continues in the run folder the checkpoint sits in.
        (None, Some(c)) => c.dir.parent().and_then(Path::parent).map(Path::to_path_buf),
        (None, None) => None,
    };
    if let Some(dir) = &output {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("--output {}: cannot create the folder", dir.display()))?;
    }
    let settings = checkpoint::RunSettings {
        model: req.model.clone(),
        knobs: req.knobs.clone(),
        hyper: req.hyper.clone(),
        steps: req.steps,
        seed: req.seed,
        eval_fraction: req.eval_fraction,
        packing: opts.packing,
        data_fingerprint: checkpoint::fingerprint(&req.data)?,
    };

    let model = match WeightFiles::locate(&req.model) {
        Some(files) => {
            let mut source = files.open(&req.spec)?;
            Model::build(&req.spec, &req.knobs, &req.device, &mut *source, req.seed)
                .with_context(|| format!("loading weights from `{}`", files.path().display()))?
        }
        None => Model::build(
            &req.spec,
            &req.knobs,
            &req.device,
            &mut RandomInit::new(req.seed),
            req.seed,
        )?,
    };
    let trainable_params: u64 = model
        .trainable()
        .iter()
        .map(|p| p.var.elem_count() as u64)
        .sum();
    let mut engine = Engine::new(model, req.hyper.clone())?;

    let mut log = String::from(LOSS_LOG_HEADER);
    let mut state = match &checkpoint {
        Some(c) => {
            let differences = settings.differences(&c.state.settings);
            if !differences.is_empty() {
                bail!(
                    "--resume {}: the run's settings differ from the checkpoint's, so the loss curve could not continue: {}",
                    c.dir.display(),
                    differences.join("; ")
                );
            }
            c.restore(&mut engine)?;
            windows.seek(c.state.data_epoch, c.state.data_position);
            log = c.loss_log.clone();
            c.state.clone()
        }
        None => {
            let initial_loss = eval_loss(&engine.model, &eval_batches)?;
            checkpoint::CheckpointState {
                step: 0,
                data_epoch: 0,
                data_position: 0,
                scaler: engine.scaler.clone(),
                tokens: 0,
                wall_s: 0.0,
                initial_loss,
                first_step_loss: f64::NAN,
                last_step_loss: f64::NAN,
                last_eval_loss: initial_loss,
                settings: settings.clone(),
            }
        }
    };
    let resumed_from = checkpoint.as_ref().map(|c| c.state.step);
    let log_path = output.as_ref().map(|dir| dir.join(LOSS_LOG));
    if let Some(path) = &log_path {
        write_atomic(path, log.as_bytes())?;
    }
    let meter = step_meter(&req.device);
    let started = Instant::now();
    let wall_before = state.wall_s;
    let mut tokens_this_run = 0;
    for step in state.step..req.steps {
        let lr = req.hyper.lr_at(step, req.steps);
        let micro: Vec<Batch> = (0..req.knobs.accum)
            .map(|_| windows.next_batch(req.knobs.batch, &req.device))
            .collect::<Result<_>>()?;
        if let Some(m) = &meter {
            m.reset_peak();
        }
        let t = Instant::now();
        let stats = engine.train_step(&micro, lr, &mut NoObserver)?;
        let step_s = t.elapsed().as_secs_f64();
        let memory_bytes = meter.as_ref().map(|m| m.peak_bytes());
        if !stats.loss.is_finite() {
            bail!(
                "training diverged at step {}: loss is {} (try a lower --lr)",
                step + 1,
                stats.loss
            );
        }
        state.step = step + 1;
        state.tokens += stats.tokens;
        tokens_this_run += stats.tokens;
        if step == 0 {
            state.first_step_loss = stats.loss;
        }
        state.last_step_loss = stats.loss;
        let last = state.step == req.steps;
        let evaluate = last || (opts.eval_every > 0 && state.step.is_multiple_of(opts.eval_every));
        let eval = if evaluate {
            let loss = eval_loss(&engine.model, &eval_batches)?;
            state.last_eval_loss = loss;
            Some(loss)
        } else {
            None
        };
        let report = StepReport {
            step: state.step,
            loss: stats.loss,
            eval_loss: eval,
            lr,
            grad_norm: stats.grad_norm,
            tokens_per_s: stats.tokens as f64 / step_s,
            step_s,
            memory_bytes,
            skipped: stats.skipped,
        };
        log.push_str(&format!(
            "{},{:.6},{},{:.3e},{:.4},{:.1},{:.4},{}\n",
            report.step,
            report.loss,
            eval.map(|l| format!("{l:.6}")).unwrap_or_default(),
            lr,
            report.grad_norm,
            report.tokens_per_s,
            step_s,
            memory_bytes.map(|b| b.to_string()).unwrap_or_default(),
        ));
        if let Some(path) = &log_path {
            write_atomic(path, log.as_bytes())?;
        }
        if let Some(dir) = &output
            && opts.save_every > 0
            && state.step.is_multiple_of(opts.save_every)
        {
            state.data_epoch = windows.epoch;
            state.data_position = windows.position;
            state.scaler = engine.scaler.clone();
            state.wall_s = wall_before + started.elapsed().as_secs_f64();
            checkpoint::save(
                &checkpoint::checkpoint_dir(dir, state.step),
                &engine,
                &state,
                &log,
            )?;
            checkpoint::prune(dir, opts.keep_checkpoints)?;
        }
        progress(&report);
        if opts.stop_after == Some(state.step) {
            break;
        }
    }
    let wall_s = started.elapsed().as_secs_f64();
    let finished = state.step == req.steps;
    let mut written = Vec::new();
    if let Some(dir) = &output
        && finished
    {
        if req.knobs.method != Method::Full {
            let adapter = dir.join(ADAPTER_DIR);
            export::write_peft_adapter(&adapter, &engine.model, &req.model)?;
            written.push(adapter);
        }
        if opts.merged {
            let merged = dir.join(MERGED_DIR);
            export::write_merged(&merged, &engine.model, hf_tokenizer.as_ref())?;
            written.push(merged);
        }
    }
    let summary = TrainSummary {
        model: req.spec.name.clone(),
        initial_loss: state.initial_loss,
        final_loss: state.last_eval_loss,
        first_step_loss: state.first_step_loss,
        last_step_loss: state.last_step_loss,
        steps: state.step,
        resumed_from_step: resumed_from,
        tokens: state.tokens,
        tokens_per_s: tokens_this_run as f64 / wall_s.max(1e-9),
        wall_s: wall_before + wall_s,
        trainable_params,
        total_params: req.spec.param_count(),
        train_windows: windows.len(),
        eval_windows: eval_windows.len(),
        skipped_lines,
        tokenizer: if hf_tokenizer.is_some() {
            "model"
        } else {
            "bytes"
        },
        written,
        config: RunConfig {
            knobs: req.knobs.clone(),
            hyper: req.hyper.clone(),
            seed: req.seed,
            device: device_name(&req.device),
            precision_means: req.knobs.precision.describe(),
        },
    };
    if let Some(dir) = &output {
        write_atomic(
            &dir.join("summary.json"),
            (serde_json::to_string_pretty(&summary)? + "\n").as_bytes(),
        )?;
    }
    Ok(summary)
}

/// Where the run's weights and tokenizer come from, for people.
pub fn describe_sources(req: &TrainRequest) -> String {
    let weights = match WeightFiles::locate(&req.model) {
        Some(files) => format!("weights from {}", files.path().display()),
        None => format!(
            "random initialisation (seed {}): `{}` brings no weights",
            req.seed, req.model
        ),
    };
    let tokenizer = match HfTokenizer::for_model(&req.model) {
        Ok(Some(_)) => "the model's tokenizer",
        Ok(None) => "a byte-level tokenizer",
        Err(_) => "a tokenizer that fails to load",
    };
    format!("{weights}; {tokenizer}")
}

/// The loss log's file name and columns, one row per step. `eval_loss` is empty on steps without
/// evaluation (the loss before the first step is `initial_loss` in `summary.json`); `memory_bytes` is the step's peak: the heap on CPU
/// (exact, from the counting allocator), device memory in use on CUDA.
pub const LOSS_LOG: &str = "loss_log.csv";
pub const LOSS_LOG_HEADER: &str =
    "step,train_loss,eval_loss,lr,grad_norm,tokens_per_s,step_s,memory_bytes\n";
/// Sub-folders of `--output`.
pub const ADAPTER_DIR: &str = "adapter";
pub const MERGED_DIR: &str = "merged";

fn step_meter(device: &Device) -> Option<Box<dyn MemoryMeter>> {
    match device {
        Device::Cpu => Some(Box::new(CpuMeter::new())),
        Device::Cuda(_) => {
            let ordinal = match device.location() {
                candle_core::DeviceLocation::Cuda { gpu_id } => gpu_id,
                _ => 0,
            };
            CudaMeter::new(ordinal)
                .ok()
                .map(|m| Box::new(m) as Box<dyn MemoryMeter>)
        }
        _ => None,
    }
}

/// Holds out the last `fraction` of examples (at least one) when there are enough of them.
fn split(
    examples: &[data::Example],
    fraction: f64,
) -> (&[data::Example], Option<&[data::Example]>) {
    let held = (examples.len() as f64 * fraction).round() as usize;
    if fraction <= 0.0 || held == 0 || held >= examples.len() {
        return (examples, None);
    }
    let (train, eval) = examples.split_at(examples.len() - held);
    (train, Some(eval))
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a reader never sees half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write `{}`", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move `{}` into place", path.display()))?;
    Ok(())
}
