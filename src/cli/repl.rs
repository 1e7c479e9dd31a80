//! `sidrec repl`: an interactive session with a trained model.
//!
//! A line of text is a request (recommend from the session's history, or search when the
//! history is empty); lines starting with `:` change the session. The line editor keeps a
//! history file; a line ending in `\` continues on the next one. Errors are printed and
//! the session goes on, a line that is not UTF-8 included. Without a terminal (a pipe, a
//! script) lines are read plainly, so a session can be scripted. Requests are held to
//! the same [`Limits`] as `sidrec recommend` and `sidrec serve`, in the same words.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use rustyline::error::ReadlineError;
use rustyline::history::DefaultHistory;
use rustyline::Editor;

use clap::Args;

use super::request::{
    answer, build_request, check_request_args, gen_config, load_engine, resolve_item, split_list,
    RequestArgs,
};
use sidrec::decode::{Engine, Limits, Mode};

#[derive(Args)]
pub(crate) struct ReplArgs {
    #[command(flatten)]
    req: RequestArgs,
    /// Start with JSON output.
    #[arg(long)]
    json: bool,
    /// History file of the line editor (default: ~/.sidrec_history).
    #[arg(long, conflicts_with = "no_history_file")]
    history_file: Option<PathBuf>,
    /// Keep no line history on disk.
    #[arg(long)]
    no_history_file: bool,
}

/// `sidrec repl`: the line history file (unless turned off), then the session.
pub(crate) fn cmd_repl(a: ReplArgs) -> Result<()> {
    let file = if a.no_history_file {
        None
    } else {
        a.history_file
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".sidrec_history")))
    };
    run(a.req, a.json, file)
}

pub const HELP: &str = "An interactive session with a trained model.\n\n\
Type a request in words (\"a 90s comedy\") to search, or build a history and ask for \
what comes next. Commands:\n  \
:help                      this text\n  \
:history                   show the session's history\n  \
:history add ID|TITLE      append an item (titles are matched loosely)\n  \
:history rm N              remove the N-th item\n  \
:history clear             empty it\n  \
:go                        run the request with no text (e.g. recommend from the history)\n  \
:mode auto|recommend|search|describe|chat\n  \
:format auto|items|text|both\n  \
:type TYPE[,TYPE]|all      limit the entity types\n  \
:filter EXPR|off           attribute filter, e.g. year>=1990, genre=Comedy\n  \
:k N                       number of items\n  \
:exclude-seen on|off       leave the history's items out\n  \
:json on|off               JSON output\n  \
:show                      the session's settings\n  \
:quit                      leave (also Ctrl-D)\n\n\
A line ending in \\ continues on the next line.";

struct Session {
    args: RequestArgs,
    history: Vec<u32>,
    json: bool,
}

impl Session {
    fn show(&self, engine: &Engine) -> String {
        let a = &self.args;
        format!(
            "mode {} | k {} | types {} | filter {} | exclude-seen {} | json {} | history {} items",
            a.mode,
            a.k,
            if a.types.is_empty() {
                "all".to_string()
            } else {
                split_list(&a.types).join(",")
            },
            a.filter.as_deref().unwrap_or("none"),
            if a.exclude_seen { "on" } else { "off" },
            if self.json { "on" } else { "off" },
            self.history.len()
        ) + &if self.history.is_empty() {
            String::new()
        } else {
            format!("\n{}", self.list_history(engine))
        }
    }

