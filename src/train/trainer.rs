//! The optimisation loop, independent of the model: tokenized examples in, padded batches,
//! AdamW steps on a list of named parameters, validation loss, checkpoints and `--resume`,
//! a progress bar with loss, tokens/s and ETA, and the loss curve for `train_report.json`.
//!
//! The model enters only through a loss closure (`batch → scalar loss`), so full
//! fine-tuning, LoRA and new-rows-only training share this loop.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use super::optim::{lr_at, AdamW, AdamWConfig};
use crate::model::soft_prompt::{Slot as SoftSlot, SoftInputs};
use crate::progress::Progress;

/// Errors of the training loop.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("loss is not finite ({loss}) at step {step}: lower the learning rate")]
    Diverged { step: usize, loss: f32 },
}

type Result<T> = std::result::Result<T, TrainError>;

/// One tokenized example: the full token sequence and which positions are answer tokens
/// (the loss is computed on those only).
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    /// 1 where `ids[i]` is part of the answer (a prediction target).
    pub answer: Vec<u8>,
    /// Soft-prompt vectors, read at the prompt's last position
    /// ([`crate::model::soft_prompt`]); shared between examples with the same words.
    pub soft: Vec<(SoftSlot, Arc<[f32]>)>,
}

impl Encoded {
    /// The position of the prompt's last token (where soft prompts are added).
    pub fn prompt_end(&self) -> usize {
        self.answer
            .iter()
            .position(|&a| a == 1)
            .unwrap_or(self.ids.len())
            .saturating_sub(1)
    }
}

/// How prompts and answers are laid out in tokens: the chat format of SmolLM2-Instruct
/// (`<|im_start|>user\n…<|im_end|>\n<|im_start|>assistant\n…<|im_end|>`), which the
/// from-scratch tokenizer shares.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChatFormat {
    pub user_prefix: String,
    pub assistant_prefix: String,
    /// Ends an answer; the model learns to emit it.
    pub end: String,
}

impl Default for ChatFormat {
    fn default() -> Self {
        ChatFormat {
            user_prefix: "<|im_start|>user\n".into(),
            assistant_prefix: "<|im_end|>\n<|im_start|>assistant\n".into(),
            end: "<|im_end|>".into(),
        }
    }
}

impl ChatFormat {
    /// The text the model sees before its answer.
    pub fn prompt(&self, prompt: &str) -> String {
        format!("{}{}{}", self.user_prefix, prompt, self.assistant_prefix)
    }
}

