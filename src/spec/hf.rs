//! Reads a Hugging Face `config.json` into a [`ModelSpec`]. Fields are read one by one from the JSON
//! value rather than through a derived struct, so that every error can name the file and the field.
//! Defaults follow `transformers` for each `model_type`, so a config reads here as it loads there.

use super::{Architecture, ModelSpec, SpecError};
use serde_json::{Map, Value};
use std::path::Path;

/// Reads and parses the `config.json` at `path`; the spec is named `name`.
pub fn read_config(path: &Path, name: &str) -> Result<ModelSpec, SpecError> {
    let text = std::fs::read_to_string(path).map_err(|source| SpecError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_config(&text, &path.display().to_string(), name)
}

/// Parses the text of a `config.json`. `file` is how errors name it; the spec is named `name`.
/// The result is validated ([`ModelSpec::validate`]).
pub fn parse_config(text: &str, file: &str, name: &str) -> Result<ModelSpec, SpecError> {
    let value: Value = serde_json::from_str(text).map_err(|error| invalid_json(file, &error))?;
    let Value::Object(map) = &value else {
        return Err(SpecError::NotAnObject {
            file: file.to_string(),
            found: render(&value),
        });
    };
    let fields = Fields { file, map };

    let architecture = architecture(&fields)?;
    fields.require_silu()?;
    if fields.optional_bool("mlp_bias")? == Some(true) {
        return Err(fields.wrong("mlp_bias", "false (the engine builds MLPs without bias)"));
    }

    let hidden_size = fields.required_positive("hidden_size")?;
    let num_attention_heads = fields.required_positive("num_attention_heads")?;
    let num_key_value_heads = fields
        .optional_positive("num_key_value_heads")?
        .unwrap_or(num_attention_heads);
    let head_dim = match fields.optional_positive("head_dim")? {
        Some(head_dim) => head_dim,
        None if hidden_size.is_multiple_of(num_attention_heads) => {
            hidden_size / num_attention_heads
        }
        None => {
            return Err(fields.wrong(
                "head_dim",
                &format!(
                    "a value, since `hidden_size` ({hidden_size}) is not a multiple of \
                     `num_attention_heads` ({num_attention_heads})"
                ),
            ));
        }
    };

    let spec = ModelSpec {
        name: name.to_string(),
        architecture,
        vocab_size: fields.required_positive("vocab_size")?,
        hidden_size,
        intermediate_size: fields.required_positive("intermediate_size")?,
        num_hidden_layers: fields.required_positive("num_hidden_layers")?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        max_position_embeddings: fields
            .optional_positive("max_position_embeddings")?
            .unwrap_or(default_max_position_embeddings(architecture)),
        rope_theta: rope_theta(&fields)?,
        // transformers' default for all three families.
        rms_norm_eps: fields
            .optional_positive_float("rms_norm_eps")?
            .unwrap_or(1e-6),
        tie_word_embeddings: fields
            .optional_bool("tie_word_embeddings")?
            .unwrap_or(false),
        attention_bias: attention_bias(&fields, architecture)?,
    };
    spec.validate().map_err(|reason| SpecError::Invalid {
        file: file.to_string(),
        reason,
    })?;
    Ok(spec)
}

fn architecture(fields: &Fields) -> Result<Architecture, SpecError> {
    let unsupported = |found: String| SpecError::UnsupportedArchitecture {
        file: fields.file.to_string(),
        found,
        supported: Architecture::SUPPORTED.join(", "),
    };
    match fields.get("model_type") {
        None => Err(unsupported("no `model_type` field".to_string())),
        Some(Value::String(model_type)) => match model_type.as_str() {
            "llama" => Ok(Architecture::Llama),
            "mistral" => Ok(Architecture::Mistral),
            "qwen2" => Ok(Architecture::Qwen2),
            _ => Err(unsupported(format!("`model_type` \"{model_type}\""))),
        },
        Some(_) => Err(fields.wrong("model_type", "a string")),
    }
}

/// transformers' defaults when a config omits the field.
fn default_max_position_embeddings(architecture: Architecture) -> usize {
    match architecture {
        Architecture::Llama => 2048,
        Architecture::Mistral => 4096 * 32,
        Architecture::Qwen2 => 32768,
    }
}

/// `rope_theta` sits at the top level in transformers 4 configs and under `rope_parameters` in
/// transformers 5 configs; 10000 when neither has it.
fn rope_theta(fields: &Fields) -> Result<f64, SpecError> {
    if let Some(theta) = fields.optional_positive_float("rope_theta")? {
        return Ok(theta);
    }
    if let Some(parameters) = fields.get("rope_parameters") {
        let Value::Object(map) = parameters else {
            return Err(fields.wrong("rope_parameters", "an object"));
        };
        if let Some(value) = map.get("rope_theta").filter(|value| !value.is_null()) {
            return positive_float(value).ok_or_else(|| SpecError::Field {
                file: fields.file.to_string(),
                field: "rope_parameters.rope_theta".to_string(),
                expected: "a positive number".to_string(),
                found: render(value),
            });
        }
    }
    Ok(10_000.0)
}

/// Which projections carry a bias, as transformers builds each family: Qwen2 always has q, k and v
/// biases; Mistral never has any (it ignores the key); Llama's `attention_bias` would also put a
/// bias on `o_proj`, which the spec cannot express, so only `false` is accepted.
fn attention_bias(fields: &Fields, architecture: Architecture) -> Result<bool, SpecError> {
    match architecture {
        Architecture::Qwen2 => Ok(true),
        Architecture::Mistral => Ok(false),
        Architecture::Llama => match fields.optional_bool("attention_bias")? {
            Some(true) => Err(fields.wrong(
                "attention_bias",
                "false (a Llama attention bias also sits on o_proj, which the engine does not build)",
            )),
            _ => Ok(false),
        },
    }
}

/// The config's top-level object, with the file name for errors. A `null` field counts as absent,
/// as transformers treats it.
struct Fields<'a> {
    file: &'a str,
    map: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn get(&self, field: &str) -> Option<&Value> {
        self.map.get(field).filter(|value| !value.is_null())
    }

    /// The error for a field that is present but not what the engine needs.
    fn wrong(&self, field: &str, expected: &str) -> SpecError {
        SpecError::Field {
            file: self.file.to_string(),
            field: field.to_string(),
            expected: expected.to_string(),
            found: self.get(field).map_or_else(|| "null".to_string(), render),
        }
    }

    fn required_positive(&self, field: &str) -> Result<usize, SpecError> {
        self.optional_positive(field)?
            .ok_or_else(|| SpecError::MissingField {
                file: self.file.to_string(),
                field: field.to_string(),
                expected: "a positive integer".to_string(),
            })
    }

    fn optional_positive(&self, field: &str) -> Result<Option<usize>, SpecError> {
        let Some(value) = self.get(field) else {
            return Ok(None);
        };
        value
            .as_u64()
            .filter(|&n| n > 0)
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| self.wrong(field, "a positive integer"))
    }

    fn optional_positive_float(&self, field: &str) -> Result<Option<f64>, SpecError> {
        let Some(value) = self.get(field) else {
            return Ok(None);
        };
        positive_float(value)
            .map(Some)
            .ok_or_else(|| self.wrong(field, "a positive number"))
    }

    fn optional_bool(&self, field: &str) -> Result<Option<bool>, SpecError> {
        let Some(value) = self.get(field) else {
            return Ok(None);
        };
        value
            .as_bool()
            .map(Some)
            .ok_or_else(|| self.wrong(field, "true or false"))
    }

    /// The engine's MLP is SwiGLU; transformers defaults `hidden_act` to silu.
    fn require_silu(&self) -> Result<(), SpecError> {
        match self.get("hidden_act") {
            None => Ok(()),
            Some(Value::String(act)) if act == "silu" => Ok(()),
            Some(_) => Err(self.wrong(
                "hidden_act",
                "\"silu\" (the engine builds SwiGLU MLPs only)",
            )),
        }
    }
}

