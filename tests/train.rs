//! `sidrec train` end to end on a small catalog: a from-scratch model learns, the model
//! directory is complete and reloads, and its SID map is checked.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sidrec::model::config::LlamaConfig;
use sidrec::model::hfdir::{self, HfDir};
use sidrec::model::llama::Llama;
use sidrec::progress::Progress;
use sidrec::train::pipeline::{self, BaseModel, Mode, StageConfig};

mod common;
use common::{artifacts, fixture, interactions, llama_config, options, scores, tiny_config};

/// The tiny config from scratch with a 400-token BPE: the base of most tests here.
fn scratch(dir: &Path) -> BaseModel {
    BaseModel::Scratch {
        config: tiny_config(dir),
        vocab_size: 400,
    }
}

#[test]
fn trains_from_scratch_and_writes_a_complete_model_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let art = artifacts(tmp.path(), 0);
    let inter = interactions(tmp.path());
    let out = tmp.path().join("model");
    let base = scratch(tmp.path());
    let report = pipeline::run(
        &options(art.clone(), inter, base, out.clone()),
        Progress::new(true),
    )
    .unwrap();

    // The loss falls in both stages, and validation loss is reported at the end of each.
    assert_eq!(report.stages.len(), 2);
    for s in &report.stages {
        let first = s.report.train_loss.first().unwrap().loss;
        let last = s.report.train_loss.last().unwrap().loss;
        assert!(last < first, "stage {}: {first} -> {last}", s.name);
        assert_eq!(s.report.valid_loss.len(), 1, "stage {}", s.name);
        assert!(s.report.valid_loss[0].1.is_finite());
    }
    assert_eq!(report.users, 24);
    assert!(report.examples["recommend"] > 0 && report.examples["align"] == 20);

    // The directory: HF files, the SID map checksum, the report.
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "sidrec.json",
        "train_report.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    hfdir::check_sid_map(&out, art.join("sids.jsonl")).unwrap();
    let dir = HfDir::load(&out).unwrap();
    let side = dir.sidecar.clone().unwrap();
    assert_eq!(side.stage, "instruct");
    let vocab = sidrec::artifacts::read_vocab(&art).unwrap();
    assert_eq!(side.sid_tokens, vocab.len());
    // SID tokens are single tokens with contiguous ids from the recorded offset.
    for (i, t) in vocab.tokens().iter().enumerate() {
        assert_eq!(
            dir.tokenizer.token_to_id(t),
            Some(side.sid_token_offset + i as u32),
            "{t}"
        );
    }
    let sid = "<movie><a_0><b_0>";
    let enc = dir.tokenizer.encode(sid, false).unwrap();
    assert_eq!(enc.get_ids().len(), 3, "{sid} must be three tokens");

    // It reloads and runs: logits over the extended vocabulary.
    let cfg = LlamaConfig::from_json_str(&dir.config.to_string(), "config.json").unwrap();
    assert_eq!(cfg.vocab_size, side.sid_token_offset as usize + vocab.len());
    let tensors: HashMap<String, Tensor> = dir.tensors;
    let model = Llama::new(
        &cfg,
        VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let ids = Tensor::new(&[[1u32, 5, 9]], &Device::Cpu).unwrap();
    let logits = model.forward(&ids, None).unwrap();
    assert_eq!(logits.dims(), &[1, 3, cfg.vocab_size]);

    // A model is tied to its SID map: another tokenization is refused, naming both.
    let other = artifacts(tmp.path(), 5);
    let err = hfdir::check_sid_map(&out, other.join("sids.jsonl"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("sha256") || err.contains("SID"), "{err}");

    // The output directory is not overwritten without force.
    let base = scratch(tmp.path());
    let again = pipeline::run(
        &options(art, interactions(tmp.path()), base, out.clone()),
        Progress::new(true),
    );
    assert!(again.unwrap_err().to_string().contains("--force"));
}

/// Training is a function of its seed, with dropout too.
#[test]
fn same_seed_gives_identical_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let art = artifacts(tmp.path(), 0);
    let inter = interactions(tmp.path());
    let run = |name: &str, dropout: f32| {
        let out = tmp.path().join(name);
        let base = scratch(tmp.path());
        let mut o = options(art.clone(), inter.clone(), base, out.clone());
        o.dropout = dropout;
        o.stage1 = None;
        o.stage2 = Some(StageConfig {
            mode: Mode::Full,
            epochs: 1,
            max_steps: 3,
            lr: 3e-3,
        });
        pipeline::run(&o, Progress::new(true)).unwrap();
        fs::read(out.join("model.safetensors")).unwrap()
    };
    assert_eq!(run("a", 0.0), run("b", 0.0));
    // Dropout masks come from the seed and the batch, not from an unseeded generator.
    let dropped = run("c", 0.2);
    assert_eq!(dropped, run("d", 0.2));
    assert_ne!(dropped, run("e", 0.0));
}

