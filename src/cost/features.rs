//! The structure of the fitted part of the cost model: feature vectors computed from a model's shape
//! and the knobs. Each feature is a product of tensor dimensions and bytes per element for one kind of
//! tensor (or one kind of work, for time); a fitted non-negative coefficient says how many such tensors
//! are live at the peak (or how many seconds such work costs). The structure is what lets probes at
//! 1–2 layers and 64–128 tokens predict 30 layers and 4096 tokens.
//!
//! Names carry their group as a prefix, and the group decides which component may use a feature:
//! `grad_` (gradients), `live_` (tensors live during forward/backward: activations and transient
//! buffers), `upd_` (optimizer-step temporaries), `const` (a fixed number of bytes). Because a model
//! shape (hidden, intermediate, heads, vocab) is fixed within one calibration, per-token terms are
//! written once with the hidden size as their unit (`n·h·bytes`): the coefficient reads "this many
//! hidden-sized vectors per token".

use super::exact;
use crate::config::{Knobs, LossMode, Method, OptimizerKind, Precision, Quant, live_logits};
use crate::spec::ModelSpec;

/// One feature: its name and value for a configuration.
pub type Feature = (&'static str, f64);

/// Derived dimensions shared by the memory and time features.
struct Dims {
    layers: f64,
    /// Layers that keep every activation for backward.
    kept_layers: f64,
    /// Layers recomputed during backward (only their input is kept).
    recomputed_layers: f64,
    /// 1 when any layer is recomputed (one layer's recomputation is live at a time), else 0.
    recomputes: f64,
    batch: f64,
    seq: f64,
    /// Tokens per micro-batch.
    tokens: f64,
    hidden: f64,
    heads: f64,
    q_dim: f64,
    vocab: f64,
    /// Rows of logits alive at once: every token under the full loss, one chunk under the chunked one.
    logit_rows: f64,
    /// Their columns: the vocabulary, or a frozen head's block of it ([`live_logits`]).
    logit_cols: f64,
    compute_bytes: f64,
    trainable_bytes: f64,
    full: f64,
    frozen: f64,
    qlora: f64,
    /// Mixed precision: trainable tensors in a wider dtype than compute.
    mixed: f64,
    /// Sum of `r` over adapter targets (the adapter intermediates per token).
    rank_sum: f64,
    /// LoRA rank (0 under `full`).
    rank: f64,
    adapter_in: f64,
    adapter_out: f64,
    layer_params: f64,
    other_params: f64,
    projection_params: f64,
    /// The MLP's down projection's weights (`hidden × intermediate`).
    down_params: f64,
    trainable: f64,
    trainable_per_layer: f64,
    largest_tensor: f64,
    accum: f64,
}

impl Dims {
    fn new(spec: &ModelSpec, knobs: &Knobs) -> Self {
        let layers = spec.num_hidden_layers;
        let recomputed = (0..layers)
            .filter(|&i| knobs.checkpointing.recomputes(i))
            .count();
        let tokens = (knobs.batch * knobs.seq) as f64;
        let logits = live_logits(knobs, knobs.batch * knobs.seq, spec.vocab_size);
        let frozen = knobs.method != Method::Full;
        let (mut adapter_in, mut adapter_out) = (0u64, 0u64);
        if frozen {
            for &t in &knobs.lora.targets {
                let (out, inp) = exact::projection_shape(spec, t);
                adapter_in += inp;
                adapter_out += out;
            }
        }
        let cb = exact::compute_dtype_bytes(knobs.precision);
        let tb = exact::trainable_dtype_bytes(knobs.precision);
        let trainable = exact::trainable_params(spec, knobs);
        let per_layer = exact::trainable_params_per_layer(spec, knobs);
        let b = |x: bool| if x { 1.0 } else { 0.0 };
        Self {
            layers: layers as f64,
            kept_layers: (layers - recomputed) as f64,
            recomputed_layers: recomputed as f64,
            recomputes: b(recomputed > 0),
            batch: knobs.batch as f64,
            seq: knobs.seq as f64,
            tokens,
            hidden: spec.hidden_size as f64,
            heads: spec.num_attention_heads as f64,
            q_dim: spec.q_dim() as f64,
            vocab: spec.vocab_size as f64,
            logit_rows: logits.0 as f64,
            logit_cols: logits.1 as f64,
            compute_bytes: cb as f64,
            trainable_bytes: tb as f64,
            full: b(!frozen),
            frozen: b(frozen),
            qlora: b(knobs.method == Method::Qlora),
            mixed: b(cb != tb),
            rank_sum: if frozen {
                (knobs.lora.rank * knobs.lora.targets.len()) as f64
            } else {
                0.0
            },
            rank: if frozen { knobs.lora.rank as f64 } else { 0.0 },
            adapter_in: adapter_in as f64,
            adapter_out: adapter_out as f64,
            layer_params: spec.layer_params() as f64,
            other_params: (spec.param_count() - layers as u64 * spec.layer_params()) as f64,
            projection_params: exact::projection_params(spec) as f64,
            down_params: (exact::projection_params(spec)
                - exact::recomputed_projection_params(spec)) as f64,
            trainable: trainable as f64,
            trainable_per_layer: per_layer as f64,
            largest_tensor: exact::largest_trainable_tensor(spec, knobs) as f64,
            accum: knobs.accum as f64,
        }
    }
}

/// Memory features, in bytes. See the module comment for the groups.
pub fn memory_features(spec: &ModelSpec, knobs: &Knobs) -> Vec<Feature> {
    let d = Dims::new(spec, knobs);
    let (cb, tb, f32b) = (d.compute_bytes, d.trainable_bytes, 4.0);
    let single = if d.accum > 1.0 { 0.0 } else { 1.0 };
    let multi = 1.0 - single;
    let layer_grads = d.layers * d.trainable_per_layer * tb;
    let other_grads = (d.trainable - d.layers * d.trainable_per_layer) * tb;
    let per_layer_tokens = d.kept_layers * d.tokens * d.hidden;
    let scores = d.batch * d.heads * d.seq * d.seq;
    let full_loss = if knobs.loss == LossMode::Full {
        1.0
    } else {
        0.0
    };
    let chunked = 1.0 - full_loss;
    let mut f = vec![
        // Gradients: one full set per micro-batch; with accumulation also the running total.
        ("grad_layers", single * layer_grads),
        ("grad_other", single * other_grads),
        ("grad_layers_accum", multi * layer_grads),
        ("grad_other_accum", multi * other_grads),
        // Tensors each kept layer saves for backward, in the compute dtype and (norms, softmax
        // statistics) in fp32; a trained base saves what a frozen one does not, so the two differ.
        ("live_layer_tokens_full", d.full * per_layer_tokens * cb),
        (
            "live_layer_tokens_full_f32",
            d.full * per_layer_tokens * f32b,
        ),
        ("live_layer_tokens_frozen", d.frozen * per_layer_tokens * cb),
        (
            "live_layer_tokens_frozen_f32",
            d.frozen * per_layer_tokens * f32b,
        ),
        // Attention's scores and probabilities (batch × heads × seq²): no layer keeps them, one
        // layer's are live while its attention runs (forward, or backward, which recomputes them).
        ("live_attention_scores", scores * cb),
        ("live_attention_scores_f32", scores * f32b),
        // Checkpointing: each recomputed layer keeps its input; one layer's recomputation is live.
        (
            "live_checkpoint_inputs",
            d.recomputed_layers * d.tokens * d.hidden * cb,
        ),
        (
            "live_recompute_tokens",
            d.recomputes * d.tokens * d.hidden * cb,
        ),
        // Outside the layers: embedding output, final norm, the causal mask.
        ("live_tokens", d.tokens * d.hidden * cb),
        ("live_tokens_f32", d.tokens * d.hidden * f32b),
        ("live_mask", d.seq * d.seq * cb),
        // Logits: the lm_head output in the compute dtype, the fp32 copy, log-softmax, gradient.
        (
            "live_logits_full",
            full_loss * d.logit_rows * d.logit_cols * cb,
        ),
        (
            "live_logits_full_f32",
            full_loss * d.logit_rows * d.logit_cols * f32b,
        ),
        (
            "live_logits_chunk",
            chunked * d.logit_rows * d.logit_cols * cb,
        ),
        (
            "live_logits_chunk_f32",
            chunked * d.logit_rows * d.logit_cols * f32b,
        ),
        // LoRA: adapter intermediates x·A, inputs cast to the adapter dtype (mixed precision only),
        // adapter outputs.
        ("live_lora_rank", d.kept_layers * d.tokens * d.rank_sum * tb),
        (
            "live_lora_inputs",
            d.mixed * d.kept_layers * d.tokens * d.adapter_in * tb,
        ),
        (
            "live_lora_outputs",
            d.kept_layers * d.tokens * d.adapter_out * tb,
        ),
        // Full fine-tune under mixed precision: compute-dtype copies of the trainable weights.
        (
            "live_weight_casts",
            d.full * d.mixed * d.kept_layers * d.layer_params * cb,
        ),
        (
            "live_weight_casts_other",
            d.full * d.mixed * d.other_params * cb,
        ),
        // Quantized base: dequantized projection weights, kept per layer or one layer at a time.
        (
            "live_dequant_layers",
            d.qlora * d.kept_layers * d.projection_params * cb,
        ),
        ("live_dequant_one", d.qlora * d.projection_params * cb),
    ];
    // Optimizer-step temporaries, per optimizer: per-tensor buffers (sized by the largest tensor) and
    // whole-model ones.
    for kind in OPTIMIZERS {
        let on = if knobs.optimizer == kind { 1.0 } else { 0.0 };
        f.push((upd_name(kind, false), on * d.largest_tensor * f32b));
        f.push((upd_name(kind, true), on * d.trainable * tb));
    }
    f.push(("const", 1.0));
    f
}

const OPTIMIZERS: [OptimizerKind; 4] = [
    OptimizerKind::Adamw,
    OptimizerKind::Adamw8bit,
    OptimizerKind::Adafactor,
    OptimizerKind::Sgd,
];

fn upd_name(kind: OptimizerKind, whole: bool) -> &'static str {
    match (kind, whole) {
        (OptimizerKind::Adamw, false) => "upd_adamw_largest",
        (OptimizerKind::Adamw, true) => "upd_adamw_all",
        (OptimizerKind::Adamw8bit, false) => "upd_adamw8bit_largest",
        (OptimizerKind::Adamw8bit, true) => "upd_adamw8bit_all",
        (OptimizerKind::Adafactor, false) => "upd_adafactor_largest",
        (OptimizerKind::Adafactor, true) => "upd_adafactor_all",
        (OptimizerKind::Sgd, false) => "upd_sgd_largest",
        (OptimizerKind::Sgd, true) => "upd_sgd_all",
    }
}

