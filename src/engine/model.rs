//! A Llama-family decoder (llama, mistral, qwen2) written from basic candle ops, so that every
//! trainable parameter really receives a gradient (candle-nn's fused ops cut the graph silently; see
//! CANDLE_NOTES). Weights live in one of three stores: trainable `Var`s (full fine-tuning and LoRA
//! adapters), frozen dense tensors in the compute dtype, or frozen ggml-quantized blocks (qlora).

use super::kernels;
use super::matmul::{matmul as mm, unread_matmul};
use super::ops::{self, FrozenWeight, LossTargets};
use super::optim::Param;
use crate::config::{Knobs, LossMode, Method, Precision, Quant, Target, loss_chunk_rows};
use crate::spec::ModelSpec;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Result, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;

/// Dtypes a precision setting implies.
#[derive(Debug, Clone, Copy)]
pub struct Dtypes {
    /// Activations and matmuls.
    pub compute: DType,
    /// Trainable parameters (master weights), their gradients and optimizer state.
    pub trainable: DType,
    /// Frozen dense weights.
    pub frozen: DType,
}

impl Dtypes {
    pub fn of(precision: Precision) -> Self {
        match precision {
            Precision::Fp32 => Self {
                compute: DType::F32,
                trainable: DType::F32,
                frozen: DType::F32,
            },
            Precision::Bf16 => Self {
                compute: DType::BF16,
                trainable: DType::F32,
                frozen: DType::BF16,
            },
            Precision::Fp16 => Self {
                compute: DType::F16,
                trainable: DType::F32,
                frozen: DType::F16,
            },
            Precision::Bf16Pure => Self {
                compute: DType::BF16,
                trainable: DType::BF16,
                frozen: DType::BF16,
            },
        }
    }
}

/// Supplies initial values for the base model's tensors by Hugging Face name and shape.
pub trait WeightSource {
    /// The tensor `name` of `shape`, as f32 on the CPU (the model converts and moves it).
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor>;

    /// The same tensor as `dtype` on the CPU. Sources that can make it in that dtype directly
    /// override this; the default converts [`WeightSource::tensor`]'s f32.
    fn tensor_as(&mut self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.tensor(name, shape)?.to_dtype(dtype)
    }
}

/// Random initialisation as Hugging Face's Llama does it: normal(0, 0.02) for matrices, ones for
/// norms, zeros for biases. Seeded, so runs repeat exactly.
pub struct RandomInit {
    rng: StdRng,
}

impl RandomInit {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
        }
    }
}

impl WeightSource for RandomInit {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if name.ends_with("norm.weight") {
            vec![1.0; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            normal_vec(&mut self.rng, n, 0.02)
        };
        Tensor::from_vec(data, shape, &Device::Cpu)
    }
}

fn normal_vec(rng: &mut StdRng, n: usize, std: f32) -> Vec<f32> {
    // Box–Muller: two normals per pair of uniforms.
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
        let u2: f32 = rng.random::<f32>();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let theta = std::f32::consts::TAU * u2;
        out.push(r * theta.cos());
        if out.len() < n {
            out.push(r * theta.sin());
        }
    }
    out
}

/// A weight in one of the three stores.
#[derive(Clone)]
pub enum Weight {
    Trainable(Var),
    Frozen(FrozenWeight),
}

impl Weight {
    /// The weight as a tensor of the compute dtype (a cast of a trainable master weight stays on the
    /// graph, so its gradient flows back to the `Var` in the master dtype).
    fn as_compute(&self, dtype: DType) -> Result<Tensor> {
        match self {
            Weight::Trainable(v) => v.as_tensor().to_dtype(dtype),
            Weight::Frozen(f) => f.dense(dtype),
        }
    }

    pub fn storage_bytes(&self) -> u64 {
        match self {
            Weight::Trainable(v) => (v.elem_count() * v.dtype().size_in_bytes()) as u64,
            Weight::Frozen(f) => f.storage_bytes(),
        }
    }
}

