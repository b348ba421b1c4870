//! `tokenizer.json` through the `tokenizers` crate, plus the incremental decoding that turns a
//! growing list of token ids into text deltas for streaming.

use crate::error::{Error, Result};

pub struct CaptionTokenizer {
    inner: tokenizers::Tokenizer,
}

impl From<tokenizers::Tokenizer> for CaptionTokenizer {
    fn from(inner: tokenizers::Tokenizer) -> Self {
        Self { inner }
    }
}

/// tokenizers 0.23 panics instead of erring on some bad `tokenizer.json`s (found by fuzzing; a
/// panic kills a WASM instance): invalid JSON inside the `decoder` section (`expect("Helper")`), a
/// `Precompiled` normalizer whose fields do not parse (`expect("Precompiled")`), and a
/// `TemplateProcessing` post-processor whose template names a special token it does not define
/// (indexed at encode time). These are refused here first.
fn refuse_what_tokenizers_panics_on(bytes: &[u8]) -> Result<()> {
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes).map_err(|e| Error::Tokenizer(format!("could not parse: not valid JSON: {e}")))?;
    if !bytes.windows(11).any(|w| w == b"Precompiled" || w == b"TemplatePro") {
        return Ok(());
    }
    let bad = |what: String| Error::Tokenizer(format!("could not parse: {what}"));
    fn check(value: &serde_json::Value, bad: &dyn Fn(String) -> Error) -> Result<()> {
        match value {
            serde_json::Value::Object(map) => {
                match map.get("type").and_then(|t| t.as_str()) {
                    Some("Precompiled") => {
                        serde_json::from_value::<tokenizers::normalizers::Precompiled>(value.clone())
                            .map_err(|e| bad(format!("a Precompiled normalizer: {e}")))?;
                    }
                    Some("TemplateProcessing") => check_template(map, bad)?,
                    _ => {}
                }
                map.values().try_for_each(|v| check(v, bad))
            }
            serde_json::Value::Array(items) => items.iter().try_for_each(|v| check(v, bad)),
            _ => Ok(()),
        }
    }
    fn check_template(map: &serde_json::Map<String, serde_json::Value>, bad: &dyn Fn(String) -> Error) -> Result<()> {
        let defined = map.get("special_tokens").and_then(|s| s.as_object());
        for (id, token) in defined.into_iter().flatten() {
            let (ids, tokens) = (token.get("ids").and_then(|v| v.as_array()), token.get("tokens").and_then(|v| v.as_array()));
            if ids.map(Vec::len) != tokens.map(Vec::len) {
                return Err(bad(format!("TemplateProcessing: special token {id:?} has unequal ids and tokens")));
            }
        }
        for key in ["single", "pair"] {
            // The list form tokenizer.json has; the "[CLS]:0 $A:0" string form too.
            let names: Vec<String> = match map.get(key) {
                Some(serde_json::Value::Array(pieces)) => {
                    pieces.iter().filter_map(|p| p.get("SpecialToken")?.get("id")?.as_str().map(str::to_string)).collect()
                }
                Some(serde_json::Value::String(text)) => text
                    .split_whitespace()
                    .filter(|p| !p.starts_with('$'))
                    .map(|p| p.rsplit_once(':').map_or(p, |(name, _)| name).to_string())
                    .collect(),
                _ => Vec::new(),
            };
            if let Some(name) = names.iter().find(|n| !defined.is_some_and(|d| d.contains_key(n.as_str()))) {
                return Err(bad(format!("TemplateProcessing: `{key}` uses special token {name:?}, which `special_tokens` does not define")));
            }
        }
        Ok(())
    }
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    check(&value, &bad)
}

