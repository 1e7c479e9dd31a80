//! Residual k-means benchmark: sidrec beside faiss (and linfa) on the same input, in the
//! same run. Not a test: it prints a table and one JSON line of figures and ratios.
//!
//!   cargo bench --bench tokenize
//!
//! Environment:
//! - `SIDREC_PYTHON`: a Python with numpy and faiss-cpu (default `python3`);
//! - `SIDREC_PEERS`: the peers directory (default `../shared/peers`);
//! - `SIDREC_AMAZON`: the Amazon Scientific directory (default `../shared/data/amazon-scientific`;
//!   skipped when absent). Its MiniLM embeddings are computed once and cached;
//! - `SIDREC_BENCH_THREADS`: threads for both sides (default 2);
//! - `SIDREC_BENCH_LINFA=0` skips the linfa comparison (it takes a minute).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde_json::{json, Value};
use sidrec::catalog::{Catalog, LoadOptions};
use sidrec::embed::{self, BertEncoder};
use sidrec::kmeans::{self, KMeansConfig, Rows};
use sidrec::npy;
use sidrec::quantize::{quantize, Assign, QuantizeConfig};
use sidrec::template::Template;

fn env_path(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(default))
}

fn python() -> String {
    std::env::var("SIDREC_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn run_json(cmd: &mut Command) -> Value {
    let out = cmd.output().expect("running a peer");
    if !out.status.success() {
        panic!(
            "peer failed: {:?}\n{}",
            cmd,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("peer printed {line:?}: {e}"))
}

fn faiss(peers: &Path, npy: &Path, threads: usize) -> Value {
    run_json(
        Command::new(python())
            .arg(peers.join("rkmeans_faiss.py"))
            .arg(npy)
            .args(["--levels", "3", "--codes", "256", "--iters", "20"])
            .args(["--threads", &threads.to_string()]),
    )
}

/// sidrec's residual k-means on the same matrix, timed like the peer (fit + assign,
/// excluding the load).
fn sidrec_rk(data: &[f32], n: usize, d: usize, assign: Assign) -> Value {
    let cfg = QuantizeConfig {
        levels: vec![256; 3],
        iters: 20,
        assign,
        ..Default::default()
    };
    let t = Instant::now();
    let q = quantize(Rows::new(data, n, d), &vec![0; n], &cfg).expect("quantize");
    let secs = t.elapsed().as_secs_f64();
    json!({
        "assign": assign.to_string(), "seconds": secs,
        "level_mse": q.report.levels.iter().map(|l| l.mse).collect::<Vec<_>>(),
        "final_mse": q.report.final_mse, "collision_rate": q.report.collision_rate,
    })
}

fn compare(name: &str, peer: &Value, ours: &[Value]) -> Value {
    let fs = peer["seconds"].as_f64().unwrap_or(f64::NAN);
    let fm = peer["final_mse"].as_f64().unwrap_or(f64::NAN);
    let fc = peer["collision_rate"].as_f64().unwrap_or(f64::NAN);
    println!("\n{name}");
    println!(
        "  {:<18} {:>8} {:>10} {:>11} {:>10} {:>9}",
        "", "seconds", "final MSE", "collisions", "time ratio", "MSE ratio"
    );
    println!(
        "  {:<18} {:>8.2} {:>10.5} {:>10.2}% {:>10} {:>9}",
        "faiss",
        fs,
        fm,
        fc * 100.0,
        "1.00",
        "1.000"
    );
    let mut rows = Vec::new();
    for o in ours {
        let s = o["seconds"].as_f64().unwrap_or(f64::NAN);
        let m = o["final_mse"].as_f64().unwrap_or(f64::NAN);
        let c = o["collision_rate"].as_f64().unwrap_or(f64::NAN);
        println!(
            "  {:<18} {:>8.2} {:>10.5} {:>10.2}% {:>10.2} {:>9.3}",
            format!("sidrec {}", o["assign"].as_str().unwrap_or("")),
            s,
            m,
            c * 100.0,
            s / fs,
            m / fm
        );
        rows.push(json!({"sidrec": o, "time_ratio": s / fs, "mse_ratio": m / fm}));
    }
    json!({"dataset": name, "faiss": peer, "sidrec": rows})
}

/// One level of k-means with linfa-clustering beside sidrec's, on the same training
/// sample: why the hot path is sidrec's own (docs/benchmarks.md, "Tokenize").
fn linfa_level(data: &[f32], n: usize, d: usize) -> Value {
    use linfa::traits::Fit;
    use linfa::DatasetBase;
    use linfa_clustering::{KMeans, KMeansInit};
    use rand::SeedableRng;
    let (k, iters) = (256, 5);
    let m = (k * 64).min(n); // 64 points per centroid keeps linfa's run near a minute
    let sample = &data[..m * d];
    let t = Instant::now();
    let cfg = KMeansConfig {
        k,
        iters,
        max_points_per_centroid: 64,
        init: kmeans::Init::Random,
        ..Default::default()
    };
    let c = kmeans::fit(Rows::new(sample, m, d), &cfg, None);
    let ours = t.elapsed().as_secs_f64();
    let ours_mse = {
        let (l, _) = kmeans::assign(Rows::new(sample, m, d), c.rows());
        kmeans::mse(Rows::new(sample, m, d), c.rows(), &l)
    };
    let arr = ndarray::Array2::from_shape_vec((m, d), sample.to_vec()).expect("shape");
    let ds = DatasetBase::from(arr);
    let rng = rand_xoshiro::Xoshiro256Plus::seed_from_u64(0);
    let t = Instant::now();
    let model = KMeans::params_with_rng(k, rng)
        .max_n_iterations(iters as u64)
        .tolerance(1e-12)
        .n_runs(1)
        .init_method(KMeansInit::Random)
        .fit(&ds)
        .expect("linfa fit");
    let theirs = t.elapsed().as_secs_f64();
    let cents = model.centroids();
    let cflat: Vec<f32> = cents.iter().copied().collect();
    let (l, _) = kmeans::assign(Rows::new(sample, m, d), Rows::new(&cflat, k, d));
    let linfa_mse = kmeans::mse(Rows::new(sample, m, d), Rows::new(&cflat, k, d), &l);
    println!(
        "\nlinfa-clustering, one level ({m} x {d}, k={k}, {iters} iterations, random init):\n  \
         linfa {theirs:.2}s (MSE {linfa_mse:.5}), sidrec {ours:.2}s (MSE {ours_mse:.5}): \
         sidrec is {:.1}x faster",
        theirs / ours
    );
    json!({"points": m, "d": d, "k": k, "iters": iters, "linfa_seconds": theirs,
           "sidrec_seconds": ours, "speedup": theirs / ours,
           "linfa_mse": linfa_mse, "sidrec_mse": ours_mse})
}

/// The Amazon Scientific item texts as `sidrec tokenize` renders them (`None`: absent).
fn amazon_texts(dir: &Path) -> Option<Vec<String>> {
    let items = dir.join("items.json");
    if !items.exists() {
        println!(
            "\n(skipping Amazon Scientific: {} not found)",
            items.display()
        );
        return None;
    }
    let catalog = Catalog::load(
        &items,
        &LoadOptions {
            format: None,
            default_type: "product".into(),
            skip_invalid: false,
        },
    )
    .expect("amazon catalog");
    let template = Template::default();
    Some(catalog.items.iter().map(|i| template.render(i)).collect())
}

fn minilm() -> BertEncoder {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/minilm");
    BertEncoder::from_dir(&dir, embed::DEFAULT_MAX_TOKENS)
        .expect("MiniLM (run scripts/fetch-assets.sh)")
}

fn amazon_embeddings(texts: &[String], cache: &Path) -> PathBuf {
    let out = cache.join("amazon-minilm.npy");
    if out.exists() {
        return out;
    }
    let enc = minilm();
    eprintln!(
        "embedding {} Amazon items with MiniLM (once; cached)…",
        texts.len()
    );
    let e = embed::encode_all(&enc, texts, 64, &mut |_| {}).expect("encode");
    embed::save_npy(&e, &out).expect("save");
    out
}

/// The sentence encoder beside `dense_retrieval.py` (the same MiniLM, the same texts, the
/// same 256-token cut, batches of 64 sorted by length on both sides): items per second.
fn encoder(peers: &Path, cache: &Path, texts: &[String], threads: usize) -> Value {
    let items = cache.join("encoder-items.jsonl");
    let lines: Vec<String> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"id": i.to_string(), "text": t}).to_string())
        .collect();
    std::fs::write(&items, lines.join("\n") + "\n").expect("write items");
    let reqs = cache.join("encoder-requests.jsonl");
    std::fs::write(&reqs, "{\"query\": \"a lab scale\"}\n").expect("write requests");
    let enc = minilm();
    let t = Instant::now();
    embed::encode_all(&enc, texts, 64, &mut |_| {}).expect("encode");
    let ours = texts.len() as f64 / t.elapsed().as_secs_f64();
    let minilm = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/minilm");
    // The peer needs torch, which the k-means peers do not: without it, say so.
    let peer = Command::new(python())
        .arg(peers.join("dense_retrieval.py"))
        .arg(&minilm)
        .arg(&items)
        .arg(&reqs)
        .args(["--threads", &threads.to_string()])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
            serde_json::from_str::<Value>(stdout.lines().last().unwrap_or_default()).ok()
        })
        .unwrap_or(Value::Null);
    let theirs = peer.get("items_per_s").and_then(Value::as_f64);
    println!(
        "\nSentence encoder (MiniLM), {} Amazon Scientific item texts, {threads} threads",
        texts.len()
    );
    println!("  sidrec           {ours:8.1} items/s");
    match theirs {
        Some(p) => println!(
            "  PyTorch peer     {p:8.1} items/s   sidrec / peer {:.2}x",
            ours / p
        ),
        None => println!("  PyTorch peer     (not run: set SIDREC_PYTHON to a Python with torch)"),
    }
    json!({"texts": texts.len(), "sidrec_items_per_s": ours, "peer": peer,
           "ratio": theirs.map(|p| ours / p)})
}

