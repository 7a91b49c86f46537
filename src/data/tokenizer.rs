//! Tokenizers and chat formatting. The byte-level tokenizer serves models that bring no vocabulary
//! of their own (random initialisation, catalog configs): ids 0–255 are bytes, then BOS, EOS and
//! PAD. [`HfTokenizer`] wraps a real `tokenizers::Tokenizer`, read from a GGUF file's embedded
//! vocabulary, merges and special tokens, or from a folder's `tokenizer.json`.

use crate::spec::gguf::gguf_integer;
use anyhow::{Context, Result, bail};
use candle_core::quantized::gguf_file::{Content, Value};
use std::path::Path;

pub trait Tokenizer: Send + Sync {
    /// Token ids of `text`, with special-token strings (such as `<|im_start|>`) as single tokens
    /// when the vocabulary has them. Adds no BOS.
    fn encode(&self, text: &str) -> Vec<u32>;
    fn decode(&self, ids: &[u32]) -> String;
    fn bos(&self) -> u32;
    fn eos(&self) -> u32;
    fn pad(&self) -> u32;
    /// Smallest model vocabulary that can hold every id this tokenizer produces.
    fn vocab_size(&self) -> usize;
    /// Whether a sequence starts with BOS (false for ChatML models, whose template adds none).
    fn add_bos(&self) -> bool {
        true
    }
    /// The model's chat template, when it has one.
    fn chat_template(&self) -> Option<ChatTemplate> {
        None
    }
    /// Tokens that end a generated reply.
    fn stop_tokens(&self) -> Vec<u32> {
        vec![self.eos()]
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ByteTokenizer;

impl Tokenizer for ByteTokenizer {
    fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .filter(|&&id| id < 256)
            .map(|&id| id as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn bos(&self) -> u32 {
        256
    }

    fn eos(&self) -> u32 {
        257
    }

    fn pad(&self) -> u32 {
        258
    }

    fn vocab_size(&self) -> usize {
        259
    }
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// The ChatML chat format (`<|im_start|>role\ncontent<|im_end|>\n`), as SmolLM2 and Qwen use, with
/// the system prompt the model's template inserts when a conversation does not open with one.
/// Templates are Jinja programs; rather than run them, ChatML is recognised and its default system
/// prompt read from the template's text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChatTemplate {
    pub default_system: Option<String>,
}

const IM_START: &str = "<|im_start|>";
const IM_END: &str = "<|im_end|>";

impl ChatTemplate {
    /// The ChatML template of a Jinja `chat_template`, or `None` when it is not ChatML. The default
    /// system prompt is the first literal `<|im_start|>system\n…<|im_end|>` in the template whose
    /// text holds no template syntax (quotes, braces, `+`).
    pub fn from_jinja(template: &str) -> Option<Self> {
        if !template.contains(IM_START) || !template.contains(IM_END) {
            return None;
        }
        // Templates write newlines inside Jinja strings either as they are or as `\n` escapes.
        let template = template.replace("\\n", "\n");
        let marker = format!("{IM_START}system\n");
        let default_system = template.match_indices(&marker).find_map(|(at, _)| {
            let rest = &template[at + marker.len()..];
            let text = &rest[..rest.find(IM_END)?];
            let literal = !text.contains(['\'', '"', '{', '}', '+']) && !text.is_empty();
            literal.then(|| text.to_string())
        });
        Some(Self { default_system })
    }

    /// `messages` as text segments, each marked trained (assistant replies and their end marker)
    /// or not; with `add_generation_prompt`, ends with the opening of an assistant turn.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Vec<(String, bool)> {
        let mut out = Vec::new();
        if let Some(system) = &self.default_system
            && messages.first().is_none_or(|m| m.role != "system")
        {
            out.push((format!("{IM_START}system\n{system}{IM_END}\n"), false));
        }
        for m in messages {
            out.push((format!("{IM_START}{}\n", m.role), false));
            let trained = m.role == "assistant";
            out.push((format!("{}{IM_END}", m.content), trained));
            out.push(("\n".to_string(), false));
        }
        if add_generation_prompt {
            out.push((format!("{IM_START}assistant\n"), false));
        }
        out
    }
}

/// A Hugging Face tokenizer with the model's special tokens and chat template.
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    add_bos: bool,
    chat: Option<ChatTemplate>,
    stops: Vec<u32>,
}

impl HfTokenizer {
    /// The tokenizer `--model` brings: a GGUF file's embedded one, or a folder's `tokenizer.json`
    /// (a folder without `config.json` may hold a single `.gguf` instead). `None` when it has none.
    pub fn for_model(arg: &str) -> Result<Option<Self>> {
        let path = Path::new(arg);
        if path.is_file() && crate::spec::is_gguf(path) {
            return Self::from_gguf_file(path).map(Some);
        }
        if path.is_dir() {
            if path.join("tokenizer.json").is_file() {
                return Self::from_folder(path).map(Some);
            }
            if !path.join("config.json").is_file()
                && let Some(file) = crate::spec::single_gguf_in(path)
            {
                return Self::from_gguf_file(&file).map(Some);
            }
        }
        Ok(None)
    }

