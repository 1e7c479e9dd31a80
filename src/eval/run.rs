//! One whole evaluation, as `sidrec eval` runs it: load the model and the interactions,
//! rank, run the baselines and the peers, ask the steering requests, write the report.

use std::path::PathBuf;
use std::time::Instant;

use super::report::{self, Ranking, Report, Row};
use super::{
    constraints, evaluate_model, evaluate_steering, evaluate_type_steering, memory_baseline,
    most_popular, run_peer, sample_users, transition_breakdown, Accumulator, EvalError,
    ModelOptions,
};
use crate::decode::Engine;
use crate::error::{Error, Result};
use crate::interactions::{ReadOptions, Sequences};
use crate::memory::{MemorySettings, TransitionMemory};
use crate::progress::Progress;

/// Where the peer scripts are and how to run them.
#[derive(Clone, Debug)]
pub struct Peers {
    /// Directory holding `markov_next_item.py` and `sasrec_ce.py`.
    pub dir: PathBuf,
    pub python: String,
    /// Threads for SASRec.
    pub threads: usize,
    /// Run SASRec (the slowest peer: minutes).
    pub sasrec: bool,
}

/// What to evaluate and how (see `sidrec eval --help`).
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub model: PathBuf,
    /// How the decoder's matrices are held for ranking.
    pub weights: crate::model::packed::WeightFormat,
    pub interactions: PathBuf,
    pub out: PathBuf,
    pub force: bool,
    /// Dataset name [default: the interactions file's stem].
    pub name: Option<String>,
    /// Evaluate a seeded sample of this many users [default: all].
    pub users: Option<usize>,
    pub beams: usize,
    pub exact: bool,
    /// Leave each user's history out of their ranking (not the peers' protocol).
    pub exclude_seen: bool,
    /// Rank by the mixture of the whole history and its last N items alone (0: off;
    /// `None`: as the model's `sidrec.json` says).
    pub mix_recent: Option<usize>,
    /// Weight ratio of each further recent item under `mix_recent` (`None`: the default).
    pub recent_decay: Option<f32>,
    /// Mix in a transition memory built from the training parts at this weight
    /// ([`crate::decode::Request::memory`]; `None`: off).
    pub memory: Option<f32>,
    /// Users asked the steering requests (0: none).
    pub steer_users: usize,
    /// Held-out requests in words for the language section (`None`: none).
    pub requests: Option<PathBuf>,
    /// The sentence encoder of the language section's dense baseline (`None`:
    /// `assets/minilm`).
    pub encoder: Option<PathBuf>,
    /// Held-out format phrasings for the language section (`None`: none).
    pub formats: Option<PathBuf>,
    /// `None`: no peers.
    pub peers: Option<Peers>,
    pub seed: u64,
}

impl RunOptions {
    /// What the run reads: an output directory holding one of these is never replaced.
    pub fn inputs(&self) -> Vec<&std::path::Path> {
        vec![self.model.as_path(), self.interactions.as_path()]
    }
}

