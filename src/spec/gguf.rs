//! Reads a GGUF file's header into a [`ModelSpec`]: the architecture from `general.architecture`
//! and the shapes from its `<arch>.*` keys, as llama.cpp's converter writes them. Only the header
//! is read (metadata and tensor table), never the tensor data.

use super::{Architecture, ModelSpec, SpecError};
use candle_core::quantized::gguf_file::{Content, Value};
use std::path::Path;

/// Reads the header of the GGUF file at `path`.
pub fn read_header(path: &Path) -> Result<Content, SpecError> {
    let mut file = std::fs::File::open(path).map_err(|source| SpecError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Content::read(&mut file).map_err(|e| SpecError::Gguf {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Reads the GGUF file at `path` into a spec named `name`.
pub fn read_spec(path: &Path, name: &str) -> Result<ModelSpec, SpecError> {
    let content = read_header(path)?;
    spec_from_content(&content, &path.display().to_string(), name)
}

/// The spec a GGUF header describes. `file` is how errors name it. The result is validated.
pub fn spec_from_content(
    content: &Content,
    file: &str,
    name: &str,
) -> Result<ModelSpec, SpecError> {
    let meta = Meta { file, content };
    let arch_name = meta.string("general.architecture")?;
    let architecture = match arch_name.as_str() {
        // llama.cpp converts Mistral checkpoints under the `llama` architecture too.
        "llama" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        other => {
            return Err(SpecError::UnsupportedArchitecture {
                file: file.to_string(),
                found: format!("`general.architecture` \"{other}\""),
                supported: "llama, qwen2 (GGUF)".to_string(),
            });
        }
    };
    let key = |suffix: &str| format!("{arch_name}.{suffix}");
    let hidden_size = meta.required(&key("embedding_length"))?;
    let num_attention_heads = meta.required(&key("attention.head_count"))?;
    let num_key_value_heads = meta
        .optional(&key("attention.head_count_kv"))?
        .unwrap_or(num_attention_heads);
    let head_dim = match meta.optional(&key("attention.key_length"))? {
        Some(d) => d,
        None => match meta.optional(&key("rope.dimension_count"))? {
            Some(d) => d,
            None => hidden_size / num_attention_heads.max(1),
        },
    };
    // The vocabulary: the explicit key, else the tokenizer's token list, else the embedding rows.
    let vocab_size = match meta.optional(&key("vocab_size"))? {
        Some(v) => v,
        None => match content.metadata.get("tokenizer.ggml.tokens") {
            Some(Value::Array(tokens)) => tokens.len(),
            _ => content
                .tensor_infos
                .get("token_embd.weight")
                .map(|t| t.shape.dims()[0])
                .ok_or_else(|| SpecError::MissingField {
                    file: file.to_string(),
                    field: key("vocab_size"),
                    expected: "a positive integer (or a tokenizer or `token_embd.weight`)"
                        .to_string(),
                })?,
        },
    };
    let spec = ModelSpec {
        name: name.to_string(),
        architecture,
        vocab_size,
        hidden_size,
        intermediate_size: meta.required(&key("feed_forward_length"))?,
        num_hidden_layers: meta.required(&key("block_count"))?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        max_position_embeddings: meta.optional(&key("context_length"))?.unwrap_or(2048),
        rope_theta: meta.float(&key("rope.freq_base"))?.unwrap_or(10_000.0),
        rms_norm_eps: meta
            .float(&key("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5),
        // llama.cpp writes no `output.weight` when the head shares the embedding matrix.
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
    };
    spec.validate().map_err(|reason| SpecError::Invalid {
        file: file.to_string(),
        reason,
    })?;
    Ok(spec)
}

/// Metadata access whose errors name the file and the key.
struct Meta<'a> {
    file: &'a str,
    content: &'a Content,
}

impl Meta<'_> {
    fn wrong(&self, key: &str, expected: &str, value: &Value) -> SpecError {
        SpecError::Field {
            file: self.file.to_string(),
            field: key.to_string(),
            expected: expected.to_string(),
            found: format!("{value:?}"),
        }
    }

    fn string(&self, key: &str) -> Result<String, SpecError> {
        match self.content.metadata.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(self.wrong(key, "a string", other)),
            None => Err(SpecError::MissingField {
                file: self.file.to_string(),
                field: key.to_string(),
                expected: "a string".to_string(),
            }),
        }
    }

    fn required(&self, key: &str) -> Result<usize, SpecError> {
        self.optional(key)?.ok_or_else(|| SpecError::MissingField {
            file: self.file.to_string(),
            field: key.to_string(),
            expected: "a positive integer".to_string(),
        })
    }

    fn optional(&self, key: &str) -> Result<Option<usize>, SpecError> {
        let Some(value) = self.content.metadata.get(key) else {
            return Ok(None);
        };
        match gguf_integer(value) {
            Some(n) if n > 0 => Ok(Some(n)),
            _ => Err(self.wrong(key, "a positive integer", value)),
        }
    }

    fn float(&self, key: &str) -> Result<Option<f64>, SpecError> {
        let Some(value) = self.content.metadata.get(key) else {
            return Ok(None);
        };
        let x = match value {
            Value::F32(x) => *x as f64,
            Value::F64(x) => *x,
            other => gguf_integer(other).map(|n| n as f64).unwrap_or(f64::NAN),
        };
        if x > 0.0 && x.is_finite() {
            Ok(Some(x))
        } else {
            Err(self.wrong(key, "a positive number", value))
        }
    }
}

/// Any GGUF integer value as `usize` (writers differ in the integer width they pick).
pub fn gguf_integer(value: &Value) -> Option<usize> {
    let n: i128 = match value {
        Value::U8(v) => *v as i128,
        Value::I8(v) => *v as i128,
        Value::U16(v) => *v as i128,
        Value::I16(v) => *v as i128,
        Value::U32(v) => *v as i128,
        Value::I32(v) => *v as i128,
        Value::U64(v) => *v as i128,
        Value::I64(v) => *v as i128,
        _ => return None,
    };
    usize::try_from(n).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;
    use candle_core::quantized::gguf_file::{TensorInfo, VersionedMagic};
    use std::collections::HashMap;

    fn content(metadata: Vec<(&str, Value)>, tensors: &[&str]) -> Content {
        Content {
            magic: VersionedMagic::GgufV3,
            metadata: metadata
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            tensor_infos: tensors
                .iter()
                .map(|name| {
                    (
                        name.to_string(),
                        TensorInfo {
                            ggml_dtype: GgmlDType::F32,
                            shape: candle_core::Shape::from(vec![4]),
                            offset: 0,
                        },
                    )
                })
                .collect::<HashMap<_, _>>(),
            tensor_data_offset: 0,
        }
    }

    fn smollm2_metadata() -> Vec<(&'static str, Value)> {
        vec![
            ("general.architecture", Value::String("llama".into())),
            ("llama.block_count", Value::U32(30)),
            ("llama.context_length", Value::U32(8192)),
            ("llama.embedding_length", Value::U32(576)),
            ("llama.feed_forward_length", Value::U32(1536)),
            ("llama.attention.head_count", Value::U32(9)),
            ("llama.attention.head_count_kv", Value::U32(3)),
            ("llama.rope.freq_base", Value::F32(100_000.0)),
            ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
            ("llama.vocab_size", Value::U32(49152)),
            ("llama.rope.dimension_count", Value::U32(64)),
        ]
    }

    #[test]
    fn smollm2_header_gives_the_hugging_face_parameter_count() {
        let c = content(
            smollm2_metadata(),
            &["token_embd.weight", "blk.0.attn_q.weight"],
        );
        let spec = spec_from_content(&c, "m.gguf", "m").unwrap();
        // The same count transformers reports for SmolLM2-135M (tied head, no biases).
        assert_eq!(spec.param_count(), 134_515_008);
        assert_eq!(
            (spec.head_dim, spec.num_key_value_heads, spec.rope_theta),
            (64, 3, 100_000.0)
        );
        assert!(spec.tie_word_embeddings && !spec.attention_bias);
        let untied = content(smollm2_metadata(), &["output.weight"]);
        assert!(
            !spec_from_content(&untied, "m.gguf", "m")
                .unwrap()
                .tie_word_embeddings
        );
    }

    #[test]
    fn missing_and_wrong_keys_are_named() {
        let mut meta = smollm2_metadata();
        meta.retain(|(k, _)| *k != "llama.block_count");
        let err = spec_from_content(&content(meta, &[]), "m.gguf", "m").unwrap_err();
        assert_eq!(
            err.to_string(),
            "m.gguf: field `llama.block_count` is missing (expected a positive integer)"
        );
        let mut meta = smollm2_metadata();
        meta[0].1 = Value::String("gemma".into());
        let err = spec_from_content(&content(meta, &[]), "m.gguf", "m").unwrap_err();
        assert!(err.to_string().contains("\"gemma\""), "{err}");
    }
}
