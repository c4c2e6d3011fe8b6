//! The bundle's OCI spec adapted for the guest.
//!
//! The container runs in the VM, so everything in the spec that names a host object is
//! rewritten or dropped:
//! - `root.path` → the container's rootfs in the pod's virtio-fs share;
//! - bind mounts of host files and directories (CRI's `/etc/hosts`, `/etc/resolv.conf`,
//!   `/etc/hostname`, `/dev/shm`, volumes) → the shim binds each source into the share at
//!   `<container>/mounts/<n>` ([`HostBind`]) and the spec names the guest path instead;
//! - the network namespace: the VM is the pod's network namespace (as in Kata), so every
//!   container of the pod shares the VM's network (no per-container netns; creating one is
//!   also among the slowest steps of a container start in an emulated guest kernel);
//! - namespaces joined by path (CRI: the sandbox's `/proc/<pid>/ns/...`): UTS and IPC are
//!   the VM's own, shared by the pod's containers, so the entry is dropped; any other kind
//!   becomes a new namespace;
//! - hooks (host binaries), AppArmor/SELinux labels (host LSMs) are dropped.
//!
//! The agent sets `linux.cgroupsPath` itself.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// A host path the shim must bind into the share before the container is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBind {
    /// The host source (file or directory).
    pub source: String,
    /// Relative to the container's directory in the share (`mounts/<n>`).
    pub target: String,
    /// `rbind` rather than `bind`.
    pub recursive: bool,
    /// The options make it read-only (`ro`): the host bind is read-only too (recursively
    /// for `rbind`), so the guest cannot write it through the share either.
    pub readonly: bool,
}

/// The adapted spec (JSON) and the host binds it relies on.
#[derive(Debug)]
pub struct GuestSpec {
    pub json: Vec<u8>,
    pub binds: Vec<HostBind>,
    /// `root.readonly`: the rootfs is mounted read-only on the host.
    pub root_readonly: bool,
    /// Every mount's destination in the container with, for a host bind, its host source:
    /// the mount points a read-only rootfs needs made before it turns read-only.
    pub mountpoints: Vec<(String, Option<String>)>,
}

/// Namespaces a pod's containers share as the VM's own when the spec joins the sandbox's.
const VM_NAMESPACES: [&str; 2] = ["uts", "ipc"];

fn is_bind(mount: &Value) -> bool {
    let typ = mount.get("type").and_then(Value::as_str).unwrap_or("");
    let bind_opt = mount
        .get("options")
        .and_then(Value::as_array)
        .is_some_and(|o| {
            o.iter()
                .any(|x| matches!(x.as_str(), Some("bind") | Some("rbind")))
        });
    typ == "bind" || bind_opt
}

/// A bundle's `config.json`, read once: what the shim itself needs of it and the spec
/// adapted for the guest.
#[derive(Debug)]
pub struct BundleSpec {
    pub annotations: HashMap<String, String>,
    /// The spec's hostname (empty when it sets none).
    pub hostname: String,
    /// The network namespace the spec joins (a CRI sandbox's pod network).
    pub netns: Option<PathBuf>,
    pub guest: GuestSpec,
}

impl BundleSpec {
    /// Reads `<bundle>/config.json` for a container whose directory in the guest is
    /// `container_dir`.
    pub fn read(bundle: &Path, container_dir: &str) -> Result<BundleSpec, String> {
        let raw = std::fs::read(bundle.join("config.json"))
            .map_err(|e| format!("bundle config.json: {e}"))?;
        let spec: Value = serde_json::from_slice(&raw).map_err(|e| format!("config.json: {e}"))?;
        Ok(BundleSpec {
            annotations: super::grouping::annotations(&spec),
            hostname: spec
                .get("hostname")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            netns: super::net::netns_path(&spec),
            guest: adapt(spec, container_dir)?,
        })
    }
}

/// Adapts `config_json` for a container whose directory in the guest is `container_dir`
/// (its rootfs is `<container_dir>/rootfs`).
#[cfg(test)]
pub fn guest_spec(config_json: &[u8], container_dir: &str) -> Result<GuestSpec, String> {
    let spec: Value =
        serde_json::from_slice(config_json).map_err(|e| format!("config.json: {e}"))?;
    adapt(spec, container_dir)
}

