//! The exact part of the cost model: bytes that follow from tensor shapes and storage formats alone
//! (weights as stored, optimizer state), and the parameter counts the fitted parts are built on.
//! Nothing here is fitted; unit tests check it against hand arithmetic.

use crate::config::{Knobs, LoraSettings, Method, OptimizerKind, Precision, Quant, Target};
use crate::spec::ModelSpec;

/// Bytes per element of the compute dtype (activations, frozen base weights).
pub fn compute_dtype_bytes(precision: Precision) -> u64 {
    match precision {
        Precision::Fp32 => 4,
        Precision::Bf16 | Precision::Fp16 | Precision::Bf16Pure => 2,
    }
}

/// Bytes per element of trainable weights, their gradients and (for AdamW/SGD) optimizer state:
/// fp32 master copies under mixed precision, bf16 only under `bf16-pure`.
pub fn trainable_dtype_bytes(precision: Precision) -> u64 {
    match precision {
        Precision::Bf16Pure => 2,
        Precision::Fp32 | Precision::Bf16 | Precision::Fp16 => 4,
    }
}

/// The shape of one trainable tensor, as far as optimizer state cares (Adafactor factors matrices).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorShape {
    Vector(u64),
    /// `[rows, cols]`.
    Matrix(u64, u64),
}

impl TensorShape {
    pub fn elements(self) -> u64 {
        match self {
            TensorShape::Vector(n) => n,
            TensorShape::Matrix(n, m) => n * m,
        }
    }
}

/// `(out_features, in_features)` of one projection of a decoder layer (stored `[out, in]`).
pub fn projection_shape(spec: &ModelSpec, target: Target) -> (u64, u64) {
    let h = spec.hidden_size as u64;
    let q = spec.q_dim() as u64;
    let kv = spec.kv_dim() as u64;
    let i = spec.intermediate_size as u64;
    match target {
        Target::QProj => (q, h),
        Target::KProj | Target::VProj => (kv, h),
        Target::OProj => (h, q),
        Target::GateProj | Target::UpProj => (i, h),
        Target::DownProj => (h, i),
    }
}

/// Weights of the seven projection matrices of one layer (what `qlora` quantizes; biases excluded).
pub fn projection_params(spec: &ModelSpec) -> u64 {
    Target::ALL
        .iter()
        .map(|&t| {
            let (out, inp) = projection_shape(spec, t);
            out * inp
        })
        .sum()
}

/// Weights a recomputed layer multiplies by: all but the MLP's down projection, whose output only
/// the layer's output reads (the engine's `layer_recompute` does not run that product forward).
pub fn recomputed_projection_params(spec: &ModelSpec) -> u64 {
    let (out, inp) = projection_shape(spec, Target::DownProj);
    projection_params(spec) - out * inp
}

/// LoRA adapter parameters of one layer: `A [r, in]` and `B [out, r]` per target.
pub fn adapter_params_per_layer(spec: &ModelSpec, lora: &LoraSettings) -> u64 {
    let r = lora.rank as u64;
    lora.targets
        .iter()
        .map(|&t| {
            let (out, inp) = projection_shape(spec, t);
            r * (inp + out)
        })
        .sum()
}

