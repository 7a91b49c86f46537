//! The segment model: a step's memory as the timeline the engine actually walks, so that a peak at
//! full depth is the maximum over the same sequence of segments a probe measured at one or two
//! layers.
//!
//! A training step is a fixed sequence of segments between the engine's marks: the embedding, each
//! layer's forward (kept, or recomputed later), the loss, the head's backward, each layer's
//! backward (with its recomputation first when checkpointed), the embedding's backward and the
//! gradient merge, the clip and the optimizer update. Every segment has two figures a probe measures
//! exactly: `delta`, what it leaves allocated (a layer's saved activations, a layer's gradients less
//! the activations it frees), and `excess`, how far above its starting point it goes while it runs
//! (the transient buffers of that work). Both depend on the shapes (batch, sequence, rank) and on
//! the discrete knobs, but **not on depth**: a layer's forward saves as much in a 2-layer probe as in
//! a 32-layer model. Depth only changes how many segments there are and what is already live when
//! each starts, which [`SegmentModel::simulate`] replays. So the peak's structure (which segment
//! peaks, and the maximum over them) comes out of the simulation, and only per-segment figures are
//! fitted.
//!
//! The loss and the head's backward can peak at two different moments — at a widened copy of the
//! vocabulary matrix for short inputs, at logits-sized tensors for long ones — so their excess is
//! the larger of two fitted lines where one does not explain the probes.
//!
//! Each segment kind is fitted per class: the discrete knobs that change its tensors (method,
//! quantization, precision, adapter targets; the loss mode for the loss segments; the optimizer for
//! the update), over a few shape features each (tokens, attention scores, logits rows, adapter sizes,
//! trainable parameters). A class never probed has no fit, and the caller falls back to the
//! phase model.

use super::exact;
use super::nnls;
use crate::config::{Knobs, Method, live_logits};
use crate::probe::{Components, ProbeResult, TimelineRow};
use crate::spec::ModelSpec;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The segments of a step, in the engine's order (see `engine::step`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// Before the step: what stays allocated between steps besides weights and optimizer state.
    Rest,
    Embed,
    FwdKept,
    FwdRecomp,
    Loss,
    HeadBwd,
    Recompute,
    BwdKept,
    BwdRecomp,
    /// The embedding's backward and handing the micro-batch's gradients over (first micro-batch).
    EmbedBwd,
    /// The same for later micro-batches, which add into the accumulated gradients.
    EmbedBwdAccum,
    Clip,
    Opt,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Rest => "rest",
            Kind::Embed => "embed",
            Kind::FwdKept => "forward_kept",
            Kind::FwdRecomp => "forward_recomputed",
            Kind::Loss => "loss",
            Kind::HeadBwd => "head_backward",
            Kind::Recompute => "recompute",
            Kind::BwdKept => "backward_kept",
            Kind::BwdRecomp => "backward_recomputed",
            Kind::EmbedBwd => "embed_backward",
            Kind::EmbedBwdAccum => "embed_backward_accum",
            Kind::Clip => "clip",
            Kind::Opt => "optimizer",
        }
    }

    /// The shape features this segment's figures may depend on. Per-layer segments never see depth;
    /// segments over all parameters see the trainable count (which grows with depth).
    fn features(self) -> &'static [Feat] {
        use Feat::*;
        match self {
            Kind::Rest => &[Const, Trainable],
            Kind::Embed => &[Const, Tokens],
            Kind::FwdKept | Kind::FwdRecomp | Kind::Recompute | Kind::BwdKept | Kind::BwdRecomp => {
                &[Const, Tokens, Scores, LoraTokens, AdapterParams]
            }
            Kind::Loss => &[Const, Tokens, Logits, LastRecomputed, HeadChunks],
            Kind::HeadBwd => &[Const, Tokens, Logits, HeadChunks],
            Kind::EmbedBwd | Kind::EmbedBwdAccum => &[Const, Tokens, Trainable],
            Kind::Clip | Kind::Opt => &[Const, Trainable, Largest],
        }
    }

    /// The segment whose fitted time this one shares: a layer's forward takes as long whether it is
    /// kept, recomputed later or recomputed now; a layer's backward whether its input was kept or
    /// recomputed. Pooling them gives every fit more observations.
    fn time_group(self) -> Kind {
        match self {
            Kind::FwdRecomp | Kind::Recompute => Kind::FwdKept,
            Kind::BwdRecomp => Kind::BwdKept,
            other => other,
        }
    }

    /// The shape features this segment's wall time may depend on: a layer's arithmetic (its
    /// matrices' and adapters' FLOPs in one feature, so that few, noisy probes cannot split them;
    /// attention's, which grow with seq², in another); the head's tokens and loss chunks (each
    /// chunk streams the vocabulary matrix); the parameter count for the segments over all
    /// parameters. The constant is what a call costs whatever its size (streaming a layer's
    /// weights, dequantizing them, launching its operations).
    fn time_features(self) -> &'static [Feat] {
        use Feat::*;
        if self == Kind::Recompute {
            // Pooled with the forward's fit: the same rate per FLOP, fewer FLOPs.
            return &[Const, RecomputeFlops, AttentionFlops];
        }
        match self.time_group() {
            Kind::Rest => &[Const],
            Kind::Embed => &[Const, Tokens],
            Kind::FwdKept => &[Const, LayerFlops, AttentionFlops],
            Kind::BwdKept => &[Const, LayerBackFlops, AttentionFlops],
            Kind::Loss | Kind::HeadBwd => &[Const, Tokens, Chunks],
            Kind::EmbedBwd | Kind::EmbedBwdAccum => &[Const, Tokens, Trainable],
            _ => &[Const, Trainable],
        }
    }

    /// The class of a configuration for this segment: the discrete knobs that change its tensors.
    /// The clip and the update see only the trainable tensors, so LoRA and QLoRA share theirs.
    fn class(self, knobs: &Knobs) -> String {
        let targets = super::calibrate::targets(knobs);
        let method = match (self, knobs.method) {
            (_, Method::Full) => "full".to_string(),
            (Kind::Clip | Kind::Opt, _) => format!("adapters {targets}"),
            (_, Method::Lora) => format!("lora {targets}"),
            (_, Method::Qlora) => format!("qlora {} {targets}", knobs.quant),
        };
        let mut class = format!("{} {method} {}", self.name(), knobs.precision);
        match self {
            Kind::Loss | Kind::HeadBwd => class.push_str(&format!(" loss={}", knobs.loss)),
            Kind::Clip | Kind::Opt => class.push_str(&format!(" {}", knobs.optimizer)),
            _ => {}
        }
        class
    }
}

