//! One training step: forward and backward of each micro-batch (with gradient checkpointing when
//! asked), gradient accumulation, loss scaling for fp16, clipping, and the optimizer update.
//!
//! Checkpointing follows the recipe in CANDLE_NOTES: the forward keeps only the detached input of
//! each recomputed layer; backward walks the layers from last to first, rebuilds a recomputed layer's
//! graph from its saved input (wrapped in a `Var`), and back-propagates `Σ y ⊙ upstream` through it,
//! which yields the layer's parameter gradients and the gradient of its input.

use super::model::Model;
use super::ops::{self, LossTargets};
use super::optim::{self, Optimizer, Param};
use crate::config::{Hyper, Precision};
use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, TensorId, Var};
use std::collections::HashSet;

/// Receives a mark at each phase boundary of a step; probes read their meter there.
pub trait StepObserver {
    /// `phase` is one of `forward`, `loss`, `backward`, `recompute`, `micro_batch_done`,
    /// `clip`, `optimizer_step`; `layer` is set for per-layer marks.
    fn mark(&mut self, phase: &'static str, layer: Option<usize>, micro_batch: usize);
}

/// An observer that ignores every mark.
pub struct NoObserver;

impl StepObserver for NoObserver {
    fn mark(&mut self, _: &'static str, _: Option<usize>, _: usize) {}
}

/// One micro-batch: `ids` `[b, s]` u32, and per-position next-token targets and weights.
#[derive(Clone)]
pub struct Batch {
    pub ids: Tensor,
    pub targets: Tensor,
    pub mask: Tensor,
    /// Positions with a non-zero mask (the loss's tokens).
    pub counted_tokens: usize,
}

impl Batch {
    pub fn tokens(&self) -> usize {
        self.ids.elem_count()
    }
}

/// A gradient store holding nothing of ours (candle offers no public constructor; the backward of
/// a constant yields a store holding only that constant's own entry).
fn empty_grad_store(device: &candle_core::Device) -> Result<GradStore> {
    Tensor::zeros((), DType::F32, device)?.backward()
}

/// The store in `slot`, made (empty) on first use.
fn made<'a>(
    slot: &'a mut Option<GradStore>,
    device: &candle_core::Device,
) -> Result<&'a mut GradStore> {
    match slot {
        Some(store) => Ok(store),
        None => Ok(slot.insert(empty_grad_store(device)?)),
    }
}

/// The ids of the model's trainable parameters: the only gradients worth keeping.
fn trainable_ids(model: &Model) -> HashSet<TensorId> {
    model
        .trainable()
        .iter()
        .map(|p| p.var.as_tensor().id())
        .collect()
}

/// Adds the gradients of `from` whose ids are in `keep` into `into`.
fn merge_grads(into: &mut GradStore, from: &GradStore, keep: &HashSet<TensorId>) -> Result<()> {
    let ids: Vec<TensorId> = from
        .get_ids()
        .copied()
        .filter(|id| keep.contains(id))
        .collect();
    for id in ids {
        // Detached: a variable's gradient can hold its backward graph, and with it activations.
        let Some(g) = from.get_id(id).map(Tensor::detach) else {
            continue;
        };
        let sum = match into.get_id(id) {
            Some(existing) => existing.add(&g)?,
            None => g,
        };
        into.insert_id(id, sum);
    }
    Ok(())
}

/// Forward and backward of one micro-batch. Returns the loss value (already divided by
/// `normalizer`) and the gradients of every trainable parameter, multiplied by `loss_scale`.
pub fn forward_backward(
    model: &Model,
    batch: &Batch,
    normalizer: f64,
    loss_scale: f64,
    observer: &mut dyn StepObserver,
    micro_batch: usize,
) -> Result<(f64, GradStore)> {
    let keep = trainable_ids(model);
    forward_backward_keeping(
        model,
        &keep,
        batch,
        normalizer,
        loss_scale,
        observer,
        micro_batch,
    )
}

/// [`forward_backward`] with the trainable ids computed once by the caller.
fn forward_backward_keeping(
    model: &Model,
    keep: &HashSet<TensorId>,
    batch: &Batch,
    normalizer: f64,
    loss_scale: f64,
    observer: &mut dyn StepObserver,
    micro_batch: usize,
) -> Result<(f64, GradStore)> {
    // Made when the first part comes, where a store of its own would be.
    let mut grads: Option<GradStore> = None;
    let value = forward_backward_into(
        model,
        batch,
        normalizer,
        loss_scale,
        observer,
        micro_batch,
        Sinks {
            parts: &mut |part| merge_grads(made(&mut grads, &model.device)?, part, keep),
            head_rows: None,
            embed_rows: None,
        },
    )?;
    let grads = match grads {
        Some(grads) => grads,
        None => empty_grad_store(&model.device)?,
    };
    Ok((value, grads))
}