/// A pretrained-style base without SID tokens: a BPE tokenizer and fresh weights, saved
/// as a Hugging Face directory.
fn plain_base(dir: &Path) -> PathBuf {
    let texts = fs::read_to_string(fixture("catalog.jsonl")).unwrap();
    let tok = sidrec::model::bpe::train_bpe(texts.lines().cycle().take(100), 350).unwrap();
    let mut cfg = LlamaConfig::from_file(&tiny_config(dir)).unwrap();
    cfg.vocab_size = tok.get_vocab_size(true);
    let tensors = Llama::init_tensors(&cfg, 3).unwrap();
    let out = dir.join("plain");
    HfDir {
        config: serde_json::from_str(&cfg.to_json_string()).unwrap(),
        tensors,
        tokenizer: tok,
        tokenizer_config: None,
        sidecar: None,
    }
    .save(&out, false)
    .unwrap();
    out
}

#[test]
fn lora_and_rows_modes_train_only_their_parameters() {
    let tmp = tempfile::tempdir().unwrap();
    let art = artifacts(tmp.path(), 0);
    let inter = interactions(tmp.path());
    let mut o = options(
        art.clone(),
        inter.clone(),
        BaseModel::HfDir(plain_base(tmp.path())),
        tmp.path().join("ft"),
    );
    o.stage1 = Some(StageConfig {
        mode: Mode::Rows,
        epochs: 1,
        max_steps: 2,
        lr: 1e-3,
    });
    o.stage2 = Some(StageConfig {
        mode: Mode::Lora,
        epochs: 1,
        max_steps: 2,
        lr: 1e-3,
    });
    let report = pipeline::run(&o, Progress::new(true)).unwrap();
    let hidden = 64;
    let rows = &report.stages[0];
    assert_eq!(rows.mode, Mode::Rows);
    // Rows mode trains exactly the new (SID) rows: sid_tokens × hidden.
    assert_eq!(rows.trainable_params, report.sid_tokens * hidden);
    let lora = &report.stages[1];
    assert!(lora.trainable_params > rows.trainable_params);
    assert!(lora.trainable_params < report.params / 2);

    // A directory that already speaks a SID map is refused as a base.
    let o2 = options(
        art,
        inter,
        BaseModel::HfDir(tmp.path().join("ft")),
        tmp.path().join("ft2"),
    );
    let err = pipeline::run(&o2, Progress::new(true))
        .unwrap_err()
        .to_string();
    assert!(err.contains("sidrec.json"), "{err}");
}