/// Shape features, in elements (or parameters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Feat {
    Const,
    /// batch × seq × hidden.
    Tokens,
    /// batch × heads × seq².
    Scores,
    /// Logit rows alive at once (every token, or one chunk) × vocabulary.
    Logits,
    /// Passes of the loss over the vocabulary matrix: one, or one per chunk of rows.
    Chunks,
    /// vocabulary × hidden when a trained head's loss takes more than one chunk of rows, else 0:
    /// its gradient is then summed over the chunks, and off the CPU (whose products add into it
    /// in place) each chunk's part and the sum are live at once, with the head's 16-bit copy kept
    /// for backward. A step, not a slope: SmolLM2-135M's full fine-tune probes jumped by 57 MB
    /// kept and 270 MB transient past one chunk, and a fit with tokens and logit rows alone took
    /// the jump for a per-token cost (+1,564 B per token × hidden, cancelled by −18 B per logit
    /// below the chunk) and predicted 3.4 GB too much at 4,096 tokens on an H200.
    HeadChunks,
    /// batch × seq × hidden when the last layer is recomputed in backward, else 0: the loss then
    /// leaves one hidden-state tensor fewer behind (the last layer's output belongs to its
    /// recomputation, not to the graph the loss extends).
    LastRecomputed,
    /// A layer's forward FLOPs in its projections and adapters.
    LayerFlops,
    /// The same for a layer's recomputation in backward, which skips the down projection's
    /// product (its output is never read).
    RecomputeFlops,
    /// A layer's backward FLOPs in its projections and adapters.
    LayerBackFlops,
    /// Attention's FLOPs in a layer's forward: scores and their weighted sum (∝ seq²).
    AttentionFlops,
    /// batch × seq × Σ rank over adapter targets.
    LoraTokens,
    /// Adapter parameters per layer (rank × (in + out) summed over targets).
    AdapterParams,
    /// Trainable parameters of the whole model (at its depth).
    Trainable,
    /// The largest trainable tensor.
    Largest,
}

