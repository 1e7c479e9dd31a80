//! Directory outputs written all-or-nothing (artifact directories, model directories,
//! evaluation reports, training checkpoints), and replaced only when that loses nothing.
//!
//! The files go into a temporary directory beside the destination, are fsynced, and the
//! directory is swapped into place only when all of them are complete. On Linux the swap
//! is one `renameat2(RENAME_EXCHANGE)`: at every instant the destination holds either the
//! complete old output or the complete new one. Elsewhere (or on a file system without
//! the exchange) the old copy is renamed aside to `.sidrec-old-NAME` first; a run killed
//! between the two renames leaves it there, and the next write to the same destination
//! puts it back (or, when the new copy did land, removes it), saying so on stderr.
//!
//! `--force` is not "delete whatever is there". A destination is replaced only when it is
//! empty or is a directory sidrec wrote: one that carries the [`MARKER`] file (which lists
//! the entries written) and holds nothing else, or an output of an older sidrec that holds
//! only the file names sidrec writes. A directory that holds an input of the run (the
//! catalog being tokenized, the artifacts being trained on) is never replaced, and a
//! symbolic link is followed to the directory it names, which is replaced in place (the
//! link keeps pointing at fresh output).
//!
//! Temporary directories are named `.sidrec-tmp-PID-XXXX`: one whose process is gone is
//! the leftover of a killed run, and is removed (with a line on stderr) by the next write
//! into the same parent directory.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The file every output directory carries: a JSON object naming the entries sidrec
/// wrote there, so that `--force` can tell its own output from a user's directory.
pub const MARKER: &str = ".sidrec-output";

/// Prefix of the temporary directories outputs are built in.
const TMP_PREFIX: &str = ".sidrec-tmp-";
/// Prefix of an old copy moved aside during a swap without the exchange.
const OLD_PREFIX: &str = ".sidrec-old-";

/// Entries an output directory of an older sidrec (written before the [`MARKER`]) may
/// hold: artifact directories, model directories, evaluation reports and checkpoints.
/// Such a directory is replaced only when every entry is one of these.
const LEGACY_ENTRIES: &[&str] = &[
    // artifacts
    "catalog.jsonl",
    "sids.jsonl",
    "codebooks.safetensors",
    "report.json",
    "embeddings.npy",
    "skipped.jsonl",
    // model directories
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "sidrec.json",
    "SHA256SUMS",
    "train_report.json",
    "transitions.json",
    "item_vectors.safetensors",
    "memory.json",
    "members",
    "checkpoint",
    "loss.svg",
    "eval",
    // evaluation reports
    "eval.json",
    "eval.md",
    "metrics.svg",
    "rankings.jsonl",
    // checkpoints
    "params.safetensors",
    "optimizer.safetensors",
    "best.safetensors",
    "trainer.json",
];

/// Files that identify an older sidrec output (one of them must be present).
const LEGACY_KEYS: &[&str] = &["sidrec.json", "sids.jsonl", "eval.json", "trainer.json"];

/// Why an existing destination was not replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// It exists and replacing was not asked for.
    Exists(PathBuf),
    /// It is not a directory (a file, a device, a dangling link).
    NotADirectory(PathBuf),
    /// It holds files sidrec did not write there (a few of them named).
    NotOurs { path: PathBuf, foreign: Vec<String> },
    /// It holds (or is) an input of this run.
    HoldsInput { path: PathBuf, input: PathBuf },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Exists(p) => {
                write!(
                    f,
                    "{} already exists: pass --force to replace it",
                    p.display()
                )
            }
            Refusal::NotADirectory(p) => write!(
                f,
                "{} exists and is not a directory: --force replaces only output directories \
                 sidrec wrote; choose another output path",
                p.display()
            ),
            Refusal::NotOurs { path, foreign } => write!(
                f,
                "{} was not written by sidrec (it holds {}): --force replaces only empty \
                 directories and sidrec's own outputs; choose another output path or move \
                 those files away",
                path.display(),
                name_list(foreign)
            ),
            Refusal::HoldsInput { path, input } => write!(
                f,
                "{} holds {}, an input of this run: writing the output there would delete \
                 it; choose another output path",
                path.display(),
                input.display()
            ),
        }
    }
}

impl std::error::Error for Refusal {}

fn name_list(names: &[String]) -> String {
    const SHOWN: usize = 3;
    let mut s = names
        .iter()
        .take(SHOWN)
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}

/// The directory an output path names: a symbolic link is followed to its target (which
/// is then what gets replaced), anything else is taken as it is.
pub fn resolve(out: &Path) -> PathBuf {
    match fs::symlink_metadata(out) {
        Ok(m) if m.file_type().is_symlink() => fs::canonicalize(out).unwrap_or_else(|_| out.into()),
        _ => out.to_path_buf(),
    }
}

