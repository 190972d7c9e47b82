//! Reading and writing guest files: bounded reads, exclusive replacements that keep owner, mode and
//! SELinux label, removals.

use anyhow::{bail, Context, Result};
use guestfs::GlobExpandOptArgs;

use super::{Guest, MAX_CONFIG_FILE, S_IFLNK, S_IFMT, S_IFREG};

/// One file's ownership, permissions and SELinux label, to carry over when it is replaced.
struct Attributes {
    mode: i64,
    uid: i64,
    gid: i64,
    selinux: Option<String>,
}

impl Guest {
    pub fn is_dir(&self, path: &str) -> Result<bool> {
        self.bounded(&format!("checking {path}"), |g| {
            g.is_dir(path, guestfs::IsDirOptArgs { followsymlinks: Some(false) })
        })
    }

    pub fn exists(&self, path: &str) -> Result<bool> {
        self.bounded(&format!("checking {path}"), |g| g.exists(path))
    }

    pub fn is_symlink(&self, path: &str) -> Result<bool> {
        self.bounded(&format!("checking {path}"), |g| g.is_symlink(path))
    }

    /// Paths matching a glob inside the guest, sorted.
    pub fn glob(&self, pattern: &str) -> Result<Vec<String>> {
        let mut paths = self.bounded(&format!("listing {pattern}"), |g| {
            g.glob_expand(pattern, GlobExpandOptArgs { directoryslash: Some(false) })
        })?;
        paths.sort();
        Ok(paths)
    }

    /// Names in a directory (empty when it does not exist).
    pub fn list_dir(&self, dir: &str) -> Result<Vec<String>> {
        if !self.is_dir(dir)? {
            return Ok(Vec::new());
        }
        let mut names = self.bounded(&format!("listing {dir}"), |g| g.ls(dir))?;
        names.sort();
        Ok(names)
    }