impl Feat {
    fn value(self, spec: &ModelSpec, knobs: &Knobs) -> f64 {
        let tokens = (knobs.batch * knobs.seq) as f64;
        let seq = knobs.seq as f64;
        let frozen = knobs.method != Method::Full;
        match self {
            Feat::Const => 1.0,
            Feat::Tokens => tokens * spec.hidden_size as f64,
            Feat::Scores => knobs.batch as f64 * spec.num_attention_heads as f64 * seq * seq,
            Feat::Logits => {
                let (rows, cols) = live_logits(knobs, knobs.batch * knobs.seq, spec.vocab_size);
                (rows * cols) as f64
            }
            Feat::LastRecomputed => {
                let last = spec.num_hidden_layers.saturating_sub(1);
                if knobs.checkpointing.recomputes(last) {
                    tokens * spec.hidden_size as f64
                } else {
                    0.0
                }
            }
            Feat::LayerFlops | Feat::RecomputeFlops | Feat::LayerBackFlops => {
                let adapters = if frozen {
                    exact::adapter_params_per_layer(spec, &knobs.lora) as f64
                } else {
                    0.0
                };
                let base = exact::projection_params(spec) as f64;
                if self == Feat::LayerFlops {
                    2.0 * tokens * (base + adapters)
                } else if self == Feat::RecomputeFlops {
                    2.0 * tokens * (exact::recomputed_projection_params(spec) as f64 + adapters)
                } else {
                    // The input's gradient through every matrix, the weights' gradients of the
                    // trained ones: the base's under full fine-tuning, each adapter's otherwise.
                    let full = if frozen { 0.0 } else { 1.0 };
                    2.0 * tokens * (base * (1.0 + full) + 2.0 * adapters)
                }
            }
            Feat::AttentionFlops => 4.0 * tokens * seq * spec.q_dim() as f64,
            Feat::Chunks => {
                let (rows, _) = live_logits(knobs, knobs.batch * knobs.seq, spec.vocab_size);
                (tokens / rows.max(1) as f64).ceil()
            }
            Feat::HeadChunks => {
                if knobs.method == Method::Full && Feat::Chunks.value(spec, knobs) > 1.0 {
                    (spec.vocab_size * spec.hidden_size) as f64
                } else {
                    0.0
                }
            }
            Feat::LoraTokens if frozen => {
                tokens * (knobs.lora.rank * knobs.lora.targets.len()) as f64
            }
            Feat::AdapterParams if frozen => {
                exact::adapter_params_per_layer(spec, &knobs.lora) as f64
            }
            Feat::LoraTokens | Feat::AdapterParams => 0.0,
            Feat::Trainable => exact::trainable_params(spec, knobs) as f64,
            Feat::Largest => exact::largest_trainable_tensor(spec, knobs) as f64,
        }
    }
}

/// One measured segment of a probe.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub kind: Kind,
    /// Bytes left allocated at the segment's end, relative to its start; for a layer's backward,
    /// as a middle layer's would be (less its `boundary_bytes`).
    pub delta: f64,
    /// Highest memory during the segment above its start (`None` for [`Kind::Rest`]).
    pub excess: Option<f64>,
    /// Wall time of the segment. For [`Kind::Rest`]: the step's time outside every mark.
    pub seconds: f64,
}

/// The kind of the segment that ends at `row`, given the row before it, or `None` for a mark this
/// model does not know.
fn kind_of(prev: &TimelineRow, row: &TimelineRow, spec: &ModelSpec, knobs: &Knobs) -> Option<Kind> {
    let layers = spec.num_hidden_layers;
    Some(match (row.phase.as_str(), row.layer) {
        ("embed", _) => Kind::Embed,
        ("forward", Some(l)) if knobs.checkpointing.recomputes(l) => Kind::FwdRecomp,
        ("forward", Some(_)) => Kind::FwdKept,
        ("loss", _) => Kind::Loss,
        ("backward", Some(l)) if l == layers => Kind::HeadBwd,
        ("recompute", _) => Kind::Recompute,
        ("backward", Some(_)) if prev.phase == "recompute" => Kind::BwdRecomp,
        ("backward", Some(_)) => Kind::BwdKept,
        ("micro_batch_done", _) if row.micro_batch == 0 => Kind::EmbedBwd,
        ("micro_batch_done", _) => Kind::EmbedBwdAccum,
        ("clip", _) => Kind::Clip,
        ("optimizer_step", _) => Kind::Opt,
        _ => return None,
    })
}

/// Splits a probe's timeline into segments. `None` when the timeline lacks the marks (a probe of an
/// older memtune, or a prober that reports phases only).
pub fn observations(probe: &ProbeResult) -> Option<Vec<Observation>> {
    let rows = &probe.timeline;
    let start = rows.iter().position(|r| r.phase == "step_start")?;
    if !rows.iter().any(|r| r.phase == "embed") || rows.iter().all(|r| r.segment_peak_bytes == 0) {
        return None;
    }
    let fixed = exact::weight_bytes(&probe.spec, &probe.knobs)
        + exact::optimizer_bytes(&probe.spec, &probe.knobs);
    let marked = rows.last().map_or(0.0, |r| r.t_s) - rows[start].t_s;
    let mut out = vec![Observation {
        kind: Kind::Rest,
        delta: rows[start].current_bytes as f64 - fixed as f64,
        excess: None,
        seconds: (probe.step_s - marked).max(0.0),
    }];
    for pair in rows[start..].windows(2) {
        let (prev, row) = (&pair[0], &pair[1]);
        let kind = kind_of(prev, row, &probe.spec, &probe.knobs)?;
        let boundary = match (kind, row.layer) {
            (Kind::BwdKept | Kind::BwdRecomp, Some(l)) => {
                boundary_bytes(l, &probe.spec, &probe.knobs)
            }
            _ => 0.0,
        };
        out.push(Observation {
            kind,
            delta: row.current_bytes as f64 - prev.current_bytes as f64 - boundary,
            excess: Some(row.segment_peak_bytes.saturating_sub(prev.current_bytes) as f64),
            seconds: (row.t_s - prev.t_s).max(0.0),
        });
    }
    Some(out)
}

