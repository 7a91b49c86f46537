//! The training knobs, validated and typed. Every command that builds a model (train, profile,
//! predict, tune) speaks in these types; the CLI turns flags into them once and nothing below it sees
//! clap. They serialize to the `[knobs]` table of `tuned.toml`.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// What is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Every parameter is trained.
    Full,
    /// Base weights frozen (stored in the compute dtype), low-rank adapters trained.
    Lora,
    /// Base linear weights frozen and stored quantized (`--quant`), adapters trained in fp32.
    Qlora,
}

/// Storage of frozen base linear weights under `qlora`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quant {
    /// ggml Q8_0: blocks of 32 int8 values and one f16 scale (34 bytes per 32 weights).
    Q8,
    /// ggml Q4_0: blocks of 32 4-bit values and one f16 scale (18 bytes per 32 weights).
    Q4,
}

/// Numeric precision. See `Precision::describe` for exactly what lives in which dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    Fp32,
    Bf16,
    Fp16,
    Bf16Pure,
}

impl Precision {
    pub fn describe(self) -> &'static str {
        match self {
            Precision::Fp32 => "everything in fp32",
            Precision::Bf16 => {
                "mixed: compute and frozen weights in bf16; trainable weights, gradients and optimizer state in fp32"
            }
            Precision::Fp16 => {
                "mixed: compute and frozen weights in fp16 with dynamic loss scaling; trainable weights, gradients and optimizer state in fp32"
            }
            Precision::Bf16Pure => {
                "pure: weights, gradients, compute and optimizer state all in bf16 (least memory; updates round)"
            }
        }
    }
}

/// Gradient checkpointing (activation recomputation) policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Checkpointing {
    /// Keep every layer's activations for backward.
    None,
    /// Recompute every layer during backward (keep only each layer's input).
    Full,
    /// Recompute one layer in K (layers 0, K, 2K, ...); the others keep their activations.
    /// `every:1` is the same as `full`. Trades memory against recomputation in steps of L/K layers.
    Every(usize),
}

impl Checkpointing {
    /// Whether layer `index` is recomputed during backward.
    pub fn recomputes(self, index: usize) -> bool {
        match self {
            Checkpointing::None => false,
            Checkpointing::Full => true,
            Checkpointing::Every(k) => index.is_multiple_of(k.max(1)),
        }
    }
}

/// Optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Adamw,
    Adamw8bit,
    Adafactor,
    Sgd,
}

/// Loss computation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossMode {
    /// Logits computed `loss_chunk_rows(vocab)` rows at a time in forward and again in backward:
    /// the full batch × seq × vocab logits never exist at once.
    Chunked,
    /// The whole fp32 logits tensor, as Hugging Face does.
    Full,
}

/// Logit elements (rows × vocab) the chunked loss computes at once: 16 Mi elements, 64 MiB in fp32.
pub const LOSS_CHUNK_ELEMENTS: usize = 1 << 24;

/// Rows of logits the chunked loss computes at once for a vocabulary of `vocab` tokens: as many
/// as fit [`LOSS_CHUNK_ELEMENTS`], between 8 and 1024 (1024 rows at a 16k vocab, 110 at Qwen's 152k).
pub fn loss_chunk_rows(vocab: usize) -> usize {
    (LOSS_CHUNK_ELEMENTS / vocab.max(1)).clamp(8, 1024)
}

/// Logit elements a frozen head's loss computes at once (one block of vocabulary columns for its
/// rows): 1 Mi, 4 MiB in f32.
pub const FROZEN_HEAD_BLOCK_ELEMENTS: usize = 1 << 20;

/// Rows a frozen head's loss takes in one pass over the vocabulary matrix.
pub const FROZEN_HEAD_ROWS: usize = 4096;

