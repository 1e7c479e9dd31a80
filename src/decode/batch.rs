//! Requests that decode at the same time share their forward passes.
//!
//! Each request runs its own search on its own thread; whenever its search needs logits
//! (a prompt, or a beam step) it hands the model's part of the work to the [`Batcher`]
//! and waits. Whichever waiting request finds a pass free (at most one per core run at
//! once) starts one over everything handed in so far, and hands each request its logits
//! back (leader and followers: no thread of its own, and no waiting for a batch to
//! fill). While passes run, the next fills up, so under load every pass carries the steps
//! of many requests: the weights stream once per pass instead of once per request, which
//! is what a step of a large model costs (continuous batching, at the granularity of beam
//! steps). Answers are bit for bit those
//! of a request decoded alone (see [`crate::model::llama::Part`]).

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};

use candle_core::{Device, Tensor};

use crate::model::llama::{KvCache, Llama, Part};
use crate::model::soft_prompt::SoftInputs;

/// One request's share of a pass, handed over with its cache.
struct Job {
    ids: Vec<u32>,
    rows: usize,
    cache: KvCache,
    soft: Option<SoftInputs>,
}

/// A job's outcome: its cache (extended on success, as handed in otherwise) and its
/// last-position logits `[rows, vocab]`, row-major.
type Outcome = (KvCache, Result<Vec<f32>, String>);

#[derive(Default)]
struct State {
    queue: Vec<(u64, Job)>,
    done: HashMap<u64, Outcome>,
    /// Passes running now.
    running: usize,
    next: u64,
    passes: u64,
    jobs: u64,
}

/// Where the requests of one model meet to share passes (thread-safe).
pub struct Batcher {
    state: Mutex<State>,
    changed: Condvar,
    /// Passes that may run at once.
    passes: usize,
}

/// How much sharing happened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Forward passes run.
    pub passes: u64,
    /// Request steps they carried.
    pub jobs: u64,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("stats", &self.stats())
            .finish()
    }
}

impl Batcher {
    /// A batcher running at most `passes` passes at once (at least 1). With one, a pass
    /// is the only work on the model while it runs, and the parts of it that are one
    /// request's (attention, the search between steps) leave cores idle: on the 4M demo
    /// model a single pass at a time served 52 requests/s to 16 clients against 90 for
    /// two unshared workers. One pass per core keeps the cores busy and still shares
    /// each pass among the requests that wait.
    pub fn new(passes: usize) -> Self {
        Batcher {
            state: Mutex::default(),
            changed: Condvar::new(),
            passes: passes.max(1),
        }
    }

    pub fn stats(&self) -> BatchStats {
        let st = self.lock();
        BatchStats {
            passes: st.passes,
            jobs: st.jobs,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Jobs and outcomes move in and out whole, so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `ids` (`rows × t`, row-major) on `cache` through `model` (the same model for
    /// every caller of this batcher), sharing the pass with whatever other requests hand
    /// in meanwhile; returns the extended cache and the last position's logits of each
    /// row. On error the cache comes back unchanged.
    pub fn run(
        &self,
        model: &Llama,
        ids: Vec<u32>,
        rows: usize,
        cache: KvCache,
        soft: Option<SoftInputs>,
    ) -> (KvCache, Result<Vec<f32>, String>) {
        let mut st = self.lock();
        let id = st.next;
        st.next += 1;
        st.queue.push((
            id,
            Job {
                ids,
                rows,
                cache,
                soft,
            },
        ));
        loop {
            if let Some(out) = st.done.remove(&id) {
                return out;
            }
            if st.running < self.passes && !st.queue.is_empty() {
                st.running += 1;
                let jobs = std::mem::take(&mut st.queue);
                st.passes += 1;
                st.jobs += jobs.len() as u64;
                drop(st);
                let outcomes = pass(model, jobs);
                st = self.lock();
                st.running -= 1;
                st.done.extend(outcomes);
                self.changed.notify_all();
                continue;
            }
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// One forward pass over `jobs`. A failure of the whole pass (one job's bad input) is
/// retried job by job, so each request gets its own outcome; a panic fails every job of
/// the pass instead of leaving their requests waiting.
fn pass(model: &Llama, jobs: Vec<(u64, Job)>) -> Vec<(u64, Outcome)> {
    let run = |jobs: &mut [(u64, Job)]| -> Result<Vec<Vec<f32>>, String> {
        let ids: Vec<Tensor> = jobs
            .iter()
            .map(|(_, j)| {
                let t = j.ids.len() / j.rows.max(1);
                Tensor::from_slice(&j.ids, (j.rows, t), &Device::Cpu)
            })
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        let mut parts: Vec<Part<'_>> = jobs
            .iter_mut()
            .zip(&ids)
            .map(|((_, j), ids)| Part {
                ids,
                cache: &mut j.cache,
                soft: j.soft.as_ref(),
            })
            .collect();
        let logits = model
            .forward_cached_many(&mut parts)
            .map_err(|e| e.to_string())?;
        logits
            .iter()
            .map(|l| l.flatten_all().and_then(|l| l.to_vec1::<f32>()))
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())
    };
    let mut jobs = jobs;
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match run(&mut jobs) {
        Ok(all) => all.into_iter().map(Ok).collect::<Vec<_>>(),
        Err(_) if jobs.len() > 1 => jobs
            .iter_mut()
            .map(|j| run(std::slice::from_mut(j)).map(|mut v| v.remove(0)))
            .collect(),
        Err(e) => vec![Err(e)],
    }));
    let results = caught.unwrap_or_else(|_| {
        jobs.iter()
            .map(|_| Err("internal error: a decoding pass panicked".to_string()))
            .collect()
    });
    jobs.into_iter()
        .zip(results)
        .map(|((id, j), r)| (id, (j.cache, r)))
        .collect()
}
