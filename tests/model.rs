//! Decoder tests: parity with candle-transformers' Llama on the same weights, gradients
//! reaching every trainable tensor (full fine-tuning and LoRA), the KV cache (fork, reorder,
//! chunked prefill) against the uncached forward, padding, vocabulary extension, and a
//! short training run.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sidrec::model::config::LlamaConfig;
use sidrec::model::llama::{
    dropout_mask, extend_vocab, init_item_table, lora_init_tensors, masked_cross_entropy,
    varmap_from_tensors, Dropout, KvCache, Llama, LoraConfig, ModelError, LORA_TARGETS,
};

const VOCAB: usize = 101;

fn cfg(tied: bool) -> LlamaConfig {
    let mut c = LlamaConfig::small(VOCAB);
    c.tie_word_embeddings = tied;
    c
}

/// Random weights with more spread than a fresh init (std 0.02 makes every logit nearly
/// equal, which would let a wrong model pass a parity check): matrices ~ N(0, 0.15²), norm
/// weights ~ 1 ± 0.2.
fn random_weights(cfg: &LlamaConfig, seed: u64) -> HashMap<String, Tensor> {
    let mut t = Llama::init_tensors(cfg, seed).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    for (name, w) in t.iter_mut() {
        if w.rank() == 1 {
            let v: Vec<f32> = (0..w.elem_count())
                .map(|_| 1.0 + rng.gen_range(-0.2f32..0.2))
                .collect();
            *w = Tensor::from_vec(v, w.dims(), &Device::Cpu).unwrap();
        } else {
            *w = w.affine(7.5, 0.0).unwrap();
        }
        assert!(name.ends_with(".weight"));
    }
    t
}

fn ids(rows: &[Vec<u32>]) -> Tensor {
    Tensor::new(rows.to_vec(), &Device::Cpu).unwrap()
}

fn random_ids(rng: &mut ChaCha8Rng, b: usize, t: usize, vocab: usize) -> Vec<Vec<u32>> {
    (0..b)
        .map(|_| (0..t).map(|_| rng.gen_range(0..vocab as u32)).collect())
        .collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn constant_model(cfg: &LlamaConfig, w: &HashMap<String, Tensor>) -> Llama {
    Llama::new(
        cfg,
        VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu),
    )
    .unwrap()
}

#[test]
fn matches_candle_transformers_llama() {
    for tied in [false, true] {
        let cfg = cfg(tied);
        let w = random_weights(&cfg, 1);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        candle_core::safetensors::save(&w, &path).unwrap();
        if tied {
            assert!(!w.contains_key("lm_head.weight"));
        }

        // candle-transformers reads the config.json we write.
        let ct_cfg: candle_transformers::models::llama::LlamaConfig =
            serde_json::from_str(&cfg.to_json_string()).unwrap();
        let ct_cfg = ct_cfg.into_config(false);
        assert_eq!(ct_cfg.tie_word_embeddings, tied);
        let dev = Device::Cpu;
        // SAFETY: the file was written above and is not modified while mapped.
        let vb =
            unsafe { VarBuilder::from_mmaped_safetensors(&[&path], DType::F32, &dev) }.unwrap();
        let reference = candle_transformers::models::llama::Llama::load(vb, &ct_cfg).unwrap();
        let vb =
            unsafe { VarBuilder::from_mmaped_safetensors(&[&path], DType::F32, &dev) }.unwrap();
        let ours = Llama::new(&cfg, vb).unwrap();

        let mut rng = ChaCha8Rng::seed_from_u64(2);
        for t in [1, 7, 13] {
            let x = ids(&random_ids(&mut rng, 2, t, VOCAB));
            let mut cache =
                candle_transformers::models::llama::Cache::new(false, DType::F32, &ct_cfg, &dev)
                    .unwrap();
            let expected = reference.forward(&x, 0, &mut cache).unwrap(); // [b, vocab], last
            let all = ours.forward(&x, None).unwrap();
            assert_eq!(all.dims(), [2, t, VOCAB]);
            let last = all.i((.., t - 1, ..)).unwrap();
            let spread = expected.max_keepdim(1).unwrap().min(0).unwrap();
            assert!(spread.to_vec1::<f32>().unwrap()[0] > 1.0, "logits too flat");
            let d = max_abs_diff(&last, &expected);
            assert!(d < 1e-4, "tied={tied} t={t}: forward differs by {d}");

            let mut kv = KvCache::new(&cfg);
            let cached = ours.forward_cached_last(&x, &mut kv).unwrap();
            assert_eq!(kv.len(), t);
            let d = max_abs_diff(&cached, &expected);
            assert!(d < 1e-4, "tied={tied} t={t}: forward_cached differs by {d}");
            let ones = Tensor::ones((2, t), DType::U32, &dev).unwrap();
            let masked = ours.forward(&x, Some(&ones)).unwrap();
            assert!(max_abs_diff(&masked, &all) < 1e-6);
        }
    }
}