fn adapt(mut spec: Value, container_dir: &str) -> Result<GuestSpec, String> {
    let obj = spec
        .as_object_mut()
        .ok_or("config.json is not a JSON object")?;
    if obj.get("process").is_some_and(|p| !p.is_object()) {
        return Err("config.json: `process` is not an object".into());
    }
    obj.remove("hooks");
    let readonly = obj
        .get("root")
        .and_then(|r| r.get("readonly"))
        .cloned()
        .unwrap_or(Value::Bool(false));
    obj.insert(
        "root".into(),
        serde_json::json!({"path": format!("{container_dir}/rootfs"), "readonly": readonly}),
    );
    if let Some(process) = obj.get_mut("process").and_then(Value::as_object_mut) {
        process.remove("apparmorProfile");
        process.remove("selinuxLabel");
    }

    let mut binds = Vec::new();
    let mut mountpoints = Vec::new();
    if let Some(mounts) = obj.get_mut("mounts").and_then(Value::as_array_mut) {
        for m in mounts.iter_mut() {
            let dest = m.get("destination").and_then(Value::as_str).unwrap_or("");
            let source = m.get("source").and_then(Value::as_str);
            let bind_source = source.filter(|_| is_bind(m)).map(str::to_string);
            mountpoints.push((dest.to_string(), bind_source));
        }
        for m in mounts.iter_mut().filter(|m| is_bind(m)) {
            let Some(source) = m.get("source").and_then(Value::as_str) else {
                continue;
            };
            if !source.starts_with('/') {
                return Err(format!("bind mount source {source:?} is not absolute"));
            }
            let options: Vec<String> = m
                .get("options")
                .and_then(Value::as_array)
                .map(|o| {
                    o.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            let flags = super::mount::parse_options(&options).flags;
            let target = format!("mounts/{}", binds.len());
            binds.push(HostBind {
                source: source.to_string(),
                target: target.clone(),
                recursive: flags & libc::MS_REC != 0,
                readonly: flags & libc::MS_RDONLY != 0,
            });
            m["source"] = Value::String(format!("{container_dir}/{target}"));
        }
    }

    let mut drop_hostname = false;
    if let Some(linux) = obj.get_mut("linux").and_then(Value::as_object_mut) {
        linux.remove("mountLabel");
        if let Some(nss) = linux.get_mut("namespaces").and_then(Value::as_array_mut) {
            nss.retain(|ns| {
                let joined = ns
                    .get("path")
                    .and_then(Value::as_str)
                    .is_some_and(|p| !p.is_empty());
                let typ = ns.get("type").and_then(Value::as_str).unwrap_or("");
                typ != "network" && !(joined && VM_NAMESPACES.contains(&typ))
            });
            for ns in nss.iter_mut() {
                if let Some(o) = ns.as_object_mut() {
                    o.remove("path");
                }
            }
            if !nss
                .iter()
                .any(|ns| ns.get("type").and_then(Value::as_str) == Some("uts"))
            {
                // The VM's hostname is the pod's; no UTS namespace to set another in.
                drop_hostname = true;
            }
        }
    }
    if drop_hostname {
        obj.remove("hostname");
    }
    let json = serde_json::to_vec(&spec).map_err(|e| e.to_string())?;
    Ok(GuestSpec {
        json,
        binds,
        root_readonly: readonly.as_bool().unwrap_or(false),
        mountpoints,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapts_the_spec_for_the_guest() {
        let spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "hostname": "app",
            "root": {"path": "/run/containerd/io.containerd.runtime.v2.task/default/c/rootfs"},
            "hooks": {"prestart": [{"path": "/usr/bin/host-hook"}]},
            "process": {"args": ["echo"], "apparmorProfile": "cri-containerd.apparmor.d"},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/c/hosts",
                 "options": ["rbind", "ro"]},
                {"destination": "/dev/shm", "source": "/run/c/shm", "options": ["bind"]}
            ],
            "linux": {"mountLabel": "x", "namespaces": [
                {"type": "pid"},
                {"type": "network"},
                {"type": "network", "path": "/var/run/netns/cni-1"},
                {"type": "ipc", "path": "/proc/42/ns/ipc"},
                {"type": "uts", "path": "/proc/42/ns/uts"},
                {"type": "mount"},
                {"type": "cgroup", "path": "/proc/42/ns/cgroup"}
            ]}
        });
        let out = guest_spec(
            &serde_json::to_vec(&spec).unwrap(),
            "/run/podvisor/shared/c",
        )
        .unwrap();
        assert_eq!(
            out.binds,
            vec![
                HostBind {
                    source: "/var/lib/c/hosts".into(),
                    target: "mounts/0".into(),
                    recursive: true,
                    readonly: true,
                },
                HostBind {
                    source: "/run/c/shm".into(),
                    target: "mounts/1".into(),
                    recursive: false,
                    readonly: false,
                },
            ]
        );
        let out: Value = serde_json::from_slice(&out.json).unwrap();
        assert_eq!(out["root"]["path"], "/run/podvisor/shared/c/rootfs");
        assert_eq!(out["root"]["readonly"], false);
        assert!(out.get("hooks").is_none());
        assert!(
            out.get("hostname").is_none(),
            "no UTS namespace left to set it in"
        );
        assert!(out["process"].get("apparmorProfile").is_none());
        assert!(out["linux"].get("mountLabel").is_none());
        assert_eq!(out["mounts"][0]["source"], "proc");
        assert_eq!(
            out["mounts"][1]["source"],
            "/run/podvisor/shared/c/mounts/0"
        );
        assert_eq!(out["mounts"][1]["options"][1], "ro");
        assert_eq!(
            out["mounts"][2]["source"],
            "/run/podvisor/shared/c/mounts/1"
        );
        let nss: Vec<Value> = out["linux"]["namespaces"].as_array().unwrap().clone();
        assert_eq!(
            nss,
            vec![
                serde_json::json!({"type": "pid"}),
                serde_json::json!({"type": "mount"}),
                serde_json::json!({"type": "cgroup"}),
            ]
        );
    }

    #[test]
    fn rejects_malformed_specs() {
        assert!(guest_spec(b"[]", "/x").is_err());
        assert!(guest_spec(b"{", "/x").is_err());
        assert!(guest_spec(br#"{"process": 3}"#, "/x").is_err());
        let rel = br#"{"mounts": [{"destination": "/a", "type": "bind", "source": "rel"}]}"#;
        assert!(guest_spec(rel, "/x").unwrap_err().contains("not absolute"));
    }
}