/// Runs the evaluation and writes its report into `opts.out`; returns the report and
/// the files written.
pub fn run(opts: &RunOptions, progress: &Progress) -> Result<(Report, Vec<PathBuf>)> {
    let t0 = Instant::now();
    // Fail before minutes of ranking, not after (the write checks again).
    crate::atomic::check_target(&opts.out, opts.force, &opts.inputs()).map_err(EvalError::from)?;
    let mut engine = Engine::load_weights(&opts.model, opts.encoder.as_deref(), opts.weights)?;
    let (seqs, _) = Sequences::load(
        &opts.interactions,
        engine.catalog(),
        &ReadOptions::default(),
    )?;
    let split = seqs.split();
    if split.test.is_empty() {
        return Err(EvalError::NoUsers.into());
    }
    // Built from the training parts, as `sidrec train` builds the model's own.
    let memory = TransitionMemory::build(
        engine.catalog().items.len(),
        &split.train,
        MemorySettings::default(),
    )?;
    // As the model ranks best (its recipe's ranking), unless the options say otherwise.
    let rank = engine
        .ranking()
        .with(opts.mix_recent, opts.recent_decay, opts.memory);
    if rank.memory.is_some() {
        engine.set_memory(Some(memory.clone()));
    }
    let users = sample_users(split.test.len(), opts.users, opts.seed);
    let cases: Vec<_> = users.iter().map(|&u| split.test[u].clone()).collect();
    let name = opts.name.clone().unwrap_or_else(|| {
        opts.interactions
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "dataset".into())
    });
    let mut notes = Vec::new();
    if opts.weights != crate::model::packed::WeightFormat::F32 {
        notes.push(format!(
            "The decoder ranked with its matrices held as {} (`--weights`), not as trained (f32).",
            opts.weights
        ));
    }
    let model_opts = ModelOptions {
        beams: opts.beams,
        exact: opts.exact,
        exclude_seen: opts.exclude_seen,
        mix_recent: rank.mix_recent,
        recent_decay: rank.recent_decay,
        memory: rank.memory,
        ..ModelOptions::default()
    };
    let sidrec = evaluate_model(&engine, &cases, &model_opts, progress)?;
    let mut rows = vec![Row {
        name: "sidrec".into(),
        metrics: sidrec.metrics.clone(),
        note: format!(
            "beam search, {} beams{}{}{}{}",
            sidrec.beams,
            match engine.ensemble_size() {
                1 => String::new(),
                n => format!(", ensemble of {n} decoders"),
            },
            if rank.mix_recent > 0 {
                format!(
                    ", mixture with the last {} items alone (decay {})",
                    rank.mix_recent,
                    rank.recent_decay.unwrap_or(crate::decode::RECENT_DECAY)
                )
            } else {
                String::new()
            },
            match rank.memory {
                Some(w) if w > 0.0 => format!(", transition memory at weight {w}"),
                _ => String::new(),
            },
            if opts.exclude_seen {
                ", history items excluded"
            } else {
                ""
            }
        ),
    }];
    if opts.exclude_seen {
        notes.push(
            "--exclude-seen: sidrec's rankings leave out each user's history; the baselines \
             rank the whole catalog, so the rows differ in protocol."
                .into(),
        );
    }
    if let Some(m) = &sidrec.exact {
        rows.push(Row {
            name: "sidrec (exact)".into(),
            metrics: m.clone(),
            // The same ranking as the row above (mixture, memory and members included),
            // with every item scored instead of a beam's.
            note: "every item scored exactly by the model above (no beam)".into(),
        });
    }
    let popular = most_popular(&split, engine.catalog().items.len());
    let mut acc = Accumulator::default();
    for (_, target) in &cases {
        acc.add(&popular, *target);
    }
    rows.push(Row {
        name: "most popular".into(),
        metrics: acc.finish(),
        note: "training counts".into(),
    });
    let s = memory.settings();
    rows.push(Row {
        name: "transition memory".into(),
        metrics: memory_baseline(&memory, &split, &cases, engine.catalog().items.len()),
        note: format!(
            "what followed the last {} items within {} positions in training (decay {})",
            s.recent, s.window, s.decay
        ),
    });
    let sampled = users.len() < split.test.len();
    if let Some(peers) = &opts.peers {
        let dir = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
        let inter = dir.path().join("interactions.json");
        seqs.write_json(&inter)?;
        let mut scripts = vec![("markov", "markov_next_item.py", Vec::new())];
        if peers.sasrec {
            let args = vec!["--threads".to_string(), peers.threads.to_string()];
            scripts.push(("SASRec-CE", "sasrec_ce.py", args));
        }
        for (label, script, args) in scripts {
            let path = peers.dir.join(script);
            if !path.is_file() {
                notes.push(format!("{label} skipped: {} not found", path.display()));
                continue;
            }
            let bar = progress.spinner(&format!("{label} ({script})"));
            let res = run_peer(&peers.python, &path, &inter, &args);
            bar.finish_and_clear();
            match res {
                Ok((metrics, _)) => rows.push(Row {
                    name: label.into(),
                    metrics,
                    note: if sampled {
                        format!("peer {script}, all {} users", split.test.len())
                    } else {
                        format!("peer {script}")
                    },
                }),
                Err(e) => notes.push(format!("{label} skipped: {e}")),
            }
        }
    }
    if sampled {
        notes.push(format!(
            "sidrec and most popular on a seeded sample of {} of {} users (--users, --seed {}); \
             the peers always evaluate every user.",
            users.len(),
            split.test.len(),
            opts.seed
        ));
    }
    let constraints = constraints(engine.catalog(), 4);
    let histories: Vec<_> = if opts.steer_users == 0 {
        Vec::new()
    } else {
        sample_users(
            split.test.len(),
            Some(opts.steer_users),
            opts.seed.wrapping_add(1),
        )
        .iter()
        .map(|&u| split.test[u].0.clone())
        .collect()
    };
    let steering = evaluate_steering(&engine, &histories, &constraints, opts.beams, progress)?;
    let type_steering = evaluate_type_steering(&engine, &histories, opts.beams, progress)?;
    let language = match &opts.requests {
        None => None,
        Some(file) => {
            let steer_cases: Vec<_> = sample_users(
                split.test.len(),
                Some(opts.steer_users),
                opts.seed.wrapping_add(1),
            )
            .iter()
            .map(|&u| split.test[u].clone())
            .collect();
            let lopts = super::language::LanguageOptions {
                file: file.clone(),
                encoder: opts
                    .encoder
                    .clone()
                    .unwrap_or_else(crate::embed::default_encoder_dir),
                users: if opts.steer_users == 0 {
                    &[]
                } else {
                    &steer_cases
                },
                beams: opts.beams,
                formats: opts.formats.clone(),
            };
            Some(super::language::evaluate(&engine, &lopts, progress)?)
        }
    };
    let ids = |i: u32| engine.catalog().items[i as usize].id.clone();
    let rankings = users
        .iter()
        .zip(&cases)
        .zip(&sidrec.rankings)
        .map(|((&u, (_, target)), ranked)| Ranking {
            user: seqs.users[u].clone(),
            target: ids(*target),
            rank: ranked.iter().position(|i| i == target),
            ranked: ranked.iter().map(|&i| ids(i)).collect(),
        })
        .collect();
    let by_transition = transition_breakdown(&split.train, &cases, &sidrec.rankings);
    let report = Report {
        dataset: name,
        model: opts.model.display().to_string(),
        interactions: opts.interactions.display().to_string(),
        protocol: if opts.exclude_seen {
            format!(
                "{}, except that sidrec's rankings leave out each user's history \
                 (--exclude-seen)",
                report::PROTOCOL
            )
        } else {
            report::PROTOCOL.into()
        },
        items: engine.catalog().items.len(),
        total_users: split.test.len(),
        users: users.len(),
        rows,
        sidrec,
        by_transition,
        constraints,
        steering,
        type_steering,
        language,
        notes,
        seconds: t0.elapsed().as_secs_f64(),
        rankings,
    };
    let train_report = std::fs::read_to_string(opts.model.join("train_report.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok());
    let files = report::write(
        &report,
        train_report.as_ref(),
        &opts.out,
        opts.force,
        &opts.inputs(),
    )?;
    Ok((report, files))
}