fn main() {
    // As `sidrec tokenize` runs.
    sidrec::runtime::tune_allocator();
    let threads: usize = std::env::var("SIDREC_BENCH_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .expect("thread pool");
    println!(
        "kernels: sidrec {} (SIDREC_SIMD narrows them), gemm the CPU's widest",
        sidrec::simd::level().name()
    );
    let peers = env_path("SIDREC_PEERS", "../shared/peers");
    let cache = env_path("SIDREC_BENCH_DIR", "target/bench-data");
    std::fs::create_dir_all(&cache).expect("bench dir");
    let mut results = Vec::new();

    // 1. The synthetic 100k x 384 matrix.
    let e = cache.join("e.npy");
    if !e.exists() {
        let st = Command::new(python())
            .arg(peers.join("make_embeddings.py"))
            .arg(&e)
            .args(["--n", "100000", "--d", "384"])
            .status()
            .expect("make_embeddings.py");
        assert!(st.success(), "make_embeddings.py failed");
    }
    let (data, n, d) = npy::read_f32_matrix(&e).expect("e.npy");
    let peer = faiss(&peers, &e, threads);
    let ours = [Assign::Plain, Assign::Balanced].map(|a| sidrec_rk(&data, n, d, a));
    results.push(compare(
        "synthetic 100k x 384, 3 x 256, 20 iterations",
        &peer,
        &ours,
    ));
    let linfa = (std::env::var("SIDREC_BENCH_LINFA").as_deref() != Ok("0"))
        .then(|| linfa_level(&data, n, d));

    // 2. Amazon Scientific through MiniLM.
    let amazon = env_path("SIDREC_AMAZON", "../shared/data/amazon-scientific");
    let mut encoder_figures = Value::Null;
    if let Some(texts) = amazon_texts(&amazon) {
        let a = amazon_embeddings(&texts, &cache);
        let (data, n, d) = npy::read_f32_matrix(&a).expect("amazon npy");
        let peer = faiss(&peers, &a, threads);
        let ours = [Assign::Plain, Assign::Balanced].map(|x| sidrec_rk(&data, n, d, x));
        results.push(compare("Amazon Scientific (MiniLM), 3 x 256", &peer, &ours));
        // 3. The sentence encoder beside the PyTorch peer.
        let count = std::env::var("SIDREC_BENCH_TEXTS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(600usize)
            .min(texts.len());
        encoder_figures = encoder(&peers, &cache, &texts[..count], threads);
    }
    println!(
        "\n{}",
        json!({"bench": "tokenize", "threads": threads, "results": results, "linfa": linfa,
               "encoder": encoder_figures})
    );
}
