//! Builds one catalog that mixes entity types out of single-type catalogs, with the
//! interactions that go with it, for measuring type steering on real data
//! (`scripts/eval.sh mixed`: MovieLens-100k movies + Amazon Scientific products).
//!
//! Each source is a type, an item file and an interactions file, read with sidrec's own
//! loaders (so every format `sidrec tokenize` and `sidrec train` read works here, with
//! the same normalisation). Item and user ids get the type as a prefix (`movie-242`,
//! `product-0`), because sources number both from 0 or 1 and would collide. Each user's
//! history stays within its source's type, as the users of the two datasets are
//! different people.
//!
//! Writes `OUT/items.jsonl` (the merged catalog) and `OUT/interactions.jsonl`
//! (`{"user", "items"}` per line, chronological).
//!
//!   cargo run --release --example mix_catalogs -- OUT \
//!       movie assets/ml-100k/ml-100k.item assets/ml-100k/ml-100k.inter \
//!       product ../shared/data/amazon-scientific/items.json \
//!       ../shared/data/amazon-scientific/interactions.json

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use sidrec::catalog::{normalize_type, Catalog, LoadOptions};
use sidrec::interactions::{ReadOptions, Sequences};

const USAGE: &str = "usage: mix_catalogs OUT TYPE ITEMS INTERACTIONS [TYPE ITEMS INTERACTIONS ...]";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 7 || !(args.len() - 1).is_multiple_of(3) {
        bail!("{USAGE}\n(at least two sources: a mixed catalog needs two types)");
    }
    let out = PathBuf::from(&args[0]);
    let mut items = Vec::new();
    let mut users = String::new();
    let mut types = Vec::new();
    for source in args[1..].chunks(3) {
        let ty = normalize_type(&source[0]).map_err(anyhow::Error::msg)?;
        if types.contains(&ty) {
            bail!("type {ty} is given twice: each source needs its own type");
        }
        types.push(ty.clone());
        let (items_path, inter_path) = (Path::new(&source[1]), Path::new(&source[2]));
        let catalog = Catalog::load(
            items_path,
            &LoadOptions {
                default_type: ty.clone(),
                ..LoadOptions::default()
            },
        )?;
        let (seqs, stats) = Sequences::load(inter_path, &catalog, &ReadOptions::default())?;
        let ids: Vec<String> = catalog
            .items
            .iter()
            .map(|it| format!("{ty}-{}", it.id))
            .collect();
        for (item, id) in catalog.items.iter().zip(&ids) {
            items.push(sidrec::catalog::Item {
                id: id.clone(),
                item_type: ty.clone(),
                ..item.clone()
            });
        }
        for (user, seq) in seqs.users.iter().zip(&seqs.seqs) {
            let history: Vec<&str> = seq.iter().map(|&i| ids[i as usize].as_str()).collect();
            let line = serde_json::json!({ "user": format!("{ty}-{user}"), "items": history });
            users.push_str(&line.to_string());
            users.push('\n');
        }
        eprintln!(
            "{ty}: {} items from {}, {} users ({} dropped) from {}",
            catalog.len(),
            items_path.display(),
            seqs.len(),
            stats.users_dropped,
            inter_path.display()
        );
    }
    let catalog = Catalog::from_items(items)?;
    // All or nothing: an interrupted run leaves the previous output, never half a file.
    sidrec::atomic::write_dir(
        &out,
        true,
        &[],
        anyhow::Error::new,
        |p, e| anyhow::Error::new(e).context(format!("writing {}", p.display())),
        |dir| {
            let mut buf = Vec::new();
            catalog.write_jsonl(&mut buf)?;
            std::fs::write(dir.join("items.jsonl"), buf)?;
            std::fs::write(dir.join("interactions.jsonl"), users.as_bytes())?;
            Ok(())
        },
    )?;
    eprintln!("wrote {} items to {}", catalog.len(), out.display());
    Ok(())
}
