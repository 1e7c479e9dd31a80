//! `sidrec tokenize`: a catalog into semantic IDs.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;

use sidrec::artifacts;
use sidrec::catalog::{Format, LoadOptions};
use sidrec::collab::CollabConfig;
use sidrec::embed::DEFAULT_MAX_TOKENS;
use sidrec::interactions::ReadOptions;
use sidrec::progress::Progress;
use sidrec::quantize::{Assign, QuantizeConfig};
use sidrec::template::Template;
use sidrec::tokenize::{self, CollabOptions, EmbeddingSource, Report, TokenizeOptions};

use super::parse_format;

pub(crate) const TOKENIZE_HELP: &str = "Turns a catalog into semantic IDs.\n\n\
Reads the catalog (JSONL, CSV/TSV with a header, RecBole .item, or the Amazon items.json \
layout), renders each item's text from a template, embeds it with a BERT-family sentence \
encoder (or reads precomputed embeddings), quantizes the embeddings with residual k-means \
and writes an artifact directory:\n\n  \
catalog.jsonl          normalised items\n  \
sids.jsonl             id, type, codes, SID token string per item\n  \
codebooks.safetensors  one [codes, d] tensor per level, and the SID vocabulary\n  \
report.json            MSE per level, collision rate, codebook usage, fan-out, timings\n\n\
The directory is written atomically: on any error nothing is left half-written.\n\n\
Examples:\n  \
sidrec tokenize assets/ml-100k/ml-100k.item --type movie -o out/ml-100k\n  \
sidrec tokenize items.jsonl --encoder sentence-transformers/all-MiniLM-L6-v2 -o out/items\n  \
sidrec tokenize --embeddings e.npy --levels 3 --codes 256 -o out/e";