/// Fitted figures of one segment class: `delta` and `excess` coefficients over `features`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentFit {
    pub features: Vec<String>,
    pub delta: Vec<f64>,
    pub excess: Vec<f64>,
    /// A second excess that grows with the shapes from zero (no constant), when one line cannot
    /// explain the probes: the excess is then the larger of the two. A segment can peak at two
    /// moments — e.g. the head's backward, at a widened copy of the vocabulary matrix (a constant)
    /// for short inputs and at its logits-sized gradients for long ones.
    #[serde(default)]
    pub excess_growing: Vec<f64>,
    /// How many probes the class was fitted on.
    pub probes: usize,
}

/// Fitted wall time of one segment group and class: seconds per unit of each of its time
/// features. A layer's forward, kept or recomputed, is one group; its backward another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimeFit {
    pub features: Vec<String>,
    pub seconds: Vec<f64>,
    /// How many segments it was fitted on.
    pub observations: usize,
}

/// Per-segment fits, by class (see [`Kind`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SegmentModel {
    pub classes: BTreeMap<String, SegmentFit>,
    /// Bytes a step pays besides its tensors on the device planned for (a GPU's context and
    /// workspaces; 0 for the device probed).
    #[serde(default)]
    pub runtime_extra_bytes: f64,
    /// Relative growth of the tensors that come and go every step on the device planned for (a
    /// caching allocator's slack; 0 for the device probed).
    #[serde(default)]
    pub churn_allowance: f64,
    /// Segment times by group and class; empty for a model planned for another device than the one
    /// probed (or cached before times were fitted).
    #[serde(default)]
    pub times: BTreeMap<String, TimeFit>,
}

/// Relative ridge: identified directions follow the (exact) data, unidentified ones stay at zero.
const RIDGE: f64 = 1e-10;

fn values(features: &[Feat], spec: &ModelSpec, knobs: &Knobs) -> Vec<f64> {
    features.iter().map(|f| f.value(spec, knobs)).collect()
}

fn feature_values(kind: Kind, spec: &ModelSpec, knobs: &Knobs) -> Vec<f64> {
    values(kind.features(), spec, knobs)
}

fn names(features: &[Feat]) -> Vec<String> {
    features
        .iter()
        .map(|f| format!("{f:?}").to_lowercase())
        .collect()
}

/// What layer `layer`'s backward leaves allocated beyond a middle layer's, in bytes: a layer's
/// input (one hidden-state tensor, `tokens × hidden` in the compute dtype) is freed by the
/// backward of the layer it feeds when the layer below it was recomputed (nothing of that layer's
/// holds it then), so such a backward frees one tensor more; and the top layer, when kept, frees
/// one fewer (its output belongs to the loss's graph, which the head's backward frees). Measured
/// on the engine (5 layers, LoRA and full, bf16 and fp32, each checkpointing policy): exactly
/// these bytes, and 0 for every other layer. A 2-layer probe has no middle layer, so its
/// observations are taken less these bytes and the replay adds them back layer by layer.
pub(crate) fn boundary_bytes(layer: usize, spec: &ModelSpec, knobs: &Knobs) -> f64 {
    let ckpt = &knobs.checkpointing;
    let hidden_state = (knobs.batch * knobs.seq * spec.hidden_size) as f64
        * exact::compute_dtype_bytes(knobs.precision) as f64;
    let top_kept = layer + 1 == spec.num_hidden_layers && !ckpt.recomputes(layer);
    let below_recomputed = layer > 0 && ckpt.recomputes(layer - 1);
    hidden_state * (f64::from(u8::from(top_kept)) - f64::from(u8::from(below_recomputed)))
}