    pub fn from_gguf_file(path: &Path) -> Result<Self> {
        let content = crate::spec::gguf::read_header(path)?;
        Self::from_gguf(&content).with_context(|| format!("{}: tokenizer", path.display()))
    }

    /// The tokenizer a GGUF header describes (`tokenizer.ggml.*` and `tokenizer.chat_template`).
    pub fn from_gguf(content: &Content) -> Result<Self> {
        use candle_core::quantized::tokenizer::TokenizerFromGguf;
        use tokenizers::pre_tokenizers::{
            byte_level::ByteLevel, digits::Digits, sequence::Sequence,
        };
        let meta = |key: &str| content.metadata.get(key);
        let id = |key: &str| meta(key).and_then(gguf_integer).map(|v| v as u32);
        let mut inner = tokenizers::Tokenizer::from_gguf(content)?;
        // candle builds the pre-tokenizers it knows (qwen2, llama3); for the others it falls back
        // to GPT-2's byte level with a prefix space, which llama.cpp adds only when
        // `add_space_prefix` says so. SmolLM2's pre-tokenizer (`smollm`) also splits digits.
        let pre = match meta("tokenizer.ggml.pre") {
            Some(Value::String(s)) => s.clone(),
            _ => "gpt2".to_string(),
        };
        if !matches!(pre.as_str(), "qwen2" | "smaug-bpe" | "lfm2" | "llama3") {
            let prefix_space = matches!(
                meta("tokenizer.ggml.add_space_prefix"),
                Some(Value::Bool(true))
            );
            let byte_level = ByteLevel::new(prefix_space, true, true);
            if pre == "smollm" {
                inner.with_pre_tokenizer(Some(Sequence::new(vec![
                    Digits::new(true).into(),
                    byte_level.into(),
                ])));
            } else {
                inner.with_pre_tokenizer(Some(byte_level));
            }
        }
        let eos = id("tokenizer.ggml.eos_token_id")
            .context("GGUF metadata has no `tokenizer.ggml.eos_token_id`")?;
        let bos = id("tokenizer.ggml.bos_token_id").unwrap_or(eos);
        let pad = id("tokenizer.ggml.padding_token_id")
            .or_else(|| id("tokenizer.ggml.pad_token_id"))
            .unwrap_or(eos);
        let add_bos = matches!(
            meta("tokenizer.ggml.add_bos_token"),
            Some(Value::Bool(true))
        );
        let chat = match meta("tokenizer.chat_template") {
            Some(Value::String(t)) => ChatTemplate::from_jinja(t),
            _ => None,
        };
        Ok(Self::assemble(inner, bos, eos, pad, add_bos, chat))
    }

