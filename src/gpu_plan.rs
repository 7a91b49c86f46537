//! Planning for a GPU from a machine without one: the catalog of common cards, and the projection
//! of a cost model calibrated by CPU probes onto one card.
//!
//! - The catalog (`profiles/gpus/*.json`, embedded): memory as the card reports it (nvidia-smi's
//!   total, and the smaller total the CUDA runtime gives a process), dense tensor-core rates per
//!   precision, memory bandwidth, and what a CUDA process pays beyond its tensors (context, library
//!   workspaces). Each file names its sources; the runtime overhead is an assumption until a GPU
//!   run measures it (scripts/gpu-check.sh).
//! - The projection ([`project`]). Memory: candle allocates the same tensors, of the same shapes and
//!   dtypes, on either device, so the CPU-calibrated tensor bytes carry over; the card adds its
//!   runtime overhead, and the allocator an allowance on the tensors that come and go every step
//!   ([`FRAGMENTATION_ALLOWANCE`]). Speed does not carry over from a CPU at all: it becomes a
//!   roofline estimate of the work the cost model's time features count (matmul and attention
//!   FLOPs, bytes moved, kernel launches) at the card's rates ([`roofline_terms`]).
//!
//! The projected model is an ordinary [`CostModel`], so the search runs on it unchanged. What it
//! predicts mixes measured and estimated figures; [`GpuEstimate`] keeps them apart, and its
//! [`GpuEstimate::describe`] labels each.

use crate::config::{Knobs, OptimizerKind, Precision, Quant};
use crate::cost::{CostModel, exact, features};
use crate::probe::Components;
use crate::spec::ModelSpec;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::OnceLock;

/// One GPU model, as shipped under `profiles/gpus/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuProfile {
    /// The name `--target-gpu` takes, e.g. `rtx4090`.
    pub name: String,
    pub display_name: String,
    /// Other spellings, including the name NVML reports (e.g. `NVIDIA H100 80GB HBM3`).
    pub aliases: Vec<String>,
    pub architecture: String,
    /// e.g. `9.0`; the `CUDA_COMPUTE_CAP` to build candle's kernels with is this without the dot.
    pub compute_capability: String,
    /// The card's memory as nvidia-smi (NVML) reports its total.
    pub memory_bytes: u64,
    /// The total the CUDA runtime reports to a process (`cudaMemGetInfo`): smaller, by what the
    /// driver keeps for itself. The most a plan may use.
    pub usable_bytes: u64,
    /// Whether `usable_bytes` was estimated rather than read off a card.
    pub usable_is_estimate: bool,
    pub memory_bandwidth_gb_per_s: f64,
    /// Dense rates (no structured sparsity). fp32 is the CUDA-core rate: candle runs fp32 matmuls
    /// without TF32 unless told to (`set_gemm_reduced_precision_f32`), so tf32 is for reference.
    pub fp32_tflop_per_s: f64,
    pub tf32_tflop_per_s: Option<f64>,
    /// `None` where the card has no bf16 (Turing): bf16 configurations are not planned for it.
    pub bf16_tflop_per_s: Option<f64>,
    pub fp16_tflop_per_s: f64,
    /// Device memory a CUDA process holds beyond its tensors: context, cuBLAS workspaces, loaded
    /// kernel modules. An assumption per card (see `runtime_overhead_note`).
    pub runtime_overhead_bytes: u64,
    pub runtime_overhead_note: String,
    pub memory_note: String,
    pub sources: Vec<String>,
    pub notes: String,
}

impl GpuProfile {
    /// Dense matmul rate for a precision's compute dtype, if the card has it.
    pub fn matmul_tflop_per_s(&self, precision: Precision) -> Option<f64> {
        match precision {
            Precision::Fp32 => Some(self.fp32_tflop_per_s),
            Precision::Bf16 | Precision::Bf16Pure => self.bf16_tflop_per_s,
            Precision::Fp16 => Some(self.fp16_tflop_per_s),
        }
    }

