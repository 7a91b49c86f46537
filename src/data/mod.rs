//! Training data: tokenizers, dataset files (plain text or JSONL), and batching into fixed-length
//! windows. Examples are packed back to back (separated by EOS) and cut into windows of `seq + 1`
//! tokens: the first `seq` are the input, the last `seq` the next-token targets. The loss mask
//! follows each target token: prompt tokens of instruction and chat data are not trained on.

pub mod tokenizer;

use crate::engine::Batch;
use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use std::path::Path;
pub use tokenizer::{ByteTokenizer, ChatTemplate, HfTokenizer, Message, Tokenizer};

/// One tokenized example: tokens and, per token, whether it is trained on as a target.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub tokens: Vec<u32>,
    pub trained: Vec<bool>,
}

/// What to do with a malformed JSONL line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadLinePolicy {
    Fail,
    Skip,
}

/// Reads `path`: `.jsonl` files hold one JSON object a line (`text`; or `instruction`, optional
/// `input`, `output`; or `messages` with `role`/`content`), anything else is plain text (one example
/// per blank-line-separated paragraph). Returns the examples and the count of skipped lines.
pub fn load_examples(
    path: &Path,
    tokenizer: &dyn Tokenizer,
    policy: BadLinePolicy,
) -> Result<(Vec<Example>, usize)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read data file `{}`", path.display()))?;
    let is_jsonl = path
        .extension()
        .is_some_and(|e| e == "jsonl" || e == "json");
    let mut examples = Vec::new();
    let mut skipped = 0;
    if is_jsonl {
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match parse_line(line, tokenizer) {
                Ok(example) => examples.push(example),
                Err(e) => match policy {
                    BadLinePolicy::Fail => bail!(
                        "{}:{}: {e} (use `--bad-lines skip` to skip malformed lines)",
                        path.display(),
                        n + 1
                    ),
                    BadLinePolicy::Skip => skipped += 1,
                },
            }
        }
    } else {
        for paragraph in text.split("\n\n").map(str::trim).filter(|p| !p.is_empty()) {
            let mut tokens = if tokenizer.add_bos() {
                vec![tokenizer.bos()]
            } else {
                Vec::new()
            };
            tokens.extend(tokenizer.encode(paragraph));
            let trained = vec![true; tokens.len()];
            examples.push(Example { tokens, trained });
        }
    }
    if examples.is_empty() {
        bail!("data file `{}` holds no examples", path.display());
    }
    Ok((examples, skipped))
}

fn parse_line(line: &str, tokenizer: &dyn Tokenizer) -> std::result::Result<Example, String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let obj = value.as_object().ok_or("expected a JSON object")?;
    let field = |name: &str| -> std::result::Result<Option<&str>, String> {
        match obj.get(name) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(format!("field `{name}` must be a string")),
        }
    };
    let chat = tokenizer.chat_template();
    let mut ex = Example {
        tokens: Vec::new(),
        trained: Vec::new(),
    };
    if tokenizer.add_bos() {
        ex.tokens.push(tokenizer.bos());
        ex.trained.push(false);
    }
    let mut push = |text: &str, trained: bool| {
        let ids = tokenizer.encode(text);
        ex.trained.extend(std::iter::repeat_n(trained, ids.len()));
        ex.tokens.extend(ids);
    };
    // A chat turn ends with the template's end marker; other examples end with EOS.
    let mut ends_with_eos = true;
    if let Some(messages) = obj.get("messages") {
        let messages = messages
            .as_array()
            .ok_or("field `messages` must be an array")?;
        if messages.is_empty() {
            return Err("field `messages` is empty".into());
        }
        let mut turns = Vec::with_capacity(messages.len());
        for m in messages {
            let role = m
                .get("role")
                .and_then(|r| r.as_str())
                .ok_or("each message needs a string `role`")?;
            let content = m
                .get("content")
                .and_then(|c| c.as_str())
                .ok_or("each message needs a string `content`")?;
            turns.push(Message::new(role, content));
        }
        if !turns.iter().any(|m| m.role == "assistant") {
            return Err("`messages` has no `assistant` turn to train on".into());
        }
        // ChatML (the model's template when it has one); only assistant turns are trained on.
        ends_with_eos = chat.is_none();
        for (text, trained) in chat.unwrap_or_default().render(&turns, false) {
            push(&text, trained);
        }
    } else if let Some(output) = field("output")? {
        let instruction =
            field("instruction")?.ok_or("instruction data needs `instruction` with `output`")?;
        let input = field("input")?.filter(|i| !i.is_empty());
        if let Some(chat) = &chat {
            // A chat model learns instructions as one user turn and one assistant reply.
            let prompt = match input {
                Some(input) => format!("{instruction}\n\n{input}"),
                None => instruction.to_string(),
            };
            let turns = [
                Message::new("user", &prompt),
                Message::new("assistant", output),
            ];
            for (text, trained) in chat.render(&turns, false) {
                push(&text, trained);
            }
            ends_with_eos = false;
        } else {
            let prompt = match input {
                Some(input) => format!("{instruction}\n\n{input}\n\n"),
                None => format!("{instruction}\n\n"),
            };
            push(&prompt, false);
            push(output, true);
        }
    } else if let Some(text) = field("text")? {
        push(text, true);
    } else {
        return Err("expected a `text`, `instruction`/`output` or `messages` field".into());
    }
    if ends_with_eos {
        ex.tokens.push(tokenizer.eos());
        ex.trained.push(true);
    }
    Ok(ex)
}

