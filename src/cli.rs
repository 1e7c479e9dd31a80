//! Command-line flags and the commands behind them.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use sidrec::artifacts;
use sidrec::catalog::{Format, LoadOptions};
use sidrec::collab::CollabConfig;
use sidrec::embed::DEFAULT_MAX_TOKENS;
use sidrec::interactions::ReadOptions;
use sidrec::progress::Progress;
use sidrec::quantize::{Assign, QuantizeConfig};
use sidrec::template::Template;
use sidrec::tokenize::{self, CollabOptions, EmbeddingSource, Report, TokenizeOptions};

#[derive(Parser)]
#[command(
    name = "sidrec",
    version,
    about = "A generative recommender that speaks semantic IDs",
    long_about = "sidrec gives every catalog item a short semantic ID (SID) such as \
<movie><a_17><b_203><c_5>: item text is embedded, residual k-means turns each embedding \
into a tuple of codes (similar items share prefixes), and a final dedup code makes every \
SID unique. A Llama-family decoder learns to speak those IDs, and decoding is constrained \
by a trie of them, so every item it names exists.\n\nStart with `sidrec tokenize CATALOG -o \
DIR` and `sidrec inspect DIR`; then `sidrec train --artifacts DIR --interactions FILE -o MODEL`; \
then `sidrec recommend --model MODEL ...` or `sidrec repl --model MODEL`; measure it with \
`sidrec eval --model MODEL --interactions FILE`; serve it with `sidrec serve --model MODEL`.\n\n\
Without --model, recommend, repl and serve use the demo model in models/demo (trained on \
MovieLens-100k): try `sidrec recommend \"a 90s comedy like Toy Story\"`."
)]
struct Cli {
    /// Worker threads for embedding, k-means, training and decoding (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// No progress bars.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Catalog → embeddings → residual k-means → unique typed SIDs (an artifact directory).
    #[command(long_about = TOKENIZE_HELP)]
    Tokenize(TokenizeArgs),
    /// Show the diagnostics of an artifact directory; look up an item's SID and its
    /// neighbours (the items sharing its prefix).
    Inspect(InspectArgs),
    /// Teach a Llama-family decoder the catalog's SIDs: stage 1 aligns SIDs with item
    /// text, stage 2 instruction-tunes on recommendation, search, steering and user
    /// descriptions. Writes a Hugging Face model directory.
    #[command(long_about = TRAIN_HELP)]
    Train(TrainArgs),
    /// Convert a GGUF Llama checkpoint (e.g. SmolLM2-135M-Instruct) into a Hugging Face
    /// directory (f32 safetensors, tokenizer.json rebuilt from the GGUF metadata).
    Convert(ConvertArgs),
    /// Ask a trained model for items: from a history, a text request, or both. Every
    /// item returned exists in the catalog (decoding is constrained by the SID trie).
    #[command(long_about = RECOMMEND_HELP)]
    Recommend(RecommendArgs),
    /// An interactive session with a trained model: build a history, set limits, ask.
    #[command(long_about = crate::repl::HELP)]
    Repl(ReplArgs),
    /// Measure a trained model on the leave-one-out protocol (Recall/NDCG@5/10 over the
    /// whole catalog) beside baselines run on the same split, plus steerability; writes
    /// eval.json, eval.md, plots and per-user rankings.
    #[command(long_about = EVAL_HELP)]
    Eval(EvalArgs),
    /// Serve a model over HTTP: POST /v1/recommend, POST /v1/generate,
    /// GET /v1/items/{id}, GET /healthz (JSON in and out).
    #[command(long_about = SERVE_HELP)]
    Serve(ServeArgs),
}

const SERVE_HELP: &str = "Serve a model over HTTP (JSON in and out).\n\n\
Endpoints:\n  \
POST /v1/recommend  {\"query\", \"history\": [ids or titles], \"types\", \"filter\", \"k\", \"exclude_seen\", \"mode\", \"mix_recent\", \"recent_decay\", \"memory\"}\n  \
POST /v1/generate   {\"query\", \"history\", \"mode\": chat|describe, \"format\", \"max_tokens\", \"temperature\", \"top_p\", \"seed\"}\n  \
GET  /v1/items/{id}\n  \
GET  /healthz\n\n\
Before listening, the server decodes one probe request; a model that cannot answer it \
(no items, or non-finite scores: a diverged run) is refused with an error, and /healthz \
reports the probe. All requests share one loaded model; --workers of them decode at a \
time and up to --queue more wait, beyond which the server answers 503. Requests are held \
to the limits of `sidrec recommend` (k 1 to 100, beams 1 to 200, mix_recent 0 to 8, \
max_tokens 1 to 512, a query of 2000 bytes, a history of 500 items). Bad input gets a 4xx \
status and {\"error\": \"what was wrong\"}; a body must be a JSON object.\n\n\
A request head, and then its body, must arrive within --header-timeout seconds; a \
connection where no byte moves and nothing is being decoded is closed after \
--idle-timeout. SIGINT or SIGTERM stops accepting connections and lets requests in \
flight finish for up to --shutdown-timeout seconds, then exits anyway.\n\n\
Examples:\n  \
sidrec serve                                   # the demo model on 127.0.0.1:8080\n  \
sidrec serve --model out/ml100k-tiny --addr 0.0.0.0:9000 --workers 4\n  \
curl -s localhost:8080/v1/recommend -d '{\"query\": \"a 90s comedy like Toy Story\", \"k\": 5}' \\\n    \
-H 'content-type: application/json'";