    pub fn supports(&self, precision: Precision) -> bool {
        self.matmul_tflop_per_s(precision).is_some()
    }

    pub fn bandwidth_bytes_per_s(&self) -> f64 {
        self.memory_bandwidth_gb_per_s * 1e9
    }

    /// Every spelling this card answers to: its name, display name and aliases.
    fn spellings(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.name.as_str())
            .chain(std::iter::once(self.display_name.as_str()))
            .chain(self.aliases.iter().map(String::as_str))
    }
}

macro_rules! card_file {
    ($file:literal) => {
        (
            concat!("profiles/gpus/", $file),
            include_str!(concat!("../profiles/gpus/", $file)),
        )
    };
}

const CARD_FILES: &[(&str, &str)] = &[
    card_file!("t4.json"),
    card_file!("l4.json"),
    card_file!("a10g.json"),
    card_file!("rtx3090.json"),
    card_file!("rtx4090.json"),
    card_file!("a100-40gb.json"),
    card_file!("a100-80gb.json"),
    card_file!("h100.json"),
    card_file!("h200.json"),
    card_file!("l40s.json"),
];

/// Parses one shipped card file.
pub fn parse_profile(text: &str, file: &str) -> Result<GpuProfile, String> {
    let card: GpuProfile =
        serde_json::from_str(text).map_err(|error| format!("{file}: {error}"))?;
    let rates = [
        Some(card.fp32_tflop_per_s),
        card.tf32_tflop_per_s,
        card.bf16_tflop_per_s,
        Some(card.fp16_tflop_per_s),
        Some(card.memory_bandwidth_gb_per_s),
    ];
    if rates
        .into_iter()
        .flatten()
        .any(|r| !(r > 0.0 && r.is_finite()))
    {
        return Err(format!("{file}: every rate must be a positive number"));
    }
    if card.usable_bytes == 0 || card.usable_bytes > card.memory_bytes {
        return Err(format!(
            "{file}: usable_bytes must be positive and at most memory_bytes"
        ));
    }
    if card.runtime_overhead_bytes >= card.usable_bytes {
        return Err(format!(
            "{file}: runtime_overhead_bytes must be below usable_bytes"
        ));
    }
    Ok(card)
}

/// Every catalog card, in catalog order.
pub fn catalog() -> &'static [GpuProfile] {
    static CARDS: OnceLock<Vec<GpuProfile>> = OnceLock::new();
    CARDS.get_or_init(|| {
        CARD_FILES
            .iter()
            .map(|(file, text)| {
                parse_profile(text, file)
                    // The shipped files are fixed at build time and the tests parse every one,
                    // so a failure here is a broken build, not a user error.
                    .unwrap_or_else(|error| panic!("built-in GPU profile is broken: {error}"))
            })
            .collect()
    })
}

/// A `--target-gpu` name the catalog does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown GPU `{name}` ({}); `memtune gpus` lists the catalog",
    suggest(suggestions)
)]
pub struct UnknownGpu {
    pub name: String,
    /// Catalog names close to it, closest first.
    pub suggestions: Vec<String>,
}

fn suggest(names: &[String]) -> String {
    if names.is_empty() {
        "no catalog card is close".to_string()
    } else {
        format!("closest: {}", names.join(", "))
    }
}

/// Lowercase letters and digits only, vendor words dropped: `NVIDIA GeForce RTX 4090` → `rtx4090`.
pub fn normalize_gpu_name(name: &str) -> String {
    let mut lower = name.to_lowercase();
    for vendor in ["nvidia", "geforce", "tesla"] {
        lower = lower.replace(vendor, "");
    }
    lower.chars().filter(char::is_ascii_alphanumeric).collect()
}

/// The catalog card `name` names: any of its spellings, ignoring case, spaces, dashes and the
/// vendor's words. Unknown names come back with the closest catalog names.
pub fn find_gpu(name: &str) -> Result<GpuProfile, UnknownGpu> {
    let wanted = normalize_gpu_name(name);
    if let Some(card) = catalog()
        .iter()
        .find(|card| card.spellings().any(|s| normalize_gpu_name(s) == wanted))
    {
        return Ok(card.clone());
    }
    Err(UnknownGpu {
        name: name.to_string(),
        suggestions: closest_cards(&wanted),
    })
}

