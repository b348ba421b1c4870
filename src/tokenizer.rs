//! `tokenizer.json` through the `tokenizers` crate, plus the incremental decoding that turns a
//! growing list of token ids into text deltas for streaming.

use crate::error::{Error, Result};

pub struct CaptionTokenizer {
    inner: tokenizers::Tokenizer,
}

impl CaptionTokenizer {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| Error::Tokenizer(format!("could not parse: {e}")))?;
        Ok(Self { inner })
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, add_special_tokens).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Decodes the whole sequence each time and emits what is new. Byte-level BPE can split one
/// UTF-8 character over several tokens; until the last byte arrives the decoded text ends in
/// U+FFFD, so such a tail is held back rather than streamed and later taken back.
#[derive(Debug, Clone, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    emitted: String,
}

impl TextStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token; returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &CaptionTokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = tokenizer.decode(&self.ids, true)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        Ok(self.advance(text))
    }

    /// Flushes whatever is held back (an incomplete character stays U+FFFD, as 🤗 decodes it).
    pub fn finish(&mut self, tokenizer: &CaptionTokenizer) -> Result<String> {
        let text = tokenizer.decode(&self.ids, true)?;
        Ok(self.advance(text))
    }

    pub fn text(&self) -> &str {
        &self.emitted
    }

    fn advance(&mut self, text: String) -> String {
        let delta = match text.strip_prefix(self.emitted.as_str()) {
            Some(new) => new.to_string(),
            // Decoding is not always prefix-stable (e.g. cleanup of spaces); the caller still
            // gets the right full text, and the delta is everything after the common prefix.
            None => {
                let common = self.emitted.char_indices().zip(text.chars()).take_while(|((_, a), b)| a == b).count();
                text.chars().skip(common).collect()
            }
        };
        self.emitted = text;
        delta
    }
}
