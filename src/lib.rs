//! The `podvisor` package's library: the containerd shim, shared by the shim binary
//! (`containerd-shim-podvisor-v2`) and the `podvisor` CLI (`podvisor template`, which builds
//! the same pod templates the shim does).

pub mod shim;