/// The prior a coefficient falls back to where the probes say nothing about it: one set of gradients
/// (two with accumulation), nothing else.
pub fn memory_prior(name: &str) -> f64 {
    match name {
        "grad_layers" | "grad_other" => 1.0,
        "grad_layers_accum" | "grad_other_accum" => 2.0,
        _ => 0.0,
    }
}

fn precision_index(p: Precision) -> usize {
    match p {
        Precision::Fp32 => 0,
        Precision::Bf16 => 1,
        Precision::Fp16 => 2,
        Precision::Bf16Pure => 3,
    }
}

const MATMUL: [&str; 4] = [
    "time_matmul_fp32",
    "time_matmul_bf16",
    "time_matmul_fp16",
    "time_matmul_bf16_pure",
];
const ATTENTION: [&str; 4] = [
    "time_attention_fp32",
    "time_attention_bf16",
    "time_attention_fp16",
    "time_attention_bf16_pure",
];
const ELEMENTWISE: [&str; 4] = [
    "time_elementwise_fp32",
    "time_elementwise_bf16",
    "time_elementwise_fp16",
    "time_elementwise_bf16_pure",
];

/// Step-time features: work per optimizer step (all micro-batches). Matmul and attention FLOPs and
/// elementwise traffic each get a rate per precision (fitted on the device: never assume bf16 is
/// faster), optimizer work a rate per optimizer, plus per-micro-batch and per-layer overheads.
/// This whole-step fit serves only where the probes' segments are not timed (GPU probes, models
/// planned for a card); elsewhere [`super::segments::SegmentModel::step_seconds`] predicts.
pub fn time_features(spec: &ModelSpec, knobs: &Knobs) -> Vec<Feature> {
    let d = Dims::new(spec, knobs);
    let lin = d.projection_params;
    let lora = 2.0 * d.rank * (d.adapter_in + d.adapter_out);
    // Passes over a layer: forward, input-gradient, weight-gradient (trained base only), and one more
    // forward for every recomputed layer.
    let base_passes = d.layers * (2.0 + d.full) + d.recomputed_layers;
    let all_passes = 3.0 * d.layers + d.recomputed_layers;
    let head = 2.0 * d.vocab * d.hidden;
    let head_passes = 2.0
        + d.full
        + if knobs.loss == LossMode::Chunked {
            1.0
        } else {
            0.0
        };
    // A recomputation skips the down projection's product (`Model::layer_recompute`): that
    // matrix is neither multiplied nor streamed (nor dequantized) then.
    let skipped = d.recomputed_layers * d.down_params;
    let matmul =
        d.tokens * (2.0 * (lin * base_passes - skipped) + lora * all_passes + head * head_passes);
    let attention = d.tokens * 4.0 * d.seq * d.q_dim * all_passes;
    let elementwise = d.tokens * d.hidden * all_passes;
    let p = precision_index(knobs.precision);
    let mut f: Vec<Feature> = Vec::with_capacity(24);
    for i in 0..4 {
        let on = if i == p { d.accum } else { 0.0 };
        f.push((MATMUL[i], on * matmul));
        f.push((ATTENTION[i], on * attention));
        f.push((ELEMENTWISE[i], on * elementwise));
    }
    f.push((
        "time_loss",
        d.accum * d.tokens * d.vocab * (head_passes - 1.0),
    ));
    // Small matmuls are bound by reading their weights, not by arithmetic: each pass over a layer
    // streams its matrices once per micro-batch, and the head streams the vocabulary matrix once per
    // loss chunk per pass. Short probes sit in this regime; long sequences in the arithmetic one.
    let head_chunks = (d.tokens / d.logit_rows.max(1.0)).ceil();
    let stream = d.accum
        * d.compute_bytes
        * (lin * base_passes - skipped + d.vocab * d.hidden * head_chunks * head_passes);
    f.push(("time_weight_stream", stream));
    for kind in OPTIMIZERS {
        let on = if knobs.optimizer == kind { 1.0 } else { 0.0 };
        let name = match kind {
            OptimizerKind::Adamw => "time_optimizer_adamw",
            OptimizerKind::Adamw8bit => "time_optimizer_adamw8bit",
            OptimizerKind::Adafactor => "time_optimizer_adafactor",
            OptimizerKind::Sgd => "time_optimizer_sgd",
        };
        f.push((name, on * d.trainable));
    }
    for (quant, name) in [
        (Quant::Q8, "time_dequant_q8"),
        (Quant::Q4, "time_dequant_q4"),
    ] {
        let on = if knobs.quant == quant { d.qlora } else { 0.0 };
        f.push((
            name,
            on * d.accum * (lin * (2.0 * d.layers + d.recomputed_layers) - skipped),
        ));
    }
    f.push(("time_accumulate", (d.accum - 1.0) * d.trainable));
    f.push(("time_micro_batch", d.accum));
    f.push(("time_layer_launch", d.accum * all_passes));
    f.push(("time_step", 1.0));
    f
}
