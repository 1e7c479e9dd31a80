//! Constrained decoding benchmark: sidrec's trie beam search beside Hugging Face
//! `generate` + `prefix_allowed_tokens_fn` (`hf_constrained_beam.py`) on the same weights,
//! the same catalog shape and the same prompt, in the same run. Not a test: it prints a
//! table and one JSON line of figures and ratios.
//!
//!   cargo bench --bench decode
//!
//! Workload (the peer's): SmolLM2-135M in f32 (converted once from the fetched GGUF into
//! `target/bench-data/`), SID tokens `<a_*> <b_*> <c_*>` added to the vocabulary (new rows
//! random: latency does not depend on training), 10,000 random distinct 3 × 256 code
//! tuples, 10 beams, top-10 items, the peer's default prompt. Latency of one query,
//! median and p90 over 20 after one warm-up.
//!
//! Also: the tiny from-scratch config (`models/tiny.json`) on the same catalog shape, with
//! the short prompt and with a 20-item history prompt (the p50 target is 10 ms), and the
//! search's own cost per step (trie, masks, normalisation, selection) with the model
//! taken out (fixed logits).
//!
//! Environment: `SIDREC_PYTHON` (a Python with torch and transformers; the peer is skipped
//! with a note when it cannot run), `SIDREC_PEERS`, `SIDREC_BENCH_THREADS` (default 2),
//! `SIDREC_BENCH_QUERIES` (default 20).

use std::collections::HashSet;
use std::time::Instant;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sidrec::decode::engine::ModelSource;
use sidrec::decode::prefix::{self, PrefixCache};
use sidrec::decode::{beam_search, BeamConfig, DecodeError, LogitSource};
use sidrec::model::config::LlamaConfig;
use sidrec::model::hfdir::HfDir;
use sidrec::model::llama::{self, Llama};
use sidrec::model::packed::WeightFormat;
use sidrec::trie::{Mask, Trie};
use tokenizers::{AddedToken, Tokenizer};

mod support;
use support::{env_usize, manifest, run_peer, smollm2_dir};

const PROMPT: &str =
    "Recommend movies for a user who watched <a_1><b_2><c_3>, <a_4><b_5><c_6>. Answer:";
const ITEMS: usize = 10_000;
const LEVELS: usize = 3;
const CODES: usize = 256;
const BEAMS: usize = 10;
/// Weight formats timed, each on the same model and requests.
const FORMATS: [WeightFormat; 3] = [WeightFormat::F32, WeightFormat::Bf16, WeightFormat::Int8];

/// SID tokens in the peer's order: `<a_0>..<a_255>`, `<b_0>..`, `<c_0>..`.
fn sid_tokens() -> Vec<String> {
    let letters = ['a', 'b', 'c'];
    (0..LEVELS)
        .flat_map(|l| (0..CODES).map(move |c| format!("<{}_{c}>", letters[l])))
        .collect()
}

/// 10k random distinct tuples as trie paths (trie token = level · CODES + code).
fn catalog(seed: u64) -> Trie {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut seen = HashSet::new();
    while seen.len() < ITEMS {
        let t: Vec<u32> = (0..LEVELS)
            .map(|l| (l * CODES) as u32 + rng.gen_range(0..CODES as u32))
            .collect();
        seen.insert(t);
    }
    let mut paths: Vec<Vec<u32>> = seen.into_iter().collect();
    paths.sort();
    Trie::build(paths.into_iter().enumerate().map(|(i, p)| (p, i as u32))).expect("trie")
}

struct Model {
    llama: Llama,
    tok: Tokenizer,
    offset: u32,
}

/// `PROMPT`'s shape with a different seeded pair of items per query (the first is the
/// warm-up): the instruction words are shared, the history is new each time.
fn varied(tok: &Tokenizer, n: usize) -> Vec<Vec<u32>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut code = || rng.gen_range(0..CODES);
    let mut sid = || format!("<a_{}><b_{}><c_{}>", code(), code(), code());
    (0..n)
        .map(|q| {
            let text = match q {
                0 => PROMPT.to_string(),
                _ => format!(
                    "Recommend movies for a user who watched {}, {}. Answer:",
                    sid(),
                    sid()
                ),
            };
            encode(tok, &text)
        })
        .collect()
}

