//! What `recommend` and `repl` share: the request flags, the model they load, how a
//! request is built from flags and checked against the limits `serve` holds too, and how
//! an answer is printed.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use sidrec::model::packed::WeightFormat;

/// Where the demo model lives: `models/demo` in the source tree this binary was built
/// from. `cargo run --release -- recommend ...` on a fresh clone finds it there.
pub(crate) const DEMO_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/demo");

/// The model directory a command uses: `--model`/`SIDREC_MODEL`, else the demo model.
pub(crate) fn model_dir(model: &Option<PathBuf>) -> Result<PathBuf> {
    if let Some(m) = model {
        return Ok(m.clone());
    }
    let demo = PathBuf::from(DEMO_MODEL);
    if !demo.join("model.safetensors").is_file() {
        bail!(
            "no --model given, and the demo model is not at {} (this binary was built \
             elsewhere): pass --model DIR (a directory written by `sidrec train`) or set SIDREC_MODEL",
            demo.display()
        );
    }
    Ok(demo)
}

/// Loads a model directory as an engine, naming it in errors. A model that reads
/// requests through a sentence encoder finds it where its card says, or at
/// `SIDREC_ENCODER` (checked by sha256 either way).
pub(crate) fn load_engine(
    model: &Option<PathBuf>,
    weights: WeightFormat,
) -> Result<sidrec::decode::Engine> {
    let dir = model_dir(model)?;
    let encoder = std::env::var_os("SIDREC_ENCODER").map(PathBuf::from);
    sidrec::decode::Engine::load_weights(&dir, encoder.as_deref(), weights)
        .with_context(|| format!("loading model {}", dir.display()))
}

#[derive(Args, Clone, Debug)]
pub(crate) struct RequestArgs {
    /// Model directory written by `sidrec train` (default: the demo model in
    /// models/demo, trained on MovieLens-100k).
    #[arg(long, env = "SIDREC_MODEL")]
    pub model: Option<PathBuf>,
    /// How the decoder's matrices are held in memory: f32 (as trained), bf16 or int8
    /// (an f32 scale per 32 weights). Smaller weights decode faster at a small, measured
    /// cost in accuracy (docs/benchmarks.md).
    #[arg(
        long,
        env = "SIDREC_WEIGHTS",
        default_value = "f32",
        value_name = "FORMAT"
    )]
    pub weights: WeightFormat,
    /// Items the user interacted with, oldest first: ids or titles, comma-separated
    /// (the flag may repeat).
    #[arg(long, value_name = "ID,ID...")]
    pub history: Vec<String>,
    /// Only items of this entity type (repeat or comma-separate for several).
    #[arg(long = "type", value_name = "TYPE")]
    pub types: Vec<String>,
    /// Attribute filter: `year>=1990`, `genre=Comedy`, `category~Lab`; clauses joined
    /// by `,` or ` and ` must all hold.
    #[arg(long, value_name = "EXPR")]
    pub filter: Option<String>,
    /// Number of items (1 to 100).
    #[arg(short, long, default_value_t = 10)]
    pub k: usize,
    /// Beam width, 1 to 200 (default: 2k, at least 10; never below k).
    #[arg(long)]
    pub beams: Option<usize>,
    /// Leave the history's items out of the answer.
    #[arg(long)]
    pub exclude_seen: bool,
    /// Also ask for each of the last N history items alone and rank by the mixture of
    /// these and the whole history (the k-th most recent item weighs 0.5^(k-1) against
    /// the history's 1): what follows each recent item counts, as in co-occurrence
    /// counts. N+1 decoder passes per request (docs/decoding.md) [default: as the model's
    /// recipe ranks, in sidrec.json; 0: the whole history alone].
    #[arg(long, value_name = "N")]
    pub mix_recent: Option<usize>,
    /// Under --mix-recent, each further recent item weighs this many times the one after
    /// it [default: the recipe's, else 0.5].
    #[arg(long, value_name = "X")]
    pub recent_decay: Option<f32>,
    /// Also mix in the model's transition memory (transitions.json: what followed each
    /// of the user's last 5 items within 3 positions in the training sequences) at
    /// weight W against the whole history's 1. It recalls every training transition
    /// exactly, which a small decoder does not (docs/decoding.md) [default: the recipe's;
    /// 0: off].
    #[arg(long, value_name = "W")]
    pub memory: Option<f32>,
    /// auto (recommend with a history, else search), recommend, search, describe, chat.
    #[arg(long, default_value = "auto")]
    pub mode: sidrec::decode::Mode,
    /// Answer format: items (a ranked list), text, both (text with items in it), or auto
    /// (items for recommend/search, text for describe; in chat the model may write words
    /// or open an item at every step, so a model trained with chat examples answers in
    /// the form the message asks for: "... only list them", "... tell me in a
    /// sentence").
    #[arg(long, default_value = "auto")]
    pub format: sidrec::decode::Format,
    /// Sampling temperature for text (describe, chat; 0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling threshold for text.
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f32,
    /// Seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Most tokens of generated text (describe, chat).
    #[arg(long, default_value_t = 96)]
    pub max_tokens: usize,
    /// Give the request's words to the model only: do not read titles after "like"
    /// into the history, nor genre, decade, category or brand words into filter clauses.
    #[arg(long)]
    pub literal: bool,
}

