//! The `sidrec` command line. Thin: parses flags, calls the library, prints results.

mod cli;

fn main() {
    if let Err(e) = cli::run() {
        eprintln!("error: {}", error_chain(&e));
        std::process::exit(1);
    }
}

/// The error and its causes joined by ": ", leaving out a cause whose text the message
/// before it already ends with: library errors name the file and include their I/O
/// cause (`out/sids.jsonl: No such file or directory`), so anyhow's plain chain would say
/// the OS message twice.
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) || out.contains(&format!("{text}: ")) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}