impl Model {
    /// The same model with its matrices stored as `format`.
    fn packed(&self, format: WeightFormat) -> Model {
        Model {
            llama: self.llama.clone().with_weights(format).expect("pack"),
            tok: self.tok.clone(),
            offset: self.offset,
        }
    }
}

/// A model with the SID tokens added (tokenizer and rows).
fn with_sid_tokens(
    mut cfg: LlamaConfig,
    mut tensors: std::collections::HashMap<String, candle_core::Tensor>,
    mut tok: Tokenizer,
) -> Model {
    let offset = cfg.vocab_size as u32;
    let new = sid_tokens();
    let added: Vec<AddedToken> = new
        .iter()
        .map(|t| AddedToken::from(t.as_str(), true))
        .collect();
    tok.add_special_tokens(&added);
    assert_eq!(
        tok.token_to_id("<a_0>"),
        Some(offset),
        "SID tokens must follow the vocabulary"
    );
    llama::extend_vocab(&mut tensors, &mut cfg, new.len(), 0).expect("extend");
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    Model {
        llama: Llama::new(&cfg, vb).expect("model"),
        tok,
        offset,
    }
}

fn encode(tok: &Tokenizer, text: &str) -> Vec<u32> {
    tok.encode(text, false).expect("encode").get_ids().to_vec()
}

/// A source that times its model: where a query's latency goes (prompt or steps).
struct Timed<S> {
    inner: S,
    prefill: f64,
    steps: Vec<f64>,
}

impl<S: LogitSource> LogitSource for Timed<S> {
    fn prefill(&mut self, prompt: &[u32]) -> Result<Vec<f32>, DecodeError> {
        let t = Instant::now();
        let out = self.inner.prefill(prompt);
        self.prefill = t.elapsed().as_secs_f64();
        out
    }
    fn extend(&mut self, parents: &[u32], tokens: &[u32]) -> Result<Vec<f32>, DecodeError> {
        let t = Instant::now();
        let out = self.inner.extend(parents, tokens);
        self.steps.push(t.elapsed().as_secs_f64());
        out
    }
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }
}

