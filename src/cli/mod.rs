//! Command-line flags and the commands behind them.

//!
//! One file per command (its flags, its help and what it runs); `request` holds what
//! `recommend` and `repl` share. Nothing outside this folder imports it.

mod convert;
mod eval;
mod inspect;
mod recommend;
mod repl;
mod request;
mod serve;
mod tokenize;
mod train;

use anyhow::Result;
use clap::{Parser, Subcommand};

use sidrec::catalog::Format;
use sidrec::progress::Progress;

use convert::ConvertArgs;
use eval::{cmd_eval, EvalArgs, EVAL_HELP};
use inspect::{cmd_inspect, InspectArgs};
use recommend::{cmd_recommend, RecommendArgs, RECOMMEND_HELP};
use repl::ReplArgs;
use serve::{cmd_serve, ServeArgs, SERVE_HELP};
use tokenize::{cmd_tokenize, TokenizeArgs, TOKENIZE_HELP};
use train::{cmd_train, TrainArgs, TRAIN_HELP};

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
    #[command(long_about = repl::HELP)]
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

pub(crate) fn parse_format(s: &str) -> Result<Format, String> {
    s.parse::<Format>().map_err(|e| e.to_string())
}

pub fn run() -> Result<()> {
    let cli = Cli::parse();
    // Batch work (embedding a catalog, training, evaluation, which trains baselines)
    // keeps its peak heap for the next batch; a server gives large blocks back (see
    // `runtime`).
    match cli.command {
        Command::Tokenize(_) | Command::Train(_) | Command::Eval(_) => {
            sidrec::runtime::tune_allocator()
        }
        Command::Serve(_) | Command::Recommend(_) | Command::Repl(_) => {
            sidrec::runtime::tune_allocator_for_serving()
        }
        _ => {}
    }
    sidrec::runtime::set_threads(cli.threads).map_err(anyhow::Error::msg)?;
    let progress = Progress::new(cli.quiet);
    match cli.command {
        Command::Tokenize(a) => cmd_tokenize(a, progress),
        Command::Inspect(a) => cmd_inspect(a),
        Command::Train(a) => cmd_train(a, progress),
        Command::Recommend(a) => cmd_recommend(a),
        Command::Eval(a) => cmd_eval(a, progress, cli.threads),
        Command::Serve(a) => cmd_serve(a),
        Command::Repl(a) => repl::cmd_repl(a),
        Command::Convert(a) => convert::cmd_convert(a),
    }
}