/// A LoRA adapter: `y += scale · B (A dropout(x))`, A `[r, in]`, B `[out, r]`.
pub struct Lora {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
    pub dropout: f64,
}

/// A linear layer `y = x Wᵀ + bias`, optionally with a LoRA adapter.
pub struct Linear {
    pub name: String,
    pub weight: Weight,
    pub bias: Option<Weight>,
    pub lora: Option<Lora>,
}

impl Linear {
    /// `x`: `[n, in]` in the compute dtype → `[n, out]`.
    fn forward(&self, x: &Tensor, dtype: DType, train: bool) -> Result<Tensor> {
        self.apply(x, dtype, train, true)
    }

    /// [`Self::forward`] in training for an output whose value nobody reads (a recomputed
    /// layer's last product): the graph and its backward are the same, but the base product's
    /// forward writes zeros instead of multiplying (`unread_matmul`). The adapter's products
    /// still run: backward reads the adapter's intermediate.
    fn forward_unread(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        self.apply(x, dtype, true, false)
    }

    fn apply(&self, x: &Tensor, dtype: DType, train: bool, read: bool) -> Result<Tensor> {
        let frozen = |f: &FrozenWeight, bias: Option<&Tensor>| {
            if read {
                f.matmul_t(x, bias)
            } else {
                f.unread_matmul_t(x, bias)
            }
        };
        let mut y = match (&self.weight, &self.bias) {
            (Weight::Frozen(f), Some(Weight::Frozen(FrozenWeight::Dense(b)))) => {
                frozen(f, Some(&b.to_dtype(dtype)?))?
            }
            (Weight::Frozen(f), None) => frozen(f, None)?,
            (Weight::Frozen(_), Some(_)) => {
                candle_core::bail!("`{}`: a frozen weight needs a frozen dense bias", self.name)
            }
            (Weight::Trainable(v), _) => {
                let wt = v.as_tensor().to_dtype(dtype)?.t()?;
                if read {
                    mm(x, &wt)?
                } else {
                    unread_matmul(x, &wt)?
                }
            }
        };
        if let (Weight::Trainable(_), Some(bias)) = (&self.weight, &self.bias) {
            let biased = y.broadcast_add(&bias.as_compute(dtype)?)?;
            release_if(train, &y)?;
            y = biased;
        }
        if let Some(lora) = &self.lora {
            let x_in = if train && lora.dropout > 0.0 {
                candle_nn::ops::dropout(x, lora.dropout as f32)?
            } else {
                x.clone()
            };
            let a = lora.a.as_tensor().to_dtype(dtype)?;
            let b = lora.b.as_tensor().to_dtype(dtype)?;
            // The scale multiplies the rank-wide intermediate rather than the output: the same
            // product (exactly so for a power-of-two scale), one pass over `[n, r]` instead of
            // over `[n, out]` forward and backward.
            let down = mm(&x_in, &a.t()?)?;
            let down = if lora.scale == 1.0 {
                down
            } else {
                down.affine(lora.scale, 0.0)?
            };
            let up = mm(&down, &b.t()?)?;
            let sum = (&y + &up)?;
            // A sum's backward reads neither term.
            release_if(train, &y)?;
            release_if(train, &up)?;
            y = sum;
        }
        Ok(y)
    }

    /// Whether backward reads this layer's input: for a trainable weight's gradient, or for the
    /// adapter's. A frozen product's input gradient needs only the weight.
    fn keeps_input(&self) -> bool {
        matches!(self.weight, Weight::Trainable(_)) || self.lora.is_some()
    }
}

/// In a training forward pass, frees `t`'s data ([`ops::release`]): the caller's last use of an
/// activation that only graph nodes whose backward does not read it still hold.
fn release_if(train: bool, t: &Tensor) -> Result<()> {
    if train { ops::release(t) } else { Ok(()) }
}

