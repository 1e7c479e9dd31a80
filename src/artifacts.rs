//! The artifact directory `tokenize` writes and everything after it reads:
//! `catalog.jsonl`, `sids.jsonl`, `codebooks.safetensors`, `report.json`.
//!
//! Writing is all-or-nothing: files go to a temporary directory beside the destination,
//! which is renamed into place only when every file is complete. A failed or interrupted
//! run leaves the previous artifacts (or nothing) behind, never a mix.

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::catalog::{Catalog, LoadOptions};
use crate::error::{Error, Result};
use crate::kmeans::Centroids;
use crate::model::items::ItemKeys;
use crate::sid::SidVocab;
use crate::trie::{ItemIdx, Trie};

pub const CATALOG_FILE: &str = "catalog.jsonl";
pub const SIDS_FILE: &str = "sids.jsonl";
pub const CODEBOOKS_FILE: &str = "codebooks.safetensors";
pub const REPORT_FILE: &str = "report.json";
/// Written only with `--save-embeddings`: the embeddings that were quantized, so other
/// tools (and the benchmark's peers) can be fed identical input.
pub const EMBEDDINGS_FILE: &str = "embeddings.npy";
/// The records `--skip-invalid` left out ([`crate::skipped`]); written only when some were.
pub const SKIPPED_FILE: &str = "skipped.jsonl";

/// The single metadata key of `codebooks.safetensors` (a JSON object: levels, vocab, seed,
/// encoder, …).
pub const META_KEY: &str = "sidrec";

/// One line of `sids.jsonl`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SidRecord {
    pub id: String,
    #[serde(rename = "type")]
    pub item_type: String,
    /// Level codes, then the dedup code for items whose tuple collides.
    pub codes: Vec<u32>,
    /// The SID token string, e.g. `<movie><a_17><b_203><c_5>`.
    pub sid: String,
}

/// A catalog's SIDs: the vocabulary, one record per item (catalog order) and the trie
/// over their token ids. Item index `i` in the trie is `records[i]`.
#[derive(Clone)]
pub struct SidMap {
    pub vocab: SidVocab,
    pub records: Vec<SidRecord>,
    pub trie: Trie,
    by_id: HashMap<String, usize>,
}

impl SidMap {
    /// Builds the map from records, parsing each SID with the vocabulary.
    pub fn new(vocab: SidVocab, records: Vec<SidRecord>) -> Result<Self> {
        let mut paths = Vec::with_capacity(records.len());
        let mut by_id = HashMap::with_capacity(records.len());
        for (i, r) in records.iter().enumerate() {
            paths.push((vocab.parse(&r.sid)?, i as ItemIdx));
            if by_id.insert(r.id.clone(), i).is_some() {
                return Err(Error::Invalid(format!(
                    "duplicate item id {:?} in SID map",
                    r.id
                )));
            }
        }
        let trie = Trie::build(paths)?;
        Ok(SidMap {
            vocab,
            records,
            trie,
            by_id,
        })
    }

    /// Reads `sids.jsonl` and the vocabulary recorded in `codebooks.safetensors` of an
    /// artifact directory.
    pub fn load(dir: &Path) -> Result<Self> {
        let vocab = read_vocab(dir)?;
        let path = dir.join(SIDS_FILE);
        let file = fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        let mut records = Vec::new();
        for (i, line) in BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|e| Error::io(&path, e))?;
            if line.trim().is_empty() {
                continue;
            }
            let r: SidRecord = serde_json::from_str(&line)
                .map_err(|e| Error::Invalid(format!("{}:{}: {e}", path.display(), i + 1)))?;
            records.push(r);
        }
        Self::new(vocab, records)
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Index of an item id.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.by_id.get(id).copied()
    }

    /// The record of a SID string, if it names an item.
    pub fn lookup_sid(&self, sid: &str) -> Option<&SidRecord> {
        let ids = self.vocab.parse(sid).ok()?;
        self.trie.lookup(&ids).map(|i| &self.records[i as usize])
    }

    /// Items whose SID shares the first `depth` tokens (type token included) with item
    /// `i`, excluding `i`, in trie order.
    pub fn sharing_prefix(&self, i: usize, depth: usize) -> Vec<usize> {
        let Some(path) = self.trie.path(i as ItemIdx) else {
            return Vec::new();
        };
        let depth = depth.min(path.len());
        match self.trie.walk(&path[..depth]) {
            Some(node) => self
                .trie
                .items_under(node)
                .iter()
                .map(|&j| j as usize)
                .filter(|&j| j != i)
                .collect(),
            None => Vec::new(),
        }
    }

    /// The keys of a model's input-side item vectors ([`crate::model::items`]) for a
    /// model whose SID token 0 has id `offset`: item `i` is table row `i`.
    pub fn item_keys(&self, offset: u32) -> ItemKeys {
        ItemKeys::new(
            self.trie.clone(),
            offset,
            self.vocab.len() as u32,
            self.vocab.type_ids().end,
        )
    }
}

