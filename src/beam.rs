//! Beam search bookkeeping, step for step as 🤗 transformers' `_beam_search` (generation/utils.py,
//! the vectorised version of 4.5x/5.x): top-`max(2, 1 + n_eos)·num_beams` continuations of all
//! running beams, the best `num_beams` unfinished ones keep running, finished candidates among the
//! first `num_beams` enter the finished set with score Σ log p / generated_len^length_penalty, and
//! the same early-stopping heuristic decides when to stop. No model here: the caller feeds the
//! log-probabilities of each running beam and reorders its caches by the returned parents.

use crate::error::{Error, Result};

/// transformers' `early_stopping`: `True`, `False` (a heuristic) or `"never"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EarlyStopping {
    Stop,
    #[default]
    Heuristic,
    Never,
}

impl EarlyStopping {
    /// transformers' JSON spelling (`generation_config.json`, JS options): `true`, `false` or
    /// `"never"`; anything else is `None`.
    pub fn from_json(value: &serde_json::Value) -> Option<Self> {
        match value {
            serde_json::Value::Bool(true) => Some(EarlyStopping::Stop),
            serde_json::Value::Bool(false) => Some(EarlyStopping::Heuristic),
            serde_json::Value::String(s) if s == "never" => Some(EarlyStopping::Never),
            _ => None,
        }
    }

    pub fn to_json(self) -> serde_json::Value {
        match self {
            EarlyStopping::Stop => true.into(),
            EarlyStopping::Heuristic => false.into(),
            EarlyStopping::Never => "never".into(),
        }
    }
}

// transformers marks impossible candidates by adding -1e9 in f32; so do we, so that ties and
// orderings come out the same.
const IMPOSSIBLE: f32 = -1.0e9;

#[derive(Debug, Clone)]
pub struct BeamSearch {
    num_beams: usize,
    beams_to_keep: usize,
    length_penalty: f32,
    early_stopping: EarlyStopping,
    max_new_tokens: usize,
    eos: Vec<u32>,
    running: Vec<Vec<u32>>,
    running_scores: Vec<f32>,
    finished: Vec<Vec<u32>>,
    finished_scores: Vec<f32>,
    finished_flags: Vec<bool>,
    heuristic_unsatisfied: bool,
    generated: usize,
    done: bool,
}

/// A finished hypothesis: its new tokens (EOS included when it ended on one) and its score.
#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    pub token_ids: Vec<u32>,
    pub score: f32,
}

/// Indices of the `k` largest values, largest first; ties go to the lower index.
fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let order = |a: &usize, b: &usize| values[*b].total_cmp(&values[*a]).then(a.cmp(b));
    let mut idx: Vec<usize> = (0..values.len()).collect();
    if k < idx.len() {
        idx.select_nth_unstable_by(k, order);
        idx.truncate(k);
    }
    idx.sort_by(order);
    idx
}

/// log_softmax in f32, as `torch.nn.functional.log_softmax` computes it: x − max − log Σ exp(x − max).
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|&x| (x - max).exp()).sum();
    let log_sum = sum.ln();
    logits.iter().map(|&x| x - max - log_sum).collect()
}

impl BeamSearch {
    pub fn new(num_beams: usize, length_penalty: f32, early_stopping: EarlyStopping, max_new_tokens: usize, eos: Vec<u32>) -> Result<Self> {
        if num_beams == 0 {
            return Err(Error::Generation("num_beams must be at least 1".into()));
        }
        let beams_to_keep = 2.max(1 + eos.len()) * num_beams;
        let mut running_scores = vec![IMPOSSIBLE; num_beams];
        running_scores[0] = 0.0;
        Ok(Self {
            num_beams,
            beams_to_keep,
            length_penalty,
            early_stopping,
            max_new_tokens,
            eos,
            running: vec![Vec::new(); num_beams],
            running_scores,
            finished: vec![Vec::new(); num_beams],
            finished_scores: vec![IMPOSSIBLE; num_beams],
            finished_flags: vec![false; num_beams],
            heuristic_unsatisfied: true,
            generated: 0,
            done: max_new_tokens == 0,
        })
    }

