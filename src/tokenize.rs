//! Catalog tokenization end to end: catalog → item texts → embeddings → residual k-means
//! → unique typed SIDs → artifact directory. This is what `sidrec tokenize` runs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::artifacts::{self, Artifacts, SidRecord};
use crate::catalog::{Catalog, Item, LoadOptions};
use crate::collab::{self, CollabConfig, CollabStats};
use crate::embed::{self, BertEncoder, Embeddings, Encoder};
use crate::error::{Error, Result};
use crate::interactions::{ReadOptions, Sequences};
use crate::kmeans::Rows;
use crate::progress::Progress;
use crate::quantize::{self, LevelTiming, QuantizeConfig, QuantizeReport};
use crate::sid::SidVocab;
use crate::template::Template;

/// Where item embeddings come from.
#[derive(Clone, Debug)]
pub enum EmbeddingSource {
    /// A local model directory (`config.json`, `tokenizer.json`, `model.safetensors`).
    ModelDir(PathBuf),
    /// A Hugging Face hub repository id (downloaded via hf-hub; needs the internet).
    Hub {
        repo: String,
        revision: Option<String>,
    },
    /// A precomputed `[n, d]` matrix (`.npy` or `.safetensors`), one row per item in
    /// catalog order.
    Precomputed(PathBuf),
}

/// Everything `tokenize` needs.
#[derive(Clone, Debug)]
pub struct TokenizeOptions {
    /// The catalog; `None` with precomputed embeddings makes anonymous items `0..n`.
    pub catalog: Option<PathBuf>,
    pub load: LoadOptions,
    pub template: Template,
    pub embeddings: EmbeddingSource,
    pub batch_size: usize,
    pub max_tokens: usize,
    pub quantize: QuantizeConfig,
    pub out: PathBuf,
    pub force: bool,
    pub save_embeddings: bool,
    /// Collaborative vectors joined to the text embeddings before quantization (`None`:
    /// text alone).
    pub collab: Option<CollabOptions>,
}

impl TokenizeOptions {
    /// What the run reads: an output directory holding one of these is never replaced.
    pub fn inputs(&self) -> Vec<&std::path::Path> {
        let mut v: Vec<&std::path::Path> = self.catalog.iter().map(|p| p.as_path()).collect();
        match &self.embeddings {
            EmbeddingSource::ModelDir(p) | EmbeddingSource::Precomputed(p) => v.push(p),
            EmbeddingSource::Hub { .. } => {}
        }
        v.extend(self.collab.as_ref().map(|c| c.interactions.as_path()));
        v
    }
}

/// Where collaborative vectors come from and how much they weigh (see [`crate::collab`]).
#[derive(Clone, Debug)]
pub struct CollabOptions {
    /// Interactions over the catalog's items; only each user's leave-one-out training
    /// part (all but the last two items) is used, so no evaluation target shapes a code.
    pub interactions: PathBuf,
    pub read: ReadOptions,
    /// The collaborative share of every squared distance, in `[0, 1]`.
    pub weight: f32,
    pub config: CollabConfig,
}

/// What the collaborative vectors were built from, in `report.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CollabReport {
    pub interactions: String,
    pub users: usize,
    /// Interactions in the training parts the vectors were built from.
    pub training_interactions: usize,
    pub weight: f32,
    pub config: CollabConfig,
    pub stats: CollabStats,
}

/// Wall-clock seconds per stage.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Timings {
    pub load: f64,
    pub embed: f64,
    pub quantize: f64,
    /// Fit and assignment seconds of each level.
    pub levels: Vec<LevelTiming>,
    /// Everything up to writing the artifacts.
    pub total: f64,
}

/// `report.json`: everything needed to judge a set of SIDs. Timings are the only field
/// that differs between two runs on the same input and seed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub n: usize,
    pub d: usize,
    /// Number of levels.
    pub levels: usize,
    /// Codes per level.
    pub codes: Vec<usize>,
    pub assign: quantize::Assign,
    pub iters: usize,
    pub seed: u64,
    /// MSE of the residual after each level.
    pub level_mse: Vec<f64>,
    pub final_mse: f64,
    /// `1 − distinct (type, codes) tuples / n` before dedup.
    pub collision_rate: f64,
    /// Dedup codes in use (0: every SID is type + level codes).
    pub dedup_codes: usize,
    pub types: BTreeMap<String, usize>,
    pub encoder: String,
    pub template: Option<String>,
    pub quantization: QuantizeReport,
    pub vocab: SidVocab,
    /// Present when collaborative vectors were joined to the text embeddings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collab: Option<CollabReport>,
    /// Catalog records `--skip-invalid` left out (listed in `skipped.jsonl`).
    #[serde(default)]
    pub skipped: usize,
    pub timings: Timings,
}