/// The logits a training step's chunked loss holds at once for `tokens` rows and a vocabulary of
/// `vocab`, as `(rows, columns)`. A trained head's loss takes [`loss_chunk_rows`] rows with the
/// whole vocabulary (each chunk's logits give the head's gradient). A frozen head's (LoRA, QLoRA)
/// takes up to [`FROZEN_HEAD_ROWS`] rows and the vocabulary in blocks of columns, with its
/// softmax taken block by block (no logits-sized tensor, and one pass over the vocabulary matrix
/// per [`FROZEN_HEAD_ROWS`] rows): about [`FROZEN_HEAD_BLOCK_ELEMENTS`] at a time, 256 columns
/// at least.
pub fn loss_block(tokens: usize, vocab: usize, head_trained: bool) -> (usize, usize) {
    let vocab = vocab.max(1);
    if head_trained {
        (tokens.min(loss_chunk_rows(vocab)), vocab)
    } else {
        let rows = tokens.clamp(1, FROZEN_HEAD_ROWS);
        (
            rows,
            (FROZEN_HEAD_BLOCK_ELEMENTS / rows).max(256).min(vocab),
        )
    }
}

/// The logits a training step's loss holds at once for `tokens` rows of `knobs`'s batches and a
/// vocabulary of `vocab`, as `(rows, columns)`: every row and the whole vocabulary under the full
/// loss, [`loss_block`] under the chunked one (the head is trained under full fine-tuning only).
pub fn live_logits(knobs: &Knobs, tokens: usize, vocab: usize) -> (usize, usize) {
    match knobs.loss {
        LossMode::Full => (tokens, vocab),
        LossMode::Chunked => loss_block(tokens, vocab, knobs.method == Method::Full),
    }
}

/// Learning-rate schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    /// Linear warm-up over `warmup_steps`, then cosine decay to 10% of the peak at the last step.
    Cosine,
}

/// Which linear layers get LoRA adapters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::QProj,
        Target::KProj,
        Target::VProj,
        Target::OProj,
        Target::GateProj,
        Target::UpProj,
        Target::DownProj,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::QProj => "q_proj",
            Target::KProj => "k_proj",
            Target::VProj => "v_proj",
            Target::OProj => "o_proj",
            Target::GateProj => "gate_proj",
            Target::UpProj => "up_proj",
            Target::DownProj => "down_proj",
        }
    }

    /// The module path inside a Hugging Face Llama layer.
    pub fn module(self) -> &'static str {
        match self {
            Target::QProj | Target::KProj | Target::VProj | Target::OProj => "self_attn",
            _ => "mlp",
        }
    }
}

/// LoRA adapter settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSettings {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Vec<Target>,
}

impl Default for LoraSettings {
    fn default() -> Self {
        // LLaMA-Factory's defaults: rank 8, alpha 2 * rank, every linear layer.
        Self {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: Target::ALL.to_vec(),
        }
    }
}

impl LoraSettings {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// Every knob that changes what a training step does or costs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Knobs {
    pub method: Method,
    pub lora: LoraSettings,
    pub quant: Quant,
    pub precision: Precision,
    pub checkpointing: Checkpointing,
    /// Micro-batch size (sequences per forward/backward).
    pub batch: usize,
    /// Micro-batches accumulated per optimizer step.
    pub accum: usize,
    /// Tokens per sequence.
    pub seq: usize,
    pub optimizer: OptimizerKind,
    pub loss: LossMode,
}

impl Default for Knobs {
    fn default() -> Self {
        Self {
            method: Method::Lora,
            lora: LoraSettings::default(),
            quant: Quant::Q4,
            precision: Precision::Fp32,
            checkpointing: Checkpointing::None,
            batch: 1,
            accum: 1,
            seq: 256,
            optimizer: OptimizerKind::Adamw,
            loss: LossMode::Chunked,
        }
    }
}

