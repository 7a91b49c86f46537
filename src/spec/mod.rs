//! Model specifications: the architecture as numbers. Read from a Hugging Face `config.json`, a model
//! folder, or the built-in catalog under `profiles/models/`. Memory does not depend on weight values,
//! so a spec is all the tuner needs; the trainer also loads weights when a folder provides them.

pub mod catalog;
pub mod hf;

use serde::{Deserialize, Serialize};

/// The architecture families the engine builds. All are decoder-only Llama-style transformers
/// (RMSNorm, rotary position embeddings, SwiGLU MLP, grouped-query attention); they differ in
/// biases and defaults only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    pub const SUPPORTED: &'static [&'static str] = &["llama", "mistral", "qwen2"];
}

/// One model's shape. Field names follow Hugging Face's `config.json` where one exists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Display name: the catalog's `org/name`, or the folder/file it was read from.
    pub name: String,
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    /// Bias on the q, k and v projections (qwen2); o_proj and the MLP never have one.
    pub attention_bias: bool,
}

impl ModelSpec {
    /// The tiny model used by tests and examples: small enough to train in well under a second a step.
    pub fn tiny() -> Self {
        Self {
            name: "tiny".to_string(),
            architecture: Architecture::Llama,
            vocab_size: 256 + 3,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            max_position_embeddings: 512,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: false,
            attention_bias: false,
        }
    }

    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Parameters of one decoder layer (attention, MLP, two norms).
    pub fn layer_params(&self) -> u64 {
        let h = self.hidden_size as u64;
        let q = self.q_dim() as u64;
        let kv = self.kv_dim() as u64;
        let i = self.intermediate_size as u64;
        let bias = if self.attention_bias { q + 2 * kv } else { 0 };
        h * q + 2 * h * kv + q * h + bias + 3 * h * i + 2 * h
    }

    /// Exact parameter count, as Hugging Face's `model.num_parameters()` reports it.
    pub fn param_count(&self) -> u64 {
        let h = self.hidden_size as u64;
        let v = self.vocab_size as u64;
        let embed = v * h;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        embed + head + h + self.num_hidden_layers as u64 * self.layer_params()
    }

    /// The same model cut to `layers` decoder layers (probes run at reduced depth).
    pub fn with_layers(&self, layers: usize) -> Self {
        Self {
            num_hidden_layers: layers,
            ..self.clone()
        }
    }

    /// Checks the invariants the engine relies on; the error names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(format!("`{field}` must be positive"));
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(format!(
                "`num_attention_heads` ({}) must be a multiple of `num_key_value_heads` ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim % 2 != 0 {
            return Err(format!(
                "`head_dim` ({}) must be even for rotary embeddings",
                self.head_dim
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_param_count_by_hand() {
        // embed 259*64 + head 259*64 + final norm 64
        // layer: q 64*64 + k,v 2*64*32 + o 64*64 + mlp 3*64*128 + norms 2*64 = 36992
        let spec = ModelSpec::tiny();
        assert_eq!(spec.layer_params(), 36_992);
        assert_eq!(spec.param_count(), 259 * 64 * 2 + 64 + 2 * 36_992);
    }
}