impl CaptionTokenizer {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        refuse_what_tokenizers_panics_on(bytes)?;
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

/// A tokenizer side file (`tokenizer_config.json`, `special_tokens_map.json`) as a JSON object;
/// absent: empty.
fn json_object(name: &str, bytes: Option<&[u8]>) -> Result<serde_json::Map<String, serde_json::Value>> {
    match bytes {
        None => Ok(serde_json::Map::new()),
        Some(b) => serde_json::from_slice(b).map_err(|e| Error::Tokenizer(format!("{name}: not a JSON object: {e}"))),
    }
}

/// A special token as those files write it: a string, or an AddedToken object `{"content": …}`.
fn token_content(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(serde_json::Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// GPT-2's tokenizer files as older folders ship them (nlpconnect/vit-gpt2-image-captioning has no
/// `tokenizer.json`): `vocab.json`, `merges.txt` and, when present, `tokenizer_config.json` and
/// `special_tokens_map.json`. Returns the `tokenizer.json` that 🤗 transformers' conversion to
/// `GPT2TokenizerFast` makes of them: byte-level BPE, the `add_prefix_space` of the config (default
/// false), and the bos/eos/unk/pad tokens (default `<|endoftext|>`) as special tokens, which
/// decoding with `skip_special_tokens` drops.
pub fn gpt2_tokenizer_json(vocab: &[u8], merges: &[u8], tokenizer_config: Option<&[u8]>, special_tokens_map: Option<&[u8]>) -> Result<Vec<u8>> {
    use serde_json::{json, Map, Value};
    let vocab: Map<String, Value> =
        serde_json::from_slice(vocab).map_err(|e| Error::Tokenizer(format!("vocab.json: not a JSON object of token ids: {e}")))?;
    if let Some((token, id)) = vocab.iter().find(|(_, id)| id.as_u64().is_none_or(|id| id > u32::MAX as u64)) {
        return Err(Error::Tokenizer(format!("vocab.json: the id of {token:?} is {id}, not a token id")));
    }
    let merges = std::str::from_utf8(merges).map_err(|e| Error::Tokenizer(format!("merges.txt: not UTF-8: {e}")))?;
    let mut merge_list = vec![];
    for (n, line) in merges.lines().enumerate() {
        // The first line is a "#version: 0.2" header; blank lines carry nothing.
        if line.trim().is_empty() || (n == 0 && line.starts_with("#version")) {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => merge_list.push(format!("{a} {b}")),
            _ => return Err(Error::Tokenizer(format!("merges.txt: line {} is not two tokens separated by a space: {line:?}", n + 1))),
        }
    }
    let config = json_object("tokenizer_config.json", tokenizer_config)?;
    let special_map = json_object("special_tokens_map.json", special_tokens_map)?;
    let mut specials: Vec<String> = vec![];
    for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
        let named = config.get(key).or_else(|| special_map.get(key));
        let token = match named {
            Some(Value::Null) => None,
            Some(v) => token_content(v),
            None if key == "pad_token" => None,
            None => Some("<|endoftext|>".to_string()),
        };
        specials.extend(token);
    }
    if let Some(Value::Array(extra)) = config.get("additional_special_tokens").or_else(|| special_map.get("additional_special_tokens")) {
        specials.extend(extra.iter().filter_map(token_content));
    }
    let mut added: Vec<(u64, Value)> = vec![];
    for token in specials {
        let Some(id) = vocab.get(&token).and_then(Value::as_u64) else {
            // transformers appends a special token missing from the vocabulary; GPT-2's are all in it.
            return Err(Error::Tokenizer(format!("the special token {token:?} is not in vocab.json")));
        };
        if added.iter().all(|(i, _)| *i != id) {
            added.push((
                id,
                json!({"id": id, "content": token, "single_word": false, "lstrip": false, "rstrip": false, "normalized": true, "special": true}),
            ));
        }
    }
    added.sort_by_key(|(id, _)| *id);
    let add_prefix_space = config.get("add_prefix_space").and_then(Value::as_bool).unwrap_or(false);
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": true, "use_regex": true},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "", "end_of_word_suffix": "",
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merge_list},
    });
    serde_json::to_vec(&tokenizer).map_err(|e| Error::Tokenizer(e.to_string()))
}

