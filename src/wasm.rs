//! wasm-bindgen surface: converts types and errors, nothing else. Every failure becomes a JS
//! `Error` carrying the Rust message (which names the file / tensor / shapes); nothing panics,
//! so the instance stays usable after a bad input.

use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;

use crate::beam::EarlyStopping;
use crate::captioner::{BeamOptions, CaptionOptions, CaptionRun, Captioner};
use crate::loading::ModelFiles;
use crate::lora::AdapterFiles;
use crate::sampling::SamplingOptions;

fn js_error(e: crate::Error) -> JsError {
    JsError::new(&e.to_string())
}

fn to_js<T: serde::Serialize>(value: &T) -> Result<JsValue, JsError> {
    serde_wasm_bindgen::to_value(value).map_err(|e| JsError::new(&format!("could not convert result to JS: {e}")))
}

/// `{ maxNewTokens?, prompt?, doSample?, temperature?, topK?, topP?, seed?, repetitionPenalty?,
/// noRepeatNgramSize?, minNewTokens?, badWordsIds? }`
#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct JsCaptionOptions {
    max_new_tokens: Option<usize>,
    prompt: Option<String>,
    #[serde(default)]
    do_sample: bool,
    temperature: Option<f32>,
    top_k: Option<usize>,
    top_p: Option<f32>,
    seed: Option<u64>,
    repetition_penalty: Option<f32>,
    no_repeat_ngram_size: Option<usize>,
    min_new_tokens: Option<usize>,
    #[serde(default)]
    bad_words_ids: Vec<Vec<u32>>,
}

impl From<JsCaptionOptions> for CaptionOptions {
    fn from(o: JsCaptionOptions) -> Self {
        CaptionOptions {
            max_new_tokens: o.max_new_tokens,
            prompt: o.prompt,
            sampling: SamplingOptions {
                do_sample: o.do_sample,
                temperature: o.temperature,
                top_k: o.top_k,
                top_p: o.top_p,
                repetition_penalty: o.repetition_penalty,
                no_repeat_ngram_size: o.no_repeat_ngram_size,
                min_new_tokens: o.min_new_tokens,
                bad_words_ids: o.bad_words_ids,
                seed: o.seed,
            },
            eos_token_ids: None,
        }
    }
}

/// JS options object (or `undefined`/`null`: the defaults) → `T`, refusing unknown keys:
/// serde_wasm_bindgen only looks up the declared fields of a struct, so the object goes through
/// a JSON value where `deny_unknown_fields` applies.
fn parse_options<T: serde::de::DeserializeOwned + Default>(value: JsValue, what: &str) -> Result<T, JsError> {
    if value.is_undefined() || value.is_null() {
        return Ok(T::default());
    }
    let json: serde_json::Value = serde_wasm_bindgen::from_value(value).map_err(|e| JsError::new(&format!("invalid {what}: {e}")))?;
    serde_json::from_value(json).map_err(|e| JsError::new(&format!("invalid {what}: {e}")))
}