/// Whether writing to `out` may go ahead: `Ok` when `out` does not exist, or exists and
/// may be replaced (`overwrite`, a sidrec output or empty directory, holding none of
/// `inputs`). Commands call this before their expensive work so a wrong `-o` fails at
/// once; [`write_dir`] checks again before it swaps. Leftovers of a killed run are
/// [`recover`]ed first.
pub fn check_target(out: &Path, overwrite: bool, inputs: &[&Path]) -> Result<(), Refusal> {
    let out = resolve(out);
    recover(&out);
    let meta = match fs::symlink_metadata(&out) {
        Ok(m) => m,
        Err(_) => {
            if fs::symlink_metadata(old_path(&out)).is_ok() {
                // An interrupted swap: the old copy is aside and will be restored first.
                return check_target_inner(&old_path(&out), &out, overwrite, inputs);
            }
            return Ok(());
        }
    };
    if meta.file_type().is_symlink() {
        // A link `resolve` could not follow: it dangles.
        return Err(Refusal::NotADirectory(out));
    }
    check_target_inner(&out, &out, overwrite, inputs)
}

fn check_target_inner(
    dir: &Path,
    named: &Path,
    overwrite: bool,
    inputs: &[&Path],
) -> Result<(), Refusal> {
    if !overwrite {
        return Err(Refusal::Exists(named.to_path_buf()));
    }
    if !dir.is_dir() {
        return Err(Refusal::NotADirectory(named.to_path_buf()));
    }
    if let Ok(root) = fs::canonicalize(dir) {
        for input in inputs {
            let Ok(abs) = fs::canonicalize(input) else {
                continue;
            };
            if abs.starts_with(&root) {
                return Err(Refusal::HoldsInput {
                    path: named.to_path_buf(),
                    input: input.to_path_buf(),
                });
            }
        }
    }
    let foreign = foreign_entries(dir);
    if !foreign.is_empty() {
        return Err(Refusal::NotOurs {
            path: named.to_path_buf(),
            foreign,
        });
    }
    Ok(())
}

/// The entries of `dir` sidrec did not write: everything but the marker's list, or,
/// without a marker, everything outside [`LEGACY_ENTRIES`] (all of it when no
/// [`LEGACY_KEYS`] file is there). Empty for an empty directory.
fn foreign_entries(dir: &Path) -> Vec<String> {
    let Ok(rd) = fs::read_dir(dir) else {
        return vec!["(unreadable)".into()];
    };
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    if names.is_empty() {
        return names;
    }
    let listed: Option<Vec<String>> = fs::read(dir.join(MARKER))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| {
            v.get("entries")?
                .as_array()?
                .iter()
                .map(|e| e.as_str().map(String::from))
                .collect()
        });
    match listed {
        Some(listed) => names
            .into_iter()
            .filter(|n| n != MARKER && !listed.contains(n))
            .collect(),
        None => {
            if !names.iter().any(|n| LEGACY_KEYS.contains(&n.as_str())) {
                return names;
            }
            names
                .into_iter()
                .filter(|n| !LEGACY_ENTRIES.contains(&n.as_str()))
                .collect()
        }
    }
}

/// Runs `fill` on a fresh temporary directory beside `out`, then swaps it into place.
///
/// `refuse` builds the error for a destination that may not be replaced (see
/// [`check_target`]: `overwrite` not given, not sidrec's output, holds one of `inputs`);
/// `io_err` wraps I/O errors with the path they happened on. On any error the temporary
/// directory is removed and `out` is left as it was.
pub fn write_dir<E>(
    out: &Path,
    overwrite: bool,
    inputs: &[&Path],
    refuse: impl FnOnce(Refusal) -> E,
    io_err: impl Fn(&Path, io::Error) -> E,
    fill: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), E> {
    let out = resolve(out);
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(|e| io_err(&parent, e))?;
    check_target(&out, overwrite, inputs).map_err(refuse)?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!("{TMP_PREFIX}{}-", std::process::id()))
        .tempdir_in(&parent)
        .map_err(|e| io_err(&parent, e))?;
    fill(tmp.path())?;
    write_marker(tmp.path()).map_err(|e| io_err(&tmp.path().join(MARKER), e))?;
    sync_tree(tmp.path()).map_err(|e| io_err(tmp.path(), e))?;

    // From here on the temporary directory is ours to clean up by hand.
    let tmp_path = tmp.keep();
    let result = swap_into_place(&tmp_path, &out, &parent);
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp_path);
    }
    result.map_err(|(p, e)| io_err(&p, e))
}

