//! What a run leaves on disk in formats other tools read: LoRA adapters as a PEFT folder
//! (`adapter_config.json` + `adapter_model.safetensors`) and merged full weights as a Hugging Face
//! folder (`config.json` + `model.safetensors`, plus the tokenizer when the model has one). Every
//! folder is written under a temporary name and renamed into place, so a reader never sees half of
//! one. Our model keeps Hugging Face's rotate-half RoPE layout (GGUF weights are un-permuted on
//! load), so adapters and weights are written without any permutation.

use crate::config::{LoraSettings, Target};
use crate::data::HfTokenizer;
use crate::engine::Model;
use crate::engine::model::Weight;
use crate::engine::weights::{read_safetensors, write_safetensors};
use crate::spec::{Architecture, ModelSpec};
use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// PEFT's prefix for tensor names on disk (`PeftModel` → `LlamaForCausalLM` → `LlamaModel`).
const PEFT_PREFIX: &str = "base_model.model.";

/// Fills a folder and moves it to `dir` in one rename: `fill` writes into a fresh temporary sibling;
/// an existing `dir` is moved aside first and removed after, so `dir` is always whole.
pub fn write_dir_atomic(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = dir
        .file_name()
        .with_context(|| format!("`{}` names no folder", dir.display()))?
        .to_string_lossy()
        .into_owned();
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create `{}`", parent.display()))?;
    let pid = std::process::id();
    let tmp = parent.join(format!(".{name}.tmp-{pid}"));
    let old = parent.join(format!(".{name}.old-{pid}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("cannot remove `{}`", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create `{}`", tmp.display()))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let replaced = dir.exists();
    if replaced {
        std::fs::rename(dir, &old)
            .with_context(|| format!("cannot move `{}` aside", dir.display()))?;
    }
    std::fs::rename(&tmp, dir)
        .with_context(|| format!("cannot move `{}` into place", dir.display()))?;
    if replaced {
        std::fs::remove_dir_all(&old)
            .with_context(|| format!("cannot remove `{}`", old.display()))?;
    }
    Ok(())
}

fn pt_metadata() -> BTreeMap<String, String> {
    BTreeMap::from([("format".to_string(), "pt".to_string())])
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write `{}`", path.display()))
}

/// `adapter_config.json` as PEFT reads it.
pub fn adapter_config_json(lora: &LoraSettings, base_model: &str) -> serde_json::Value {
    let targets: Vec<&str> = lora.targets.iter().map(|t| t.name()).collect();
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "init_lora_weights": true,
        "base_model_name_or_path": base_model,
        "inference_mode": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "revision": null,
    })
}

/// The model's adapters under PEFT's names, as f32.
pub fn adapter_tensors(model: &Model) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for layer in &model.layers {
        for lin in layer.linears() {
            if let Some(lora) = &lin.lora {
                for (part, var) in [("lora_A", &lora.a), ("lora_B", &lora.b)] {
                    out.push((
                        format!("{PEFT_PREFIX}{}.{part}.weight", lin.name),
                        var.as_tensor().detach().to_dtype(DType::F32)?,
                    ));
                }
            }
        }
    }
    Ok(out)
}

/// Writes the model's LoRA adapters to `dir` as a PEFT folder.
pub fn write_peft_adapter(dir: &Path, model: &Model, base_model: &str) -> Result<()> {
    let tensors = adapter_tensors(model)?;
    if tensors.is_empty() {
        bail!("the model has no LoRA adapters to write");
    }
    let config = adapter_config_json(&model.knobs.lora, base_model);
    write_dir_atomic(dir, |tmp| {
        write_json(&tmp.join(ADAPTER_CONFIG), &config)?;
        write_safetensors(&tmp.join(ADAPTER_WEIGHTS), &tensors, &pt_metadata())?;
        Ok(())
    })
}

/// A PEFT LoRA adapter read from disk.
pub struct PeftAdapter {
    pub dir: PathBuf,
    pub lora: LoraSettings,
    /// Tensors by name without PEFT's prefix (`model.layers.0.self_attn.q_proj.lora_A.weight`).
    pub tensors: HashMap<String, Tensor>,
}

