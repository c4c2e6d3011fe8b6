//! A local busybox OCI image (no registry needed): static busybox (`/bin/busybox`, Debian
//! package busybox-static) with one link per applet, packed as an OCI image layout archive
//! with one uncompressed layer, ready for `ctr image import`.
//!
//! Returns errors rather than panicking: `podvisor bench` uses it as well as the tests.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

/// The busybox binary the image is built from.
pub const BUSYBOX: &str = "/bin/busybox";
/// The image's name once imported.
pub const IMAGE: &str = "docker.io/library/busybox:local";

/// Errors building the image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{BUSYBOX} is missing: install the Debian package busybox-static (`make deps`)")]
    NoBusybox,
    #[error("cannot write the busybox image under {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{what}` failed ({detail}); is coreutils/tar installed?")]
    Tool { what: String, detail: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn run(cmd: &mut Command) -> Result<Vec<u8>, ImageError> {
    let what = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| ImageError::Tool {
        what: what.clone(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(ImageError::Tool {
            what,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

/// A busybox rootfs at `rootfs`: static busybox, one link per applet, the usual empty
/// directories and a root passwd entry.
pub fn build_busybox_rootfs(rootfs: &Path) -> Result<(), ImageError> {
    if !Path::new(BUSYBOX).is_file() {
        return Err(ImageError::NoBusybox);
    }
    let bin = rootfs.join("bin");
    std::fs::create_dir_all(&bin).map_err(io(&bin))?;
    for d in ["proc", "sys", "dev", "tmp", "etc", "root", "run"] {
        let d = rootfs.join(d);
        std::fs::create_dir_all(&d).map_err(io(&d))?;
    }
    std::fs::copy(BUSYBOX, bin.join("busybox")).map_err(io(&bin))?;
    let list = run(Command::new(BUSYBOX).arg("--list"))?;
    for applet in String::from_utf8_lossy(&list).lines() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", bin.join(applet));
        }
    }
    let passwd = rootfs.join("etc/passwd");
    std::fs::write(&passwd, "root:x:0:0:root:/root:/bin/sh\n").map_err(io(&passwd))
}

fn sha256(path: &Path) -> Result<String, ImageError> {
    let out = run(Command::new("sha256sum").arg(path))?;
    String::from_utf8_lossy(&out)
        .split_whitespace()
        .next()
        .map(str::to_string)
        .ok_or_else(|| ImageError::Tool {
            what: format!("sha256sum {}", path.display()),
            detail: "no digest printed".into(),
        })
}

/// Stores `path` as a blob of the OCI layout; returns (digest, size).
fn add_blob(layout: &Path, path: &Path) -> Result<(String, u64), ImageError> {
    let hex = sha256(path)?;
    let size = std::fs::metadata(path).map_err(io(path))?.len();
    let blob = layout.join("blobs/sha256").join(&hex);
    std::fs::copy(path, &blob).map_err(io(&blob))?;
    Ok((format!("sha256:{hex}"), size))
}

/// Builds the busybox OCI image archive under `dir` (created); returns its path.
pub fn build_image(dir: &Path) -> Result<PathBuf, ImageError> {
    build_image_as(
        dir,
        IMAGE,
        &json!({"Env": ["PATH=/bin"], "Cmd": ["sh"], "WorkingDir": "/"}),
    )
}

/// The busybox image archive named `name` with image config `config` (`Env`, `Cmd`,
/// `Entrypoint`, ...), under `dir`.
pub fn build_image_as(
    dir: &Path,
    name: &str,
    config: &serde_json::Value,
) -> Result<PathBuf, ImageError> {
    let rootfs = dir.join("rootfs");
    build_busybox_rootfs(&rootfs)?;

    let layout = dir.join("layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).map_err(io(&blobs))?;
    let layer = dir.join("layer.tar");
    run(Command::new("tar")
        .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
        .arg(&rootfs)
        .arg("-cf")
        .arg(&layer)
        .arg("."))?;
    let (layer_digest, layer_size) = add_blob(&layout, &layer)?;

    let write_json = |name: &str, value: &serde_json::Value| {
        let p = dir.join(name);
        std::fs::write(&p, value.to_string()).map_err(io(&p))?;
        add_blob(&layout, &p)
    };
    let (config_digest, config_size) = write_json(
        "config.json",
        &json!({
            "architecture": "amd64",
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]}
        }),
    )?;
    let (manifest_digest, manifest_size) = write_json(
        "manifest.json",
        &json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest, "size": config_size
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": layer_digest, "size": layer_size
            }]
        }),
    )?;
    let index = layout.join("index.json");
    let index_json = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest_size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": "local"
            }
        }]
    });
    std::fs::write(&index, index_json.to_string()).map_err(io(&index))?;
    let marker = layout.join("oci-layout");
    std::fs::write(&marker, r#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io(&marker))?;
    let archive = dir.join("busybox.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&archive)
        .args(["oci-layout", "index.json", "blobs"]))?;
    Ok(archive)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_an_oci_archive() {
        if !Path::new(BUSYBOX).is_file() {
            eprintln!("*** SKIPPED builds_an_oci_archive: {BUSYBOX} missing (make deps) ***");
            return;
        }
        let dir = std::env::temp_dir().join(format!("podvisor-image-{}", std::process::id()));
        let archive = build_image(&dir).unwrap();
        let list = run(Command::new("tar").arg("-tf").arg(&archive)).unwrap();
        let list = String::from_utf8_lossy(&list);
        assert!(list.lines().any(|l| l == "index.json"), "{list}");
        assert_eq!(
            list.lines()
                .filter(|l| l.len() > 13 && l.starts_with("blobs/sha256/"))
                .count(),
            3
        );
        assert!(dir.join("rootfs/bin/sh").is_symlink());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