/// Up to three catalog names nearest to `wanted` (normalized): by edit distance to any spelling,
/// a spelling that contains `wanted` (or is contained in it) counting as distance 0, and only
/// those when there are such.
fn closest_cards(wanted: &str) -> Vec<String> {
    if wanted.is_empty() {
        return Vec::new();
    }
    let mut scored: Vec<(usize, &str)> = catalog()
        .iter()
        .map(|card| {
            let distance = card
                .spellings()
                .map(|s| {
                    let s = normalize_gpu_name(s);
                    if s.contains(wanted) || wanted.contains(&s) {
                        0
                    } else {
                        edit_distance(wanted, &s)
                    }
                })
                .min()
                .unwrap_or(usize::MAX);
            (distance, card.name.as_str())
        })
        .collect();
    scored.sort();
    // Spellings that contain the name (or that it contains) are the answer when there are any:
    // "a100" means one of the A100s, not the A10G one edit away.
    let limit = if scored.first().is_some_and(|(d, _)| *d == 0) {
        0
    } else {
        (wanted.len() / 2).max(2)
    };
    scored
        .into_iter()
        .filter(|(distance, _)| *distance <= limit)
        .take(3)
        .map(|(_, name)| name.to_string())
        .collect()
}

/// Levenshtein distance over bytes (names are normalized to ASCII first).
fn edit_distance(a: &str, b: &str) -> usize {
    let b = b.as_bytes();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.bytes().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            let substitute = previous[j] + usize::from(ca != cb);
            current[j + 1] = substitute.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

// ---------------------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------------------

/// The allocator allowance: this fraction is added to the tensors that are allocated and freed
/// every step (gradients, activations, transients). Weights and optimizer state are allocated once,
/// before the first step, and pack without gaps. candle allocates through cudarc's stream-ordered
/// allocator (`cuMemAllocAsync`, the device's default pool), which maps memory in 2 MiB pages and
/// reuses freed blocks; 3% is an assumption for the gaps that churn leaves, to be replaced by the
/// figure scripts/gpu-check.sh measures (measured peak − tensor bytes − runtime overhead).
pub const FRAGMENTATION_ALLOWANCE: f64 = 0.03;

/// The budget a plan for `card` may use: the card's usable memory, or `given` when that is
/// smaller. The note says when `given` was more than the card has.
pub fn budget_for(card: &GpuProfile, given: Option<u64>) -> (u64, Option<String>) {
    match given {
        Some(bytes) if bytes <= card.usable_bytes => (bytes, None),
        Some(bytes) => (
            card.usable_bytes,
            Some(format!(
                "--gpu-mem {} is more than {} gives a process ({}{}); planning for that",
                crate::search::format_bytes(bytes),
                card.name,
                crate::search::format_bytes(card.usable_bytes),
                if card.usable_is_estimate {
                    ", estimated"
                } else {
                    ""
                }
            )),
        ),
        None => (card.usable_bytes, None),
    }
}

// ---------------------------------------------------------------------------------------------
// Speed: the roofline
// ---------------------------------------------------------------------------------------------

/// Share of the dense peak a training step's matmuls reach. On this workplace's H100 an
/// 8192×8192×8192 bf16 product ran at 81% of peak; a step's products are smaller and batched
/// (attention), so 60% is assumed.
pub const MATMUL_EFFICIENCY: f64 = 0.6;
/// Share of the memory bandwidth elementwise kernels reach (the H100 copied at ~90%).
pub const BANDWIDTH_EFFICIENCY: f64 = 0.8;
/// Hidden-sized vectors read or written per token per layer pass by elementwise kernels (norms,
/// residual adds, rotary embedding, SwiGLU over the wider intermediate, dtype casts, the copies
/// that make tensors contiguous): counted from the engine's layer, rounded up.
pub const ELEMENTWISE_ACCESSES_PER_LAYER_PASS: f64 = 32.0;
/// Accesses of each attention score per pass: the causal softmax works in fp32 (cast up, mask,
/// softmax, cast down: 6 fp32 accesses) and the two batched matmuls and the scaling touch the
/// scores 4 times in the compute dtype.
pub const SCORE_FP32_ACCESSES: f64 = 6.0;
pub const SCORE_COMPUTE_ACCESSES: f64 = 4.0;
/// fp32 accesses per logit per loss pass beyond its matmul (max, subtract, exp, sum, gather).
pub const LOSS_ACCESSES_PER_LOGIT: f64 = 8.0;
/// Kernels candle launches per layer per pass (each elementwise op, cast and copy is one), and
/// the cost of one launch. Launches overlap with running kernels only when those are long; adding
/// them is pessimistic for big models and right for small ones, which launches dominate.
pub const KERNELS_PER_LAYER_PASS: f64 = 60.0;
pub const LAUNCH_S: f64 = 5e-6;
/// Per micro-batch: uploading the batch and reading the loss back (a device synchronization).
pub const MICRO_BATCH_OVERHEAD_S: f64 = 1e-3;
/// Per optimizer step: the optimizer's launches over every trainable tensor, gradient clipping's
/// norm read back.
pub const STEP_OVERHEAD_S: f64 = 2e-3;

/// fp32 tensors read or written per trainable parameter in an optimizer step (each unfused
/// elementwise op reads its inputs and writes its output).
pub fn optimizer_accesses(kind: OptimizerKind) -> f64 {
    match kind {
        OptimizerKind::Adamw => 16.0,
        OptimizerKind::Adamw8bit => 20.0,
        OptimizerKind::Adafactor => 16.0,
        OptimizerKind::Sgd => 8.0,
    }
}

/// Which limit a term of the roofline is bound by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Bound {
    /// Arithmetic at the tensor-core (or CUDA-core, for fp32) rate.
    Compute,
    /// Bytes at the memory bandwidth.
    Memory,
    /// Fixed costs: kernel launches, synchronizations.
    Overhead,
}