    /// A configuration file's bytes: `None` when it does not exist. Refuses symlinks, anything that is
    /// not a regular file, and files over [`MAX_CONFIG_FILE`], so that a hostile image cannot send the
    /// tool elsewhere or exhaust its memory.
    pub fn read_config_file(&self, path: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.read_config_file_with_mode(path)?.map(|(bytes, _)| bytes))
    }

    /// [`Guest::read_config_file`], with the file's permission bits.
    pub fn read_config_file_with_mode(&self, path: &str) -> Result<Option<(Vec<u8>, u32)>> {
        self.read_regular_file(path, MAX_CONFIG_FILE)
    }

    /// Like [`Guest::read_config_file_with_mode`] with a limit of `max` bytes, for the few larger files
    /// cloudimg reads (dpkg's status file).
    pub fn read_regular_file(&self, path: &str, max: i64) -> Result<Option<(Vec<u8>, u32)>> {
        let mut bytes = Vec::new();
        Ok(self.copy_regular_file(path, max, &mut bytes)?.map(|mode| (bytes, mode)))
    }

    /// Copies a regular guest file of at most `max` bytes into `out`, with the refusals of
    /// [`Guest::read_config_file`]; its permission bits, `None` when it does not exist.
    pub fn copy_regular_file(&self, path: &str, max: i64, out: &mut impl std::io::Write) -> Result<Option<u32>> {
        if !self.exists(path)? && !self.is_symlink(path)? {
            return Ok(None);
        }
        let stat = self.bounded(&format!("checking {path}"), |g| g.lstatns(path))?;
        match stat.st_mode & S_IFMT {
            S_IFREG => {}
            S_IFLNK => {
                let target = self.bounded(&format!("reading link {path}"), |g| g.readlink(path)).unwrap_or_default();
                bail!("{path} in the guest is a symbolic link (to `{target}`); cloudimg edits only regular files, replace it with a file first");
            }
            _ => bail!("{path} in the guest is not a regular file"),
        }
        let size = stat.st_size;
        if size > max {
            bail!("{path} in the guest is {size} bytes, larger than the {max} bytes cloudimg reads from such a file");
        }
        // pread answers in one message (read_file goes through a download, ~0.12 s a file under TCG);
        // a message holds at most a few MiB, so larger files come in pieces.
        const PIECE: i64 = 1 << 20;
        let mut copied: i64 = 0;
        while copied < size.max(1) {
            let count = i32::try_from((size - copied).clamp(1, PIECE)).expect("at most PIECE");
            let piece = self.bounded(&format!("reading {path} in the guest"), |g| g.pread(path, count, copied))?;
            if piece.is_empty() {
                break;
            }
            out.write_all(&piece).with_context(|| format!("copying {path} out of the guest"))?;
            copied += piece.len() as i64;
        }
        Ok(Some((stat.st_mode & 0o7777) as u32))
    }

    /// The last `lines` lines that the programs `identifiers` logged to the systemd journal kept in
    /// the guest's `dir`, as the guest's own `journalctl` prints them; `None` when there is no such
    /// journal or no journalctl. It runs inside the appliance, chrooted into the mounted guest: only
    /// the guest's systemd surely reads its journal's format, and guestfs 0.1.0's `journal_get`
    /// cannot be used (its XAttr declares a `usize` length where libguestfs has a `uint32_t`, so
    /// every field's length is read with padding bytes in it). Callers run it on disks they throw
    /// away (verify's overlay); its output is one bounded message.
    pub fn journal_lines(&self, dir: &str, identifiers: &[&str], lines: usize) -> Result<Option<String>> {
        let Some(journalctl) =
            ["/usr/bin/journalctl", "/bin/journalctl"].into_iter().find(|p| self.exists(p).unwrap_or(false))
        else {
            return Ok(None);
        };
        if !self.is_dir(dir)? {
            return Ok(None);
        }
        let count = lines.to_string();
        let mut args = vec![journalctl, "-D", dir, "--no-pager", "-q", "-o", "short-iso", "-n", &count];
        identifiers.iter().for_each(|id| args.extend(["-t", id]));
        self.bounded(&format!("reading the journal in {dir} with the guest's journalctl"), |g| g.command(&args))
            .map(Some)
    }

    /// The first `count` bytes of the regular file `path` resolves to (symbolic links are followed
    /// inside the guest); `None` when there is no such file.
    pub fn read_head(&self, path: &str, count: i32) -> Result<Option<Vec<u8>>> {
        if !self.exists(path)? {
            return Ok(None);
        }
        let stat = self.bounded(&format!("checking {path}"), |g| g.statns(path))?;
        if stat.st_mode & S_IFMT != S_IFREG {
            return Ok(None);
        }
        self.bounded(&format!("reading {path} in the guest"), |g| g.pread(path, count, 0)).map(Some)
    }

    /// The packages libguestfs's inspection finds installed in the operating system whose root is
    /// `root`, as `(name, version-release)`. It reads package databases cloudimg does not parse itself
    /// (rpm's). Inspection unmounts every filesystem first and needs the guest's own mounted again
    /// before the listing, so `mount` is called in between.
    pub fn inspected_packages(&self, root: &str, mount: impl FnOnce() -> Result<()>) -> Result<Vec<(String, String)>> {
        let roots = self.bounded("inspecting the image (libguestfs inspection)", |g| g.inspect_os());
        mount()?;
        if !roots?.iter().any(|r| r == root) {
            bail!("libguestfs's inspection does not recognise {root} as an operating system root");
        }
        let apps = self.bounded("listing the installed packages", |g| g.inspect_list_applications2(root))?;
        Ok(apps
            .into_iter()
            .map(|a| {
                let release = if a.app2_release.is_empty() { String::new() } else { format!("-{}", a.app2_release) };
                (a.app2_name, format!("{}{release}", a.app2_version))
            })
            .collect())
    }

    /// Replaces (or creates) `path` with `content` through a temporary file in the same directory and a
    /// rename, so the file is never half-written. An existing file's mode, owner and SELinux label are
    /// kept; a new file takes them from `like` (a sibling configuration file), else root-owned 0644.
    pub fn replace_file(&self, path: &str, content: &[u8], like: &str) -> Result<()> {
        let attrs = match self.attributes(path)? {
            Some(a) => a,
            None => self.attributes(like)?.unwrap_or(Attributes { mode: 0o644, uid: 0, gid: 0, selinux: None }),
        };
        self.write_with(path, content, attrs)
    }

    /// Like [`Guest::replace_file`], but the file is root's alone (0600) whatever it was, with the
    /// SELinux label of `like`.
    pub fn replace_private_file(&self, path: &str, content: &[u8], like: &str) -> Result<()> {
        let selinux = self.attributes(like)?.and_then(|a| a.selinux);
        self.write_with(path, content, Attributes { mode: 0o600, uid: 0, gid: 0, selinux })
    }

    fn write_with(&self, path: &str, content: &[u8], attrs: Attributes) -> Result<()> {
        let dir = path.rsplit_once('/').map(|(d, _)| if d.is_empty() { "/" } else { d }).unwrap_or("/");
        self.bounded(&format!("creating {dir} in the guest"), |g| g.mkdir_p(dir))?;
        let temp = format!("{dir}/.cloudimg-new");
        self.bounded(&format!("writing {temp} in the guest"), |g| g.write(&temp, content))?;
        self.bounded(&format!("setting the owner of {temp}"), |g| g.chown(attrs.uid as i32, attrs.gid as i32, &temp))?;
        self.bounded(&format!("setting the mode of {temp}"), |g| g.chmod((attrs.mode & 0o7777) as i32, &temp))?;
        if let Some(label) = &attrs.selinux {
            self.bounded(&format!("setting the SELinux label of {temp}"), |g| {
                g.lsetxattr("security.selinux", label, label.len() as i32, &temp)
            })?;
        }
        self.bounded(&format!("renaming {temp} to {path} in the guest"), |g| g.rename(&temp, path))
    }

    fn attributes(&self, path: &str) -> Result<Option<Attributes>> {
        if !self.exists(path)? {
            return Ok(None);
        }
        let st = self.bounded(&format!("reading the attributes of {path}"), |g| g.lstatns(path))?;
        // Listing all attributes, rather than asking for the one, keeps a missing label from being an error.
        let selinux = self
            .bounded(&format!("reading the extended attributes of {path}"), |g| g.lgetxattrs(path))?
            .into_iter()
            .find(|x| x.attrname == "security.selinux")
            .map(|x| String::from_utf8_lossy(&x.attrval).trim_end_matches('\0').to_string())
            .filter(|l| !l.is_empty());
        Ok(Some(Attributes { mode: st.st_mode, uid: st.st_uid, gid: st.st_gid, selinux }))
    }

    pub fn remove_file(&self, path: &str) -> Result<()> {
        self.bounded(&format!("removing {path} in the guest"), |g| g.rm(path))
    }

    /// Removes a directory when it is empty (and leaves it otherwise).
    pub fn remove_dir_if_empty(&self, path: &str) -> Result<()> {
        if self.is_dir(path)? && self.list_dir(path)?.is_empty() {
            self.bounded(&format!("removing {path} in the guest"), |g| g.rmdir(path))?;
        }
        Ok(())
    }

    pub fn remove_tree(&self, path: &str) -> Result<()> {
        self.bounded(&format!("removing {path} in the guest"), |g| g.rm_rf(path))
    }
}
