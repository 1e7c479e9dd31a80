//! A mixture of conditionals decoded as one model.
//!
//! A next item follows more than one context: the whole history says who the user is,
//! and each recent item alone says what people take after it (what transition counts
//! measure). [`MixtureSource`] asks one decoder the same request under several prompts
//! and decodes the mixture `p(sid) = Σ_m λ_m p(sid | prompt_m)` exactly, token by token:
//! the next-token distribution of a prefix is `Σ_m w_m p(token | prompt_m, prefix)` with
//! posterior weights `w_m ∝ λ_m p(prefix | prompt_m)`. So a beam's score after the last
//! SID token is the mixture's log-probability of that item, and beam search over the
//! trie needs no change.

use super::{logsumexp, DecodeError, LogitSource};

/// One conditional: a source, the prompt it is asked under, its prior weight.
pub struct Component<'a> {
    pub source: Box<dyn LogitSource + 'a>,
    /// Token ids; what the search passes to [`LogitSource::prefill`] is appended.
    pub prompt: Vec<u32>,
    /// Prior weight λ (positive; the weights need not sum to one).
    pub weight: f32,
}

/// Several [`Component`]s as one [`LogitSource`] whose rows are the mixture's
/// log-probabilities (already normalised).
pub struct MixtureSource<'a> {
    parts: Vec<Component<'a>>,
    vocab: usize,
    /// Per component: `log λ_m` with the weights normalised.
    log_prior: Vec<f32>,
    /// Per component, per live row: `log λ_m + log p_m(prefix)`.
    prefix: Vec<Vec<f32>>,
    /// Per component: the log-softmax rows of the last call (`rows × vocab`).
    last: Vec<Vec<f32>>,
}

impl<'a> MixtureSource<'a> {
    /// Errors when there is no component, a weight is not positive and finite, or the
    /// sources disagree on the vocabulary.
    pub fn new(parts: Vec<Component<'a>>) -> Result<Self, DecodeError> {
        let Some(first) = parts.first() else {
            return Err(DecodeError::Invalid("a mixture needs a component".into()));
        };
        let vocab = first.source.vocab_size();
        for p in &parts {
            if !(p.weight.is_finite() && p.weight > 0.0) {
                return Err(DecodeError::Invalid(format!(
                    "mixture weight {} is not positive",
                    p.weight
                )));
            }
            if p.source.vocab_size() != vocab {
                return Err(DecodeError::Invalid(
                    "mixture components have different vocabularies".into(),
                ));
            }
        }
        let total: f32 = parts.iter().map(|p| p.weight).sum();
        let log_prior: Vec<f32> = parts.iter().map(|p| (p.weight / total).ln()).collect();
        Ok(MixtureSource {
            prefix: log_prior.iter().map(|&l| vec![l]).collect(),
            last: vec![Vec::new(); parts.len()],
            parts,
            vocab,
            log_prior,
        })
    }

    /// Stores each component's log-softmax rows and returns the mixture's rows.
    fn mix(&mut self, logits: Vec<Vec<f32>>) -> Vec<f32> {
        let v = self.vocab;
        let rows = self.prefix[0].len();
        for (m, mut l) in logits.into_iter().enumerate() {
            for row in l.chunks_mut(v) {
                let lse = logsumexp(row);
                if lse.is_finite() {
                    row.iter_mut().for_each(|x| *x -= lse);
                } else {
                    // A component with no mass after this prefix (a memory whose items
                    // lie elsewhere): zero probability for every token, not NaN.
                    row.fill(f32::NEG_INFINITY);
                }
            }
            self.last[m] = l;
        }
        let mut out = vec![0f32; rows * v];
        let mut logw = vec![0f32; self.parts.len()];
        for r in 0..rows {
            // Log posterior weights of the components given the row's prefix.
            let norm = logsumexp(&self.prefix.iter().map(|p| p[r]).collect::<Vec<_>>());
            for (m, lw) in logw.iter_mut().enumerate() {
                *lw = self.prefix[m][r] - norm;
            }
            for (t, o) in out[r * v..(r + 1) * v].iter_mut().enumerate() {
                // log Σ_m w_m p_m(t), with the largest term factored out: a token every
                // component finds unlikely keeps a finite score.
                let term = |m: usize| logw[m] + self.last[m][r * v + t];
                let max = (0..logw.len()).map(term).fold(f32::NEG_INFINITY, f32::max);
                *o = if max.is_finite() {
                    max + (0..logw.len())
                        .map(|m| (term(m) - max).exp())
                        .sum::<f32>()
                        .ln()
                } else {
                    max
                };
            }
        }
        out
    }
}

impl LogitSource for MixtureSource<'_> {
    fn prefill(&mut self, prompt: &[u32]) -> Result<Vec<f32>, DecodeError> {
        let mut logits = Vec::with_capacity(self.parts.len());
        for (m, part) in self.parts.iter_mut().enumerate() {
            let full: Vec<u32> = part.prompt.iter().chain(prompt).copied().collect();
            logits.push(part.source.prefill(&full)?);
            self.prefix[m] = vec![self.log_prior[m]];
        }
        Ok(self.mix(logits))
    }

    fn extend(&mut self, parents: &[u32], tokens: &[u32]) -> Result<Vec<f32>, DecodeError> {
        let v = self.vocab;
        let rows = self.prefix[0].len();
        for (m, prefix) in self.prefix.iter_mut().enumerate() {
            let mut next = Vec::with_capacity(parents.len());
            for (&p, &t) in parents.iter().zip(tokens) {
                let (p, t) = (p as usize, t as usize);
                if p >= rows || t >= v {
                    return Err(DecodeError::Invalid(format!(
                        "row {p} or token {t} out of range ({rows} rows, vocabulary {v})"
                    )));
                }
                next.push(prefix[p] + self.last[m][p * v + t]);
            }
            *prefix = next;
        }
        let mut logits = Vec::with_capacity(self.parts.len());
        for part in &mut self.parts {
            logits.push(part.source.extend(parents, tokens)?);
        }
        Ok(self.mix(logits))
    }

    fn vocab_size(&self) -> usize {
        self.vocab
    }
}