/// A model trained on SID-only histories says so in sidrec.json, and inference writes
/// its histories the same way; a model trained with titles keeps sidrec.json as it was
/// (no new key), so existing model directories and their checksums are unchanged.
#[test]
fn history_format_travels_from_training_to_inference() {
    let tmp = tempfile::tempdir().unwrap();
    let art = artifacts(tmp.path(), 0);
    let inter = interactions(tmp.path());
    let train = |titles: bool| {
        let out = tmp.path().join(format!("model-{titles}"));
        let base = scratch(tmp.path());
        let mut o = options(art.clone(), inter.clone(), base, out.clone());
        o.stage1 = None;
        if let Some(s) = o.stage2.as_mut() {
            s.epochs = 1;
        }
        o.data.history_titles = titles;
        pipeline::run(&o, Progress::new(true)).unwrap();
        out
    };
    let sid_only = train(false);
    let titled = train(true);
    let json = |d: &Path| fs::read_to_string(d.join("sidrec.json")).unwrap();
    assert!(
        json(&sid_only).contains("\"history_titles\": false"),
        "{}",
        json(&sid_only)
    );
    assert!(
        !json(&titled).contains("history_titles"),
        "{}",
        json(&titled)
    );

    let req = |e: &sidrec::decode::Engine| sidrec::decode::Request {
        history: vec![e.index_of("m1").unwrap()],
        k: 3,
        ..Default::default()
    };
    let e = sidrec::decode::Engine::load(&sid_only).unwrap();
    let p = e.prompt_text(&req(&e)).unwrap();
    assert!(
        p.contains(&e.sids().records[0].sid) && !p.contains("Toy Story"),
        "{p}"
    );
    assert_eq!(e.recommend(&req(&e)).unwrap().len(), 3);
    let e = sidrec::decode::Engine::load(&titled).unwrap();
    assert!(e
        .prompt_text(&req(&e))
        .unwrap()
        .contains("Toy Story (1995)"));
}

/// A model trained on whole histories says so in sidrec.json, is validated on the
/// continuation of each history, and inference asks plain history requests as that
/// continuation (the instruction, then the history and the separator), while requests
/// with words keep the recommend prompt.
#[test]
fn sequence_training_travels_to_inference() {
    let tmp = tempfile::tempdir().unwrap();
    let art = artifacts(tmp.path(), 0);
    let inter = interactions(tmp.path());
    let out = tmp.path().join("model");
    let base = scratch(tmp.path());
    let mut o = options(art, inter, base, out.clone());
    o.stage1 = None;
    o.data.sequence = true;
    o.data.history_titles = false;
    let report = pipeline::run(&o, Progress::new(true)).unwrap();
    assert!(report.examples["sequence"] > 0, "{:?}", report.examples);
    let stage = &report.stages[0].report;
    let (first, last) = (
        stage.train_loss.first().unwrap().loss,
        stage.train_loss.last().unwrap().loss,
    );
    assert!(last < first, "{first} -> {last}");
    assert!(stage.valid_loss[0].1.is_finite());
    let json = fs::read_to_string(out.join("sidrec.json")).unwrap();
    assert!(json.contains("\"sequence\": true"), "{json}");

    let e = sidrec::decode::Engine::load(&out).unwrap();
    let history = vec![e.index_of("m1").unwrap(), e.index_of("m2").unwrap()];
    let req = sidrec::decode::Request {
        history: history.clone(),
        k: 3,
        ..Default::default()
    };
    let sid = |i: u32| e.sids().records[i as usize].sid.clone();
    let p = e.prompt_text(&req).unwrap();
    let instruction = sidrec::train::data::sequence_prompt(
        e.catalog(),
        &sidrec::train::data::Prompts::builtin(),
        0,
    )
    .unwrap();
    assert_eq!(
        p,
        format!("{instruction}\n{}; {};", sid(history[0]), sid(history[1]))
    );
    let recs = e.recommend(&req).unwrap();
    assert_eq!(recs.len(), 3);
    // With words, the recommend prompt that carries them.
    let worded = sidrec::decode::Request {
        query: "a comedy".into(),
        ..req
    };
    let p = e.prompt_text(&worded).unwrap();
    assert!(
        p.contains("a comedy") && !p.starts_with(&instruction),
        "{p}"
    );
}

