//! The built-in catalog: popular models' Hugging Face `config.json` files, shipped under
//! `profiles/models/` and embedded in the binary so that `--model Qwen/Qwen2.5-0.5B` works offline
//! and anywhere. The files are the configs as published; the parser reads them like any other.

use super::{ModelSpec, SpecError, hf};
use serde::Serialize;
use std::sync::OnceLock;

/// One built-in model: its Hugging Face name, its shipped file, and that file's text.
struct Entry {
    name: &'static str,
    file: &'static str,
    config_json: &'static str,
}

macro_rules! entry {
    ($name:literal, $file:literal) => {
        Entry {
            name: $name,
            file: concat!("profiles/models/", $file),
            config_json: include_str!(concat!("../../profiles/models/", $file)),
        }
    };
}

const ENTRIES: &[Entry] = &[
    entry!("HuggingFaceTB/SmolLM2-135M", "smollm2-135m.json"),
    entry!("HuggingFaceTB/SmolLM2-360M", "smollm2-360m.json"),
    entry!("HuggingFaceTB/SmolLM2-1.7B", "smollm2-1.7b.json"),
    entry!("Qwen/Qwen2.5-0.5B", "qwen2.5-0.5b.json"),
    entry!("Qwen/Qwen2.5-1.5B", "qwen2.5-1.5b.json"),
    entry!("Qwen/Qwen2.5-3B", "qwen2.5-3b.json"),
    entry!("Qwen/Qwen2.5-7B", "qwen2.5-7b.json"),
    entry!(
        "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
        "tinyllama-1.1b-chat-v1.0.json"
    ),
    entry!("meta-llama/Llama-2-7b-hf", "llama-2-7b-hf.json"),
    entry!("meta-llama/Llama-3.2-1B", "llama-3.2-1b.json"),
    entry!("meta-llama/Llama-3.2-3B", "llama-3.2-3b.json"),
    entry!("meta-llama/Llama-3.1-8B", "llama-3.1-8b.json"),
    entry!("mistralai/Mistral-7B-v0.1", "mistral-7b-v0.1.json"),
];

/// Every catalog model, parsed once: the shipped configs, then `tiny` (tests and examples).
pub fn models() -> &'static [ModelSpec] {
    static MODELS: OnceLock<Vec<ModelSpec>> = OnceLock::new();
    MODELS.get_or_init(|| {
        let mut models: Vec<ModelSpec> = ENTRIES
            .iter()
            .map(|entry| {
                hf::parse_config(entry.config_json, entry.file, entry.name)
                    // The shipped files are fixed at build time and every one is parsed by the
                    // tests below, so a failure here is a broken build, not a user error.
                    .unwrap_or_else(|error| panic!("built-in model config is broken: {error}"))
            })
            .collect();
        models.push(ModelSpec::tiny());
        models
    })
}

/// The catalog's names, in catalog order.
pub fn names() -> Vec<&'static str> {
    models().iter().map(|spec| spec.name.as_str()).collect()
}

/// The name without its organization, lowercased: the short form users may type.
fn short_name(name: &str) -> String {
    name.rsplit('/').next().unwrap_or(name).to_lowercase()
}

/// The catalog model named `name` (case-insensitive; `org/name` or the short `name`).
pub fn find(name: &str) -> Option<ModelSpec> {
    let wanted = name.trim().to_lowercase();
    models()
        .iter()
        .find(|spec| spec.name.to_lowercase() == wanted || short_name(&spec.name) == wanted)
        .cloned()
}

/// Like [`find`], but an unknown name is an error that suggests the closest catalog names.
pub fn get(name: &str) -> Result<ModelSpec, SpecError> {
    find(name).ok_or_else(|| SpecError::UnknownModel {
        name: name.to_string(),
        suggestions: suggestions(name),
    })
}