#[derive(Args)]
pub(crate) struct TokenizeArgs {
    /// Catalog file. Optional with --embeddings (items are then named 0..n).
    catalog: Option<PathBuf>,
    /// Output artifact directory [default: out/<catalog or embeddings file stem>].
    #[arg(short, long)]
    out: Option<PathBuf>,
    /// Replace the output directory if it exists.
    #[arg(long)]
    force: bool,
    /// Catalog format [default: from the file extension: .jsonl, .csv, .tsv, .item, .json].
    #[arg(long, value_parser = parse_format)]
    format: Option<Format>,
    /// Entity type of items whose catalog gives none (e.g. movie, track, podcast).
    #[arg(long = "type", default_value = "item")]
    item_type: String,
    /// Leave out catalog records that cannot be read, fail validation or whose text
    /// renders empty, instead of stopping at the first; they are counted and listed in
    /// OUT/skipped.jsonl (line, id, what was wrong).
    #[arg(long)]
    skip_invalid: bool,
    /// Template file for the text embedded per item [default: prompts/item_text.txt,
    /// built in]. Placeholders: {id} {type} {title} {description} {attrs.KEY}.
    #[arg(long)]
    template: Option<PathBuf>,
    /// Sentence encoder: a local model directory or a Hugging Face hub id
    /// [default: assets/minilm, fetched by scripts/fetch-assets.sh].
    #[arg(long, conflicts_with = "embeddings")]
    encoder: Option<String>,
    /// Precomputed embeddings instead of an encoder: .npy float32 [n, d] or .safetensors,
    /// one row per catalog item in order.
    #[arg(long)]
    embeddings: Option<PathBuf>,
    /// Texts per encoder batch (texts are grouped by length; small batches of long texts
    /// allocate less: 16 was fastest on 2 cores).
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Token limit per item text (longer texts are truncated).
    #[arg(long, default_value_t = DEFAULT_MAX_TOKENS)]
    max_tokens: usize,
    /// Number of residual levels.
    #[arg(long, default_value_t = 3)]
    levels: usize,
    /// Codes per level: one number for all levels, or one per level (e.g. 256,256,128).
    #[arg(long, default_value = "256", value_delimiter = ',')]
    codes: Vec<usize>,
    /// Lloyd iterations per level.
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Random seed: the same input and seed give byte-identical SIDs and codebooks.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Code assignment: `balanced` (capacity-balanced levels, prefix-unique last level:
    /// far fewer collisions) or `plain` (nearest centroid, as faiss does).
    #[arg(long, default_value = "balanced")]
    assign: Assign,
    /// Balanced levels: a code holds at most (1 + slack) · n / codes items.
    #[arg(long, default_value_t = 0.25)]
    balance_slack: f32,
    /// Balanced last level: an item moves off its nearest code to a free one only if
    /// that costs at most this fraction more squared error (near-duplicates keep their
    /// code and get a dedup code instead).
    #[arg(long, default_value_t = 0.25)]
    unique_max_cost: f32,
    /// k-means trains on at most this many points per centroid (the rest are assigned).
    #[arg(long, default_value_t = 256)]
    max_points_per_centroid: usize,
    /// Also write the embeddings that were quantized (embeddings.npy).
    #[arg(long)]
    save_embeddings: bool,
    /// Interactions (the file `sidrec train` will read): join collaborative vectors,
    /// built from what users took within a few positions of each other, to the text
    /// embeddings, so that SID prefixes follow co-consumption too. Only each user's
    /// training part (all but the last two items) is read, so evaluation targets never
    /// shape a code.
    #[arg(long)]
    interactions: Option<PathBuf>,
    /// With --interactions: the collaborative share of every squared distance, 0..1
    /// (0.3 kept the most Amazon Scientific validation transitions within one first code;
    /// 0.5 and more lost to it).
    #[arg(long, default_value_t = 0.3, requires = "interactions")]
    collab_weight: f32,
    /// With --interactions: dimensions of the collaborative vectors (PPMI factorised).
    #[arg(long, default_value_t = CollabConfig::default().dim, requires = "interactions")]
    collab_dim: usize,
    /// With --interactions: items at most this many positions apart co-occur (weight
    /// 1/distance).
    #[arg(long, default_value_t = CollabConfig::default().window, requires = "interactions")]
    collab_window: usize,
    /// Print report.json to stdout instead of the human summary.
    #[arg(long)]
    json: bool,
}

pub(crate) fn cmd_tokenize(a: TokenizeArgs, progress: Progress) -> Result<()> {
    let codes = match a.codes.len() {
        1 => vec![a.codes[0]; a.levels],
        n if n == a.levels => a.codes.clone(),
        n => bail!(
            "--codes lists {n} sizes for {} levels: give one size, or one per level",
            a.levels
        ),
    };
    let template = match &a.template {
        Some(p) => Template::load(p)?,
        None => Template::default(),
    };
    let embeddings = match (&a.embeddings, &a.encoder) {
        (Some(p), _) => EmbeddingSource::Precomputed(p.clone()),
        (None, Some(e)) if Path::new(e).exists() => EmbeddingSource::ModelDir(e.into()),
        (None, Some(e)) if e.contains('/') && !e.starts_with('.') && !e.starts_with('/') => {
            let (repo, revision) = match e.split_once('@') {
                Some((r, v)) => (r.to_string(), Some(v.to_string())),
                None => (e.clone(), None),
            };
            EmbeddingSource::Hub { repo, revision }
        }
        (None, Some(e)) => {
            bail!("--encoder {e}: no such directory (and not a hub id like org/name)")
        }
        (None, None) => {
            let dir = sidrec::embed::default_encoder_dir();
            if !dir.join("model.safetensors").exists() {
                bail!(
                    "no encoder: {} does not exist. Run scripts/fetch-assets.sh, or pass \
                     --encoder DIR|HUB_ID, or --embeddings FILE",
                    dir.display()
                );
            }
            EmbeddingSource::ModelDir(dir)
        }
    };
    let out = match &a.out {
        Some(o) => o.clone(),
        None => {
            let src = a.catalog.as_ref().or(a.embeddings.as_ref());
            let stem = src
                .and_then(|p| p.file_stem())
                .and_then(|s| s.to_str())
                .unwrap_or("sids");
            PathBuf::from("out").join(stem)
        }
    };
    let opts = TokenizeOptions {
        catalog: a.catalog.clone(),
        load: LoadOptions {
            format: a.format,
            default_type: a.item_type.clone(),
            skip_invalid: a.skip_invalid,
        },
        template,
        embeddings,
        batch_size: a.batch_size,
        max_tokens: a.max_tokens,
        quantize: QuantizeConfig {
            levels: codes,
            iters: a.iters,
            seed: a.seed,
            max_points_per_centroid: a.max_points_per_centroid,
            assign: a.assign,
            balance_slack: a.balance_slack,
            unique_max_cost: a.unique_max_cost,
            ..Default::default()
        },
        out: out.clone(),
        force: a.force,
        save_embeddings: a.save_embeddings,
        collab: a.interactions.as_ref().map(|path| CollabOptions {
            interactions: path.clone(),
            read: ReadOptions {
                skip_invalid: a.skip_invalid,
                ..ReadOptions::default()
            },
            weight: a.collab_weight,
            config: CollabConfig {
                dim: a.collab_dim,
                window: a.collab_window,
                seed: a.seed,
                ..Default::default()
            },
        }),
    };
    let report = tokenize::run(&opts, progress)?;
    if report.skipped > 0 {
        sidrec::progress::warn(&format!(
            "--skip-invalid left out {} catalog records; they are listed in {}",
            report.skipped,
            out.join(artifacts::SKIPPED_FILE).display()
        ));
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_summary(&report, &out);
    }
    Ok(())
}

pub(crate) fn print_summary(r: &Report, out: &Path) {
    let types: Vec<String> = r.types.iter().map(|(t, n)| format!("{t} {n}")).collect();
    println!(
        "{} items ({}), d={}, {} levels x {:?} codes, assign={}, seed={}",
        r.n,
        types.join(", "),
        r.d,
        r.levels,
        r.codes,
        r.assign,
        r.seed
    );
    println!("  encoder      {}", r.encoder);
    if let Some(c) = &r.collab {
        println!(
            "  collab       weight {} dim {} window {} from {} ({} users, {} training interactions, {} items covered)",
            c.weight,
            c.stats.eigenvalues.len(),
            c.config.window,
            c.interactions,
            c.users,
            c.training_interactions,
            c.stats.items_covered
        );
    }
    for (l, lv) in r.quantization.levels.iter().enumerate() {
        println!(
            "  level {}      mse {:.5}  usage {:5.1}%  perplexity {:7.1}  fit {:.2}s",
            sidrec::sid::level_letter(l),
            lv.mse,
            lv.usage * 100.0,
            lv.perplexity,
            r.timings.levels.get(l).map_or(0.0, |t| t.fit + t.assign)
        );
    }
    println!(
        "  collisions   {:.2}% of items before dedup ({} dedup codes, largest group {})",
        r.collision_rate * 100.0,
        r.dedup_codes,
        r.quantization.max_collision_group
    );
    let fan: Vec<String> = r
        .quantization
        .fanout
        .iter()
        .map(|f| format!("{} max {} mean {:.1}", f.depth, f.max, f.mean))
        .collect();
    println!("  fan-out      {}", fan.join(" | "));
    println!(
        "  time         {:.2}s (load {:.2}, embed {:.2}, quantize {:.2})",
        r.timings.total, r.timings.load, r.timings.embed, r.timings.quantize
    );
    println!("  wrote        {}", out.display());
}