/// Tokenizes a (prompt, answer) pair, with `context` (unscored text the answer continues,
/// usually empty) between the chat-wrapped prompt and the answer. An answer ends with the
/// end token, except one that continues a context: it ends mid-history, where training
/// never puts an end token, so scoring one there would only add a term no model is
/// taught. If the pair is longer
/// than `max_len`, prompt and context are cut from the left (their start is the least
/// informative part of a long history) and the answer is kept whole; an answer alone
/// longer than `max_len` is cut from the right.
pub fn encode_pair(
    tok: &Tokenizer,
    fmt: &ChatFormat,
    prompt: &str,
    context: &str,
    answer: &str,
    max_len: usize,
) -> Result<Encoded> {
    let enc = |s: &str| -> Result<Vec<u32>> {
        Ok(tok
            .encode(s, false)
            .map_err(|e| TrainError::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
    };
    let mut p = enc(&fmt.prompt(prompt))?;
    if !context.is_empty() {
        p.extend(enc(context)?);
    }
    let mut a = enc(answer)?;
    if context.is_empty() {
        a.extend(enc(&fmt.end)?);
    }
    if a.len() + 1 > max_len {
        a.truncate(max_len.saturating_sub(1).max(1));
    }
    if p.len() + a.len() > max_len {
        let keep = max_len - a.len();
        p.drain(..p.len() - keep);
    }
    let answer = std::iter::repeat_n(0u8, p.len())
        .chain(std::iter::repeat_n(1u8, a.len()))
        .collect();
    p.extend(a);
    Ok(Encoded {
        ids: p,
        answer,
        soft: Vec::new(),
    })
}

/// A padded batch, already shifted for next-token prediction.
pub struct Batch {
    /// `[b, t]` u32: tokens 0..n-1 of each example, right-padded.
    pub input: Tensor,
    /// `[b, t]` u32: tokens 1..n (the targets).
    pub targets: Tensor,
    /// `[b, t]` f32: 1 on real input positions, 0 on padding (the attention mask).
    pub attention: Tensor,
    /// `[b, t]` f32: 1 where the target is an answer token (the loss mask).
    pub loss_mask: Tensor,
    /// Number of real (non-padding) input tokens.
    pub tokens: usize,
    /// The examples' soft-prompt vectors at their prompts' last positions (`None`: none).
    pub soft: Option<SoftInputs>,
}

/// Pads examples to the longest one and shifts them into inputs and targets.
pub fn collate(examples: &[&Encoded], pad_id: u32) -> Result<Batch> {
    let b = examples.len();
    let t = examples
        .iter()
        .map(|e| e.ids.len().saturating_sub(1))
        .max()
        .unwrap_or(0)
        .max(1);
    let mut input = vec![pad_id; b * t];
    let mut targets = vec![pad_id; b * t];
    let mut attention = vec![0f32; b * t];
    let mut loss_mask = vec![0f32; b * t];
    let mut tokens = 0;
    let mut soft: Option<SoftInputs> = None;
    for (r, e) in examples.iter().enumerate() {
        for (slot, v) in &e.soft {
            let s = soft.get_or_insert_with(|| SoftInputs::new(v.len()));
            s.push(*slot, (r * t + e.prompt_end()) as u32, v);
        }
        let n = e.ids.len().saturating_sub(1);
        for i in 0..n {
            input[r * t + i] = e.ids[i];
            targets[r * t + i] = e.ids[i + 1];
            attention[r * t + i] = 1.0;
            loss_mask[r * t + i] = e.answer[i + 1] as f32;
        }
        tokens += n;
    }
    let dev = Device::Cpu;
    Ok(Batch {
        input: Tensor::from_vec(input, (b, t), &dev)?,
        targets: Tensor::from_vec(targets, (b, t), &dev)?,
        attention: Tensor::from_vec(attention, (b, t), &dev)?,
        loss_mask: Tensor::from_vec(loss_mask, (b, t), &dev)?,
        tokens,
        soft,
    })
}

/// Loop settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoopConfig {
    pub epochs: usize,
    /// Stop after this many steps (0: run all epochs).
    pub max_steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup: usize,
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    pub clip: Option<f64>,
    pub eval_every: usize,
    pub seed: u64,
    pub pad_id: u32,
}

/// Where and how often checkpoints are written, and whether to start from one.
#[derive(Clone, Debug)]
pub struct Checkpointing {
    pub dir: PathBuf,
    /// Steps between checkpoints (0: none).
    pub every: usize,
    /// Continue from the checkpoint in `dir`.
    pub resume: bool,
}

/// One point of the loss curve.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LossPoint {
    pub step: usize,
    pub loss: f32,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
}

/// What a run of the loop reports (a stage of `train_report.json`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LoopReport {
    pub steps: usize,
    pub train_loss: Vec<LossPoint>,
    pub valid_loss: Vec<(usize, f32)>,
    pub tokens: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
    pub resumed_from: Option<usize>,
    /// The validation metric of [`Selection`] per evaluation, `(step, value)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub valid_metric: Vec<(usize, f64)>,
    /// With a [`Selection`]: the step whose weights the run returns (the best metric).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selected_step: Option<usize>,
}

/// The loop's own state in a checkpoint (`trainer.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct LoopState {
    step: usize,
    report: LoopReport,
}

/// The weights of the best evaluation so far under a [`Selection`]: deep copies, since
/// the optimiser updates the parameters in place. Its step is the report's `selected_step`.
struct Best {
    value: f64,
    params: std::collections::HashMap<String, Tensor>,
}

impl Best {
    fn take(opt: &AdamW, value: f64) -> Result<Best> {
        let params = opt
            .params()
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
            .collect::<Result<_>>()?;
        Ok(Best { value, params })
    }
}

/// A loss closure: batch → scalar loss.
pub type LossFn<'a> = &'a dyn Fn(&Batch) -> candle_core::Result<Tensor>;

/// A validation metric to keep the best weights by (higher is better), computed at every
/// evaluation from the current weights, e.g. NDCG@10 of the held-out items.
///
/// Why: the loss of a held-out item is a poor guide to how well a model ranks (a model
/// with item vectors ranks better while its validation loss climbs), and the ranking
/// of a small recommender moves from one evaluation to the next. The SASRec peer keeps
/// its epoch with the best validation NDCG@10; with a `Selection` this loop does the
/// same: the run ends with the weights of the best evaluation, not the last step's.
pub type MetricFn<'a> = &'a dyn Fn() -> std::result::Result<f64, String>;