/// Runs the whole pipeline and writes the artifact directory. Returns the report.
pub fn run(opts: &TokenizeOptions, progress: Progress) -> Result<Report> {
    let t0 = Instant::now();
    let mut timings = Timings::default();
    // Fail before the expensive work, not after it (the write checks again).
    crate::atomic::check_target(&opts.out, opts.force, &opts.inputs())
        .map_err(|r| Error::Invalid(r.to_string()))?;

    // 1. Items and (if given) precomputed vectors.
    let precomputed = match &opts.embeddings {
        EmbeddingSource::Precomputed(p) => Some(embed::load_precomputed(p)?),
        _ => None,
    };
    let mut catalog = match (&opts.catalog, &precomputed) {
        (Some(path), _) => Catalog::load(path, &opts.load)?,
        (None, Some(e)) => anonymous_catalog(e.n, &opts.load.default_type)?,
        (None, None) => {
            return Err(Error::Invalid(
                "nothing to tokenize: give a catalog file, or precomputed --embeddings".into(),
            ))
        }
    };
    // Texts now, so that items `--skip-invalid` leaves out are gone before anything is
    // indexed by catalog position (the collaborative vectors below).
    let texts = match opts.embeddings {
        EmbeddingSource::Precomputed(_) => Vec::new(),
        _ => render_texts(opts, &mut catalog)?,
    };
    let collab_input = opts
        .collab
        .as_ref()
        .map(|c| read_collab(&catalog, c))
        .transpose()?;
    timings.load = t0.elapsed().as_secs_f64();

    // 2. Embeddings (text, then the collaborative part joined to it).
    let te = Instant::now();
    let (emb, encoder_name, template) = match (&opts.embeddings, precomputed) {
        (EmbeddingSource::Precomputed(p), Some(e)) => {
            if e.n != catalog.len() && !catalog.skipped.is_empty() {
                return Err(Error::Invalid(format!(
                    "{}: {} rows, one per catalog record, but --skip-invalid left out {} of \
                     the records ({} remain): give embeddings of the remaining items only, \
                     in catalog order (the records left out are listed with --skip-invalid \
                     in skipped.jsonl of a text-embedded run, or fix them in the catalog)",
                    p.display(),
                    e.n,
                    catalog.skipped.len(),
                    catalog.len()
                )));
            }
            if e.n != catalog.len() {
                return Err(Error::Invalid(format!(
                    "{}: {} rows, but the catalog has {} items (one row per item, in catalog order)",
                    p.display(),
                    e.n,
                    catalog.len()
                )));
            }
            (e, format!("precomputed:{}", p.display()), None)
        }
        (EmbeddingSource::ModelDir(dir), _) => {
            let enc = BertEncoder::from_dir(dir, opts.max_tokens)?;
            let e = encode(&enc, &texts, opts.batch_size, progress)?;
            (
                e,
                enc.name().to_string(),
                Some(opts.template.source().to_string()),
            )
        }
        (EmbeddingSource::Hub { repo, revision }, _) => {
            let enc = BertEncoder::from_hub(repo, revision.as_deref(), opts.max_tokens)?;
            let e = encode(&enc, &texts, opts.batch_size, progress)?;
            (
                e,
                enc.name().to_string(),
                Some(opts.template.source().to_string()),
            )
        }
        (EmbeddingSource::Precomputed(_), None) => unreachable!("loaded above"),
    };
    emb.validate(&encoder_name)?;
    for w in degenerate_rows(&emb, &catalog) {
        crate::progress::warn(&w);
    }
    let (emb, collab_report) = match &collab_input {
        Some(c) => {
            let (e, r) = join_collab(emb, c)?;
            (e, Some(r))
        }
        None => (emb, None),
    };
    timings.embed = te.elapsed().as_secs_f64();

    // 3. Residual k-means.
    let tq = Instant::now();
    let type_names = catalog.types();
    let type_of: Vec<u32> = catalog
        .items
        .iter()
        .map(|it| type_names.binary_search(&it.item_type).unwrap_or(0) as u32)
        .collect();
    let spin = progress.spinner(&format!(
        "quantizing {} x {} into {} levels",
        emb.n,
        emb.d,
        opts.quantize.levels.len()
    ));
    let q = quantize::quantize(Rows::new(&emb.data, emb.n, emb.d), &type_of, &opts.quantize)?;
    spin.finish_and_clear();
    timings.quantize = tq.elapsed().as_secs_f64();
    for (l, (asked, got)) in opts.quantize.levels.iter().zip(&q.codebooks).enumerate() {
        if got.k < *asked {
            crate::progress::warn(&format!(
                "level {}: {asked} codes asked for, but {} items allow only {}: the level \
                 uses {}",
                crate::sid::level_letter(l),
                emb.n,
                got.k,
                got.k
            ));
        }
    }
    timings.levels = q.timings.clone();

    // 4. SIDs.
    let vocab = SidVocab::new(
        type_names.clone(),
        q.codebooks.iter().map(|c| c.k).collect(),
        q.dedup_codes(),
    )?;
    let records = catalog
        .items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let codes = q.item_codes(i);
            let ids = vocab.encode(&item.item_type, codes, q.dedup[i])?;
            let mut all = codes.to_vec();
            all.extend(q.dedup[i]);
            Ok(SidRecord {
                id: item.id.clone(),
                item_type: item.item_type.clone(),
                codes: all,
                sid: vocab.format(&ids)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;

    let mut types = BTreeMap::new();
    for it in &catalog.items {
        *types.entry(it.item_type.clone()).or_insert(0) += 1;
    }
    let mut report = Report {
        n: emb.n,
        d: emb.d,
        levels: q.levels(),
        codes: q.codebooks.iter().map(|c| c.k).collect(),
        assign: opts.quantize.assign,
        iters: opts.quantize.iters,
        seed: opts.quantize.seed,
        level_mse: q.report.levels.iter().map(|l| l.mse).collect(),
        final_mse: q.report.final_mse,
        collision_rate: q.report.collision_rate,
        dedup_codes: vocab.dedup,
        types,
        encoder: encoder_name.clone(),
        template,
        quantization: q.report.clone(),
        vocab: vocab.clone(),
        collab: collab_report,
        skipped: catalog.skipped.len(),
        timings: timings.clone(),
    };

    // 5. Write everything at once.
    let meta = vec![
        ("seed".to_string(), opts.quantize.seed.to_string()),
        ("assign".to_string(), opts.quantize.assign.to_string()),
        ("encoder".to_string(), encoder_name),
    ];
    report.timings.total = t0.elapsed().as_secs_f64();
    let report_value = serde_json::to_value(&report).map_err(|e| Error::Invalid(e.to_string()))?;
    artifacts::write(
        &opts.out,
        &Artifacts {
            catalog: &catalog,
            records: &records,
            vocab: &vocab,
            codebooks: &q.codebooks,
            codebook_meta: meta,
            report: &report_value,
            embeddings: opts.save_embeddings.then_some(&emb),
            skipped: &catalog.skipped,
        },
        opts.force,
        &opts.inputs(),
    )?;
    Ok(report)
}

/// The interactions' training parts, read and checked before the expensive embedding
/// step, so a bad file or weight fails at once.
struct CollabInput<'a> {
    opts: &'a CollabOptions,
    users: usize,
    train: Vec<Vec<u32>>,
}

fn read_collab<'a>(catalog: &Catalog, c: &'a CollabOptions) -> Result<CollabInput<'a>> {
    if !(0.0..=1.0).contains(&c.weight) {
        return Err(Error::Invalid(format!(
            "--collab-weight {}: must be between 0 and 1 (the collaborative share of distances)",
            c.weight
        )));
    }
    let (seqs, _) = Sequences::load(&c.interactions, catalog, &c.read)?;
    Ok(CollabInput {
        opts: c,
        users: seqs.len(),
        train: seqs.split().train,
    })
}