/// One decoder layer.
pub struct Layer {
    pub input_norm: Weight,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub post_norm: Weight,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl Layer {
    pub fn linears(&self) -> [&Linear; 7] {
        [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ]
    }
}

/// The model: embeddings, decoder layers, final norm and head, plus rotary tables.
pub struct Model {
    pub spec: ModelSpec,
    pub knobs: Knobs,
    pub dtypes: Dtypes,
    pub device: Device,
    pub embed: Weight,
    pub layers: Vec<Layer>,
    pub norm: Weight,
    /// `None` when the embeddings are tied to the head.
    pub lm_head: Option<Weight>,
    /// RoPE tables and causal mask for the training sequence length, built once and shared by every
    /// layer (a mask per layer would be kept alive by each layer's graph until backward).
    tables: std::sync::Mutex<Option<SeqTables>>,
}

#[derive(Clone)]
struct SeqTables {
    seq: usize,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
}

struct Builder<'a> {
    knobs: &'a Knobs,
    dtypes: Dtypes,
    device: &'a Device,
    source: &'a mut dyn WeightSource,
    rng: StdRng,
}

impl Builder<'_> {
    fn base(&mut self, name: &str, shape: &[usize]) -> Result<Weight> {
        let full = self.knobs.method == Method::Full;
        let dtype = if full {
            self.dtypes.trainable
        } else {
            self.dtypes.frozen
        };
        let t = self.source.tensor_as(name, shape, dtype)?;
        if t.dims() != shape {
            candle_core::bail!(
                "weight `{name}` has shape {:?}, the model expects {:?}",
                t.dims(),
                shape
            );
        }
        let t = t.to_dtype(dtype)?.to_device(self.device)?;
        if full {
            Ok(Weight::Trainable(Var::from_tensor(&t)?))
        } else {
            Ok(Weight::Frozen(FrozenWeight::Dense(t)))
        }
    }

    fn linear(
        &mut self,
        name: &str,
        out: usize,
        inp: usize,
        bias: bool,
        target: Target,
    ) -> Result<Linear> {
        let weight = if self.knobs.method == Method::Qlora {
            let t = self.source.tensor(&format!("{name}.weight"), &[out, inp])?;
            if !inp.is_multiple_of(32) {
                candle_core::bail!(
                    "qlora needs input widths divisible by 32 (ggml blocks); `{name}` has {inp}"
                );
            }
            let dtype = match self.knobs.quant {
                Quant::Q8 => GgmlDType::Q8_0,
                Quant::Q4 => GgmlDType::Q4_0,
            };
            let q = QTensor::quantize(&t.to_device(self.device)?, dtype)?;
            Weight::Frozen(FrozenWeight::Quantized(Arc::new(q)))
        } else {
            self.base(&format!("{name}.weight"), &[out, inp])?
        };
        let bias = if bias {
            Some(self.base(&format!("{name}.bias"), &[out])?)
        } else {
            None
        };
        let lora = if self.knobs.method != Method::Full && self.knobs.lora.targets.contains(&target)
        {
            let r = self.knobs.lora.rank;
            // PEFT's default init: A ~ U(−1/√in, 1/√in) (kaiming-uniform, a = √5), B = 0.
            let bound = 1.0 / (inp as f32).sqrt();
            let a: Vec<f32> = (0..r * inp)
                .map(|_| self.rng.random_range(-bound..bound))
                .collect();
            let a = Tensor::from_vec(a, (r, inp), &Device::Cpu)?
                .to_dtype(self.dtypes.trainable)?
                .to_device(self.device)?;
            let b = Tensor::zeros((out, r), self.dtypes.trainable, self.device)?;
            Some(Lora {
                a: Var::from_tensor(&a)?,
                b: Var::from_tensor(&b)?,
                scale: self.knobs.lora.scale(),
                dropout: self.knobs.lora.dropout,
            })
        } else {
            None
        };
        Ok(Linear {
            name: name.to_string(),
            weight,
            bias,
            lora,
        })
    }
}