/// Fixed-length windows cut from the packed examples, served in a seeded shuffled order.
pub struct Windows {
    /// Each window: `seq + 1` tokens and, per target position, the loss weight.
    windows: Vec<(Vec<u32>, Vec<f32>)>,
    order: Vec<usize>,
    /// Next window to serve (in `order`); with `epoch`, the data position saved in checkpoints.
    pub position: usize,
    pub epoch: usize,
    seed: u64,
    seq: usize,
}

/// How examples become fixed-length sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Packing {
    /// Back to back, cut into windows of `seq` tokens: no compute is spent on padding, but an
    /// example can attend to the one before it and can be cut in two.
    #[default]
    Pack,
    /// One example per sequence, right-padded (or cut) to `seq`. Padding comes after every real
    /// token, so the causal mask already keeps real tokens from attending to it, and padded
    /// targets carry no loss: examples never see each other.
    Pad,
}

impl std::str::FromStr for Packing {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "pack" => Ok(Packing::Pack),
            "pad" => Ok(Packing::Pad),
            other => Err(format!("unknown packing `{other}`; expected pack or pad")),
        }
    }
}

/// A window of `seq + 1` tokens and the loss weight of each of its `seq` targets, padded.
fn window(tokens: &[u32], trained: &[bool], seq: usize, pad: u32) -> (Vec<u32>, Vec<f32>) {
    let mut w = tokens.to_vec();
    let mut m: Vec<f32> = trained[1..]
        .iter()
        .map(|&t| if t { 1.0 } else { 0.0 })
        .collect();
    while w.len() < seq + 1 {
        w.push(pad);
        m.push(0.0);
    }
    (w, m)
}

impl Windows {
    /// Packed windows (see [`Packing::Pack`]).
    pub fn new(examples: &[Example], seq: usize, seed: u64, pad: u32) -> Result<Self> {
        Self::with_packing(examples, seq, seed, pad, Packing::Pack)
    }

    pub fn with_packing(
        examples: &[Example],
        seq: usize,
        seed: u64,
        pad: u32,
        packing: Packing,
    ) -> Result<Self> {
        let mut windows = Vec::new();
        match packing {
            Packing::Pack => {
                let mut tokens = Vec::new();
                let mut trained = Vec::new();
                for ex in examples {
                    tokens.extend_from_slice(&ex.tokens);
                    trained.extend_from_slice(&ex.trained);
                }
                let mut start = 0;
                while start + 1 < tokens.len() {
                    let end = (start + seq + 1).min(tokens.len());
                    windows.push(window(&tokens[start..end], &trained[start..end], seq, pad));
                    start += seq;
                }
            }
            Packing::Pad => {
                for ex in examples.iter().filter(|ex| ex.tokens.len() > 1) {
                    let end = ex.tokens.len().min(seq + 1);
                    windows.push(window(&ex.tokens[..end], &ex.trained[..end], seq, pad));
                }
            }
        }
        windows.retain(|(_, m)| m.iter().any(|&x| x > 0.0));
        if windows.is_empty() {
            bail!("the data holds no trainable tokens");
        }
        let mut this = Self {
            order: Vec::new(),
            windows,
            position: 0,
            epoch: 0,
            seed,
            seq,
        };
        this.shuffle();
        Ok(this)
    }

    fn shuffle(&mut self) {
        self.order = (0..self.windows.len()).collect();
        let mut rng = StdRng::seed_from_u64(self.seed.wrapping_add(self.epoch as u64));
        self.order.shuffle(&mut rng);
    }

