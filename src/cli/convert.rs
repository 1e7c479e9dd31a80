//! `sidrec convert`: a GGUF checkpoint into a Hugging Face directory.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub(crate) struct ConvertArgs {
    /// The GGUF file.
    gguf: PathBuf,
    /// Output Hugging Face directory.
    #[arg(short, long)]
    out: PathBuf,
    #[arg(long)]
    force: bool,
}

pub(crate) fn cmd_convert(a: ConvertArgs) -> Result<()> {
    let cfg = sidrec::model::hfdir::convert(&a.gguf, &a.out, a.force)?;
    println!(
        "wrote {} ({} layers, hidden {}, vocab {})",
        a.out.display(),
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.vocab_size
    );
    Ok(())
}