impl PeftAdapter {
    pub fn read(dir: &Path) -> Result<Self> {
        let config_path = dir.join(ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("cannot read `{}`", config_path.display()))?;
        let c: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("`{}`: invalid JSON", config_path.display()))?;
        let bad = |what: &str| anyhow::anyhow!("`{}`: {what}", config_path.display());
        if c["peft_type"] != "LORA" {
            return Err(bad("`peft_type` must be \"LORA\""));
        }
        let rank = c["r"]
            .as_u64()
            .filter(|&r| r > 0)
            .ok_or_else(|| bad("`r` must be a positive integer"))? as usize;
        let alpha = c["lora_alpha"].as_f64().unwrap_or(8.0);
        // rsLoRA scales by alpha / √r; our scale is alpha / r, so the equivalent alpha is alpha·√r.
        let alpha = if c["use_rslora"].as_bool() == Some(true) {
            alpha * (rank as f64).sqrt()
        } else {
            alpha
        };
        if !matches!(c["bias"].as_str(), None | Some("none")) {
            return Err(bad("only `bias: \"none\"` adapters are supported"));
        }
        if c["fan_in_fan_out"].as_bool() == Some(true) {
            return Err(bad(
                "`fan_in_fan_out: true` is not supported (Llama layers are not Conv1D)",
            ));
        }
        let targets = match &c["target_modules"] {
            serde_json::Value::String(s) if s == "all-linear" => Target::ALL.to_vec(),
            serde_json::Value::Array(list) => {
                let mut targets = Vec::new();
                for t in list {
                    let name = t
                        .as_str()
                        .ok_or_else(|| bad("`target_modules` must hold strings"))?;
                    let target: Target = name
                        .parse()
                        .map_err(|e: String| bad(&format!("`target_modules`: {e}")))?;
                    targets.push(target);
                }
                targets.sort();
                targets.dedup();
                targets
            }
            other => {
                return Err(bad(&format!(
                    "`target_modules` must be a list of module names or \"all-linear\", found {other}"
                )));
            }
        };
        let weights = dir.join(ADAPTER_WEIGHTS);
        let (list, _) = read_safetensors(&weights, &Device::Cpu)
            .with_context(|| format!("cannot read `{}`", weights.display()))?;
        let mut tensors = HashMap::new();
        for (name, t) in list {
            let short = name.strip_prefix(PEFT_PREFIX).with_context(|| {
                format!(
                    "`{}`: tensor `{name}` lacks PEFT's `{PEFT_PREFIX}` prefix",
                    weights.display()
                )
            })?;
            // PEFT may also write the adapter name (`lora_A.default.weight`) in older versions.
            let short = short.replace(".default.weight", ".weight");
            tensors.insert(short, t.to_dtype(DType::F32)?);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            lora: LoraSettings {
                rank,
                alpha,
                dropout: 0.0,
                targets,
            },
            tensors,
        })
    }

    /// Sets the adapters of `model` (built with [`PeftAdapter::lora`]) to this adapter's tensors.
    /// Every adapter of the model must be in the file, with its shape, and every tensor in the file
    /// must be used.
    pub fn apply(&self, model: &Model) -> Result<()> {
        let mut used = 0;
        for layer in &model.layers {
            for lin in layer.linears() {
                let Some(lora) = &lin.lora else { continue };
                for (part, var) in [("lora_A", &lora.a), ("lora_B", &lora.b)] {
                    let name = format!("{}.{part}.weight", lin.name);
                    let t = self.tensors.get(&name).with_context(|| {
                        format!("`{}`: no tensor `{PEFT_PREFIX}{name}`", self.dir.display())
                    })?;
                    if t.dims() != var.dims() {
                        bail!(
                            "`{}`: tensor `{PEFT_PREFIX}{name}` has shape {:?}, the model expects {:?}",
                            self.dir.display(),
                            t.dims(),
                            var.dims()
                        );
                    }
                    var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
                    used += 1;
                }
            }
        }
        if used != self.tensors.len() {
            let mut unused: Vec<&String> = self
                .tensors
                .keys()
                .filter(|name| {
                    !model.layers.iter().flat_map(|l| l.linears()).any(|lin| {
                        lin.lora.is_some() && name.starts_with(&format!("{}.", lin.name))
                    })
                })
                .collect();
            unused.sort();
            bail!(
                "`{}`: tensors the model has no adapter for: {}",
                self.dir.display(),
                unused
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(())
    }
}

/// Hugging Face's `config.json` for `spec`, with weights stored in `torch_dtype`.
pub fn hf_config_json(
    spec: &ModelSpec,
    tokenizer: Option<&HfTokenizer>,
    torch_dtype: &str,
) -> serde_json::Value {
    use crate::data::Tokenizer;
    let (architectures, model_type) = match spec.architecture {
        Architecture::Llama => ("LlamaForCausalLM", "llama"),
        Architecture::Mistral => ("MistralForCausalLM", "mistral"),
        Architecture::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
    };
    let mut config = serde_json::json!({
        "architectures": [architectures],
        "model_type": model_type,
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "max_position_embeddings": spec.max_position_embeddings,
        "rope_theta": spec.rope_theta,
        "rms_norm_eps": spec.rms_norm_eps,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": torch_dtype,
    });
    if spec.architecture == Architecture::Llama {
        config["attention_bias"] = false.into();
        config["mlp_bias"] = false.into();
    }
    if let Some(t) = tokenizer {
        config["bos_token_id"] = t.bos().into();
        config["eos_token_id"] = t.eos().into();
        config["pad_token_id"] = t.pad().into();
    }
    config
}

/// Every base weight of `model` with adapters folded in (`W + scale · B A`), as f32, by Hugging
/// Face name.
pub fn merged_tensors(model: &Model) -> Result<Vec<(String, Tensor)>> {
    let dense = |w: &Weight| -> Result<Tensor> {
        Ok(match w {
            Weight::Trainable(v) => v.as_tensor().detach().to_dtype(DType::F32)?,
            Weight::Frozen(f) => f.dense(DType::F32)?,
        })
    };
    let mut deltas: HashMap<String, Tensor> = HashMap::new();
    for layer in &model.layers {
        for lin in layer.linears() {
            if let Some(lora) = &lin.lora {
                let a = lora.a.as_tensor().detach().to_dtype(DType::F32)?;
                let b = lora.b.as_tensor().detach().to_dtype(DType::F32)?;
                deltas.insert(
                    format!("{}.weight", lin.name),
                    b.matmul(&a)?.affine(lora.scale, 0.0)?,
                );
            }
        }
    }
    model
        .base_weights()
        .into_iter()
        .map(|(name, w)| {
            let t = dense(w)?;
            let t = match deltas.get(&name) {
                Some(d) => (t + d)?,
                None => t,
            };
            Ok((name, t))
        })
        .collect()
}

/// Writes merged full weights to `dir` as a Hugging Face folder: `config.json`,
/// `model.safetensors` (f32), and the tokenizer files when there is a tokenizer.
pub fn write_merged(dir: &Path, model: &Model, tokenizer: Option<&HfTokenizer>) -> Result<()> {
    let tensors = merged_tensors(model)?;
    let config = hf_config_json(&model.spec, tokenizer, "float32");
    write_dir_atomic(dir, |tmp| {
        write_json(&tmp.join("config.json"), &config)?;
        write_safetensors(&tmp.join("model.safetensors"), &tensors, &pt_metadata())?;
        if let Some(t) = tokenizer {
            std::fs::write(tmp.join("tokenizer.json"), t.to_json()?)
                .context("cannot write tokenizer.json")?;
            write_json(&tmp.join("tokenizer_config.json"), &t.config_json())?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Knobs, Method};
    use crate::engine::RandomInit;

    fn lora_model() -> Model {
        let knobs = Knobs {
            method: Method::Lora,
            ..Knobs::default()
        };
        let model = Model::build(
            &ModelSpec::tiny(),
            &knobs,
            &Device::Cpu,
            &mut RandomInit::new(1),
            1,
        )
        .unwrap();
        // B starts at zero; give it values so the merge and the round trip mean something.
        for layer in &model.layers {
            for lin in layer.linears() {
                let lora = lin.lora.as_ref().unwrap();
                let b = Tensor::ones(lora.b.dims(), DType::F32, &Device::Cpu).unwrap();
                lora.b.set(&(b * 0.01).unwrap()).unwrap();
            }
        }
        model
    }

    #[test]
    fn adapter_folder_has_peft_names_and_reads_back() {
        let model = lora_model();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("adapter");
        write_peft_adapter(&out, &model, "tiny").unwrap();
        let header =
            crate::engine::weights::read_safetensors_header(&out.join(ADAPTER_WEIGHTS)).unwrap();
        assert_eq!(
            header.metadata.get("format").map(String::as_str),
            Some("pt")
        );
        // tiny: hidden 64, q 64, kv 32, rank 8 → A [8, 64], B [32, 8] for k_proj.
        assert_eq!(
            header.shape("base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"),
            Some(&[8usize, 64][..])
        );
        assert_eq!(
            header.shape("base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"),
            Some(&[32usize, 8][..])
        );
        // 2 layers × 7 targets × (A, B).
        assert_eq!(header.names().count(), 28);
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["adapter"], "no temporary folders left");

        let adapter = PeftAdapter::read(&out).unwrap();
        assert_eq!(adapter.lora, model.knobs.lora);
        let knobs = Knobs {
            method: Method::Lora,
            lora: adapter.lora.clone(),
            ..Knobs::default()
        };
        let other = Model::build(
            &ModelSpec::tiny(),
            &knobs,
            &Device::Cpu,
            &mut RandomInit::new(1),
            2,
        )
        .unwrap();
        adapter.apply(&other).unwrap();
        let ids = Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu).unwrap();
        let diff = (model.logits(&ids).unwrap() - other.logits(&ids).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
    }

    #[test]
    fn merged_weights_give_the_adapted_model_logits() {
        let model = lora_model();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("merged");
        write_merged(&out, &model, None).unwrap();
        let spec = crate::spec::resolve_model(&out.display().to_string()).unwrap();
        assert_eq!(
            ModelSpec {
                name: "tiny".into(),
                ..spec.clone()
            },
            ModelSpec::tiny()
        );
        let mut source = crate::engine::weights::SafetensorsWeights::open(&out).unwrap();
        let knobs = Knobs {
            method: Method::Full,
            ..Knobs::default()
        };
        let merged = Model::build(&spec, &knobs, &Device::Cpu, &mut source, 0).unwrap();
        let ids = Tensor::new(&[[5u32, 6, 7, 8, 9]], &Device::Cpu).unwrap();
        let diff = (model.logits(&ids).unwrap() - merged.logits(&ids).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // W x + s·B(A x) and (W + s·BA) x differ only by rounding.
        assert!(diff < 1e-4, "max logit difference {diff}");
    }
}
