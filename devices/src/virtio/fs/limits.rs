//! Bounds on what a guest can make a share hold open on the host.
//!
//! `PassthroughFs` keeps an `O_PATH` fd for every inode the guest has looked up and not yet
//! forgotten, and an fd for every open handle. The guest decides both counts, and the fds
//! come from the VMM process's table, which also holds containerd's ttrpc sockets, vsock
//! streams and guest memory. So a share admits at most [`FsLimits::max_inodes`] live inodes
//! and [`FsLimits::max_handles`] open handles: past them, a request that would pin one more
//! fails with `ENFILE` (the back end's reference is given back at once), and the guest can
//! go on once it forgets or releases some.
//!
//! [`Live`] mirrors the FUSE reference counts the guest holds: one per entry returned
//! (lookup, create, mkdir, mknod, symlink, link, each READDIRPLUS entry), minus what FORGET
//! and BATCH_FORGET give back; a handle from OPEN, OPENDIR or CREATE until RELEASE or
//! RELEASEDIR.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

/// A share's caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsLimits {
    /// Inodes the guest may hold looked up at once.
    pub max_inodes: usize,
    /// Files and directories the guest may hold open at once.
    pub max_handles: usize,
}

impl Default for FsLimits {
    fn default() -> Self {
        Self {
            max_inodes: 1 << 16,
            max_handles: 1 << 14,
        }
    }
}

impl FsLimits {
    /// File descriptors a share with these limits may hold at most.
    pub fn fds(&self) -> u64 {
        (self.max_inodes + self.max_handles) as u64
    }
}

/// The references the guest holds (see the module documentation).
#[derive(Debug, Default)]
pub struct Live {
    inodes: HashMap<u64, u64>,
    handles: HashSet<u64>,
}

impl Live {
    /// Records one more reference to `inode`; `false` (nothing recorded) when it is a new
    /// inode and `max` are live already.
    pub fn add_inode(&mut self, inode: u64, max: usize) -> bool {
        if let Some(n) = self.inodes.get_mut(&inode) {
            *n += 1;
            return true;
        }
        if self.inodes.len() >= max {
            return false;
        }
        self.inodes.insert(inode, 1);
        true
    }

    /// Gives back `count` references to `inode`.
    pub fn forget(&mut self, inode: u64, count: u64) {
        if let Some(n) = self.inodes.get_mut(&inode) {
            *n = n.saturating_sub(count);
            if *n == 0 {
                self.inodes.remove(&inode);
            }
        }
    }

    /// Records an open handle; `false` when `max` are open already.
    pub fn add_handle(&mut self, handle: u64, max: usize) -> bool {
        if self.handles.len() >= max && !self.handles.contains(&handle) {
            return false;
        }
        self.handles.insert(handle);
        true
    }

    pub fn release(&mut self, handle: u64) {
        self.handles.remove(&handle);
    }

    pub fn inodes(&self) -> usize {
        self.inodes.len()
    }

    pub fn handles(&self) -> usize {
        self.handles.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_references_and_caps_new_inodes_and_handles() {
        let mut l = Live::default();
        assert!(l.add_inode(10, 2));
        assert!(l.add_inode(10, 2), "an existing inode is always admitted");
        assert!(l.add_inode(11, 2));
        assert!(!l.add_inode(12, 2), "a third inode is over the cap");
        l.forget(10, 1);
        assert!(!l.add_inode(12, 2), "10 still has a reference");
        l.forget(10, 1);
        assert!(l.add_inode(12, 2));
        assert_eq!(l.inodes(), 2);
        l.forget(99, 5); // unknown: nothing
        assert!(l.add_handle(1, 1));
        assert!(!l.add_handle(2, 1));
        l.release(1);
        assert!(l.add_handle(2, 1));
        assert_eq!(l.handles(), 1);
    }
}