    /// `tokenizer.json`, with special tokens and chat template from `tokenizer_config.json` (and
    /// token ids from `config.json` where the tokenizer config names none).
    pub fn from_folder(folder: &Path) -> Result<Self> {
        let file = folder.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| anyhow::anyhow!("{}: cannot load the tokenizer: {e}", file.display()))?;
        let read_json = |name: &str| -> Result<serde_json::Value> {
            let path = folder.join(name);
            if !path.is_file() {
                return Ok(serde_json::Value::Null);
            }
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read `{}`", path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("`{}`: invalid JSON", path.display()))
        };
        let tok_config = read_json("tokenizer_config.json")?;
        let config = read_json("config.json")?;
        // A special token is a string or an object with `content`.
        let token = |key: &str| -> Option<u32> {
            let v = &tok_config[key];
            let text = v.as_str().or_else(|| v["content"].as_str())?;
            inner.token_to_id(text)
        };
        let config_id = |key: &str| -> Option<u32> {
            let v = &config[key];
            v.as_u64()
                .or_else(|| v.as_array()?.first()?.as_u64())
                .map(|x| x as u32)
        };
        let eos = token("eos_token")
            .or_else(|| config_id("eos_token_id"))
            .with_context(|| {
                format!(
                    "{}: no EOS token (expected `eos_token` in tokenizer_config.json or `eos_token_id` in config.json)",
                    folder.display()
                )
            })?;
        let bos = token("bos_token")
            .or_else(|| config_id("bos_token_id"))
            .unwrap_or(eos);
        let pad = token("pad_token")
            .or_else(|| config_id("pad_token_id"))
            .unwrap_or(eos);
        // Without `add_bos_token`, ask the tokenizer's own post-processor whether it adds BOS.
        let add_bos = match tok_config["add_bos_token"].as_bool() {
            Some(b) => b,
            None => inner
                .encode("a", true)
                .map(|e| e.get_ids().first() == Some(&bos))
                .unwrap_or(false),
        };
        let template = match &tok_config["chat_template"] {
            serde_json::Value::String(t) => Some(t.clone()),
            serde_json::Value::Array(list) => list
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str().map(String::from)),
            _ => None,
        };
        let chat = template.as_deref().and_then(ChatTemplate::from_jinja);
        Ok(Self::assemble(inner, bos, eos, pad, add_bos, chat))
    }

    fn assemble(
        inner: tokenizers::Tokenizer,
        bos: u32,
        eos: u32,
        pad: u32,
        add_bos: bool,
        chat: Option<ChatTemplate>,
    ) -> Self {
        let mut stops = vec![eos];
        // A chat model's reply ends at `<|im_end|>` even when EOS is another token.
        for text in [IM_END, "<|endoftext|>"] {
            if let Some(id) = inner.token_to_id(text)
                && !stops.contains(&id)
                && (chat.is_some() || text != IM_END)
            {
                stops.push(id);
            }
        }
        Self {
            inner,
            bos,
            eos,
            pad,
            add_bos,
            chat,
            stops,
        }
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// `tokenizer.json` text, to ship next to exported weights.
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(false)
            .map_err(|e| anyhow::anyhow!("cannot serialise the tokenizer: {e}"))
    }

    /// `tokenizer_config.json` for exported weights: special tokens, BOS policy, chat template.
    pub fn config_json(&self) -> serde_json::Value {
        let text = |id: u32| self.inner.id_to_token(id).unwrap_or_default();
        let mut config = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": text(self.bos),
            "eos_token": text(self.eos),
            "pad_token": text(self.pad),
            "add_bos_token": self.add_bos,
            "clean_up_tokenization_spaces": false,
        });
        if let Some(chat) = &self.chat {
            config["chat_template"] = chatml_jinja(chat).into();
        }
        config
    }
}