/// Catalog names close to `name`, closest first: within a few edits of the full or short name
/// (a typo or a neighbouring size), or containing what was typed (`smollm2` → the SmolLM2 family).
pub fn suggestions(name: &str) -> Vec<String> {
    const MAX_SUGGESTIONS: usize = 5;
    let wanted = name.trim().to_lowercase();
    if wanted.is_empty() {
        return Vec::new();
    }
    let allowed = (wanted.chars().count() / 3).max(2);
    let mut ranked: Vec<(usize, &str)> = models()
        .iter()
        .filter_map(|spec| {
            let full = spec.name.to_lowercase();
            let short = short_name(&spec.name);
            let distance = edit_distance(&wanted, &full).min(edit_distance(&wanted, &short));
            if distance <= allowed {
                Some((distance, spec.name.as_str()))
            } else if full.contains(&wanted) {
                // After every close match, whatever its distance.
                Some((usize::MAX, spec.name.as_str()))
            } else {
                None
            }
        })
        .collect();
    // Stable: equal distances keep catalog order.
    ranked.sort_by_key(|&(distance, _)| distance);
    ranked
        .into_iter()
        .take(MAX_SUGGESTIONS)
        .map(|(_, name)| name.to_string())
        .collect()
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current = vec![0; b.len() + 1];
    for (i, a_char) in a.chars().enumerate() {
        current[0] = i + 1;
        for (j, &b_char) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(a_char != b_char);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

/// One line of `memtune models`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelRow {
    pub name: String,
    pub params: u64,
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
}

impl ModelRow {
    pub fn from_spec(spec: &ModelSpec) -> Self {
        Self {
            name: spec.name.clone(),
            params: spec.param_count(),
            layers: spec.num_hidden_layers,
            hidden: spec.hidden_size,
            heads: spec.num_attention_heads,
            kv_heads: spec.num_key_value_heads,
            vocab: spec.vocab_size,
        }
    }
}

/// The catalog as table rows, in catalog order.
pub fn catalog_rows() -> Vec<ModelRow> {
    models().iter().map(ModelRow::from_spec).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Architecture;

    /// Published parameter counts (model cards; safetensors `total_size` / 2 for bf16 checkpoints),
    /// which equal transformers' `model.num_parameters()`.
    const PUBLISHED: &[(&str, u64)] = &[
        ("HuggingFaceTB/SmolLM2-135M", 134_515_008),
        ("HuggingFaceTB/SmolLM2-360M", 361_821_120),
        ("HuggingFaceTB/SmolLM2-1.7B", 1_711_376_384),
        ("Qwen/Qwen2.5-0.5B", 494_032_768),
        ("Qwen/Qwen2.5-1.5B", 1_543_714_304),
        ("Qwen/Qwen2.5-3B", 3_085_938_688),
        ("Qwen/Qwen2.5-7B", 7_615_616_512),
        ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", 1_100_048_384),
        ("meta-llama/Llama-2-7b-hf", 6_738_415_616),
        ("meta-llama/Llama-3.2-1B", 1_235_814_400),
        ("meta-llama/Llama-3.2-3B", 3_212_749_824),
        ("meta-llama/Llama-3.1-8B", 8_030_261_248),
        ("mistralai/Mistral-7B-v0.1", 7_241_732_096),
    ];

    #[test]
    fn every_shipped_model_has_its_published_parameter_count() {
        for &(name, params) in PUBLISHED {
            let spec = get(name).expect("in the catalog");
            assert_eq!(spec.param_count(), params, "{name}");
        }
        // Every shipped file is covered above, plus `tiny`.
        assert_eq!(ENTRIES.len(), PUBLISHED.len());
        assert_eq!(models().len(), PUBLISHED.len() + 1);
    }

    #[test]
    fn shapes_read_from_the_shipped_files() {
        let qwen = get("Qwen/Qwen2.5-0.5B").expect("in the catalog");
        assert_eq!(qwen.architecture, Architecture::Qwen2);
        assert!(qwen.attention_bias && qwen.tie_word_embeddings);
        assert_eq!(
            (qwen.head_dim, qwen.rope_theta, qwen.rms_norm_eps),
            (64, 1e6, 1e-6)
        );
        // Llama-2's config has no rope_theta: the default applies.
        let llama2 = get("llama-2-7b-hf").expect("in the catalog");
        assert_eq!(llama2.rope_theta, 10_000.0);
        // Llama-3.2-3B states head_dim (128 = 3072 / 24).
        let llama32 = get("llama-3.2-3b").expect("in the catalog");
        assert_eq!((llama32.head_dim, llama32.num_key_value_heads), (128, 8));
        let mistral = get("mistral-7b-v0.1").expect("in the catalog");
        assert_eq!(mistral.architecture, Architecture::Mistral);
        assert!(!mistral.attention_bias);
    }

    #[test]
    fn lookup_is_case_insensitive_by_full_or_short_name() {
        for name in [
            "Qwen/Qwen2.5-0.5B",
            "qwen/qwen2.5-0.5b",
            "qwen2.5-0.5b",
            "QWEN2.5-0.5B",
        ] {
            assert_eq!(
                find(name).map(|spec| spec.name),
                Some("Qwen/Qwen2.5-0.5B".to_string())
            );
        }
        assert_eq!(get("tiny").expect("tiny"), ModelSpec::tiny());
        assert!(find("Qwen2.5").is_none());
    }

    #[test]
    fn unknown_names_suggest_close_ones() {
        let suggested = suggestions("qwen2.5-0.6b");
        assert_eq!(
            suggested.first().map(String::as_str),
            Some("Qwen/Qwen2.5-0.5B")
        );
        assert!(
            suggested.contains(&"Qwen/Qwen2.5-1.5B".to_string()),
            "{suggested:?}"
        );
        assert_eq!(
            suggestions("smollm2"),
            [
                "HuggingFaceTB/SmolLM2-135M",
                "HuggingFaceTB/SmolLM2-360M",
                "HuggingFaceTB/SmolLM2-1.7B"
            ]
        );
        assert!(suggestions("gpt-j-6b-something-else").is_empty());
        let error = get("qwen2.5-0.6b").expect_err("unknown").to_string();
        assert!(error.starts_with("unknown model `qwen2.5-0.6b`"), "{error}");
        assert!(error.contains("did you mean Qwen/Qwen2.5-0.5B"), "{error}");
        assert!(error.contains("`memtune models`"), "{error}");
    }

    #[test]
    fn edit_distance_by_hand() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("qwen2.5-0.6b", "qwen2.5-0.5b"), 1);
    }

    #[test]
    fn rows_follow_the_catalog() {
        let rows = catalog_rows();
        assert_eq!(rows.len(), names().len());
        let qwen = rows
            .iter()
            .find(|row| row.name == "Qwen/Qwen2.5-7B")
            .expect("row");
        assert_eq!(
            *qwen,
            ModelRow {
                name: "Qwen/Qwen2.5-7B".to_string(),
                params: 7_615_616_512,
                layers: 28,
                hidden: 3584,
                heads: 28,
                kv_heads: 4,
                vocab: 152_064,
            }
        );
        let json = serde_json::to_string(&rows[rows.len() - 1]).expect("serializes");
        assert_eq!(
            json,
            r#"{"name":"tiny","params":107200,"layers":2,"hidden":64,"heads":4,"kv_heads":2,"vocab":259}"#
        );
    }
}
