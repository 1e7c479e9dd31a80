//! Load test of `sidrec serve` on loopback: the demo model (or `SIDREC_MODEL`) behind the
//! real router; for each weight format in `SIDREC_WEIGHTS` (default `f32,int8`), without
//! batching (2 workers, the old default) and with it (16 workers sharing passes), and
//! for each client count in `SIDREC_CLIENTS` (default `1,4,16`): that many client
//! threads sending `SIDREC_REQUESTS` recommend requests in all (default 400; each a
//! seeded random 5-item history, k = 10), stopping early after `SIDREC_SECONDS`
//! (default 120). Reports throughput and p50/p90/p99 latency as the clients saw it, and
//! the run's peak RSS; any non-200 answer or transport error is counted and makes the
//! run fail.
//!
//!   cargo bench --bench serve

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use sidrec::decode::Engine;
use sidrec::model::packed::WeightFormat;
use sidrec::serve::{router, serve, ServeOptions};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// One load run's figures.
struct Run {
    ok: usize,
    errors: usize,
    wall: f64,
    latencies: Vec<f64>,
}

/// `clients` threads sending `total` requests to a fresh server over `engine`.
fn load(
    engine: Arc<Engine>,
    workers: usize,
    clients: usize,
    total: usize,
    budget: Duration,
) -> anyhow::Result<Run> {
    let ids: Vec<String> = engine
        .catalog()
        .items
        .iter()
        .map(|i| i.id.clone())
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let opts = ServeOptions {
        workers,
        ..Default::default()
    };
    let probe = sidrec::serve::probe(&engine)?;
    let app = router(engine, opts.clone(), probe);
    let server = rt.spawn(async move {
        serve(listener, app, &opts, async {
            let _ = stop_rx.await;
        })
        .await
    });

    let url = format!("http://{addr}/v1/recommend");
    let next = AtomicUsize::new(0);
    let errors = AtomicUsize::new(0);
    let t0 = Instant::now();
    let mut latencies: Vec<f64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                let (url, ids, next, errors) = (&url, &ids, &next, &errors);
                s.spawn(move || {
                    let agent = ureq::AgentBuilder::new().build();
                    let mut lat = Vec::new();
                    loop {
                        let n = next.fetch_add(1, Ordering::SeqCst);
                        if n >= total || t0.elapsed() > budget {
                            break;
                        }
                        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(n as u64);
                        let history: Vec<&str> = (0..5)
                            .map(|_| ids[rng.gen_range(0..ids.len())].as_str())
                            .collect();
                        let body = serde_json::json!({"history": history, "k": 10});
                        let t = Instant::now();
                        let res = agent
                            .post(url)
                            .set("Content-Type", "application/json")
                            .send_string(&body.to_string());
                        let ok = match res {
                            Ok(r) => r.status() == 200 && r.into_string().is_ok(),
                            Err(e) => {
                                eprintln!("request {n}: {e}");
                                false
                            }
                        };
                        if ok {
                            lat.push(t.elapsed().as_secs_f64() * 1e3);
                        } else {
                            errors.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    lat
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let wall = t0.elapsed().as_secs_f64();
    let _ = stop_tx.send(());
    rt.block_on(server)??;
    latencies.sort_by(f64::total_cmp);
    Ok(Run {
        ok: latencies.len(),
        errors: errors.load(Ordering::SeqCst),
        wall,
        latencies,
    })
}

/// This process's peak resident memory (VmHWM), in MB.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let dir = std::env::var("SIDREC_MODEL")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/models/demo").to_string());
    let clients: Vec<usize> = std::env::var("SIDREC_CLIENTS")
        .unwrap_or_else(|_| "1,4,16".into())
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .map(|c: usize| c.max(1))
        .collect();
    let total = env_or("SIDREC_REQUESTS", 400);
    let budget = Duration::from_secs(env_or("SIDREC_SECONDS", 120) as u64);
    let formats: Vec<WeightFormat> = std::env::var("SIDREC_WEIGHTS")
        .unwrap_or_else(|_| "f32,int8".into())
        .split(',')
        .map(|f| f.trim().parse().map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<_>>()?;
    sidrec::runtime::tune_allocator_for_serving();
    sidrec::runtime::set_threads(Some(2)).map_err(anyhow::Error::msg)?;
    println!(
        "sidrec serve load test: model {dir}, kernels {}",
        sidrec::simd::level().name()
    );
    println!("| weights | batching | workers | clients | ok | errors | req/s | p50 ms | p90 ms | p99 ms |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut failed = 0;
    for &format in &formats {
        for (batching, workers) in [(false, 2), (true, 16)] {
            let engine = Arc::new(
                Engine::load(&dir)?
                    .with_weights(format)?
                    .with_batching(batching),
            );
            for &c in &clients {
                let r = load(engine.clone(), workers, c, total, budget)?;
                println!(
                    "| {format} | {} | {workers} | {c} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
                    if batching { "on" } else { "off" },
                    r.ok,
                    r.errors,
                    r.ok as f64 / r.wall,
                    pct(&r.latencies, 0.5),
                    pct(&r.latencies, 0.9),
                    pct(&r.latencies, 0.99),
                );
                failed += r.errors + usize::from(r.ok == 0);
            }
            if let Some(stats) = engine.batch_stats() {
                println!(
                    "  (batching: {} request steps in {} passes)",
                    stats.jobs, stats.passes
                );
            }
        }
    }
    if let Some(mb) = peak_rss_mb() {
        println!("peak RSS of the whole run (server and clients): {mb:.0} MB");
    }
    if failed > 0 {
        anyhow::bail!("{failed} requests failed");
    }
    Ok(())
}
