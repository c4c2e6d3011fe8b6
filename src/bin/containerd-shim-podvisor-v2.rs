//! `containerd-shim-podvisor-v2`: containerd's runtime `io.containerd.podvisor.v2`. The shim
//! process serves containerd's task API (v2) over ttrpc and hosts the pod's VM in-process.

use podvisor::shim;

fn main() {
    // No reaper: the shim waits for the only children it has (a binary:// logger) itself,
    // and without SIGCHLD in containerd-shim's signal set, `shim start` cannot hang in a
    // signal storm: it drops its signal-hook iterator on return, closing the iterator's
    // socket before unregistering the handlers; a SIGCHLD in between (from the duplicate
    // daemon a pod's second container spawns, which exits at once) makes the handler send
    // to the closed socket, which raises SIGPIPE, whose handler does the same, forever
    // (seen: `start` at 100% CPU for minutes, containerd waiting on it). No subreaper
    // either: no container process runs on the host.
    let config = containerd_shim::Config {
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    containerd_shim::run::<shim::PodvisorShim>(shim::RUNTIME_ID, Some(config));
}
