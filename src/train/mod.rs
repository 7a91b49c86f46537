//! The trainer: runs a configuration for real on a dataset. Tokenizes and windows the data, holds out
//! an evaluation split, runs optimizer steps with accumulation, reports progress, and writes the loss
//! log as it goes (each write replaces the file atomically).

use crate::config::{Hyper, Knobs};
use crate::data::{self, BadLinePolicy, ByteTokenizer, Tokenizer, Windows};
use crate::engine::step::{Batch, Engine, NoObserver};
use crate::engine::{Model, RandomInit};
use crate::spec::ModelSpec;
use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Everything a training run needs, validated.
#[derive(Debug, Clone)]
pub struct TrainRequest {
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
}

/// Progress after each optimizer step.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub step_s: f64,
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
    pub steps: usize,
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub wall_s: f64,
    pub trainable_params: u64,
    pub total_params: u64,
    pub train_windows: usize,
    pub eval_windows: usize,
    pub skipped_lines: usize,
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
            .head_loss(&x, &targets)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    Ok(total)
}

/// Runs `req`, calling `progress` after every optimizer step.
pub fn run(req: &TrainRequest, progress: &mut dyn FnMut(&StepReport)) -> Result<TrainSummary> {
    let tokenizer = ByteTokenizer;
    if req.spec.vocab_size < tokenizer.vocab_size() {
        bail!(
            "model `{}` has a vocabulary of {} tokens; the byte-level tokenizer needs at least {}",
            req.spec.name,
            req.spec.vocab_size,
            tokenizer.vocab_size()
        );
    }
    let (examples, skipped_lines) = data::load_examples(&req.data, &tokenizer, req.bad_lines)?;
    let (train_examples, eval_examples) = split(&examples, req.eval_fraction);
    let mut windows = Windows::new(train_examples, req.knobs.seq, req.seed, tokenizer.pad())
        .with_context(|| format!("data file `{}`", req.data.display()))?;
    let eval_windows = match eval_examples {
        Some(ex) => Windows::new(ex, req.knobs.seq, req.seed, tokenizer.pad())?,
        None => Windows::new(train_examples, req.knobs.seq, req.seed, tokenizer.pad())?,
    };
    let mut eval_batches = eval_windows.all_batches(req.knobs.batch, &req.device)?;
    eval_batches.truncate(8);

    let model = Model::build(
        &req.spec,
        &req.knobs,
        &req.device,
        &mut RandomInit::new(req.seed),
        req.seed,
    )?;
    let trainable_params: u64 = model
        .trainable()
        .iter()
        .map(|p| p.var.elem_count() as u64)
        .sum();
    let mut engine = Engine::new(model, req.hyper.clone())?;
    let initial_loss = eval_loss(&engine.model, &eval_batches)?;

    let log_path = req.output.as_ref().map(|dir| dir.join("loss_log.csv"));
    let mut log = String::from("step,train_loss,lr,grad_norm,tokens_per_s,step_s\n");
    let started = Instant::now();
    let mut tokens = 0;
    let (mut first_step_loss, mut last_step_loss) = (f64::NAN, f64::NAN);
    for step in 0..req.steps {
        let lr = req.hyper.lr_at(step, req.steps);
        let micro: Vec<Batch> = (0..req.knobs.accum)
            .map(|_| windows.next_batch(req.knobs.batch, &req.device))
            .collect::<Result<_>>()?;
        let t = Instant::now();
        let stats = engine.train_step(&micro, lr, &mut NoObserver)?;
        let step_s = t.elapsed().as_secs_f64();
        if !stats.loss.is_finite() {
            bail!(
                "training diverged at step {}: loss is {} (try a lower --lr)",
                step + 1,
                stats.loss
            );
        }
        tokens += stats.tokens;
        if step == 0 {
            first_step_loss = stats.loss;
        }
        last_step_loss = stats.loss;
        let report = StepReport {
            step: step + 1,
            loss: stats.loss,
            lr,
            grad_norm: stats.grad_norm,
            tokens_per_s: stats.tokens as f64 / step_s,
            step_s,
            skipped: stats.skipped,
        };
        log.push_str(&format!(
            "{},{:.6},{:.3e},{:.4},{:.1},{:.4}\n",
            report.step, report.loss, lr, report.grad_norm, report.tokens_per_s, step_s
        ));
        if let Some(path) = &log_path {
            write_atomic(path, log.as_bytes())?;
        }
        progress(&report);
    }
    let wall_s = started.elapsed().as_secs_f64();
    let final_loss = eval_loss(&engine.model, &eval_batches)?;
    Ok(TrainSummary {
        model: req.spec.name.clone(),
        initial_loss,
        final_loss,
        first_step_loss,
        last_step_loss,
        steps: req.steps,
        tokens,
        tokens_per_s: tokens as f64 / wall_s.max(1e-9),
        wall_s,
        trainable_params,
        total_params: req.spec.param_count(),
        train_windows: windows.len(),
        eval_windows: eval_windows.len(),
        skipped_lines,
        config: RunConfig {
            knobs: req.knobs.clone(),
            hyper: req.hyper.clone(),
            seed: req.seed,
            device: device_name(&req.device),
            precision_means: req.knobs.precision.describe(),
        },
    })
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