/// One term of the roofline: seconds per unit of one of the cost model's time features.
#[derive(Debug, Clone, PartialEq)]
pub struct RooflineTerm {
    pub feature: String,
    pub bound: Bound,
    pub seconds_per_unit: f64,
}

const PRECISIONS: [(Precision, &str); 4] = [
    (Precision::Fp32, "fp32"),
    (Precision::Bf16, "bf16"),
    (Precision::Fp16, "fp16"),
    (Precision::Bf16Pure, "bf16_pure"),
];

/// The roofline of `card` for `spec`'s shape, as seconds per unit of each time feature (see
/// [`features::time_features`] for the units: FLOPs, elements, bytes, launches). A step's time is
/// the sum over terms: matmul and attention FLOPs at the card's dense rate × [`MATMUL_EFFICIENCY`],
/// every byte moved at its bandwidth × [`BANDWIDTH_EFFICIENCY`], plus fixed overheads. Summing the
/// compute-bound and memory-bound parts, rather than taking the larger, assumes no overlap: the
/// kernels of different kinds run one after another, which is how candle issues them.
/// Precisions the card lacks get no terms (check [`GpuProfile::supports`] first).
pub fn roofline_terms(card: &GpuProfile, spec: &ModelSpec) -> Vec<RooflineTerm> {
    let bandwidth = card.bandwidth_bytes_per_s() * BANDWIDTH_EFFICIENCY;
    let memory = |feature: String, bytes_per_unit: f64| RooflineTerm {
        feature,
        bound: Bound::Memory,
        seconds_per_unit: bytes_per_unit / bandwidth,
    };
    let mut terms = Vec::new();
    for (precision, suffix) in PRECISIONS {
        let Some(tflop_per_s) = card.matmul_tflop_per_s(precision) else {
            continue;
        };
        let flop_s = 1.0 / (tflop_per_s * 1e12 * MATMUL_EFFICIENCY);
        let compute_bytes = exact::compute_dtype_bytes(precision) as f64;
        terms.push(RooflineTerm {
            feature: format!("time_matmul_{suffix}"),
            bound: Bound::Compute,
            seconds_per_unit: flop_s,
        });
        terms.push(RooflineTerm {
            feature: format!("time_attention_{suffix}"),
            bound: Bound::Compute,
            seconds_per_unit: flop_s,
        });
        // The attention feature counts 4 · seq · q_dim FLOPs per token and pass, i.e. 4 · head_dim
        // FLOPs per score.
        let score_bytes = SCORE_FP32_ACCESSES * 4.0 + SCORE_COMPUTE_ACCESSES * compute_bytes;
        terms.push(memory(
            format!("time_attention_{suffix}"),
            score_bytes / (4.0 * spec.head_dim as f64),
        ));
        terms.push(memory(
            format!("time_elementwise_{suffix}"),
            ELEMENTWISE_ACCESSES_PER_LAYER_PASS * compute_bytes,
        ));
    }
    terms.push(memory(
        "time_loss".to_string(),
        LOSS_ACCESSES_PER_LOGIT * 4.0,
    ));
    terms.push(memory("time_weight_stream".to_string(), 1.0));
    for (kind, name) in [
        (OptimizerKind::Adamw, "time_optimizer_adamw"),
        (OptimizerKind::Adamw8bit, "time_optimizer_adamw8bit"),
        (OptimizerKind::Adafactor, "time_optimizer_adafactor"),
        (OptimizerKind::Sgd, "time_optimizer_sgd"),
    ] {
        terms.push(memory(name.to_string(), optimizer_accesses(kind) * 4.0));
    }
    // Dequantizing a frozen weight: read its blocks, write fp32, read that back, write the
    // compute dtype (counted as fp32, the widest).
    for (quant, name) in [
        (Quant::Q8, "time_dequant_q8"),
        (Quant::Q4, "time_dequant_q4"),
    ] {
        let block_bytes = exact::quantized_matrix_bytes(1, 32, quant) as f64 / 32.0;
        terms.push(memory(name.to_string(), block_bytes + 12.0));
    }
    // Adding a micro-batch's gradient into the total: read both, write one, in fp32.
    terms.push(memory("time_accumulate".to_string(), 12.0));
    let overhead = |feature: &str, seconds: f64| RooflineTerm {
        feature: feature.to_string(),
        bound: Bound::Overhead,
        seconds_per_unit: seconds,
    };
    terms.push(overhead("time_micro_batch", MICRO_BATCH_OVERHEAD_S));
    terms.push(overhead(
        "time_layer_launch",
        KERNELS_PER_LAYER_PASS * LAUNCH_S,
    ));
    terms.push(overhead("time_step", STEP_OVERHEAD_S));
    terms
}