/// Reads the SID vocabulary from the metadata of `codebooks.safetensors`.
pub fn read_vocab(dir: &Path) -> Result<SidVocab> {
    let path = dir.join(CODEBOOKS_FILE);
    let bytes = fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    let bad = |what: String| Error::Invalid(format!("{}: {what}", path.display()));
    let raw = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(META_KEY))
        .ok_or_else(|| bad(format!("no \"{META_KEY}\" metadata")))?;
    let meta: serde_json::Value =
        serde_json::from_str(raw).map_err(|e| bad(format!("bad metadata: {e}")))?;
    serde_json::from_value(meta["vocab"].clone())
        .map_err(|e| bad(format!("bad \"vocab\" metadata: {e}")))
}

/// Reads the codebooks (one `[codes, d]` tensor per level, named `level_0`, `level_1`, …).
pub fn read_codebooks(dir: &Path) -> Result<Vec<Centroids>> {
    let path = dir.join(CODEBOOKS_FILE);
    let bytes = fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    let mut out = Vec::new();
    for l in 0.. {
        let Ok(t) = st.tensor(&format!("level_{l}")) else {
            break;
        };
        let shape = t.shape();
        if shape.len() != 2 || t.dtype() != safetensors::Dtype::F32 {
            return Err(Error::Invalid(format!(
                "{}: level_{l} must be a 2-D f32 tensor",
                path.display()
            )));
        }
        let data = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.push(Centroids {
            k: shape[0],
            d: shape[1],
            data,
        });
    }
    Ok(out)
}

/// Every item's vector as the codebooks reconstruct it (the sum of its codes'
/// centroids, one per level; the dedup code adds nothing): row-major `[items, d]`.
///
/// Why: the soft prompts' taste vector is the mean of a history's item vectors, and a
/// model directory carries the codebooks but not the embeddings (90% of the catalog's
/// size for MiniLM); the reconstruction is what the SIDs say about the items.
pub fn item_vectors(codebooks: &[Centroids], sids: &[SidRecord]) -> Result<(Vec<f32>, usize)> {
    let d = codebooks.first().map_or(0, |c| c.d);
    if d == 0 || codebooks.iter().any(|c| c.d != d) {
        return Err(Error::Invalid(
            "codebooks: no levels, or levels of different widths".into(),
        ));
    }
    let mut out = vec![0f32; sids.len() * d];
    for (i, rec) in sids.iter().enumerate() {
        let row = &mut out[i * d..(i + 1) * d];
        for (level, (cb, &code)) in codebooks.iter().zip(&rec.codes).enumerate() {
            if code as usize >= cb.k {
                return Err(Error::Invalid(format!(
                    "item {}: code {code} at level {level} is past the codebook's {} codes",
                    rec.id, cb.k
                )));
            }
            let c = &cb.data[code as usize * d..(code as usize + 1) * d];
            row.iter_mut().zip(c).for_each(|(r, x)| *r += x);
        }
    }
    Ok((out, d))
}

/// Reads the normalised catalog of an artifact directory.
pub fn read_catalog(dir: &Path) -> Result<Catalog> {
    let opts = LoadOptions {
        format: Some(crate::catalog::Format::Jsonl),
        default_type: "item".to_string(),
        skip_invalid: false,
    };
    Ok(Catalog::load(&dir.join(CATALOG_FILE), &opts)?)
}

