//! Incremental decoding over the KV cache, for one request or several in one pass.
//!
//! A decoding step's cost is streaming the weights (see [`super::skinny`]); requests that
//! step at the same time can share that stream: their rows are stacked for every matrix
//! product, and only attention, which reads each request's own cache, runs per request.
//! Every operation of this path computes each row on its own (row-wise products, norms,
//! rotations, causal attention row by row), so a request's logits are bit for bit the same
//! alone or in a batch, and whether its prompt ran in one pass or in pieces.

use super::*;

/// One request's share of a pass: `ids` `[b, t]` placed at positions
/// `cache.len()..cache.len() + t` of its `b` rows, with soft-prompt vectors at flat
/// positions of the new tokens (`row · t + j`).
pub struct Part<'a> {
    pub ids: &'a Tensor,
    pub cache: &'a mut KvCache,
    pub soft: Option<&'a SoftInputs>,
}

/// A part's shape and state during the pass.
struct Plan {
    b: usize,
    t: usize,
    offset: usize,
    cos: Tensor,
    sin: Tensor,
    layers: Vec<Option<(Tensor, Tensor)>>,
    rows: Option<std::sync::Arc<[u32]>>,
    states: Vec<ItemState>,
}

impl Llama {
    /// [`Llama::forward_cached_last_soft`] for several requests in one pass: each part's
    /// last-position logits `[b, vocab]`, in order. Each cache is extended by its part's
    /// tokens; on error no cache changes.
    pub fn forward_cached_many(&self, parts: &mut [Part<'_>]) -> Result<Vec<Tensor>> {
        let (hidden, plans) = self.run_many(parts)?;
        let last: Vec<Tensor> = hidden
            .iter()
            .map(|h| {
                let t = h.dim(1)?;
                Ok(h.narrow(1, t - 1, 1)?)
            })
            .collect::<Result<_>>()?;
        let sizes: Vec<usize> = last.iter().map(|l| l.dim(0)).collect::<Result<_, _>>()?;
        let all = self.logits(&Tensor::cat(&last, 0)?, true)?.squeeze(1)?;
        let mut out = Vec::with_capacity(sizes.len());
        let mut at = 0;
        for n in sizes {
            out.push(all.narrow(0, at, n)?);
            at += n;
        }
        commit(parts, plans);
        Ok(out)
    }

    /// Final hidden states `[b, t, hidden]` of every part (see [`Part`]); the caches are
    /// extended.
    pub(super) fn cached_hidden_many(&self, parts: &mut [Part<'_>]) -> Result<Vec<Tensor>> {
        let (hidden, plans) = self.run_many(parts)?;
        commit(parts, plans);
        Ok(hidden)
    }

    /// The pass: every part's final hidden states, and its cache's new state, which
    /// [`commit`] stores once nothing can fail any more.
    fn run_many(&self, parts: &[Part<'_>]) -> Result<(Vec<Tensor>, Vec<Plan>)> {
        let mut plans = Vec::with_capacity(parts.len());
        let mut inputs = Vec::with_capacity(parts.len());
        for part in parts.iter() {
            let (plan, x) = self.plan(part)?;
            inputs.push(x.reshape((plan.b * plan.t, self.cfg.hidden_size))?);
            plans.push(plan);
        }
        // All parts' rows as one `[1, rows, hidden]` sequence for the row-wise layers.
        let mut x = Tensor::cat(&inputs, 0)?.unsqueeze(0)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = layer.input_norm.forward(&x)?;
            let attn = &layer.attn;
            let (q, k, v) = (
                attn.q.forward(&h, true)?,
                attn.k.forward(&h, true)?,
                attn.v.forward(&h, true)?,
            );
            let mut ys = Vec::with_capacity(plans.len());
            let mut at = 0;
            for p in plans.iter_mut() {
                let n = p.b * p.t;
                let (q, k, v) = attn.heads(
                    &q.narrow(1, at, n)?,
                    &k.narrow(1, at, n)?,
                    &v.narrow(1, at, n)?,
                    p.b,
                    p.t,
                    &p.cos,
                    &p.sin,
                )?;
                let slot = &mut p.layers[l];
                let (k, v) = match slot.take() {
                    None => (k, v),
                    Some((pk, pv)) => {
                        let rows = p.rows.as_deref();
                        (append_rows(&pk, rows, &k)?, append_rows(&pv, rows, &v)?)
                    }
                };
                // The cache outlives this step: keep values, not the autograd graph.
                *slot = Some((k.detach(), v.detach()));
                let y = attn.attend(&q, &k, &v, None, Some(p.offset))?;
                ys.push(y.reshape((n, y.dim(2)?))?);
                at += n;
            }
            let y = Tensor::cat(&ys, 0)?.unsqueeze(0)?;
            let h = (&x + attn.o.forward(&y, true)?)?;
            let mlp = layer.mlp.forward(&layer.post_norm.forward(&h)?, true)?;
            x = (&h + mlp)?;
        }
        let h = self.norm.forward(&x)?.squeeze(0)?;
        let mut out = Vec::with_capacity(plans.len());
        let mut at = 0;
        for plan in &plans {
            let n = plan.b * plan.t;
            out.push(
                h.narrow(0, at, n)?
                    .reshape((plan.b, plan.t, self.cfg.hidden_size))?,
            );
            at += n;
        }
        Ok((out, plans))
    }

    /// A part checked against its cache, with its input vectors `[b, t, hidden]`.
    fn plan(&self, part: &Part<'_>) -> Result<(Plan, Tensor)> {
        let cache = &*part.cache;
        let (b, t) = self.check_ids(part.ids)?;
        if cache.layers.len() != self.layers.len() {
            return Err(ModelError::Shape {
                what: "KV cache layers",
                expected: self.layers.len().to_string(),
                found: cache.layers.len().to_string(),
            });
        }
        if let Some(cb) = cache.batch_size() {
            if cb != b {
                return Err(ModelError::BatchMismatch {
                    cache: cb,
                    input: b,
                });
            }
        }
        let offset = cache.len;
        self.check_len(offset + t)?;
        // Item states are kept only for a model that reads item vectors.
        let mut states = match self.items.is_some() {
            true if cache.items.len() == b => cache.items.clone(),
            true => vec![ItemState::default(); b],
            false => Vec::new(),
        };
        let x = self.add_items(self.embed_ids(part.ids, b, t)?, part.ids, &mut states, None)?;
        let x = self.add_soft(x, part.soft)?;
        let plan = Plan {
            b,
            t,
            offset,
            cos: self.cos.narrow(0, offset, t)?,
            sin: self.sin.narrow(0, offset, t)?,
            layers: cache.layers.clone(),
            rows: cache.rows.clone(),
            states,
        };
        Ok((plan, x))
    }
}

/// Stores each part's new cache state.
fn commit(parts: &mut [Part<'_>], plans: Vec<Plan>) {
    for (plan, part) in plans.into_iter().zip(parts.iter_mut()) {
        let cache = &mut *part.cache;
        cache.layers = plan.layers;
        cache.len = plan.offset + plan.t;
        cache.rows = None;
        cache.items = plan.states;
    }
}
