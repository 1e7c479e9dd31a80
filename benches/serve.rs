//! Load test of `sidrec serve` on loopback: the demo model (or `SIDREC_MODEL`) behind the
//! real router, `SIDREC_CLIENTS` client threads (default 4) sending `SIDREC_REQUESTS`
//! recommend requests in all (default 400; each a seeded random 5-item history, k = 10),
//! stopping early after `SIDREC_SECONDS` (default 120). Reports throughput and p50/p90/p99
//! latency as the clients saw it; any non-200 answer or transport error is counted and
//! makes the run fail.
//!
//!   cargo bench --bench serve

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use sidrec::decode::Engine;
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

fn main() -> anyhow::Result<()> {
    let dir = std::env::var("SIDREC_MODEL")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/models/demo").to_string());
    let clients = env_or("SIDREC_CLIENTS", 4).max(1);
    let total = env_or("SIDREC_REQUESTS", 400);
    let budget = Duration::from_secs(env_or("SIDREC_SECONDS", 120) as u64);
    let workers = env_or("SIDREC_WORKERS", 2).max(1);

    let engine = Engine::load(&dir)?;
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
    let app = router(Arc::new(engine), opts.clone(), probe);
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
    let ok = latencies.len();
    let errors = errors.load(Ordering::SeqCst);
    println!("sidrec serve load test: model {dir}");
    println!(
        "  {clients} clients, {workers} workers, {ok} requests ok, {errors} errors, {wall:.1} s"
    );
    println!("  throughput {:.1} requests/s", ok as f64 / wall);
    println!(
        "  latency ms: p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}",
        pct(&latencies, 0.5),
        pct(&latencies, 0.9),
        pct(&latencies, 0.99),
        latencies.last().copied().unwrap_or(f64::NAN)
    );
    if errors > 0 || ok == 0 {
        anyhow::bail!("{errors} requests failed");
    }
    Ok(())
}