/// Splits `--history`/`--type` values on commas and trims them.
pub(crate) fn split_list(values: &[String]) -> Vec<String> {
    values
        .iter()
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Resolves one history entry (an id or a title) to a catalog item; ambiguous or unknown
/// titles are errors that list the candidates.
pub(crate) fn resolve_item(engine: &sidrec::decode::Engine, entry: &str) -> Result<u32> {
    Ok(engine.resolve_item(entry)?)
}

/// The flags checked against the limits `serve` and the REPL hold requests to (the same
/// words for the same fault), before any model is loaded.
pub(crate) fn check_request_args(a: &RequestArgs, query: &str) -> Result<()> {
    let limits = sidrec::decode::Limits::default();
    limits.check_query(query)?;
    limits.check_history(split_list(&a.history).len())?;
    let k = limits.check_k(a.k)?;
    limits.check_beams(a.beams, k)?;
    if let Some(n) = a.mix_recent {
        limits.check_mix_recent(n)?;
    }
    limits.check_max_tokens(a.max_tokens)?;
    Ok(())
}

/// A request from flags (history resolved against the engine's catalog), within the
/// shared limits.
pub(crate) fn build_request(
    engine: &sidrec::decode::Engine,
    a: &RequestArgs,
    query: &str,
) -> Result<sidrec::decode::Request> {
    check_request_args(a, query)?;
    let beams = sidrec::decode::Limits::default().check_beams(a.beams, a.k)?;
    let history = split_list(&a.history)
        .iter()
        .map(|e| resolve_item(engine, e))
        .collect::<Result<Vec<u32>>>()?;
    let mut req = sidrec::decode::Request {
        mode: a.mode,
        format: a.format,
        query: query.to_string(),
        history,
        types: split_list(&a.types),
        filter: a.filter.clone(),
        exclude_seen: a.exclude_seen,
        k: a.k,
        beams,
        types_in_prompt_only: false,
        mix_recent: 0,
        recent_decay: None,
        memory: None,
    };
    // As the model's recipe ranks, unless the flags say otherwise.
    let rank = engine
        .ranking()
        .with(a.mix_recent, a.recent_decay, a.memory);
    (req.mix_recent, req.recent_decay, req.memory) =
        (rank.mix_recent, rank.recent_decay, rank.memory);
    if !a.literal {
        for r in engine.read_request(&mut req) {
            eprintln!("(read {:?} as {})", r.words, r.clause);
        }
    }
    Ok(req)
}

pub(crate) fn gen_config(a: &RequestArgs) -> sidrec::decode::GenConfig {
    sidrec::decode::GenConfig {
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        stop: Vec::new(),
        items: true,
    }
}

/// Runs a request: ranked items (recommend, search) or a mixed answer (describe, chat),
/// as text or JSON.
pub(crate) fn answer(
    engine: &sidrec::decode::Engine,
    req: &sidrec::decode::Request,
    gen: &sidrec::decode::GenConfig,
    json: bool,
) -> Result<String> {
    use sidrec::decode::Format;
    use std::fmt::Write;
    let t0 = std::time::Instant::now();
    let generative = engine.resolve_format(req) != Format::Items;
    let prompt = engine.prompt_text(req)?;
    let mut out = String::new();
    if generative {
        let segs = engine.generate(req, gen)?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        if json {
            let v = serde_json::json!({
                "mode": req.mode.to_string(), "prompt": prompt,
                "segments": segs, "ms": ms,
            });
            writeln!(out, "{v}")?;
        } else {
            writeln!(out, "{}", sidrec::decode::engine::render_outputs(&segs))?;
        }
        return Ok(out);
    }
    let items = engine.recommend(req)?;
    // The limits left items to choose from (else `recommend` says so), so an empty or
    // NaN-scored answer is the model failing, not an answer.
    if items.is_empty() || items.iter().any(|r| !r.score.is_finite()) {
        bail!("the model returned no usable items (none, or non-finite scores): are its weights finite?");
    }
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    if json {
        let v = serde_json::json!({
            "mode": req.mode.to_string(), "prompt": prompt, "items": items, "ms": ms,
        });
        writeln!(out, "{v}")?;
    } else {
        let width = items
            .iter()
            .map(|r| r.title.chars().count())
            .max()
            .unwrap_or(5)
            .min(48);
        for r in &items {
            let title: String = r.title.chars().take(48).collect();
            let year = engine.catalog().items[engine.index_of(&r.id).unwrap_or(0) as usize]
                .attrs
                .get("year")
                .map(|y| format!(" ({y})"))
                .unwrap_or_default();
            writeln!(
                out,
                "{:>3}. {:<width$} {:<7} {:>8.3}  {:<8} {}",
                r.rank,
                format!("{title}{year}"),
                r.item_type,
                r.score,
                r.id,
                r.sid,
                width = width + 7
            )?;
        }
    }
    Ok(out)
}
