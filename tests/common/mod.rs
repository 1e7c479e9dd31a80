//! Helpers shared by the integration tests that train small models: a 10-item fixture
//! catalog (movies and podcasts) tokenized with seeded random embeddings, users with a
//! learnable order, a tiny from-scratch config and training options.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use sidrec::catalog::LoadOptions;
use sidrec::decode::Hit;
use sidrec::npy;
use sidrec::progress::Progress;
use sidrec::quantize::QuantizeConfig;
use sidrec::template::Template;
use sidrec::tokenize::{self, EmbeddingSource, TokenizeOptions};
use sidrec::train::data::DataOptions;
use sidrec::train::pipeline::{BaseModel, Mode, StageConfig, TrainOptions};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/train")
        .join(name)
}

/// Tokenizes the 10-item fixture catalog with random (seeded) embeddings.
pub fn artifacts(dir: &Path, seed: u64) -> PathBuf {
    let n = 10;
    let d = 8;
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let data: Vec<f32> = (0..n * d)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        })
        .collect();
    let emb = dir.join(format!("emb{seed}.npy"));
    npy::write_f32_matrix(&emb, &data, n, d).unwrap();
    let out = dir.join(format!("artifacts{seed}"));
    let opts = TokenizeOptions {
        catalog: Some(fixture("catalog.jsonl")),
        load: LoadOptions {
            format: None,
            default_type: "item".into(),
            skip_invalid: false,
        },
        template: Template::default(),
        embeddings: EmbeddingSource::Precomputed(emb),
        batch_size: 8,
        max_tokens: 64,
        quantize: QuantizeConfig {
            levels: vec![4, 4],
            iters: 5,
            seed,
            ..Default::default()
        },
        out: out.clone(),
        force: false,
        save_embeddings: false,
        collab: None,
    };
    tokenize::run(&opts, Progress::new(true)).unwrap();
    out
}

/// Users who watch the movies in order, and users who listen to the podcasts in order:
/// a pattern a tiny model can pick up in a few steps.
pub fn interactions(dir: &Path) -> PathBuf {
    let movies = ["m1", "m2", "m3", "m4", "m5", "m6"];
    let pods = ["p1", "p2", "p3", "p4"];
    let mut lines = String::new();
    for u in 0..24 {
        let seq: Vec<&str> = if u % 2 == 0 {
            movies.iter().cycle().skip(u % 6).take(5).copied().collect()
        } else {
            pods.iter().cycle().skip(u % 4).take(4).copied().collect()
        };
        lines.push_str(&serde_json::json!({"user": format!("u{u}"), "items": seq}).to_string());
        lines.push('\n');
    }
    let p = dir.join("seqs.jsonl");
    fs::write(&p, lines).unwrap();
    p
}

/// Each ranked item's score, by item: to compare rankings item for item.
pub fn scores(hits: Vec<Hit>) -> HashMap<u32, f32> {
    hits.into_iter().map(|h| (h.item, h.score)).collect()
}

pub fn tiny_config(dir: &Path) -> PathBuf {
    llama_config(dir, "tiny", [64, 128, 2, 4, 2])
}

/// A scratch Llama config file `NAME.json` in `dir`: `[hidden, intermediate, layers,
/// heads, kv_heads]`, vocabulary set by the trainer.
pub fn llama_config(dir: &Path, name: &str, shape: [usize; 5]) -> PathBuf {
    let [hidden, intermediate, layers, heads, kv] = shape;
    let p = dir.join(format!("{name}.json"));
    fs::write(
        &p,
        format!(
            r#"{{"vocab_size": 0, "hidden_size": {hidden}, "intermediate_size": {intermediate},
            "num_hidden_layers": {layers}, "num_attention_heads": {heads}, "num_key_value_heads": {kv},
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256,
            "tie_word_embeddings": true}}"#
        ),
    )
    .unwrap();
    p
}

pub fn options(artifacts: PathBuf, inter: PathBuf, base: BaseModel, out: PathBuf) -> TrainOptions {
    TrainOptions {
        artifacts,
        interactions: inter,
        base,
        out,
        force: false,
        prompts: None,
        skip_invalid: false,
        item_embeddings: false,
        item_dropout: 0.0,
        stage1: Some(StageConfig {
            mode: Mode::Full,
            epochs: 2,
            max_steps: 0,
            lr: 3e-3,
        }),
        stage2: Some(StageConfig {
            mode: Mode::Full,
            epochs: 3,
            max_steps: 0,
            lr: 3e-3,
        }),
        batch_size: 8,
        max_len: 128,
        warmup: 2,
        clip: 1.0,
        weight_decay: 0.0,
        dropout: 0.0,
        lora_rank: 4,
        lora_alpha: 8.0,
        eval_every: 0,
        checkpoint_every: 0,
        valid_examples: 0,
        resume: false,
        seed: 1,
        select_users: 0,
        select_mix_recent: 0,
        rank: Default::default(),
        recipe_name: String::new(),
        validator: None,
        soft_targets: 0.0,
        request_vectors: false,
        taste_vectors: false,
        encoder: None,
        data: DataOptions {
            seed: 1,
            ..Default::default()
        },
    }
}

/// Trains the tiny config on the fixture catalog and users; returns the model directory.
pub fn trained_model(dir: &Path) -> PathBuf {
    let art = artifacts(dir, 0);
    let inter = interactions(dir);
    let out = dir.join("model");
    let base = BaseModel::Scratch {
        config: tiny_config(dir),
        vocab_size: 400,
    };
    sidrec::train::pipeline::run(&options(art, inter, base, out.clone()), Progress::new(true))
        .unwrap();
    out
}

/// The fixture model of [`trained_model`], trained once per test binary and shared by
/// its tests (they read it, or copy it before changing it).
pub fn shared_model() -> &'static Path {
    static MODEL: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
    &MODEL
        .get_or_init(|| {
            let tmp = tempfile::tempdir().unwrap();
            let dir = trained_model(tmp.path());
            (tmp, dir)
        })
        .1
}