fn options(value: JsValue) -> Result<CaptionOptions, JsError> {
    Ok(parse_options::<JsCaptionOptions>(value, "caption options")?.into())
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct JsBeamOptions {
    max_new_tokens: Option<usize>,
    prompt: Option<String>,
    num_beams: Option<usize>,
    length_penalty: Option<f32>,
    early_stopping: Option<serde_json::Value>,
    num_return_sequences: Option<usize>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct JsHypothesis {
    text: String,
    token_ids: Vec<u32>,
    score: f32,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct JsCaption {
    text: String,
    token_ids: Vec<u32>,
    timings: JsTimings,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct JsTimings {
    encoder_ms: f64,
    first_token_ms: f64,
    total_ms: f64,
    tokens_per_s: f64,
}

#[wasm_bindgen]
pub struct WasmCaptioner {
    inner: Captioner,
    run: Option<CaptionRun>,
}

#[wasm_bindgen]
impl WasmCaptioner {
    /// Builds a captioner from the bytes of the model folder's files; `adapter_config` and
    /// `adapter_weights` (a PEFT LoRA folder's two files) are merged in when both are given.
    #[wasm_bindgen(constructor)]
    pub fn new(
        config: &[u8],
        weights: &[u8],
        tokenizer: &[u8],
        preprocessor: &[u8],
        generation: Option<Vec<u8>>,
        adapter_config: Option<Vec<u8>>,
        adapter_weights: Option<Vec<u8>>,
    ) -> Result<WasmCaptioner, JsError> {
        let adapter = match (&adapter_config, &adapter_weights) {
            (Some(config), Some(weights)) => Some(AdapterFiles { config, weights }),
            (None, None) => None,
            _ => return Err(JsError::new("a LoRA adapter needs both adapter_config.json and adapter_model.safetensors")),
        };
        let files = ModelFiles { config, weights, tokenizer, preprocessor, generation: generation.as_deref(), adapter };
        let inner = Captioner::from_files(files).map_err(js_error)?;
        Ok(WasmCaptioner { inner, run: None })
    }

    /// Starts captioning encoded image bytes (PNG/JPEG); replaces any caption in progress.
    pub fn start(&mut self, image: &[u8], options_js: JsValue) -> Result<(), JsError> {
        self.run = None;
        let options = options(options_js)?;
        let pixels = self.inner.pixel_values_from_bytes(image).map_err(js_error)?;
        self.run = Some(self.inner.start(&pixels, &options).map_err(js_error)?);
        Ok(())
    }

    /// Starts captioning raw RGBA pixels (e.g. `ImageData.data`).
    #[wasm_bindgen(js_name = startRgba)]
    pub fn start_rgba(&mut self, rgba: &[u8], width: u32, height: u32, options_js: JsValue) -> Result<(), JsError> {
        self.run = None;
        let options = options(options_js)?;
        let pixels = self.inner.pixel_values_from_rgba(rgba, width, height).map_err(js_error)?;
        self.run = Some(self.inner.start(&pixels, &options).map_err(js_error)?);
        Ok(())
    }

    /// The next token as `{ id, text, delta }`, or `undefined` when the caption is complete.
    #[wasm_bindgen(js_name = nextToken)]
    pub fn next_token(&mut self) -> Result<JsValue, JsError> {
        let Some(run) = self.run.as_mut() else {
            return Err(JsError::new("generation: no caption in progress; call start() first"));
        };
        match self.inner.next_token(run) {
            Ok(Some(event)) => to_js(&event),
            Ok(None) => Ok(JsValue::UNDEFINED),
            Err(e) => {
                self.run = None;
                Err(js_error(e))
            }
        }
    }

    /// The finished caption `{ text, tokenIds, timings }` of the current run.
    pub fn finish(&mut self) -> Result<JsValue, JsError> {
        let Some(run) = self.run.as_ref() else {
            return Err(JsError::new("generation: no caption in progress; call start() first"));
        };
        let c = self.inner.finish(run);
        to_js(&JsCaption {
            text: c.text,
            token_ids: c.token_ids,
            timings: JsTimings { encoder_ms: c.encoder_ms, first_token_ms: c.first_token_ms, total_ms: c.total_ms, tokens_per_s: c.tokens_per_s },
        })
    }

    /// Drops the caption in progress.
    pub fn abort(&mut self) {
        self.run = None;
    }

    /// Beam search over encoded image bytes, as transformers' `generate(num_beams=…)`.
    /// Options: `{ maxNewTokens?, prompt?, numBeams?, lengthPenalty?, earlyStopping?: boolean | "never",
    /// numReturnSequences? }`; returns `[{ text, tokenIds, score }]`, best first.
    #[wasm_bindgen(js_name = beamSearch)]
    pub fn beam_search(&mut self, image: &[u8], options_js: JsValue) -> Result<JsValue, JsError> {
        let o: JsBeamOptions = parse_options(options_js, "beam search options")?;
        let defaults = BeamOptions::default();
        let beams = BeamOptions {
            num_beams: o.num_beams.unwrap_or(defaults.num_beams),
            length_penalty: o.length_penalty.unwrap_or(defaults.length_penalty),
            early_stopping: match o.early_stopping {
                None | Some(serde_json::Value::Bool(false)) => EarlyStopping::Heuristic,
                Some(serde_json::Value::Bool(true)) => EarlyStopping::Stop,
                Some(serde_json::Value::String(s)) if s == "never" => EarlyStopping::Never,
                Some(other) => {
                    return Err(JsError::new(&format!("invalid beam search options: earlyStopping must be true, false or \"never\", not {other}")))
                }
            },
            num_return_sequences: o.num_return_sequences.unwrap_or(defaults.num_return_sequences),
        };
        let options = CaptionOptions { max_new_tokens: o.max_new_tokens, prompt: o.prompt, ..Default::default() };
        let pixels = self.inner.pixel_values_from_bytes(image).map_err(js_error)?;
        let hypotheses = self.inner.beam_search(&pixels, &options, &beams).map_err(js_error)?;
        let results = hypotheses
            .into_iter()
            .map(|h| {
                let text = self.inner.tokenizer().decode(&h.token_ids, true).map_err(js_error)?;
                Ok(JsHypothesis { text, token_ids: h.token_ids, score: h.score })
            })
            .collect::<Result<Vec<_>, JsError>>()?;
        to_js(&results)
    }

    /// Captions encoded image bytes in one call.
    pub fn caption(&mut self, image: &[u8], options_js: JsValue) -> Result<JsValue, JsError> {
        self.start(image, options_js)?;
        while !self.next_token()?.is_undefined() {}
        let result = self.finish();
        self.run = None;
        result
    }
}

/// Benchmark: the model `config_json` describes, with random weights; `repeats` captions of
/// `new_tokens` tokens (after `prompt_tokens` text positions in a prefix model). Returns medians
/// (see `bench::BenchReport`) plus the size of WASM memory, which never shrinks: the peak.
/// Benchmark: streaming-read speed of WASM memory in GB/s over a buffer of `bytes` (see
/// `bench::memory_read_gbps`), the floor under a decode step's time.
#[wasm_bindgen(js_name = benchMemory)]
pub fn bench_memory(bytes: usize, repeats: usize) -> f64 {
    crate::bench::memory_read_gbps(bytes, repeats)
}

#[wasm_bindgen(js_name = benchModel)]
pub fn bench_model(config_json: &str, prompt_tokens: usize, new_tokens: usize, repeats: usize) -> Result<JsValue, JsError> {
    let report = crate::bench::bench_model(config_json, prompt_tokens, new_tokens, repeats).map_err(js_error)?;
    let value = to_js(&report)?;
    let memory_bytes = wasm_bindgen::memory()
        .dyn_into::<js_sys::WebAssembly::Memory>()
        .map(|m| m.buffer().dyn_into::<js_sys::ArrayBuffer>().map(|b| b.byte_length()).unwrap_or(0))
        .unwrap_or(0);
    js_sys::Reflect::set(&value, &"peakMemoryBytes".into(), &JsValue::from_f64(memory_bytes as f64))
        .map_err(|_| JsError::new("could not set peakMemoryBytes"))?;
    Ok(value)
}