fn positive_float(value: &Value) -> Option<f64> {
    value.as_f64().filter(|x| x.is_finite() && *x > 0.0)
}

/// A JSON value as it appears in the file, shortened so one bad field cannot flood the message.
fn render(value: &Value) -> String {
    const LIMIT: usize = 60;
    let text = value.to_string();
    match text.char_indices().nth(LIMIT) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

fn invalid_json(file: &str, error: &serde_json::Error) -> SpecError {
    // serde_json appends " at line L column C" to its message; the error states them itself.
    let text = error.to_string();
    let suffix = format!(" at line {} column {}", error.line(), error.column());
    SpecError::InvalidJson {
        file: file.to_string(),
        line: error.line(),
        column: error.column(),
        message: text.strip_suffix(&suffix).unwrap_or(&text).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A complete Llama config; tests edit one field at a time.
    fn llama() -> Value {
        serde_json::json!({
            "model_type": "llama",
            "hidden_act": "silu",
            "vocab_size": 1000,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "rms_norm_eps": 1e-5,
        })
    }

    fn parse(value: &Value) -> Result<ModelSpec, SpecError> {
        parse_config(&value.to_string(), "config.json", "test")
    }

    fn with(field: &str, value: Value) -> Value {
        let mut config = llama();
        config[field] = value;
        config
    }

    fn error_text(value: &Value) -> String {
        match parse(value) {
            Ok(spec) => panic!("expected an error, parsed {spec:?}"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn defaults_follow_transformers() {
        let mut config = llama();
        let map = config.as_object_mut().expect("object");
        for field in [
            "num_key_value_heads",
            "max_position_embeddings",
            "rms_norm_eps",
            "hidden_act",
        ] {
            map.remove(field);
        }
        let spec = parse(&config).expect("parses");
        assert_eq!(spec.num_key_value_heads, 4);
        assert_eq!(spec.head_dim, 16);
        assert_eq!(spec.max_position_embeddings, 2048);
        assert_eq!(spec.rope_theta, 10_000.0);
        assert_eq!(spec.rms_norm_eps, 1e-6);
        assert!(!spec.tie_word_embeddings);
        assert!(!spec.attention_bias);
    }

    #[test]
    fn explicit_head_dim_and_null_fields() {
        let mut config = with("head_dim", serde_json::json!(32));
        config["num_key_value_heads"] = Value::Null;
        config["rope_scaling"] = Value::Null;
        let spec = parse(&config).expect("parses");
        assert_eq!(spec.head_dim, 32);
        assert_eq!(spec.num_key_value_heads, 4);
        assert_eq!(spec.q_dim(), 128);
    }

    #[test]
    fn rope_theta_under_rope_parameters() {
        let config = with(
            "rope_parameters",
            serde_json::json!({"rope_theta": 130000, "rope_type": "default"}),
        );
        assert_eq!(parse(&config).expect("parses").rope_theta, 130_000.0);
        let config = with("rope_parameters", serde_json::json!({"rope_theta": "big"}));
        assert_eq!(
            error_text(&config),
            "config.json: field `rope_parameters.rope_theta`: expected a positive number, found \"big\""
        );
    }

    #[test]
    fn qwen2_has_qkv_bias_and_mistral_none() {
        let spec = parse(&with("model_type", "qwen2".into())).expect("parses");
        assert_eq!(spec.architecture, Architecture::Qwen2);
        assert!(spec.attention_bias);
        assert_eq!(spec.max_position_embeddings, 256);
        let mut config = with("model_type", "mistral".into());
        config["attention_bias"] = true.into();
        let spec = parse(&config).expect("parses");
        assert_eq!(spec.architecture, Architecture::Mistral);
        assert!(!spec.attention_bias);
    }

    #[test]
    fn wrong_field_names_file_field_and_value() {
        assert_eq!(
            error_text(&with("hidden_size", "abc".into())),
            "config.json: field `hidden_size`: expected a positive integer, found \"abc\""
        );
        assert_eq!(
            error_text(&with("num_hidden_layers", 0.into())),
            "config.json: field `num_hidden_layers`: expected a positive integer, found 0"
        );
        assert_eq!(
            error_text(&with("intermediate_size", serde_json::json!(-3))),
            "config.json: field `intermediate_size`: expected a positive integer, found -3"
        );
        assert_eq!(
            error_text(&with("tie_word_embeddings", "yes".into())),
            "config.json: field `tie_word_embeddings`: expected true or false, found \"yes\""
        );
        assert_eq!(
            error_text(&with("hidden_act", "gelu".into())),
            "config.json: field `hidden_act`: expected \"silu\" (the engine builds SwiGLU MLPs only), \
             found \"gelu\""
        );
    }

    #[test]
    fn missing_field_is_named() {
        let mut config = llama();
        config.as_object_mut().expect("object").remove("vocab_size");
        assert_eq!(
            error_text(&config),
            "config.json: field `vocab_size` is missing (expected a positive integer)"
        );
    }

    #[test]
    fn llama_attention_bias_is_refused() {
        let text = error_text(&with("attention_bias", true.into()));
        assert!(
            text.starts_with("config.json: field `attention_bias`: expected false"),
            "{text}"
        );
        assert!(parse(&with("attention_bias", false.into())).is_ok());
    }

    #[test]
    fn unsupported_model_type_lists_supported() {
        assert_eq!(
            error_text(&with("model_type", "gpt2".into())),
            "config.json: unsupported architecture: `model_type` \"gpt2\"; supported model types: \
             llama, mistral, qwen2"
        );
        let mut config = llama();
        config.as_object_mut().expect("object").remove("model_type");
        assert!(
            error_text(&config).contains("no `model_type` field; supported model types: llama")
        );
    }

    #[test]
    fn invalid_json_names_line_and_column() {
        let error = parse_config(
            "{\n  \"hidden_size\": 64,\n  oops\n}",
            "my/config.json",
            "x",
        )
        .expect_err("invalid JSON");
        assert_eq!(
            error.to_string(),
            "my/config.json: invalid JSON at line 3, column 3: key must be a string"
        );
        let error = parse_config("[1, 2]", "config.json", "x").expect_err("not an object");
        assert_eq!(
            error.to_string(),
            "config.json: expected a JSON object, found [1,2]"
        );
    }

    #[test]
    fn validation_error_names_file() {
        let config = with("num_key_value_heads", 3.into());
        assert_eq!(
            error_text(&config),
            "config.json: `num_attention_heads` (4) must be a multiple of `num_key_value_heads` (3)"
        );
    }

    #[test]
    fn long_values_are_shortened() {
        let text = error_text(&with("hidden_size", "x".repeat(500).into()));
        assert!(text.ends_with('…') && text.len() < 200, "{text}");
    }
}