    fn list_history(&self, engine: &Engine) -> String {
        self.history
            .iter()
            .enumerate()
            .map(|(n, &i)| {
                let it = &engine.catalog().items[i as usize];
                format!("  {}. {} ({})", n + 1, it.title, it.id)
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Handles one `:command`; returns the text to print, or `None` to quit.
    fn command(&mut self, engine: &Engine, line: &str) -> Result<Option<String>> {
        let (cmd, rest) = match line.split_once(char::is_whitespace) {
            Some((c, r)) => (c, r.trim()),
            None => (line, ""),
        };
        let on_off = |v: &str| -> Result<bool> {
            match v {
                "on" | "true" | "yes" | "1" => Ok(true),
                "off" | "false" | "no" | "0" => Ok(false),
                _ => bail!("expected on or off, not {v:?}"),
            }
        };
        let msg = match cmd {
            ":help" | ":h" | ":?" => HELP.to_string(),
            ":quit" | ":q" | ":exit" => return Ok(None),
            ":show" => self.show(engine),
            ":history" => {
                let (sub, arg) = match rest.split_once(char::is_whitespace) {
                    Some((s, a)) => (s, a.trim()),
                    None => (rest, ""),
                };
                match sub {
                    "" | "show" | "list" => {
                        if self.history.is_empty() {
                            "history is empty".to_string()
                        } else {
                            self.list_history(engine)
                        }
                    }
                    "add" => {
                        if arg.is_empty() {
                            bail!(":history add needs an item id or title");
                        }
                        let i = resolve_item(engine, arg)?;
                        Limits::default().check_history(self.history.len() + 1)?;
                        self.history.push(i);
                        let it = &engine.catalog().items[i as usize];
                        format!(
                            "added {} ({}); {} items",
                            it.title,
                            it.id,
                            self.history.len()
                        )
                    }
                    "rm" | "remove" => {
                        let n: usize = arg.parse().context(":history rm needs a number")?;
                        if n == 0 || n > self.history.len() {
                            bail!("no history item {n} (1..={})", self.history.len());
                        }
                        let i = self.history.remove(n - 1);
                        format!("removed {}", engine.catalog().items[i as usize].title)
                    }
                    "clear" => {
                        self.history.clear();
                        "history cleared".to_string()
                    }
                    other => bail!("unknown :history command {other:?} (add, rm, clear)"),
                }
            }
            ":mode" => {
                self.args.mode = rest.parse::<Mode>().map_err(anyhow::Error::msg)?;
                format!("mode {}", self.args.mode)
            }
            ":format" => {
                self.args.format = rest
                    .parse::<sidrec::decode::Format>()
                    .map_err(anyhow::Error::msg)?;
                format!("format {rest}")
            }
            ":type" => {
                if rest.is_empty() || rest == "all" {
                    self.args.types.clear();
                    "all types".to_string()
                } else {
                    let types = split_list(&[rest.to_string()]);
                    let known = engine.catalog().types();
                    if let Some(t) = types.iter().find(|t| !known.contains(t)) {
                        bail!("unknown type {t:?} (the catalog has: {})", known.join(", "));
                    }
                    self.args.types = types;
                    format!("types {}", self.args.types.join(","))
                }
            }
            ":filter" => {
                if rest.is_empty() || rest == "off" || rest == "none" {
                    self.args.filter = None;
                    "no filter".to_string()
                } else {
                    sidrec::decode::Filter::parse(rest, engine.catalog())?;
                    self.args.filter = Some(rest.to_string());
                    format!("filter {rest}")
                }
            }
            ":k" => {
                let k: usize = rest.parse().context(":k needs a number")?;
                self.args.k = Limits::default().check_k(k)?;
                format!("k {k}")
            }
            ":exclude-seen" => {
                self.args.exclude_seen = on_off(rest)?;
                format!("exclude-seen {rest}")
            }
            ":json" => {
                self.json = if rest.is_empty() {
                    !self.json
                } else {
                    on_off(rest)?
                };
                format!("json {}", if self.json { "on" } else { "off" })
            }
            ":go" => return self.ask(engine, "").map(Some),
            other => bail!("unknown command {other:?}; :help lists them"),
        };
        Ok(Some(msg))
    }

    fn ask(&self, engine: &Engine, text: &str) -> Result<String> {
        let mut args = self.args.clone();
        args.history.clear();
        let mut req = build_request(engine, &args, text)?;
        req.history = self.history.clone();
        let req = Limits::default().check_request(req)?;
        let out = answer(engine, &req, &gen_config(&self.args), self.json)?;
        Ok(out.trim_end().to_string())
    }
}

/// Runs the session; `history_file` keeps the line history (none when `None`).
pub fn run(args: RequestArgs, json: bool, history_file: Option<PathBuf>) -> Result<()> {
    check_request_args(&args, "")?;
    let engine = load_engine(&args.model, args.weights)?;
    let history = split_list(&args.history)
        .iter()
        .map(|e| resolve_item(&engine, e))
        .collect::<Result<Vec<u32>>>()?;
    let mut session = Session {
        args,
        history,
        json,
    };
    let mut rl: Editor<(), DefaultHistory> = Editor::new()?;
    let history_path = history_file;
    if let Some(p) = &history_path {
        let _ = rl.load_history(p);
    }
    println!(
        "sidrec repl: {} ({} items). :help for commands, Ctrl-D to leave.",
        engine.dir().display(),
        engine.catalog().items.len()
    );
    let mut pending = String::new();
    loop {
        let prompt = if pending.is_empty() {
            "sidrec> "
        } else {
            "...> "
        };
        let line = match rl.readline(prompt) {
            Ok(l) => l,
            Err(ReadlineError::Interrupted) => {
                pending.clear();
                continue;
            }
            Err(ReadlineError::Eof) => break,
            // Bytes that are not UTF-8 (a pasted binary, a terminal in another
            // encoding) spoil one line, not the session: the reader has consumed the
            // line, so the next one reads cleanly.
            Err(ReadlineError::Io(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                pending.clear();
                println!("error: the line is not valid UTF-8; it was skipped");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(head) = line.strip_suffix('\\') {
            pending.push_str(head);
            pending.push('\n');
            continue;
        }
        pending.push_str(&line);
        let input = std::mem::take(&mut pending);
        let input = input.trim();
        if input.is_empty() {
            continue;
        }
        let _ = rl.add_history_entry(input);
        let result = if input.starts_with(':') {
            session.command(&engine, input)
        } else {
            session.ask(&engine, input).map(Some)
        };
        match result {
            Ok(Some(text)) => println!("{text}"),
            Ok(None) => break,
            Err(e) => println!("error: {e:#}"),
        }
    }
    if let Some(p) = &history_path {
        let _ = rl.save_history(p);
    }
    Ok(())
}
