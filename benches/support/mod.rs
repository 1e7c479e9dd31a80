//! What the model benchmarks share: paths, settings from the environment, running a
//! Python peer, and the SmolLM2 directory both sides load.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

pub fn manifest(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

pub fn env_usize(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `script` from the peers directory (`SIDREC_PEERS`, default `../shared/peers`) with
/// `SIDREC_PYTHON` (default `python3`) and returns the JSON line it prints last, or `Null`
/// with a note on stderr when it cannot run (the sidrec side still reports).
pub fn run_peer(script: &str, args: &[String]) -> Value {
    let python = std::env::var("SIDREC_PYTHON").unwrap_or_else(|_| "python3".into());
    let peers = std::env::var_os("SIDREC_PEERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest("../shared/peers"));
    match Command::new(&python)
        .arg(peers.join(script))
        .args(args)
        .output()
    {
        Ok(o) if o.status.success() => {
            let s = String::from_utf8_lossy(&o.stdout);
            serde_json::from_str(s.lines().last().unwrap_or_default()).unwrap_or(Value::Null)
        }
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            eprintln!(
                "{script} failed (set SIDREC_PYTHON to a Python with torch and transformers): {}",
                err.lines().last().unwrap_or_default()
            );
            Value::Null
        }
        Err(e) => {
            eprintln!("{script} could not start ({python}): {e}");
            Value::Null
        }
    }
}

/// SmolLM2-135M as an f32 Hugging Face directory under `target/bench-data/`, converted
/// once from the fetched GGUF; `None` (with a note) when the GGUF is missing.
pub fn smollm2_dir() -> Option<PathBuf> {
    let gguf = manifest("assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !gguf.is_file() {
        eprintln!("{} missing: run scripts/fetch-assets.sh", gguf.display());
        return None;
    }
    let dir = manifest("target/bench-data/smollm2-135m-f32");
    if !dir.join(sidrec::model::hfdir::WEIGHTS_FILE).is_file() {
        std::fs::create_dir_all(dir.parent().expect("parent")).expect("mkdir");
        sidrec::model::hfdir::convert(&gguf, &dir, true).expect("convert");
    }
    Some(dir)
}