/// Where [`forward_backward_into`] hands gradients as they are made.
struct Sinks<'a> {
    /// Each part's gradient store, as backward makes it.
    parts: &'a mut dyn FnMut(&mut GradStore) -> Result<()>,
    /// An untied trainable head's gradient, block by block in the forward pass, where the loss
    /// can make it so ([`Model::head_loss`]); the head's part then has no gradient for it.
    head_rows: Option<ops::HeadRows<'a>>,
    /// A trainable embedding's gradient as the looked-up rows' gradients, instead of a gradient
    /// store holding the whole table-shaped gradient; the embedding's part is then not handed to
    /// `parts`.
    embed_rows: Option<EmbedRows<'a>>,
}

/// Where [`forward_backward_into`] hands a trainable embedding's gradient as rows.
type EmbedRows<'a> = &'a mut dyn FnMut(&ops::RowGrads) -> Result<()>;

/// Forward and backward of one micro-batch, handing each part's gradient store to
/// `sinks.parts` as backward makes it: the head's (final norm, head, and a tied embedding's
/// first share), each layer's from the last to the first, then the embedding's. A parameter's
/// gradient is whole in the store of the last part that uses it; the stores also hold gradients
/// that are not the parameters' (the layers' inputs). Returns the loss value (already divided by
/// `normalizer`).
fn forward_backward_into(
    model: &Model,
    batch: &Batch,
    normalizer: f64,
    loss_scale: f64,
    observer: &mut dyn StepObserver,
    micro_batch: usize,
    sinks: Sinks,
) -> Result<f64> {
    let take = sinks.parts;
    let targets = LossTargets {
        ids: batch.targets.clone(),
        mask: batch.mask.clone(),
        normalizer,
    };
    let n_layers = model.layers.len();
    let policy = model.knobs.checkpointing;

    // Forward: a recomputed layer keeps only its input; a kept layer keeps its graph, rooted at a
    // `Var` on its input's storage (not a copy: the previous layer's output stays alive for that
    // layer's backward anyway) so that backward can stop there and hand the gradient down. Even
    // without checkpointing, backward runs layer by layer: candle frees nothing during one
    // `backward()` call, so a single call over the whole model would hold every layer's
    // activations until the last gradient is computed.
    //
    // The first layer's input is tracked only when the embedding trains: for a frozen embedding
    // (LoRA) nothing reads its gradient, so backward skips what makes only that gradient (the
    // first layer's q/k/v input products and input norm, and the keys' path where k has no
    // adapter).
    enum Saved {
        Recompute(Tensor),
        Kept(Option<Var>, Tensor),
    }
    let track =
        |l: usize, x: &Tensor| (l > 0 || model.embed_is_trainable()).then(|| Var::sharing(x));
    let embedded = model.embed(&batch.ids)?;
    observer.mark("embed", None, micro_batch);
    let mut x = embedded.detach();
    let mut saved = Vec::with_capacity(n_layers);
    for l in 0..n_layers {
        if policy.recomputes(l) {
            let y = model.layer_forward(l, &x, true)?.detach();
            saved.push(Saved::Recompute(x));
            x = y;
        } else {
            let input = track(l, &x);
            let y = model.layer_forward(l, input.as_ref().map_or(&x, Var::as_tensor), true)?;
            x = y.detach();
            saved.push(Saved::Kept(input, y));
        }
        observer.mark("forward", Some(l), micro_batch);
    }
    let top = Var::sharing(&x);
    drop(x);
    let loss = model.head_loss(top.as_tensor(), &targets, Some(loss_scale), sinks.head_rows)?;
    observer.mark("loss", None, micro_batch);
    let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let mut head_grads = loss.affine(loss_scale, 0.0)?.backward()?;
    drop(loss);
    // A variable's gradient can carry a graph (backward formulas multiply by other variables);
    // detach it, or the next surrogate's backward would differentiate through it.
    let mut upstream = head_grads
        .get(top.as_tensor())
        .map(Tensor::detach)
        .ok_or_else(|| {
            candle_core::Error::Msg("loss has no gradient for the last hidden state".into())
        })?;
    take(&mut head_grads)?;
    drop(head_grads);
    observer.mark("backward", Some(n_layers), micro_batch);

    for l in (0..n_layers).rev() {
        // Everything of this layer (its saved graph, its gradient store) is dropped before the
        // mark, so that each mark sees what the layer's backward leaves behind.
        {
            let (input, y) = match saved.pop() {
                Some(Saved::Kept(input, y)) => (input, y),
                Some(Saved::Recompute(x)) => {
                    let input = track(l, &x);
                    let y = model.layer_recompute(l, input.as_ref().map_or(&x, Var::as_tensor))?;
                    drop(x);
                    observer.mark("recompute", Some(l), micro_batch);
                    (input, y)
                }
                None => candle_core::bail!("checkpoint stack underflow at layer {l}"),
            };
            let mut layer_grads = seeded_backward(&y, &upstream)?;
            if let Some(input) = &input {
                upstream = layer_grads
                    .get(input.as_tensor())
                    .map(Tensor::detach)
                    .ok_or_else(|| {
                        candle_core::Error::Msg(format!("layer {l} input got no gradient"))
                    })?;
            }
            take(&mut layer_grads)?;
        }
        observer.mark("backward", Some(l), micro_batch);
    }
    // The embedding's gradient (when it is trained) flows through the graph kept from `embed`.
    if model.embed_is_trainable() {
        match sinks.embed_rows {
            Some(rows) => rows(&model.embed_row_grads(&batch.ids, &upstream)?)?,
            None => take(&mut seeded_backward(&embedded, &upstream)?)?,
        }
    }
    Ok(value)
}