/// Moves the finished `tmp` to `out`, replacing what is there without a moment where
/// neither copy is in place (exchange) or with the old copy aside under a name the next
/// run recovers (two renames). The parent directory is fsynced so the swap survives a
/// crash.
fn swap_into_place(tmp: &Path, out: &Path, parent: &Path) -> Result<(), (PathBuf, io::Error)> {
    if fs::symlink_metadata(out).is_ok() {
        if exchange(tmp, out).is_ok() {
            // `tmp` now holds the old copy.
            let _ = sync_dir(parent);
            let _ = fs::remove_dir_all(tmp);
            return Ok(());
        }
        let aside = old_path(out);
        let _ = fs::remove_dir_all(&aside);
        fs::rename(out, &aside).map_err(|e| (out.to_path_buf(), e))?;
        if let Err(e) = fs::rename(tmp, out) {
            let _ = fs::rename(&aside, out);
            return Err((out.to_path_buf(), e));
        }
        let _ = sync_dir(parent);
        let _ = fs::remove_dir_all(&aside);
        return Ok(());
    }
    fs::rename(tmp, out).map_err(|e| (out.to_path_buf(), e))?;
    sync_dir(parent).map_err(|e| (parent.to_path_buf(), e))
}

/// Atomically exchanges two paths (Linux `renameat2(RENAME_EXCHANGE)`).
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let ca = CString::new(a.as_os_str().as_bytes())?;
    let cb = CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both are valid NUL-terminated paths that outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> io::Result<()> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "no exchange"))
}

/// Where the old copy of `out` waits during a swap without the exchange.
fn old_path(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    out.with_file_name(format!("{OLD_PREFIX}{name}"))
}

/// Cleans up after a killed run before writing to `out`: an old copy left aside by an
/// interrupted swap goes back in place (or is removed when the new copy landed), and
/// temporary directories of processes that are gone are removed. Each action is reported
/// on stderr; nothing here fails the write.
pub fn recover(out: &Path) {
    let aside = old_path(out);
    if fs::symlink_metadata(&aside).is_ok() {
        if fs::symlink_metadata(out).is_err() {
            match fs::rename(&aside, out) {
                Ok(()) => crate::progress::warn(&format!(
                    "{} was missing after an interrupted replace: restored the previous copy from {}",
                    out.display(),
                    aside.display()
                )),
                Err(e) => crate::progress::warn(&format!(
                    "{} holds the previous copy of {} from an interrupted replace, and moving it back failed: {e}",
                    aside.display(),
                    out.display()
                )),
            }
        } else if fs::remove_dir_all(&aside).is_ok() {
            crate::progress::warn(&format!(
                "removed {}, the old copy of {} left by an interrupted replace",
                aside.display(),
                out.display()
            ));
        }
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    for stale in stale_temporaries(parent) {
        if fs::remove_dir_all(&stale).is_ok() {
            crate::progress::warn(&format!(
                "removed {}, the unfinished output of a run that was killed",
                stale.display()
            ));
        }
    }
}

/// Temporary output directories in `parent` whose process is gone. A name without a
/// process id (older sidrec) is reported, not removed: it cannot be told from a live run.
fn stale_temporaries(parent: &Path) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut stale = Vec::new();
    for entry in rd.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(TMP_PREFIX) else {
            continue;
        };
        match rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) {
            Some(pid) if !process_alive(pid) => stale.push(entry.path()),
            Some(_) => {}
            None => crate::progress::warn(&format!(
                "{} looks like the unfinished output of an interrupted run; remove it if no \
                 sidrec is running",
                entry.path().display()
            )),
        }
    }
    stale
}

#[cfg(unix)]
fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

#[cfg(not(unix))]
fn process_alive(_pid: u32) -> bool {
    true
}

/// Writes [`MARKER`] listing the entries `fill` produced.
fn write_marker(dir: &Path) -> io::Result<()> {
    let mut entries: Vec<String> = fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != MARKER)
        .collect();
    entries.sort();
    let v = serde_json::json!({
        "written_by": concat!("sidrec ", env!("CARGO_PKG_VERSION")),
        "entries": entries,
    });
    let path = dir.join(MARKER);
    fs::write(&path, format!("{v}\n"))?;
    default_file_mode(&path)
}

