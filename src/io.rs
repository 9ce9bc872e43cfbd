//! Files written so that a crash or a full disk never leaves half a checkpoint behind.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Distinguishes temporary files of concurrent writers within one process (the pid covers other processes).
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Replaces `path` with `bytes` atomically: readers see the old contents or the new, never a mix.
///
/// Writes a temporary file `.{name}.tmp-{pid}-{n}` in the same directory (so the rename stays on one
/// file system), syncs it, renames it over `path`, then syncs the directory (best-effort, unix only) so
/// the rename itself survives a power cut. An existing file's permissions carry over to the new one.
///
/// On any error the temporary file is removed and an existing `path` is left as it was. Errors name
/// `path`. If `path` is a symbolic link, the link itself is replaced, not the file it points to.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{}: not a file path", path.display())))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{}.tmp-{}-{n}", name.to_string_lossy(), std::process::id()));

    let context = |what: &str, e: io::Error| io::Error::new(e.kind(), format!("{}: {what}: {e}", path.display()));

    // create_new: never follow or clobber something already at the temporary name.
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| context("cannot create temporary file", e))?;

    let written = fill_and_rename(file, &tmp, path, bytes);
    if let Err(e) = written {
        // Best-effort: after a failed rename the temporary file is still ours to remove.
        let _ = fs::remove_file(&tmp);
        return Err(context("atomic write failed", e));
    }
    sync_dir(dir);
    Ok(())
}

fn fill_and_rename(mut file: File, tmp: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
    if let Ok(meta) = fs::metadata(path) {
        if meta.is_file() {
            file.set_permissions(meta.permissions())?;
        }
    }
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(tmp, path)
}

#[cfg(unix)]
fn sync_dir(dir: &Path) {
    // The data is already durable; failing to persist the directory entry only risks seeing the old
    // file after a crash, which is still a whole file. So errors here are not reported.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) {}
