//! What a share is: a tag the guest mounts by, a host directory, and options.
//!
//! [`ShareConfig`] parses the `--share` syntax (`TAG=DIR[,ro][,cache=never|auto|always]
//! [,xattr=on|off][,writeback]`), validates the tag (what Linux accepts in the 36-byte
//! config field, restricted to `[A-Za-z0-9._-]` so it survives command lines) and resolves
//! the directory to an absolute path.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use fuse_backend_rs::passthrough::CachePolicy as PassthroughCache;

/// Bytes of the `tag` field of `struct virtio_fs_config`.
pub const TAG_LEN: usize = 36;

/// Errors in a share's configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("share tag is empty: give a tag, e.g. `--share data=/srv/data`")]
    EmptyTag,
    #[error("share tag {0:?} is longer than 36 bytes: use a shorter tag")]
    TagTooLong(String),
    #[error("share tag {0:?} has characters other than A-Z a-z 0-9 . _ -: rename it")]
    TagCharacters(String),
    #[error("share tag {0:?} is used twice: every share needs its own tag")]
    DuplicateTag(String),
    #[error(
        "share spec {0:?} is not TAG=DIR[,ro][,cache=never|auto|always][,xattr=on|off][,writeback]"
    )]
    Syntax(String),
    #[error(
        "share option {0:?} is unknown: use ro, cache=never|auto|always, xattr=on|off or writeback"
    )]
    UnknownOption(String),
    #[error("share directory {path}: {reason}; create it or fix the path")]
    Dir { path: PathBuf, reason: String },
}

/// How much the guest may cache: data, attributes and directory entries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CachePolicy {
    /// No data caching (direct I/O), no attribute/entry caching. For directories the host
    /// changes behind the guest's back. Note: Linux < 6.6 refuses shared writable `mmap` on
    /// direct-I/O files (`MAP_PRIVATE`, e.g. executables, still works).
    Never,
    /// Close-to-open consistency, attributes and entries cached for 1 s (the default).
    #[default]
    Auto,
    /// Cache everything for a day: only for directories nothing else changes.
    Always,
}

impl CachePolicy {
    /// How long the guest may trust attributes and directory entries.
    pub fn timeout(self) -> Duration {
        match self {
            CachePolicy::Never => Duration::ZERO,
            CachePolicy::Auto => Duration::from_secs(1),
            CachePolicy::Always => Duration::from_secs(86_400),
        }
    }

    pub(crate) fn to_passthrough(self) -> PassthroughCache {
        match self {
            CachePolicy::Never => PassthroughCache::Never,
            CachePolicy::Auto => PassthroughCache::Auto,
            CachePolicy::Always => PassthroughCache::Always,
        }
    }
}

impl FromStr for CachePolicy {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "never" | "none" => Ok(CachePolicy::Never),
            "auto" => Ok(CachePolicy::Auto),
            "always" => Ok(CachePolicy::Always),
            other => Err(ConfigError::UnknownOption(format!("cache={other}"))),
        }
    }
}

impl fmt::Display for CachePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CachePolicy::Never => "never",
            CachePolicy::Auto => "auto",
            CachePolicy::Always => "always",
        })
    }
}

/// Per-share options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShareOptions {
    /// Refuse every change with `EROFS` (create, write, setattr, rename, xattrs, ...).
    pub read_only: bool,
    pub cache: CachePolicy,
    /// Pass extended attributes through (`user.*`, `security.*`, `trusted.*`, ACLs).
    pub xattr: bool,
    /// Let the guest cache writes (FUSE writeback cache). Off by default: with it, the guest
    /// may send reads for files it opened write-only and delays writes.
    pub writeback: bool,
    /// Allow the guest to create character and block device nodes in the host directory
    /// (`mknod`). Off by default: such nodes would be usable by host processes.
    pub allow_devices: bool,
    /// How many inodes and handles the guest may hold on the host at once.
    #[serde(default)]
    pub limits: super::limits::FsLimits,
}

impl Default for ShareOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            cache: CachePolicy::Auto,
            xattr: true,
            writeback: false,
            allow_devices: false,
            limits: Default::default(),
        }
    }
}

/// One share: a virtio-fs device the guest mounts with `mount -t virtiofs TAG /mnt`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShareConfig {
    pub tag: String,
    /// The host directory (absolute after [`ShareConfig::new`] or parsing).
    pub dir: PathBuf,
    pub options: ShareOptions,
}

impl ShareConfig {
    /// A checked share: valid tag, existing directory (made absolute).
    pub fn new(
        tag: &str,
        dir: impl AsRef<Path>,
        options: ShareOptions,
    ) -> Result<Self, ConfigError> {
        check_tag(tag)?;
        let dir = check_dir(dir.as_ref())?;
        Ok(Self {
            tag: tag.to_string(),
            dir,
            options,
        })
    }

    /// Checks that no two shares of a VM use the same tag (Linux refuses the second).
    pub fn check_unique_tags(shares: &[ShareConfig]) -> Result<(), ConfigError> {
        for (i, s) in shares.iter().enumerate() {
            if shares[..i].iter().any(|o| o.tag == s.tag) {
                return Err(ConfigError::DuplicateTag(s.tag.clone()));
            }
        }
        Ok(())
    }