#[test]
fn kv_cache_fork_and_reorder_match_the_uncached_forward() {
    let cfg = cfg(false);
    let model = constant_model(&cfg, &random_weights(&cfg, 3));
    let prompt: Vec<u32> = vec![5, 17, 42, 8, 99];

    let mut cache = KvCache::new(&cfg);
    model
        .forward_cached(&ids(std::slice::from_ref(&prompt)), &mut cache)
        .unwrap();
    assert_eq!((cache.len(), cache.batch_size()), (5, Some(1)));
    let mut beams = cache.select(&[0, 0, 0]).unwrap();
    assert_eq!(beams.batch_size(), Some(3));
    let next = [7u32, 60, 100];
    let step = model
        .forward_cached(&ids(&[vec![7], vec![60], vec![100]]), &mut beams)
        .unwrap();
    assert_eq!(step.dims(), [3, 1, VOCAB]);
    let mut seqs: Vec<Vec<u32>> = next
        .iter()
        .map(|&n| {
            let mut s = prompt.clone();
            s.push(n);
            s
        })
        .collect();
    let full = model.forward(&ids(&seqs), None).unwrap();
    let d = max_abs_diff(&step.squeeze(1).unwrap(), &full.i((.., 5, ..)).unwrap());
    assert!(d < 1e-4, "forked cache differs by {d}");

    // Reorder (beam 2 twice, beam 0 once) and take another step. Selections are lazy
    // and compose: [1, 2, 0] then [1, 1, 2] is [2, 2, 0].
    let beams = beams.select(&[1, 2, 0]).unwrap();
    let mut beams = beams.select(&[1, 1, 2]).unwrap();
    assert_eq!(beams.batch_size(), Some(3));
    seqs = vec![seqs[2].clone(), seqs[2].clone(), seqs[0].clone()];
    let next = [1u32, 2, 3];
    for (s, &n) in seqs.iter_mut().zip(&next) {
        s.push(n);
    }
    let step = model
        .forward_cached_last(&ids(&[vec![1], vec![2], vec![3]]), &mut beams)
        .unwrap();
    let full = model.forward(&ids(&seqs), None).unwrap();
    let d = max_abs_diff(&step, &full.i((.., 6, ..)).unwrap());
    assert!(d < 1e-4, "reordered cache differs by {d}");

    // Chunked prefill (3 tokens, then 4 at once) gives every position's logits.
    let seq: Vec<u32> = vec![3, 1, 4, 1, 5, 9, 2];
    let mut cache = KvCache::new(&cfg);
    let a = model
        .forward_cached(&ids(&[seq[..3].to_vec()]), &mut cache)
        .unwrap();
    let b = model
        .forward_cached(&ids(&[seq[3..].to_vec()]), &mut cache)
        .unwrap();
    let chunked = Tensor::cat(&[&a, &b], 1).unwrap();
    let full = model.forward(&ids(&[seq]), None).unwrap();
    assert!(max_abs_diff(&chunked, &full) < 1e-4);

    // Errors leave the cache usable.
    let err = model
        .forward_cached(&ids(&[vec![1], vec![2]]), &mut cache)
        .unwrap_err();
    assert!(matches!(
        err,
        ModelError::BatchMismatch { cache: 1, input: 2 }
    ));
    assert_eq!(cache.len(), 7);
    assert!(matches!(
        cache.select(&[1]).unwrap_err(),
        ModelError::RowOutOfRange { row: 1, batch: 1 }
    ));
}

#[test]
fn right_padding_does_not_change_real_positions() {
    let cfg = cfg(true);
    let model = constant_model(&cfg, &random_weights(&cfg, 4));
    let short: Vec<u32> = vec![11, 22, 33, 44, 55];
    let long: Vec<u32> = vec![1, 2, 3, 4, 5, 6, 7, 8];
    let alone = model
        .forward(&ids(std::slice::from_ref(&short)), None)
        .unwrap();
    let long_alone = model
        .forward(&ids(std::slice::from_ref(&long)), None)
        .unwrap();

    let mut padded = short.clone();
    padded.extend([0, 0, 0]);
    let mask = Tensor::new(
        vec![vec![1u32, 1, 1, 1, 1, 0, 0, 0], vec![1u32; 8]],
        &Device::Cpu,
    )
    .unwrap();
    let batch = model.forward(&ids(&[padded, long]), Some(&mask)).unwrap();
    let d = max_abs_diff(&batch.i((0..1, 0..5, ..)).unwrap(), &alone);
    assert!(d < 1e-5, "padded row differs by {d}");
    let d = max_abs_diff(&batch.i(1..2).unwrap(), &long_alone);
    assert!(d < 1e-5, "full row differs by {d}");

    // A mask of the wrong shape, an id outside the vocabulary, an overlong input: errors.
    let bad_mask = Tensor::ones((2, 7), DType::U32, &Device::Cpu).unwrap();
    let two = ids(&[vec![1; 8], vec![2; 8]]);
    assert!(matches!(
        model.forward(&two, Some(&bad_mask)).unwrap_err(),
        ModelError::Shape { .. }
    ));
    assert!(matches!(
        model
            .forward(&ids(&[vec![1, VOCAB as u32]]), None)
            .unwrap_err(),
        ModelError::TokenOutOfRange { .. }
    ));
    let too_long = vec![vec![1u32; cfg.max_position_embeddings + 1]];
    assert!(matches!(
        model.forward(&ids(&too_long), None).unwrap_err(),
        ModelError::TooLong { .. }
    ));
}

/// A batch with right padding: ids, attention mask, next-token targets and loss mask.
fn padded_batch(rng: &mut ChaCha8Rng, vocab: usize) -> (Tensor, Tensor, Tensor, Tensor) {
    let lens = [9usize, 6, 4];
    let t = 9;
    let mut x = random_ids(rng, lens.len(), t, vocab);
    // Make sure the highest ids (the "new rows" in LoRA mode) occur as inputs.
    x[0][0] = vocab as u32 - 1;
    x[1][1] = vocab as u32 - 2;
    let mut att = vec![vec![0f32; t]; lens.len()];
    let mut tgt = vec![vec![0u32; t]; lens.len()];
    let mut lm = vec![vec![0f32; t]; lens.len()];
    for (r, &len) in lens.iter().enumerate() {
        for i in 0..t {
            if i < len {
                att[r][i] = 1.0;
            } else {
                x[r][i] = 0;
            }
            if i + 1 < len {
                tgt[r][i] = x[r][i + 1];
                lm[r][i] = 1.0;
            }
        }
    }
    let dev = Device::Cpu;
    (
        ids(&x),
        Tensor::new(att, &dev).unwrap(),
        Tensor::new(tgt, &dev).unwrap(),
        Tensor::new(lm, &dev).unwrap(),
    )
}

