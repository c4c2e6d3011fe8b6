//! `containerd-shim-podvisor-v2`: containerd's runtime `io.containerd.podvisor.v2`. The shim
//! process serves containerd's task API (v2) over ttrpc and hosts the pod's VM in-process;
//! all of it is the `podvisor-shim` crate.

fn main() {
    podvisor_shim::run();
}