/// Reads the catalog and the SID map of an artifact (or model) directory and checks that
/// they describe the same items in the same order: everything downstream indexes one by
/// the other's positions, so a hand-edited or mismatched pair would show wrong titles or
/// index out of bounds.
pub fn read_pair(dir: &Path) -> Result<(Catalog, SidMap)> {
    let catalog = read_catalog(dir)?;
    let sids = SidMap::load(dir)?;
    let differ = |line: usize, what: String| {
        Error::Invalid(format!(
            "{}: {CATALOG_FILE} and {SIDS_FILE} disagree at line {line}: {what}; they must \
             come from the same `sidrec tokenize` run",
            dir.display()
        ))
    };
    for (i, (item, rec)) in catalog.items.iter().zip(&sids.records).enumerate() {
        if item.id != rec.id || item.item_type != rec.item_type {
            return Err(differ(
                i + 1,
                format!(
                    "item {:?} ({}) against {:?} ({})",
                    item.id, item.item_type, rec.id, rec.item_type
                ),
            ));
        }
    }
    if catalog.len() != sids.len() {
        let n = catalog.len().min(sids.len());
        return Err(differ(
            n + 1,
            format!(
                "{} items in {CATALOG_FILE}, {} in {SIDS_FILE}",
                catalog.len(),
                sids.len()
            ),
        ));
    }
    Ok((catalog, sids))
}

/// Everything `tokenize` writes, gathered before any byte hits the disk.
pub struct Artifacts<'a> {
    pub catalog: &'a Catalog,
    pub records: &'a [SidRecord],
    pub vocab: &'a SidVocab,
    pub codebooks: &'a [Centroids],
    /// Extra metadata for the codebooks file (seed, encoder, …).
    pub codebook_meta: Vec<(String, String)>,
    pub report: &'a serde_json::Value,
    pub embeddings: Option<&'a crate::embed::Embeddings>,
    /// Catalog records left out by `--skip-invalid`.
    pub skipped: &'a [crate::skipped::Skipped],
}

/// Writes the artifact directory atomically ([`crate::atomic::write_dir`]); with
/// `overwrite`, an existing `out` is replaced when it is sidrec's own output and holds
/// none of `inputs`.
pub fn write(out: &Path, a: &Artifacts<'_>, overwrite: bool, inputs: &[&Path]) -> Result<()> {
    crate::atomic::write_dir(
        out,
        overwrite,
        inputs,
        |r| Error::Invalid(r.to_string()),
        |p: &Path, e| Error::io(p, e),
        |dir| {
            write_with(&dir.join(CATALOG_FILE), |w| a.catalog.write_jsonl(w))?;
            write_with(&dir.join(SIDS_FILE), |w| {
                for r in a.records {
                    serde_json::to_writer(&mut *w, r)?;
                    w.write_all(b"\n")?;
                }
                Ok(())
            })?;
            write_codebooks(&dir.join(CODEBOOKS_FILE), a)?;
            write_with(&dir.join(REPORT_FILE), |w| {
                serde_json::to_writer_pretty(&mut *w, a.report)?;
                w.write_all(b"\n")
            })?;
            if let Some(e) = a.embeddings {
                crate::embed::save_npy(e, &dir.join(EMBEDDINGS_FILE))?;
            }
            if !a.skipped.is_empty() {
                let p = dir.join(SKIPPED_FILE);
                crate::skipped::write_jsonl(a.skipped, &p).map_err(|e| Error::io(&p, e))?;
            }
            Ok(())
        },
    )
}

fn write_with(
    path: &Path,
    f: impl FnOnce(&mut BufWriter<fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    let file = fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = BufWriter::new(file);
    f(&mut w)
        .and_then(|_| w.flush())
        .map_err(|e| Error::io(path, e))
}

fn write_codebooks(path: &Path, a: &Artifacts<'_>) -> Result<()> {
    let bytes: Vec<Vec<u8>> = a
        .codebooks
        .iter()
        .map(|c| c.data.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = a
        .codebooks
        .iter()
        .zip(&bytes)
        .enumerate()
        .map(|(l, (c, b))| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![c.k, c.d], b)
                .map(|v| (format!("level_{l}"), v))
                .map_err(|e| Error::Invalid(format!("codebook {l}: {e}")))
        })
        .collect::<Result<_>>()?;
    // One metadata key holding an ordered JSON object: safetensors writes its metadata
    // map in hash order, so several keys would make the file's bytes vary run to run.
    let mut obj = serde_json::Map::new();
    obj.insert("levels".into(), a.codebooks.len().into());
    for (k, v) in &a.codebook_meta {
        obj.insert(k.clone(), v.clone().into());
    }
    obj.insert(
        "vocab".into(),
        serde_json::to_value(a.vocab).map_err(|e| Error::Invalid(e.to_string()))?,
    );
    let meta: HashMap<String, String> = [(
        META_KEY.to_string(),
        serde_json::Value::Object(obj).to_string(),
    )]
    .into();
    let data = safetensors::serialize(views, Some(meta))
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    fs::write(path, data).map_err(|e| Error::io(path, e))
}