/// Soon-after pairs: training adds them under their own instruction and says so in
/// sidrec.json; `mix_recent` then asks each recent item alone with that instruction
/// (a model without them asks the item as a one-item history), and ranks.
#[test]
fn soon_pairs_travel_to_inference() {
    let tmp = tempfile::tempdir().unwrap();
    let art = artifacts(tmp.path(), 0);
    let inter = interactions(tmp.path());
    let base = scratch(tmp.path());
    let mut o = options(art, inter, base, tmp.path().join("plain"));
    o.stage1 = None;
    o.data.sequence = true;
    o.data.history_titles = false;
    let plain = pipeline::run(&o, Progress::new(true)).unwrap();
    o.out = tmp.path().join("soon");
    o.data.sequence_soon = 2;
    let soon = pipeline::run(&o, Progress::new(true)).unwrap();
    assert!(
        soon.examples["sequence"] > plain.examples["sequence"],
        "{:?} vs {:?}",
        soon.examples,
        plain.examples
    );
    let json = fs::read_to_string(o.out.join("sidrec.json")).unwrap();
    assert!(json.contains("\"soon\": true"), "{json}");
    let plain_json = fs::read_to_string(tmp.path().join("plain/sidrec.json")).unwrap();
    assert!(!plain_json.contains("soon"), "{plain_json}");

    for (dir, with_soon) in [(tmp.path().join("plain"), false), (o.out.clone(), true)] {
        let e = sidrec::decode::Engine::load(&dir).unwrap();
        let instruction = sidrec::train::data::soon_prompt(
            e.catalog(),
            &sidrec::train::data::Prompts::builtin(),
            0,
        )
        .unwrap();
        let (m1, m2) = (e.index_of("m1").unwrap(), e.index_of("m2").unwrap());
        let mut req = sidrec::decode::Request {
            history: vec![m1, m2],
            k: 3,
            ..Default::default()
        };
        let asked = e.recent_input(&req, m2).unwrap();
        let alone = e
            .model_input(&sidrec::decode::Request {
                history: vec![m2],
                ..req.clone()
            })
            .unwrap();
        let sid = &e.sids().records[m2 as usize].sid;
        if with_soon {
            assert!(asked.contains(&instruction), "{asked}");
            assert!(asked.ends_with(&format!("{sid}; ")), "{asked}");
            assert_ne!(asked, alone);
        } else {
            assert_eq!(asked, alone);
        }
        req.mix_recent = 2;
        let hits = e.rank(&req).unwrap();
        let mut items: Vec<u32> = hits.iter().map(|h| h.item).collect();
        items.sort();
        items.dedup();
        assert_eq!(items.len(), 3);
    }
}