impl Model {
    /// Builds the model for `knobs` on `device`, taking base weights from `source`.
    pub fn build(
        spec: &ModelSpec,
        knobs: &Knobs,
        device: &Device,
        source: &mut dyn WeightSource,
        seed: u64,
    ) -> Result<Self> {
        Self::build_with_dtypes(
            spec,
            knobs,
            Dtypes::of(knobs.precision),
            device,
            source,
            seed,
        )
    }

    /// As [`Model::build`] with explicit dtypes (tests use f64 as a gradient reference).
    pub fn build_with_dtypes(
        spec: &ModelSpec,
        knobs: &Knobs,
        dtypes: Dtypes,
        device: &Device,
        source: &mut dyn WeightSource,
        seed: u64,
    ) -> Result<Self> {
        let (h, i, q, kv, v) = (
            spec.hidden_size,
            spec.intermediate_size,
            spec.q_dim(),
            spec.kv_dim(),
            spec.vocab_size,
        );
        let mut b = Builder {
            knobs,
            dtypes,
            device,
            source,
            rng: StdRng::seed_from_u64(seed ^ 0x10a4),
        };
        let embed = b.base("model.embed_tokens.weight", &[v, h])?;
        let mut layers = Vec::with_capacity(spec.num_hidden_layers);
        for l in 0..spec.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let bias = spec.attention_bias;
            layers.push(Layer {
                input_norm: b.base(&format!("{p}.input_layernorm.weight"), &[h])?,
                q: b.linear(&format!("{p}.self_attn.q_proj"), q, h, bias, Target::QProj)?,
                k: b.linear(&format!("{p}.self_attn.k_proj"), kv, h, bias, Target::KProj)?,
                v: b.linear(&format!("{p}.self_attn.v_proj"), kv, h, bias, Target::VProj)?,
                o: b.linear(&format!("{p}.self_attn.o_proj"), h, q, false, Target::OProj)?,
                post_norm: b.base(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                gate: b.linear(&format!("{p}.mlp.gate_proj"), i, h, false, Target::GateProj)?,
                up: b.linear(&format!("{p}.mlp.up_proj"), i, h, false, Target::UpProj)?,
                down: b.linear(&format!("{p}.mlp.down_proj"), h, i, false, Target::DownProj)?,
            });
        }
        let norm = b.base("model.norm.weight", &[h])?;
        let lm_head = if spec.tie_word_embeddings {
            None
        } else {
            Some(b.base("lm_head.weight", &[v, h])?)
        };
        Ok(Self {
            spec: spec.clone(),
            knobs: knobs.clone(),
            dtypes,
            device: device.clone(),
            embed,
            layers,
            norm,
            lm_head,
            tables: std::sync::Mutex::new(None),
        })
    }