/// The roofline as the cost model's time coefficients (terms of one feature summed).
pub fn time_coefficients(card: &GpuProfile, spec: &ModelSpec) -> BTreeMap<String, f64> {
    let mut coefficients = BTreeMap::new();
    for term in roofline_terms(card, spec) {
        *coefficients.entry(term.feature).or_insert(0.0) += term.seconds_per_unit;
    }
    coefficients
}

/// The roofline of one configuration, split by bound.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RooflineEstimate {
    /// Matmul FLOPs per optimizer step (≈ 6 · params · tokens for full fine-tuning, ≈ 4 · params ·
    /// tokens + adapters under LoRA, more with recomputation and the chunked loss's second pass).
    pub matmul_flops: f64,
    /// Attention score FLOPs per optimizer step (QKᵀ and PV, every pass).
    pub attention_flops: f64,
    /// The dense rate of the configuration's precision, before the efficiency factor.
    pub peak_tflop_per_s: f64,
    pub compute_s: f64,
    /// Bytes moved by the memory-bound terms, and their time.
    pub memory_bytes: f64,
    pub memory_s: f64,
    pub overhead_s: f64,
    pub step_s: f64,
    pub tokens_per_s: f64,
}

/// The roofline of `knobs` on `card`; `None` when the card lacks the precision.
pub fn roofline(card: &GpuProfile, spec: &ModelSpec, knobs: &Knobs) -> Option<RooflineEstimate> {
    let peak_tflop_per_s = card.matmul_tflop_per_s(knobs.precision)?;
    let work = features::time_features(spec, knobs);
    let value = |name: &str| {
        work.iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| *v)
            .sum::<f64>()
    };
    let suffix = PRECISIONS
        .iter()
        .find(|(p, _)| *p == knobs.precision)
        .map_or("fp32", |(_, s)| s);
    let (mut compute_s, mut memory_s, mut overhead_s) = (0.0, 0.0, 0.0);
    for term in roofline_terms(card, spec) {
        let seconds = term.seconds_per_unit * value(&term.feature);
        match term.bound {
            Bound::Compute => compute_s += seconds,
            Bound::Memory => memory_s += seconds,
            Bound::Overhead => overhead_s += seconds,
        }
    }
    let step_s = compute_s + memory_s + overhead_s;
    let tokens = (knobs.batch * knobs.accum * knobs.seq) as f64;
    Some(RooflineEstimate {
        matmul_flops: value(&format!("time_matmul_{suffix}")),
        attention_flops: value(&format!("time_attention_{suffix}")),
        peak_tflop_per_s,
        compute_s,
        memory_bytes: memory_s * card.bandwidth_bytes_per_s() * BANDWIDTH_EFFICIENCY,
        memory_s,
        overhead_s,
        step_s,
        tokens_per_s: if step_s > 0.0 { tokens / step_s } else { 0.0 },
    })
}