/// The metric and how it is named in progress lines and errors.
#[derive(Clone, Copy)]
pub struct Selection<'a> {
    pub name: &'a str,
    pub metric: MetricFn<'a>,
}

/// The training loss (differentiable in the parameters) and the validation loss (the same
/// function, ideally on a detached view of the model so that it records no graph).
#[derive(Clone, Copy)]
pub struct Losses<'a> {
    pub train: LossFn<'a>,
    pub eval: LossFn<'a>,
}

impl<'a> Losses<'a> {
    /// One function for both.
    pub fn same(f: LossFn<'a>) -> Self {
        Losses { train: f, eval: f }
    }
}

/// Trains `params` with AdamW on `train`, reporting validation loss on `valid` (computed
/// by `losses.eval`) every `eval_every` steps and writing a checkpoint to `ckpt.dir` every `ckpt.every` steps
/// (parameters, optimiser moments, loop state). With `ckpt.resume`, continues from the
/// checkpoint in `ckpt.dir`; the batch order depends only on the seed and the epoch, so a
/// resumed run sees the same batches the uninterrupted run would have.
///
/// With a `select`ion, its metric is also computed at every evaluation, and the run
/// ends with the parameters of the evaluation where it was highest (the first of
/// equals), recorded as `selected_step`; checkpoints keep those weights, so a resumed
/// run selects exactly as the uninterrupted one.
#[allow(clippy::too_many_arguments)]
pub fn run(
    params: Vec<(String, Var)>,
    train: &[Encoded],
    valid: &[Encoded],
    losses: Losses<'_>,
    select: Option<Selection<'_>>,
    cfg: &LoopConfig,
    ckpt: &Checkpointing,
    progress: Progress,
) -> Result<LoopReport> {
    if train.is_empty() {
        return Err(TrainError::Invalid("no training examples".into()));
    }
    if cfg.batch_size == 0 {
        return Err(TrainError::Invalid("batch size must be at least 1".into()));
    }
    let per_epoch = train.len().div_ceil(cfg.batch_size);
    let mut total = per_epoch * cfg.epochs.max(1);
    if cfg.max_steps > 0 {
        total = total.min(cfg.max_steps);
    }
    let mut opt = AdamW::new(
        params,
        AdamWConfig {
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
            ..Default::default()
        },
    )?;
    let mut report = LoopReport::default();
    let mut start = 0;
    let mut best: Option<Best> = None;
    if ckpt.resume {
        let (state, best_params) = load_checkpoint(&ckpt.dir, &mut opt)?;
        start = state.step;
        // The best value is the report's metric at its selected step.
        let value = state.report.selected_step.and_then(|step| {
            let at = state.report.valid_metric.iter().find(|p| p.0 == step)?;
            Some(at.1)
        });
        if let (Some(value), Some(params)) = (value, best_params) {
            best = Some(Best { value, params });
        }
        report = state.report;
        report.resumed_from = Some(start);
    }

    let bar = progress.bar(total as u64, "training");
    bar.set_position(start as u64);
    let t0 = Instant::now();
    let mut tokens_this_run = 0usize;
    let mut step = start;
    'outer: for epoch in 0..cfg.epochs.max(1) {
        let order = epoch_batches(train, cfg.batch_size, cfg.seed.wrapping_add(epoch as u64));
        for (b, chunk) in order.iter().enumerate() {
            let global = epoch * per_epoch + b;
            if global < start {
                continue;
            }
            if step >= total {
                break 'outer;
            }
            let ts = Instant::now();
            let examples: Vec<&Encoded> = chunk.iter().map(|&i| &train[i]).collect();
            let batch = collate(&examples, cfg.pad_id)?;
            let loss = (losses.train)(&batch)?;
            let loss_v = loss.to_scalar::<f32>()?;
            if !loss_v.is_finite() {
                return Err(TrainError::Diverged { step, loss: loss_v });
            }
            let grads = loss.backward()?;
            let lr = lr_at(step, total, cfg.warmup, cfg.lr, cfg.min_lr_ratio);
            let grad_norm = opt.step(&grads, lr, cfg.clip)?;
            step += 1;
            tokens_this_run += batch.tokens;
            let rate = batch.tokens as f64 / ts.elapsed().as_secs_f64().max(1e-9);
            report.train_loss.push(LossPoint {
                step,
                loss: loss_v,
                lr,
                grad_norm,
                tokens_per_s: rate,
            });
            report.tokens += batch.tokens;
            bar.set_position(step as u64);
            bar.set_message(format!("loss {loss_v:.3} {rate:.0} tok/s"));
            if (cfg.eval_every > 0 && step % cfg.eval_every == 0) || step == total {
                let mut line = format!("step {step}: train {loss_v:.4}");
                if let Some(v) = eval_loss(valid, losses.eval, cfg)? {
                    report.valid_loss.push((step, v));
                    line += &format!(", valid {v:.4}");
                }
                if let Some(sel) = &select {
                    let m = (sel.metric)().map_err(|e| {
                        TrainError::Invalid(format!("validation {} at step {step}: {e}", sel.name))
                    })?;
                    report.valid_metric.push((step, m));
                    line += &format!(", valid {} {m:.4}", sel.name);
                    if best.as_ref().is_none_or(|b| m > b.value) {
                        best = Some(Best::take(&opt, m)?);
                        report.selected_step = Some(step);
                        line += " (best)";
                    }
                }
                progress.println(&bar, &line);
            }
            if ckpt.every > 0 && step % ckpt.every == 0 && step < total {
                report.steps = step;
                save_checkpoint(&ckpt.dir, &opt, step, &report, best.as_ref())?;
            }
        }
    }
    bar.finish_and_clear();
    if let Some(b) = &best {
        for (name, var) in opt.params() {
            if let Some(t) = b.params.get(name) {
                var.set(t)?;
            }
        }
    }
    report.steps = step;
    report.seconds += t0.elapsed().as_secs_f64();
    report.tokens_per_s = tokens_this_run as f64 / t0.elapsed().as_secs_f64().max(1e-9);
    Ok(report)
}