/// Every trainable tensor of the configuration, in no particular order.
pub fn trainable_tensors(spec: &ModelSpec, knobs: &Knobs) -> Vec<TensorShape> {
    let h = spec.hidden_size as u64;
    let v = spec.vocab_size as u64;
    let r = knobs.lora.rank as u64;
    let mut tensors = Vec::new();
    match knobs.method {
        Method::Full => {
            tensors.push(TensorShape::Matrix(v, h));
            for _ in 0..spec.num_hidden_layers {
                for t in Target::ALL {
                    let (out, inp) = projection_shape(spec, t);
                    tensors.push(TensorShape::Matrix(out, inp));
                }
                if spec.attention_bias {
                    tensors.push(TensorShape::Vector(spec.q_dim() as u64));
                    tensors.push(TensorShape::Vector(spec.kv_dim() as u64));
                    tensors.push(TensorShape::Vector(spec.kv_dim() as u64));
                }
                tensors.push(TensorShape::Vector(h));
                tensors.push(TensorShape::Vector(h));
            }
            tensors.push(TensorShape::Vector(h));
            if !spec.tie_word_embeddings {
                tensors.push(TensorShape::Matrix(v, h));
            }
        }
        Method::Lora | Method::Qlora => {
            for _ in 0..spec.num_hidden_layers {
                for &t in &knobs.lora.targets {
                    let (out, inp) = projection_shape(spec, t);
                    tensors.push(TensorShape::Matrix(r, inp));
                    tensors.push(TensorShape::Matrix(out, r));
                }
            }
        }
    }
    tensors
}

/// Trainable parameters in total.
pub fn trainable_params(spec: &ModelSpec, knobs: &Knobs) -> u64 {
    match knobs.method {
        Method::Full => spec.param_count(),
        Method::Lora | Method::Qlora => {
            spec.num_hidden_layers as u64 * adapter_params_per_layer(spec, &knobs.lora)
        }
    }
}

/// Trainable parameters inside one decoder layer (the rest — embeddings, final norm, head — is
/// trainable only under `full`).
pub fn trainable_params_per_layer(spec: &ModelSpec, knobs: &Knobs) -> u64 {
    match knobs.method {
        Method::Full => spec.layer_params(),
        Method::Lora | Method::Qlora => adapter_params_per_layer(spec, &knobs.lora),
    }
}

/// The largest trainable tensor's elements (sizes per-tensor optimizer temporaries).
pub fn largest_trainable_tensor(spec: &ModelSpec, knobs: &Knobs) -> u64 {
    trainable_tensors(spec, knobs)
        .iter()
        .map(|t| t.elements())
        .max()
        .unwrap_or(0)
}

/// Bytes of a `[out, in]` matrix stored in ggml Q8_0 (34 B per 32) or Q4_0 (18 B per 32), blocked
/// along rows.
pub fn quantized_matrix_bytes(out: u64, inp: u64, quant: Quant) -> u64 {
    let block_bytes = match quant {
        Quant::Q8 => 34,
        Quant::Q4 => 18,
    };
    out * inp.div_ceil(32) * block_bytes
}

/// Parameters as stored: frozen base in the compute dtype (projections quantized under `qlora`),
/// trainable ones in the trainable dtype.
pub fn weight_bytes(spec: &ModelSpec, knobs: &Knobs) -> u64 {
    let cb = compute_dtype_bytes(knobs.precision);
    let tb = trainable_dtype_bytes(knobs.precision);
    let layers = spec.num_hidden_layers as u64;
    let adapters = layers * adapter_params_per_layer(spec, &knobs.lora);
    match knobs.method {
        Method::Full => spec.param_count() * tb,
        Method::Lora => spec.param_count() * cb + adapters * tb,
        Method::Qlora => {
            let quantized_per_layer: u64 = Target::ALL
                .iter()
                .map(|&t| {
                    let (out, inp) = projection_shape(spec, t);
                    quantized_matrix_bytes(out, inp, knobs.quant)
                })
                .sum();
            let dense = spec.param_count() - layers * projection_params(spec);
            layers * quantized_per_layer + dense * cb + adapters * tb
        }
    }
}

/// Optimizer state bytes, allocated when the optimizer is built.
pub fn optimizer_bytes(spec: &ModelSpec, knobs: &Knobs) -> u64 {
    let tb = trainable_dtype_bytes(knobs.precision);
    trainable_tensors(spec, knobs)
        .iter()
        .map(|&t| optimizer_state_bytes(knobs.optimizer, t, tb))
        .sum()
}

