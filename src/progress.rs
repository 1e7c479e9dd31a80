//! Progress reporting for long work (embedding, quantization), on stderr.
//!
//! Bars draw only when stderr is a terminal (indicatif hides them otherwise), so logs and
//! pipes stay clean; `quiet` hides them everywhere.

use indicatif::{ProgressBar, ProgressStyle};

/// A warning on stderr, shown even when quiet: something the user should know about
/// (a leftover cleaned up, an input that looks wrong) that does not stop the run.
pub fn warn(message: &str) {
    eprintln!("warning: {message}");
}

/// Hands out progress bars, or hidden ones when quiet.
#[derive(Clone, Copy, Debug, Default)]
pub struct Progress {
    pub quiet: bool,
}

impl Progress {
    pub fn new(quiet: bool) -> Self {
        Progress { quiet }
    }

    /// A bar over `len` units with an ETA.
    pub fn bar(&self, len: u64, msg: &str) -> ProgressBar {
        if self.quiet {
            return ProgressBar::hidden();
        }
        let pb = ProgressBar::new(len);
        pb.set_style(
            ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} ({per_sec}, eta {eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        pb.set_message(msg.to_string());
        pb
    }

    /// A line of news beside a bar (e.g. a validation loss): above the bar on a terminal,
    /// a plain stderr line in logs and pipes (where indicatif hides bars and their
    /// lines), nothing when quiet.
    pub fn println(&self, bar: &ProgressBar, line: &str) {
        if self.quiet {
            return;
        }
        if bar.is_hidden() {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
    }

    /// A spinner for work without a known length.
    pub fn spinner(&self, msg: &str) -> ProgressBar {
        if self.quiet {
            return ProgressBar::hidden();
        }
        let pb = ProgressBar::new_spinner();
        pb.set_style(
            ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        pb.set_message(msg.to_string());
        pb.enable_steady_tick(std::time::Duration::from_millis(120));
        pb
    }
}
