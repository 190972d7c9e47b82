//! Whether a cache directory can be trusted with what the appliance boots: libguestfs's
//! `.guestfs-UID/appliance.d` and cloudimg's fast-boot copy beside it.
//!
//! The cache usually lives in world-writable `/var/tmp`, where any local user can make a directory
//! first (on a fresh host, or after tmpfiles cleaned it). Whatever is in it boots with the image's
//! disks attached, so every directory from the cache directory down must be this user's alone: owned
//! by the effective user, writable by nobody else, and not a symbolic link. Each step is opened
//! relative to the last one with `O_NOFOLLOW` and checked through its descriptor (`fstat`), so a
//! name swapped between the check and the open cannot slip through. The files in them (which the
//! fast-boot copy hard-links) must be this user's regular files that nobody else can write: a link
//! to someone else's file lets its owner change it later.

use std::fs::{File, Metadata};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use crate::support::identity::effective_uid;
use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;

/// Why a cache directory or file cannot be trusted, and the command that fixes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Distrust {
    pub path: PathBuf,
    /// What is wrong, e.g. "is owned by uid 1001, not by this user (uid 0)".
    pub problem: String,
    pub fix: String,
}

impl std::fmt::Display for Distrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.path.display(), self.problem)
    }
}

impl std::error::Error for Distrust {}

/// A file's identity: (device, inode).
pub type FileId = (u64, u64);

/// An open directory that this user controls alone (or, for the cache directory itself, one in which
/// nobody else can replace this user's entries).
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
    meta: Metadata,
}

impl Dir {
    /// The directory caches live in (`$LIBGUESTFS_CACHEDIR`, `$TMPDIR` or `/var/tmp`). The user named
    /// it, so symbolic links on the way are followed; but every directory from `/` to it must be
    /// owned by this user or root and writable by others only with the sticky bit, or someone else
    /// could rename the cache away and put their own in its place.
    pub fn cache_root(path: &Path) -> Result<Dir, Distrust> {
        let real = std::fs::canonicalize(path).map_err(|e| Distrust {
            path: path.to_path_buf(),
            problem: format!("cannot be resolved ({e})"),
            fix: format!("mkdir -p {}, or export LIBGUESTFS_CACHEDIR=/a/directory/of/your/own", path.display()),
        })?;
        let mut dir = Dir::open_at(rustix::fs::CWD, Path::new("/"))?;
        check_holder(&dir.path, &dir.meta)?;
        for part in real.components().filter(|c| matches!(c, Component::Normal(_))) {
            dir = Dir::open_at(dir.fd.as_fd(), &dir.path.join(part))?;
            check_holder(&dir.path, &dir.meta)?;
        }
        Ok(dir)
    }

