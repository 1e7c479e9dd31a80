//! `sidrec recommend`: one request, one answer.

use anyhow::Result;
use clap::Args;

use super::request::*;

pub(crate) const RECOMMEND_HELP: &str = "Ask a trained model for items.\n\n\
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

#[derive(Args)]
pub(crate) struct RecommendArgs {
    /// The request in words, e.g. "a 90s comedy like Toy Story".
    query: Option<String>,
    #[command(flatten)]
    req: RequestArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub(crate) fn cmd_recommend(a: RecommendArgs) -> Result<()> {
    let query = a.query.clone().unwrap_or_default();
    check_request_args(&a.req, &query)?;
    let engine = load_engine(&a.req.model, a.req.weights)?;
    let req = build_request(&engine, &a.req, &query)?;
    print!("{}", answer(&engine, &req, &gen_config(&a.req), a.json)?);
    Ok(())
}