/// `item_embeddings`: the item table is trained in every mode (beside the LoRA adapters
/// too), saved under its own name, and read back by the engine, which then recommends
/// with it.
#[test]
fn item_vectors_train_save_and_load() {
    use sidrec::model::items::ITEM_TABLE;
    let tmp = tempfile::tempdir().unwrap();
    let art = artifacts(tmp.path(), 0);
    let inter = interactions(tmp.path());
    let out = tmp.path().join("model");
    let mut o = options(art.clone(), inter.clone(), scratch(tmp.path()), out.clone());
    o.item_embeddings = true;
    o.data.sequence = true;
    o.data.history_titles = false;
    let report = pipeline::run(&o, Progress::new(true)).unwrap();
    let hf = HfDir::load(&out).unwrap();
    let table = hf.tensors.get(ITEM_TABLE).expect("item table saved");
    let items = sidrec::artifacts::read_catalog(&art).unwrap().items.len();
    assert_eq!(table.dims(), [items, 64]);
    let without: usize = hf
        .tensors
        .iter()
        .filter(|(k, _)| k.as_str() != ITEM_TABLE)
        .map(|(_, t)| t.elem_count())
        .sum();
    assert_eq!(report.params, without + items * 64);
    for s in &report.stages {
        assert_eq!(s.trainable_params, report.params, "stage {}", s.name);
    }
    // Trained: away from its seeded start.
    let init = sidrec::model::llama::init_item_table(items, 64, o.seed).unwrap();
    let moved = (table - &init)
        .unwrap()
        .abs()
        .unwrap()
        .max_keepdim(1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(moved.iter().all(|&d| d > 1e-4), "{moved:?}");

    let e = sidrec::decode::Engine::load(&out).unwrap();
    assert!(e.model().has_items());
    let req = sidrec::decode::Request {
        history: vec![e.index_of("m1").unwrap(), e.index_of("m2").unwrap()],
        k: 3,
        ..Default::default()
    };
    assert_eq!(e.recommend(&req).unwrap().len(), 3);

    // LoRA: the table trains beside the adapters and the new rows.
    let mut o = options(
        art,
        inter,
        BaseModel::HfDir(plain_base(tmp.path())),
        tmp.path().join("ft"),
    );
    o.item_embeddings = true;
    o.stage1 = Some(StageConfig {
        mode: Mode::Rows,
        epochs: 1,
        max_steps: 2,
        lr: 1e-3,
    });
    o.stage2 = None;
    let report = pipeline::run(&o, Progress::new(true)).unwrap();
    assert_eq!(
        report.stages[0].trainable_params,
        (report.sid_tokens + items) * 64
    );
    let hf = HfDir::load(tmp.path().join("ft")).unwrap();
    assert_eq!(hf.tensors[ITEM_TABLE].dims(), [items, 64]);
}

/// `run_members`: members differ by seed, land under `members/NN` of one model
/// directory, and the engine ranks by their equal mixture: every score is the mixture of
/// each member's exact score, also with `mix_recent`; a member of another size joins the
/// same mixture. A member trained on another SID map is refused by name.
#[test]
fn members_train_together_and_rank_as_one_mixture() {
    use sidrec::decode::{logsumexp, Engine, Request};
    let tmp = tempfile::tempdir().unwrap();
    let art = artifacts(tmp.path(), 0);
    let inter = interactions(tmp.path());
    let out = tmp.path().join("model");
    let mut o = options(art.clone(), inter.clone(), scratch(tmp.path()), out.clone());
    o.stage1 = None;
    o.data.sequence = true;
    o.data.history_titles = false;
    let reports = pipeline::run_members(&o, 2, Progress::new(true)).unwrap();
    assert_eq!(reports.len(), 2);
    let member = out.join(hfdir::MEMBERS_DIR).join("01");
    assert!(member.join("sidrec.json").is_file() && out.join("train_report.json").is_file());
    assert!(
        !out.with_extension("members").exists(),
        "staging is cleaned up"
    );
    let weights = |d: &Path| fs::read(d.join("model.safetensors")).unwrap();
    assert_ne!(weights(&out), weights(&member), "members differ by seed");
    // The first member is the single model of the same seed.
    let single = tmp.path().join("single");
    o.out = single.clone();
    pipeline::run(&o, Progress::new(true)).unwrap();
    assert_eq!(weights(&out), weights(&single));

    let both = Engine::load(&out).unwrap();
    assert_eq!(both.ensemble_size(), 2);
    let a = Engine::load(&single).unwrap();
    let b = Engine::load(&member).unwrap();
    let n = both.catalog().items.len();
    let history: Vec<u32> = ["m1", "m3", "m4"]
        .iter()
        .map(|id| both.index_of(id).unwrap())
        .collect();
    // Each member alone, under the same (possibly mixed) request.
    let alone = |e: &Engine, r: &Request| scores(e.rank(r).unwrap());
    // The whole catalog, every score the equal mixture of the members' own scores.
    let assert_mixture =
        |hits: Vec<sidrec::decode::Hit>, members: &[HashMap<u32, f32>], what: &str| {
            assert_eq!(hits.len(), n);
            let share = (1.0f32 / members.len() as f32).ln();
            for h in hits {
                let parts: Vec<f32> = members.iter().map(|s| share + s[&h.item]).collect();
                let want = logsumexp(&parts);
                assert!(
                    (h.score - want).abs() < 1e-3,
                    "{what}: {} vs {want}",
                    h.score
                );
            }
        };
    for mix in [0, 1] {
        let r = Request {
            history: history.clone(),
            k: n,
            mix_recent: mix,
            ..Default::default()
        };
        let members = [alone(&a, &r), alone(&b, &r)];
        assert_mixture(both.rank(&r).unwrap(), &members, &format!("mix {mix}"));
    }
    // A member of another size (any decoder trained on the same artifacts with the same
    // history options) joins the mixture with its own config.
    let narrow_cfg = llama_config(tmp.path(), "narrow", [32, 64, 1, 2, 1]);
    let mut on = o.clone();
    on.base = BaseModel::Scratch {
        config: narrow_cfg,
        vocab_size: 400,
    };
    on.out = tmp.path().join("narrow");
    on.stage2.as_mut().unwrap().max_steps = 3;
    pipeline::run(&on, Progress::new(true)).unwrap();
    let c = Engine::load(&on.out).unwrap();
    let narrow = out.join(hfdir::MEMBERS_DIR).join("02");
    fs::rename(&on.out, &narrow).unwrap();
    let three = Engine::load(&out).unwrap();
    assert_eq!(three.ensemble_size(), 3);
    let r = Request {
        history: history.clone(),
        k: n,
        ..Default::default()
    };
    let members = [alone(&a, &r), alone(&b, &r), alone(&c, &r)];
    assert_mixture(three.rank(&r).unwrap(), &members, "three decoders");
    fs::remove_dir_all(&narrow).unwrap();
    // A member from another SID map.
    let other_dir = tmp.path().join("other");
    fs::create_dir(&other_dir).unwrap();
    let other_art = artifacts(&other_dir, 1);
    let mut o2 = options(
        other_art,
        inter,
        scratch(tmp.path()),
        tmp.path().join("other-model"),
    );
    o2.stage1 = None;
    o2.stage2.as_mut().unwrap().max_steps = 2;
    pipeline::run(&o2, Progress::new(true)).unwrap();
    let stray = out.join(hfdir::MEMBERS_DIR).join("02");
    fs::rename(tmp.path().join("other-model"), &stray).unwrap();
    let err = Engine::load(&out)
        .err()
        .expect("a member on another SID map");
    assert!(err.to_string().contains("02"), "{err}");
    // Resuming an ensemble is refused before anything is written.
    o.resume = true;
    o.out = tmp.path().join("resumed");
    let err = pipeline::run_members(&o, 2, Progress::new(true)).unwrap_err();
    assert!(err.to_string().contains("--members"), "{err}");
    assert!(!o.out.exists());
}

/// `select_users`: the instruct stage ranks the held-out next items at every evaluation,
/// records NDCG@10 per evaluation, and the saved model is the selected step's: ranked
/// again from the directory, the same users score exactly the recorded best.
#[test]
fn selection_saves_the_weights_with_the_best_validation_ndcg() {
    let tmp = tempfile::tempdir().unwrap();
    let art = artifacts(tmp.path(), 0);
    let inter = interactions(tmp.path());
    let out = tmp.path().join("model");
    let base = scratch(tmp.path());
    let mut o = options(art, inter.clone(), base, out.clone());
    o.stage1 = None;
    o.data.sequence = true;
    o.data.history_titles = false;
    o.eval_every = 4;
    // More than the fixture's 24 users: every user is ranked, in user order.
    o.select_users = 100;
    // Training ranks with the validator it is given (the evaluation's): without one,
    // selection is refused rather than skipped.
    let err = pipeline::run(&o, Progress::new(true)).unwrap_err();
    assert!(err.to_string().contains("validator"), "{err}");
    o.validator = Some(sidrec::eval::select_validator());
    let report = pipeline::run(&o, Progress::new(true)).unwrap();
    let stage = &report.stages[0].report;
    let steps: Vec<usize> = stage.valid_metric.iter().map(|p| p.0).collect();
    let mut want: Vec<usize> = (4..=stage.steps).step_by(4).collect();
    if want.last() != Some(&stage.steps) {
        want.push(stage.steps);
    }
    assert_eq!(steps, want);
    assert!(stage
        .valid_metric
        .iter()
        .all(|p| (0.0..=1.0).contains(&p.1)));
    let best = stage
        .valid_metric
        .iter()
        .fold(f64::NEG_INFINITY, |m, p| m.max(p.1));
    let selected = stage.selected_step.expect("a selected step");
    let at = stage.valid_metric.iter().find(|p| p.0 == selected).unwrap();
    assert_eq!(at.1, best, "{:?}", stage.valid_metric);
    let json = fs::read_to_string(out.join("train_report.json")).unwrap();
    assert!(json.contains("\"selected_step\""), "{json}");

    let e = sidrec::decode::Engine::load(&out).unwrap();
    let (seqs, _) = sidrec::interactions::Sequences::load(
        &inter,
        e.catalog(),
        &sidrec::interactions::ReadOptions::default(),
    )
    .unwrap();
    let split = seqs.split();
    let r = sidrec::eval::evaluate_model(
        &e,
        &split.valid,
        &sidrec::eval::ModelOptions::default(),
        &Progress::new(true),
    )
    .unwrap();
    assert_eq!(r.metrics.ndcg_10, best);
}

/// `--soft-targets`: the transition memory teaches every item target. The same seed with
/// and without it must train differently (the teacher found its items through the SID
/// tokens: a wrong token offset or item index would leave every target one-hot and the
/// losses equal), the held-out loss stays the plain one, and the model still ranks.
#[test]
fn soft_targets_take_the_memory_as_teacher() {
    let tmp = tempfile::tempdir().unwrap();
    let art = artifacts(tmp.path(), 0);
    let inter = interactions(tmp.path());
    let run = |share: f32, name: &str| {
        let out = tmp.path().join(name);
        let mut o = options(art.clone(), inter.clone(), scratch(tmp.path()), out.clone());
        o.stage1 = None;
        o.data.sequence = true;
        o.data.history_titles = false;
        o.soft_targets = share;
        (pipeline::run(&o, Progress::new(true)).unwrap(), out)
    };
    let (plain, _) = run(0.0, "plain");
    let (taught, out) = run(0.5, "taught");
    let losses = |r: &pipeline::TrainReport| -> Vec<f32> {
        r.stages[0]
            .report
            .train_loss
            .iter()
            .map(|p| p.loss)
            .collect()
    };
    let (a, b) = (losses(&plain), losses(&taught));
    assert_eq!(a.len(), b.len());
    assert!(
        a.iter().zip(&b).any(|(x, y)| (x - y).abs() > 1e-4),
        "the teacher changed nothing: {a:?}"
    );
    assert!(b.last().unwrap() < b.first().unwrap(), "{b:?}");
    assert!(taught.stages[0].report.valid_loss[0].1.is_finite());
    // The report on disk says how the model was trained.
    let saved: pipeline::TrainReport =
        serde_json::from_str(&std::fs::read_to_string(out.join(pipeline::REPORT_FILE)).unwrap())
            .unwrap();
    let recipe = saved.recipe.expect("train_report.json records the recipe");
    assert_eq!(recipe["soft_targets"], 0.5);
    assert_eq!(recipe["data"]["sequence"], true);
    assert_eq!(recipe["data"]["history_titles"], false);
    assert_eq!(plain.recipe.unwrap()["soft_targets"], 0.0);
    let e = sidrec::decode::Engine::load(&out).unwrap();
    let history = vec![e.index_of("m1").unwrap(), e.index_of("m2").unwrap()];
    let recs = e
        .recommend(&sidrec::decode::Request {
            history,
            k: 3,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(recs.len(), 3);
}

/// A model trained with soft prompts (request and taste vectors, MiniLM on the fixture
/// catalog) records its encoder, saves the projections, loads and answers with them; the
/// request's words change the answer's scores, which they could not do through a
/// projection the loader dropped; another encoder is refused.
#[test]
fn soft_prompts_train_save_and_answer() {
    use sidrec::decode::{Engine, Mode, Request};
    use sidrec::model::soft_prompt::{REQUEST_WEIGHT, TASTE_WEIGHT};
    let minilm = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/minilm");
    assert!(
        minilm.join("model.safetensors").is_file(),
        "run scripts/fetch-assets.sh"
    );
    let tmp = tempfile::tempdir().unwrap();
    let art = tmp.path().join("artifacts");
    let opts = sidrec::tokenize::TokenizeOptions {
        catalog: Some(common::fixture("catalog.jsonl")),
        load: sidrec::catalog::LoadOptions {
            format: None,
            default_type: "item".into(),
            skip_invalid: false,
        },
        template: sidrec::template::Template::default(),
        embeddings: sidrec::tokenize::EmbeddingSource::ModelDir(minilm.clone()),
        batch_size: 8,
        max_tokens: 64,
        quantize: sidrec::quantize::QuantizeConfig {
            levels: vec![4, 4],
            iters: 5,
            seed: 0,
            ..Default::default()
        },
        out: art.clone(),
        force: false,
        save_embeddings: false,
        collab: None,
    };
    sidrec::tokenize::run(&opts, Progress::new(true)).unwrap();
    let out = tmp.path().join("model");
    let mut o = common::options(
        art,
        common::interactions(tmp.path()),
        BaseModel::Scratch {
            config: common::tiny_config(tmp.path()),
            vocab_size: 400,
        },
        out.clone(),
    );
    o.request_vectors = true;
    o.taste_vectors = true;
    o.data.requests_per_item = 2;
    sidrec::train::pipeline::run(&o, Progress::new(true)).unwrap();

    let side = sidrec::model::hfdir::Sidecar::read(&out).unwrap();
    let card = side.soft_prompt.expect("the card records the soft prompts");
    assert!(card.request && card.taste);
    assert_eq!(
        card.encoder_sha256,
        sidrec::model::hfdir::sha256_file(minilm.join("model.safetensors")).unwrap()
    );
    let hf = sidrec::model::hfdir::HfDir::load(&out).unwrap();
    for name in [REQUEST_WEIGHT, TASTE_WEIGHT] {
        let w = &hf.tensors[name];
        let norm = w
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0, "{name} was not trained");
    }

    let engine = Engine::load(&out).unwrap();
    assert!(engine.reads_request_vectors());
    let search = |q: &str| Request {
        mode: Mode::Search,
        query: q.into(),
        k: 3,
        ..Request::default()
    };
    let a = engine.rank(&search("a podcast about science")).unwrap();
    let b = engine.rank(&search("an old war movie")).unwrap();
    assert_eq!(a.len(), 3);
    assert_ne!(
        a.iter().map(|h| h.score).collect::<Vec<_>>(),
        b.iter().map(|h| h.score).collect::<Vec<_>>()
    );
    // With the vectors taken away the same words score differently: they were read.
    let mut blind = Engine::load(&out).unwrap();
    blind.set_soft_vectors(None);
    let c = blind.rank(&search("a podcast about science")).unwrap();
    assert_ne!(
        a.iter().map(|h| h.score).collect::<Vec<_>>(),
        c.iter().map(|h| h.score).collect::<Vec<_>>()
    );

    // Another encoder (a copy with one byte changed) is refused, naming both.
    let fake = tmp.path().join("other-encoder");
    std::fs::create_dir(&fake).unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(minilm.join(f), fake.join(f)).unwrap();
    }
    let mut bytes = std::fs::read(fake.join("model.safetensors")).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(fake.join("model.safetensors"), bytes).unwrap();
    let err = Engine::load_with(&out, Some(&fake))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("not the one the model was trained with"),
        "{err}"
    );
}
