//! `sidrec train`: a recipe, the data, a model directory.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use sidrec::artifacts;
use sidrec::interactions::ReadOptions;
use sidrec::progress::Progress;

pub(crate) const TRAIN_HELP: &str = "Trains a decoder that speaks the catalog's semantic IDs.\n\n\
Inputs: an artifact directory from `sidrec tokenize` and the users' interactions \
(RecBole .inter, the Amazon interactions.json layout, or JSONL {\"user\", \"items\"}). The \
last two items of every user (validation, test) never appear in training data.\n\n\
Everything else is a recipe: a TOML file of settings (base model, stages, epochs, \
dropout, example mix, and how the model ranks best). Without --recipe, train picks the \
built-in recipe measured best for data like yours and says which: `movielens` for long \
histories, `amazon` for short ones (fewer than 20 items per user on average). \
--set KEY=VALUE changes one setting of it; train_report.json records the whole recipe \
and sidrec.json how the model ranks, so recommend, repl, serve and eval need no flags. \
The recipe files, every key and the measured tables: recipes/*.toml and docs/training.md.\n\n\
Output: config.json, model.safetensors, tokenizer.json (with SID tokens), sidrec.json \
(sha256 of sids.jsonl, recipe, ranking), the catalog and SID map, transitions.json and \
train_report.json (loss curves and the recipe). Written all at once: an interrupted or \
failed run leaves no half-written model.\n\n\
Examples:\n  \
sidrec train --artifacts out/ml-100k --interactions assets/ml-100k/ml-100k.inter -o out/ml100k\n  \
sidrec train --artifacts out/amz --interactions interactions.json -o out/amz --set stage2_epochs=3\n  \
sidrec train --artifacts out/ml-100k --interactions assets/ml-100k/ml-100k.inter --recipe my.toml -o out/m\n  \
sidrec train --artifacts out/ml-100k --interactions assets/ml-100k/ml-100k.inter --recipe demo -o out/reads";

#[derive(Args)]
pub(crate) struct TrainArgs {
    /// Artifact directory written by `sidrec tokenize`.
    #[arg(long, help_heading = "Input and output")]
    artifacts: PathBuf,
    /// User interactions (RecBole .inter, Amazon interactions.json, or JSONL).
    #[arg(long, help_heading = "Input and output")]
    interactions: PathBuf,
    /// Output model directory.
    #[arg(short, long, help_heading = "Input and output")]
    out: PathBuf,
    /// Replace the output directory if it is one sidrec wrote.
    #[arg(long, help_heading = "Input and output")]
    force: bool,
    /// Leave out interaction lines that cannot be read and items the catalog lacks,
    /// instead of stopping at the first; they are listed in train_report.json.
    #[arg(long, help_heading = "Input and output")]
    skip_invalid: bool,
    /// The recipe: a built-in name (amazon, movielens, or demo: the demo model's, which
    /// reads requests through soft prompts) or a TOML file [default: chosen
    /// from the data's history length, and printed].
    #[arg(long, help_heading = "Recipe")]
    recipe: Option<String>,
    /// Change one setting of the recipe, e.g. --set dropout=0.1 --set rank.memory=2
    /// (keys: docs/training.md). Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE", help_heading = "Recipe")]
    set: Vec<String>,
    /// Base model instead of the recipe's: a config JSON (from scratch), a Hugging Face
    /// directory, or a .gguf file (e.g. assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf).
    #[arg(long, help_heading = "Recipe")]
    base: Option<PathBuf>,
    /// Random seed (members take seed, seed + 1, ...).
    #[arg(long, default_value_t = 0, help_heading = "Recipe")]
    seed: u64,
    /// Continue from the checkpoints of an interrupted run with the same settings.
    #[arg(long, help_heading = "Run")]
    resume: bool,
}

pub(crate) fn cmd_train(a: TrainArgs, progress: Progress) -> Result<()> {
    use sidrec::train::recipe::{self, Loaded};
    let mut loaded = match &a.recipe {
        Some(spec) => Loaded::from_spec(spec)?,
        None => {
            let (loaded, why) = recipe::choose(mean_history(&a)?)?;
            if !progress.quiet {
                eprintln!(
                    "recipe: {} ({}): {why}; --recipe chooses another",
                    loaded.recipe.name, loaded.origin
                );
            }
            loaded
        }
    };
    if let Some(base) = &a.base {
        // A path given on the command line is relative to the working directory.
        let abs = std::path::absolute(base).unwrap_or_else(|_| base.clone());
        loaded.recipe.base = abs.display().to_string();
    }
    loaded.set(&a.set)?;
    let mut opts = loaded.options(
        a.artifacts.clone(),
        a.interactions.clone(),
        a.out.clone(),
        a.seed,
    )?;
    opts.force = a.force;
    opts.resume = a.resume;
    opts.skip_invalid = a.skip_invalid;
    if opts.select_users > 0 {
        opts.validator = Some(sidrec::eval::select_validator());
    }
    let members = loaded.recipe.members;
    let reports = sidrec::train::pipeline::run_members(&opts, members, progress)?;
    for (i, report) in reports.iter().enumerate() {
        let member = match reports.len() {
            1 => String::new(),
            _ => format!("member {i} (seed {}): ", a.seed.wrapping_add(i as u64)),
        };
        println!(
            "{member}trained {} ({:.1}M parameters, {} SID tokens) on {} users in {:.0}s",
            report.base,
            report.params as f64 / 1e6,
            report.sid_tokens,
            report.users,
            report.seconds
        );
        print_stages(report);
    }
    println!(
        "  wrote {} (recipe {}{})",
        a.out.display(),
        loaded.recipe.name,
        if a.set.is_empty() {
            String::new()
        } else {
            format!(", with {}", a.set.join(" "))
        }
    );
    Ok(())
}

/// The mean length of the users' training histories, which picks the recipe.
pub(crate) fn mean_history(a: &TrainArgs) -> Result<f64> {
    let catalog = artifacts::read_catalog(&a.artifacts)?;
    let read = ReadOptions {
        skip_invalid: a.skip_invalid,
        ..ReadOptions::default()
    };
    let (seqs, _) = sidrec::interactions::Sequences::load(&a.interactions, &catalog, &read)?;
    let split = seqs.split();
    let total: usize = split.train.iter().map(Vec::len).sum();
    Ok(total as f64 / split.train.len().max(1) as f64)
}

/// One line per training stage of a report.
pub(crate) fn print_stages(report: &sidrec::train::pipeline::TrainReport) {
    for s in &report.stages {
        let first = s.report.train_loss.first().map_or(f32::NAN, |p| p.loss);
        let last = s.report.train_loss.last().map_or(f32::NAN, |p| p.loss);
        let valid = s.report.valid_loss.last().map_or(f32::NAN, |v| v.1);
        println!(
            "  stage {:<8} {:?}: {} examples, {} steps, loss {first:.3} -> {last:.3}, valid {valid:.3}, {:.0} tokens/s",
            s.name, s.mode, s.examples, s.report.steps, s.report.tokens_per_s
        );
        if let Some(step) = s.report.selected_step {
            let best = s.report.valid_metric.iter().find(|p| p.0 == step);
            println!(
                "  kept step {step}'s weights: validation NDCG@10 {:.4} (the last evaluation's {:.4})",
                best.map_or(f64::NAN, |p| p.1),
                s.report.valid_metric.last().map_or(f64::NAN, |p| p.1)
            );
        }
    }
}
