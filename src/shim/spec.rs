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
//!   the VM's own, shared by the pod's containers, so the entry is dropped; PID joins the
//!   pod's PID namespace in the VM (the agent makes it: [`POD_PID_NAMESPACE`]); any other
//!   kind becomes a new namespace;
//! - every container gets a cgroup namespace of its own (the guest is cgroup v2, where
//!   containerd gives one; on a cgroup v1 host it does not);
//! - hooks (host binaries), AppArmor/SELinux labels (host LSMs) are dropped;
//! - mount propagation is the host's business: a HostToContainer bind (`rslave`) is bound
//!   into the share as a slave of its source ([`HostBind::follow_host`]), and the guest
//!   sees the host's later mounts below it through virtio-fs; the guest mount and the
//!   rootfs lose their propagation options (the guest has no host mounts to follow).
//!
//! Refused: a spec without a network, PID or IPC namespace entry asks to share the host's
//! (Kubernetes' `hostNetwork`, `hostPID`, `hostIPC`). A VM has its own kernel and cannot
//! share those with the host; running the container with the VM's instead would silently
//! break what the pod asked for, so Create fails with [`SpecError::HostNamespace`]. So does
//! Bidirectional mount propagation (`rshared`, [`SpecError::Bidirectional`]): a mount made
//! in the guest cannot become a host mount.
//!
//! The agent sets `linux.cgroupsPath` itself.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceType, Mount, Root, Spec};
use podvisor_agent_protocol::POD_PID_NAMESPACE;

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
    /// HostToContainer propagation (`rslave`/`slave`): the host bind is a slave of the
    /// source, so mounts the host makes below it later reach the guest through the share.
    pub follow_host: bool,
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

/// A bundle's `config.json`, read once: what the shim itself needs of it and the spec
/// adapted for the guest.
#[derive(Debug)]
pub struct BundleSpec {
    pub annotations: HashMap<String, String>,
    /// The spec's hostname (empty when it sets none).
    pub hostname: String,
    /// The network namespace the spec joins (a CRI sandbox's pod network).
    pub netns: Option<PathBuf>,
    /// `linux.cgroupsPath`: the pod's host cgroup, for a sandbox's spec.
    pub cgroups_path: Option<String>,
    /// `linux.resources`' memory and CPU limits.
    pub limits: crate::pod::ContainerLimits,
    /// `linux.sysctl`: for a sandbox's spec, the pod's kernel parameters (the VM's).
    pub sysctls: HashMap<String, String>,
    pub guest: GuestSpec,
}

/// Why a bundle's spec cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("bundle {path}: {source}")]
    Read {
        path: PathBuf,
        source: oci_spec::OciSpecError,
    },
    #[error("config.json: {0}")]
    Parse(serde_json::Error),
    #[error("config.json: bind mount source {0:?} is not absolute")]
    RelativeBind(PathBuf),
    #[error("config.json: {0}")]
    Serialize(serde_json::Error),
    #[error(
        "config.json: linux.namespaces has no {kind} namespace, so the container would share \
         the host's (Kubernetes: {field}: true); a podvisor pod runs in its own VM, which \
         cannot share the host's {kind} namespace: drop {field}, or run this pod with a \
         RuntimeClass of a container runtime such as runc"
    )]
    HostNamespace {
        kind: &'static str,
        field: &'static str,
    },
    #[error(
        "config.json: mount {destination} asks for Bidirectional mount propagation ({option}): \
         mounts made inside a podvisor pod's VM cannot reach the host; use HostToContainer \
         (rslave) or None, or run this pod with a RuntimeClass of a container runtime such \
         as runc"
    )]
    Bidirectional { destination: String, option: String },
}

/// Mount options that ask for shared (Bidirectional) propagation.
const SHARED_OPTIONS: [&str; 2] = ["shared", "rshared"];
/// Mount options that ask for slave (HostToContainer) propagation.
const SLAVE_OPTIONS: [&str; 2] = ["slave", "rslave"];

/// Namespaces a container in a VM always has of its own: (type, its name, the Kubernetes
/// field that asks for the host's instead).
const OWN_NAMESPACES: [(LinuxNamespaceType, &str, &str); 3] = [
    (LinuxNamespaceType::Network, "network", "hostNetwork"),
    (LinuxNamespaceType::Pid, "pid", "hostPID"),
    (LinuxNamespaceType::Ipc, "ipc", "hostIPC"),
];

