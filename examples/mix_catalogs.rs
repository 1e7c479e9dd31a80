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
//! `--cross N` builds users whose histories cross types, which no single-type dataset
//! has and without which a type asked for in words never carries information the
//! history lacks: the first N users of the first source are each merged with the
//! first N of the second, one with one, into a user `cross-A+B` whose history
//! interleaves both by relative position (item i of a history of n sits at i/n; ties
//! keep the first source's item first). The merged users replace the pairs they came
//! from. They are synthetic (two real people's histories as one), so the eval reports
//! them apart from nothing: they are simply users of the mixed dataset.
//!
//! Writes `OUT/items.jsonl` (the merged catalog) and `OUT/interactions.jsonl`
//! (`{"user", "items"}` per line, chronological).
//!
//!   cargo run --release --example mix_catalogs -- [--cross N] OUT \
//!       movie assets/ml-100k/ml-100k.item assets/ml-100k/ml-100k.inter \
//!       product ../shared/data/amazon-scientific/items.json \
//!       ../shared/data/amazon-scientific/interactions.json

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use sidrec::catalog::{normalize_type, Catalog, LoadOptions};
use sidrec::interactions::{ReadOptions, Sequences};

const USAGE: &str =
    "usage: mix_catalogs [--cross N] OUT TYPE ITEMS INTERACTIONS [TYPE ITEMS INTERACTIONS ...]";

/// Two histories as one, by relative position (see the module documentation).
fn interleave<T: Clone>(a: &[T], b: &[T]) -> Vec<T> {
    let mut keyed: Vec<(f64, usize, T)> = a
        .iter()
        .enumerate()
        .map(|(i, x)| (i as f64 / a.len() as f64, 0, x.clone()))
        .chain(
            b.iter()
                .enumerate()
                .map(|(i, x)| (i as f64 / b.len() as f64, 1, x.clone())),
        )
        .collect();
    keyed.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
    keyed.into_iter().map(|(_, _, x)| x).collect()
}

fn main() -> Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut cross = 0usize;
    if args.first().map(String::as_str) == Some("--cross") {
        if args.len() < 2 {
            bail!("{USAGE}\n--cross needs a number of users");
        }
        cross = args[1]
            .parse()
            .map_err(|_| anyhow::anyhow!("--cross {:?}: not a number of users", args[1]))?;
        args.drain(..2);
    }
    if args.len() < 7 || !(args.len() - 1).is_multiple_of(3) {
        bail!("{USAGE}\n(at least two sources: a mixed catalog needs two types)");
    }
    let out = PathBuf::from(&args[0]);
    let mut items = Vec::new();
    // (user id, history) per source, in the source's order.
    let mut sources: Vec<Vec<(String, Vec<String>)>> = Vec::new();
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
        sources.push(
            seqs.users
                .iter()
                .zip(&seqs.seqs)
                .map(|(user, seq)| {
                    let history = seq.iter().map(|&i| ids[i as usize].clone()).collect();
                    (format!("{ty}-{user}"), history)
                })
                .collect(),
        );
        eprintln!(
            "{ty}: {} items from {}, {} users ({} dropped) from {}",
            catalog.len(),
            items_path.display(),
            seqs.len(),
            stats.users_dropped,
            inter_path.display()
        );
    }
    let cross = cross.min(sources[0].len()).min(sources[1].len());
    let mut users = String::new();
    let mut line = |user: &str, history: &[String]| {
        let v = serde_json::json!({ "user": user, "items": history });
        users.push_str(&v.to_string());
        users.push('\n');
    };
    for ((a, ha), (b, hb)) in sources[0].iter().zip(&sources[1]).take(cross) {
        line(&format!("cross-{a}+{b}"), &interleave(ha, hb));
    }
    for (s, source) in sources.iter().enumerate() {
        let skip = if s < 2 { cross } else { 0 };
        for (user, history) in &source[skip..] {
            line(user, history);
        }
    }
    if cross > 0 {
        eprintln!("{cross} users cross types (each two users' histories interleaved)");
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
