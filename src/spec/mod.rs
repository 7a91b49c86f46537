//! Model specifications: the architecture as numbers. Read from a Hugging Face `config.json`, a model
//! folder, or the built-in catalog under `profiles/models/`. Memory does not depend on weight values,
//! so a spec is all the tuner needs; the trainer also loads weights when a folder provides them.

pub mod catalog;
pub mod gguf;
pub mod hf;

pub use catalog::{ModelRow, catalog_rows};

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Why a model could not be read. Each names the file (or the argument) and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{file}: invalid JSON at line {line}, column {column}: {message}")]
    InvalidJson {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{file}: expected a JSON object, found {found}")]
    NotAnObject { file: String, found: String },
    #[error("{file}: field `{field}`: expected {expected}, found {found}")]
    Field {
        file: String,
        field: String,
        expected: String,
        found: String,
    },
    #[error("{file}: field `{field}` is missing (expected {expected})")]
    MissingField {
        file: String,
        field: String,
        expected: String,
    },
    #[error("{file}: unsupported architecture: {found}; supported model types: {supported}")]
    UnsupportedArchitecture {
        file: String,
        found: String,
        supported: String,
    },
    /// The config parsed but breaks an invariant the engine relies on ([`ModelSpec::validate`]).
    #[error("{file}: {reason}")]
    Invalid { file: String, reason: String },
    #[error("{}", unknown_model_message(.name, .suggestions))]
    UnknownModel {
        name: String,
        /// Catalog names close to `name`, closest first.
        suggestions: Vec<String>,
    },
    #[error("{}: no such file or folder", .path.display())]
    NotFound { path: PathBuf },
    #[error("{}: the folder holds no config.json", .path.display())]
    NoConfigInFolder { path: PathBuf },
    #[error("{}: cannot read: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a readable GGUF file: {message}", .path.display())]
    Gguf { path: PathBuf, message: String },
}

fn unknown_model_message(name: &str, suggestions: &[String]) -> String {
    let hint = if suggestions.is_empty() {
        String::new()
    } else {
        format!("; did you mean {}?", suggestions.join(", "))
    };
    format!(
        "unknown model `{name}`: not a built-in model nor a file or folder{hint} \
         (`memtune models` lists the built-in models; a folder holding config.json or a path to a \
         config.json also works)"
    )
}

/// Reads the model a user names: a folder holding `config.json` (or, without one, a single
/// `.gguf` file), a path to a config file or a `.gguf` file, or a built-in catalog name
/// (`Qwen/Qwen2.5-0.5B` or `qwen2.5-0.5b`). A path on disk wins over a catalog name, as in
/// transformers' `from_pretrained`. The spec is validated.
pub fn resolve_model(arg: &str) -> Result<ModelSpec, SpecError> {
    let path = Path::new(arg);
    if path.is_dir() {
        let config = path.join("config.json");
        if !config.is_file()
            && let Some(file) = single_gguf_in(path)
        {
            return gguf::read_spec(&file, display_name(arg));
        }
        if !config.is_file() {
            return Err(SpecError::NoConfigInFolder {
                path: path.to_path_buf(),
            });
        }
        return hf::read_config(&config, display_name(arg));
    }
    if path.is_file() && is_gguf(path) {
        return gguf::read_spec(path, display_name(arg));
    }
    if path.is_file() {
        return hf::read_config(path, display_name(arg));
    }
    if let Some(spec) = catalog::find(arg) {
        return Ok(spec);
    }
    if looks_like_path(arg) {
        return Err(SpecError::NotFound {
            path: path.to_path_buf(),
        });
    }
    Err(SpecError::UnknownModel {
        name: arg.to_string(),
        suggestions: catalog::suggestions(arg),
    })
}

/// Whether `path` names a GGUF file (by its extension).
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// The one `.gguf` file in `folder`, if it holds exactly one.
pub fn single_gguf_in(folder: &Path) -> Option<PathBuf> {
    let mut found = std::fs::read_dir(folder)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_gguf(p));
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

