//! `sidrec inspect`: an artifact directory's diagnostics and an item's neighbours.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use sidrec::artifacts;
use sidrec::tokenize::Report;

use super::tokenize::print_summary;

#[derive(Args)]
pub(crate) struct InspectArgs {
    /// Artifact directory written by `sidrec tokenize`.
    dir: PathBuf,
    /// Show this item's SID and the items sharing its prefix.
    #[arg(long)]
    item: Option<String>,
    /// Look up the item a SID names, e.g. "<movie><a_17><b_203><c_5>".
    #[arg(long)]
    sid: Option<String>,
    /// Neighbours to list.
    #[arg(long, default_value_t = 10)]
    limit: usize,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

pub(crate) fn cmd_inspect(a: InspectArgs) -> Result<()> {
    let report_path = a.dir.join(artifacts::REPORT_FILE);
    let report: Report = serde_json::from_str(
        &std::fs::read_to_string(&report_path)
            .with_context(|| format!("reading {}", report_path.display()))?,
    )
    .with_context(|| format!("parsing {}", report_path.display()))?;
    if a.item.is_none() && a.sid.is_none() {
        if a.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print_summary(&report, &a.dir);
        }
        return Ok(());
    }
    let (catalog, map) = artifacts::read_pair(&a.dir)?;
    let index = match (&a.item, &a.sid) {
        (Some(id), _) => map
            .index_of(id)
            .with_context(|| format!("no item with id {id:?} in {}", a.dir.display()))?,
        (None, Some(sid)) => {
            let rec = map
                .lookup_sid(sid)
                .with_context(|| format!("no item has SID {sid}"))?;
            map.index_of(&rec.id).context("SID map is inconsistent")?
        }
        (None, None) => unreachable!(),
    };
    let rec = &map.records[index];
    let item = &catalog.items[index];
    // Neighbours: the items sharing the longest prefix first (all but the SID's last
    // token, i.e. dedup siblings when it has one), down to the type token alone.
    let depth = map.trie.path(index as u32).map_or(1, |p| p.len() - 1);
    let mut shown = Vec::new();
    for d in (1..=depth).rev() {
        for j in map.sharing_prefix(index, d) {
            if shown.len() >= a.limit {
                break;
            }
            if !shown.iter().any(|&(k, _)| k == j) {
                shown.push((j, d));
            }
        }
    }
    if a.json {
        let neighbours: Vec<serde_json::Value> = shown
            .iter()
            .map(|&(j, d)| {
                serde_json::json!({
                    "id": map.records[j].id, "title": catalog.items[j].title,
                    "sid": map.records[j].sid, "shared_prefix": d,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "item": item, "sid": rec.sid, "codes": rec.codes, "neighbours": neighbours,
            }))?
        );
        return Ok(());
    }
    println!("{}  {}  [{}]", rec.sid, item.title, rec.id);
    println!("items sharing its prefix (longest first):");
    for (j, d) in shown {
        println!(
            "  {:<40} {} tokens shared  {}",
            map.records[j].sid, d, catalog.items[j].title
        );
    }
    Ok(())
}
