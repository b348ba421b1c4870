//! wasm-bindgen surface: converts types and errors, nothing else. Every failure becomes a JS
//! `Error` carrying the Rust message (which names the file / tensor / shapes); nothing panics,
//! so the instance stays usable after a bad input.

use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;

use crate::captioner::{BeamOptions, CaptionRun, Captioner};
use crate::generation::{GenerationOptions, Plan};
use crate::loading::ModelFiles;
use crate::lora::AdapterFiles;

/// A file's bytes as JS holds them: the chunks it arrived in, each a `Uint8Array` of its own
/// (a file too big for one `ArrayBuffer` is never joined). Read by range
/// (`crate::loading::ByteSource`): only what is asked for is copied into WASM memory.
#[derive(Default)]
struct JsBytes {
    /// Each piece with the file offset it starts at.
    pieces: Vec<(usize, js_sys::Uint8Array)>,
    len: usize,
}

impl crate::loading::KeptChunks for JsBytes {
    type Chunk = js_sys::Uint8Array;

    /// A copy, in JS memory: the chunk's buffer goes back to be filled again.
    fn keep(&mut self, chunk: &js_sys::Uint8Array) -> bool {
        let Some(len) = self.len.checked_add(chunk.length() as usize) else { return false };
        self.pieces.push((self.len, js_sys::Uint8Array::new(chunk)));
        self.len = len;
        true
    }
}

impl crate::loading::ByteSource for JsBytes {
    fn len(&self) -> usize {
        self.len
    }

    fn read(&self, start: usize, out: &mut [u8]) {
        // The first piece that holds `start`, then on through the following ones.
        let first = self.pieces.partition_point(|(at, _)| *at <= start).saturating_sub(1);
        let (mut pos, mut done) = (start, 0);
        for (at, piece) in &self.pieces[first..] {
            if done == out.len() {
                break;
            }
            let from = pos - at;
            let n = (piece.length() as usize).saturating_sub(from).min(out.len() - done);
            piece.subarray(from as u32, (from + n) as u32).copy_to(&mut out[done..done + n]);
            done += n;
            pos += n;
        }
    }
}

impl crate::loading::Chunk for js_sys::Uint8Array {
    fn len(&self) -> usize {
        self.length() as usize
    }

    fn copy_to<'a>(&self, from: usize, into: &'a mut [std::mem::MaybeUninit<u8>]) -> &'a mut [u8] {
        self.subarray(from as u32, (from + into.len()) as u32).copy_to_uninit(into)
    }
}

/// A checkpoint as JS receives it, chunk by chunk (`crate::loading::StreamedCheckpoint`): each
/// safetensors tensor straight into its storage as its bytes arrive; a torch zip and an index
/// kept in JS memory until complete.
#[wasm_bindgen]
pub struct WasmWeights(crate::loading::StreamedCheckpoint<JsBytes>);

#[wasm_bindgen]
impl WasmWeights {
    /// The checkpoint whose weights are `weights_name` (default `model.safetensors`; also
    /// `pytorch_model.bin`, or a `*.index.json` whose shards come as files of their own).
    #[wasm_bindgen(constructor)]
    pub fn new(weights_name: Option<String>) -> Result<WasmWeights, JsError> {
        crate::loading::StreamedCheckpoint::new(weights_name.as_deref()).map(WasmWeights).map_err(js_error)
    }

    /// Starts a file: the weights file, or a shard by the name its index gives it; `size`, its
    /// length when known (a `File`'s), against which a header's ranges are checked.
    pub fn open(&mut self, file: String, size: Option<f64>) -> Result<(), JsError> {
        let size = size.filter(|s| s.is_finite() && *s >= 0.0 && *s <= usize::MAX as f64).map(|s| s as usize);
        self.0.open(&file, size).map_err(js_error)
    }

    /// The next chunk of `file` (opened): a file's chunks in order, files in any interleaving.
    pub fn push(&mut self, file: &str, chunk: &js_sys::Uint8Array) -> Result<(), JsError> {
        self.0.push(file, chunk).map_err(js_error)
    }
}

/// What `useGpu` chose: the adapter, and how it stores the matrices (a struct, as below).
#[cfg(feature = "webgpu")]
#[derive(serde::Serialize)]
struct GpuChoice {
    adapter: String,
    dtype: &'static str,
}