// ---------------------------------------------------------------------------------------------
// The projection
// ---------------------------------------------------------------------------------------------

/// `model` (fitted to CPU probes of `spec`'s shape) as a model of `card`: the tensors that churn
/// every step grow by [`FRAGMENTATION_ALLOWANCE`], the runtime component gains the card's
/// overhead (in the phase coefficients and in the segment model alike), and the time coefficients
/// become the card's roofline. Weights and optimizer state stay exact.
pub fn project(model: &CostModel, spec: &ModelSpec, card: &GpuProfile) -> CostModel {
    let mut projected = model.clone();
    for phase in [
        &mut projected.coefficients.compute,
        &mut projected.coefficients.update,
    ] {
        for churn in [
            &mut phase.gradients,
            &mut phase.activations,
            &mut phase.transient,
        ] {
            for coefficient in churn.values_mut() {
                *coefficient *= 1.0 + FRAGMENTATION_ALLOWANCE;
            }
        }
        *phase.runtime.entry("const".to_string()).or_insert(0.0) +=
            card.runtime_overhead_bytes as f64;
    }
    projected.segments.churn_allowance = FRAGMENTATION_ALLOWANCE;
    projected.segments.runtime_extra_bytes += card.runtime_overhead_bytes as f64;
    projected.segments.forget_times();
    projected.coefficients.time = time_coefficients(card, spec);
    projected.device = format!("{} (planned from probes on {})", card.name, model.device);
    projected
}

/// Removes the precisions `card` lacks from a search space (bf16 on Turing), saying so in its
/// policy; under the default precision policy fp16 takes bf16's place there. Errors when none is
/// left.
pub fn restrict_space(
    space: &mut crate::search::SearchSpace,
    card: &GpuProfile,
) -> Result<(), String> {
    let (mut kept, dropped): (Vec<Precision>, Vec<Precision>) =
        space.precisions.iter().partition(|&&p| card.supports(p));
    if dropped.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = dropped.iter().map(ToString::to_string).collect();
    let swap = space.default_precisions
        && dropped.contains(&Precision::Bf16)
        && !kept.contains(&Precision::Fp16)
        && card.supports(Precision::Fp16);
    if swap {
        kept.push(Precision::Fp16);
    }
    if kept.is_empty() {
        return Err(format!(
            "{} has no {} (compute capability {}); allow fp32 or fp16 with --precision",
            card.name,
            names.join(" or "),
            card.compute_capability
        ));
    }
    space.precisions = kept;
    space.policy.push(format!(
        "precision: {} left out: {} (compute capability {}) has no bf16{}",
        names.join(", "),
        card.name,
        card.compute_capability,
        if swap {
            "; fp16 mixed precision searched in its place"
        } else {
            ""
        }
    ));
    Ok(())
}