fn grad_norm(grads: &candle_core::backprop::GradStore, t: &Tensor) -> Option<f32> {
    grads.get(t).map(|g| {
        g.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    })
}

#[test]
fn full_fine_tuning_reaches_every_weight() {
    // With and without dropout: its masks are constants, gradients flow through the rest.
    let dropouts = [
        None,
        Some(Dropout {
            p: 0.3,
            key: 7,
            items: 0.0,
        }),
    ];
    for (tied, dropout) in [false, true]
        .into_iter()
        .flat_map(|t| dropouts.map(|d| (t, d)))
    {
        let cfg = cfg(tied);
        let varmap = varmap_from_tensors(&random_weights(&cfg, 5)).unwrap();
        let model = Llama::new(
            &cfg,
            VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let (x, att, tgt, lm) = padded_batch(&mut rng, VOCAB);
        let logits = model.forward_train(&x, Some(&att), dropout).unwrap();
        let loss = masked_cross_entropy(&logits, &tgt, &lm).unwrap();
        assert!(loss.to_scalar::<f32>().unwrap().is_finite());
        let grads = loss.backward().unwrap();
        let data = varmap.data().lock().unwrap();
        assert_eq!(
            data.len(),
            2 + 9 * cfg.num_hidden_layers + usize::from(!tied)
        );
        for (name, var) in data.iter() {
            let g = grad_norm(&grads, var.as_tensor())
                .unwrap_or_else(|| panic!("tied={tied}: no gradient for {name}"));
            assert!(
                g.is_finite() && g > 0.0,
                "tied={tied}: {name} gradient norm {g}"
            );
        }
    }
}

/// Dropout masks: about `p` zeros, the rest `1 / (1 - p)` (so the expected value is
/// kept), a pure function of key and site, different across sites and keys.
#[test]
fn dropout_masks_are_seeded_and_unbiased() {
    let n = 100_000;
    let m = dropout_mask(n, 0.2, 42, 3);
    let zeros = m.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
    assert!((zeros - 0.2).abs() < 0.01, "zero share {zeros}");
    assert!(m.iter().all(|&v| v == 0.0 || (v - 1.25).abs() < 1e-6));
    let mean = m.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
    assert!((mean - 1.0).abs() < 0.02, "mean {mean}");
    assert_eq!(m, dropout_mask(n, 0.2, 42, 3));
    assert_ne!(m, dropout_mask(n, 0.2, 42, 4));
    assert_ne!(m, dropout_mask(n, 0.2, 43, 3));
}

/// Dropout changes the training forward pass, the same key reproduces it exactly, and
/// no dropout (or p = 0) is the plain forward pass.
#[test]
fn dropout_forward_is_reproducible_and_off_by_default() {
    let cfg = cfg(true);
    let model = constant_model(&cfg, &random_weights(&cfg, 5));
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let (x, att, _, _) = padded_batch(&mut rng, VOCAB);
    let plain = model.forward(&x, Some(&att)).unwrap();
    let with = |p: f32, key: u64| {
        model
            .forward_train(&x, Some(&att), Some(Dropout { p, key, items: 0.0 }))
            .unwrap()
    };
    assert_eq!(
        max_abs_diff(&plain, &model.forward_train(&x, Some(&att), None).unwrap()),
        0.0
    );
    assert_eq!(max_abs_diff(&plain, &with(0.0, 1)), 0.0);
    assert!(max_abs_diff(&plain, &with(0.3, 1)) > 1e-3);
    assert_eq!(max_abs_diff(&with(0.3, 1), &with(0.3, 1)), 0.0);
    assert!(max_abs_diff(&with(0.3, 1), &with(0.3, 2)) > 1e-3);
}

/// The detached view computes the same logits (to rounding), follows in-place updates of the trained
/// weights (it shares their storage), and records no graph (no gradient reaches a weight).
#[test]
fn detached_view_shares_weights_without_autograd() {
    let cfg = cfg(true);
    let varmap = varmap_from_tensors(&random_weights(&cfg, 5)).unwrap();
    let model = Llama::new(
        &cfg,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let view = model.detached();
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let (x, att, tgt, lm) = padded_batch(&mut rng, VOCAB);
    let a = model.forward(&x, Some(&att)).unwrap();
    let b = view.forward(&x, Some(&att)).unwrap();
    // Equal to rounding: without autograd, small products take the streaming kernel.
    assert!(max_abs_diff(&a, &b) < 1e-4);
    let loss = masked_cross_entropy(&b, &tgt, &lm).unwrap();
    let grads = loss.backward().unwrap();
    let data = varmap.data().lock().unwrap();
    for (name, var) in data.iter() {
        assert!(
            grads.get(var.as_tensor()).is_none(),
            "{name} got a gradient"
        );
    }
    // An optimiser step on the trained weights shows through the view.
    let grads = masked_cross_entropy(&a, &tgt, &lm)
        .unwrap()
        .backward()
        .unwrap();
    let params: Vec<_> = data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
    drop(data);
    let mut opt = sidrec::train::optim::AdamW::new(params, Default::default()).unwrap();
    opt.step(&grads, 1e-2, None).unwrap();
    let a2 = model.forward(&x, Some(&att)).unwrap();
    let b2 = view.forward(&x, Some(&att)).unwrap();
    assert!(max_abs_diff(&a, &a2) > 0.0);
    assert!(max_abs_diff(&a2, &b2) < 1e-4);
}

fn all_targets() -> Vec<String> {
    LORA_TARGETS.iter().map(|s| s.to_string()).collect()
}

#[test]
fn lora_trains_adapters_and_new_rows_only() {
    for tied in [false, true] {
        let cfg = cfg(tied);
        let base = random_weights(&cfg, 7);
        // The base weights sit in a VarMap on purpose: LoRA mode must freeze them anyway.
        let base_map = varmap_from_tensors(&base).unwrap();
        let lora_cfg = LoraConfig {
            rank: 4,
            alpha: 8.0,
            targets: all_targets(),
            train_new_rows_from: Some(VOCAB - 5),
        };
        let lora_map = VarMap::new();
        let dev = Device::Cpu;
        let model = Llama::new_with_lora(
            &cfg,
            VarBuilder::from_varmap(&base_map, DType::F32, &dev),
            VarBuilder::from_varmap(&lora_map, DType::F32, &dev),
            &lora_cfg,
        )
        .unwrap();
        let n_adapted = 7 * cfg.num_hidden_layers;
        let n_rows = if tied { 1 } else { 2 };
        {
            let data = lora_map.data().lock().unwrap();
            assert_eq!(data.len(), 2 * n_adapted + n_rows);
            assert!(data.keys().all(|k| k.contains(".lora_A.")
                || k.contains(".lora_B.")
                || k.ends_with(".new_rows")));
        }

        // At init the adapted model is the base model.
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let (x, att, tgt, lm) = padded_batch(&mut rng, VOCAB);
        let plain = constant_model(&cfg, &base);
        let logits = model.forward(&x, Some(&att)).unwrap();
        assert!(max_abs_diff(&logits, &plain.forward(&x, Some(&att)).unwrap()) < 1e-5);

        let loss = masked_cross_entropy(&logits, &tgt, &lm).unwrap();
        let grads = loss.backward().unwrap();
        for var in base_map.all_vars() {
            assert!(
                grads.get(var.as_tensor()).is_none(),
                "a base weight got a gradient"
            );
        }
        for (name, var) in lora_map.data().lock().unwrap().iter() {
            let g = grad_norm(&grads, var.as_tensor()).unwrap_or(0.0);
            if name.contains(".lora_A.") {
                // B = 0 at init: A's gradient is exactly zero on the first step.
                assert_eq!(g, 0.0, "{name}");
            } else {
                assert!(g.is_finite() && g > 0.0, "{name} gradient norm {g}");
            }
        }

        // After one optimiser step every adapter tensor gets a gradient.
        let mut opt = AdamW::new(
            lora_map.all_vars(),
            ParamsAdamW {
                lr: 1e-2,
                ..Default::default()
            },
        )
        .unwrap();
        opt.step(&grads).unwrap();
        let logits = model.forward(&x, Some(&att)).unwrap();
        let loss = masked_cross_entropy(&logits, &tgt, &lm).unwrap();
        let grads = loss.backward().unwrap();
        for (name, var) in lora_map.data().lock().unwrap().iter() {
            let g = grad_norm(&grads, var.as_tensor()).unwrap_or(0.0);
            assert!(
                g.is_finite() && g > 0.0,
                "tied={tied}: {name} gradient norm {g}"
            );
        }

        // Folding the adapters into plain weights gives the same model.
        let merged = model.merged_weights().unwrap();
        assert_eq!(merged.len(), base.len());
        let folded = constant_model(&cfg, &merged);
        let d = max_abs_diff(&folded.forward(&x, Some(&att)).unwrap(), &logits);
        assert!(d < 1e-4, "tied={tied}: merged model differs by {d}");
        let q = "model.layers.0.self_attn.q_proj.weight";
        assert!(max_abs_diff(&merged[q], &base[q]) > 0.0);
        // Old vocabulary rows are untouched, new ones moved.
        let e = "model.embed_tokens.weight";
        let old = VOCAB - 5;
        assert_eq!(
            max_abs_diff(
                &merged[e].narrow(0, 0, old).unwrap(),
                &base[e].narrow(0, 0, old).unwrap()
            ),
            0.0
        );
        assert!(max_abs_diff(&merged[e], &base[e]) > 0.0);
    }
}

#[test]
fn seeded_lora_init_matches_the_builder_layout() {
    let cfg = cfg(false);
    let lora_cfg = LoraConfig {
        rank: 2,
        alpha: 4.0,
        targets: vec!["q_proj".into(), "v_proj".into()],
        train_new_rows_from: None,
    };
    let init = lora_init_tensors(&cfg, &lora_cfg, 9).unwrap();
    let again = lora_init_tensors(&cfg, &lora_cfg, 9).unwrap();
    assert_eq!(init.len(), 2 * 2 * cfg.num_hidden_layers);
    let a = "model.layers.1.self_attn.v_proj.lora_A.weight";
    assert_eq!(max_abs_diff(&init[a], &again[a]), 0.0);
    // A pre-filled VarMap is used as is (nothing is added).
    let lora_map = varmap_from_tensors(&init).unwrap();
    let base = random_weights(&cfg, 10);
    let dev = Device::Cpu;
    Llama::new_with_lora(
        &cfg,
        VarBuilder::from_tensors(base, DType::F32, &dev),
        VarBuilder::from_varmap(&lora_map, DType::F32, &dev),
        &lora_cfg,
    )
    .unwrap();
    assert_eq!(lora_map.all_vars().len(), init.len());
    let bad = LoraConfig {
        targets: vec!["lm_head".into()],
        ..lora_cfg
    };
    assert!(matches!(
        lora_init_tensors(&cfg, &bad, 0).unwrap_err(),
        ModelError::Lora(_)
    ));
}

#[test]
fn extend_vocab_appends_mean_rows() {
    for tied in [false, true] {
        let mut cfg = cfg(tied);
        let mut w = random_weights(&cfg, 11);
        if tied {
            // Some tied checkpoints store a copy of the head anyway: it must follow.
            w.insert(
                "lm_head.weight".into(),
                w["model.embed_tokens.weight"].clone(),
            );
        }
        let orig = w.clone();
        let mut w2 = w.clone();
        let mut cfg2 = cfg.clone();
        extend_vocab(&mut w, &mut cfg, 20, 42).unwrap();
        extend_vocab(&mut w2, &mut cfg2, 20, 42).unwrap();
        assert_eq!(cfg.vocab_size, VOCAB + 20);
        for name in ["model.embed_tokens.weight", "lm_head.weight"] {
            let new = &w[name];
            assert_eq!(new.dims(), [VOCAB + 20, cfg.hidden_size]);
            assert_eq!(max_abs_diff(new, &w2[name]), 0.0, "not deterministic");
            let old = new.narrow(0, 0, VOCAB).unwrap();
            assert_eq!(max_abs_diff(&old, &orig[name]), 0.0, "old rows changed");
            let mean = orig[name].mean_keepdim(0).unwrap();
            let std = orig[name]
                .broadcast_sub(&mean)
                .unwrap()
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap()
                .sqrt()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let rows = new.narrow(0, VOCAB, 20).unwrap();
            let dev = max_abs_diff(&rows, &mean.broadcast_as(rows.shape()).unwrap());
            assert!(
                dev > 0.0 && dev < 0.15 * std,
                "{name}: new rows {dev} from the mean, std {std}"
            );
        }
        if tied {
            assert_eq!(
                max_abs_diff(&w["lm_head.weight"], &w["model.embed_tokens.weight"]),
                0.0
            );
            w.remove("lm_head.weight");
        }
        let mut w3 = orig.clone();
        let mut cfg3 = LlamaConfig {
            vocab_size: VOCAB,
            ..cfg.clone()
        };
        extend_vocab(&mut w3, &mut cfg3, 20, 43).unwrap();
        assert!(
            max_abs_diff(
                &w3["model.embed_tokens.weight"],
                &w["model.embed_tokens.weight"]
            ) > 0.0
        );

        // The extended weights build a model that accepts the new ids.
        let model = constant_model(&cfg, &w);
        let logits = model
            .forward(&ids(&[vec![VOCAB as u32 + 19, 3]]), None)
            .unwrap();
        assert_eq!(logits.dims(), [1, 2, VOCAB + 20]);
    }
    let mut cfg = cfg(false);
    let mut empty = HashMap::new();
    assert!(matches!(
        extend_vocab(&mut empty, &mut cfg, 3, 0).unwrap_err(),
        ModelError::MissingTensor { .. }
    ));
}

#[test]
fn a_few_adamw_steps_fit_a_fixed_batch() {
    let cfg = cfg(true);
    let varmap = varmap_from_tensors(&Llama::init_tensors(&cfg, 12).unwrap()).unwrap();
    let model = Llama::new(
        &cfg,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let (x, att, tgt, lm) = padded_batch(&mut rng, VOCAB);
    let mut opt = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: 3e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let mut losses = Vec::new();
    for _ in 0..30 {
        let logits = model.forward(&x, Some(&att)).unwrap();
        let loss = masked_cross_entropy(&logits, &tgt, &lm).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        opt.backward_step(&loss).unwrap();
    }
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    assert!(
        (first - (VOCAB as f32).ln()).abs() < 0.3,
        "initial loss {first}"
    );
    println!("losses: {losses:?}");
    assert!(
        last < 0.25 * first,
        "loss went from {first} to {last}: {losses:?}"
    );
}

#[test]
fn loss_is_the_masked_mean_nll() {
    let dev = Device::Cpu;
    let logits = Tensor::new(&[[[0f32, 0.0, 0.0], [2.0, 0.0, 0.0]]], &dev).unwrap();
    let tgt = Tensor::new(&[[1u32, 0]], &dev).unwrap();
    let all = masked_cross_entropy(&logits, &tgt, &Tensor::new(&[[1f32, 1.0]], &dev).unwrap())
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let nll0 = 3f32.ln();
    let nll1 = -(2f32.exp() / (2f32.exp() + 2.0)).ln();
    assert!((all - (nll0 + nll1) / 2.0).abs() < 1e-6);
    let first = masked_cross_entropy(&logits, &tgt, &Tensor::new(&[[1f32, 0.0]], &dev).unwrap())
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((first - nll0).abs() < 1e-6);
    let none = masked_cross_entropy(
        &logits,
        &tgt,
        &Tensor::zeros((1, 2), DType::F32, &dev).unwrap(),
    )
    .unwrap()
    .to_scalar::<f32>()
    .unwrap();
    assert_eq!(none, 0.0);
    let bad = Tensor::new(&[[3u32, 0]], &dev).unwrap();
    assert!(matches!(
        masked_cross_entropy(
            &logits,
            &bad,
            &Tensor::ones((1, 2), DType::F32, &dev).unwrap()
        )
        .unwrap_err(),
        ModelError::TokenOutOfRange {
            id: 3,
            vocab_size: 3
        }
    ));
}

/// The shipped from-scratch configs parse and build, and `small.json` costs about a
/// quarter of `tiny.json` per token (what its comment and docs/training.md promise).
#[test]
fn shipped_configs_build() {
    let params = |name: &str| {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models")
            .join(name);
        let mut cfg = LlamaConfig::from_file(&path).unwrap();
        cfg.vocab_size = 4874;
        let tensors = Llama::init_tensors(&cfg, 0).unwrap();
        Llama::new(
            &cfg,
            VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu),
        )
        .unwrap();
        tensors.values().map(|t| t.elem_count()).sum::<usize>()
    };
    let (tiny, small) = (params("tiny.json"), params("small.json"));
    assert_eq!(tiny, 4_199_168);
    assert!(small * 4 <= tiny + tiny / 10, "small {small}, tiny {tiny}");
}

/// Forward + backward time of `models/tiny.json` on a batch of 8 × 64 (prints; run with
/// `cargo test --release --test model -- --ignored --nocapture tiny_config_timing`).
#[test]
#[ignore]
fn tiny_config_timing() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny.json");
    let mut cfg = LlamaConfig::from_file(&path).unwrap();
    cfg.vocab_size = 4096;
    let varmap = varmap_from_tensors(&Llama::init_tensors(&cfg, 0).unwrap()).unwrap();
    let model = Llama::new(
        &cfg,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let x = ids(&random_ids(&mut rng, 8, 64, cfg.vocab_size));
    let tgt = ids(&random_ids(&mut rng, 8, 64, cfg.vocab_size));
    let mask = Tensor::ones((8, 64), DType::F32, &Device::Cpu).unwrap();
    let mut fwd = Vec::new();
    let mut both = Vec::new();
    for _ in 0..10 {
        let t0 = Instant::now();
        let logits = model.forward(&x, Some(&mask)).unwrap();
        let loss = masked_cross_entropy(&logits, &tgt, &mask).unwrap();
        let _ = loss.to_scalar::<f32>().unwrap();
        fwd.push(t0.elapsed().as_secs_f64() * 1e3);
        let grads = loss.backward().unwrap();
        both.push(t0.elapsed().as_secs_f64() * 1e3);
        drop(grads);
    }
    for v in [&mut fwd, &mut both] {
        v.sort_by(f64::total_cmp);
    }
    println!(
        "8x64, vocab {}: forward min {:.0} ms median {:.0} ms; forward+backward min {:.0} ms median {:.0} ms",
        cfg.vocab_size, fwd[0], fwd[5], both[0], both[5]
    );
}

/// Item vectors ([`sidrec::model::items`]): they change the logits from the token that
/// completes an item's SID on, never before; cached decoding (prefill, fork, reorder, one
/// token at a time) gives what the full forward gives; the table gets a gradient; a table
/// of the wrong shape is refused.
#[test]
fn item_vectors_join_where_a_sid_completes_alike_in_training_and_decoding() {
    use sidrec::model::items::ItemKeys;
    use sidrec::trie::Trie;
    let cfg = cfg(false);
    // SID tokens are ids 90..101: types 90, 91; codes 92..100.
    let trie = Trie::build(vec![
        (vec![0, 2, 5], 0),
        (vec![0, 2, 6], 1),
        (vec![1, 3, 7], 2),
        (vec![0, 4, 8], 3),
    ])
    .unwrap();
    let keys = ItemKeys::new(trie, 90, 11, 2);
    let w = random_weights(&cfg, 8);
    let plain = constant_model(&cfg, &w);
    let table = init_item_table(4, cfg.hidden_size, 1)
        .unwrap()
        .affine(25.0, 0.0)
        .unwrap();
    let model = constant_model(&cfg, &w)
        .with_items(table.clone(), keys.clone())
        .unwrap();
    assert!(model.has_items() && !plain.has_items());

    // text, item 0 (completes at 3), text, the start of item 1
    let seq: Vec<u32> = vec![5, 90, 92, 95, 7, 90, 92];
    let a = plain
        .forward(&ids(std::slice::from_ref(&seq)), None)
        .unwrap();
    let b = model
        .forward(&ids(std::slice::from_ref(&seq)), None)
        .unwrap();
    let at = |p: usize| max_abs_diff(&a.i((.., p, ..)).unwrap(), &b.i((.., p, ..)).unwrap());
    for p in 0..3 {
        assert!(at(p) < 1e-6, "position {p} moved by {}", at(p));
    }
    for p in 3..seq.len() {
        assert!(at(p) > 1e-3, "position {p} did not move");
    }

    // Decoding: prefill, fork into three beams, write three different items token by
    // token, reorder, go on past their completion.
    let prompt = &seq[..5];
    let mut cache = KvCache::new(&cfg);
    model
        .forward_cached(&ids(&[prompt.to_vec()]), &mut cache)
        .unwrap();
    let mut beams = cache.select(&[0, 0, 0]).unwrap();
    let mut seqs = vec![prompt.to_vec(); 3];
    let steps: [[u32; 3]; 3] = [[90, 90, 91], [92, 94, 93], [96, 98, 97]];
    for (s, toks) in steps.iter().enumerate() {
        let rows: Vec<Vec<u32>> = toks.iter().map(|&t| vec![t]).collect();
        let step = model.forward_cached_last(&ids(&rows), &mut beams).unwrap();
        for (q, &t) in seqs.iter_mut().zip(toks) {
            q.push(t);
        }
        let full = model.forward(&ids(&seqs), None).unwrap();
        let d = max_abs_diff(&step, &full.i((.., 5 + s, ..)).unwrap());
        assert!(d < 1e-4, "step {s}: cached differs by {d}");
    }
    let mut beams = beams.select(&[2, 0, 0]).unwrap();
    seqs = vec![seqs[2].clone(), seqs[0].clone(), seqs[0].clone()];
    for (q, t) in seqs.iter_mut().zip([7u32, 90, 91]) {
        q.push(t);
    }
    let step = model
        .forward_cached_last(&ids(&[vec![7], vec![90], vec![91]]), &mut beams)
        .unwrap();
    let full = model.forward(&ids(&seqs), None).unwrap();
    let d = max_abs_diff(&step, &full.i((.., 8, ..)).unwrap());
    assert!(d < 1e-4, "reordered cache differs by {d}");

    // Item dropout removes a position's vector whole or keeps it as inference adds it:
    // where item 0 completes, the logits are either the plain model's or the full one's,
    // and over a few keys both happen.
    let x = ids(std::slice::from_ref(&seq));
    let full = model.forward(&x, None).unwrap().i((.., 3, ..)).unwrap();
    let bare = plain.forward(&x, None).unwrap().i((.., 3, ..)).unwrap();
    let (mut kept, mut dropped) = (0, 0);
    for key in 0..16 {
        let d = Dropout {
            p: 0.0,
            key,
            items: 0.5,
        };
        let got = model
            .forward_train(&x, None, Some(d))
            .unwrap()
            .i((.., 3, ..))
            .unwrap();
        if max_abs_diff(&got, &full) < 1e-5 {
            kept += 1;
        } else {
            assert!(
                max_abs_diff(&got, &bare) < 1e-5,
                "key {key}: neither kept nor dropped"
            );
            dropped += 1;
        }
    }
    assert!(kept > 0 && dropped > 0, "kept {kept}, dropped {dropped}");

    // Training: the table is a parameter like any other.
    let mut t = random_weights(&cfg, 9);
    t.insert("items".into(), table);
    let varmap = varmap_from_tensors(&t).unwrap();
    let model = Llama::new(
        &cfg,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let var = varmap.data().lock().unwrap()["items"].clone();
    let model = model
        .with_items(var.as_tensor().clone(), keys.clone())
        .unwrap();
    let x = ids(&[seq[..6].to_vec()]);
    let tgt = ids(&[seq[1..].to_vec()]);
    let lm = Tensor::ones((1, 6), DType::F32, &Device::Cpu).unwrap();
    let loss = masked_cross_entropy(&model.forward(&x, None).unwrap(), &tgt, &lm).unwrap();
    let grads = loss.backward().unwrap();
    let g = grads.get(var.as_tensor()).expect("item table gradient");
    let per_row = g.sqr().unwrap().sum(1).unwrap().to_vec1::<f32>().unwrap();
    // Only item 0 was read.
    assert!(
        per_row[0] > 0.0 && per_row[1..].iter().all(|&r| r == 0.0),
        "{per_row:?}"
    );

    let bad = Tensor::zeros((3, cfg.hidden_size), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        constant_model(&cfg, &w).with_items(bad, keys).unwrap_err(),
        ModelError::Shape { .. }
    ));
}

/// Projecting only the scored positions (`forward_train_rows` + `Targets::scored_loss`,
/// what `sidrec train` does) gives the logits of `forward` at those positions, the loss of
/// `masked_cross_entropy` over every position, and the same gradient on every weight, with
/// item vectors and dropout on; a position outside the batch is an error, not a panic.
#[test]
fn scored_rows_give_the_full_loss_and_gradients() {
    use sidrec::train::soft::Targets;
    for tied in [true, false] {
        let cfg = cfg(tied);
        let varmap = varmap_from_tensors(&random_weights(&cfg, 21)).unwrap();
        let model = Llama::new(
            &cfg,
            VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(22);
        let (x, att, tgt, lm) = padded_batch(&mut rng, VOCAB);
        let (b, t) = x.dims2().unwrap();
        let drop = Some(Dropout {
            p: 0.2,
            key: 7,
            items: 0.0,
        });
        let full = model.forward_train(&x, Some(&att), drop).unwrap();
        let targets = Targets::one_hot(&tgt, &lm).unwrap();
        let rows = targets.positions();
        // The padded batch scores 8 + 5 + 3 of its 27 positions.
        assert_eq!(rows.len(), 16);
        let picked = model
            .forward_train_rows(&x, Some(&att), drop, &rows, None)
            .unwrap();
        let index = Tensor::new(rows.as_slice(), &Device::Cpu).unwrap();
        let expected = full
            .reshape((b * t, VOCAB))
            .unwrap()
            .index_select(&index, 0)
            .unwrap();
        assert!(max_abs_diff(&picked, &expected) < 1e-5);

        let plain = masked_cross_entropy(&full, &tgt, &lm).unwrap();
        let scored = targets
            .scored_loss(|rows| {
                model
                    .forward_train_rows(&x, Some(&att), drop, rows, None)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))
            })
            .unwrap();
        let (a, s) = (
            plain.to_scalar::<f32>().unwrap(),
            scored.to_scalar::<f32>().unwrap(),
        );
        assert!((a - s).abs() < 1e-5, "{a} vs {s}");
        let (ga, gs) = (plain.backward().unwrap(), scored.backward().unwrap());
        let data = varmap.data().lock().unwrap();
        for (name, var) in data.iter() {
            let (p, q) = (
                ga.get(var.as_tensor()).expect(name),
                gs.get(var.as_tensor()).expect(name),
            );
            assert!(max_abs_diff(p, q) < 1e-5, "{name}: gradients differ");
        }
        assert!(matches!(
            model.forward_train_rows(&x, Some(&att), None, &[(b * t) as u32], None),
            Err(ModelError::PositionOutOfRange { .. })
        ));
    }
}

/// Soft prompts (`model::soft_prompt`): the projections get gradients from a loss on the
/// answer, zero projections leave the model unchanged, a vector changes the logits of
/// its own and later positions only, and the cached forward (the prompt prefilled with
/// its vectors, then one token at a time) equals the full forward.
#[test]
fn soft_prompts_train_and_decode_alike() {
    use sidrec::model::soft_prompt::{
        init_weights, Slot, SoftInputs, REQUEST_WEIGHT, TASTE_WEIGHT,
    };
    let c = cfg(true);
    let dim = 12;
    let mut w = random_weights(&c, 21);
    let plain = constant_model(&c, &w);
    for (name, t) in init_weights(c.hidden_size, dim).unwrap() {
        w.insert(name, t);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let seqs = random_ids(&mut rng, 2, 9, VOCAB);
    let x = ids(&seqs);
    let vec_of = |rng: &mut ChaCha8Rng| -> Vec<f32> {
        (0..dim).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
    };
    let (q, u) = (vec_of(&mut rng), vec_of(&mut rng));
    // Row 0: request + taste at position 4; row 1: request at position 6.
    let mut soft = SoftInputs::new(dim);
    soft.push(Slot::Request, 4, &q);
    soft.push(Slot::Taste, 4, &u);
    soft.push(Slot::Request, 9 + 6, &q);

    // Zero projections: exactly the model without them.
    let zero = Llama::new(
        &c,
        VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu),
    )
    .unwrap()
    .with_soft_prompt(w[REQUEST_WEIGHT].clone(), w[TASTE_WEIGHT].clone())
    .unwrap();
    let all: Vec<u32> = (0..18).collect();
    let a = zero
        .forward_train_rows(&x, None, None, &all, Some(&soft))
        .unwrap();
    let b = plain
        .forward_train_rows(&x, None, None, &all, None)
        .unwrap();
    assert!(max_abs_diff(&a, &b) < 1e-6);

    // Gradients reach both projections (and only through positions with vectors).
    let map = varmap_from_tensors(&w).unwrap();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let vars = map.data().lock().unwrap().clone();
    let model = Llama::new(&c, vb)
        .unwrap()
        .with_soft_prompt(
            vars[REQUEST_WEIGHT].as_tensor().clone(),
            vars[TASTE_WEIGHT].as_tensor().clone(),
        )
        .unwrap();
    let logits = model
        .forward_train_rows(&x, None, None, &all, Some(&soft))
        .unwrap();
    let loss = logits.sqr().unwrap().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    for name in [REQUEST_WEIGHT, TASTE_WEIGHT] {
        let g = grad_norm(&grads, vars[name].as_tensor());
        assert!(g.is_some_and(|g| g > 0.0), "{name}: {g:?}");
    }

    // Trained (non-zero) projections: positions before a vector are unchanged, its own
    // and later ones change; the cached forward equals the full one.
    for (name, t) in w.iter_mut() {
        if name == REQUEST_WEIGHT || name == TASTE_WEIGHT {
            let v: Vec<f32> = (0..t.elem_count())
                .map(|_| rng.gen_range(-0.5f32..0.5))
                .collect();
            *t = Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
        }
    }
    let model = Llama::new(
        &c,
        VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu),
    )
    .unwrap()
    .with_soft_prompt(w[REQUEST_WEIGHT].clone(), w[TASTE_WEIGHT].clone())
    .unwrap();
    let full = model
        .forward_train_rows(&x, None, None, &all, Some(&soft))
        .unwrap();
    let base = plain
        .forward_train_rows(&x, None, None, &all, None)
        .unwrap();
    let row = |t: &Tensor, i: usize| t.i(i).unwrap();
    for p in 0..9 {
        let d = max_abs_diff(&row(&full, p), &row(&base, p));
        assert_eq!(d < 1e-6, p < 4, "row 0, position {p}: {d}");
    }
    let row0: Vec<u32> = seqs[0].clone();
    let prompt = ids(&[row0[..5].to_vec()]);
    let mut cache = KvCache::new(&c);
    let mut prefill = SoftInputs::new(dim);
    prefill.push(Slot::Request, 4, &q);
    prefill.push(Slot::Taste, 4, &u);
    let first = model
        .forward_cached_last_soft(&prompt, &mut cache, Some(&prefill))
        .unwrap();
    assert!(max_abs_diff(&first.squeeze(0).unwrap(), &row(&full, 4)) < 1e-4);
    for (p, &token) in row0.iter().enumerate().skip(5) {
        let step = model
            .forward_cached_last(&ids(&[vec![token]]), &mut cache)
            .unwrap();
        let d = max_abs_diff(&step.squeeze(0).unwrap(), &row(&full, p));
        assert!(d < 1e-4, "cached position {p}: {d}");
    }

    // Vectors for a model without projections are refused, not ignored.
    assert!(plain
        .forward_train_rows(&x, None, None, &all, Some(&soft))
        .is_err());
}