    pub fn num_beams(&self) -> usize {
        self.num_beams
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The running beams' tokens (beam 0 is the best running one).
    pub fn running(&self) -> &[Vec<u32>] {
        &self.running
    }

    /// One step: `log_probs[i]` are the next-token log-probabilities of running beam `i`
    /// (processors applied). Returns, for each new running beam, the index of the running beam
    /// it continues — reorder the model caches by it.
    pub fn step(&mut self, log_probs: &[Vec<f32>]) -> Result<Vec<usize>> {
        self.step_with(log_probs, None)
    }

    /// [`BeamSearch::step`] for beam sampling (`do_sample` with beams): the candidates are drawn
    /// without replacement from softmax(accumulated scores), then ordered best first, as
    /// transformers' `_get_top_k_continuations` does (with our generator, so not its draws).
    pub fn step_sampled(&mut self, log_probs: &[Vec<f32>], rng: &mut crate::sampling::Rng) -> Result<Vec<usize>> {
        self.step_with(log_probs, Some(rng))
    }

    fn step_with(&mut self, log_probs: &[Vec<f32>], rng: Option<&mut crate::sampling::Rng>) -> Result<Vec<usize>> {
        if self.done {
            return Err(Error::Generation("beam search already finished".into()));
        }
        if log_probs.len() != self.num_beams {
            return Err(Error::Generation(format!("{} beams of log-probabilities for {} beams", log_probs.len(), self.num_beams)));
        }
        let vocab = log_probs[0].len();
        if vocab == 0 || log_probs.iter().any(|l| l.len() != vocab) {
            return Err(Error::Generation("log-probabilities of unequal or zero length".into()));
        }
        let accumulated: Vec<f32> = log_probs.iter().zip(&self.running_scores).flat_map(|(lp, &score)| lp.iter().map(move |&x| x + score)).collect();
        let candidates = match rng {
            None => top_k(&accumulated, self.beams_to_keep),
            Some(rng) => {
                let open = accumulated.iter().filter(|x| x.is_finite()).count();
                if open < self.beams_to_keep {
                    return Err(Error::Generation(format!(
                        "beam sampling draws {} candidates per step, but the logits processors (top_k, top_p, bad words) leave only {open}",
                        self.beams_to_keep
                    )));
                }
                let mut scores = accumulated.clone();
                let mut picked = Vec::with_capacity(self.beams_to_keep);
                for _ in 0..self.beams_to_keep {
                    let i = rng.sample(&scores)? as usize;
                    picked.push(i);
                    scores[i] = f32::NEG_INFINITY;
                }
                picked.sort_by(|a, b| accumulated[*b].total_cmp(&accumulated[*a]).then(a.cmp(b)));
                picked
            }
        };
        let new_len = self.generated + 1;
        let cand: Vec<(usize, u32, f32, bool)> = candidates
            .iter()
            .map(|&i| {
                let (parent, token) = (i / vocab, (i % vocab) as u32);
                let hits = self.eos.contains(&token) || new_len >= self.max_new_tokens;
                (parent, token, accumulated[i], hits)
            })
            .collect();
        let sequence = |&(parent, token, ..): &(usize, u32, f32, bool)| {
            let mut s = self.running[parent].clone();
            s.push(token);
            s
        };

        // The best unfinished candidates keep running.
        let running_scores: Vec<f32> = cand.iter().map(|&(_, _, s, hits)| if hits { s + IMPOSSIBLE } else { s }).collect();
        let next = top_k(&running_scores, self.num_beams);
        let parents: Vec<usize> = next.iter().map(|&j| cand[j].0).collect();
        let new_running: Vec<Vec<u32>> = next.iter().map(|&j| sequence(&cand[j])).collect();
        let new_running_scores: Vec<f32> = next.iter().map(|&j| running_scores[j]).collect();

        // Finished candidates among the first num_beams join the finished set.
        let norm = (new_len as f64).powf(self.length_penalty as f64) as f32;
        let all_finished_and_stop = self.finished_flags.iter().all(|&f| f) && self.early_stopping == EarlyStopping::Stop;
        let mut merged_scores = self.finished_scores.clone();
        let mut merged_flags = self.finished_flags.clone();
        for (j, &(_, _, s, hits)) in cand.iter().enumerate() {
            let just_finished = hits && j < self.num_beams;
            let mut score = s / norm;
            if all_finished_and_stop {
                score += IMPOSSIBLE;
            }
            if !self.heuristic_unsatisfied {
                score += IMPOSSIBLE;
            }
            if !just_finished {
                score += IMPOSSIBLE;
            }
            merged_scores.push(score);
            merged_flags.push(just_finished);
        }
        let best = top_k(&merged_scores, self.num_beams);
        let old_finished = std::mem::take(&mut self.finished);
        self.finished =
            best.iter().map(|&m| if m < self.num_beams { old_finished[m].clone() } else { sequence(&cand[m - self.num_beams]) }).collect();
        self.finished_scores = best.iter().map(|&m| merged_scores[m]).collect();
        self.finished_flags = best.iter().map(|&m| merged_flags[m]).collect();

        self.running = new_running;
        self.running_scores = new_running_scores;
        self.generated = new_len;

        // transformers' _check_early_stop_heuristic, then _beam_search_has_unfinished_sequences.
        let best_length = if self.early_stopping == EarlyStopping::Never && self.length_penalty > 0.0 { self.max_new_tokens } else { self.generated };
        let best_possible = self.running_scores[0] / (best_length as f64).powf(self.length_penalty as f64) as f32;
        let min_finished = self.finished_scores.iter().copied().fold(f32::INFINITY, f32::min);
        let improvable = self.finished_flags.iter().any(|&f| best_possible > if f { min_finished } else { IMPOSSIBLE });
        self.heuristic_unsatisfied &= improvable;
        let exists_open_beam = !(self.finished_flags.iter().all(|&f| f) && self.early_stopping == EarlyStopping::Stop);
        let valid_continuations = !cand.iter().all(|c| c.3);
        self.done = !(self.heuristic_unsatisfied && exists_open_beam && valid_continuations);
        Ok(parents)
    }

    /// The best `n` finished hypotheses, best first (call once done).
    pub fn results(&self, n: usize) -> Vec<Hypothesis> {
        self.finished.iter().zip(&self.finished_scores).take(n).map(|(t, &score)| Hypothesis { token_ids: t.clone(), score }).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_best_two_step_sequence_not_the_greedy_one() {
        // Greedy takes token 0 (p .6) then p .5; beam search finds token 1 (p .4) then p 1.0.
        let lp = |p: &[f32]| p.iter().map(|x| x.ln()).collect::<Vec<_>>();
        let mut search = BeamSearch::new(2, 1.0, EarlyStopping::Heuristic, 2, vec![]).unwrap();
        let first = lp(&[0.6, 0.4, 1e-9]);
        search.step(&[first.clone(), first]).unwrap();
        assert_eq!(search.running(), &[vec![0], vec![1]]);
        search.step(&[lp(&[0.5, 0.5, 1e-9]), lp(&[1.0 - 2e-9, 1e-9, 1e-9])]).unwrap();
        assert!(search.is_done());
        let best = &search.results(1)[0];
        assert_eq!(best.token_ids, vec![1, 0]);
        assert!((best.score - 0.4f32.ln() / 2.0).abs() < 1e-5);
    }
}