/// Refuses a spec that shares the host's network, PID or IPC namespace.
fn check_own_namespaces(spec: &Spec) -> Result<(), SpecError> {
    let listed = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .map(|nss| nss.iter().map(|ns| ns.typ()).collect::<Vec<_>>())
        .unwrap_or_default();
    match OWN_NAMESPACES
        .iter()
        .find(|(typ, _, _)| !listed.contains(typ))
    {
        Some(&(_, kind, field)) => Err(SpecError::HostNamespace { kind, field }),
        None => Ok(()),
    }
}

/// Reads `<bundle>/config.json`.
pub fn load(bundle: &Path) -> Result<Spec, SpecError> {
    let path = bundle.join("config.json");
    Spec::load(&path).map_err(|source| SpecError::Read { path, source })
}

/// The spec's annotations (empty when it has none).
pub fn annotations(spec: &Spec) -> HashMap<String, String> {
    spec.annotations().clone().unwrap_or_default()
}

/// `linux.cgroupsPath`, when set.
pub fn cgroups_path(spec: &Spec) -> Option<String> {
    spec.linux()
        .as_ref()?
        .cgroups_path()
        .as_ref()
        .map(|p| p.to_string_lossy().into_owned())
        .filter(|p| !p.is_empty())
}

/// The network namespace path a spec joins (`linux.namespaces`, type `network`, with a
/// non-empty `path`), as the CRI sandbox container's spec has it.
pub fn netns_path(spec: &Spec) -> Option<PathBuf> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .filter(|ns| ns.typ() == LinuxNamespaceType::Network)
        .find_map(|ns| ns.path().clone())
        .filter(|p| !p.as_os_str().is_empty())
}

impl BundleSpec {
    /// Reads `<bundle>/config.json` for a container whose directory in the guest is
    /// `container_dir`.
    pub fn read(bundle: &Path, container_dir: &str) -> Result<BundleSpec, SpecError> {
        let spec = load(bundle)?;
        Ok(BundleSpec {
            annotations: annotations(&spec),
            hostname: spec.hostname().clone().unwrap_or_default(),
            netns: netns_path(&spec),
            cgroups_path: cgroups_path(&spec),
            limits: crate::pod::ContainerLimits::of(
                spec.linux().as_ref().and_then(|l| l.resources().as_ref()),
            ),
            sysctls: spec
                .linux()
                .as_ref()
                .and_then(|l| l.sysctl().clone())
                .unwrap_or_default(),
            guest: adapt(spec, container_dir)?,
        })
    }
}

/// Whether a namespace entry joins an existing namespace (a non-empty `path`).
fn joins(ns: &LinuxNamespace) -> bool {
    ns.path()
        .as_ref()
        .is_some_and(|p| !p.as_os_str().is_empty())
}

/// Namespaces a pod's containers share as the VM's own when the spec joins the sandbox's.
const VM_NAMESPACES: [LinuxNamespaceType; 2] = [LinuxNamespaceType::Uts, LinuxNamespaceType::Ipc];