/// Latencies of `queries` searches after one warm-up, in seconds.
struct Timing {
    p50: f64,
    p90: f64,
    /// Median time of the prompt's forward pass.
    prefill: f64,
    /// Median time of one beam step's forward pass.
    step: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times `queries` searches (after one warm-up), query `q` on `prompts[q % len]`, each
/// starting from `prefix` where given.
fn time_queries(
    m: &Model,
    trie: &Trie,
    prompts: &[Vec<u32>],
    queries: usize,
    prefix: Option<&PrefixCache>,
) -> Timing {
    let mask = Mask::all(trie);
    let (mut lat, mut prefill, mut steps) = (Vec::new(), Vec::new(), Vec::new());
    for q in 0..=queries {
        let prompt = &prompts[q % prompts.len()];
        let t0 = Instant::now();
        let mut src = Timed {
            inner: ModelSource::new(&m.llama).with_prefix_cache(prefix),
            prefill: 0.0,
            steps: Vec::new(),
        };
        let hits = beam_search(
            &mut src,
            trie,
            &mask,
            m.offset,
            prompt,
            BeamConfig {
                k: BEAMS,
                beams: BEAMS,
            },
        )
        .expect("search");
        assert_eq!(hits.len(), BEAMS);
        if q > 0 {
            lat.push(t0.elapsed().as_secs_f64());
            prefill.push(src.prefill);
            steps.extend(src.steps);
        }
    }
    lat.sort_by(f64::total_cmp);
    Timing {
        p50: lat[lat.len() / 2],
        p90: lat[(9 * (lat.len() - 1)) / 10],
        prefill: median(prefill),
        step: median(steps),
    }
}

/// The model taken out: every row is the same fixed logits, so what is timed is the
/// search itself (trie children under the mask, normalisation, gather, top-k, beams).
struct Fixed {
    row: Vec<f32>,
    rows: usize,
    steps: usize,
}

impl LogitSource for Fixed {
    fn prefill(&mut self, _: &[u32]) -> Result<Vec<f32>, DecodeError> {
        self.rows = 1;
        Ok(self.row.clone())
    }
    fn extend(&mut self, parents: &[u32], _: &[u32]) -> Result<Vec<f32>, DecodeError> {
        self.steps += 1;
        self.rows = parents.len();
        Ok(self.row.repeat(parents.len()))
    }
    fn vocab_size(&self) -> usize {
        self.row.len()
    }
}

fn search_cost_per_step(trie: &Trie, vocab: usize, offset: u32) -> f64 {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let row: Vec<f32> = (0..vocab).map(|_| rng.gen_range(-5.0..5.0)).collect();
    let mut src = Fixed {
        row,
        rows: 0,
        steps: 0,
    };
    let mask = Mask::all(trie);
    let t0 = Instant::now();
    let n = 200;
    for _ in 0..n {
        beam_search(
            &mut src,
            trie,
            &mask,
            offset,
            &[1],
            BeamConfig { k: 10, beams: 10 },
        )
        .expect("search");
    }
    // Steps: the prefill row plus each extension, per query.
    let steps = src.steps + n;
    // Copying the fixed rows is the stand-in model's cost, not the search's: subtract it.
    let copy = {
        let t = Instant::now();
        for _ in 0..src.steps {
            std::hint::black_box(src.row.repeat(BEAMS));
        }
        t.elapsed().as_secs_f64()
    };
    (t0.elapsed().as_secs_f64() - copy).max(0.0) / steps as f64
}

fn main() {
    sidrec::runtime::tune_allocator();
    let threads = env_usize("SIDREC_BENCH_THREADS", 2);
    let queries = env_usize("SIDREC_BENCH_QUERIES", 20);
    sidrec::runtime::set_threads(Some(threads)).expect("threads");
    let trie = catalog(0);

    // Tiny config, random weights, a BPE trained on a little text plus the SID tokens.
    let mut tiny_cfg = LlamaConfig::from_file(&manifest("models/tiny.json")).expect("tiny.json");
    let texts: Vec<String> = (0..200)
        .map(|i| {
            format!("Recommend movies for a user who watched item {i}. Answer: The user enjoyed")
        })
        .collect();
    let tiny_tok = sidrec::model::bpe::train_bpe(texts.iter(), 4096).expect("bpe");
    tiny_cfg.vocab_size = tiny_tok.get_vocab_size(true);
    let tiny_tensors = Llama::init_tensors(&tiny_cfg, 0).expect("init");
    let tiny = with_sid_tokens(tiny_cfg, tiny_tensors, tiny_tok);
    let short = encode(&tiny.tok, PROMPT);
    let shorts = varied(&tiny.tok, queries.max(50) + 1);
    let history: Vec<String> = (0..20)
        .map(|i| {
            format!(
                "<a_{}><b_{}><c_{}> Movie number {i} (199{})",
                i * 7 % 256,
                i * 13 % 256,
                i * 29 % 256,
                i % 10
            )
        })
        .collect();
    let long_text = format!(
        "<|im_start|>user\nA user's history, oldest first: {}. Which movie will they choose next?<|im_end|>\n<|im_start|>assistant\n",
        history.join("; ")
    );
    let long = encode(&tiny.tok, &long_text);
    let kernels = sidrec::simd::level().name();
    println!("kernels: {kernels} (SIDREC_SIMD narrows them)");
    println!("tiny (4 layers, d=256), 10k items, 3 x 256, 10 beams, top-10:");
    let mut tiny_json = Vec::new();
    for format in FORMATS {
        let m = tiny.packed(format);
        let short_t = time_queries(&m, &trie, &shorts, queries.max(50), None);
        let cache = PrefixCache::new(prefix::DEFAULT_BYTES);
        let cached_t = time_queries(&m, &trie, &shorts, queries.max(50), Some(&cache));
        let long_t = time_queries(
            &m,
            &trie,
            std::slice::from_ref(&long),
            queries.max(50),
            None,
        );
        println!(
            "  {format:>4}: prompt {} tokens p50 {:.2} ms, p90 {:.2} ms; prefix-cached p50 {:.2} ms; prompt {} tokens p50 {:.2} ms, p90 {:.2} ms",
            short.len(),
            short_t.p50 * 1e3,
            short_t.p90 * 1e3,
            cached_t.p50 * 1e3,
            long.len(),
            long_t.p50 * 1e3,
            long_t.p90 * 1e3
        );
        tiny_json.push(
            json!({"weights": format.to_string(), "prompt_tokens": short.len(),
            "p50_ms": short_t.p50 * 1e3, "p90_ms": short_t.p90 * 1e3,
            "prefix_cached_p50_ms": cached_t.p50 * 1e3,
            "long_prompt_tokens": long.len(), "long_p50_ms": long_t.p50 * 1e3,
            "long_p90_ms": long_t.p90 * 1e3}),
        );
    }
    let per_step = search_cost_per_step(&trie, tiny.llama.config().vocab_size, tiny.offset);
    println!(
        "  search cost without the model: {:.1} us per step",
        per_step * 1e6
    );

    let Some(dir) = smollm2_dir() else { return };
    let hf = HfDir::load(&dir).expect("load");
    let cfg = LlamaConfig::from_json_str(&hf.config.to_string(), "smollm2").expect("config");
    let smol = with_sid_tokens(cfg, hf.tensors, hf.tokenizer);
    let prompt = encode(&smol.tok, PROMPT);
    let prompts = varied(&smol.tok, queries + 1);
    let mut smol_timings = Vec::new();
    for format in FORMATS {
        let m = smol.packed(format);
        let plain = time_queries(&m, &trie, &prompts, queries, None);
        let cache = PrefixCache::new(prefix::DEFAULT_BYTES);
        let cached = time_queries(&m, &trie, &prompts, queries, Some(&cache));
        smol_timings.push((format, plain, cached));
    }
    drop(smol);
    let args: Vec<String> = [
        dir.display().to_string(),
        "--items".into(),
        ITEMS.to_string(),
        "--levels".into(),
        LEVELS.to_string(),
        "--codes".into(),
        CODES.to_string(),
        "--beams".into(),
        BEAMS.to_string(),
        "--queries".into(),
        queries.to_string(),
        "--threads".into(),
        threads.to_string(),
    ]
    .into();
    let theirs = run_peer("hf_constrained_beam.py", &args);
    let their_median = theirs.get("median_s").and_then(Value::as_f64);
    println!(
        "SmolLM2-135M, same shape, {} prompt tokens, {threads} threads, kernels {kernels}:",
        prompt.len()
    );
    let mut smol_json = Vec::new();
    for (format, t, c) in &smol_timings {
        for (what, t) in [("", t), (" + prefix cache", c)] {
            let ratio = their_median.map(|h| h / t.p50);
            println!(
                "  sidrec {format:>4}{what}: median {:.1} ms, p90 {:.1} ms (prompt pass {:.1} ms, beam step {:.1} ms){}",
                t.p50 * 1e3,
                t.p90 * 1e3,
                t.prefill * 1e3,
                t.step * 1e3,
                ratio.map_or(String::new(), |r| format!("; {r:.2}x hf"))
            );
        }
        smol_json.push(
            json!({"weights": format.to_string(), "prompt_tokens": prompt.len(),
            "median_ms": t.p50 * 1e3, "p90_ms": t.p90 * 1e3, "prefill_ms": t.prefill * 1e3,
            "step_ms": t.step * 1e3, "speedup": their_median.map(|h| h / t.p50),
            "prefix_cached": {"median_ms": c.p50 * 1e3, "p90_ms": c.p90 * 1e3,
                "prefill_ms": c.prefill * 1e3, "speedup": their_median.map(|h| h / c.p50)}}),
        );
    }
    match their_median {
        Some(t) => println!("  hf     f32   median {:.1} ms", t * 1e3),
        None => println!("  hf      (not run)"),
    }
    println!(
        "{}",
        json!({
            "bench": "decode", "threads": threads, "items": ITEMS, "levels": LEVELS,
            "codes": CODES, "beams": BEAMS,
            "kernels": kernels, "search_us_per_step": per_step * 1e6,
            "tiny": tiny_json, "smollm2": smol_json, "hf": theirs,
        })
    );
}
