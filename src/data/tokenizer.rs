//! Tokenizers. The byte-level tokenizer serves models that bring no vocabulary of their own (random
//! initialisation, catalog configs): ids 0–255 are bytes, then BOS, EOS and PAD.

pub trait Tokenizer: Send + Sync {
    fn encode(&self, text: &str) -> Vec<u32>;
    fn decode(&self, ids: &[u32]) -> String;
    fn bos(&self) -> u32;
    fn eos(&self) -> u32;
    fn pad(&self) -> u32;
    /// Smallest model vocabulary that can hold every id this tokenizer produces.
    fn vocab_size(&self) -> usize;
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