    /// The config-space image of the tag: the bytes, NUL padded to [`TAG_LEN`].
    pub fn tag_bytes(&self) -> [u8; TAG_LEN] {
        let mut out = [0u8; TAG_LEN];
        let n = self.tag.len().min(TAG_LEN);
        out[..n].copy_from_slice(&self.tag.as_bytes()[..n]);
        out
    }
}

impl FromStr for ShareConfig {
    type Err = ConfigError;

    /// `TAG=DIR[,ro][,cache=never|auto|always][,xattr=on|off][,writeback]`.
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let mut parts = spec.split(',');
        let first = parts.next().unwrap_or_default();
        let Some((tag, dir)) = first.split_once('=') else {
            return Err(ConfigError::Syntax(spec.to_string()));
        };
        if dir.is_empty() {
            return Err(ConfigError::Syntax(spec.to_string()));
        }
        let mut options = ShareOptions::default();
        for opt in parts {
            match opt.split_once('=') {
                None if opt == "ro" => options.read_only = true,
                None if opt == "rw" => options.read_only = false,
                None if opt == "writeback" => options.writeback = true,
                Some(("cache", v)) => options.cache = v.parse()?,
                Some(("xattr", "on")) => options.xattr = true,
                Some(("xattr", "off")) => options.xattr = false,
                _ => return Err(ConfigError::UnknownOption(opt.to_string())),
            }
        }
        ShareConfig::new(tag, dir, options)
    }
}

fn check_tag(tag: &str) -> Result<(), ConfigError> {
    if tag.is_empty() {
        return Err(ConfigError::EmptyTag);
    }
    if tag.len() > TAG_LEN {
        return Err(ConfigError::TagTooLong(tag.to_string()));
    }
    if !tag
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(ConfigError::TagCharacters(tag.to_string()));
    }
    Ok(())
}

fn check_dir(dir: &Path) -> Result<PathBuf, ConfigError> {
    let err = |reason: String| ConfigError::Dir {
        path: dir.to_path_buf(),
        reason,
    };
    let abs = dir.canonicalize().map_err(|e| err(e.to_string()))?;
    if !abs.is_dir() {
        return Err(err("not a directory".into()));
    }
    if abs.to_str().is_none() {
        return Err(err("the path is not valid UTF-8".into()));
    }
    Ok(abs)
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::tempdir::TempDir;

    use super::*;

    #[test]
    fn parses_share_specs() {
        let dir = TempDir::new().unwrap();
        let d = dir.as_path().to_str().unwrap();
        let s: ShareConfig = format!("data={d}").parse().unwrap();
        assert_eq!(s.tag, "data");
        assert_eq!(s.dir, dir.as_path().canonicalize().unwrap());
        assert_eq!(s.options, ShareOptions::default());

        let s: ShareConfig = format!("ro-share={d},ro,cache=always,xattr=off,writeback")
            .parse()
            .unwrap();
        assert!(s.options.read_only && s.options.writeback && !s.options.xattr);
        assert_eq!(s.options.cache, CachePolicy::Always);
        assert_eq!(&s.tag_bytes()[..9], b"ro-share\0");

        for (spec, want) in [
            (format!("={d}"), ConfigError::EmptyTag),
            (
                format!("{}={d}", "t".repeat(37)),
                ConfigError::TagTooLong("t".repeat(37)),
            ),
            (format!("a b={d}"), ConfigError::TagCharacters("a b".into())),
            ("nodir".to_string(), ConfigError::Syntax("nodir".into())),
            ("tag=".to_string(), ConfigError::Syntax("tag=".into())),
            (
                format!("t={d},cache=sometimes"),
                ConfigError::UnknownOption("cache=sometimes".into()),
            ),
            (format!("t={d},rx"), ConfigError::UnknownOption("rx".into())),
        ] {
            assert_eq!(spec.parse::<ShareConfig>().unwrap_err(), want, "{spec}");
        }
        assert!(matches!(
            "t=/does/not/exist".parse::<ShareConfig>(),
            Err(ConfigError::Dir { .. })
        ));
        let t36 = "x".repeat(36);
        let s: ShareConfig = format!("{t36}={d}").parse().unwrap();
        assert_eq!(s.tag_bytes(), [b'x'; 36]);
    }

    #[test]
    fn rejects_files_and_duplicate_tags() {
        let file = vmm_sys_util::tempfile::TempFile::new().unwrap();
        assert!(matches!(
            ShareConfig::new("f", file.as_path(), ShareOptions::default()),
            Err(ConfigError::Dir { .. })
        ));
        let dir = TempDir::new().unwrap();
        let a = ShareConfig::new("a", dir.as_path(), ShareOptions::default()).unwrap();
        let b = ShareConfig::new("b", dir.as_path(), ShareOptions::default()).unwrap();
        ShareConfig::check_unique_tags(&[a.clone(), b]).unwrap();
        assert_eq!(
            ShareConfig::check_unique_tags(&[a.clone(), a]),
            Err(ConfigError::DuplicateTag("a".into()))
        );
    }
}