/// The segments of one optimizer step after [`Kind::Rest`], in the engine's order, with the
/// micro-batch each belongs to and, for a layer's backward, the layer.
fn sequence(layers: usize, knobs: &Knobs) -> Vec<(Kind, usize, Option<usize>)> {
    let mut out = Vec::new();
    for m in 0..knobs.accum.max(1) {
        out.push((Kind::Embed, m, None));
        for l in 0..layers {
            let kind = if knobs.checkpointing.recomputes(l) {
                Kind::FwdRecomp
            } else {
                Kind::FwdKept
            };
            out.push((kind, m, None));
        }
        out.push((Kind::Loss, m, None));
        out.push((Kind::HeadBwd, m, None));
        for l in (0..layers).rev() {
            if knobs.checkpointing.recomputes(l) {
                out.push((Kind::Recompute, m, None));
                out.push((Kind::BwdRecomp, m, Some(l)));
            } else {
                out.push((Kind::BwdKept, m, Some(l)));
            }
        }
        out.push((
            if m == 0 {
                Kind::EmbedBwd
            } else {
                Kind::EmbedBwdAccum
            },
            m,
            None,
        ));
    }
    out.push((Kind::Clip, 0, None));
    out.push((Kind::Opt, 0, None));
    out
}

/// How much slower than the fit an observed segment may be before it counts as slowed by something
/// else on the machine (rather than by its own shape).
const SLOWED: f64 = 0.15;

/// Fits non-negative seconds per unit of each time feature, relative to each observation (a
/// segment's time is never negative, and its terms only add).
///
/// A timed segment is only ever slowed by what else runs (another process, a page fault, a thread
/// scheduled late), never sped up, and one slowed probe would otherwise pull every coefficient it
/// has leverage on. So the fit is reweighted a few times: an observation more than [`SLOWED`]
/// above the fit weighs `SLOWED / excess` of a normal one (one twice as slow as the fit, a sixth).
fn fit_seconds(rows: &[(Vec<f64>, f64)]) -> Result<Vec<f64>, nnls::FitError> {
    let width = rows.first().map_or(0, |r| r.0.len());
    let floor = 1e-5;
    let mut weights = vec![1.0; rows.len()];
    let mut seconds = vec![0.0; width];
    for _ in 0..5 {
        let a: Vec<Vec<f64>> = rows
            .iter()
            .zip(&weights)
            .map(|((x, t), w)| x.iter().map(|v| w * v / t.max(floor)).collect())
            .collect();
        let b: Vec<f64> = rows
            .iter()
            .zip(&weights)
            .map(|((_, t), w)| w * t / t.max(floor))
            .collect();
        seconds = nnls::fit_nonnegative(&a, &b, &vec![0.0; width], RIDGE)?;
        let next: Vec<f64> = rows
            .iter()
            .map(|(x, t)| {
                let fitted = dot(&seconds, x).max(floor);
                let slower = t / fitted - 1.0;
                if slower > SLOWED {
                    SLOWED / slower
                } else {
                    1.0
                }
            })
            .collect();
        if next == weights {
            break;
        }
        weights = next;
    }
    Ok(seconds)
}

/// A fit explains a row when it is within this share of the row's probe peak.
const EXPLAINED: f64 = 2e-3;

fn dot(c: &[f64], x: &[f64]) -> f64 {
    c.iter().zip(x).map(|(c, x)| c * x).sum()
}

/// Fits the excess as one line, or — when one line leaves rows unexplained — as the larger of a line
/// fitted to the smaller rows and a second line through zero fitted to the larger ones, over the
/// features `growing` allows only (the head's logits-sized tensors: the rows of the chunked loss
/// saturate, so a second line free to grow with the tokens too, fitted to the one or two probes
/// past the split, could not tell the two apart and took the jump for a per-token cost). Tries every
/// split by size (the first shape feature) and keeps the one that explains the rows best. Returns
/// (line, growing piece; empty when one line suffices).
fn fit_two_pieces(
    rows: &[(Vec<f64>, f64, f64)],
    growing: &[bool],
) -> Result<(Vec<f64>, Vec<f64>), nnls::FitError> {
    let one = fit_excess(rows)?;
    let worst = |a: &[f64], b: &[f64]| {
        rows.iter()
            .map(|(x, t, w)| {
                let p = if b.is_empty() {
                    dot(a, x)
                } else {
                    dot(a, x).max(dot(b, x))
                };
                ((p - t) * w).abs()
            })
            .fold(0.0f64, f64::max)
    };
    let single = worst(&one, &[]);
    if single <= EXPLAINED || rows.first().is_none_or(|r| r.0.len() < 2) {
        return Ok((one, Vec::new()));
    }
    let size = |x: &[f64]| x[1];
    let mut sizes: Vec<f64> = rows.iter().map(|(x, _, _)| size(x)).collect();
    sizes.sort_by(f64::total_cmp);
    sizes.dedup();
    let mut best = (single, one.clone(), Vec::new());
    for &split in sizes.iter().skip(1) {
        let line: Vec<_> = rows
            .iter()
            .filter(|(x, _, _)| size(x) < split)
            .cloned()
            .collect();
        let rising: Vec<_> = rows
            .iter()
            .filter(|(x, _, _)| size(x) >= split)
            .map(|(x, t, w)| {
                let x = x
                    .iter()
                    .zip(growing)
                    .map(|(&v, &allowed)| if allowed { v } else { 0.0 })
                    .collect();
                (x, *t, *w)
            })
            .collect();
        let (a, b) = (fit_excess(&line)?, fit_excess(&rising)?);
        let err = worst(&a, &b);
        // A second piece must explain the rows much better than one line, not just a little.
        if err < best.0 && err < 0.5 * single {
            best = (err, a, b);
        }
    }
    Ok((best.1, best.2))
}

