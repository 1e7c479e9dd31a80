//! The decoder as a [`LogitSource`]: what beam search and generation call.

use super::*;

/// [`LogitSource`] over the decoder with a KV cache: the prompt is prefilled once, and
/// the cache is reordered (forked, dropped) per step as beams move.
pub struct ModelSource<'a> {
    model: &'a Llama,
    cache: KvCache,
    /// Soft-prompt vectors read at the prompt's last position.
    vectors: soft::InputVectors,
    /// Where the prompt's prefix may already be computed.
    prefix: Option<&'a PrefixCache>,
    /// Where passes are shared with other requests of the same model.
    batcher: Option<&'a Batcher>,
}

impl<'a> ModelSource<'a> {
    pub fn new(model: &'a Llama) -> Self {
        Self::with_vectors(model, Vec::new())
    }

    /// A source whose prompt also carries soft-prompt vectors (at its last token, where
    /// training put them).
    pub fn with_vectors(model: &'a Llama, vectors: soft::InputVectors) -> Self {
        ModelSource {
            model,
            cache: KvCache::new(model.config()),
            vectors,
            prefix: None,
            batcher: None,
        }
    }

    /// Forward passes are shared with the other requests using `batcher` (same answers).
    pub fn with_batcher(mut self, batcher: Option<&'a Batcher>) -> Self {
        self.batcher = batcher;
        self
    }

    /// Runs `ids` (`rows × t`) on `cache`: alone, or through the batcher.
    fn run(
        &self,
        ids: &[u32],
        rows: usize,
        mut cache: KvCache,
        soft: Option<crate::model::soft_prompt::SoftInputs>,
    ) -> std::result::Result<(KvCache, Vec<f32>), DecodeError> {
        if let Some(b) = self.batcher {
            let (cache, logits) = b.run(self.model, ids.to_vec(), rows, cache, soft);
            return Ok((cache, logits.map_err(DecodeError::Pass)?));
        }
        let t = ids.len() / rows;
        let ids = Tensor::from_slice(ids, (rows, t), &Device::Cpu)?;
        let logits = self
            .model
            .forward_cached_last_soft(&ids, &mut cache, soft.as_ref())?;
        Ok((cache, logits.flatten_all()?.to_vec1::<f32>()?))
    }

    /// Prompts start from the longest prefix `cache` holds and are kept there in turn.
    /// The logits are the same as without it, bit for bit.
    pub fn with_prefix_cache(mut self, cache: Option<&'a PrefixCache>) -> Self {
        self.prefix = cache;
        self
    }
}

impl LogitSource for ModelSource<'_> {
    fn prefill(&mut self, prompt: &[u32]) -> std::result::Result<Vec<f32>, DecodeError> {
        if prompt.is_empty() {
            return Err(DecodeError::Invalid("empty prompt".into()));
        }
        let (start, cache) = match self.prefix {
            Some(p) => p.lookup(self.model, prompt)?,
            None => None,
        }
        .unwrap_or_else(|| (0, KvCache::new(self.model.config())));
        let new = &prompt[start..];
        let soft = match self.vectors.first() {
            None => None,
            Some((_, v)) => {
                let mut s = crate::model::soft_prompt::SoftInputs::new(v.len());
                for (slot, v) in &self.vectors {
                    s.push(*slot, (new.len() - 1) as u32, v);
                }
                Some(s)
            }
        };
        let (cache, logits) = self.run(new, 1, cache, soft)?;
        if let Some(p) = self.prefix {
            p.insert(prompt, &cache);
        }
        self.cache = cache;
        finite(logits)
    }

    fn extend(
        &mut self,
        parents: &[u32],
        tokens: &[u32],
    ) -> std::result::Result<Vec<f32>, DecodeError> {
        let identity = self.cache.batch_size() == Some(parents.len())
            && parents.iter().enumerate().all(|(i, &p)| p as usize == i);
        let cache = match identity {
            true => std::mem::replace(&mut self.cache, KvCache::new(self.model.config())),
            false => self.cache.select(parents)?,
        };
        let (cache, logits) = self.run(tokens, tokens.len(), cache, None)?;
        self.cache = cache;
        finite(logits)
    }

    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }
}

/// The model's logits, or [`DecodeError::NonFinite`] when any is NaN or infinite: broken
/// weights must fail the request, not rank items by garbage or answer an empty list.
fn finite(logits: Vec<f32>) -> std::result::Result<Vec<f32>, DecodeError> {
    match logits.iter().position(|x| !x.is_finite()) {
        None => Ok(logits),
        Some(i) => Err(DecodeError::NonFinite {
            what: format!("logit {} of {} is {}", i, logits.len(), logits[i]),
        }),
    }
}
