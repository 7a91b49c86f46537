//! Text generation with a model and, optionally, a PEFT adapter: greedy decoding by default,
//! temperature sampling with a seed otherwise. The model has no key/value cache, so each new token
//! re-runs the whole sequence; that is quadratic in length, and fine for the short replies used to
//! check what a fine-tune learned.

use super::export::PeftAdapter;
use crate::config::{Knobs, LoraSettings, Method, Precision};
use crate::data::{HfTokenizer, Message, Tokenizer, tokenizer::ByteTokenizer};
use crate::engine::Model;
use crate::engine::weights::WeightFiles;
use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;

/// A model ready to generate, with its tokenizer.
pub struct Generator {
    pub model: Model,
    pub tokenizer: Box<dyn Tokenizer>,
}

/// How to turn a prompt into tokens.
#[derive(Debug, Clone, Default)]
pub struct PromptFormat {
    /// Wrap the prompt as one user turn of the model's chat template, with the generation prompt.
    pub chat: bool,
    /// A system turn (instead of the template's default system prompt).
    pub system: Option<String>,
}

/// Sampling settings.
#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    pub max_tokens: usize,
    /// 0 is greedy decoding.
    pub temperature: f64,
    pub seed: u64,
}

impl Generator {
    /// Loads `--model` (a GGUF file or a folder with weights) and applies the adapter in
    /// `adapter`, if any, on `device` in fp32.
    pub fn load(model_arg: &str, adapter: Option<&Path>, device: &Device) -> Result<Self> {
        let spec = crate::spec::resolve_model(model_arg)?;
        let weights = WeightFiles::locate(model_arg).with_context(|| {
            format!(
                "`{model_arg}` holds no weights to generate with; pass a .gguf file or a folder with \
                 model.safetensors (such as the `merged` folder `memtune train --output` writes)"
            )
        })?;
        let adapter = adapter.map(PeftAdapter::read).transpose()?;
        let knobs = Knobs {
            method: Method::Lora,
            lora: match &adapter {
                Some(a) => a.lora.clone(),
                // No targets: no adapters, every weight frozen.
                None => LoraSettings {
                    targets: Vec::new(),
                    ..LoraSettings::default()
                },
            },
            precision: Precision::Fp32,
            ..Knobs::default()
        };
        let model = Model::build(&spec, &knobs, device, &mut *weights.open(&spec)?, 0)
            .with_context(|| format!("loading `{model_arg}`"))?;
        if let Some(a) = &adapter {
            a.apply(&model)?;
        }
        let tokenizer: Box<dyn Tokenizer> = match HfTokenizer::for_model(model_arg)? {
            Some(t) => Box::new(t),
            None => Box::new(ByteTokenizer),
        };
        crate::data::tokenizer::check_fits(tokenizer.as_ref(), spec.vocab_size, &spec.name)?;
        Ok(Self { model, tokenizer })
    }

    /// The prompt's tokens.
    pub fn prompt_ids(&self, prompt: &str, format: &PromptFormat) -> Vec<u32> {
        let t = self.tokenizer.as_ref();
        let mut ids = Vec::new();
        if t.add_bos() {
            ids.push(t.bos());
        }
        if format.chat {
            let mut turns = Vec::new();
            if let Some(system) = &format.system {
                turns.push(Message::new("system", system));
            }
            turns.push(Message::new("user", prompt));
            for (text, _) in t.chat_template().unwrap_or_default().render(&turns, true) {
                ids.extend(t.encode(&text));
            }
        } else {
            ids.extend(t.encode(prompt));
        }
        ids
    }

    /// Next-token logits after `ids`, as f32.
    pub fn next_logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let input = Tensor::new(ids, &self.model.device)?.unsqueeze(0)?;
        let logits = self.model.logits(&input)?;
        Ok(logits
            .get(0)?
            .get(ids.len() - 1)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?)
    }

    /// Generates after `prompt` until a stop token or `max_tokens`; returns the new tokens, the stop
    /// token excluded.
    pub fn generate(&self, prompt: &[u32], sampling: Sampling) -> Result<Vec<u32>> {
        if prompt.is_empty() {
            bail!("the prompt is empty");
        }
        let limit = self.model.spec.max_position_embeddings;
        let stops = self.tokenizer.stop_tokens();
        let mut rng = StdRng::seed_from_u64(sampling.seed);
        let mut ids = prompt.to_vec();
        let mut out = Vec::new();
        while out.len() < sampling.max_tokens && ids.len() < limit {
            let logits = self.next_logits(&ids)?;
            let next = pick(&logits, sampling.temperature, &mut rng);
            if stops.contains(&next) {
                break;
            }
            ids.push(next);
            out.push(next);
        }
        Ok(out)
    }
}

/// The arg-max (ties to the lowest id, as `torch.argmax`), or a sample from softmax(logits / T).
fn pick(logits: &[f32], temperature: f64, rng: &mut StdRng) -> u32 {
    let argmax = logits
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &x)| {
            if x > best.1 { (i, x) } else { best }
        })
        .0;
    if temperature <= 0.0 {
        return argmax as u32;
    }
    let top = logits[argmax] as f64;
    let weights: Vec<f64> = logits
        .iter()
        .map(|&x| ((x as f64 - top) / temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut target = rng.random::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        target -= w;
        if target <= 0.0 {
            return i as u32;
        }
    }
    argmax as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_the_first_maximum_and_sampling_is_seeded() {
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(pick(&[0.0, 3.0, 3.0, -1.0], 0.0, &mut rng), 1);
        let logits = [0.0, 1.0, 2.0, 0.5];
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..20)
                .map(|_| pick(&logits, 1.0, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        // At a tiny temperature sampling is greedy.
        let mut rng = StdRng::seed_from_u64(3);
        assert!((0..50).all(|_| pick(&logits, 1e-3, &mut rng) == 2));
    }
}