/// Fits signed coefficients (each column and its negation, non-negative) to rows weighted by the
/// probe's peak, so every probe counts alike whatever its size.
fn fit_signed(rows: &[(Vec<f64>, f64, f64)]) -> Result<Vec<f64>, nnls::FitError> {
    let width = rows.first().map_or(0, |r| r.0.len());
    fit_with_signs(rows, width)
}

/// Fits an excess: how far above its start a segment goes can only grow with the shapes, so only
/// the constant (the first feature) may be negative. Signed shape coefficients let two nearly
/// collinear features (tokens × hidden and the chunked loss's logit rows × vocabulary, equal up to
/// the one probe that saturates the chunk) cancel: a bf16-pure head's backward was fitted at
/// +3930 B per token × hidden and −44 B per logit, and predicted 8 GiB of transient at 4096 tokens
/// where 0.25 GiB was measured.
fn fit_excess(rows: &[(Vec<f64>, f64, f64)]) -> Result<Vec<f64>, nnls::FitError> {
    fit_with_signs(rows, 1)
}

/// Fits coefficients whose first `signed` features may take either sign (as a column and its
/// negation, both non-negative) and the rest only positive ones.
fn fit_with_signs(
    rows: &[(Vec<f64>, f64, f64)],
    signed: usize,
) -> Result<Vec<f64>, nnls::FitError> {
    let width = rows.first().map_or(0, |r| r.0.len());
    let signed = signed.min(width);
    let a: Vec<Vec<f64>> = rows
        .iter()
        .map(|(x, _, w)| {
            x.iter()
                .map(|v| v * w)
                .chain(x[..signed].iter().map(|v| -v * w))
                .collect()
        })
        .collect();
    let b: Vec<f64> = rows.iter().map(|(_, t, w)| t * w).collect();
    let solution = nnls::fit_nonnegative(&a, &b, &vec![0.0; width + signed], RIDGE)?;
    Ok((0..width)
        .map(|i| solution[i] - if i < signed { solution[width + i] } else { 0.0 })
        .collect())
}

