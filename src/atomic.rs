//! Directory outputs written all-or-nothing (artifact directories, model directories,
//! training checkpoints).
//!
//! The files go into a temporary directory beside the destination, which is renamed into
//! place only when all of them are complete. An existing destination is moved aside first
//! and deleted only after the new one is in place, so a failed or interrupted run leaves
//! the previous output (or nothing), never a mix.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Runs `fill` on a fresh temporary directory beside `out`, then renames it to `out`.
/// `exists` builds the error for an existing `out` without `overwrite`; `io_err` wraps
/// I/O errors with the path they happened on. On any error the temporary directory is
/// removed and `out` is left as it was.
pub fn write_dir<E>(
    out: &Path,
    overwrite: bool,
    exists: impl FnOnce(&Path) -> E,
    io_err: impl Fn(&Path, io::Error) -> E,
    fill: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), E> {
    if out.exists() && !overwrite {
        return Err(exists(out));
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(|e| io_err(&parent, e))?;
    let tmp = tempfile::Builder::new()
        .prefix(".sidrec-tmp-")
        .tempdir_in(&parent)
        .map_err(|e| io_err(&parent, e))?;
    fill(tmp.path())?;

    let tmp_path = tmp.keep();
    let old = if out.exists() {
        let aside = parent.join(format!(
            ".sidrec-old-{}",
            out.file_name().and_then(|s| s.to_str()).unwrap_or("out")
        ));
        let _ = fs::remove_dir_all(&aside);
        if let Err(e) = fs::rename(out, &aside) {
            let _ = fs::remove_dir_all(&tmp_path);
            return Err(io_err(out, e));
        }
        Some(aside)
    } else {
        None
    };
    if let Err(e) = fs::rename(&tmp_path, out) {
        if let Some(aside) = &old {
            let _ = fs::rename(aside, out);
        }
        let _ = fs::remove_dir_all(&tmp_path);
        return Err(io_err(out, e));
    }
    if let Some(aside) = old {
        let _ = fs::remove_dir_all(aside);
    }
    Ok(())
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