#[derive(Args)]
struct ServeArgs {
    /// Model directory written by `sidrec train` (default: the demo model).
    #[arg(long, env = "SIDREC_MODEL")]
    model: Option<PathBuf>,
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: std::net::SocketAddr,
    /// Requests decoded at the same time.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Requests that may wait for a worker; more get 503.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// Largest request body in bytes (larger: 413).
    #[arg(long, default_value_t = 64 * 1024)]
    max_body: usize,
    /// Seconds a client has to send a request head, and then its body; a client that
    /// sends half a head is disconnected after this.
    #[arg(long, default_value = "10", value_parser = seconds, value_name = "SECONDS")]
    header_timeout: std::time::Duration,
    /// Seconds a connection may sit with no byte moving and nothing being decoded
    /// before it is closed.
    #[arg(long, default_value = "60", value_parser = seconds, value_name = "SECONDS")]
    idle_timeout: std::time::Duration,
    /// Seconds requests in flight get to finish after SIGINT/SIGTERM; then the server
    /// exits anyway.
    #[arg(long, default_value = "10", value_parser = seconds, value_name = "SECONDS")]
    shutdown_timeout: std::time::Duration,
}

/// A positive number of seconds (fractions allowed).
fn seconds(s: &str) -> Result<std::time::Duration, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 && x <= 86_400.0 => {
            Ok(std::time::Duration::from_secs_f64(x))
        }
        _ => Err(format!(
            "expected seconds, more than 0 and at most 86400, not {s:?}"
        )),
    }
}

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

/// Loads a model directory as an engine, naming it in errors.
pub(crate) fn load_engine(model: &Option<PathBuf>) -> Result<sidrec::decode::Engine> {
    let dir = model_dir(model)?;
    sidrec::decode::Engine::load(&dir).with_context(|| format!("loading model {}", dir.display()))
}

fn cmd_serve(a: ServeArgs) -> Result<()> {
    use std::io::Write;
    if a.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let engine = load_engine(&a.model)?;
    let items = engine.catalog().items.len();
    let opts = sidrec::serve::ServeOptions {
        workers: a.workers,
        queue: a.queue,
        max_body: a.max_body,
        timeouts: sidrec::serve::Timeouts {
            header: a.header_timeout,
            idle: a.idle_timeout,
            shutdown: a.shutdown_timeout,
        },
        ..Default::default()
    };
    sidrec::serve::run(engine, a.addr, opts, |addr| {
        println!("listening on http://{addr} ({items} items; Ctrl-C stops)");
        let _ = std::io::stdout().flush();
    })
    .with_context(|| format!("serving on {}", a.addr))?;
    eprintln!("stopped");
    Ok(())
}

const EVAL_HELP: &str = "Measure a trained model on the standard protocol.\n\n\
Leave-one-out per user: the last item is the test target, the second to last the \
validation target, the rest is what `sidrec train` saw. The model ranks the whole catalog \
for each user's history (beam search over the SID trie; --exact also scores every item's \
SID exactly, to show what the beam loses). Metrics: Recall@5/10 and NDCG@5/10; also the \
share of catalog-valid items, the top-10 coverage of the catalog and the latency per user.\n\n\
Baselines on the same sequences, in the same run: most popular (computed here), and the \
peers' first-order Markov and SASRec (cross-entropy) scripts, run with --python on \
interactions.json written in their layout (--peers DIR holds the scripts; --no-peers \
skips them).\n\n\
Steerability: for a sample of users, requests that state a genre, decade, category or \
brand in words, scored by the share of top-10 items that have it, beside the same \
history alone (the base rate), the words alone (a search) and the constraint as a filter.\n\n\
Output (-o, default MODEL/eval): eval.json, eval.md (the tables), metrics.svg, loss.svg, \
rankings.jsonl (each user's target, its rank and the top-10, for error analysis).\n\n\
Examples:\n  \
sidrec eval --model out/ml100k-tiny --interactions assets/ml-100k/ml-100k.inter\n  \
sidrec eval --model out/amazon --interactions ../shared/data/amazon-scientific/interactions.json \\\n    \
--users 2000 --peers ../shared/peers --python venv/bin/python";

