//! One place for generation options, as 🤗 `GenerationConfig` is one: what a caller may set
//! ([`GenerationOptions`], the same keys on every surface — camelCase from JS, flags in the CLI),
//! their defaults (the model's `generation_config.json`, then `config.json`: see
//! [`crate::loading::GenerationDefaults`]), their validation, and the choice between one
//! sequence (greedy or sampling) and beam search ([`GenerationOptions::plan`]). The CLI, the WASM
//! API and the JS package pass options through to it unchanged.

use crate::beam::EarlyStopping;
use crate::captioner::{BeamOptions, CaptionOptions};
use crate::error::{Error, Result};
use crate::loading::GenerationDefaults;
use crate::sampling::SamplingOptions;

/// What a caller may set, named as transformers' `generate()` arguments (camelCase in JSON).
/// Whatever is not set takes the model's `generation_config.json` value, as `generate()` does.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GenerationOptions {
    pub max_new_tokens: Option<usize>,
    /// Text after the image (prefix models).
    pub prompt: Option<String>,
    /// A whole conversation in transformers' chat format, one image in it (chat-template models).
    pub messages: Option<serde_json::Value>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub repetition_penalty: Option<f32>,
    pub no_repeat_ngram_size: Option<usize>,
    pub min_new_tokens: Option<usize>,
    pub bad_words_ids: Option<Vec<Vec<u32>>>,
    pub num_beams: Option<usize>,
    pub length_penalty: Option<f32>,
    /// `true`, `false` or `"never"`.
    pub early_stopping: Option<serde_json::Value>,
    pub num_return_sequences: Option<usize>,
}

/// How to generate: one sequence per image (greedy, or sampling with `do_sample`), or beam
/// search when `beams` is set.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub options: CaptionOptions,
    pub beams: Option<BeamOptions>,
}

impl GenerationOptions {
    /// Options from a JSON object (`null`: none); anything else, unknown keys and wrong types
    /// are refused.
    pub fn from_json(value: serde_json::Value) -> Result<Self> {
        match value {
            serde_json::Value::Null => Ok(Self::default()),
            serde_json::Value::Object(_) => serde_json::from_value(value).map_err(|e| Error::Generation(format!("invalid options: {e}"))),
            other => Err(Error::Generation(format!("invalid options: expected an object, not {other}"))),
        }
    }

    /// The options with the model's defaults filled in, validated, and the decision `generate()`
    /// makes: beam search when `num_beams` (given, else the file's) is above 1. Like
    /// `generate()`, `num_return_sequences` above 1 needs that many beams: greedy decoding and
    /// sampling give one sequence per image.
    pub fn plan(&self, defaults: &GenerationDefaults) -> Result<Plan> {
        let d = &defaults.sampling;
        let sampling = SamplingOptions {
            do_sample: self.do_sample.unwrap_or(d.do_sample),
            temperature: self.temperature.or(d.temperature),
            top_k: self.top_k.or(d.top_k),
            top_p: self.top_p.or(d.top_p),
            repetition_penalty: self.repetition_penalty.or(d.repetition_penalty),
            no_repeat_ngram_size: self.no_repeat_ngram_size.or(d.no_repeat_ngram_size),
            min_new_tokens: self.min_new_tokens.or(d.min_new_tokens),
            bad_words_ids: self.bad_words_ids.clone().unwrap_or_else(|| d.bad_words_ids.clone()),
            seed: self.seed.or(d.seed),
        };
        sampling.validate()?;
        let b = &defaults.beams;
        let early_stopping = match &self.early_stopping {
            None => b.early_stopping,
            Some(v) => {
                EarlyStopping::from_json(v).ok_or_else(|| Error::Generation(format!("early_stopping must be true, false or \"never\", not {v}")))?
            }
        };
        let beams = BeamOptions {
            num_beams: self.num_beams.unwrap_or(b.num_beams),
            length_penalty: self.length_penalty.unwrap_or(b.length_penalty),
            early_stopping,
            num_return_sequences: self.num_return_sequences.unwrap_or(b.num_return_sequences),
        };
        beams.validate()?;
        if self.prompt.is_some() && self.messages.is_some() {
            return Err(Error::Generation("give a prompt or messages, not both".into()));
        }
        let options = CaptionOptions {
            max_new_tokens: self.max_new_tokens,
            prompt: self.prompt.clone(),
            messages: self.messages.clone(),
            sampling,
            eos_token_ids: None,
        };
        Ok(Plan { options, beams: beams.searches().then_some(beams) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn defaults(generation: serde_json::Value) -> GenerationDefaults {
        GenerationDefaults::resolve(Some(&generation), &json!({}), "decoder").unwrap()
    }

    #[test]
    fn the_files_decide_what_the_caller_leaves_open() {
        let nlpconnect = defaults(json!({"num_beams": 4, "max_length": 16}));
        let plan = GenerationOptions::default().plan(&nlpconnect).unwrap();
        assert_eq!(plan.beams.as_ref().map(|b| b.num_beams), Some(4));
        let greedy = GenerationOptions { num_beams: Some(1), ..Default::default() }.plan(&nlpconnect).unwrap();
        assert_eq!(greedy.beams, None);
        let two = GenerationOptions { num_return_sequences: Some(2), ..Default::default() }.plan(&nlpconnect).unwrap();
        assert_eq!(two.beams.map(|b| (b.num_beams, b.num_return_sequences)), Some((4, 2)));
        // Sampling settings of the file, overridden one by one.
        let sampled = defaults(json!({"do_sample": true, "top_k": 5}));
        let plan = GenerationOptions { top_k: Some(7), ..Default::default() }.plan(&sampled).unwrap();
        assert!(plan.options.sampling.do_sample);
        assert_eq!(plan.options.sampling.top_k, Some(7));
    }

    #[test]
    fn several_sequences_need_beams_as_generate_says() {
        let err = GenerationOptions { num_return_sequences: Some(2), ..Default::default() }.plan(&defaults(json!({}))).unwrap_err();
        assert!(err.to_string().contains("num_return_sequences (2) must be between 1 and num_beams (1)"), "{err}");
        let err =
            GenerationOptions { num_beams: Some(2), num_return_sequences: Some(3), ..Default::default() }.plan(&defaults(json!({}))).unwrap_err();
        assert!(err.to_string().contains("num_return_sequences (3) must be between 1 and num_beams (2)"), "{err}");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let err = GenerationOptions::from_json(json!({"beams": 2})).unwrap_err().to_string();
        assert!(err.contains("unknown field `beams`"), "{err}");
        let err = GenerationOptions::from_json(json!({"topK": "x"})).unwrap_err().to_string();
        assert!(err.contains("invalid type"), "{err}");
        let options = GenerationOptions::from_json(json!({"doSample": true, "topP": 1.5})).unwrap();
        assert!(options.plan(&defaults(json!({}))).unwrap_err().to_string().contains("top_p must be in (0, 1]"));
        let options = GenerationOptions::from_json(json!({"numBeams": 2, "earlyStopping": "sometimes"})).unwrap();
        assert!(options.plan(&defaults(json!({}))).unwrap_err().to_string().contains("\"never\""));
    }
}