/// The argument as the user wrote it, less trailing separators.
fn display_name(arg: &str) -> &str {
    let trimmed = arg.trim_end_matches(['/', '\\']);
    if trimmed.is_empty() { arg } else { trimmed }
}

/// Whether an argument that names nothing on disk was meant as a path rather than a catalog name
/// (catalog names are `org/name` or a bare name).
fn looks_like_path(arg: &str) -> bool {
    arg.starts_with(['.', '/', '~', '\\'])
        || arg.contains('\\')
        || arg.ends_with(".json")
        || arg.ends_with(".gguf")
        || arg.matches('/').count() > 1
}

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
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(format!(
                "`num_attention_heads` ({}) must be a multiple of `num_key_value_heads` ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
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

    /// SmolLM2-135M's shipped config, written where `resolve_model` must find it.
    fn write_config(dir: &Path) -> PathBuf {
        let path = dir.join("config.json");
        std::fs::write(
            &path,
            include_str!("../../profiles/models/smollm2-135m.json"),
        )
        .expect("temp file");
        path
    }

    #[test]
    fn resolves_a_folder_and_a_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = write_config(dir.path());
        let folder = dir.path().display().to_string();

        let from_folder = resolve_model(&format!("{folder}/")).expect("folder resolves");
        assert_eq!(from_folder.name, folder);
        assert_eq!(from_folder.param_count(), 134_515_008);

        let file = config.display().to_string();
        let from_file = resolve_model(&file).expect("file resolves");
        assert_eq!(from_file.name, file);
        assert_eq!(
            ModelSpec {
                name: folder,
                ..from_file
            },
            from_folder
        );
    }

    #[test]
    fn resolves_catalog_names() {
        assert_eq!(
            resolve_model("qwen2.5-0.5b").expect("catalog").name,
            "Qwen/Qwen2.5-0.5B"
        );
        assert_eq!(resolve_model("tiny").expect("catalog"), ModelSpec::tiny());
    }

    #[test]
    fn folder_without_config_and_missing_paths_say_so() {
        let dir = tempfile::tempdir().expect("temp dir");
        let error = resolve_model(&dir.path().display().to_string()).expect_err("no config");
        assert_eq!(
            error.to_string(),
            format!("{}: the folder holds no config.json", dir.path().display())
        );

        let missing = dir.path().join("nowhere");
        let error = resolve_model(&missing.display().to_string()).expect_err("missing");
        assert_eq!(
            error.to_string(),
            format!("{}: no such file or folder", missing.display())
        );
        assert!(matches!(
            resolve_model("./model/config.json"),
            Err(SpecError::NotFound { .. })
        ));
    }

    #[test]
    fn unknown_name_suggests_catalog_names() {
        let Err(SpecError::UnknownModel { name, suggestions }) = resolve_model("Qwen/Qwen2.5-0.6B")
        else {
            panic!("expected an unknown-model error");
        };
        assert_eq!(name, "Qwen/Qwen2.5-0.6B");
        assert_eq!(
            suggestions.first().map(String::as_str),
            Some("Qwen/Qwen2.5-0.5B")
        );
    }

    #[test]
    fn bad_config_file_errors_name_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"model_type": "llama", "hidden_size": "abc"}"#)
            .expect("temp file");
        let error = resolve_model(&dir.path().display().to_string()).expect_err("bad field");
        assert_eq!(
            error.to_string(),
            format!(
                "{}: field `hidden_size`: expected a positive integer, found \"abc\"",
                path.display()
            )
        );
        std::fs::write(&path, r#"{"model_type": "gemma"}"#).expect("temp file");
        let error = resolve_model(&path.display().to_string()).expect_err("unsupported");
        assert!(
            error
                .to_string()
                .ends_with("supported model types: llama, mistral, qwen2"),
            "{error}"
        );
    }
}
