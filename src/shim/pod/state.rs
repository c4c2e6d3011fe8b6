//! Where a pod's host state lives: `<run dir>/<pod id>/` with the VM's vsock socket, its
//! console log and the pod share (`super::super::share`), and how the guest names the share.

use std::path::{Path, PathBuf};

use crate::share::{self, PodShare, ShareError};

/// virtio-fs tag of the pod's share.
pub const SHARE_TAG: &str = "podvisor";
/// Where the agent mounts the share in the guest.
pub const SHARED_IN_GUEST: &str = "/run/podvisor/shared";

/// Host paths of a pod's state.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub root: PathBuf,
}

impl StateDir {
    /// The virtio-fs root: the guest's read-only view of the pod's share.
    pub fn shared(&self) -> PathBuf {
        PodShare::view_dir(&self.root)
    }
    pub fn vsock(&self) -> PathBuf {
        self.root.join("vsock.sock")
    }
    pub fn console(&self) -> PathBuf {
        self.root.join("console.log")
    }
    /// The pod's start timeline, written once it has its first output
    /// (`crate::timeline`).
    pub fn timeline(&self) -> PathBuf {
        self.root.join("timeline.json")
    }
    /// A container's directory in the share as the guest sees it.
    pub fn container_in_guest(id: &str) -> String {
        format!("{SHARED_IN_GUEST}/{id}")
    }
}

/// Removes a pod's host state: unmounts what is mounted below it, then deletes it without
/// crossing a mount (logged when it fails).
pub fn cleanup_state_dir(dir: &Path) -> Result<(), ShareError> {
    share::remove_pod_dir(dir).inspect_err(|e| {
        log::warn!("remove the pod state {}: {e}", dir.display());
    })
}
