//! `sidrec serve`: its flags and the server start.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use sidrec::model::packed::WeightFormat;

use super::request::*;

pub(crate) const SERVE_HELP: &str = "Serve a model over HTTP (JSON in and out).\n\n\
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
pub(crate) struct ServeArgs {
    /// Model directory written by `sidrec train` (default: the demo model).
    #[arg(long, env = "SIDREC_MODEL")]
    model: Option<PathBuf>,
    /// How the decoder's matrices are held in memory: f32 (as trained), bf16 or int8
    /// (an f32 scale per 32 weights): smaller weights serve faster and in less memory,
    /// at a small, measured cost in accuracy (docs/benchmarks.md).
    #[arg(
        long,
        env = "SIDREC_WEIGHTS",
        default_value = "f32",
        value_name = "FORMAT"
    )]
    weights: WeightFormat,
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: std::net::SocketAddr,
    /// Requests decoded at the same time. Requests that decode together share forward
    /// passes (at most one pass per core runs at once), with the same answers; each
    /// holds its own KV cache. On 2 cores, 2 measured best (docs/benchmarks.md).
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
pub(crate) fn seconds(s: &str) -> Result<std::time::Duration, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 && x <= 86_400.0 => {
            Ok(std::time::Duration::from_secs_f64(x))
        }
        _ => Err(format!(
            "expected seconds, more than 0 and at most 86400, not {s:?}"
        )),
    }
}

pub(crate) fn cmd_serve(a: ServeArgs) -> Result<()> {
    use std::io::Write;
    if a.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let engine = load_engine(&a.model, a.weights)?.with_batching(a.workers > 1);
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
