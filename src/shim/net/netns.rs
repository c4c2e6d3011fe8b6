//! Running code in another network namespace without moving the caller: each call spawns
//! a dedicated, named thread that `setns`es into the namespace, runs the closure and exits.
//! A namespace switch is per thread, so no other thread of the shim (ttrpc handlers, vCPUs,
//! the VMM event loop) ever runs in the pod's namespace, and the thread that did is gone
//! afterwards. Sockets and fds opened in the thread keep their namespace when they leave it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// A network namespace held open (by its nsfs file): it outlives a CNI `DEL` of its mount
/// until dropped, so a teardown can still reach it.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: String,
}

impl std::os::fd::AsRawFd for Netns {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

impl Netns {
    /// Opens the namespace file at `path` (`/var/run/netns/cni-…`, `/proc/<pid>/ns/net`).
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        Ok(Self {
            file,
            path: path.display().to_string(),
        })
    }

    /// The path it was opened from, for messages.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Runs `f` in a new thread `name` inside this namespace and returns its result.
    pub fn run<T, F>(&self, name: &str, f: F) -> io::Result<T>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        let fd = self.file.as_raw_fd();
        std::thread::scope(|scope| {
            let thread = std::thread::Builder::new()
                .name(name.to_string())
                .spawn_scoped(scope, move || {
                    // SAFETY: fd is an open nsfs file borrowed for the scope; setns only
                    // changes this thread's namespace.
                    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(f())
                })?;
            thread
                .join()
                .map_err(|_| io::Error::other(format!("thread {name} panicked")))?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_in_the_namespace_and_leaves_the_caller_alone() {
        let own = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        let ns = Netns::open(Path::new("/proc/self/ns/net")).unwrap();
        let inside = ns
            .run("netns-test", || {
                std::fs::read_link("/proc/thread-self/ns/net").unwrap()
            })
            .unwrap();
        assert_eq!(inside, own);
        assert_eq!(std::fs::read_link("/proc/thread-self/ns/net").unwrap(), own);
        assert!(Netns::open(Path::new("/nonexistent/netns")).is_err());
    }
}
