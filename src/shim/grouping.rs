//! Which pod a container belongs to, read from its OCI spec's annotations.
//!
//! Containers of one pod share one shim process and one VM. containerd asks every new
//! container's shim binary for an address (`start`); the shim answers with the socket of the
//! pod's group, so the first container of a pod starts the shim and the others reach it:
//! - Kubernetes (CRI): `io.kubernetes.cri.sandbox-id` names the pod; the pod's first
//!   container is its sandbox container (`io.kubernetes.cri.container-type=sandbox`), which
//!   brings up the VM and runs nothing in it;
//! - `ctr` and other clients: `io.podvisor.sandbox-id=<pod>` on every container of the pod;
//! - neither: the container is a pod of its own.

use std::collections::HashMap;
use std::path::Path;

/// CRI: the pod (sandbox) id of a container.
pub const CRI_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// CRI: `sandbox` for the pod's sandbox container, `container` for the others.
pub const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// podvisor's own pod grouping for clients without CRI (`ctr run --annotation`).
pub const PODVISOR_SANDBOX_ID: &str = "io.podvisor.sandbox-id";

/// The annotations of the bundle's `config.json` (empty when it cannot be read).
pub fn bundle_annotations(bundle: &Path) -> HashMap<String, String> {
    super::spec::load(bundle)
        .map(|s| super::spec::annotations(&s))
        .unwrap_or_default()
}

/// The pod a container belongs to: CRI's sandbox id, then ours, then the container itself.
pub fn pod_id(container_id: &str, annotations: &HashMap<String, String>) -> String {
    [CRI_SANDBOX_ID, PODVISOR_SANDBOX_ID]
        .iter()
        .filter_map(|k| annotations.get(*k))
        .find(|v| valid_id(v))
        .cloned()
        .unwrap_or_else(|| container_id.to_string())
}

/// Whether the container is a CRI sandbox container (the pod itself: no process in the VM).
pub fn is_sandbox_container(annotations: &HashMap<String, String>) -> bool {
    annotations
        .get(CRI_CONTAINER_TYPE)
        .is_some_and(|t| t == "sandbox")
}

/// An id usable as a directory name and in socket paths.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Annotations from (key, value) pairs, for tests.
#[cfg(test)]
pub fn ann(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_by_cri_then_podvisor_then_own_id() {
        assert_eq!(pod_id("c1", &ann(&[])), "c1");
        assert_eq!(pod_id("c1", &ann(&[(PODVISOR_SANDBOX_ID, "pod")])), "pod");
        assert_eq!(
            pod_id(
                "c1",
                &ann(&[(PODVISOR_SANDBOX_ID, "pod"), (CRI_SANDBOX_ID, "cri")])
            ),
            "cri"
        );
        // An id that cannot name a directory is ignored.
        assert_eq!(pod_id("c1", &ann(&[(PODVISOR_SANDBOX_ID, "../x")])), "c1");
    }

    #[test]
    fn reads_annotations_and_sandbox_type() {
        let dir = std::env::temp_dir().join(format!("podvisor-grouping-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let spec = serde_json::json!({"annotations": {CRI_CONTAINER_TYPE: "sandbox"}});
        std::fs::write(dir.join("config.json"), spec.to_string()).unwrap();
        let a = bundle_annotations(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(is_sandbox_container(&a));
        assert!(!is_sandbox_container(&ann(&[(
            CRI_CONTAINER_TYPE,
            "container"
        )])));
        assert!(bundle_annotations(Path::new("/nonexistent")).is_empty());
    }

    #[test]
    fn validates_ids() {
        assert!(valid_id("abc-1_2.3"));
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(129)] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }
}
