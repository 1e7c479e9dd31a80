//! `sidrec eval`: measure a model beside the baselines.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use sidrec::progress::Progress;

pub(crate) const EVAL_HELP: &str = "Measure a trained model on the standard protocol.\n\n\
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
pub(crate) struct EvalArgs {
    /// Trained model directory (from `sidrec train`).
    #[arg(long)]
    model: PathBuf,
    /// How the decoder's matrices are held for ranking: f32 (as trained), bf16 or
    /// int8, to measure what a smaller format costs.
    #[arg(long, default_value = "f32", value_name = "FORMAT")]
    weights: sidrec::model::packed::WeightFormat,
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
    /// Held-out requests in words (JSON lines: request, kind, genre and/or decade, as
    /// tests/data/requests/movielens.jsonl): adds the language-steering section, the
    /// model alone beside dense retrieval with the same encoder, history + words for the
    /// steering users, and the genres their profiles name.
    #[arg(long, value_name = "FILE")]
    requests: Option<PathBuf>,
    /// Held-out format phrasings (lines `items|text|both: ... {request} ...`, as
    /// tests/data/requests/formats.txt): with --requests, asks each request in chat once
    /// per form and reports how often the answer has the form asked for.
    #[arg(long, value_name = "FILE", requires = "requests")]
    formats: Option<PathBuf>,
    /// The sentence encoder of the language section's dense baseline
    /// [default: assets/minilm].
    #[arg(long, value_name = "DIR")]
    encoder: Option<PathBuf>,
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

pub(crate) fn cmd_eval(a: EvalArgs, progress: Progress, threads: Option<usize>) -> Result<()> {
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
        weights: a.weights,
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
        requests: a.requests,
        encoder: a.encoder,
        formats: a.formats,
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