    /// Every base weight (not adapters), with its Hugging Face name.
    pub fn base_weights(&self) -> Vec<(String, &Weight)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), &self.embed)];
        for (l, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), &layer.input_norm));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                &layer.post_norm,
            ));
            for lin in layer.linears() {
                out.push((format!("{}.weight", lin.name), &lin.weight));
                if let Some(bias) = &lin.bias {
                    out.push((format!("{}.bias", lin.name), bias));
                }
            }
        }
        out.push(("model.norm.weight".to_string(), &self.norm));
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), head));
        }
        out
    }

    /// Every trainable parameter with its name (adapters as PEFT names them, without the prefix).
    pub fn trainable(&self) -> Vec<Param> {
        let mut out: Vec<Param> = self
            .base_weights()
            .into_iter()
            .filter_map(|(name, w)| match w {
                Weight::Trainable(v) => Some(Param {
                    name,
                    var: v.clone(),
                }),
                Weight::Frozen(_) => None,
            })
            .collect();
        for layer in &self.layers {
            for lin in layer.linears() {
                if let Some(lora) = &lin.lora {
                    out.push(Param {
                        name: format!("{}.lora_A.weight", lin.name),
                        var: lora.a.clone(),
                    });
                    out.push(Param {
                        name: format!("{}.lora_B.weight", lin.name),
                        var: lora.b.clone(),
                    });
                }
            }
        }
        out
    }

    /// Exact bytes of every weight as stored (base, quantized blocks and adapters).
    pub fn weight_bytes(&self) -> u64 {
        let base: u64 = self
            .base_weights()
            .iter()
            .map(|(_, w)| w.storage_bytes())
            .sum();
        let adapters: u64 = self
            .layers
            .iter()
            .flat_map(|l| l.linears())
            .filter_map(|lin| lin.lora.as_ref())
            .map(|lora| {
                ((lora.a.elem_count() + lora.b.elem_count()) * lora.a.dtype().size_in_bytes())
                    as u64
            })
            .sum();
        base + adapters
    }

    pub fn embed_is_trainable(&self) -> bool {
        matches!(self.embed, Weight::Trainable(_))
    }

    /// Token embeddings `[b, s, h]` in the compute dtype.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        // Index the stored matrix and cast only the rows used: casting first would keep a
        // compute-dtype copy of the whole table alive for backward.
        let rows = match &self.embed {
            Weight::Trainable(v) => ops::embedding(v.as_tensor(), &flat)?,
            Weight::Frozen(FrozenWeight::Dense(t)) => t.index_select(&flat, 0)?,
            Weight::Frozen(f) => f.dense(self.dtypes.compute)?.index_select(&flat, 0)?,
        };
        rows.to_dtype(self.dtypes.compute)?
            .reshape((b, s, self.spec.hidden_size))
    }

    /// A trainable embedding's gradient from `upstream`, the gradient of [`Model::embed`]'s output
    /// for `ids`, as the looked-up rows' gradients ([`ops::RowGrads`]): `upstream` cast to the
    /// table's dtype, as backward through the cast makes it.
    pub fn embed_row_grads(&self, ids: &Tensor, upstream: &Tensor) -> Result<ops::RowGrads> {
        let Weight::Trainable(table) = &self.embed else {
            candle_core::bail!("the embedding is frozen: it has no gradient");
        };
        let (vocab, hidden) = table.dims2()?;
        let rows = upstream.to_dtype(table.dtype())?.reshape(((), hidden))?;
        ops::RowGrads::new(vocab, ids, &rows)
    }

    fn rms_norm(&self, x: &Tensor, weight: &Weight) -> Result<Tensor> {
        let (w, trainable) = match weight {
            Weight::Trainable(v) => (v.as_tensor().clone(), true),
            Weight::Frozen(f) => (f.dense(self.dtypes.compute)?, false),
        };
        ops::rms_norm(x, &w, self.spec.rms_norm_eps, trainable)
    }

    /// Builds what the first step at `seq` tokens would otherwise build lazily (the RoPE tables and
    /// the causal mask), so that a first step allocates what every later one does.
    pub fn prepare(&self, seq: usize) -> Result<()> {
        self.seq_tables(seq).map(|_| ())
    }

    fn seq_tables(&self, seq: usize) -> Result<SeqTables> {
        let mut cached = self
            .tables
            .lock()
            .map_err(|_| candle_core::Error::Msg("rope table lock poisoned".into()))?;
        if let Some(t) = cached.as_ref().filter(|t| t.seq == seq) {
            return Ok(t.clone());
        }
        let (cos, sin) = rope_tables(&self.spec, seq, self.dtypes.compute, &self.device)?;
        let tables = SeqTables {
            seq,
            cos,
            sin,
            mask: causal_mask(seq, &self.device)?,
        };
        *cached = Some(tables.clone());
        Ok(tables)
    }

    /// One decoder layer on `x`: `[b, s, h]`.
    pub fn layer_forward(&self, index: usize, x: &Tensor, train: bool) -> Result<Tensor> {
        self.layer_pass(index, x, train, true)
    }

    /// A training forward of layer `index` whose output is a graph root only, never read: a
    /// layer recomputed in backward, whose output's value the forward pass already handed on.
    /// Backward reads the inputs of the layer's products, never its output, so the MLP's down
    /// projection does not multiply (`Linear::forward_unread`); the output holds the residual
    /// stream without the MLP's part.
    pub fn layer_recompute(&self, index: usize, x: &Tensor) -> Result<Tensor> {
        self.layer_pass(index, x, true, false)
    }

    fn layer_pass(&self, index: usize, x: &Tensor, train: bool, read: bool) -> Result<Tensor> {
        let layer = &self.layers[index];
        let spec = &self.spec;
        let dt = self.dtypes.compute;
        let (b, s, h) = x.dims3()?;
        let (nh, nkv, hd) = (
            spec.num_attention_heads,
            spec.num_key_value_heads,
            spec.head_dim,
        );

        let xn = self.rms_norm(x, &layer.input_norm)?.reshape((b * s, h))?;
        // `[b, s, heads, d]`, as the projections give them: RoPE hands q and k to attention as
        // `[b, heads, s, d]` in the same pass, and attention reads v as it is, so no transposed
        // copy is made either way.
        let q = layer.q.forward(&xn, dt, train)?.reshape((b, s, nh, hd))?;
        let k = layer.k.forward(&xn, dt, train)?.reshape((b, s, nkv, hd))?;
        let v = layer.v.forward(&xn, dt, train)?.reshape((b, s, nkv, hd))?;
        // What backward does not read goes as soon as forward is done with it (`release_if`):
        // the projections' outputs once RoPE or a repeat has copied them, a norm's output once no
        // product that keeps its input is left, a product's output once it is summed.
        if !(layer.q.keeps_input() || layer.k.keeps_input() || layer.v.keeps_input()) {
            release_if(train, &xn)?;
        }
        let tables = self.seq_tables(s)?;
        let (q_in, k_in) = (q, k);
        let q = ops::rope(&q_in, &tables.cos, &tables.sin)?;
        let k = ops::rope(&k_in, &tables.cos, &tables.sin)?;
        release_if(train, &q_in)?;
        release_if(train, &k_in)?;
        let (k, v) = if nh == nkv {
            (k, v)
        } else {
            let rep = nh / nkv;
            let repeated = (repeat_kv(&k, rep, 1)?, repeat_kv(&v, rep, 2)?);
            release_if(train, &k)?;
            release_if(train, &v)?;
            repeated
        };

        // Softmax in fp32, as Hugging Face's eager attention does; backward recomputes it.
        let attn = ops::causal_attention(&q, &k, &v, &tables.mask, 1.0 / (hd as f64).sqrt())?
            .reshape((b * s, nh * hd))?;
        let o = layer.o.forward(&attn, dt, train)?;
        if !layer.o.keeps_input() {
            release_if(train, &attn)?;
        }
        let x = (x + o.reshape((b, s, h))?)?;
        release_if(train, &o)?;

        let xn = self.rms_norm(&x, &layer.post_norm)?.reshape((b * s, h))?;
        let gate = layer.gate.forward(&xn, dt, train)?;
        let up = layer.up.forward(&xn, dt, train)?;
        if !(layer.gate.keeps_input() || layer.up.keeps_input()) {
            release_if(train, &xn)?;
        }
        let act = kernels::swiglu(&gate, &up)?;
        let mlp = if read {
            layer.down.forward(&act, dt, train)?
        } else {
            layer.down.forward_unread(&act, dt)?
        };
        if !layer.down.keeps_input() {
            release_if(train, &act)?;
        }
        let out = (x + mlp.reshape((b, s, h))?)?;
        release_if(train, &mlp)?;
        Ok(out)
    }

    /// The head's weight and whether it is trainable (the embedding matrix when tied).
    fn head_weight(&self) -> &Weight {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Final norm, head and next-token loss for hidden states `x`: `[b, s, h]`. `upstream`: the
    /// gradient backward will bring, when a training step will ask for one (the chunked loss then
    /// makes its gradients in the forward pass; see [`ops::chunked_cross_entropy`]).
    /// `head_rows`: where an untied trainable head's gradient may go block by block
    /// ([`ops::HeadRows`], in the head parameter's dtype), where the chunked loss can hand it on
    /// so; backward then gives the head no gradient.
    pub fn head_loss(
        &self,
        x: &Tensor,
        targets: &LossTargets,
        upstream: Option<f64>,
        head_rows: Option<ops::HeadRows>,
    ) -> Result<Tensor> {
        let (b, s, h) = x.dims3()?;
        let xn = self.rms_norm(x, &self.norm)?.reshape((b * s, h))?;
        let head = self.head_weight();
        match self.knobs.loss {
            LossMode::Chunked => {
                let trainable = matches!(head, Weight::Trainable(_));
                let w = head.as_compute(self.dtypes.compute)?;
                // A block of the compute-dtype copy's gradient becomes the parameter's as
                // backward through the conversion would make it (the same rounding).
                let dtype = self.dtypes.trainable;
                let mut converted = head_rows
                    .filter(|_| self.lm_head.is_some())
                    .map(|sink| move |first: usize, g: &Tensor| sink(first, &g.to_dtype(dtype)?));
                ops::chunked_cross_entropy(
                    &xn,
                    &w,
                    targets,
                    loss_chunk_rows(self.spec.vocab_size),
                    trainable,
                    upstream,
                    converted.as_mut().map(|f| f as ops::HeadRows),
                )
            }
            LossMode::Full => {
                let logits = match head {
                    Weight::Trainable(v) => {
                        mm(&xn, &v.as_tensor().to_dtype(self.dtypes.compute)?.t()?)?
                    }
                    Weight::Frozen(f) => f.matmul_t(&xn, None)?,
                };
                ops::full_cross_entropy(&logits, targets)
            }
        }
    }

    /// Logits `[b, s, vocab]` in fp32, for evaluation and generation.
    pub fn logits(&self, ids: &Tensor) -> Result<Tensor> {
        let mut x = self.embed(ids)?;
        for l in 0..self.layers.len() {
            x = self.layer_forward(l, &x, false)?;
        }
        let (b, s, h) = x.dims3()?;
        let xn = self.rms_norm(&x, &self.norm)?.reshape((b * s, h))?;
        let logits = match self.head_weight() {
            Weight::Trainable(v) => mm(&xn, &v.as_tensor().to_dtype(self.dtypes.compute)?.t()?)?,
            Weight::Frozen(f) => f.matmul_t(&xn, None)?,
        };
        logits
            .to_dtype(wide(self.dtypes.compute))?
            .reshape((b, s, self.spec.vocab_size))
    }
}