/// What the model keeps for the step's sequence length between steps: the RoPE cos/sin tables
/// (`[seq, head_dim / 2]` each, in the compute dtype) and the `[seq, seq]` f32 causal mask
/// (`engine::model::Model::prepare`).
pub fn seq_table_bytes(spec: &ModelSpec, knobs: &Knobs) -> u64 {
    let seq = knobs.seq as u64;
    let rope = 2 * seq * (spec.head_dim as u64 / 2) * compute_dtype_bytes(knobs.precision);
    rope + seq * seq * 4
}

/// State of one tensor: AdamW two moments; 8-bit AdamW two 1-byte moments plus an f32 scale per
/// 256-element block and moment (f32 moments for tensors under 4096 elements, as bitsandbytes);
/// Adafactor factored second moments (row + column sums for matrices); SGD one momentum buffer.
pub fn optimizer_state_bytes(
    kind: OptimizerKind,
    tensor: TensorShape,
    trainable_bytes: u64,
) -> u64 {
    let n = tensor.elements();
    match kind {
        OptimizerKind::Adamw => 2 * n * trainable_bytes,
        OptimizerKind::Adamw8bit => {
            if n >= 4096 {
                2 * n + 2 * 4 * n.div_ceil(256)
            } else {
                8 * n
            }
        }
        OptimizerKind::Adafactor => match tensor {
            TensorShape::Vector(n) => 4 * n,
            TensorShape::Matrix(rows, cols) => 4 * (rows + cols),
        },
        OptimizerKind::Sgd => n * trainable_bytes,
    }
}