/// Examples per length-sorted pool in [`epoch_batches`].
const POOL_BATCHES: usize = 32;

/// The batches of one epoch: examples shuffled, then, within pools of
/// [`POOL_BATCHES`] batches, sorted by length and cut into batches, and the batches
/// shuffled. Batches hold examples of similar length, so little of a batch is padding
/// (on MovieLens instruction data, padding was about 40% of the positions with plain
/// shuffled batches), while every epoch still sees a fresh random order. Depends only on
/// the examples and `seed`, so `--resume` sees the same batches.
fn epoch_batches(train: &[Encoded], batch_size: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..train.len()).collect();
    order.shuffle(&mut rng);
    let mut batches: Vec<Vec<usize>> = Vec::with_capacity(train.len().div_ceil(batch_size));
    for pool in order.chunks_mut(batch_size * POOL_BATCHES) {
        pool.sort_by_key(|&i| train[i].ids.len());
        batches.extend(pool.chunks(batch_size).map(|c| c.to_vec()));
    }
    batches.shuffle(&mut rng);
    batches
}

/// Mean loss over the validation examples (batched, no gradient kept).
pub fn eval_loss(
    valid: &[Encoded],
    loss_fn: &dyn Fn(&Batch) -> candle_core::Result<Tensor>,
    cfg: &LoopConfig,
) -> Result<Option<f32>> {
    if valid.is_empty() {
        return Ok(None);
    }
    let mut sum = 0f64;
    let mut n = 0usize;
    // Length-sorted batches: little padding, same examples every time.
    let mut order: Vec<&Encoded> = valid.iter().collect();
    order.sort_by_key(|e| e.ids.len());
    for chunk in order.chunks(cfg.batch_size.max(1)) {
        let refs: Vec<&Encoded> = chunk.to_vec();
        let batch = collate(&refs, cfg.pad_id)?;
        let l = loss_fn(&batch)?.detach().to_scalar::<f32>()?;
        sum += l as f64 * chunk.len() as f64;
        n += chunk.len();
    }
    Ok(Some((sum / n as f64) as f32))
}

