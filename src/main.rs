//! The `sidrec` command line. Thin: parses flags, calls the library, prints results.

mod cli;
mod repl;

fn main() {
    sidrec::runtime::tune_allocator();
    if let Err(e) = cli::run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