/// Gradient bytes of one full set of trainable gradients (the fitted gradient component scales this).
pub fn gradient_bytes(spec: &ModelSpec, knobs: &Knobs) -> u64 {
    trainable_params(spec, knobs) * trainable_dtype_bytes(knobs.precision)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LoraSettings;
    use crate::spec::Architecture;

    /// SmolLM2-135M's shape (tied embeddings; 30 layers).
    fn smollm2() -> ModelSpec {
        ModelSpec {
            name: "smollm2-135m".to_string(),
            architecture: Architecture::Llama,
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            head_dim: 64,
            max_position_embeddings: 8192,
            rope_theta: 100_000.0,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: true,
            attention_bias: false,
        }
    }

    #[test]
    fn smollm2_has_the_published_parameter_count_and_full_tensors_sum_to_it() {
        let spec = smollm2();
        // transformers reports 134,515,008 parameters for SmolLM2-135M.
        assert_eq!(spec.param_count(), 134_515_008);
        let knobs = Knobs {
            method: Method::Full,
            ..Knobs::default()
        };
        let sum: u64 = trainable_tensors(&spec, &knobs)
            .iter()
            .map(|t| t.elements())
            .sum();
        assert_eq!(sum, 134_515_008);
        assert_eq!(largest_trainable_tensor(&spec, &knobs), 49152 * 576);
    }

    #[test]
    fn seq_tables_are_two_rope_tables_and_an_f32_mask() {
        let spec = smollm2();
        let knobs = Knobs {
            seq: 256,
            precision: Precision::Bf16,
            ..Knobs::default()
        };
        // cos and sin: 256 × 32 bf16 each (32,768 bytes together); mask 256 × 256 f32 (262,144).
        assert_eq!(
            seq_table_bytes(&spec, &knobs),
            2 * 256 * 32 * 2 + 256 * 256 * 4
        );
        let fp32 = Knobs {
            precision: Precision::Fp32,
            ..knobs
        };
        assert_eq!(seq_table_bytes(&spec, &fp32), 65_536 + 262_144);
    }

    #[test]
    fn adamw_state_of_smollm2_full_is_two_fp32_moments_per_parameter() {
        let spec = smollm2();
        let knobs = Knobs {
            method: Method::Full,
            optimizer: OptimizerKind::Adamw,
            ..Knobs::default()
        };
        assert_eq!(optimizer_bytes(&spec, &knobs), 134_515_008 * 8);
        let pure = Knobs {
            precision: Precision::Bf16Pure,
            ..knobs.clone()
        };
        assert_eq!(optimizer_bytes(&spec, &pure), 134_515_008 * 4);
        let sgd = Knobs {
            optimizer: OptimizerKind::Sgd,
            ..knobs
        };
        assert_eq!(optimizer_bytes(&spec, &sgd), 134_515_008 * 4);
    }

    #[test]
    fn lora_rank8_all_targets_on_smollm2() {
        let spec = smollm2();
        // per layer r*(in+out): q 8*(576+576), k,v 8*(576+192) each, o 8*(576+576),
        // gate,up 8*(576+1536) each, down 8*(1536+576) = 8*(1152+768+768+1152+2112*3) = 81,408
        assert_eq!(
            adapter_params_per_layer(&spec, &LoraSettings::default()),
            81_408
        );
        let knobs = Knobs::default();
        assert_eq!(trainable_params(&spec, &knobs), 30 * 81_408);
        // fp32: frozen base 4 B + adapters 4 B.
        assert_eq!(
            weight_bytes(&spec, &knobs),
            134_515_008 * 4 + 30 * 81_408 * 4
        );
        let bf16 = Knobs {
            precision: Precision::Bf16,
            ..Knobs::default()
        };
        assert_eq!(
            weight_bytes(&spec, &bf16),
            134_515_008 * 2 + 30 * 81_408 * 4
        );
        // Adafactor on A [8, in] and B [out, 8]: 4*(8+in) + 4*(out+8) per target.
        let ada = Knobs {
            optimizer: OptimizerKind::Adafactor,
            ..Knobs::default()
        };
        let per_layer =
            4 * (16 + 576 + 576) * 2 + 4 * (16 + 576 + 192) * 2 + 4 * (16 + 576 + 1536) * 3;
        assert_eq!(optimizer_bytes(&spec, &ada), 30 * per_layer);
    }

    #[test]
    fn adamw8bit_blocks_large_tensors_and_keeps_small_ones_fp32() {
        // 4096 elements: 2 B each + 16 blocks * 2 scales * 4 B.
        let big = TensorShape::Matrix(64, 64);
        assert_eq!(
            optimizer_state_bytes(OptimizerKind::Adamw8bit, big, 4),
            8192 + 128
        );
        // 4095 elements stay f32 moments.
        let small = TensorShape::Vector(4095);
        assert_eq!(
            optimizer_state_bytes(OptimizerKind::Adamw8bit, small, 4),
            8 * 4095
        );
        // 4097 elements: 17 blocks (the last one partial).
        let odd = TensorShape::Vector(4097);
        assert_eq!(
            optimizer_state_bytes(OptimizerKind::Adamw8bit, odd, 4),
            2 * 4097 + 8 * 17
        );
    }

    #[test]
    fn q4_and_q8_weights_of_smollm2() {
        let spec = smollm2();
        let proj = projection_params(&spec);
        // 576*576*2 + 192*576*2 + 576*1536*3 = 3,538,944
        assert_eq!(proj, 3_538_944);
        let dense = 134_515_008 - 30 * proj;
        let q4 = Knobs {
            method: Method::Qlora,
            quant: Quant::Q4,
            ..Knobs::default()
        };
        // Every in-dimension (576, 1536) is a multiple of 32: proj/32 blocks of 18 bytes.
        let adapters = 30 * 81_408 * 4;
        assert_eq!(
            weight_bytes(&spec, &q4),
            30 * proj / 32 * 18 + dense * 4 + adapters
        );
        let q8 = Knobs {
            quant: Quant::Q8,
            precision: Precision::Bf16,
            ..q4
        };
        assert_eq!(
            weight_bytes(&spec, &q8),
            30 * proj / 32 * 34 + dense * 2 + adapters
        );
        // A ragged row rounds up to whole blocks.
        assert_eq!(quantized_matrix_bytes(2, 33, Quant::Q4), 2 * 2 * 18);
    }
}