    pub fn len(&self) -> usize {
        self.windows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// Moves to a saved position (for resume).
    pub fn seek(&mut self, epoch: usize, position: usize) {
        self.epoch = epoch;
        self.shuffle();
        self.position = position.min(self.windows.len());
    }

    /// The next micro-batch of `batch` windows, wrapping into a new (reshuffled) epoch as needed.
    pub fn next_batch(&mut self, batch: usize, device: &Device) -> Result<Batch> {
        let mut ids = Vec::with_capacity(batch * self.seq);
        let mut targets = Vec::with_capacity(batch * self.seq);
        let mut mask = Vec::with_capacity(batch * self.seq);
        for _ in 0..batch {
            if self.position >= self.order.len() {
                self.epoch += 1;
                self.shuffle();
                self.position = 0;
            }
            let (w, m) = &self.windows[self.order[self.position]];
            self.position += 1;
            ids.extend_from_slice(&w[..self.seq]);
            targets.extend_from_slice(&w[1..]);
            mask.extend_from_slice(m);
        }
        batch_from(ids, targets, mask, batch, self.seq, device)
    }

    /// Every window once, in file order, as micro-batches (for evaluation).
    pub fn all_batches(&self, batch: usize, device: &Device) -> Result<Vec<Batch>> {
        let mut out = Vec::new();
        for chunk in self.windows.chunks(batch) {
            let ids = chunk
                .iter()
                .flat_map(|(w, _)| w[..self.seq].iter().copied())
                .collect();
            let targets = chunk
                .iter()
                .flat_map(|(w, _)| w[1..].iter().copied())
                .collect();
            let mask = chunk.iter().flat_map(|(_, m)| m.iter().copied()).collect();
            out.push(batch_from(
                ids,
                targets,
                mask,
                chunk.len(),
                self.seq,
                device,
            )?);
        }
        Ok(out)
    }
}

fn batch_from(
    ids: Vec<u32>,
    targets: Vec<u32>,
    mask: Vec<f32>,
    batch: usize,
    seq: usize,
    device: &Device,
) -> Result<Batch> {
    let counted_tokens = mask.iter().filter(|&&m| m > 0.0).count();
    Ok(Batch {
        ids: Tensor::from_vec(ids, (batch, seq), device)?,
        targets: Tensor::from_vec(targets, batch * seq, device)?,
        mask: Tensor::from_vec(mask, batch * seq, device)?,
        counted_tokens,
    })
}

/// Random tokens: the data probes use (memory and time do not depend on token values).
pub fn random_batch(
    batch: usize,
    seq: usize,
    vocab: usize,
    seed: u64,
    device: &Device,
) -> Result<Batch> {
    use rand::Rng;
    let mut rng = StdRng::seed_from_u64(seed);
    let n = batch * (seq + 1);
    let tokens: Vec<u32> = (0..n).map(|_| rng.random_range(0..vocab as u32)).collect();
    let mut ids = Vec::with_capacity(batch * seq);
    let mut targets = Vec::with_capacity(batch * seq);
    for row in tokens.chunks(seq + 1) {
        ids.extend_from_slice(&row[..seq]);
        targets.extend_from_slice(&row[1..]);
    }
    batch_from(ids, targets, vec![1.0; batch * seq], batch, seq, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instruction_lines_train_only_on_the_output() {
        let tok = ByteTokenizer;
        let ex = parse_line(r#"{"instruction":"hi","output":"yo"}"#, &tok).unwrap();
        // bos, "hi\n\n" (4 prompt bytes), "yo" (2), eos
        assert_eq!(ex.tokens.len(), 1 + 4 + 2 + 1);
        assert_eq!(
            ex.trained,
            vec![false, false, false, false, false, true, true, true]
        );
    }

    #[test]
    fn malformed_lines_are_reported_with_their_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(&path, "{\"text\":\"ok\"}\n{\"text\": 3}\n").unwrap();
        let err = load_examples(&path, &ByteTokenizer, BadLinePolicy::Fail)
            .unwrap_err()
            .to_string();
        assert!(err.contains("d.jsonl:2"), "{err}");
        assert!(err.contains("`text` must be a string"), "{err}");
        let (examples, skipped) =
            load_examples(&path, &ByteTokenizer, BadLinePolicy::Skip).unwrap();
        assert_eq!((examples.len(), skipped), (1, 1));
    }

    #[test]
    fn padded_windows_hold_one_example_each() {
        let ex = |n: u32| Example {
            tokens: (0..n).collect(),
            trained: (0..n).map(|i| i >= 2).collect(),
        };
        // Lengths 3 and 7 at seq 4: [0,1,2,p,p] (one counted target) and [0..5] cut (3 counted).
        let w = Windows::with_packing(&[ex(3), ex(7)], 4, 0, 99, Packing::Pad).unwrap();
        assert_eq!(w.len(), 2);
        let batch = &w.all_batches(2, &Device::Cpu).unwrap()[0];
        assert_eq!(
            batch.ids.to_vec2::<u32>().unwrap(),
            vec![vec![0, 1, 2, 99], vec![0, 1, 2, 3]]
        );
        assert_eq!(
            batch.mask.to_vec1::<f32>().unwrap(),
            vec![0., 1., 0., 0., 0., 1., 1., 1.]
        );
    }

    #[test]
    fn windows_pad_the_tail_without_loss() {
        let ex = Example {
            tokens: (0..10).collect(),
            trained: vec![true; 10],
        };
        let w = Windows::new(&[ex], 4, 0, 99).unwrap();
        // starts 0, 4, 8: the last window is [8, 9, pad, pad, pad] with one counted target.
        assert_eq!(w.len(), 3);
        let batches = w.all_batches(3, &Device::Cpu).unwrap();
        assert_eq!(batches[0].counted_tokens, 4 + 4 + 1);
    }
}
