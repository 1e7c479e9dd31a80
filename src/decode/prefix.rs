//! Keys and values of prompts already run, reused by later prompts that share a prefix.
//!
//! Every prompt of a model starts with the same instruction words, and a returning user's
//! next prompt repeats the history of the last one. The decoder's keys and values at a
//! position depend only on the tokens up to it, so a prompt can start from the cache of
//! any earlier prompt it shares a prefix with and run only what is new (vLLM's automatic
//! prefix caching, SGLang's radix attention). The answers are bit for bit those of a full
//! pass: decoding computes every row on its own (see [`crate::model::skinny`]), so a
//! position's keys, values and logits do not depend on how the prompt was cut.
//!
//! The cache is a least-recently-used set of prompts, bounded in bytes. A lookup finds
//! the entry with the longest common prefix and cuts its cache there; an entry whose
//! prompt a newer one extends is dropped (the newer covers it).

use std::sync::Mutex;

use crate::model::llama::{KvCache, Llama};

/// Default bound of a model's prefix cache.
pub const DEFAULT_BYTES: usize = 64 << 20;

/// Recently run prompts and their caches (one row each); shared by the requests of one
/// model (thread-safe).
#[derive(Debug)]
pub struct PrefixCache {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    entries: Vec<Entry>,
    clock: u64,
    bytes: usize,
    stats: Stats,
}

#[derive(Debug)]
struct Entry {
    tokens: Vec<u32>,
    cache: KvCache,
    bytes: usize,
    used: u64,
}

/// What the cache saved so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Prompts that started from a cached prefix.
    pub hits: u64,
    /// Prompts run from the start.
    pub misses: u64,
    /// Prompt tokens not recomputed.
    pub reused_tokens: u64,
    /// Prompt tokens computed.
    pub computed_tokens: u64,
}

impl PrefixCache {
    /// A cache holding at most `capacity` bytes of keys and values.
    pub fn new(capacity: usize) -> Self {
        PrefixCache {
            capacity,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The bound in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn stats(&self) -> Stats {
        self.lock().stats
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves whole entries behind (each is pushed or
        // removed in one step), so a poisoned lock is still a consistent cache.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The longest cached prefix of `prompt` that leaves at least its last token to run
    /// (the logits come from it, and soft-prompt vectors go there): its length and
    /// `model`'s cache cut to it. `None` when no entry shares a first token.
    pub fn lookup(
        &self,
        model: &Llama,
        prompt: &[u32],
    ) -> Result<Option<(usize, KvCache)>, crate::model::llama::ModelError> {
        let mut inner = self.lock();
        let best = inner
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                // An entry's last position was an input to soft-prompt vectors: never reused.
                let usable = (e.tokens.len() - 1).min(prompt.len() - 1);
                let common = e.tokens[..usable]
                    .iter()
                    .zip(prompt)
                    .take_while(|(a, b)| a == b)
                    .count();
                (common, i)
            })
            .max_by_key(|&(common, i)| (common, std::cmp::Reverse(i)));
        match best {
            Some((common, i)) if common > 0 => {
                inner.clock += 1;
                let now = inner.clock;
                inner.entries[i].used = now;
                inner.stats.hits += 1;
                inner.stats.reused_tokens += common as u64;
                inner.stats.computed_tokens += (prompt.len() - common) as u64;
                let cut = model.cache_prefix(&inner.entries[i].cache, &prompt[..common])?;
                Ok(Some((common, cut)))
            }
            _ => {
                inner.stats.misses += 1;
                inner.stats.computed_tokens += prompt.len() as u64;
                Ok(None)
            }
        }
    }

    /// Keeps `cache`, the cache of the whole `prompt` (one row), for later prompts.
    /// Entries whose prompts `prompt` extends (or repeats) are dropped; the least
    /// recently used go while the cache holds more than its capacity.
    pub fn insert(&self, prompt: &[u32], cache: &KvCache) {
        if prompt.len() < 2 || cache.batch_size() != Some(1) || cache.len() != prompt.len() {
            return;
        }
        let bytes = cache.bytes();
        if bytes > self.capacity {
            return;
        }
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        let mut freed = 0;
        inner.entries.retain(|e| {
            let covered = e.tokens.len() <= prompt.len() && prompt.starts_with(&e.tokens);
            if covered {
                freed += e.bytes;
            }
            !covered
        });
        inner.bytes -= freed;
        inner.entries.push(Entry {
            tokens: prompt.to_vec(),
            cache: cache.clone(),
            bytes,
            used: now,
        });
        inner.bytes += bytes;
        while inner.bytes > self.capacity {
            let Some(oldest) = inner
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.used)
                .map(|(i, _)| i)
            else {
                break;
            };
            let e = inner.entries.swap_remove(oldest);
            inner.bytes -= e.bytes;
        }
    }
}
