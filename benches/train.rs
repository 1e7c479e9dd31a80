//! Training throughput benchmark: sidrec beside PyTorch on the same weights, the same batch
//! shape and the same thread count, in the same run. Not a test: it prints a table and one
//! JSON line of figures and ratios.
//!
//!   cargo bench --bench train
//!
//! Workload (the peer's, `torch_train_throughput.py`): full fine-tuning of SmolLM2-135M in
//! f32, AdamW, causal-LM loss on every position of random token batches of 8 × 64; the
//! median tokens/s over 5 steps after one warm-up step. The GGUF from
//! `scripts/fetch-assets.sh` is converted once to a Hugging Face directory under
//! `target/bench-data/`, which both sides load. The tiny from-scratch config
//! (`models/tiny.json`) is timed the same way.
//!
//! Environment:
//! - `SIDREC_PYTHON`: a Python with torch and transformers (default `python3`); the peer is
//!   skipped, with a note, when it cannot run;
//! - `SIDREC_PEERS`: the peers directory (default `../shared/peers`);
//! - `SIDREC_BENCH_THREADS`: threads for both sides (default 2);
//! - `SIDREC_BENCH_STEPS`: counted steps (default 5).

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sidrec::model::config::LlamaConfig;
use sidrec::model::hfdir::HfDir;
use sidrec::model::llama::{self, Llama};
use sidrec::train::optim::{AdamW, AdamWConfig};

mod support;
use support::{env_usize, manifest, run_peer, smollm2_dir};

/// Median tokens/s of full fine-tuning steps on random `[batch, seq]` tokens.
fn sidrec_rate(
    cfg: &LlamaConfig,
    tensors: &HashMap<String, Tensor>,
    batch: usize,
    seq: usize,
    steps: usize,
) -> f64 {
    let map = llama::varmap_from_tensors(tensors).expect("varmap");
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let model = Llama::new(cfg, vb).expect("model");
    let params: Vec<_> = map
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut opt = AdamW::new(
        params,
        AdamWConfig {
            lr: 1e-4,
            ..Default::default()
        },
    )
    .expect("optimiser");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let ids: Vec<u32> = (0..batch * seq)
        .map(|_| rng.gen_range(0..cfg.vocab_size as u32))
        .collect();
    let x = Tensor::from_vec(ids.clone(), (batch, seq), &Device::Cpu).unwrap();
    // Position i predicts token i + 1; the last position has no target (masked), as in
    // the `labels=input_ids` loss of `transformers`.
    let mut targets = vec![0u32; batch * seq];
    let mut mask = vec![0f32; batch * seq];
    for r in 0..batch {
        for i in 0..seq - 1 {
            targets[r * seq + i] = ids[r * seq + i + 1];
            mask[r * seq + i] = 1.0;
        }
    }
    let targets = Tensor::from_vec(targets, (batch, seq), &Device::Cpu).unwrap();
    let mask = Tensor::from_vec(mask, (batch, seq), &Device::Cpu).unwrap();
    let mut rates = Vec::new();
    for i in 0..=steps {
        let t0 = Instant::now();
        let logits = model.forward(&x, None).expect("forward");
        let loss = llama::masked_cross_entropy(&logits, &targets, &mask).expect("loss");
        let t1 = t0.elapsed().as_secs_f64();
        let grads = loss.backward().expect("backward");
        let t2 = t0.elapsed().as_secs_f64();
        opt.step(&grads, 1e-4, None).expect("step");
        let dt = t0.elapsed().as_secs_f64();
        if std::env::var_os("SIDREC_BENCH_SPLIT").is_some() {
            eprintln!(
                "forward {t1:.3}s backward {:.3}s optimiser {:.3}s",
                t2 - t1,
                dt - t2
            );
        }
        if i > 0 {
            rates.push((batch * seq) as f64 / dt);
        }
    }
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

fn main() {
    sidrec::runtime::tune_allocator();
    let threads = env_usize("SIDREC_BENCH_THREADS", 2);
    let steps = env_usize("SIDREC_BENCH_STEPS", 5);
    let (batch, seq) = (8, 64);
    sidrec::runtime::set_threads(Some(threads)).expect("threads");
    println!(
        "kernels: sidrec {} (SIDREC_SIMD narrows them), gemm the CPU's widest",
        sidrec::simd::level().name()
    );

    // Tiny config, from scratch (vocabulary of a catalog-trained BPE plus SID tokens).
    let mut tiny = LlamaConfig::from_file(&manifest("models/tiny.json")).expect("tiny.json");
    tiny.vocab_size = 4096;
    let tiny_tensors = Llama::init_tensors(&tiny, 0).expect("init");
    let tiny_rate = sidrec_rate(&tiny, &tiny_tensors, batch, seq, steps);
    println!("tiny (4 layers, d=256, vocab 4096): sidrec {tiny_rate:.0} tokens/s");

    let Some(dir) = smollm2_dir() else { return };
    let hf = HfDir::load(&dir).expect("load");
    let cfg = LlamaConfig::from_json_str(&hf.config.to_string(), "smollm2").expect("config");
    let ours = sidrec_rate(&cfg, &hf.tensors, batch, seq, steps);
    drop(hf);
    let peer = run_peer(
        "torch_train_throughput.py",
        &[
            dir.display().to_string(),
            "--batch".into(),
            batch.to_string(),
            "--seq".into(),
            seq.to_string(),
            "--steps".into(),
            steps.to_string(),
            "--threads".into(),
            threads.to_string(),
        ],
    );
    let theirs = peer.get("tokens_per_s").and_then(Value::as_f64);

    println!("SmolLM2-135M f32, full fine-tuning, batch {batch} x {seq}, {threads} threads:");
    println!("  sidrec  {ours:8.1} tokens/s");
    match theirs {
        Some(t) => println!(
            "  pytorch {t:8.1} tokens/s   ratio sidrec/pytorch {:.2}x",
            ours / t
        ),
        None => println!("  pytorch (not run)"),
    }
    println!(
        "{}",
        json!({
            "bench": "train",
            "threads": threads,
            "batch": batch,
            "seq": seq,
            "tiny_tokens_per_s": tiny_rate,
            "smollm2_tokens_per_s": ours,
            "pytorch": peer,
            "ratio": theirs.map(|t| ours / t),
        })
    );
}