const PARAMS_FILE: &str = "params.safetensors";
const OPTIM_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "trainer.json";
const BEST_FILE: &str = "best.safetensors";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes parameters, optimiser state and loop state into `dir`, replacing the previous
/// checkpoint atomically.
fn save_checkpoint(
    dir: &Path,
    opt: &AdamW,
    step: usize,
    report: &LoopReport,
    best: Option<&Best>,
) -> Result<()> {
    let params: std::collections::HashMap<String, Tensor> = opt
        .params()
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    let state = LoopState {
        step,
        report: report.clone(),
    };
    let json = serde_json::to_vec_pretty(&state).map_err(|e| TrainError::Invalid(e.to_string()))?;
    crate::atomic::write_dir(
        dir,
        true,
        &[],
        |r| TrainError::Invalid(r.to_string()),
        |p: &Path, source| TrainError::Io {
            path: p.to_path_buf(),
            source,
        },
        |tmp| {
            candle_core::safetensors::save(&params, tmp.join(PARAMS_FILE))?;
            opt.save(&tmp.join(OPTIM_FILE))?;
            if let Some(b) = best {
                candle_core::safetensors::save(&b.params, tmp.join(BEST_FILE))?;
            }
            std::fs::write(tmp.join(STATE_FILE), &json).map_err(io(tmp))
        },
    )
}

/// The best weights of a [`Selection`] in a checkpoint, when it has them.
type BestParams = Option<std::collections::HashMap<String, Tensor>>;