/// Backward from `y` with `upstream` as its gradient. On the CPU, a scalar op on `y` whose
/// gradient is `upstream` itself ([`Seed`]); elsewhere the surrogate `Σ y ⊙ upstream`, whose
/// gradient with respect to `y` is `upstream` too, but which costs a product, a sum nobody reads
/// and, in backward, a product by ones: four passes over `y` per layer, and a `y`-sized gradient.
fn seeded_backward(y: &Tensor, upstream: &Tensor) -> Result<GradStore> {
    if crate::engine::cpu_paths(y.device())
        && y.shape() == upstream.shape()
        && y.dtype() == upstream.dtype()
    {
        y.apply_op1(Seed(upstream.clone()))?.backward()
    } else {
        (y * upstream)?.sum_all()?.backward()
    }
}

/// A scalar zero computed from nothing, whose gradient with respect to its input is the tensor it
/// holds (`backward()` seeds the scalar with 1).
struct Seed(Tensor);

impl CustomOp1 for Seed {
    fn name(&self) -> &'static str {
        "seed"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let scalar = Shape::from(());
        let zero = candle_core::cpu_backend::CpuDevice.zeros_impl(&scalar, storage.dtype())?;
        Ok((zero, scalar))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.0.clone()))
    }
}

/// Dynamic loss scaling for fp16 (as PyTorch's GradScaler): start at 2^16, halve and skip the step
/// when gradients overflow, double after 200 clean steps.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    pub clean_steps: usize,
    pub enabled: bool,
}

impl LossScaler {
    pub fn new(precision: Precision) -> Self {
        let enabled = precision == Precision::Fp16;
        Self {
            scale: if enabled { 65536.0 } else { 1.0 },
            clean_steps: 0,
            enabled,
        }
    }

    fn update(&mut self, overflowed: bool) {
        if !self.enabled {
            return;
        }
        if overflowed {
            self.scale = (self.scale / 2.0).max(1.0);
            self.clean_steps = 0;
        } else {
            self.clean_steps += 1;
            if self.clean_steps >= 200 {
                self.scale *= 2.0;
                self.clean_steps = 0;
            }
        }
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    /// Mean loss over the step's counted tokens.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// True when fp16 gradients overflowed and the update was skipped.
    pub skipped: bool,
    pub tokens: usize,
}

/// The model, its trainable parameters and optimizer: everything one training step needs.
pub struct Engine {
    pub model: Model,
    pub params: Vec<Param>,
    pub optimizer: Box<dyn Optimizer>,
    pub hyper: Hyper,
    pub scaler: LossScaler,
    /// Ids of `params`' tensors: which gradients a step keeps (computed once, not per micro-batch).
    trainable_ids: HashSet<TensorId>,
}

impl Engine {
    pub fn new(model: Model, hyper: Hyper) -> Result<Self> {
        if let Some(why) = hyper.update_in_backward_conflict(&model.knobs) {
            candle_core::bail!("{why}");
        }
        let params = model.trainable();
        let optimizer = optim::build(model.knobs.optimizer, params.clone(), &hyper)?;
        let scaler = LossScaler::new(model.knobs.precision);
        let trainable_ids = params.iter().map(|p| p.var.as_tensor().id()).collect();
        Ok(Self {
            trainable_ids,
            model,
            params,
            optimizer,
            hyper,
            scaler,
        })
    }