impl SegmentModel {
    /// Fits every segment class the probes show. Probes without segment marks are skipped; so are
    /// the times of untimed probes and of probes on a GPU.
    pub fn fit(probes: &[ProbeResult]) -> Result<Self, nnls::FitError> {
        type Rows = Vec<(Vec<f64>, f64, f64)>;
        type TimeRows = Vec<(Vec<f64>, f64)>;
        struct ClassData {
            kind: Kind,
            deltas: Rows,
            excesses: Rows,
            seen: std::collections::BTreeSet<usize>,
        }
        let mut data: BTreeMap<String, ClassData> = BTreeMap::new();
        let mut times: BTreeMap<String, (Kind, TimeRows)> = BTreeMap::new();
        for (i, probe) in probes.iter().enumerate() {
            let Some(obs) = observations(probe) else {
                continue;
            };
            let weight = 1.0 / probe.peak_bytes.max(1) as f64;
            // A GPU's segment times are not fitted: its marks wait for the device, but its
            // probes are so small that kernel launches, not the shapes, set their times (the
            // whole-step fit of `Coefficients::time` serves there).
            let timed =
                probe.step_s > 0.0 && probe.step_s.is_finite() && !probe.device.starts_with("cuda");
            for o in obs {
                let class = o.kind.class(&probe.knobs);
                let x = feature_values(o.kind, &probe.spec, &probe.knobs);
                // The sequence tables are exact: the fitted rest is what else stays between steps.
                let delta = if o.kind == Kind::Rest {
                    o.delta - exact::seq_table_bytes(&probe.spec, &probe.knobs) as f64
                } else {
                    o.delta
                };
                let entry = data.entry(class).or_insert_with(|| ClassData {
                    kind: o.kind,
                    deltas: Vec::new(),
                    excesses: Vec::new(),
                    seen: Default::default(),
                });
                entry.deltas.push((x.clone(), delta, weight));
                if let Some(excess) = o.excess {
                    entry.excesses.push((x, excess, weight));
                }
                if timed {
                    let t = values(o.kind.time_features(), &probe.spec, &probe.knobs);
                    let group = o.kind.time_group();
                    times
                        .entry(group.class(&probe.knobs))
                        .or_insert_with(|| (group, Vec::new()))
                        .1
                        .push((t, o.seconds));
                }
                entry.seen.insert(i);
            }
        }
        let gpu_paths = probes
            .iter()
            .any(|p| crate::engine::gpu_code_paths(&p.device));
        let mut classes = BTreeMap::new();
        for (class, d) in data {
            let kind = d.kind;
            let width = kind.features().len();
            // The head's segments peak at two different moments (a widened copy of the
            // vocabulary matrix for short inputs, logits-sized tensors for long ones); so do a
            // layer's on the GPU's code paths (tokens-sized tensors for short sequences, the
            // attention's scores-sized ones past a few hundred tokens, which the long-attention
            // probes of `calibrate::long_attention_probes` show). Elsewhere a second piece would
            // only chase small-size noise.
            let (excess, excess_growing) = if d.excesses.is_empty() {
                (vec![0.0; width], Vec::new())
            } else if matches!(kind, Kind::Loss | Kind::HeadBwd) {
                let growing: Vec<bool> =
                    kind.features().iter().map(|&f| f == Feat::Logits).collect();
                fit_two_pieces(&d.excesses, &growing)?
            } else if gpu_paths && kind.features().contains(&Feat::Scores) {
                let growing: Vec<bool> =
                    kind.features().iter().map(|&f| f == Feat::Scores).collect();
                fit_two_pieces(&d.excesses, &growing)?
            } else {
                (fit_excess(&d.excesses)?, Vec::new())
            };
            classes.insert(
                class,
                SegmentFit {
                    features: names(kind.features()),
                    delta: fit_signed(&d.deltas)?,
                    excess,
                    excess_growing,
                    probes: d.seen.len(),
                },
            );
        }
        let mut fitted_times = BTreeMap::new();
        for (group, (kind, rows)) in times {
            fitted_times.insert(
                group,
                TimeFit {
                    features: names(kind.time_features()),
                    seconds: fit_seconds(&rows)?,
                    observations: rows.len(),
                },
            );
        }
        Ok(Self {
            classes,
            times: fitted_times,
            ..Self::default()
        })
    }

    /// Drops the fitted segment times: for a model planned for another device, whose speed the
    /// probes did not measure.
    pub fn forget_times(&mut self) {
        self.times.clear();
    }

    /// Seconds of one segment, or `None` when its class has no fitted time.
    pub fn seconds(&self, kind: Kind, spec: &ModelSpec, knobs: &Knobs) -> Option<f64> {
        let fit = self.times.get(&kind.time_group().class(knobs))?;
        let x = values(kind.time_features(), spec, knobs);
        Some(dot(&fit.seconds, &x).max(0.0))
    }

    /// One optimizer step's wall time at `spec`'s full depth: the sum of its segments' fitted times
    /// (each layer timed as a probe timed it, not inferred from differences between probes), or
    /// `None` when some segment's class has no fitted time.
    pub fn step_seconds(&self, spec: &ModelSpec, knobs: &Knobs) -> Option<f64> {
        let mut total = self.seconds(Kind::Rest, spec, knobs)?;
        for (kind, _, _) in sequence(spec.num_hidden_layers, knobs) {
            total += self.seconds(kind, spec, knobs)?;
        }
        Some(total)
    }

    /// `(delta, excess)` of one segment, or `None` when its class was never probed.
    fn figures(&self, kind: Kind, spec: &ModelSpec, knobs: &Knobs) -> Option<(f64, f64)> {
        let fit = self.classes.get(&kind.class(knobs))?;
        let x = feature_values(kind, spec, knobs);
        let delta = dot(&fit.delta, &x);
        // A segment's end is one of its moments: it goes at least as high as it ends.
        let excess = dot(&fit.excess, &x)
            .max(dot(&fit.excess_growing, &x))
            .max(delta)
            .max(0.0);
        Some(if kind == Kind::Rest {
            let tables = exact::seq_table_bytes(spec, knobs) as f64;
            (delta.max(0.0) + tables + self.runtime_extra_bytes, excess)
        } else {
            let grow = 1.0 + self.churn_allowance;
            (delta * grow, excess * grow)
        })
    }

