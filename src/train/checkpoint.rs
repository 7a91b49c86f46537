//! Checkpoints and resume. A checkpoint is a folder `checkpoints/step-NNNNNN/` under the run's output
//! folder, written atomically:
//!
//! - `trainable.safetensors`: every trainable parameter by name (LoRA adapters, or all weights);
//! - `optimizer.safetensors`: the optimizer's `state_tensors` (moments, 8-bit states, step count);
//! - `state.json`: the step, the data position (epoch and window), the seed (the data order of an
//!   epoch is a shuffle seeded by seed + epoch, so seed and epoch are the whole RNG state), the fp16
//!   loss scaler, running totals, and the run's settings, which a resume must match;
//! - `loss_log.csv`: the loss log up to this step, restored on resume.
//!
//! Resuming from one continues exactly as the uninterrupted run would (same losses, bit for bit,
//! on the same device), except with LoRA dropout, whose masks come from candle's unseeded RNG.

use crate::config::{Hyper, Knobs};
use crate::engine::Engine;
use crate::engine::step::LossScaler;
use crate::engine::weights::{read_safetensors, write_safetensors};
use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub const CHECKPOINTS_DIR: &str = "checkpoints";
const TRAINABLE: &str = "trainable.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "state.json";
const LOG: &str = "loss_log.csv";

/// Everything besides tensors that a resume needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Optimizer steps done.
    pub step: usize,
    pub data_epoch: usize,
    pub data_position: usize,
    pub scaler: LossScaler,
    pub tokens: usize,
    pub wall_s: f64,
    pub initial_loss: f64,
    pub first_step_loss: f64,
    pub last_step_loss: f64,
    pub last_eval_loss: f64,
    /// The run's settings: a resume with different ones would not continue the same curve.
    pub settings: RunSettings,
}

/// The settings a resumed run must share with the run that saved the checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSettings {
    pub model: String,
    pub knobs: Knobs,
    pub hyper: Hyper,
    pub steps: usize,
    pub seed: u64,
    pub eval_fraction: f64,
    #[serde(default)]
    pub packing: crate::data::Packing,
    /// Length and FNV-1a hash of the data file's bytes.
    pub data_fingerprint: String,
}

impl RunSettings {
    /// Names each setting that differs from `saved`.
    pub fn differences(&self, saved: &RunSettings) -> Vec<String> {
        let mut out = Vec::new();
        let mut check = |name: &str, same: bool, now: String, then: String| {
            if !same {
                out.push(format!("{name}: {now} now, {then} in the checkpoint"));
            }
        };
        check(
            "--model",
            self.model == saved.model,
            self.model.clone(),
            saved.model.clone(),
        );
        check(
            "knobs",
            self.knobs == saved.knobs,
            serde_json::to_string(&self.knobs).unwrap_or_default(),
            serde_json::to_string(&saved.knobs).unwrap_or_default(),
        );
        check(
            "optimisation settings",
            self.hyper == saved.hyper,
            serde_json::to_string(&self.hyper).unwrap_or_default(),
            serde_json::to_string(&saved.hyper).unwrap_or_default(),
        );
        check(
            "--steps",
            self.steps == saved.steps,
            self.steps.to_string(),
            saved.steps.to_string(),
        );
        check(
            "--seed",
            self.seed == saved.seed,
            self.seed.to_string(),
            saved.seed.to_string(),
        );
        check(
            "--eval-fraction",
            self.eval_fraction == saved.eval_fraction,
            self.eval_fraction.to_string(),
            saved.eval_fraction.to_string(),
        );
        check(
            "--packing",
            self.packing == saved.packing,
            format!("{:?}", self.packing),
            format!("{:?}", saved.packing),
        );
        check(
            "--data (contents)",
            self.data_fingerprint == saved.data_fingerprint,
            self.data_fingerprint.clone(),
            saved.data_fingerprint.clone(),
        );
        out
    }
}

/// Length and 64-bit FNV-1a hash of `path`'s bytes.
pub fn fingerprint(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read `{}`", path.display()))?;
    let hash = crate::cost::fnv1a(&bytes);
    Ok(format!("{} bytes, fnv1a {hash:016x}", bytes.len()))
}

/// The folder of the checkpoint after `step` under `output`.
pub fn checkpoint_dir(output: &Path, step: usize) -> PathBuf {
    output.join(CHECKPOINTS_DIR).join(format!("step-{step:06}"))
}