/// Builds collaborative vectors from the training parts and joins them to the text
/// embeddings (see [`collab::combine`]).
fn join_collab(text: Embeddings, c: &CollabInput<'_>) -> Result<(Embeddings, CollabReport)> {
    let (vecs, dim, stats) = collab::vectors(&c.train, text.n, &c.opts.config)?;
    let data = collab::combine(&text.data, text.d, &vecs, dim, c.opts.weight);
    let report = CollabReport {
        interactions: c.opts.interactions.display().to_string(),
        users: c.users,
        training_interactions: c.train.iter().map(Vec::len).sum(),
        weight: c.opts.weight,
        config: c.opts.config.clone(),
        stats,
    };
    Ok((
        Embeddings {
            n: text.n,
            d: text.d + dim,
            data,
        },
        report,
    ))
}

/// Each item's text under the template. An item whose text renders empty is an error
/// naming its line, or, under `--skip-invalid`, is left out of `catalog` (and listed in
/// its skipped records).
fn render_texts(opts: &TokenizeOptions, catalog: &mut Catalog) -> Result<Vec<String>> {
    let texts: Vec<String> = catalog
        .items
        .iter()
        .map(|it| opts.template.render(it))
        .collect();
    let file = opts
        .catalog
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "<catalog>".into());
    let empty: Vec<(usize, String)> = texts
        .iter()
        .enumerate()
        .filter(|(_, t)| !t.chars().any(char::is_alphanumeric))
        .map(|(i, _)| {
            (
                i,
                format!(
                    "{file}:{}: item {:?}: the template {:?} renders no text for it (no \
                     letters or digits in the fields it uses)",
                    catalog.line_of(i),
                    catalog.items[i].id,
                    opts.template.source()
                ),
            )
        })
        .collect();
    if empty.is_empty() {
        return Ok(texts);
    }
    if !opts.load.skip_invalid {
        let (_, first) = &empty[0];
        let more = match empty.len() {
            1 => String::new(),
            n => format!(" ({} more items render empty)", n - 1),
        };
        return Err(Error::Invalid(format!(
            "{first}{more}: use a template that reads other fields (--template), fix the \
             items, or pass --skip-invalid to leave such items out"
        )));
    }
    if empty.len() == catalog.len() {
        return Err(Error::Invalid(format!(
            "{file}: the template {:?} renders no text for any item: use a template that \
             reads the catalog's fields (--template)",
            opts.template.source()
        )));
    }
    let keep: Vec<String> = texts
        .into_iter()
        .enumerate()
        .filter(|(i, _)| empty.binary_search_by_key(i, |(j, _)| *j).is_err())
        .map(|(_, t)| t)
        .collect();
    *catalog = catalog.without(&empty);
    Ok(keep)
}