/// One configuration planned for a card, its measured and estimated parts apart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuEstimate {
    pub card: String,
    pub display_name: String,
    /// The device the calibration probes ran on, and how many there were.
    pub probe_device: String,
    pub probes: usize,
    /// Measured: the tensor bytes at the peak, as the cost model fitted to CPU probes predicts them
    /// (the same shapes and dtypes on the GPU).
    pub tensor_components: Components,
    pub tensor_peak_bytes: u64,
    /// Tokens per second on the probe device, predicted from the probes' timings (for reference;
    /// not used for the GPU).
    pub probe_device_tokens_per_s: f64,
    /// Estimated: the allocator allowance and the card's runtime overhead.
    pub allocator_allowance_bytes: u64,
    pub runtime_overhead_bytes: u64,
    /// Estimated: the GPU peak (tensors + allowance + overhead), as the projected model predicts it.
    pub peak_bytes: u64,
    /// Estimated: the roofline.
    pub roofline: RooflineEstimate,
}

/// Plans `knobs` for `card` from `cpu_model`; `None` when the card lacks the precision.
pub fn estimate(
    cpu_model: &CostModel,
    spec: &ModelSpec,
    knobs: &Knobs,
    card: &GpuProfile,
) -> Option<GpuEstimate> {
    let roofline = roofline(card, spec, knobs)?;
    let measured = cpu_model.predict(spec, knobs);
    let planned = project(cpu_model, spec, card).predict(spec, knobs);
    Some(GpuEstimate {
        card: card.name.clone(),
        display_name: card.display_name.clone(),
        probe_device: cpu_model.device.clone(),
        probes: cpu_model.fitted_on.len(),
        tensor_components: measured.components,
        tensor_peak_bytes: measured.peak_bytes,
        probe_device_tokens_per_s: measured.tokens_per_s,
        allocator_allowance_bytes: planned
            .peak_bytes
            .saturating_sub(measured.peak_bytes + card.runtime_overhead_bytes),
        runtime_overhead_bytes: card.runtime_overhead_bytes,
        peak_bytes: planned.peak_bytes,
        roofline,
    })
}

/// FLOPs for people: `3.31 TFLOP`, `4.60 GFLOP`.
fn flop_text(flops: f64) -> String {
    if flops >= 1e12 {
        format!("{:.2} TFLOP", flops / 1e12)
    } else {
        format!("{:.2} GFLOP", flops / 1e9)
    }
}