/// Optimisation hyper-parameters: none changes memory but `update_in_backward`, which lowers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hyper {
    pub lr: f64,
    pub weight_decay: f64,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    /// Global gradient-norm clipping threshold; 0 disables it.
    pub clip: f64,
    pub momentum: f64,
    /// Update each part of the model (the head, each layer, the embedding) as soon as backward
    /// has made its gradients, and free them, instead of keeping every gradient until one update
    /// at the end (PyTorch's "optimizer step in backward", torchtune's `optimizer_in_bwd`). A full
    /// fine-tune then holds one layer's gradients at a time besides the embedding's and the head's
    /// rather than all of them. Under AdamW on the CPU, an untied head is updated block by block
    /// as the loss makes its gradient (for steps of up to one loss chunk of tokens), and an untied
    /// embedding block by block from the looked-up rows' gradients, so neither whole gradient
    /// exists. Needs `clip` 0 (the global norm needs every gradient before any update), one
    /// micro-batch a step and no fp16 loss scaling. The cost model does not model it: its memory
    /// predictions stay an upper bound for such runs.
    #[serde(default)]
    pub update_in_backward: bool,
}

impl Default for Hyper {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            weight_decay: 0.0,
            schedule: Schedule::Constant,
            warmup_steps: 0,
            clip: 1.0,
            momentum: 0.9,
            update_in_backward: false,
        }
    }
}

impl Hyper {
    /// Why `update_in_backward` cannot run with these settings and `knobs`, naming the flags;
    /// `None` when it can, or is off.
    pub fn update_in_backward_conflict(&self, knobs: &Knobs) -> Option<String> {
        if !self.update_in_backward {
            return None;
        }
        let why = if self.clip > 0.0 {
            format!(
                "--clip 0 (got {}): clipping by the global gradient norm needs every gradient \
                 before the first update",
                self.clip
            )
        } else if knobs.accum > 1 {
            format!(
                "--accum 1 (got {}): accumulation adds every micro-batch's gradients before the \
                 update",
                knobs.accum
            )
        } else if knobs.precision == Precision::Fp16 {
            "a precision other than fp16: fp16's loss scaling skips a step whose gradients \
             overflow, which needs every gradient before the first update"
                .to_string()
        } else {
            return None;
        };
        Some(format!("--update-in-backward needs {why}"))
    }

    /// Learning rate at optimizer step `step` (0-based) of `total`.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Cosine => {
                if step < self.warmup_steps {
                    return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
                }
                let span = total.saturating_sub(self.warmup_steps).max(1) as f64;
                let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
                let floor = 0.1 * self.lr;
                floor + (self.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

// ---- text forms, shared by the CLI and TOML ----

macro_rules! text_enum {
    ($ty:ty, $what:expr, { $($text:expr => $variant:expr),+ $(,)? }) => {
        impl FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s.to_ascii_lowercase().as_str() {
                    $($text => Ok($variant),)+
                    other => Err(format!(
                        "unknown {} `{}`; expected one of: {}",
                        $what,
                        other,
                        [$($text),+].join(", ")
                    )),
                }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                $(if *self == $variant { return f.write_str($text); })+
                unreachable!()
            }
        }
    };
}

text_enum!(Method, "method", { "full" => Method::Full, "lora" => Method::Lora, "qlora" => Method::Qlora });
text_enum!(Quant, "quantization", { "q8" => Quant::Q8, "q4" => Quant::Q4 });
text_enum!(Precision, "precision", {
    "fp32" => Precision::Fp32, "bf16" => Precision::Bf16, "fp16" => Precision::Fp16,
    "bf16-pure" => Precision::Bf16Pure,
});
text_enum!(OptimizerKind, "optimizer", {
    "adamw" => OptimizerKind::Adamw, "adamw8bit" => OptimizerKind::Adamw8bit,
    "adafactor" => OptimizerKind::Adafactor, "sgd" => OptimizerKind::Sgd,
});
text_enum!(LossMode, "loss mode", { "chunked" => LossMode::Chunked, "full" => LossMode::Full });
text_enum!(Schedule, "schedule", { "constant" => Schedule::Constant, "cosine" => Schedule::Cosine });
text_enum!(Target, "LoRA target", {
    "q_proj" => Target::QProj, "k_proj" => Target::KProj, "v_proj" => Target::VProj,
    "o_proj" => Target::OProj, "gate_proj" => Target::GateProj, "up_proj" => Target::UpProj,
    "down_proj" => Target::DownProj,
});