/// The dtype for numerically sensitive reductions: f32, or f64 when computing in f64.
pub fn wide(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Each kv head of `x` repeated for the `rep` query heads it serves, along the heads' `axis`:
/// `[b, n_kv, s, d]` → `[b, n_kv · rep, s, d]` (axis 1, k as attention reads it) or
/// `[b, s, n_kv, d]` → `[b, s, n_kv · rep, d]` (axis 2, v).
fn repeat_kv(x: &Tensor, rep: usize, axis: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(x.clone());
    }
    let (b, n1, n2, d) = x.dims4()?;
    let mut spread = vec![b, n1, n2, d];
    spread.insert(axis + 1, rep);
    let mut merged = vec![b, n1, n2, d];
    merged[axis] *= rep;
    x.unsqueeze(axis + 1)?.broadcast_as(spread)?.reshape(merged)
}

/// The `[s, s]` f32 causal mask: 0 where a position may attend, −∞ above the diagonal.
pub fn causal_mask(s: usize, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..s)
        .flat_map(|i| (0..s).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(data, (s, s), device)
}

/// cos/sin tables `[positions, head_dim / 2]` for Hugging Face's rotate-half RoPE.
fn rope_tables(
    spec: &ModelSpec,
    positions: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = spec.head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / (spec.rope_theta as f32).powf(2.0 * i as f32 / spec.head_dim as f32))
        .collect();
    let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
    let t = Tensor::arange(0u32, positions as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((positions, 1))?;
    let freqs = t.broadcast_mul(&inv_freq)?;
    Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
}