    /// Forward and backward over `micro_batches`, accumulating gradients, without updating.
    pub fn accumulate(
        &self,
        micro_batches: &[Batch],
        observer: &mut dyn StepObserver,
    ) -> Result<(f64, GradStore)> {
        let normalizer = micro_batches
            .iter()
            .map(|b| b.counted_tokens)
            .sum::<usize>()
            .max(1) as f64;
        let keep = &self.trainable_ids;
        let mut total: Option<GradStore> = None;
        let mut loss = 0.0;
        for (i, batch) in micro_batches.iter().enumerate() {
            let (value, grads) = forward_backward_keeping(
                &self.model,
                keep,
                batch,
                normalizer,
                self.scaler.scale,
                observer,
                i,
            )?;
            loss += value;
            match total.as_mut() {
                None => total = Some(grads),
                // The micro-batch's store is freed before the mark, which then sees what the
                // micro-batch leaves behind.
                Some(t) => {
                    merge_grads(t, &grads, keep)?;
                    drop(grads);
                }
            }
            observer.mark("micro_batch_done", None, i);
        }
        let grads = total.ok_or_else(|| {
            candle_core::Error::Msg("a step needs at least one micro-batch".into())
        })?;
        Ok((loss, grads))
    }

    /// One optimizer step over `micro_batches` at learning rate `lr`.
    pub fn train_step(
        &mut self,
        micro_batches: &[Batch],
        lr: f64,
        observer: &mut dyn StepObserver,
    ) -> Result<StepStats> {
        if self.hyper.update_in_backward {
            return match micro_batches {
                [batch] => self.step_in_backward(batch, lr, observer),
                _ => candle_core::bail!(
                    "--update-in-backward takes one micro-batch a step, got {}",
                    micro_batches.len()
                ),
            };
        }
        let tokens = micro_batches.iter().map(Batch::tokens).sum();
        let (loss, mut grads) = self.accumulate(micro_batches, observer)?;
        let last = micro_batches.len().saturating_sub(1);
        if self.scaler.enabled {
            let inv = 1.0 / self.scaler.scale;
            for p in &self.params {
                if let Some(g) = grads.get(p.var.as_tensor()) {
                    let unscaled = g.affine(inv, 0.0)?;
                    grads.insert(p.var.as_tensor(), unscaled);
                }
            }
        }
        // Clipping's coefficient goes into the update (AdamW multiplies each gradient as it
        // reads it), rather than into scaled copies of the gradients first.
        let grad_norm = optim::grad_norm(&self.params, &grads)?;
        let coefficient = optim::clip_coefficient(grad_norm, self.hyper.clip);
        observer.mark("clip", None, last);
        let overflowed = !grad_norm.is_finite();
        self.scaler.update(overflowed);
        if !overflowed {
            self.optimizer.step_scaled(&mut grads, lr, coefficient)?;
        }
        drop(grads);
        observer.mark("optimizer_step", None, last);
        Ok(StepStats {
            loss,
            grad_norm,
            skipped: overflowed,
            tokens,
        })
    }