#[derive(Args)]
struct EvalArgs {
    /// Trained model directory (from `sidrec train`).
    #[arg(long)]
    model: PathBuf,
    /// The interactions the model was trained on (same file, same split).
    #[arg(long)]
    interactions: PathBuf,
    /// Output directory [default: MODEL/eval].
    #[arg(short, long)]
    out: Option<PathBuf>,
    /// Replace the output directory if it exists.
    #[arg(long)]
    force: bool,
    /// Dataset name for the report [default: the interactions file's stem].
    #[arg(long)]
    name: Option<String>,
    /// Evaluate a seeded sample of this many users [default: all].
    #[arg(long)]
    users: Option<usize>,
    /// Beam width (at least 10).
    #[arg(long, default_value_t = 20)]
    beams: usize,
    /// Also rank every item by its exact SID log-probability (small catalogs).
    #[arg(long)]
    exact: bool,
    /// Leave each user's history out of sidrec's rankings (as `recommend --exclude-seen`).
    /// Not the standard protocol, which the baselines follow: the report says so.
    #[arg(long)]
    exclude_seen: bool,
    /// Rank by the mixture of the whole history and each of its last N items asked
    /// alone (as `recommend --mix-recent`; 0: the whole history only) [default: as the
    /// model's recipe says, in sidrec.json].
    #[arg(long, value_name = "N")]
    mix_recent: Option<usize>,
    /// Under --mix-recent, each further recent item weighs this many times the one after
    /// it [default: the recipe's, else 0.5].
    #[arg(long, value_name = "X")]
    recent_decay: Option<f32>,
    /// Also mix in a transition memory built from the training parts (what followed each
    /// of the last 5 history items within 3 positions) at weight W against the whole
    /// history's 1, as `recommend --memory` does with the model's transitions.json (0:
    /// off) [default: the recipe's]. The report also ranks by the memory alone, as a
    /// baseline.
    #[arg(long, value_name = "W")]
    memory: Option<f32>,
    /// Users asked the steering requests (0: skip steerability).
    #[arg(long, default_value_t = 200)]
    steer_users: usize,
    /// Directory with the peer scripts (markov_next_item.py, sasrec_ce.py)
    /// [default: $SIDREC_PEERS, else ../shared/peers].
    #[arg(long)]
    peers: Option<PathBuf>,
    /// Python for the peers [default: $SIDREC_PYTHON, else python3].
    #[arg(long)]
    python: Option<String>,
    /// Skip the peer baselines.
    #[arg(long)]
    no_peers: bool,
    /// Skip SASRec (the slowest peer: minutes).
    #[arg(long)]
    no_sasrec: bool,
    /// Seed of the user samples.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

const RECOMMEND_HELP: &str = "Ask a trained model for items.\n\n\
The request chooses the prompt: with --history the model recommends what comes next \
(the text, if any, is added to the prompt); with text alone it searches; --mode describe \
writes a profile of the history's user, --mode chat answers the text freely. Items are \
decoded by beam search over the catalog's SID trie, so every item exists, and the limits \
(--type, --filter, --exclude-seen) are applied inside the search, never after it.\n\n\
History items are catalog ids or titles (\"Toy Story\", \"toy story 1995\"), separated by \
commas.\n\n\
Without --model (or SIDREC_MODEL) the demo model in models/demo answers: a tiny model \
trained on MovieLens-100k.\n\n\
The request's words are read as a person means them, and what was read is printed: titles \
after \"like\", \"similar to\" or \"such as\" join the history (and are left out of the \
answer); the catalog's genres, decades (\"90s\", \"before 1980\"), categories and brands \
(\"by 3M\") become --filter clauses. All the words stay in the prompt. --literal turns the \
reading off and leaves the words to the model alone.\n\n\
Examples:\n  \
sidrec recommend \"a 90s comedy like Toy Story\"\n  \
sidrec recommend --model out/ml100k-tiny --history 1,50,181 -k 5\n  \
sidrec recommend --model out/ml100k-tiny \"a 90s comedy\" --filter 'year>=1990, genre=Comedy'\n  \
sidrec recommend --model out/ml100k-tiny --history \"Toy Story,Star Wars\" --exclude-seen --json\n  \
sidrec recommend --model out/ml100k-tiny --history 1,50 --mode describe";

/// What a request is made of; shared by `recommend` and `repl`.
#[derive(Args, Clone, Debug)]
pub(crate) struct RequestArgs {
    /// Model directory written by `sidrec train` (default: the demo model in
    /// models/demo, trained on MovieLens-100k).
    #[arg(long, env = "SIDREC_MODEL")]
    pub model: Option<PathBuf>,
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
    /// (items for recommend/search, text for describe, both for chat).
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

#[derive(Args)]
struct RecommendArgs {
    /// The request in words, e.g. "a 90s comedy like Toy Story".
    query: Option<String>,
    #[command(flatten)]
    req: RequestArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ReplArgs {
    #[command(flatten)]
    req: RequestArgs,
    /// Start with JSON output.
    #[arg(long)]
    json: bool,
    /// History file of the line editor (default: ~/.sidrec_history).
    #[arg(long, conflicts_with = "no_history_file")]
    history_file: Option<PathBuf>,
    /// Keep no line history on disk.
    #[arg(long)]
    no_history_file: bool,
}

const TRAIN_HELP: &str = "Trains a decoder that speaks the catalog's semantic IDs.\n\n\
Inputs: an artifact directory from `sidrec tokenize` and the users' interactions \
(RecBole .inter, the Amazon interactions.json layout, or JSONL {\"user\", \"items\"}). The \
last two items of every user (validation, test) never appear in training data.\n\n\
Everything else is a recipe: a TOML file of settings (base model, stages, epochs, \
dropout, example mix, and how the model ranks best). Without --recipe, train picks the \
built-in recipe measured best for data like yours and says which: `movielens` for long \
histories, `amazon` for short ones (fewer than 20 items per user on average). \
--set KEY=VALUE changes one setting of it; train_report.json records the whole recipe \
and sidrec.json how the model ranks, so recommend, repl, serve and eval need no flags. \
The recipe files, every key and the measured tables: recipes/*.toml and docs/training.md.\n\n\
Output: config.json, model.safetensors, tokenizer.json (with SID tokens), sidrec.json \
(sha256 of sids.jsonl, recipe, ranking), the catalog and SID map, transitions.json and \
train_report.json (loss curves and the recipe). Written all at once: an interrupted or \
failed run leaves no half-written model.\n\n\
Examples:\n  \
sidrec train --artifacts out/ml-100k --interactions assets/ml-100k/ml-100k.inter -o out/ml100k\n  \
sidrec train --artifacts out/amz --interactions interactions.json -o out/amz --set stage2_epochs=3\n  \
sidrec train --artifacts out/ml-100k --interactions assets/ml-100k/ml-100k.inter --recipe my.toml -o out/m";

#[derive(Args)]
struct TrainArgs {
    /// Artifact directory written by `sidrec tokenize`.
    #[arg(long, help_heading = "Input and output")]
    artifacts: PathBuf,
    /// User interactions (RecBole .inter, Amazon interactions.json, or JSONL).
    #[arg(long, help_heading = "Input and output")]
    interactions: PathBuf,
    /// Output model directory.
    #[arg(short, long, help_heading = "Input and output")]
    out: PathBuf,
    /// Replace the output directory if it is one sidrec wrote.
    #[arg(long, help_heading = "Input and output")]
    force: bool,
    /// Leave out interaction lines that cannot be read and items the catalog lacks,
    /// instead of stopping at the first; they are listed in train_report.json.
    #[arg(long, help_heading = "Input and output")]
    skip_invalid: bool,
    /// The recipe: a built-in name (amazon, movielens) or a TOML file [default: chosen
    /// from the data's history length, and printed].
    #[arg(long, help_heading = "Recipe")]
    recipe: Option<String>,
    /// Change one setting of the recipe, e.g. --set dropout=0.1 --set rank.memory=2
    /// (keys: docs/training.md). Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE", help_heading = "Recipe")]
    set: Vec<String>,
    /// Base model instead of the recipe's: a config JSON (from scratch), a Hugging Face
    /// directory, or a .gguf file (e.g. assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf).
    #[arg(long, help_heading = "Recipe")]
    base: Option<PathBuf>,
    /// Random seed (members take seed, seed + 1, ...).
    #[arg(long, default_value_t = 0, help_heading = "Recipe")]
    seed: u64,
    /// Continue from the checkpoints of an interrupted run with the same settings.
    #[arg(long, help_heading = "Run")]
    resume: bool,
}

#[derive(Args)]
struct ConvertArgs {
    /// The GGUF file.
    gguf: PathBuf,
    /// Output Hugging Face directory.
    #[arg(short, long)]
    out: PathBuf,
    #[arg(long)]
    force: bool,
}

const TOKENIZE_HELP: &str = "Turns a catalog into semantic IDs.\n\n\
Reads the catalog (JSONL, CSV/TSV with a header, RecBole .item, or the Amazon items.json \
layout), renders each item's text from a template, embeds it with a BERT-family sentence \
encoder (or reads precomputed embeddings), quantizes the embeddings with residual k-means \
and writes an artifact directory:\n\n  \
catalog.jsonl          normalised items\n  \
sids.jsonl             id, type, codes, SID token string per item\n  \
codebooks.safetensors  one [codes, d] tensor per level, and the SID vocabulary\n  \
report.json            MSE per level, collision rate, codebook usage, fan-out, timings\n\n\
The directory is written atomically: on any error nothing is left half-written.\n\n\
Examples:\n  \
sidrec tokenize assets/ml-100k/ml-100k.item --type movie -o out/ml-100k\n  \
sidrec tokenize items.jsonl --encoder sentence-transformers/all-MiniLM-L6-v2 -o out/items\n  \
sidrec tokenize --embeddings e.npy --levels 3 --codes 256 -o out/e";

#[derive(Args)]
struct TokenizeArgs {
    /// Catalog file. Optional with --embeddings (items are then named 0..n).
    catalog: Option<PathBuf>,
    /// Output artifact directory [default: out/<catalog or embeddings file stem>].
    #[arg(short, long)]
    out: Option<PathBuf>,
    /// Replace the output directory if it exists.
    #[arg(long)]
    force: bool,
    /// Catalog format [default: from the file extension: .jsonl, .csv, .tsv, .item, .json].
    #[arg(long, value_parser = parse_format)]
    format: Option<Format>,
    /// Entity type of items whose catalog gives none (e.g. movie, track, podcast).
    #[arg(long = "type", default_value = "item")]
    item_type: String,
    /// Leave out catalog records that cannot be read, fail validation or whose text
    /// renders empty, instead of stopping at the first; they are counted and listed in
    /// OUT/skipped.jsonl (line, id, what was wrong).
    #[arg(long)]
    skip_invalid: bool,
    /// Template file for the text embedded per item [default: prompts/item_text.txt,
    /// built in]. Placeholders: {id} {type} {title} {description} {attrs.KEY}.
    #[arg(long)]
    template: Option<PathBuf>,
    /// Sentence encoder: a local model directory or a Hugging Face hub id
    /// [default: assets/minilm, fetched by scripts/fetch-assets.sh].
    #[arg(long, conflicts_with = "embeddings")]
    encoder: Option<String>,
    /// Precomputed embeddings instead of an encoder: .npy float32 [n, d] or .safetensors,
    /// one row per catalog item in order.
    #[arg(long)]
    embeddings: Option<PathBuf>,
    /// Texts per encoder batch (texts are grouped by length; small batches of long texts
    /// allocate less: 16 was fastest on 2 cores).
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Token limit per item text (longer texts are truncated).
    #[arg(long, default_value_t = DEFAULT_MAX_TOKENS)]
    max_tokens: usize,
    /// Number of residual levels.
    #[arg(long, default_value_t = 3)]
    levels: usize,
    /// Codes per level: one number for all levels, or one per level (e.g. 256,256,128).
    #[arg(long, default_value = "256", value_delimiter = ',')]
    codes: Vec<usize>,
    /// Lloyd iterations per level.
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Random seed: the same input and seed give byte-identical SIDs and codebooks.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Code assignment: `balanced` (capacity-balanced levels, prefix-unique last level:
    /// far fewer collisions) or `plain` (nearest centroid, as faiss does).
    #[arg(long, default_value = "balanced")]
    assign: Assign,
    /// Balanced levels: a code holds at most (1 + slack) · n / codes items.
    #[arg(long, default_value_t = 0.25)]
    balance_slack: f32,
    /// Balanced last level: an item moves off its nearest code to a free one only if
    /// that costs at most this fraction more squared error (near-duplicates keep their
    /// code and get a dedup code instead).
    #[arg(long, default_value_t = 0.25)]
    unique_max_cost: f32,
    /// k-means trains on at most this many points per centroid (the rest are assigned).
    #[arg(long, default_value_t = 256)]
    max_points_per_centroid: usize,
    /// Also write the embeddings that were quantized (embeddings.npy).
    #[arg(long)]
    save_embeddings: bool,
    /// Interactions (the file `sidrec train` will read): join collaborative vectors,
    /// built from what users took within a few positions of each other, to the text
    /// embeddings, so that SID prefixes follow co-consumption too. Only each user's
    /// training part (all but the last two items) is read, so evaluation targets never
    /// shape a code.
    #[arg(long)]
    interactions: Option<PathBuf>,
    /// With --interactions: the collaborative share of every squared distance, 0..1
    /// (0.3 kept the most Amazon Scientific validation transitions within one first code;
    /// 0.5 and more lost to it).
    #[arg(long, default_value_t = 0.3, requires = "interactions")]
    collab_weight: f32,
    /// With --interactions: dimensions of the collaborative vectors (PPMI factorised).
    #[arg(long, default_value_t = CollabConfig::default().dim, requires = "interactions")]
    collab_dim: usize,
    /// With --interactions: items at most this many positions apart co-occur (weight
    /// 1/distance).
    #[arg(long, default_value_t = CollabConfig::default().window, requires = "interactions")]
    collab_window: usize,
    /// Print report.json to stdout instead of the human summary.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct InspectArgs {
    /// Artifact directory written by `sidrec tokenize`.
    dir: PathBuf,
    /// Show this item's SID and the items sharing its prefix.
    #[arg(long)]
    item: Option<String>,
    /// Look up the item a SID names, e.g. "<movie><a_17><b_203><c_5>".
    #[arg(long)]
    sid: Option<String>,
    /// Neighbours to list.
    #[arg(long, default_value_t = 10)]
    limit: usize,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

fn parse_format(s: &str) -> Result<Format, String> {
    s.parse::<Format>().map_err(|e| e.to_string())
}

pub fn run() -> Result<()> {
    let cli = Cli::parse();
    sidrec::runtime::set_threads(cli.threads).map_err(anyhow::Error::msg)?;
    let progress = Progress::new(cli.quiet);
    match cli.command {
        Command::Tokenize(a) => cmd_tokenize(a, progress),
        Command::Inspect(a) => cmd_inspect(a),
        Command::Train(a) => cmd_train(a, progress),
        Command::Recommend(a) => cmd_recommend(a),
        Command::Eval(a) => cmd_eval(a, progress, cli.threads),
        Command::Serve(a) => cmd_serve(a),
        Command::Repl(a) => {
            let file = if a.no_history_file {
                None
            } else {
                a.history_file.or_else(|| {
                    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".sidrec_history"))
                })
            };
            crate::repl::run(a.req, a.json, file)
        }
        Command::Convert(a) => {
            let cfg = sidrec::model::hfdir::convert(&a.gguf, &a.out, a.force)?;
            println!(
                "wrote {} ({} layers, hidden {}, vocab {})",
                a.out.display(),
                cfg.num_hidden_layers,
                cfg.hidden_size,
                cfg.vocab_size
            );
            Ok(())
        }
    }
}

fn cmd_tokenize(a: TokenizeArgs, progress: Progress) -> Result<()> {
    let codes = match a.codes.len() {
        1 => vec![a.codes[0]; a.levels],
        n if n == a.levels => a.codes.clone(),
        n => bail!(
            "--codes lists {n} sizes for {} levels: give one size, or one per level",
            a.levels
        ),
    };
    let template = match &a.template {
        Some(p) => Template::load(p)?,
        None => Template::default(),
    };
    let embeddings = match (&a.embeddings, &a.encoder) {
        (Some(p), _) => EmbeddingSource::Precomputed(p.clone()),
        (None, Some(e)) if Path::new(e).exists() => EmbeddingSource::ModelDir(e.into()),
        (None, Some(e)) if e.contains('/') && !e.starts_with('.') && !e.starts_with('/') => {
            let (repo, revision) = match e.split_once('@') {
                Some((r, v)) => (r.to_string(), Some(v.to_string())),
                None => (e.clone(), None),
            };
            EmbeddingSource::Hub { repo, revision }
        }
        (None, Some(e)) => {
            bail!("--encoder {e}: no such directory (and not a hub id like org/name)")
        }
        (None, None) => {
            let dir = default_encoder_dir();
            if !dir.join("model.safetensors").exists() {
                bail!(
                    "no encoder: {} does not exist. Run scripts/fetch-assets.sh, or pass \
                     --encoder DIR|HUB_ID, or --embeddings FILE",
                    dir.display()
                );
            }
            EmbeddingSource::ModelDir(dir)
        }
    };
    let out = match &a.out {
        Some(o) => o.clone(),
        None => {
            let src = a.catalog.as_ref().or(a.embeddings.as_ref());
            let stem = src
                .and_then(|p| p.file_stem())
                .and_then(|s| s.to_str())
                .unwrap_or("sids");
            PathBuf::from("out").join(stem)
        }
    };
    let opts = TokenizeOptions {
        catalog: a.catalog.clone(),
        load: LoadOptions {
            format: a.format,
            default_type: a.item_type.clone(),
            skip_invalid: a.skip_invalid,
        },
        template,
        embeddings,
        batch_size: a.batch_size,
        max_tokens: a.max_tokens,
        quantize: QuantizeConfig {
            levels: codes,
            iters: a.iters,
            seed: a.seed,
            max_points_per_centroid: a.max_points_per_centroid,
            assign: a.assign,
            balance_slack: a.balance_slack,
            unique_max_cost: a.unique_max_cost,
            ..Default::default()
        },
        out: out.clone(),
        force: a.force,
        save_embeddings: a.save_embeddings,
        collab: a.interactions.as_ref().map(|path| CollabOptions {
            interactions: path.clone(),
            read: ReadOptions {
                skip_invalid: a.skip_invalid,
                ..ReadOptions::default()
            },
            weight: a.collab_weight,
            config: CollabConfig {
                dim: a.collab_dim,
                window: a.collab_window,
                seed: a.seed,
                ..Default::default()
            },
        }),
    };
    let report = tokenize::run(&opts, progress)?;
    if report.skipped > 0 {
        sidrec::progress::warn(&format!(
            "--skip-invalid left out {} catalog records; they are listed in {}",
            report.skipped,
            out.join(artifacts::SKIPPED_FILE).display()
        ));
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_summary(&report, &out);
    }
    Ok(())
}

/// `assets/minilm` beside the current directory, or beside the executable's crate.
fn default_encoder_dir() -> PathBuf {
    let local = PathBuf::from("assets/minilm");
    if local.exists() {
        return local;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/minilm")
}

fn print_summary(r: &Report, out: &Path) {
    let types: Vec<String> = r.types.iter().map(|(t, n)| format!("{t} {n}")).collect();
    println!(
        "{} items ({}), d={}, {} levels x {:?} codes, assign={}, seed={}",
        r.n,
        types.join(", "),
        r.d,
        r.levels,
        r.codes,
        r.assign,
        r.seed
    );
    println!("  encoder      {}", r.encoder);
    if let Some(c) = &r.collab {
        println!(
            "  collab       weight {} dim {} window {} from {} ({} users, {} training interactions, {} items covered)",
            c.weight,
            c.stats.eigenvalues.len(),
            c.config.window,
            c.interactions,
            c.users,
            c.training_interactions,
            c.stats.items_covered
        );
    }
    for (l, lv) in r.quantization.levels.iter().enumerate() {
        println!(
            "  level {}      mse {:.5}  usage {:5.1}%  perplexity {:7.1}  fit {:.2}s",
            sidrec::sid::level_letter(l),
            lv.mse,
            lv.usage * 100.0,
            lv.perplexity,
            r.timings.levels.get(l).map_or(0.0, |t| t.fit + t.assign)
        );
    }
    println!(
        "  collisions   {:.2}% of items before dedup ({} dedup codes, largest group {})",
        r.collision_rate * 100.0,
        r.dedup_codes,
        r.quantization.max_collision_group
    );
    let fan: Vec<String> = r
        .quantization
        .fanout
        .iter()
        .map(|f| format!("{} max {} mean {:.1}", f.depth, f.max, f.mean))
        .collect();
    println!("  fan-out      {}", fan.join(" | "));
    println!(
        "  time         {:.2}s (load {:.2}, embed {:.2}, quantize {:.2})",
        r.timings.total, r.timings.load, r.timings.embed, r.timings.quantize
    );
    println!("  wrote        {}", out.display());
}

fn cmd_inspect(a: InspectArgs) -> Result<()> {
    let report_path = a.dir.join(artifacts::REPORT_FILE);
    let report: Report = serde_json::from_str(
        &std::fs::read_to_string(&report_path)
            .with_context(|| format!("reading {}", report_path.display()))?,
    )
    .with_context(|| format!("parsing {}", report_path.display()))?;
    if a.item.is_none() && a.sid.is_none() {
        if a.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print_summary(&report, &a.dir);
        }
        return Ok(());
    }
    let (catalog, map) = artifacts::read_pair(&a.dir)?;
    let index = match (&a.item, &a.sid) {
        (Some(id), _) => map
            .index_of(id)
            .with_context(|| format!("no item with id {id:?} in {}", a.dir.display()))?,
        (None, Some(sid)) => {
            let rec = map
                .lookup_sid(sid)
                .with_context(|| format!("no item has SID {sid}"))?;
            map.index_of(&rec.id).context("SID map is inconsistent")?
        }
        (None, None) => unreachable!(),
    };
    let rec = &map.records[index];
    let item = &catalog.items[index];
    // Neighbours: the items sharing the longest prefix first (all but the SID's last
    // token, i.e. dedup siblings when it has one), down to the type token alone.
    let depth = map.trie.path(index as u32).map_or(1, |p| p.len() - 1);
    let mut shown = Vec::new();
    for d in (1..=depth).rev() {
        for j in map.sharing_prefix(index, d) {
            if shown.len() >= a.limit {
                break;
            }
            if !shown.iter().any(|&(k, _)| k == j) {
                shown.push((j, d));
            }
        }
    }
    if a.json {
        let neighbours: Vec<serde_json::Value> = shown
            .iter()
            .map(|&(j, d)| {
                serde_json::json!({
                    "id": map.records[j].id, "title": catalog.items[j].title,
                    "sid": map.records[j].sid, "shared_prefix": d,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "item": item, "sid": rec.sid, "codes": rec.codes, "neighbours": neighbours,
            }))?
        );
        return Ok(());
    }
    println!("{}  {}  [{}]", rec.sid, item.title, rec.id);
    println!("items sharing its prefix (longest first):");
    for (j, d) in shown {
        println!(
            "  {:<40} {} tokens shared  {}",
            map.records[j].sid, d, catalog.items[j].title
        );
    }
    Ok(())
}

fn cmd_train(a: TrainArgs, progress: Progress) -> Result<()> {
    use sidrec::train::recipe::{self, Loaded};
    let mut loaded = match &a.recipe {
        Some(spec) => Loaded::from_spec(spec)?,
        None => {
            let (loaded, why) = recipe::choose(mean_history(&a)?)?;
            if !progress.quiet {
                eprintln!(
                    "recipe: {} ({}): {why}; --recipe chooses another",
                    loaded.recipe.name, loaded.origin
                );
            }
            loaded
        }
    };
    if let Some(base) = &a.base {
        // A path given on the command line is relative to the working directory.
        let abs = std::path::absolute(base).unwrap_or_else(|_| base.clone());
        loaded.recipe.base = abs.display().to_string();
    }
    loaded.set(&a.set)?;
    let mut opts = loaded.options(
        a.artifacts.clone(),
        a.interactions.clone(),
        a.out.clone(),
        a.seed,
    )?;
    opts.force = a.force;
    opts.resume = a.resume;
    opts.skip_invalid = a.skip_invalid;
    if opts.select_users > 0 {
        opts.validator = Some(sidrec::eval::select_validator());
    }
    let members = loaded.recipe.members;
    let reports = sidrec::train::pipeline::run_members(&opts, members, progress)?;
    for (i, report) in reports.iter().enumerate() {
        let member = match reports.len() {
            1 => String::new(),
            _ => format!("member {i} (seed {}): ", a.seed.wrapping_add(i as u64)),
        };
        println!(
            "{member}trained {} ({:.1}M parameters, {} SID tokens) on {} users in {:.0}s",
            report.base,
            report.params as f64 / 1e6,
            report.sid_tokens,
            report.users,
            report.seconds
        );
        print_stages(report);
    }
    println!(
        "  wrote {} (recipe {}{})",
        a.out.display(),
        loaded.recipe.name,
        if a.set.is_empty() {
            String::new()
        } else {
            format!(", with {}", a.set.join(" "))
        }
    );
    Ok(())
}

/// The mean length of the users' training histories, which picks the recipe.
fn mean_history(a: &TrainArgs) -> Result<f64> {
    let catalog = artifacts::read_catalog(&a.artifacts)?;
    let read = ReadOptions {
        skip_invalid: a.skip_invalid,
        ..ReadOptions::default()
    };
    let (seqs, _) = sidrec::interactions::Sequences::load(&a.interactions, &catalog, &read)?;
    let split = seqs.split();
    let total: usize = split.train.iter().map(Vec::len).sum();
    Ok(total as f64 / split.train.len().max(1) as f64)
}

/// One line per training stage of a report.
fn print_stages(report: &sidrec::train::pipeline::TrainReport) {
    for s in &report.stages {
        let first = s.report.train_loss.first().map_or(f32::NAN, |p| p.loss);
        let last = s.report.train_loss.last().map_or(f32::NAN, |p| p.loss);
        let valid = s.report.valid_loss.last().map_or(f32::NAN, |v| v.1);
        println!(
            "  stage {:<8} {:?}: {} examples, {} steps, loss {first:.3} -> {last:.3}, valid {valid:.3}, {:.0} tokens/s",
            s.name, s.mode, s.examples, s.report.steps, s.report.tokens_per_s
        );
        if let Some(step) = s.report.selected_step {
            let best = s.report.valid_metric.iter().find(|p| p.0 == step);
            println!(
                "  kept step {step}'s weights: validation NDCG@10 {:.4} (the last evaluation's {:.4})",
                best.map_or(f64::NAN, |p| p.1),
                s.report.valid_metric.last().map_or(f64::NAN, |p| p.1)
            );
        }
    }
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
    use sidrec::decode::{engine::Output, Format};
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
            for s in &segs {
                match s {
                    Output::Text { text } => write!(out, "{text}")?,
                    Output::Item(r) => write!(out, "[{} ({})]", r.title, r.id)?,
                }
            }
            writeln!(out)?;
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

fn cmd_eval(a: EvalArgs, progress: Progress, threads: Option<usize>) -> Result<()> {
    use sidrec::eval::run::{self, Peers, RunOptions};
    let peers = (!a.no_peers).then(|| Peers {
        dir: a
            .peers
            .clone()
            .or_else(|| std::env::var_os("SIDREC_PEERS").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("../shared/peers")),
        python: a
            .python
            .clone()
            .or_else(|| std::env::var("SIDREC_PYTHON").ok())
            .unwrap_or_else(|| "python3".into()),
        // The peers get the thread count sidrec runs with (all cores by default).
        threads: threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
        sasrec: !a.no_sasrec,
    });
    let opts = RunOptions {
        out: a.out.clone().unwrap_or_else(|| a.model.join("eval")),
        model: a.model,
        interactions: a.interactions,
        force: a.force,
        name: a.name,
        users: a.users,
        beams: a.beams,
        exact: a.exact,
        exclude_seen: a.exclude_seen,
        mix_recent: a.mix_recent,
        recent_decay: a.recent_decay,
        memory: a.memory,
        steer_users: a.steer_users,
        peers,
        seed: a.seed,
    };
    let (report, files) = run::run(&opts, &progress)?;
    print!("{}", report.markdown());
    for f in files {
        eprintln!("wrote {}", f.display());
    }
    Ok(())
}

fn cmd_recommend(a: RecommendArgs) -> Result<()> {
    let query = a.query.clone().unwrap_or_default();
    check_request_args(&a.req, &query)?;
    let engine = load_engine(&a.req.model)?;
    let req = build_request(&engine, &a.req, &query)?;
    print!("{}", answer(&engine, &req, &gen_config(&a.req), a.json)?);
    Ok(())
}