/// BERT's tokenizer files as older folders ship them (`vocab.txt`, one token a line, and
/// `tokenizer_config.json` / `special_tokens_map.json`): the `tokenizer.json` that 🤗
/// transformers' conversion to `BertTokenizerFast` makes — WordPiece (`##`), BertNormalizer
/// (`do_lower_case`, default true), `[CLS] $A [SEP]`; the special tokens the files name are
/// special added tokens, those missing from the vocabulary (BLIP's `[DEC]`, `[ENC]`) appended with
/// the ids `added_tokens_decoder` gives, else the next ids in the order the files name them.
pub fn bert_tokenizer_json(vocab: &[u8], tokenizer_config: Option<&[u8]>, special_tokens_map: Option<&[u8]>) -> Result<Vec<u8>> {
    use serde_json::{json, Map, Value};
    let text = std::str::from_utf8(vocab).map_err(|e| Error::Tokenizer(format!("vocab.txt: not UTF-8: {e}")))?;
    let mut ids: Map<String, Value> = Map::new();
    for line in text.lines() {
        let token = line.trim_end_matches('\r');
        if !ids.contains_key(token) {
            let id = ids.len();
            ids.insert(token.to_string(), id.into());
        }
    }
    if ids.is_empty() {
        return Err(Error::Tokenizer("vocab.txt: no tokens".into()));
    }
    let config = json_object("tokenizer_config.json", tokenizer_config)?;
    let special_map = json_object("special_tokens_map.json", special_tokens_map)?;
    let named = |key: &str, default: &str| -> String {
        config.get(key).or_else(|| special_map.get(key)).and_then(token_content).unwrap_or_else(|| default.to_string())
    };
    let (cls, sep, unk) = (named("cls_token", "[CLS]"), named("sep_token", "[SEP]"), named("unk_token", "[UNK]"));
    let mut specials: Vec<String> = vec![unk.clone(), sep.clone(), named("pad_token", "[PAD]"), cls.clone(), named("mask_token", "[MASK]")];
    for key in ["bos_token", "eos_token"] {
        specials.extend(config.get(key).or_else(|| special_map.get(key)).and_then(token_content));
    }
    for key in ["additional_special_tokens", "extra_special_tokens"] {
        if let Some(Value::Array(extra)) = config.get(key).or_else(|| special_map.get(key)) {
            specials.extend(extra.iter().filter_map(token_content));
        }
    }
    // Ids given for tokens beyond the vocabulary (transformers ≥ 4.34 writes added_tokens_decoder).
    let mut given: Vec<(u64, String)> = vec![];
    if let Some(Value::Object(decoder)) = config.get("added_tokens_decoder") {
        for (id, token) in decoder {
            if let (Ok(id), Some(token)) = (id.parse::<u64>(), token_content(token)) {
                given.push((id, token));
            }
        }
    }
    let mut added: Vec<(u64, String)> = vec![];
    let mut next = ids.len() as u64;
    for token in specials.iter().chain(given.iter().map(|(_, t)| t)) {
        if added.iter().any(|(_, t)| t == token) {
            continue;
        }
        let id = match (ids.get(token).and_then(Value::as_u64), given.iter().find(|(_, t)| t == token)) {
            (Some(id), _) => id,
            (None, Some((id, _))) => *id,
            (None, None) => {
                next += 1;
                next - 1
            }
        };
        next = next.max(id + 1);
        added.push((id, token.clone()));
    }
    added.sort();
    let id_of = |token: &str| added.iter().find(|(_, t)| t == token).map(|(id, _)| *id);
    let (Some(cls_id), Some(sep_id)) = (id_of(&cls), id_of(&sep)) else {
        return Err(Error::Tokenizer("vocab.txt: no [CLS] / [SEP] token".into()));
    };
    let lowercase = config.get("do_lower_case").and_then(Value::as_bool).unwrap_or(true);
    let strip_accents = config.get("strip_accents").cloned().unwrap_or(Value::Null);
    let special = |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
    let sequence = |s: &str, type_id: u32| json!({"Sequence": {"id": s, "type_id": type_id}});
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added.iter().map(|(id, t)| json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true})).collect::<Vec<_>>(),
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": config.get("tokenize_chinese_chars").and_then(Value::as_bool).unwrap_or(true), "strip_accents": strip_accents, "lowercase": lowercase},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [special(&cls, 0), sequence("A", 0), special(&sep, 0)],
            "pair": [special(&cls, 0), sequence("A", 0), special(&sep, 0), sequence("B", 1), special(&sep, 1)],
            "special_tokens": {
                cls.clone(): {"id": cls, "ids": [cls_id], "tokens": [cls]},
                sep.clone(): {"id": sep, "ids": [sep_id], "tokens": [sep]},
            },
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": unk, "continuing_subword_prefix": "##", "max_input_chars_per_word": 100, "vocab": ids},
    });
    serde_json::to_vec(&tokenizer).map_err(|e| Error::Tokenizer(e.to_string()))
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

    /// A stream whose text starts with `prefix`'s (decoded with what follows, so word pieces
    /// join across the seam); deltas are what the pushed ids add.
    pub fn with_prefix(tokenizer: &CaptionTokenizer, prefix: &[u32]) -> Result<Self> {
        if prefix.is_empty() {
            return Ok(Self::new());
        }
        Ok(Self { ids: prefix.to_vec(), emitted: tokenizer.decode(prefix, true)? })
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