    /// The directory `name` inside this one, checked; `None` when it does not exist.
    pub fn open(&self, name: &str) -> Result<Option<Dir>, Distrust> {
        match Dir::open_at(self.fd.as_fd(), &self.path.join(name)) {
            Ok(dir) => check_private(&dir.path, &dir.meta).map(|()| Some(dir)),
            Err(_) if self.missing(name) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The directory `name` inside this one, created with `mode` when missing, checked.
    pub fn open_or_create(&self, name: &str, mode: u32) -> Result<Dir, Distrust> {
        match rustix::fs::mkdirat(self.fd.as_fd(), name, Mode::from_raw_mode(mode)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => {
                return Err(Distrust {
                    path: self.path.join(name),
                    problem: format!("cannot be created ({e})"),
                    fix: format!("export LIBGUESTFS_CACHEDIR=/a/directory/of/your/own (writable by {})", whoami()),
                })
            }
        }
        self.open(name)?.ok_or_else(|| Distrust {
            path: self.path.join(name),
            problem: "disappeared as it was created".into(),
            fix: "run again; if it persists, someone is racing cloudimg in that directory".into(),
        })
    }

    /// The regular file `name` inside this one, checked like a directory (this user's, writable by
    /// nobody else); `None` when it does not exist.
    pub fn file(&self, name: &str) -> Result<Option<FileId>, Distrust> {
        let path = self.path.join(name);
        // O_PATH opens without reading, so a FIFO or device planted there cannot block us.
        let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = match rustix::fs::openat(self.fd.as_fd(), name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(unexaminable(&path, e)),
        };
        let meta = File::from(fd).metadata().map_err(|e| unexaminable(&path, e))?;
        let kind = meta.file_type();
        if kind.is_symlink() {
            return Err(symlink(&path, self.link_target(name)));
        }
        if !kind.is_file() {
            return Err(Distrust {
                path: path.clone(),
                problem: format!("is not a regular file (a {})", kind_name(&kind)),
                fix: format!("rm -rf {}", self.path.display()),
            });
        }
        check_private(&path, &meta).map_err(|d| Distrust { fix: format!("rm -rf {}", self.path.display()), ..d })?;
        Ok(Some((meta.dev(), meta.ino())))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn modified(&self) -> std::io::Result<std::time::SystemTime> {
        self.meta.modified()
    }

    /// Opens `path`'s last component in `parent` as a directory, without following a symbolic link.
    fn open_at(parent: impl AsFd, path: &Path) -> Result<Dir, Distrust> {
        let name = path.file_name().map_or(Path::new("/"), Path::new);
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let opened = rustix::fs::openat(parent.as_fd(), name, flags, Mode::empty());
        let fd = match opened {
            Ok(fd) => fd,
            // O_NOFOLLOW|O_DIRECTORY on a link or a file: say which.
            Err(Errno::NOTDIR | Errno::LOOP) => {
                let st = rustix::fs::statat(parent.as_fd(), name, AtFlags::SYMLINK_NOFOLLOW);
                let is_link = st.is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK);
                let target = rustix::fs::readlinkat(parent.as_fd(), name, Vec::new()).ok();
                return Err(if is_link {
                    symlink(path, target.map(|t| PathBuf::from(t.to_string_lossy().into_owned())))
                } else {
                    Distrust {
                        path: path.to_path_buf(),
                        problem: "is not a directory".into(),
                        fix: format!("rm {}", path.display()),
                    }
                });
            }
            Err(e) => return Err(unexaminable(path, e)),
        };
        let file = File::from(fd);
        let meta = file.metadata().map_err(|e| unexaminable(path, e))?;
        Ok(Dir { fd: file.into(), path: path.to_path_buf(), meta })
    }

    fn missing(&self, name: &str) -> bool {
        matches!(rustix::fs::statat(self.fd.as_fd(), name, AtFlags::SYMLINK_NOFOLLOW), Err(Errno::NOENT))
    }

    fn link_target(&self, name: &str) -> Option<PathBuf> {
        let target = rustix::fs::readlinkat(self.fd.as_fd(), name, Vec::new()).ok()?;
        Some(PathBuf::from(target.to_string_lossy().into_owned()))
    }
}

fn whoami() -> String {
    format!("uid {}", effective_uid())
}

fn symlink(path: &Path, target: Option<PathBuf>) -> Distrust {
    let to = target.map(|t| format!(" (to {})", t.display())).unwrap_or_default();
    Distrust {
        path: path.to_path_buf(),
        problem: format!("is a symbolic link{to}; cloudimg follows none in its appliance cache"),
        fix: format!("rm {}", path.display()),
    }
}

fn unexaminable(path: &Path, e: impl std::fmt::Display) -> Distrust {
    Distrust {
        path: path.to_path_buf(),
        problem: format!("cannot be examined ({e})"),
        fix: "export LIBGUESTFS_CACHEDIR=/a/directory/of/your/own".into(),
    }
}

fn kind_name(kind: &std::fs::FileType) -> &'static str {
    if kind.is_dir() {
        "directory"
    } else if kind.is_fifo() {
        "FIFO"
    } else if kind.is_socket() {
        "socket"
    } else if kind.is_block_device() || kind.is_char_device() {
        "device"
    } else {
        "special file"
    }
}

/// A directory or file inside the cache: this user's, writable by nobody else.
fn check_private(path: &Path, meta: &Metadata) -> Result<(), Distrust> {
    let uid = effective_uid();
    let remove = format!(
        "rm -rf {} (as its owner or root; it is rebuilt), or export LIBGUESTFS_CACHEDIR=/a/directory/of/your/own",
        path.display()
    );
    if meta.uid() != uid {
        return Err(Distrust {
            path: path.to_path_buf(),
            problem: format!(
                "is owned by uid {}, not by this user ({}): someone else may have made it to plant an appliance",
                meta.uid(),
                whoami()
            ),
            fix: remove,
        });
    }
    if meta.mode() & 0o022 != 0 {
        return Err(Distrust {
            path: path.to_path_buf(),
            problem: format!(
                "is writable by group or others (mode {:04o}), who could have changed what it holds",
                meta.mode() & 0o7777
            ),
            fix: remove,
        });
    }
    Ok(())
}

/// A directory on the way to the cache: owned by this user or root, and writable by others only
/// with the sticky bit (which stops them renaming this user's entries).
fn check_holder(path: &Path, meta: &Metadata) -> Result<(), Distrust> {
    let uid = effective_uid();
    let fix = "export LIBGUESTFS_CACHEDIR=/a/directory/only/you/can/write/to".to_string();
    if meta.uid() != uid && meta.uid() != 0 {
        return Err(Distrust {
            path: path.to_path_buf(),
            problem: format!(
                "belongs to uid {}, who could replace the appliance cache inside it ({} runs cloudimg)",
                meta.uid(),
                whoami()
            ),
            fix,
        });
    }
    if meta.mode() & 0o022 != 0 && meta.mode() & libc::S_ISVTX == 0 {
        return Err(Distrust {
            path: path.to_path_buf(),
            problem: format!(
                "is writable by group or others without the sticky bit (mode {:04o}), so they could replace the appliance cache inside it",
                meta.mode() & 0o7777
            ),
            fix,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_private_chain_is_trusted_and_missing_parts_are_none() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("cache")).unwrap();
        std::fs::write(tmp.path().join("cache/kernel"), b"k").unwrap();
        chmod(&tmp.path().join("cache/kernel"), 0o644);
        let root = Dir::cache_root(tmp.path()).unwrap();
        let cache = root.open("cache").unwrap().unwrap();
        assert_eq!(cache.path(), std::fs::canonicalize(tmp.path()).unwrap().join("cache"));
        let meta = std::fs::metadata(tmp.path().join("cache/kernel")).unwrap();
        assert_eq!(cache.file("kernel").unwrap(), Some((meta.dev(), meta.ino())));
        assert_eq!(cache.file("initrd").unwrap(), None);
        assert!(root.open("absent").unwrap().is_none());
        let made = root.open_or_create("made", 0o700).unwrap();
        assert_eq!(std::fs::metadata(made.path()).unwrap().mode() & 0o777, 0o700);
    }

    #[test]
    fn links_writable_directories_and_odd_files_are_distrusted_with_a_fix() {
        let tmp = tempfile::tempdir().unwrap();
        let t = |name: &str| tmp.path().join(name);
        std::fs::create_dir(t("real")).unwrap();
        std::os::unix::fs::symlink(t("real"), t("link")).unwrap();
        std::fs::create_dir(t("open")).unwrap();
        chmod(&t("open"), 0o777);
        std::fs::write(t("plain"), b"").unwrap();
        std::fs::create_dir(t("real/kernel")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", t("real/initrd")).unwrap();
        std::fs::write(t("real/root"), b"").unwrap();
        chmod(&t("real/root"), 0o666);
        let root = Dir::cache_root(tmp.path()).unwrap();

        let link = root.open("link").unwrap_err();
        assert!(link.problem.contains("symbolic link") && link.problem.contains("real"), "{link}");
        assert_eq!(link.fix, format!("rm {}", link.path.display()));
        let open = root.open("open").unwrap_err();
        assert!(open.problem.contains("writable by group or others (mode 0777)"), "{open}");
        assert!(open.fix.starts_with("rm -rf "), "{open:?}");
        assert!(root.open("plain").unwrap_err().problem.contains("not a directory"));
        assert!(root.open_or_create("link", 0o700).is_err(), "an existing link is not taken for a directory");

        let real = root.open("real").unwrap().unwrap();
        assert!(real.file("kernel").unwrap_err().problem.contains("not a regular file (a directory)"));
        assert!(real.file("initrd").unwrap_err().problem.contains("symbolic link (to /etc/passwd)"));
        let writable = real.file("root").unwrap_err();
        assert!(writable.problem.contains("mode 0666"), "{writable}");
        assert_eq!(writable.fix, format!("rm -rf {}", real.path().display()), "the whole directory goes");
    }

    #[test]
    fn a_cache_directory_others_can_rename_in_is_distrusted() {
        let tmp = tempfile::tempdir().unwrap();
        let shared = tmp.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        chmod(&shared, 0o777);
        let err = Dir::cache_root(&shared).unwrap_err();
        assert!(err.problem.contains("without the sticky bit"), "{err}");
        chmod(&shared, 0o1777);
        Dir::cache_root(&shared).unwrap();
    }

    #[test]
    fn someone_elses_directory_is_distrusted() {
        if effective_uid() != 0 {
            return; // only root can give a directory away
        }
        let tmp = tempfile::tempdir().unwrap();
        let theirs = tmp.path().join(".guestfs-0");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        let err = Dir::cache_root(tmp.path()).unwrap().open(".guestfs-0").unwrap_err();
        assert!(err.problem.contains("owned by uid 65534, not by this user (uid 0)"), "{err}");
        let held = Dir::cache_root(&theirs).unwrap_err();
        assert!(held.problem.contains("belongs to uid 65534"), "{held}");
    }
}