fn encode(
    enc: &dyn Encoder,
    texts: &[String],
    batch_size: usize,
    progress: Progress,
) -> Result<Embeddings> {
    let bar = progress.bar(texts.len() as u64, "embedding");
    let e = embed::encode_all(enc, texts, batch_size, &mut |done| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    Ok(e)
}

/// Items `0..n` for a bare embedding matrix: ids are row numbers.
fn anonymous_catalog(n: usize, default_type: &str) -> Result<Catalog> {
    let item_type = crate::catalog::normalize_type(default_type)
        .map_err(|e| Error::Invalid(format!("--type {default_type:?}: {e}")))?;
    let items = (0..n)
        .map(|i| Item {
            id: i.to_string(),
            item_type: item_type.clone(),
            title: format!("item {i}"),
            description: String::new(),
            attrs: Default::default(),
        })
        .collect();
    Ok(Catalog::from_items(items)?)
}

/// Warnings for embedding rows that cannot tell items apart: all-zero rows (an encoder
/// fed nothing, a padded export) and rows identical to an earlier one (duplicated items,
/// or texts the template renders alike). Such items still get unique SIDs, but only
/// through the dedup code, so their codes say nothing about them.
fn degenerate_rows(emb: &Embeddings, catalog: &Catalog) -> Vec<String> {
    let id = |i: usize| {
        catalog
            .items
            .get(i)
            .map_or_else(|| i.to_string(), |it| format!("{:?}", it.id))
    };
    let rows = || emb.data.chunks_exact(emb.d.max(1)).enumerate();
    let zero: Vec<usize> = rows()
        .filter(|(_, r)| r.iter().all(|&v| v == 0.0))
        .map(|(i, _)| i)
        .collect();
    let mut first: std::collections::HashMap<Vec<u32>, usize> =
        std::collections::HashMap::with_capacity(emb.n);
    let mut same: Vec<(usize, usize)> = Vec::new();
    for (i, r) in rows() {
        let key: Vec<u32> = r.iter().map(|v| v.to_bits()).collect();
        match first.get(&key) {
            Some(&j) => same.push((i, j)),
            None => {
                first.insert(key, i);
            }
        }
    }
    let mut out = Vec::new();
    if !zero.is_empty() {
        out.push(format!(
            "{} of {} embedding rows are all zeros (first: item {}): their codes will not \
             describe them; check the encoder input or the embeddings file",
            zero.len(),
            emb.n,
            id(zero[0])
        ));
    }
    if !same.is_empty() {
        let (i, j) = same[0];
        out.push(format!(
            "{} embedding rows repeat an earlier row exactly (first: item {} as item {}): \
             such items differ only in their dedup code; give them distinct text",
            same.len(),
            id(i),
            id(j)
        ));
    }
    out
}