/// fsyncs every file and directory under `dir` (depth-first, `dir` last), so the swap
/// never publishes files whose data is still only in the page cache.
fn sync_tree(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let ft = entry.file_type()?;
        if ft.is_dir() {
            sync_tree(&entry.path())?;
        } else if ft.is_file() {
            fs::File::open(entry.path())?.sync_all()?;
        }
    }
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        fs::File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Gives a file the mode a plain `File::create` would have (`0o666` less the umask).
///
/// Temporary files are created private (`0o600`) and keep that mode when renamed into
/// place; outputs meant to be shared (a model directory) should not. The umask is read
/// from `/proc/self/status`, since reading it with `umask(2)` means changing it for every
/// thread; where that file is missing, `0o022` is assumed.
pub fn default_file_mode(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let umask = fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Umask:"))
                    .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            })
            .unwrap_or(0o022);
        fs::set_permissions(path, fs::Permissions::from_mode(0o666 & !umask))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(out: &Path, overwrite: bool, inputs: &[&Path], body: &str) -> Result<(), String> {
        write_dir(
            out,
            overwrite,
            inputs,
            |r| r.to_string(),
            |p, e| format!("{}: {e}", p.display()),
            |dir| fs::write(dir.join("sids.jsonl"), body).map_err(|e| e.to_string()),
        )
    }

    #[test]
    fn replaces_its_own_output_only() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("art");
        write(&out, false, &[], "a").unwrap();
        assert!(out.join(MARKER).is_file());
        let err = write(&out, false, &[], "b").unwrap_err();
        assert!(err.contains("pass --force"), "{err}");
        write(&out, true, &[], "b").unwrap();
        assert_eq!(fs::read_to_string(out.join("sids.jsonl")).unwrap(), "b");

        // A file the user put there makes it not ours any more.
        fs::write(out.join("notes.txt"), "mine").unwrap();
        let err = write(&out, true, &[], "c").unwrap_err();
        assert!(
            err.contains("not written by sidrec") && err.contains("notes.txt"),
            "{err}"
        );
        assert_eq!(fs::read_to_string(out.join("notes.txt")).unwrap(), "mine");
    }

    #[test]
    fn never_replaces_a_directory_holding_an_input() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("items");
        fs::create_dir(&out).unwrap();
        let input = out.join("items.jsonl");
        fs::write(&input, "{}").unwrap();
        let err = write(&out, true, &[&input], "x").unwrap_err();
        assert!(err.contains("an input of this run"), "{err}");
        // Not ours either, even without naming the input.
        let err = write(&out, true, &[], "x").unwrap_err();
        assert!(err.contains("not written by sidrec"), "{err}");
        assert!(input.is_file());
    }

    #[test]
    fn empty_directory_and_legacy_output_are_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("empty");
        fs::create_dir(&out).unwrap();
        write(&out, true, &[], "a").unwrap();
        let legacy = tmp.path().join("legacy");
        fs::create_dir(&legacy).unwrap();
        fs::write(legacy.join("sids.jsonl"), "").unwrap();
        fs::write(legacy.join("report.json"), "{}").unwrap();
        write(&legacy, true, &[], "a").unwrap();
        assert!(!legacy.join("report.json").exists());
    }

    #[test]
    fn a_downloaded_model_directory_is_not_replaced() {
        // A Hugging Face model directory holds names sidrec also writes, but none that
        // only sidrec writes: it is the user's.
        let tmp = tempfile::tempdir().unwrap();
        let hf = tmp.path().join("SmolLM2");
        fs::create_dir(&hf).unwrap();
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            fs::write(hf.join(f), "x").unwrap();
        }
        let err = write(&hf, true, &[], "a").unwrap_err();
        assert!(err.contains("not written by sidrec"), "{err}");
        assert!(hf.join("model.safetensors").is_file());
    }

    #[cfg(unix)]
    #[test]
    fn a_symlink_is_followed_and_its_target_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("v1");
        write(&real, false, &[], "old").unwrap();
        let link = tmp.path().join("current");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        write(&link, true, &[], "new").unwrap();
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read_to_string(real.join("sids.jsonl")).unwrap(), "new");
        assert_eq!(fs::read_to_string(link.join("sids.jsonl")).unwrap(), "new");
    }

    #[test]
    fn an_interrupted_swap_is_recovered() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("model");
        write(&out, false, &[], "old").unwrap();
        // As a kill between the two renames leaves it: the old copy aside, `out` missing.
        fs::rename(&out, old_path(&out)).unwrap();
        recover(&out);
        assert_eq!(fs::read_to_string(out.join("sids.jsonl")).unwrap(), "old");
        assert!(!old_path(&out).exists());

        // The old copy aside and the new one in place: the old one goes.
        fs::create_dir(old_path(&out)).unwrap();
        write(&out, true, &[], "new").unwrap();
        assert!(!old_path(&out).exists());
    }

    #[test]
    fn temporaries_of_dead_processes_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        // Process ids are below 2^22 on Linux: this one cannot be running.
        let dead = tmp.path().join(format!("{TMP_PREFIX}4294967-abc"));
        fs::create_dir(&dead).unwrap();
        let live = tmp
            .path()
            .join(format!("{TMP_PREFIX}{}-abc", std::process::id()));
        fs::create_dir(&live).unwrap();
        write(&tmp.path().join("out"), false, &[], "a").unwrap();
        assert!(!dead.exists());
        assert!(live.exists());
    }
}