    /// One optimizer step that updates each part's parameters as soon as backward has made their
    /// gradients, and drops them ([`Hyper::update_in_backward`]): the same values as
    /// [`Engine::train_step`] without clipping. A trained embedding waits for the last part (tied
    /// to the head, it has gradients from the first part too). An untied head whose optimizer
    /// updates by rows (AdamW on the CPU) is updated block by block as the chunked loss makes its
    /// gradient, where all rows are one chunk: its whole gradient never exists. A non-finite
    /// gradient fails the step, since the parts before it have been updated already.
    fn step_in_backward(
        &mut self,
        batch: &Batch,
        lr: f64,
        observer: &mut dyn StepObserver,
    ) -> Result<StepStats> {
        // A trained embedding AdamW can update by rows, untied, is updated a block of rows at a
        // time from the looked-up rows' gradients: its whole gradient never exists. Otherwise it
        // waits for the last part (tied to the head, it has gradients from the first part too).
        let (embedding, embed_by_rows) = match &self.model.embed {
            super::model::Weight::Trainable(var)
                if self.model.lm_head.is_some() && self.optimizer.updates_rows(var) =>
            {
                (None, Some(var.clone()))
            }
            super::model::Weight::Trainable(var) => (Some(var.as_tensor().clone()), None),
            super::model::Weight::Frozen(_) => (None, None),
        };
        let waiting: HashSet<TensorId> = embedding.iter().map(Tensor::id).collect();
        let mut embedding_grads: Option<GradStore> = None;
        self.optimizer.begin_step();
        // An untied head AdamW can update by rows takes its gradient block by block as the loss
        // makes it, so the whole gradient never exists.
        let head = match &self.model.lm_head {
            Some(super::model::Weight::Trainable(var)) if self.optimizer.updates_rows(var) => {
                Some(var.clone())
            }
            _ => None,
        };
        let (model, params) = (&self.model, &self.params);
        // The optimizer and the sum of squares, for every sink (never borrowed at once: the
        // head's blocks come in the forward pass, the parts and the embedding's rows in backward).
        let state = std::cell::RefCell::new((&mut self.optimizer, 0.0));
        let finite = |norm: f64, part: &str| -> Result<()> {
            if norm.is_finite() {
                return Ok(());
            }
            candle_core::bail!(
                "non-finite gradient in {part}: a step that updates in backward cannot skip the \
                 update (the parts backward reached before it have been updated)"
            )
        };
        let update = |grads: &GradStore, part: &str| -> Result<()> {
            let norm = optim::grad_norm(params, grads)?;
            finite(norm, part)?;
            let mut held = state.borrow_mut();
            let (optimizer, squares) = &mut *held;
            *squares += norm * norm;
            optimizer.update(grads, lr)
        };
        let update_rows = |var: &Var, first: usize, grad: &Tensor, part: &str| -> Result<()> {
            let squares_here = optim::squares(grad)?;
            finite(squares_here, part)?;
            let mut held = state.borrow_mut();
            let (optimizer, squares) = &mut *held;
            *squares += squares_here;
            optimizer.update_rows(var, first, grad, lr)
        };
        let mut head_rows = head
            .as_ref()
            .map(|var| |first: usize, grad: &Tensor| update_rows(var, first, grad, "the head"));
        let mut embed_rows = embed_by_rows.as_ref().map(|var| {
            |rows: &ops::RowGrads| -> Result<()> {
                let (vocab, block) = (rows.vocab(), ops::row_block(rows.hidden()));
                for first in (0..vocab).step_by(block) {
                    let grad = rows.block(first, block.min(vocab - first))?;
                    update_rows(var, first, &grad, "the embedding")?;
                }
                Ok(())
            }
        });
        let mut part = 0;
        let n_layers = model.layers.len();
        let loss = forward_backward_into(
            model,
            batch,
            batch.counted_tokens.max(1) as f64,
            1.0,
            observer,
            0,
            Sinks {
                parts: &mut |grads| {
                    let name = match part {
                        0 => "the head".to_string(),
                        p if p <= n_layers => format!("layer {}", n_layers - p),
                        _ => "the embedding".to_string(),
                    };
                    part += 1;
                    if let Some(embedding) = &embedding
                        && grads.get(embedding).is_some()
                    {
                        merge_grads(made(&mut embedding_grads, &model.device)?, grads, &waiting)?;
                        grads.remove(embedding);
                    }
                    update(grads, &name)
                },
                head_rows: head_rows.as_mut().map(|f| f as ops::HeadRows),
                embed_rows: embed_rows.as_mut().map(|f| f as EmbedRows),
            },
        )?;
        observer.mark("micro_batch_done", None, 0);
        observer.mark("clip", None, 0);
        if let Some(grads) = embedding_grads {
            update(&grads, "the embedding")?;
        }
        observer.mark("optimizer_step", None, 0);
        let squares = state.borrow().1;
        Ok(StepStats {
            loss,
            grad_norm: squares.sqrt(),
            skipped: false,
            tokens: batch.tokens(),
        })
    }
}