    /// Replays one optimizer step of `spec` (at its full depth) segment by segment, or `None` when
    /// some segment's class was never probed. The first entry is [`Kind::Rest`]: it starts at the
    /// weights and optimizer state, and its delta is what else is allocated when the step starts.
    pub fn replay(&self, spec: &ModelSpec, knobs: &Knobs) -> Option<Vec<Replayed>> {
        let layers = spec.num_hidden_layers;
        let grad_bytes = exact::trainable_dtype_bytes(knobs.precision) as f64;
        let per_layer_grads = exact::trainable_params_per_layer(spec, knobs) as f64 * grad_bytes;
        let all_grads = exact::trainable_params(spec, knobs) as f64 * grad_bytes;
        let head_grads = if knobs.method == Method::Full {
            all_grads - layers as f64 * per_layer_grads
        } else {
            0.0
        };
        let fixed = (exact::weight_bytes(spec, knobs) + exact::optimizer_bytes(spec, knobs)) as f64;
        let (rest, _) = self.figures(Kind::Rest, spec, knobs)?;
        let mut steps = vec![Replayed {
            kind: Kind::Rest,
            start: fixed,
            delta: rest.max(0.0),
            excess: 0.0,
            grads: 0.0,
        }];
        let mut current = fixed + rest.max(0.0);
        let mut grads_live = 0.0;
        for (kind, micro, layer) in sequence(layers, knobs) {
            // Gradients live once the segment is done: the head's and each layer's backward add
            // theirs, a later micro-batch starts with the accumulated ones, the update frees them.
            let grads_after = match kind {
                Kind::Embed if micro == 0 => 0.0,
                Kind::Embed => all_grads,
                Kind::HeadBwd => grads_live + head_grads,
                Kind::BwdKept | Kind::BwdRecomp => grads_live + per_layer_grads,
                Kind::EmbedBwd | Kind::EmbedBwdAccum | Kind::Clip => all_grads,
                Kind::Opt => 0.0,
                _ => grads_live,
            };
            let (mut delta, excess) = self.figures(kind, spec, knobs)?;
            if let Some(l) = layer {
                delta += boundary_bytes(l, spec, knobs);
            }
            steps.push(Replayed {
                kind,
                start: current,
                delta,
                excess,
                grads: grads_live,
            });
            current += delta;
            grads_live = grads_after;
        }
        Some(steps)
    }

    /// The peak of [`replay`](Self::replay) with its components, and the segment it peaked in.
    /// Gradients are the exact bytes of those computed by then; the transient is the peaking
    /// segment's excess; activations the rest of what is live.
    pub fn simulate(&self, spec: &ModelSpec, knobs: &Knobs) -> Option<(Components, Kind)> {
        let steps = self.replay(spec, knobs)?;
        let rest = steps[0].start + steps[0].delta;
        let peak = steps
            .iter()
            .skip(1)
            .max_by(|a, b| (a.start + a.excess).total_cmp(&(b.start + b.excess)))?;
        let weights = exact::weight_bytes(spec, knobs);
        let optimizer = exact::optimizer_bytes(spec, knobs);
        let top = (peak.start + peak.excess).max(rest);
        let gradients = peak.grads.min((top - rest - peak.excess).max(0.0));
        let activations = (top - rest - peak.excess - gradients).max(0.0);
        let round = |v: f64| v.max(0.0).round() as u64;
        let components = Components {
            weights,
            gradients: round(gradients),
            optimizer,
            activations: round(activations),
            transient: round(peak.excess),
            runtime: round(steps[0].delta),
        };
        Some((components, peak.kind))
    }
}

/// One segment of a replayed step: where memory stood when it began, what it left, how far above
/// its start it went, and the gradient bytes live during it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Replayed {
    pub kind: Kind,
    pub start: f64,
    pub delta: f64,
    pub excess: f64,
    pub grads: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Segment times `0.02 + 3e-4 · x` s at eight shapes, the largest one slowed.
    fn timed(slowed: f64) -> Vec<(Vec<f64>, f64)> {
        (1..=8)
            .map(|i| {
                let x = 16.0 * i as f64;
                let t = 0.02 + 3e-4 * x;
                (vec![1.0, x], if i == 8 { t * slowed } else { t })
            })
            .collect()
    }

    #[test]
    fn a_slowed_observation_does_not_pull_the_time_fit() {
        let exact = fit_seconds(&timed(1.0)).unwrap();
        assert!((exact[0] - 0.02).abs() < 1e-6 && (exact[1] - 3e-4).abs() < 1e-8);
        // Twice as slow (another process on the core): the others keep the fit within 1%, where
        // an unweighted fit predicts 1024 units 18.5% slow.
        let fitted = fit_seconds(&timed(2.0)).unwrap();
        let at = |c: &[f64], x: f64| c[0] + c[1] * x;
        for x in [16.0, 128.0, 1024.0] {
            let err = at(&fitted, x) / at(&exact, x) - 1.0;
            assert!(err.abs() < 0.01, "{x}: {err}");
        }
        // Within the noise a timing has anyway, every observation keeps its full weight.
        let near = fit_seconds(&timed(1.1)).unwrap();
        assert!(at(&near, 1024.0) > at(&exact, 1024.0) * 1.01);
    }
}