fn is_bind(mount: &Mount) -> bool {
    mount.typ().as_deref() == Some("bind")
        || mount
            .options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

/// Adapts `config_json` for a container whose directory in the guest is `container_dir`
/// (its rootfs is `<container_dir>/rootfs`).
#[cfg(test)]
pub fn guest_spec(config_json: &[u8], container_dir: &str) -> Result<GuestSpec, SpecError> {
    let spec: Spec = serde_json::from_slice(config_json).map_err(SpecError::Parse)?;
    adapt(spec, container_dir)
}

fn adapt(mut spec: Spec, container_dir: &str) -> Result<GuestSpec, SpecError> {
    check_own_namespaces(&spec)?;
    spec.set_hooks(None);
    let readonly = spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false);
    let mut root = Root::default();
    root.set_path(PathBuf::from(format!("{container_dir}/rootfs")));
    root.set_readonly(Some(readonly));
    spec.set_root(Some(root));
    if let Some(process) = spec.process_mut() {
        process.set_apparmor_profile(None);
        process.set_selinux_label(None);
    }

    let mut binds = Vec::new();
    let mut mountpoints = Vec::new();
    for m in spec.mounts_mut().iter_mut().flatten() {
        let bind = is_bind(m);
        let source = m.source().clone();
        let bind_source = source
            .as_ref()
            .filter(|_| bind)
            .map(|s| s.to_string_lossy().into_owned());
        mountpoints.push((m.destination().to_string_lossy().into_owned(), bind_source));
        let Some(source) = source.filter(|_| bind) else {
            continue;
        };
        if !source.is_absolute() {
            return Err(SpecError::RelativeBind(source));
        }
        let mut options = m.options().clone().unwrap_or_default();
        if let Some(shared) = options
            .iter()
            .find(|o| SHARED_OPTIONS.contains(&o.as_str()))
        {
            return Err(SpecError::Bidirectional {
                destination: m.destination().to_string_lossy().into_owned(),
                option: shared.clone(),
            });
        }
        let follow_host = options.iter().any(|o| SLAVE_OPTIONS.contains(&o.as_str()));
        options.retain(|o| !SLAVE_OPTIONS.contains(&o.as_str()));
        let flags = super::mount::parse_options(&options).flags;
        m.set_options(Some(options));
        let target = format!("mounts/{}", binds.len());
        m.set_source(Some(PathBuf::from(format!("{container_dir}/{target}"))));
        binds.push(HostBind {
            source: source.to_string_lossy().into_owned(),
            target,
            recursive: flags & libc::MS_REC != 0,
            readonly: flags & libc::MS_RDONLY != 0,
            follow_host,
        });
    }

    let mut drop_hostname = false;
    if let Some(linux) = spec.linux_mut() {
        linux.set_mount_label(None);
        let propagation = linux.rootfs_propagation().clone().unwrap_or_default();
        if SHARED_OPTIONS.contains(&propagation.as_str()) {
            return Err(SpecError::Bidirectional {
                destination: "/ (linux.rootfsPropagation)".into(),
                option: propagation,
            });
        }
        if SLAVE_OPTIONS.contains(&propagation.as_str()) {
            linux.set_rootfs_propagation(None);
        }
        if let Some(nss) = linux.namespaces_mut() {
            nss.retain(|ns| {
                ns.typ() != LinuxNamespaceType::Network
                    && !(joins(ns) && VM_NAMESPACES.contains(&ns.typ()))
            });
            for ns in nss.iter_mut() {
                // Joining the sandbox's PID namespace is the pod's shared one in the VM.
                let pod_pid = joins(ns) && ns.typ() == LinuxNamespaceType::Pid;
                ns.set_path(pod_pid.then(|| PathBuf::from(POD_PID_NAMESPACE)));
            }
            // A private cgroup namespace, as containerd gives containers on cgroup v2 hosts
            // (the guest is one whatever the host is): the container sees its own cgroup
            // as the root of /sys/fs/cgroup, with its own limits.
            if !nss.iter().any(|ns| ns.typ() == LinuxNamespaceType::Cgroup) {
                let mut cgroup = LinuxNamespace::default();
                cgroup.set_typ(LinuxNamespaceType::Cgroup);
                nss.push(cgroup);
            }
            // The VM's hostname is the pod's; no UTS namespace to set another in.
            drop_hostname = !nss.iter().any(|ns| ns.typ() == LinuxNamespaceType::Uts);
        }
    }
    if drop_hostname {
        spec.set_hostname(None);
    }
    let json = serde_json::to_vec(&spec).map_err(SpecError::Serialize)?;
    Ok(GuestSpec {
        json,
        binds,
        root_readonly: readonly,
        mountpoints,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn adapts_the_spec_for_the_guest() {
        let spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "hostname": "app",
            "root": {"path": "/run/containerd/io.containerd.runtime.v2.task/default/c/rootfs"},
            "hooks": {"prestart": [{"path": "/usr/bin/host-hook"}]},
            "process": {"args": ["echo"], "cwd": "/", "user": {"uid": 0, "gid": 0},
                        "apparmorProfile": "cri-containerd.apparmor.d"},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/c/hosts",
                 "options": ["rbind", "ro"]},
                {"destination": "/dev/shm", "source": "/run/c/shm", "options": ["bind"]}
            ],
            "linux": {"mountLabel": "x", "namespaces": [
                {"type": "pid", "path": "/proc/42/ns/pid"},
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
                    follow_host: false,
                },
                HostBind {
                    source: "/run/c/shm".into(),
                    target: "mounts/1".into(),
                    recursive: false,
                    readonly: false,
                    follow_host: false,
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
                serde_json::json!({"type": "pid", "path": POD_PID_NAMESPACE}),
                serde_json::json!({"type": "mount"}),
                serde_json::json!({"type": "cgroup"}),
            ]
        );
    }

    #[test]
    fn rejects_malformed_specs() {
        assert!(guest_spec(b"\"spec\"", "/x").is_err());
        assert!(guest_spec(b"{", "/x").is_err());
        assert!(guest_spec(br#"{"process": 3}"#, "/x").is_err());
        let rel = br#"{"mounts": [{"destination": "/a", "type": "bind", "source": "rel"}],
            "linux": {"namespaces": [{"type": "network"}, {"type": "pid"}, {"type": "ipc"}]}}"#;
        assert!(guest_spec(rel, "/x")
            .unwrap_err()
            .to_string()
            .contains("not absolute"));
    }

    #[test]
    fn host_to_container_binds_follow_the_host_and_bidirectional_is_refused() {
        let with = |options: &[&str], rootfs_propagation: &str| {
            let mut linux = serde_json::json!({"namespaces": [
                {"type": "network"}, {"type": "pid"}, {"type": "ipc"}]});
            if !rootfs_propagation.is_empty() {
                linux["rootfsPropagation"] = rootfs_propagation.into();
            }
            serde_json::to_vec(&serde_json::json!({
                "mounts": [{"destination": "/vol", "type": "bind", "source": "/host/vol",
                            "options": options}],
                "linux": linux,
            }))
            .unwrap()
        };
        let out = guest_spec(&with(&["rbind", "rslave", "rw"], "rslave"), "/c").unwrap();
        assert!(out.binds[0].follow_host && out.binds[0].recursive);
        let json: Value = serde_json::from_slice(&out.json).unwrap();
        assert_eq!(
            json["mounts"][0]["options"],
            serde_json::json!(["rbind", "rw"])
        );
        assert!(json["linux"].get("rootfsPropagation").is_none());
        let out = guest_spec(&with(&["rbind", "rprivate"], ""), "/c").unwrap();
        assert!(!out.binds[0].follow_host);
        for (options, propagation) in [
            (&["rbind", "rshared"][..], "rshared"),
            (&["rbind", "shared"][..], ""),
            (&["rbind"][..], "rshared"),
        ] {
            let err = guest_spec(&with(options, propagation), "/c").unwrap_err();
            assert!(
                matches!(err, SpecError::Bidirectional { .. })
                    && err.to_string().contains("Bidirectional"),
                "{options:?} {propagation}: {err}"
            );
        }
    }

    #[test]
    fn every_container_gets_a_cgroup_namespace() {
        // containerd on a cgroup v1 host lists none; the guest is cgroup v2.
        let spec = br#"{"linux": {"namespaces": [
            {"type": "network"}, {"type": "pid"}, {"type": "ipc"}, {"type": "mount"}]}}"#;
        let out: Value = serde_json::from_slice(&guest_spec(spec, "/c").unwrap().json).unwrap();
        let cgroups: Vec<&Value> = out["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|ns| ns["type"] == "cgroup")
            .collect();
        assert_eq!(cgroups, [&serde_json::json!({"type": "cgroup"})]);
    }

    #[test]
    fn refuses_the_host_namespaces() {
        let with = |types: &[&str]| {
            let nss: Vec<Value> = types
                .iter()
                .map(|t| serde_json::json!({"type": t}))
                .collect();
            serde_json::to_vec(&serde_json::json!({"linux": {"namespaces": nss}})).unwrap()
        };
        assert!(guest_spec(&with(&["network", "pid", "ipc", "mount"]), "/x").is_ok());
        for (types, field) in [
            (&["pid", "ipc", "mount"][..], "hostNetwork"),
            (&["network", "ipc", "mount"][..], "hostPID"),
            (&["network", "pid", "mount"][..], "hostIPC"),
            (&[][..], "hostNetwork"),
        ] {
            let err = guest_spec(&with(types), "/x").unwrap_err().to_string();
            assert!(
                err.contains(field) && err.contains("own VM"),
                "{types:?}: {err}"
            );
        }
        // No linux section at all shares every namespace with the host.
        let err = guest_spec(b"{}", "/x").unwrap_err().to_string();
        assert!(err.contains("hostNetwork"), "{err}");
    }

    #[test]
    fn reads_the_netns_path_of_a_spec() {
        let spec = |v: Value| -> Spec { serde_json::from_value(v).unwrap() };
        let joined = spec(serde_json::json!({"linux": {"namespaces": [
            {"type": "pid"},
            {"type": "network", "path": "/var/run/netns/cni-1234"},
        ]}}));
        assert_eq!(
            netns_path(&joined),
            Some(PathBuf::from("/var/run/netns/cni-1234"))
        );
        for v in [
            serde_json::json!({"linux": {"namespaces": [{"type": "network"}]}}),
            serde_json::json!({"linux": {"namespaces": [{"type": "network", "path": ""}]}}),
            serde_json::json!({"linux": {"namespaces": [{"type": "ipc", "path": "/proc/1/ns/ipc"}]}}),
            serde_json::json!({"linux": {}}),
            serde_json::json!({}),
        ] {
            assert_eq!(netns_path(&spec(v.clone())), None, "{v}");
        }
    }
}