/// A Jinja ChatML template equivalent to `chat` (the form transformers' `apply_chat_template` runs).
fn chatml_jinja(chat: &ChatTemplate) -> String {
    let system = match &chat.default_system {
        Some(s) => format!(
            "{{% if loop.first and messages[0]['role'] != 'system' %}}{{{{ '{IM_START}system\\n{}{IM_END}\\n' }}}}{{% endif %}}",
            s.replace('\'', "\\'")
        ),
        None => String::new(),
    };
    format!(
        "{{% for message in messages %}}{system}{{{{'{IM_START}' + message['role'] + '\\n' + message['content'] + '{IM_END}' + '\\n'}}}}{{% endfor %}}{{% if add_generation_prompt %}}{{{{ '{IM_START}assistant\\n' }}}}{{% endif %}}"
    )
}

impl Tokenizer for HfTokenizer {
    fn encode(&self, text: &str) -> Vec<u32> {
        // Encoding plain text cannot fail for a BPE model with byte-level pre-tokenization; an
        // error would mean a broken tokenizer file, caught by the tests that load one.
        self.inner
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default()
    }

    fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, false).unwrap_or_default()
    }

    fn bos(&self) -> u32 {
        self.bos
    }

    fn eos(&self) -> u32 {
        self.eos
    }

    fn pad(&self) -> u32 {
        self.pad
    }

    fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    fn add_bos(&self) -> bool {
        self.add_bos
    }

    fn chat_template(&self) -> Option<ChatTemplate> {
        self.chat.clone()
    }

    fn stop_tokens(&self) -> Vec<u32> {
        self.stops.clone()
    }
}

/// The tokenizer for `--model`: the model's own, else the byte-level one.
pub fn for_model(arg: &str) -> Result<Box<dyn Tokenizer>> {
    Ok(match HfTokenizer::for_model(arg)? {
        Some(t) => Box::new(t),
        None => Box::new(ByteTokenizer),
    })
}

/// Fails when `tokenizer` produces ids beyond the model's vocabulary.
pub fn check_fits(tokenizer: &dyn Tokenizer, model_vocab: usize, model: &str) -> Result<()> {
    if model_vocab < tokenizer.vocab_size() {
        bail!(
            "model `{model}` has a vocabulary of {model_vocab} tokens; its tokenizer needs at least {}",
            tokenizer.vocab_size()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_template_renders_as_transformers_does() {
        let t = ChatTemplate::from_jinja(SMOLLM2_TEMPLATE).unwrap();
        let text: String = t
            .render(
                &[Message::new("user", "What is the capital of France?")],
                true,
            )
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        // transformers 5.24's apply_chat_template(..., add_generation_prompt=True) on SmolLM2.
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        );
        // Our own Jinja rendering of the template reads back to the same template.
        assert_eq!(ChatTemplate::from_jinja(&chatml_jinja(&t)), Some(t.clone()));
        // Only the assistant's reply and its end marker are trained.
        let segments = t.render(
            &[
                Message::new("system", "S"),
                Message::new("user", "u"),
                Message::new("assistant", "a"),
            ],
            false,
        );
        let trained: Vec<&str> = segments
            .iter()
            .filter(|(_, t)| *t)
            .map(|(s, _)| s.as_str())
            .collect();
        assert_eq!(trained, vec!["a<|im_end|>"]);
        assert_eq!(
            segments[0].0, "<|im_start|>system\n",
            "an explicit system turn replaces the default"
        );
    }

    #[test]
    fn templates_with_only_variable_system_turns_have_no_default() {
        let t = "{% for m in messages %}{{'<|im_start|>system\n' + m['content'] + '<|im_end|>'}}{% endfor %}";
        assert_eq!(ChatTemplate::from_jinja(t), Some(ChatTemplate::default()));
        assert_eq!(ChatTemplate::from_jinja("{{ bos_token }}[INST]"), None);
    }
}