/// Saves a checkpoint of `engine` to `dir` (atomically).
pub fn save(dir: &Path, engine: &Engine, state: &CheckpointState, loss_log: &str) -> Result<()> {
    let trainable: Vec<(String, Tensor)> = engine
        .params
        .iter()
        .map(|p| (p.name.clone(), p.var.as_tensor().detach()))
        .collect();
    let optimizer = engine.optimizer.state_tensors()?;
    let state_json = serde_json::to_string_pretty(state)?;
    super::export::write_dir_atomic(dir, |tmp| {
        write_safetensors(&tmp.join(TRAINABLE), &trainable, &BTreeMap::new())?;
        write_safetensors(&tmp.join(OPTIMIZER), &optimizer, &BTreeMap::new())?;
        std::fs::write(tmp.join(STATE), state_json + "\n")?;
        std::fs::write(tmp.join(LOG), loss_log)?;
        Ok(())
    })
}

/// Removes all but the newest `keep` checkpoints under `output`.
pub fn prune(output: &Path, keep: usize) -> Result<()> {
    let mut all = list(output)?;
    while all.len() > keep.max(1) {
        let (_, dir) = all.remove(0);
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot remove old checkpoint `{}`", dir.display()))?;
    }
    Ok(())
}

/// Checkpoints under `output`, oldest first.
fn list(output: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let root = output.join(CHECKPOINTS_DIR);
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let mut all = Vec::new();
    for entry in
        std::fs::read_dir(&root).with_context(|| format!("cannot read `{}`", root.display()))?
    {
        let path = entry?.path();
        let step = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|n| n.parse::<usize>().ok());
        if let Some(step) = step
            && path.join(STATE).is_file()
        {
            all.push((step, path));
        }
    }
    all.sort();
    Ok(all)
}

/// The checkpoint `--resume` names: a checkpoint folder, or a run's output folder (its newest).
pub fn resolve(arg: &Path) -> Result<PathBuf> {
    if arg.join(STATE).is_file() {
        return Ok(arg.to_path_buf());
    }
    if !arg.is_dir() {
        bail!("--resume {}: no such folder", arg.display());
    }
    list(arg)?.pop().map(|(_, dir)| dir).with_context(|| {
        format!(
            "--resume {}: neither a checkpoint (no {STATE}) nor an output folder with checkpoints under {CHECKPOINTS_DIR}/",
            arg.display()
        )
    })
}

/// A checkpoint read from disk.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: CheckpointState,
    pub trainable: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
    pub loss_log: String,
}

impl Checkpoint {
    pub fn read(dir: &Path) -> Result<Self> {
        let state_path = dir.join(STATE);
        let text = std::fs::read_to_string(&state_path)
            .with_context(|| format!("cannot read `{}`", state_path.display()))?;
        let state: CheckpointState = serde_json::from_str(&text)
            .with_context(|| format!("`{}`: not a checkpoint state", state_path.display()))?;
        let read = |name: &str| -> Result<HashMap<String, Tensor>> {
            let path = dir.join(name);
            Ok(read_safetensors(&path, &Device::Cpu)
                .with_context(|| format!("cannot read `{}`", path.display()))?
                .0
                .into_iter()
                .collect())
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            state,
            trainable: read(TRAINABLE)?,
            optimizer: read(OPTIMIZER)?,
            loss_log: std::fs::read_to_string(dir.join(LOG)).unwrap_or_default(),
        })
    }

    /// Puts the saved trainable weights and optimizer state into `engine`.
    pub fn restore(&self, engine: &mut Engine) -> Result<()> {
        for p in &engine.params {
            let t = self.trainable.get(&p.name).with_context(|| {
                format!(
                    "`{}`: no saved value for parameter `{}`",
                    self.dir.display(),
                    p.name
                )
            })?;
            if t.dims() != p.var.dims() {
                bail!(
                    "`{}`: parameter `{}` has shape {:?}, the model expects {:?}",
                    self.dir.display(),
                    p.name,
                    t.dims(),
                    p.var.dims()
                );
            }
            p.var
                .set(&t.to_dtype(p.var.dtype())?.to_device(p.var.device())?)?;
        }
        engine
            .optimizer
            .load_state_tensors(&self.optimizer)
            .with_context(|| format!("`{}`: optimizer state", self.dir.display()))?;
        engine.scaler = self.state.scaler.clone();
        Ok(())
    }
}