impl GpuEstimate {
    /// The plan for people: each figure with where it comes from.
    pub fn describe(&self, budget_bytes: Option<u64>) -> String {
        use crate::search::format_bytes;
        let r = &self.roofline;
        let mut lines = vec![
            format!(
                "GPU plan for {} ({}), made without a GPU:",
                self.display_name, self.card
            ),
            format!(
                "  tensors at the peak   {:>11}  measured: {} calibration probes on {}, extrapolated by the fitted cost model (same shapes and dtypes on the GPU)",
                format_bytes(self.tensor_peak_bytes),
                self.probes,
                self.probe_device
            ),
            format!(
                "  allocator allowance + {:>11}  estimated: {:.0}% of the tensors freed and re-allocated every step",
                format_bytes(self.allocator_allowance_bytes),
                100.0 * FRAGMENTATION_ALLOWANCE
            ),
            format!(
                "  CUDA runtime        + {:>11}  estimated: context and library workspaces (card profile; an assumption until measured)",
                format_bytes(self.runtime_overhead_bytes)
            ),
            format!(
                "  GPU peak            = {:>11}  estimated",
                format_bytes(self.peak_bytes)
            ),
        ];
        if let Some(budget) = budget_bytes {
            lines.push(format!(
                "  budget                {:>11}  ({:.1}% used)",
                format_bytes(budget),
                100.0 * self.peak_bytes as f64 / budget.max(1) as f64
            ));
        }
        lines.extend([
            format!(
                "  compute  {:>9.2} ms  estimated: {} matmul + {} attention at {:.1} TFLOP/s ({} dense × {MATMUL_EFFICIENCY})",
                1e3 * r.compute_s,
                flop_text(r.matmul_flops),
                flop_text(r.attention_flops),
                r.peak_tflop_per_s * MATMUL_EFFICIENCY,
                r.peak_tflop_per_s
            ),
            format!(
                "  memory   {:>9.2} ms  estimated: {:.2} GB moved at {:.0} GB/s (bandwidth × {BANDWIDTH_EFFICIENCY})",
                1e3 * r.memory_s,
                r.memory_bytes / 1e9,
                r.memory_bytes / r.memory_s.max(f64::MIN_POSITIVE) / 1e9
            ),
            format!(
                "  overhead {:>9.2} ms  estimated: kernel launches and synchronizations",
                1e3 * r.overhead_s
            ),
            format!(
                "  step     {:>9.2} ms  estimated: {:.0} tokens/s (roofline, no GPU measured)",
                1e3 * r.step_s,
                r.tokens_per_s
            ),
            format!(
                "  on {}: {:.1} tokens/s, predicted from the calibration probes' timings (not used for the GPU)",
                self.probe_device, self.probe_device_tokens_per_s
            ),
        ]);
        let mut text = lines.join("\n");
        text.push('\n');
        text
    }

    /// The plan for programs: measured and estimated figures under their own keys.
    pub fn to_json(&self, budget_bytes: Option<u64>) -> serde_json::Value {
        let components: serde_json::Map<String, serde_json::Value> = crate::probe::COMPONENT_NAMES
            .iter()
            .zip(self.tensor_components.as_array())
            .map(|(name, bytes)| (name.to_string(), serde_json::Value::from(bytes)))
            .collect();
        serde_json::json!({
            "card": self.card,
            "display_name": self.display_name,
            "budget_bytes": budget_bytes,
            "measured": {
                "source": format!("{} calibration probes on {}, extrapolated by the fitted cost model", self.probes, self.probe_device),
                "tensor_peak_bytes": self.tensor_peak_bytes,
                "tensor_components": components,
            },
            "probe_device_predicted_tokens_per_s": self.probe_device_tokens_per_s,
            "estimated": {
                "allocator_allowance_bytes": self.allocator_allowance_bytes,
                "runtime_overhead_bytes": self.runtime_overhead_bytes,
                "peak_bytes": self.peak_bytes,
                "step_s": self.roofline.step_s,
                "tokens_per_s": self.roofline.tokens_per_s,
                "roofline": self.roofline,
                "assumptions": {
                    "fragmentation_allowance": FRAGMENTATION_ALLOWANCE,
                    "matmul_efficiency": MATMUL_EFFICIENCY,
                    "bandwidth_efficiency": BANDWIDTH_EFFICIENCY,
                },
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_normalize_across_spellings() {
        assert_eq!(normalize_gpu_name("NVIDIA GeForce RTX 4090"), "rtx4090");
        assert_eq!(normalize_gpu_name("rtx-4090"), "rtx4090");
        assert_eq!(normalize_gpu_name("Tesla T4"), "t4");
        assert_eq!(normalize_gpu_name("NVIDIA A100-SXM4-80GB"), "a100sxm480gb");
    }

    #[test]
    fn edit_distance_by_hand() {
        assert_eq!(edit_distance("rtx4080", "rtx4090"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("h100", "h100"), 0);
    }
}