impl FromStr for Checkpointing {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.to_ascii_lowercase();
        match s.as_str() {
            "none" | "off" => Ok(Checkpointing::None),
            "full" | "on" => Ok(Checkpointing::Full),
            _ => {
                let k = s.strip_prefix("every:").ok_or_else(|| {
                    format!("unknown checkpointing `{s}`; expected none, full or every:K (K ≥ 1)")
                })?;
                match k.parse::<usize>() {
                    Ok(0) | Err(_) => Err(format!(
                        "checkpointing `{s}`: K must be a whole number ≥ 1 (every:K recomputes one layer in K)"
                    )),
                    Ok(1) => Ok(Checkpointing::Full),
                    Ok(k) => Ok(Checkpointing::Every(k)),
                }
            }
        }
    }
}

impl fmt::Display for Checkpointing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Checkpointing::None => f.write_str("none"),
            Checkpointing::Full => f.write_str("full"),
            Checkpointing::Every(k) => write!(f, "every:{k}"),
        }
    }
}

impl From<Checkpointing> for String {
    fn from(c: Checkpointing) -> String {
        c.to_string()
    }
}

impl TryFrom<String> for Checkpointing {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

/// Parses a comma-separated list of LoRA targets; `all` (or `all-linear`) means every projection.
pub fn parse_targets(s: &str) -> Result<Vec<Target>, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("all") || s.eq_ignore_ascii_case("all-linear") {
        return Ok(Target::ALL.to_vec());
    }
    let mut targets = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let target: Target = part.parse()?;
        if !targets.contains(&target) {
            targets.push(target);
        }
    }
    if targets.is_empty() {
        return Err("`--lora-targets` is empty; expected e.g. q_proj,v_proj or all".to_string());
    }
    targets.sort();
    Ok(targets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpointing_text_round_trips() {
        for text in ["none", "full", "every:3"] {
            let c: Checkpointing = text.parse().unwrap();
            assert_eq!(c.to_string(), text);
        }
        assert_eq!(
            "every:1".parse::<Checkpointing>().unwrap(),
            Checkpointing::Full
        );
        assert!("every:0".parse::<Checkpointing>().is_err());
        assert!("every:x".parse::<Checkpointing>().is_err());
        assert!(Checkpointing::Every(2).recomputes(0));
        assert!(!Checkpointing::Every(2).recomputes(1));
    }

    #[test]
    fn enums_parse_case_insensitively_and_list_choices() {
        assert_eq!("LoRA".parse::<Method>().unwrap(), Method::Lora);
        let err = "adam".parse::<OptimizerKind>().unwrap_err();
        assert!(err.contains("adamw8bit"), "{err}");
        assert_eq!(Precision::Bf16Pure.to_string(), "bf16-pure");
    }

    #[test]
    fn cosine_schedule_warms_up_then_decays_to_a_tenth() {
        let h = Hyper {
            lr: 1.0,
            schedule: Schedule::Cosine,
            warmup_steps: 4,
            ..Hyper::default()
        };
        assert_eq!(h.lr_at(0, 20), 0.25);
        assert_eq!(h.lr_at(3, 20), 1.0);
        assert!((h.lr_at(4, 20) - 1.0).abs() < 1e-12);
        assert!((h.lr_at(20, 20) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn targets_parse() {
        assert_eq!(parse_targets("all").unwrap().len(), 7);
        assert_eq!(
            parse_targets("v_proj, q_proj").unwrap(),
            vec![Target::QProj, Target::VProj]
        );
        assert!(parse_targets("x_proj").is_err());
    }
}