/// `encodeStep`'s answer (a struct: `serde_json::json!` objects would reach JS as `Map`s).
#[derive(serde::Serialize)]
struct EncodeProgress {
    encoded: usize,
    tiles: usize,
}

fn js_error(e: crate::Error) -> JsError {
    JsError::new(&e.to_string())
}

fn to_js<T: serde::Serialize>(value: &T) -> Result<JsValue, JsError> {
    serde_wasm_bindgen::to_value(value).map_err(|e| JsError::new(&format!("could not convert result to JS: {e}")))
}

/// A JS options object (`undefined`/`null`: none) as [`GenerationOptions`]: through JSON, since
/// serde_wasm_bindgen only looks up a struct's declared fields and would let a misspelt key pass.
fn generation_options(value: JsValue) -> Result<GenerationOptions, JsError> {
    if value.is_undefined() || value.is_null() {
        return Ok(GenerationOptions::default());
    }
    let json: serde_json::Value = serde_wasm_bindgen::from_value(value).map_err(|e| JsError::new(&format!("invalid options: {e}")))?;
    GenerationOptions::from_json(json).map_err(js_error)
}

/// The plan (crate::generation) for JS options.
fn plan(value: JsValue, captioner: &Captioner) -> Result<Plan, JsError> {
    captioner.plan(&generation_options(value)?).map_err(js_error)
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
struct JsGenerationDefaults {
    max_new_tokens: Option<usize>,
    num_beams: usize,
    num_return_sequences: usize,
    length_penalty: f32,
    early_stopping: serde_json::Value,
    do_sample: bool,
    temperature: Option<f32>,
    top_k: Option<usize>,
    top_p: Option<f32>,
    repetition_penalty: Option<f32>,
    no_repeat_ngram_size: Option<usize>,
    min_new_tokens: Option<usize>,
    bad_words_ids: Vec<Vec<u32>>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct JsProvisional {
    provisional: bool,
    text: String,
    token_ids: Vec<u32>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct JsBeamResult<'a> {
    text: String,
    token_ids: Vec<u32>,
    score: f32,
    sequences: &'a [JsHypothesis],
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
    /// An image part-way through the encoder (`startEncoding` … `encodeStep`).
    encoding: Option<crate::captioner::EncodeRun>,
}

#[wasm_bindgen]
impl WasmCaptioner {
    /// Builds a captioner from the bytes of the model folder's files and its weights, streamed
    /// into `weights` (`WasmWeights`: the weight file, or an index and its shards);
    /// `adapter_config` and `adapter_weights` (a PEFT LoRA folder's two files) are merged in when
    /// both are given. `chat_template` is the file `chat_template_name` names
    /// (`chat_template.jinja` or `chat_template.json`), if the folder has one.
    #[wasm_bindgen(constructor)]
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &[u8],
        weights: WasmWeights,
        tokenizer: &[u8],
        preprocessor: &[u8],
        generation: Option<Vec<u8>>,
        adapter_config: Option<Vec<u8>>,
        adapter_weights: Option<Vec<u8>>,
        chat_template_name: Option<String>,
        chat_template: Option<Vec<u8>>,
    ) -> Result<WasmCaptioner, JsError> {
        let chat_template = match (chat_template_name.as_deref(), chat_template.as_deref()) {
            (Some(name), Some(bytes)) => {
                let known = crate::loading::CHAT_TEMPLATE_FILES.iter().find(|&&n| n == name).copied();
                let name = known.ok_or_else(|| {
                    JsError::new(&format!("the chat template must be one of {}, not {name}", crate::loading::CHAT_TEMPLATE_FILES.join(", ")))
                })?;
                Some((name, bytes))
            }
            _ => None,
        };
        let adapter = match (&adapter_config, &adapter_weights) {
            (Some(config), Some(weights)) => Some(AdapterFiles { config, weights }),
            (None, None) => None,
            _ => return Err(JsError::new("a LoRA adapter needs both adapter_config.json and adapter_model.safetensors")),
        };
        let files = ModelFiles {
            config,
            weights: &[],
            weights_name: weights.0.name(),
            shards: &[],
            tokenizer,
            preprocessor,
            generation: generation.as_deref(),
            chat_template,
            adapter,
        };
        let inner = Captioner::from_files_with(files, |rename| weights.0.tensors(rename)).map_err(js_error)?;
        Ok(WasmCaptioner { inner, run: None, encoding: None })
    }

    /// Starts captioning encoded image bytes (PNG/JPEG); replaces any caption in progress. One
    /// sequence, streamed: greedy or sampling (beam settings, given or generation_config.json's,
    /// are for `beamSearch` and `captionMany`; `usesBeamSearch` says which the options ask for).
    pub fn start(&mut self, image: &[u8], options_js: JsValue) -> Result<(), JsError> {
        self.run = None;
        let options = plan(options_js, &self.inner)?.options;
        let pixels = self.inner.pixel_values_from_bytes(image).map_err(js_error)?;
        self.run = Some(self.inner.start(&pixels, &options).map_err(js_error)?);
        Ok(())
    }

    /// Starts captioning raw RGBA pixels (e.g. `ImageData.data`).
    #[wasm_bindgen(js_name = startRgba)]
    pub fn start_rgba(&mut self, rgba: &[u8], width: u32, height: u32, options_js: JsValue) -> Result<(), JsError> {
        self.run = None;
        let options = plan(options_js, &self.inner)?.options;
        let pixels = self.inner.pixel_values_from_rgba(rgba, width, height).map_err(js_error)?;
        self.run = Some(self.inner.start(&pixels, &options).map_err(js_error)?);
        Ok(())
    }

    /// Starts captioning encoded image bytes as `start` does, without running the encoder:
    /// `encodeStep` then encodes its tiles a few at a time (a split SmolVLM image has up to 17),
    /// so the caller can report progress and stop between tiles. Returns the number of tiles.
    #[wasm_bindgen(js_name = startEncoding)]
    pub fn start_encoding(&mut self, image: &[u8], options_js: JsValue) -> Result<usize, JsError> {
        self.abort();
        let options = plan(options_js, &self.inner)?.options;
        let pixels = self.inner.pixel_values_from_bytes(image).map_err(js_error)?;
        self.begin_encoding(&pixels, &options)
    }

    /// `startEncoding` for raw RGBA pixels.
    #[wasm_bindgen(js_name = startEncodingRgba)]
    pub fn start_encoding_rgba(&mut self, rgba: &[u8], width: u32, height: u32, options_js: JsValue) -> Result<usize, JsError> {
        self.abort();
        let options = plan(options_js, &self.inner)?.options;
        let pixels = self.inner.pixel_values_from_rgba(rgba, width, height).map_err(js_error)?;
        self.begin_encoding(&pixels, &options)
    }

    /// Encodes up to `tiles` more tiles (one batch) of the image `startEncoding` took; returns
    /// `{ encoded, tiles }`. Once all are encoded the caption is ready for `nextToken` (or
    /// `beamSearchEncoded`).
    #[wasm_bindgen(js_name = encodeStep)]
    pub fn encode_step(&mut self, tiles: usize) -> Result<JsValue, JsError> {
        let Some(run) = self.encoding.as_mut() else {
            return Err(JsError::new("generation: no image being encoded; call startEncoding() first"));
        };
        let encoded = self.inner.encode_step(run, tiles).map_err(js_error)?;
        self.encode_progress(encoded, false)
    }

    /// `encodeStep` that awaits the GPU where the encoder side runs there (`useGpu`): WebGPU's
    /// reads complete from the event loop. Without a GPU, the same as `encodeStep`. The caption
    /// it prepares is for the awaited steps (`nextTokenAsync`, `beamSearchEncodedAsync`),
    /// which decode on the GPU where the decoder is there.
    #[wasm_bindgen(js_name = encodeStepAsync)]
    pub async fn encode_step_async(&mut self, tiles: usize) -> Result<JsValue, JsError> {
        let Some(mut run) = self.encoding.take() else {
            return Err(JsError::new("generation: no image being encoded; call startEncoding() first"));
        };
        let encoded = self.inner.encode_step_async(&mut run, tiles).await;
        self.encoding = Some(run);
        self.encode_progress(encoded.map_err(js_error)?, true)
    }

    /// `{ encoded, tiles }` after an encoding step; the caption run once every tile is encoded
    /// (`awaited`: for the async steps).
    fn encode_progress(&mut self, encoded: usize, awaited: bool) -> Result<JsValue, JsError> {
        let tiles = self.encoding.as_ref().map_or(0, |run| run.tiles());
        if self.encoding.as_ref().is_some_and(|run| run.is_encoded()) {
            if let Some(run) = self.encoding.take() {
                let run = if awaited { self.inner.finish_encoding_awaited(run) } else { self.inner.finish_encoding(run) };
                self.run = Some(run.map_err(js_error)?);
            }
        }
        to_js(&EncodeProgress { encoded, tiles })
    }

    /// Moves the encoder side and the decoder (where the family has one for the GPU) to the GPU
    /// that WebGPU gives, their weights uploaded now, once; `encodeStepAsync` then encodes there
    /// and `nextTokenAsync` / `beamSearchEncodedAsync` decode there. `dtype`: how the matrices
    /// are stored, `'fp32'` (default) or `'fp16'` (where the adapter has `shader-f16`, else
    /// fp32). Returns `{ adapter, dtype }`: the adapter's name and backend, and the storage
    /// used. No adapter, or one short of a limit the kernels need, is an error (the caller
    /// falls back to WASM).
    #[cfg(feature = "webgpu")]
    #[wasm_bindgen(js_name = useGpu)]
    pub async fn use_gpu(&mut self, dtype: Option<String>) -> Result<JsValue, JsError> {
        use crate::gpu::GpuDtype;
        let wanted = match dtype.as_deref() {
            None | Some("fp32") => GpuDtype::F32,
            Some("fp16") => GpuDtype::F16,
            Some(other) => return Err(JsError::new(&format!("dtype must be 'fp32' or 'fp16', not {other:?}"))),
        };
        let mut gpu = crate::gpu::Gpu::new().await.map_err(js_error)?;
        if wanted == GpuDtype::F16 && gpu.has_f16() {
            gpu.store_weights_as(GpuDtype::F16).map_err(js_error)?;
        }
        let gpu = std::sync::Arc::new(gpu);
        self.inner.use_gpu(gpu.clone()).map_err(js_error)?;
        let dtype = if gpu.weights_dtype() == GpuDtype::F16 { "fp16" } else { "fp32" };
        to_js(&GpuChoice { adapter: gpu.adapter(), dtype })
    }

    /// Beam search over the image `startEncoding` … `encodeStep` encoded (options as
    /// `beamSearch`'s, the same ones the encoding started with); returns what `beamSearch` does.
    #[wasm_bindgen(js_name = beamSearchEncoded)]
    pub fn beam_search_encoded(&mut self, options_js: JsValue, on_provisional: Option<js_sys::Function>) -> Result<JsValue, JsError> {
        crate::captioner::ready(self.beam_search_encoded_async(options_js, on_provisional))
    }

    /// `beamSearchEncoded` over an image `encodeStepAsync` encoded, awaiting the GPU where the
    /// decoder runs there.
    #[wasm_bindgen(js_name = beamSearchEncodedAsync)]
    pub async fn beam_search_encoded_async(&mut self, options_js: JsValue, on_provisional: Option<js_sys::Function>) -> Result<JsValue, JsError> {
        let plan = plan(options_js, &self.inner)?;
        let beams = plan.beams.unwrap_or_else(|| BeamOptions { num_beams: 1, ..self.inner.default_beam_options() });
        let Some(run) = self.run.take() else {
            return Err(JsError::new("generation: no encoded image; call startEncoding() and encodeStep() first"));
        };
        let mut callback = Callback::new(on_provisional);
        let options = plan.options;
        let this = &*self;
        let all = this.inner.beam_search_run_async(run, &beams, |_, best| callback.call(|| this.provisional(&options, best), None)).await;
        let mut all = all.map_err(js_error)?;
        callback.result()?;
        to_js(&self.hypotheses(&options, all.pop().unwrap_or_default())?)
    }

    /// The next token as `{ id, text, delta }`, or `undefined` when the caption is complete.
    #[wasm_bindgen(js_name = nextToken)]
    pub fn next_token(&mut self) -> Result<JsValue, JsError> {
        crate::captioner::ready(self.next_token_async())
    }

    /// `nextToken`, awaiting the GPU where the caption decodes there (`encodeStepAsync`'s).
    #[wasm_bindgen(js_name = nextTokenAsync)]
    pub async fn next_token_async(&mut self) -> Result<JsValue, JsError> {
        let Some(mut run) = self.run.take() else {
            return Err(JsError::new("generation: no caption in progress; call start() first"));
        };
        match self.inner.next_token_async(&mut run).await {
            Ok(Some(event)) => {
                self.run = Some(run);
                to_js(&event)
            }
            Ok(None) => {
                self.run = Some(run);
                Ok(JsValue::UNDEFINED)
            }
            Err(e) => Err(js_error(e)),
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

    /// Quantizes the decoder's matrices in place, `"q8_0"` or `"q4_0"` (rows that are not a
    /// multiple of 32 stay f32), and the encoder side's to 8 bits, multiplied in 8 bits.
    /// Returns how many decoder matrices were quantized.
    pub fn quantize(&mut self, format: &str) -> Result<usize, JsError> {
        let dtype = crate::captioner::decoder_format(format)
            .ok_or_else(|| JsError::new(&format!("quantize: unknown weight format {format:?} (q8_0 or q4_0)")))?;
        self.run = None;
        let decoder = self.inner.quantize_decoder(dtype).map_err(js_error)?.0;
        self.inner.quantize_encoder().map_err(js_error)?;
        Ok(decoder)
    }

    /// Drops the caption in progress.
    pub fn abort(&mut self) {
        self.run = None;
        self.encoding = None;
    }

    /// The generation options `generation_config.json` sets, camelCase: `{ maxNewTokens?,
    /// numBeams, numReturnSequences, lengthPenalty, earlyStopping, doSample, temperature?, … }`.
    #[wasm_bindgen(js_name = generationDefaults)]
    pub fn generation_defaults(&self) -> Result<JsValue, JsError> {
        let g = self.inner.generation_defaults();
        let (s, b) = (&g.sampling, &g.beams);
        to_js(&JsGenerationDefaults {
            max_new_tokens: g.max_new_tokens,
            num_beams: b.num_beams,
            num_return_sequences: b.num_return_sequences,
            length_penalty: b.length_penalty,
            early_stopping: b.early_stopping.to_json(),
            do_sample: s.do_sample,
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            repetition_penalty: s.repetition_penalty,
            no_repeat_ngram_size: s.no_repeat_ngram_size,
            min_new_tokens: s.min_new_tokens,
            bad_words_ids: s.bad_words_ids.clone(),
        })
    }

    /// Whether `options` (with the model's generation_config.json) ask for beam search, as
    /// transformers' `generate()` decides: `num_beams` above 1. Invalid options throw.
    #[wasm_bindgen(js_name = usesBeamSearch)]
    pub fn uses_beam_search(&self, options_js: JsValue) -> Result<bool, JsError> {
        Ok(plan(options_js, &self.inner)?.beams.is_some())
    }

    /// Beam search over one image (PNG/JPEG bytes as a `Uint8Array`, or RGBA `{ data, width,
    /// height }`), as transformers' `generate(num_beams=…)`. Options: the generation options
    /// (crate::generation, camelCase; `doSample`: beam sampling); returns
    /// `[{ text, tokenIds, score }]`, best first.
    /// `onProvisional({ provisional: true, text, tokenIds })`, if given, is called after every
    /// step with the best running hypothesis (the final best may be another beam).
    #[wasm_bindgen(js_name = beamSearch)]
    pub fn beam_search(&mut self, image: JsValue, options_js: JsValue, on_provisional: Option<js_sys::Function>) -> Result<JsValue, JsError> {
        let plan = plan(options_js, &self.inner)?;
        // num_beams 1 (given, or the file's): the search of one beam, greedy decoding's result.
        let beams = plan.beams.unwrap_or_else(|| BeamOptions { num_beams: 1, ..self.inner.default_beam_options() });
        let options = plan.options;
        let pixels = self.pixels_of(&image, 0)?;
        let mut callback = Callback::new(on_provisional);
        let hypotheses = self
            .inner
            .beam_search_streaming(&pixels, &options, &beams, |best| callback.call(|| self.provisional(&options, best), None))
            .map_err(js_error)?;
        callback.result()?;
        to_js(&self.hypotheses(&options, hypotheses)?)
    }

    /// Captions several images at once: one encoder batch, decoded together (the same captions
    /// as one by one). `images`: an array of PNG/JPEG bytes (`Uint8Array`) or RGBA
    /// `{ data, width, height }`. Options: those of `start`, or those of `beamSearch` (beam
    /// search when `numBeams` or `numReturnSequences` is not 1). `onEvent(index, event)` gets
    /// each image's tokens `{ id, text, delta }` (beam search: `{ provisional: true, text,
    /// tokenIds }`). Returns one result per image: `{ text, tokenIds, timings }`, or for beam
    /// search `{ text, tokenIds, score, sequences }`.
    #[wasm_bindgen(js_name = captionMany)]
    pub fn caption_many(&mut self, images: js_sys::Array, options_js: JsValue, on_event: Option<js_sys::Function>) -> Result<JsValue, JsError> {
        crate::captioner::ready(self.caption_many_where(images, options_js, on_event, false))
    }

    /// `captionMany` awaiting the GPU: the images are encoded and decoded there where the model
    /// is (`useGpu`); without a GPU, the same as `captionMany`.
    #[wasm_bindgen(js_name = captionManyAsync)]
    pub async fn caption_many_async(
        &mut self,
        images: js_sys::Array,
        options_js: JsValue,
        on_event: Option<js_sys::Function>,
    ) -> Result<JsValue, JsError> {
        self.caption_many_where(images, options_js, on_event, true).await
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

impl WasmCaptioner {
    /// `captionMany`, its GPU reads awaited where `awaited` (else on the CPU in a browser).
    async fn caption_many_where(
        &mut self,
        images: js_sys::Array,
        options_js: JsValue,
        on_event: Option<js_sys::Function>,
        awaited: bool,
    ) -> Result<JsValue, JsError> {
        self.run = None;
        let Plan { options, beams } = plan(options_js, &self.inner)?;
        if images.length() == 0 {
            return Err(JsError::new("captionMany: no images"));
        }
        let pixels = images.iter().enumerate().map(|(i, image)| self.pixels_of(&image, i)).collect::<Result<Vec<_>, JsError>>()?;
        let batch = crate::preprocess::Pixels::cat(&pixels).map_err(|e| JsError::new(&format!("captionMany: {e}")))?;
        let mut callback = Callback::new(on_event);
        if let Some(beams) = beams {
            let all = self
                .inner
                .beam_search_many_where(&batch, &options, &beams, |i, best| callback.call(|| self.provisional(&options, best), Some(i)), awaited)
                .await
                .map_err(js_error)?;
            callback.result()?;
            let results = js_sys::Array::new();
            for hypotheses in all {
                let sequences = self.hypotheses(&options, hypotheses)?;
                let best = sequences.first().ok_or_else(|| JsError::new("beam search returned no hypothesis"))?;
                results.push(&to_js(&JsBeamResult {
                    text: best.text.clone(),
                    token_ids: best.token_ids.clone(),
                    score: best.score,
                    sequences: &sequences,
                })?);
            }
            return Ok(results.into());
        }
        // One beam: greedy or sampling.
        let captions =
            self.inner.caption_many_where(&batch, &options, |i, event| callback.call(|| to_js(event), Some(i)), awaited).await.map_err(js_error)?;
        callback.result()?;
        let results = js_sys::Array::new();
        for c in captions {
            results.push(&to_js(&JsCaption {
                text: c.text,
                token_ids: c.token_ids,
                timings: JsTimings { encoder_ms: c.encoder_ms, first_token_ms: c.first_token_ms, total_ms: c.total_ms, tokens_per_s: c.tokens_per_s },
            })?);
        }
        Ok(results.into())
    }

    fn provisional(&self, options: &crate::CaptionOptions, tokens: &[u32]) -> Result<JsValue, JsError> {
        let text = self.inner.caption_text(options, tokens).map_err(js_error)?;
        to_js(&JsProvisional { provisional: true, text, token_ids: tokens.to_vec() })
    }

    fn hypotheses(&self, options: &crate::CaptionOptions, hypotheses: Vec<crate::beam::Hypothesis>) -> Result<Vec<JsHypothesis>, JsError> {
        hypotheses
            .into_iter()
            .map(|h| {
                let text = self.inner.caption_text(options, &h.token_ids).map_err(js_error)?;
                Ok(JsHypothesis { text, token_ids: h.token_ids, score: h.score })
            })
            .collect()
    }

    fn begin_encoding(&mut self, pixels: &crate::preprocess::Pixels, options: &crate::CaptionOptions) -> Result<usize, JsError> {
        if pixels.len() != 1 {
            return Err(JsError::new("startEncoding takes one image"));
        }
        let run = self.inner.start_encoding(pixels, options).map_err(js_error)?;
        let tiles = run.tiles();
        self.encoding = Some(run);
        Ok(tiles)
    }

    /// Image `i` of `captionMany`: PNG/JPEG bytes or `{ data, width, height }` RGBA → pixel values.
    fn pixels_of(&self, image: &JsValue, i: usize) -> Result<crate::preprocess::Pixels, JsError> {
        if let Some(bytes) = image.dyn_ref::<js_sys::Uint8Array>() {
            return self.inner.pixel_values_from_bytes(&bytes.to_vec()).map_err(|e| JsError::new(&format!("image {i}: {e}")));
        }
        let get = |key: &str| js_sys::Reflect::get(image, &key.into()).ok();
        let data = get("data").and_then(|d| {
            d.dyn_into::<js_sys::Uint8Array>().ok().or_else(|| {
                // ImageData.data is a Uint8ClampedArray: the same bytes.
                js_sys::Reflect::get(image, &"data".into())
                    .ok()?
                    .dyn_into::<js_sys::Uint8ClampedArray>()
                    .ok()
                    .map(|c| js_sys::Uint8Array::new(&c.buffer()))
            })
        });
        let (width, height) = (get("width").and_then(|w| w.as_f64()), get("height").and_then(|h| h.as_f64()));
        match (data, width, height) {
            (Some(data), Some(w), Some(h)) => {
                self.inner.pixel_values_from_rgba(&data.to_vec(), w as u32, h as u32).map_err(|e| JsError::new(&format!("image {i}: {e}")))
            }
            _ => Err(JsError::new(&format!("image {i}: expected a Uint8Array of PNG/JPEG bytes or {{ data, width, height }} RGBA pixels"))),
        }
    }
}

/// A JS callback that the Rust side calls while it decodes; the first exception it throws (or
/// conversion error) is kept and reported when decoding is over.
struct Callback {
    f: Option<js_sys::Function>,
    error: Option<JsValue>,
}

impl Callback {
    fn new(f: Option<js_sys::Function>) -> Self {
        Self { f, error: None }
    }

    fn call(&mut self, event: impl FnOnce() -> Result<JsValue, JsError>, index: Option<usize>) {
        let Some(f) = &self.f else { return };
        if self.error.is_some() {
            return;
        }
        let outcome = event().map_err(JsValue::from).and_then(|event| match index {
            Some(i) => f.call2(&JsValue::NULL, &JsValue::from_f64(i as f64), &event),
            None => f.call1(&JsValue::NULL, &event),
        });
        if let Err(e) = outcome {
            self.error = Some(e);
        }
    }

    fn result(self) -> Result<(), JsError> {
        match self.error {
            Some(e) => Err(JsError::new(&format!("the event callback threw: {}", e.as_string().unwrap_or_else(|| format!("{e:?}"))))),
            None => Ok(()),
        }
    }
}

/// `tokenizer.json` made from GPT-2's `vocab.json` and `merges.txt` (+ `tokenizer_config.json`,
/// `special_tokens_map.json` when the folder has them), for folders that ship no tokenizer.json.
#[wasm_bindgen(js_name = gpt2TokenizerJson)]
pub fn gpt2_tokenizer_json(
    vocab: &[u8],
    merges: &[u8],
    tokenizer_config: Option<Vec<u8>>,
    special_tokens_map: Option<Vec<u8>>,
) -> Result<Vec<u8>, JsError> {
    crate::tokenizer::gpt2_tokenizer_json(vocab, merges, tokenizer_config.as_deref(), special_tokens_map.as_deref()).map_err(js_error)
}

/// `tokenizer.json` made from BERT's `vocab.txt` (+ `tokenizer_config.json`,
/// `special_tokens_map.json`), for folders that ship no tokenizer.json (older BLIP folders).
#[wasm_bindgen(js_name = bertTokenizerJson)]
pub fn bert_tokenizer_json(vocab: &[u8], tokenizer_config: Option<Vec<u8>>, special_tokens_map: Option<Vec<u8>>) -> Result<Vec<u8>, JsError> {
    crate::tokenizer::bert_tokenizer_json(vocab, tokenizer_config.as_deref(), special_tokens_map.as_deref()).map_err(js_error)
}

/// Benchmark: streaming-read speed of WASM memory in GB/s over a buffer of `bytes` (see
/// `bench::memory_read_gbps`), the floor under a decode step's time.
#[cfg(feature = "bench")]
#[wasm_bindgen(js_name = benchMemory)]
pub fn bench_memory(bytes: usize, repeats: usize) -> f64 {
    crate::bench::memory_read_gbps(bytes, repeats)
}

/// Benchmark: one product in each form a weight takes (f32, f16, bf16 and 8-bit; packed for many
/// rows, the matrix–vector kernels for a few), as JSON (see `bench::gemm_report`).
#[cfg(feature = "bench")]
#[wasm_bindgen(js_name = benchGemm)]
pub fn bench_gemm(rows: usize, in_dim: usize, out_dim: usize, repeats: usize) -> Result<String, JsError> {
    Ok(crate::bench::gemm_report(rows, in_dim, out_dim, repeats).map_err(js_error)?.to_string())
}

/// The threaded build's pool (wasm-bindgen-rayon): `await initThreadPool(n)` from a worker of a
/// crossOriginIsolated page, then `setThreads(n)`.
#[cfg(feature = "threads")]
pub use wasm_bindgen_rayon::init_thread_pool;

/// Traps this instance on purpose (`unreachable`), as a bug or a failed memory grow would: for the
/// tests of the JS package's recovery (a fresh worker, the model reloaded). Not part of the API.
#[wasm_bindgen(js_name = trapForTesting)]
pub fn trap_for_testing() {
    core::arch::wasm32::unreachable()
}

/// The size of this instance's WASM memory in bytes. WASM memory never shrinks, so this is the
/// peak so far (the JS package reports it after loading: `captioner.memoryBytes`).
#[wasm_bindgen(js_name = memoryBytes)]
pub fn memory_bytes() -> f64 {
    wasm_bindgen::memory()
        .dyn_into::<js_sys::WebAssembly::Memory>()
        // An ArrayBuffer, or a SharedArrayBuffer in the threaded build: both have byteLength.
        .map(|m| js_sys::Reflect::get(&m.buffer(), &"byteLength".into()).ok().and_then(|v| v.as_f64()).unwrap_or(0.0))
        .unwrap_or(0.0)
}

/// Lets the encoder use the relaxed-SIMD (fused multiply-add) GEMM kernel where the browser has
/// relaxed SIMD (the default), or not: to compare the two. Returns the kernel now in use on
/// this thread.
#[wasm_bindgen(js_name = allowRelaxedSimd)]
pub fn allow_relaxed_simd(allow: bool) -> String {
    crate::models::packed::allow_relaxed_simd(allow);
    crate::models::packed::kernel_name().to_string()
}

/// Whether this is the threaded build.
#[wasm_bindgen(js_name = threadsAvailable)]
pub fn threads_available() -> bool {
    crate::parallel::AVAILABLE
}

/// How many parts the encoder, GEMMs and matrix–vector products are split into (after
/// `initThreadPool`); more than 1 is refused by the single-threaded build. Returns the count.
#[wasm_bindgen(js_name = setThreads)]
pub fn set_threads(n: usize) -> Result<usize, JsError> {
    crate::parallel::set_threads(n).map_err(|e| JsError::new(&e))
}

/// Benchmark: the model `config_json` describes, with random weights; `repeats` captions of
/// `new_tokens` tokens (after `prompt_tokens` text positions in a prefix model). Returns medians
/// (see `bench::BenchReport`).

#[cfg(feature = "bench")]
#[wasm_bindgen(js_name = benchModel)]
pub fn bench_model(
    config_json: &str,
    prompt_tokens: usize,
    new_tokens: usize,
    repeats: usize,
    images: Option<usize>,
    beams: Option<usize>,
    quantize: Option<String>,
    tiles: Option<usize>,
) -> Result<JsValue, JsError> {
    let mut shape =
        crate::bench::BenchShape { images: images.unwrap_or(1), beams: beams.unwrap_or(1), tiles: tiles.unwrap_or(1), ..Default::default() };
    if let Some(other) = quantize.filter(|w| !shape.set_weights(w)) {
        return Err(JsError::new(&format!("benchModel: unknown weight format {other} (f32, f16, bf16, q8_0, q4_0)")));
    }
    let report = crate::bench::bench_model_shaped(config_json, prompt_tokens, new_tokens, repeats, shape).map_err(js_error)?;
    to_js(&report)
}
