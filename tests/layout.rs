//! The pipeline's layering, read from the sources: data flows one way, so a lower module
//! never names a higher one. Training must not depend on decoding or evaluation (model
//! selection gets its validator passed in), nothing depends on the command line, and
//! decoding does not depend on evaluation or the server.

use std::fs;
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(rust_files(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}

/// Lines of code (comments and doc comments left out) of `file` naming `crate::M` or
/// `super::M` for a module `M` in `forbidden`.
fn offending(file: &Path, forbidden: &[&str]) -> Vec<String> {
    let text = fs::read_to_string(file).unwrap();
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim_start().starts_with("//"))
        .filter(|(_, l)| {
            let code = l.split("//").next().unwrap_or("");
            forbidden.iter().any(|m| {
                code.contains(&format!("crate::{m}::"))
                    || code.contains(&format!("crate::{m};"))
                    || code.contains(&format!("crate::{m}}}"))
                    || code.contains(&format!("sidrec::{m}::"))
                    || code.contains(&format!("use crate::{{{m}"))
            })
        })
        .map(|(i, l)| format!("{}:{}: {}", file.display(), i + 1, l.trim()))
        .collect()
}

fn src() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn train_does_not_import_decode_eval_serve_or_cli() {
    let bad: Vec<String> = rust_files(&src().join("train"))
        .iter()
        .flat_map(|f| offending(f, &["decode", "eval", "serve", "cli"]))
        .collect();
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn decode_does_not_import_eval_serve_or_cli() {
    let bad: Vec<String> = rust_files(&src().join("decode"))
        .iter()
        .flat_map(|f| offending(f, &["eval", "serve", "cli"]))
        .collect();
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn no_module_imports_the_command_line() {
    let bad: Vec<String> = rust_files(&src())
        .iter()
        .filter(|f| !f.starts_with(src().join("cli")) && !f.ends_with("cli.rs"))
        .flat_map(|f| offending(f, &["cli"]))
        .collect();
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}
