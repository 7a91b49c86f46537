//! SmolLM2-135M-Instruct from its GGUF file, checked against transformers 5.24 (which loads the
//! same file with `gguf_file=`; reference numbers below were printed by it). Needs the 98 MB file
//! from `scripts/fetch-smollm2.sh`; without it every test here prints why and passes (CI may have
//! no network).

use memtune::data::{HfTokenizer, Message, Tokenizer};
use memtune::train::generate::{Generator, PromptFormat, Sampling};
use std::path::PathBuf;

fn gguf() -> Option<PathBuf> {
    let path = std::env::var_os("MEMTUNE_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if path.is_file() {
        Some(path)
    } else {
        eprintln!(
            "skipping: {} is absent (run scripts/fetch-smollm2.sh to fetch it)",
            path.display()
        );
        None
    }
}

const QUESTION: &str = "What is the capital of France?";

/// `tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}],
/// add_generation_prompt=True)` in transformers.
const CHAT_PROMPT_IDS: [u32; 37] = [
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
    19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531,
    198,
];

#[test]
fn tokenizer_matches_transformers() {
    let Some(path) = gguf() else { return };
    let tok = HfTokenizer::from_gguf_file(&path).unwrap();
    // Digits split one by one, no prefix space, runs of spaces as transformers splits them.
    assert_eq!(
        tok.encode("Hello world 123  foo\n\nbar"),
        vec![19556, 905, 216, 33, 34, 35, 216, 29856, 198, 198, 6299]
    );
    let chat = tok.chat_template().expect("SmolLM2 has a ChatML template");
    let ids: Vec<u32> = chat
        .clone()
        .render(&[Message::new("user", QUESTION)], true)
        .iter()
        .flat_map(|(text, _)| tok.encode(text))
        .collect();
    assert_eq!(ids, CHAT_PROMPT_IDS);
    assert_eq!(
        (tok.bos(), tok.eos(), tok.pad(), tok.add_bos()),
        (1, 2, 2, false)
    );
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(
        tok.decode(&[504, 3575, 282, 4649, 314, 7042, 30]),
        "The capital of France is Paris."
    );
}

#[test]
fn greedy_answer_and_logits_match_transformers() {
    let Some(path) = gguf() else { return };
    let model = path.display().to_string();
    let spec = memtune::spec::resolve_model(&model).unwrap();
    assert_eq!(spec.param_count(), 134_515_008);
    let generator = Generator::load(&model, None, &candle_core::Device::Cpu).unwrap();
    let prompt = generator.prompt_ids(
        QUESTION,
        &PromptFormat {
            chat: true,
            system: None,
        },
    );
    assert_eq!(prompt, CHAT_PROMPT_IDS);

    // transformers' logits at the last prompt position, first five vocabulary entries.
    let reference = [10.166014f32, 6.212086, 6.837061, 6.255059, 5.38484];
    let logits = generator.next_logits(&prompt).unwrap();
    let worst = logits
        .iter()
        .zip(reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("largest logit difference from transformers: {worst:e}");
    for (i, (ours, theirs)) in logits.iter().zip(reference).enumerate() {
        assert!(
            (ours - theirs).abs() < 1e-4,
            "logit {i}: ours {ours}, transformers {theirs}"
        );
    }

    let ids = generator
        .generate(
            &prompt,
            Sampling {
                max_tokens: 20,
                temperature: 0.0,
                seed: 0,
            },
        )
        .unwrap();
    // transformers: [504, 3575, 282, 4649, 314, 7042, 30] then <|im_end|> (2).
    assert_eq!(ids, vec![504, 3575, 282, 4649, 314, 7042, 30]);
    assert_eq!(
        generator.tokenizer.decode(&ids),
        "The capital of France is Paris."
    );
}
