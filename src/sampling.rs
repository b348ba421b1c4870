//! Logits processors and warpers as 🤗 transformers' `generation/logits_process.py`, applied in
//! the order `generate` composes them, and a seeded sampler.
//!
//! Each works on one row of scores (`f32`, `-inf` = banned) given the ids the model has seen so
//! far — for a VisionEncoderDecoder the start token and the generated ones, for a prefix model
//! the prompt (image positions included) and the generated ones, as `input_ids` is in transformers.

use crate::error::{Error, Result};

/// Sampling and processor settings, named as `generate`'s arguments.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SamplingOptions {
    pub do_sample: bool,
    pub temperature: Option<f32>,
    /// Unset means transformers' default, 50; 0 turns top-k off.
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub no_repeat_ngram_size: Option<usize>,
    pub min_new_tokens: Option<usize>,
    pub bad_words_ids: Vec<Vec<u32>>,
    pub seed: Option<u64>,
}

impl SamplingOptions {
    /// Refuses what transformers refuses (or would silently misbehave on).
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Generation(msg));
        if let Some(t) = self.temperature {
            if !(t.is_finite() && t > 0.0) {
                return bad(format!("temperature must be a strictly positive number, got {t}"));
            }
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return bad(format!("top_p must be in (0, 1], got {p}"));
            }
        }
        if let Some(r) = self.repetition_penalty {
            if !(r.is_finite() && r > 0.0) {
                return bad(format!("repetition_penalty must be a strictly positive number, got {r}"));
            }
        }
        if self.no_repeat_ngram_size == Some(0) {
            return bad("no_repeat_ngram_size must be at least 1".into());
        }
        if self.bad_words_ids.iter().any(|w| w.is_empty()) {
            return bad("bad_words_ids must not contain an empty sequence".into());
        }
        Ok(())
    }
}

// transformers RepetitionPenaltyLogitsProcessor: each seen id's score is divided by the penalty
// when positive and multiplied when negative.
pub fn repetition_penalty(scores: &mut [f32], seen: &[u32], penalty: f32) {
    let mut done = vec![false; scores.len()];
    for &id in seen {
        let i = id as usize;
        if let (Some(s), Some(d)) = (scores.get_mut(i), done.get_mut(i)) {
            if !*d {
                *s = if *s < 0.0 { *s * penalty } else { *s / penalty };
                *d = true;
            }
        }
    }
}

// transformers NoRepeatNGramLogitsProcessor: ban every token that would complete an n-gram
// already present in `seen`.
pub fn no_repeat_ngram(scores: &mut [f32], seen: &[u32], n: usize) {
    if n == 0 || seen.len() + 1 < n {
        return;
    }
    let prefix = &seen[seen.len() + 1 - n..];
    for window in seen.windows(n) {
        if &window[..n - 1] == prefix {
            if let Some(s) = scores.get_mut(window[n - 1] as usize) {
                *s = f32::NEG_INFINITY;
            }
        }
    }
}

// transformers NoBadWordsLogitsProcessor (sequences equal to [eos] are dropped, as it does).
pub fn no_bad_words(scores: &mut [f32], seen: &[u32], bad_words: &[Vec<u32>], eos: &[u32]) {
    for word in bad_words {
        if word.len() == 1 && eos.contains(&word[0]) {
            continue;
        }
        let Some((&last, prefix)) = word.split_last() else {
            continue;
        };
        if seen.ends_with(prefix) {
            if let Some(s) = scores.get_mut(last as usize) {
                *s = f32::NEG_INFINITY;
            }
        }
    }
}

// transformers MinNewTokensLengthLogitsProcessor: no EOS before `min_new` new tokens.
pub fn min_new_tokens(scores: &mut [f32], generated: usize, min_new: usize, eos: &[u32]) {
    if generated < min_new {
        for &e in eos {
            if let Some(s) = scores.get_mut(e as usize) {
                *s = f32::NEG_INFINITY;
            }
        }
    }
}

