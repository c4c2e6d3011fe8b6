//! `containerd-shim-podvisor-v2`: containerd's runtime `io.containerd.podvisor.v2`. The shim
//! process serves containerd's task API (v2) over ttrpc and hosts the pod's VM in-process.

use podvisor::shim;

fn main() {
    containerd_shim::run::<shim::PodvisorShim>(shim::RUNTIME_ID, None);
}