/// Restores parameters and optimiser state from `dir`; returns the loop state and the
/// best weights of a selection, when the checkpoint has them.
fn load_checkpoint(dir: &Path, opt: &mut AdamW) -> Result<(LoopState, BestParams)> {
    let state_path = dir.join(STATE_FILE);
    let raw = std::fs::read(&state_path).map_err(|e| {
        TrainError::Invalid(format!(
            "--resume: no checkpoint at {} ({e})",
            state_path.display()
        ))
    })?;
    let state: LoopState = serde_json::from_slice(&raw)
        .map_err(|e| TrainError::Invalid(format!("{}: {e}", state_path.display())))?;
    let params = candle_core::safetensors::load(dir.join(PARAMS_FILE), &Device::Cpu)?;
    for (name, var) in opt.params() {
        let t = params.get(name).ok_or_else(|| {
            TrainError::Invalid(format!(
                "checkpoint {} lacks parameter {name}: it belongs to another model or mode",
                dir.display()
            ))
        })?;
        var.set(t)?;
    }
    opt.load(&dir.join(OPTIM_FILE))?;
    let best_path = dir.join(BEST_FILE);
    let best = match state.report.selected_step.is_some() && best_path.is_file() {
        true => Some(candle_core::safetensors::load(&best_path, &Device::Cpu)?),
        false => None,
    };
    Ok((state, best))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(ids: &[u32], answer_from: usize) -> Encoded {
        Encoded {
            ids: ids.to_vec(),
            answer: (0..ids.len()).map(|i| (i >= answer_from) as u8).collect(),
            soft: Vec::new(),
        }
    }

    /// The loss covers the answer and its end token; a context is read, not scored, and
    /// an answer that continues one gets no end token; an overlong pair loses the start
    /// of its prompt, never the answer.
    #[test]
    fn encode_pair_scores_answers_and_reads_contexts() {
        let mut tok = crate::model::bpe::train_bpe(
            ["list the items a user had".to_string()].into_iter(),
            300,
        )
        .unwrap();
        tok.add_special_tokens(&[
            tokenizers::AddedToken::from("<a_1>", true),
            tokenizers::AddedToken::from("<a_2>", true),
        ]);
        let id = |t: &str| tok.token_to_id(t).unwrap();
        let fmt = ChatFormat::default();
        let plain = encode_pair(&tok, &fmt, "list the items", "", "<a_1>", 64).unwrap();
        let n = plain.ids.len();
        assert_eq!(&plain.ids[n - 2..], &[id("<a_1>"), id("<|im_end|>")]);
        assert_eq!(&plain.answer[n - 3..], &[0, 1, 1]);
        let cont = encode_pair(&tok, &fmt, "list the items", "<a_2>; ", "<a_1>", 64).unwrap();
        let m = cont.ids.len();
        assert_eq!(cont.ids[m - 1], id("<a_1>"));
        assert!(cont.ids[..m - 1].contains(&id("<a_2>")));
        assert_eq!(cont.answer.iter().map(|&x| x as usize).sum::<usize>(), 1);
        // The whole string tokenizes the same way: SID tokens split the text.
        let joined = tok
            .encode(fmt.prompt("list the items") + "<a_2>; <a_1>", false)
            .unwrap();
        assert_eq!(joined.get_ids(), cont.ids.as_slice());
        let cut = encode_pair(&tok, &fmt, "list the items", "<a_2>; ", "<a_1>", 4).unwrap();
        assert_eq!(cut.ids.len(), 4);
        assert_eq!(cut.ids[3], id("<a_1>"));
    }

    #[test]
    fn collate_shifts_and_masks() {
        let a = ex(&[5, 6, 7, 8], 2);
        let b = ex(&[9, 10], 1);
        let batch = collate(&[&a, &b], 0).unwrap();
        assert_eq!(
            batch.input.to_vec2::<u32>().unwrap(),
            vec![vec![5, 6, 7], vec![9, 0, 0]]
        );
        assert_eq!(
            batch.targets.to_vec2::<u32>().unwrap(),
            vec![vec![6, 7, 8], vec![10, 0, 0]]
        );
        assert_eq!(
            batch.loss_mask.to_vec2::<f32>().unwrap(),
            vec![vec![0.0, 1.0, 1.0], vec![1.0, 0.0, 0.0]]
        );
        assert_eq!(
            batch.attention.to_vec2::<f32>().unwrap(),
            vec![vec![1.0, 1.0, 1.0], vec![1.0, 0.0, 0.0]]
        );
        assert_eq!(batch.tokens, 4);
    }

    /// 24 examples `[c, c + classes]`, `c` cycling through `0..classes`: a bigram task.
    fn bigram_data(classes: usize) -> Vec<Encoded> {
        (0..24)
            .map(|i| ex(&[(i % classes) as u32, ((i % classes) + classes) as u32], 1))
            .collect()
    }

    /// A `[v, v]` table of zeros, the bigram model's only parameter.
    fn zero_table(v: usize) -> Var {
        Var::from_tensor(&Tensor::zeros((v, v), candle_core::DType::F32, &Device::Cpu).unwrap())
            .unwrap()
    }

    /// The bigram "model"'s loss: the table `w` read as next-token logits.
    fn bigram_loss(w: Var) -> impl Fn(&Batch) -> candle_core::Result<Tensor> {
        use candle_nn::Module;
        move |b: &Batch| {
            let v = w.as_tensor().dim(1)?;
            let x = candle_nn::Embedding::new(w.as_tensor().clone(), v).forward(&b.input)?;
            let logp = candle_nn::ops::log_softmax(&x, 2)?;
            let picked = logp.gather(&b.targets.unsqueeze(2)?, 2)?.squeeze(2)?;
            let num = (picked * &b.loss_mask)?.sum_all()?;
            let den = b.loss_mask.sum_all()?;
            num.neg()?.div(&den)
        }
    }

    /// 4 epochs of 6 batches of 4, evaluated every 6 steps.
    fn bigram_cfg(seed: u64) -> LoopConfig {
        LoopConfig {
            epochs: 4,
            max_steps: 0,
            batch_size: 4,
            lr: 0.1,
            warmup: 2,
            min_lr_ratio: 0.1,
            weight_decay: 0.01,
            clip: Some(1.0),
            eval_every: 6,
            seed,
            pad_id: 0,
        }
    }

    /// A bigram "model" (an embedding table read as logits): the loop must drive its loss
    /// down, and a run resumed from a checkpoint must end where the uninterrupted run ends.
    #[test]
    fn loop_learns_and_resumes_exactly() {
        let v = 6usize;
        let data = bigram_data(3);
        let make = || zero_table(v);
        let loss_for = bigram_loss;
        let cfg = bigram_cfg(3);
        let quiet = Progress::new(true);
        let tmp = tempfile::tempdir().unwrap();
        let ck = Checkpointing {
            dir: tmp.path().join("ckpt"),
            every: 18,
            resume: false,
        };
        let resume = Checkpointing {
            resume: true,
            ..ck.clone()
        };
        let missing = Checkpointing {
            dir: tmp.path().join("none"),
            ..resume.clone()
        };
        let w = make();
        let f = loss_for(w.clone());
        let full = run(
            vec![("w".into(), w.clone())],
            &data,
            &data,
            Losses::same(&f),
            None,
            &cfg,
            &ck,
            quiet,
        )
        .unwrap();
        assert_eq!(full.steps, 24);
        let first = full.train_loss[0].loss;
        let last = full.train_loss.last().unwrap().loss;
        assert!(last < first * 0.5, "loss {first} -> {last}");
        assert_eq!(full.valid_loss.len(), 4);

        // The checkpoint of step 18 is still in `ck`: resuming from it with a fresh
        // parameter must reproduce the uninterrupted run.
        let w2 = make();
        let f2 = loss_for(w2.clone());
        let resumed = run(
            vec![("w".into(), w2.clone())],
            &data,
            &data,
            Losses::same(&f2),
            None,
            &cfg,
            &resume,
            quiet,
        )
        .unwrap();
        assert_eq!(resumed.resumed_from, Some(18));
        assert_eq!(resumed.steps, 24);
        assert_eq!(resumed.train_loss.len(), 24);
        let x = w.as_tensor().to_vec2::<f32>().unwrap();
        let y = w2.as_tensor().to_vec2::<f32>().unwrap();
        assert_eq!(x, y);

        // Resuming without a checkpoint is a clear error.
        let err = run(
            vec![("w".into(), make())],
            &data,
            &data,
            Losses::same(&f),
            None,
            &cfg,
            &missing,
            quiet,
        )
        .unwrap_err();
        assert!(err.to_string().contains("no checkpoint"), "{err}");
    }

    /// With a selection the run returns the weights of the evaluation with the best
    /// metric (step 12 of 24 here), not the last step's, records that step, and a run
    /// resumed after the best evaluation keeps the same weights.
    #[test]
    fn selection_keeps_the_best_evaluation() {
        use std::cell::{Cell, RefCell};
        let v = 4usize;
        let data = bigram_data(2);
        let make = || zero_table(v);
        let loss_for = bigram_loss;
        let cfg = bigram_cfg(5);
        // Metric values of the evaluations at steps 6, 12, 18, 24: the best is step 12.
        let values = [0.1, 0.5, 0.3, 0.2];
        let tmp = tempfile::tempdir().unwrap();
        let ck = Checkpointing {
            dir: tmp.path().join("ckpt"),
            every: 18,
            resume: false,
        };
        let w = make();
        let f = loss_for(w.clone());
        let calls = Cell::new(0usize);
        let seen: RefCell<Vec<Vec<Vec<f32>>>> = RefCell::new(Vec::new());
        let metric = || {
            seen.borrow_mut()
                .push(w.as_tensor().to_vec2::<f32>().map_err(|e| e.to_string())?);
            let i = calls.get();
            calls.set(i + 1);
            Ok(values[i])
        };
        let select = Selection {
            name: "m",
            metric: &metric,
        };
        let quiet = Progress::new(true);
        let rep = run(
            vec![("w".into(), w.clone())],
            &data,
            &[],
            Losses::same(&f),
            Some(select),
            &cfg,
            &ck,
            quiet,
        )
        .unwrap();
        assert_eq!(rep.steps, 24);
        assert_eq!(rep.selected_step, Some(12));
        let steps: Vec<usize> = rep.valid_metric.iter().map(|p| p.0).collect();
        assert_eq!(steps, vec![6, 12, 18, 24]);
        let at = seen.borrow().clone();
        assert_ne!(at[1], at[3], "the weights moved after the best evaluation");
        assert_eq!(w.as_tensor().to_vec2::<f32>().unwrap(), at[1]);

        // Resumed from step 18's checkpoint, the one remaining evaluation (0.2) loses to
        // the checkpoint's best: the same weights come back.
        let w2 = make();
        let f2 = loss_for(w2.clone());
        let later = |_: ()| Ok(values[3]);
        let metric2 = || later(());
        let resumed = run(
            vec![("w".into(), w2.clone())],
            &data,
            &[],
            Losses::same(&f2),
            Some(Selection {
                name: "m",
                metric: &metric2,
            }),
            &cfg,
            &Checkpointing {
                resume: true,
                ..ck.clone()
            },
            quiet,
        )
        .unwrap();
        assert_eq!(resumed.resumed_from, Some(18));
        assert_eq!(resumed.selected_step, Some(12));
        assert_eq!(w2.as_tensor().to_vec2::<f32>().unwrap(), at[1]);
        // A failing metric stops the run with its name and step.
        let bad = || Err("no users".to_string());
        let err = run(
            vec![("w".into(), make())],
            &data,
            &[],
            Losses::same(&f),
            Some(Selection {
                name: "m",
                metric: &bad,
            }),
            &cfg,
            &Checkpointing {
                dir: tmp.path().join("other"),
                every: 0,
                resume: false,
            },
            quiet,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("validation m at step 6: no users"),
            "{err}"
        );
    }
}