// transformers TemperatureLogitsWarper
pub fn temperature(scores: &mut [f32], t: f32) {
    scores.iter_mut().for_each(|s| *s /= t);
}

// transformers TopKLogitsWarper: keep scores ≥ the k-th largest (ties at the threshold stay);
// at least `min_keep` tokens.
pub fn top_k(scores: &mut [f32], k: usize, min_keep: usize) {
    let k = k.max(min_keep).max(1).min(scores.len());
    if k == scores.len() {
        return;
    }
    let mut sorted = scores.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let threshold = sorted[k - 1];
    scores.iter_mut().filter(|s| **s < threshold).for_each(|s| *s = f32::NEG_INFINITY);
}

// transformers TopPLogitsWarper: sort ascending, drop the prefix whose cumulative probability is
// ≤ 1 − top_p, always keeping the `min_keep` most probable tokens.
pub fn top_p(scores: &mut [f32], p: f32, min_keep: usize) {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    // torch.sort is stable here only in effect; ascending by value, ties by index.
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    let sorted: Vec<f32> = order.iter().map(|&i| scores[i]).collect();
    let probs = softmax(&sorted);
    let mut cumulative = 0f32;
    // transformers compares the f32 cumulative sums with 1 − top_p computed in double.
    let threshold = (1.0 - p as f64) as f32;
    let kept_at_end = order.len().saturating_sub(min_keep.max(1));
    let mut remove = Vec::new();
    for (rank, (&i, &prob)) in order.iter().zip(&probs).enumerate() {
        cumulative += prob;
        if cumulative <= threshold && rank < kept_at_end {
            remove.push(i);
        }
    }
    for i in remove {
        scores[i] = f32::NEG_INFINITY;
    }
}

pub fn softmax(xs: &[f32]) -> Vec<f32> {
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = xs.iter().map(|&x| (x - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

/// All processors then warpers, in `generate`'s order, on one row of scores.
pub fn process(scores: &mut [f32], seen: &[u32], generated: usize, eos: &[u32], o: &SamplingOptions) {
    if let Some(p) = o.repetition_penalty.filter(|&p| p != 1.0) {
        repetition_penalty(scores, seen, p);
    }
    if let Some(n) = o.no_repeat_ngram_size {
        no_repeat_ngram(scores, seen, n);
    }
    if !o.bad_words_ids.is_empty() {
        no_bad_words(scores, seen, &o.bad_words_ids, eos);
    }
    if let Some(m) = o.min_new_tokens {
        min_new_tokens(scores, generated, m, eos);
    }
    if o.do_sample {
        if let Some(t) = o.temperature.filter(|&t| t != 1.0) {
            temperature(scores, t);
        }
        // generate's defaults fill an unset top_k with 50.
        let k = o.top_k.unwrap_or(50);
        if k != 0 {
            top_k(scores, k, 1);
        }
        if let Some(p) = o.top_p.filter(|&p| p < 1.0) {
            top_p(scores, p, 1);
        }
    }
}

/// The sampler's generator: the crate's one seeded generator (`crate::rng`), seeded per image.
#[derive(Debug, Clone)]
pub struct Rng(crate::rng::SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(crate::rng::SplitMix64::new(seed))
    }

    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        self.0.next_f32()
    }

    /// An index drawn with probability softmax(scores) (`-inf` never drawn).
    pub fn sample(&mut self, scores: &[f32]) -> Result<u32> {
        let probs = softmax(scores);
        if probs.iter().any(|p| p.is_nan()) {
            return Err(Error::Compute("every token is banned: nothing to sample".into()));
        }
        let r = self.next_f32();
        let mut cumulative = 0f32;
        let mut last_allowed = None;
        for (i, &p) in probs.iter().enumerate() {
            if p > 0.0 {
                cumulative += p;
                last_allowed = Some(i);
                if r < cumulative {
                    return Ok(i as u32);
                }
            }
        }
        last_allowed.map(|i| i as u32).ok_or_else(|| Error::Compute("nothing to sample".into()))
    }
}
