//! Host tier, as root: replays of a hostile guest against the pod share's host side.
//!
//! The "guest" is the host-side FUSE client driving the real virtio-fs device (through the
//! virtio-mmio transport) over the pod's share, as guest root would after mounting the
//! `podvisor` tag; the host side is the shim's `PodShare`, as Create and Delete use it. Each
//! test replays one attack of the review: symlinks planted where the shim mounts, renames
//! and deep moves before the shim unmounts and deletes, writes to read-only volumes and a
//! setuid file, and a race of all of these against 1,000 container set-ups.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

mod common;

use common::containerd::mounts_below;
use devices::virtio::fs::test_client::FuseClient;
use devices::virtio::fs::{Fs, ShareConfig, ShareOptions};
use podvisor_shim::share::{self, PodShare, RootfsMount, ShareError};

const ROOT: u64 = 1;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipped: the share's mounts need root");
            return;
        }
    };
}

/// A pod dir in a fresh run dir, a host "outside" dir with a sentinel, and a volume.
struct Pod {
    base: PathBuf,
    run_dir: PathBuf,
    root: PathBuf,
    outside: PathBuf,
    volume: PathBuf,
}

impl Pod {
    fn new(name: &str) -> Pod {
        let base = std::env::temp_dir().join(format!("pv-share-{name}-{}", std::process::id()));
        let _ = share::remove_pod_dir(&base);
        let run_dir = base.join("run");
        let root = run_dir.join("pod");
        let outside = base.join("outside");
        let volume = base.join("volume");
        for d in [&outside, &volume] {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join("sentinel"), "keep me").unwrap();
        }
        share::create_pod_dir(&run_dir, &root).unwrap();
        Pod {
            base,
            run_dir,
            root,
            outside,
            volume,
        }
    }

    fn guest(&self) -> FuseClient {
        let config = ShareConfig::new(
            "podvisor",
            PodShare::view_dir(&self.root),
            ShareOptions::default(),
        )
        .unwrap();
        let mut c = FuseClient::new(Fs::new(config).unwrap());
        c.init();
        c
    }

    /// The outside dir holds only its sentinel, unchanged, and nothing is mounted on it.
    fn assert_outside_untouched(&self) {
        let names: Vec<_> = std::fs::read_dir(&self.outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["sentinel"], "files appeared outside the pod");
        assert_eq!(
            std::fs::read_to_string(self.outside.join("sentinel")).unwrap(),
            "keep me"
        );
        assert_eq!(mounts_below(&self.outside), Vec::<String>::new());
    }

    fn assert_volume_alive(&self) {
        assert_eq!(
            std::fs::read_to_string(self.volume.join("sentinel")).unwrap(),
            "keep me",
            "the volume's data was deleted through its mount"
        );
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        share::unmount_below(&self.base);
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

fn lookup(c: &mut FuseClient, path: &str) -> u64 {
    path.split('/').fold(ROOT, |node, name| {
        c.lookup(node, name)
            .unwrap_or_else(|e| panic!("guest lookup {path}: errno {e}"))
            .nodeid
    })
}

#[test]
fn the_guest_cannot_change_the_skeleton_the_shim_mounts_into() {
    require_root!();
    let pod = Pod::new("plant");
    let share = PodShare::create(&pod.root).unwrap();
    let mut g = pod.guest();
    let outside = pod.outside.to_string_lossy().into_owned();
    // Before the host creates container c2: plant c2 itself, as a symlink or a directory
    // holding symlinks named like the shim's targets.
    assert_eq!(g.symlink(ROOT, "c2", &outside).unwrap_err(), libc::EROFS);
    assert_eq!(g.mkdir(ROOT, "c2", 0o755).unwrap_err(), libc::EROFS);
    share.add_container("c2").unwrap();
    // After it: replace c2/mounts and c2/rootfs with symlinks to the outside.
    let c2 = lookup(&mut g, "c2");
    for name in ["mounts", "rootfs"] {
        assert_eq!(g.rename(c2, name, c2, "old").unwrap_err(), libc::EROFS);
        assert_eq!(g.rmdir(c2, name).unwrap_err(), libc::EROFS);
        assert_eq!(g.symlink(c2, "new", &outside).unwrap_err(), libc::EROFS);
    }
    let mounts = lookup(&mut g, "c2/mounts");
    assert_eq!(g.symlink(mounts, "0", &outside).unwrap_err(), libc::EROFS);
    assert_eq!(
        g.create(mounts, "0", libc::O_WRONLY as u32, 0o644)
            .unwrap_err(),
        libc::EROFS
    );
    // The host's mounts land in the pod, not outside.
    share
        .mount_rootfs("c2", &[], &pod.volume, false, &[])
        .unwrap();
    share
        .bind("c2", 0, &pod.volume, false, false, false)
        .unwrap();
    pod.assert_outside_untouched();
    let view = share.container_view("c2");
    assert_eq!(
        mounts_below(&view),
        [
            view.join("rootfs").display().to_string(),
            view.join("mounts/0").display().to_string()
        ]
    );
    // The guest writes inside a rw leaf mount.
    let vol = lookup(&mut g, "c2/mounts/0");
    let (e, o) = g
        .create(vol, "from-guest", libc::O_WRONLY as u32, 0o644)
        .unwrap();
    g.write(e.nodeid, o.fh, 0, b"hi").unwrap();
    g.release(e.nodeid, o.fh, false).unwrap();
    assert_eq!(
        std::fs::read_to_string(pod.volume.join("from-guest")).unwrap(),
        "hi"
    );
    drop(g);
    share.remove_container("c2").unwrap();
    pod.assert_volume_alive();
    assert!(!PodShare::skel_dir(&pod.root).join("c2").exists());
    assert_eq!(mounts_below(&view), Vec::<String>::new());
    drop(share);
    share::remove_pod_dir(&pod.root).unwrap();
    assert!(!pod.root.exists());
    assert_eq!(mounts_below(&pod.base), Vec::<String>::new());
}

#[test]
fn symlinks_in_the_skeleton_fail_the_mount_instead_of_following() {
    require_root!();
    // Defence in depth: were the skeleton ever changed (it is host-only), the shim still
    // neither creates nor mounts through a symlink.
    let pod = Pod::new("symlink");
    let share = PodShare::create(&pod.root).unwrap();
    share.add_container("c2").unwrap();
    let skel = PodShare::skel_dir(&pod.root).join("c2");
    for name in ["mounts", "rootfs"] {
        std::fs::remove_dir(skel.join(name)).unwrap();
        std::os::unix::fs::symlink(&pod.outside, skel.join(name)).unwrap();
    }
    let err = share
        .bind("c2", 0, &pod.volume, true, false, false)
        .unwrap_err();
    assert!(matches!(err, ShareError::Io { .. }), "{err}");
    let err = share
        .mount_rootfs("c2", &[], &pod.volume, false, &[])
        .unwrap_err();
    assert!(matches!(err, ShareError::Io { .. }), "{err}");
    let overlay = RootfsMount {
        fstype: "tmpfs".into(),
        source: "tmpfs".into(),
        options: vec![],
    };
    assert!(share
        .mount_rootfs("c2", &[overlay], &pod.volume, false, &[])
        .is_err());
    pod.assert_outside_untouched();
    // Removal unlinks the symlinks, never what they point to.
    share.remove_container("c2").unwrap();
    pod.assert_outside_untouched();
}

#[test]
fn read_only_binds_and_rootfs_are_read_only_on_the_host_and_nothing_is_setuid() {
    require_root!();
    let pod = Pod::new("ro");
    // A submount in the volume: `rbind` + `ro` must make it read-only too.
    let sub = pod.volume.join("sub");
    std::fs::create_dir_all(&sub).unwrap();
    let tmpfs = std::ffi::CString::new(sub.to_string_lossy().as_bytes()).unwrap();
    // SAFETY: valid C strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            tmpfs.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "mount a tmpfs: {}", std::io::Error::last_os_error());
    let share = PodShare::create(&pod.root).unwrap();
    share.add_container("c").unwrap();
    // The rootfs (an image can hold any symlink): its missing mount points are made before
    // it turns read-only, never through a symlink.
    let image = pod.base.join("image");
    std::fs::create_dir_all(image.join("etc")).unwrap();
    std::os::unix::fs::symlink(&pod.outside, image.join("escape")).unwrap();
    let points = [
        ("/etc/hosts".to_string(), false),
        ("/data/vol".to_string(), true),
        ("/escape/x".to_string(), true),
        ("/etc/../../x".to_string(), true),
    ];
    share.mount_rootfs("c", &[], &image, true, &points).unwrap();
    assert!(image.join("etc/hosts").is_file());
    assert!(image.join("data/vol").is_dir());
    pod.assert_outside_untouched();
    share.bind("c", 0, &pod.volume, true, true, false).unwrap();
    share
        .bind("c", 1, &pod.volume, false, false, false)
        .unwrap();
    let mut g = pod.guest();
    let erofs = Err(libc::EROFS);
    for dir in ["c/rootfs", "c/rootfs/etc", "c/mounts/0", "c/mounts/0/sub"] {
        let node = lookup(&mut g, dir);
        assert_eq!(
            g.mkdir(node, "x", 0o755).map(drop),
            erofs,
            "{dir} is read-only"
        );
    }
    // The writable volume: a setuid file and a device node the guest makes there are inert
    // on the host (nosuid, nodev).
    let rw = lookup(&mut g, "c/mounts/1");
    let (e, o) = g.create(rw, "suid", libc::O_WRONLY as u32, 0o4755).unwrap();
    g.release(e.nodeid, o.fh, false).unwrap();
    let host = share.container_view("c").join("mounts/1");
    assert_eq!(
        std::fs::metadata(host.join("suid")).unwrap().mode() & 0o4000,
        0o4000
    );
    for dir in [host.clone(), share.container_view("c").join("rootfs")] {
        let st = rustix::fs::statvfs(&dir).unwrap();
        assert!(
            st.f_flag.contains(rustix::fs::StatVfsMountFlags::NOSUID)
                && st.f_flag.contains(rustix::fs::StatVfsMountFlags::NODEV),
            "{} is not nosuid,nodev: {:?}",
            dir.display(),
            st.f_flag
        );
    }
    let view = rustix::fs::statvfs(PodShare::view_dir(&pod.root)).unwrap();
    assert!(view.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY));
    drop(g);
    share.remove_container("c").unwrap();
    drop(share);
    share::remove_pod_dir(&pod.root).unwrap();
    share::unmount_below(&sub);
    pod.assert_volume_alive();
}

/// `mount(2)` with C strings made here; panics with the errno on failure.
fn sys_mount(source: &str, target: &Path, fstype: &str, flags: libc::c_ulong, data: &str) {
    let c = |s: &str| std::ffi::CString::new(s).unwrap();
    let (source, target) = (c(source), c(&target.to_string_lossy()));
    let (fstype, data) = (c(fstype), c(data));
    // SAFETY: valid C strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    assert_eq!(
        rc,
        0,
        "mount {target:?}: {}",
        std::io::Error::last_os_error()
    );
}

#[test]
fn a_host_to_container_volume_shows_the_hosts_later_mounts_to_the_guest() {
    require_root!();
    // CRI's HostToContainer (rslave): the volume's host source is a shared mount; a mount
    // the host makes below it after the container started reaches the guest through the
    // share. A private bind of the same volume does not see it, and guest-side mounts never
    // become host mounts (the guest has no way to make one).
    let pod = Pod::new("rslave");
    let sub = pod.volume.join("sub");
    std::fs::create_dir(&sub).unwrap();
    let volume = pod.volume.to_string_lossy().into_owned();
    sys_mount(&volume, &pod.volume, "", libc::MS_BIND, "");
    sys_mount("", &pod.volume, "", libc::MS_SHARED | libc::MS_REC, "");
    let share = PodShare::create(&pod.root).unwrap();
    share.add_container("c").unwrap();
    share.bind("c", 0, &pod.volume, true, false, true).unwrap();
    share.bind("c", 1, &pod.volume, true, false, false).unwrap();
    let mut g = pod.guest();
    let follows = lookup(&mut g, "c/mounts/0/sub");
    assert_eq!(g.lookup(follows, "flag").unwrap_err(), libc::ENOENT);

    sys_mount("tmpfs", &sub, "tmpfs", 0, "size=64k");
    std::fs::write(sub.join("flag"), "from the host").unwrap();
    let mut g = pod.guest();
    lookup(&mut g, "c/mounts/0/sub/flag");
    let private = lookup(&mut g, "c/mounts/1/sub");
    assert_eq!(g.lookup(private, "flag").unwrap_err(), libc::ENOENT);
    pod.assert_outside_untouched();
    drop(g);
    share.remove_container("c").unwrap();
    share::unmount_below(&pod.volume);
    pod.assert_volume_alive();
}

#[test]
fn removal_never_deletes_through_a_mount_that_remains() {
    require_root!();
    // The no-race variant of the review: a volume still mounted somewhere below the tree
    // being removed (there, because its name was too long to unmount). The removal must
    // stop at the mount point, not walk into the volume.
    let pod = Pod::new("remove");
    let tree = pod.base.join("tree");
    let deep = tree.join("a/b");
    std::fs::create_dir_all(&deep).unwrap();
    let src = std::ffi::CString::new(pod.volume.to_string_lossy().as_bytes()).unwrap();
    let dst = std::ffi::CString::new(deep.to_string_lossy().as_bytes()).unwrap();
    // SAFETY: valid C strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
    let base = rustix::fs::open(
        &pod.base,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY,
        rustix::fs::Mode::empty(),
    )
    .unwrap();
    let err = share::remove_entry(std::os::fd::AsFd::as_fd(&base), "tree", &tree).unwrap_err();
    assert!(matches!(err, ShareError::MountRemains(_)), "{err}");
    pod.assert_volume_alive();
    assert!(deep.exists(), "the mount point stays");
    // Once it is gone, the tree goes.
    share::unmount_below(&deep);
    share::remove_entry(std::os::fd::AsFd::as_fd(&base), "tree", &tree).unwrap();
    assert!(!tree.exists());
    pod.assert_volume_alive();
}

#[test]
fn pod_state_modes() {
    require_root!();
    let pod = Pod::new("modes");
    // SAFETY: umask has no preconditions.
    let old = unsafe { libc::umask(0) };
    let share = PodShare::create(&pod.root);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let share = share.unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&pod.run_dir), 0o711);
    assert_eq!(mode(&pod.root), 0o700);
    assert_eq!(mode(&PodShare::skel_dir(&pod.root)), 0o700);
    drop(share);
    share::remove_pod_dir(&pod.root).unwrap();
}

#[test]
fn a_racing_guest_never_lands_a_mount_outside_in_1000_container_set_ups() {
    require_root!();
    let pod = Pod::new("race");
    let share = PodShare::create(&pod.root).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let landed = Arc::new(AtomicUsize::new(0));
    let mut g = pod.guest();
    let outside = pod.outside.to_string_lossy().into_owned();
    let guest = {
        let (stop, landed) = (stop.clone(), landed.clone());
        std::thread::spawn(move || {
            let mut tries = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tries += 1;
                // Whatever container is there now: swap its dirs for symlinks.
                if g.symlink(ROOT, "c", &outside).is_ok() {
                    landed.fetch_add(1, Ordering::Relaxed);
                }
                let Ok(c) = g.lookup(ROOT, "c") else { continue };
                for name in ["mounts", "rootfs"] {
                    if g.rename(c.nodeid, name, c.nodeid, "x").is_ok()
                        || g.symlink(c.nodeid, name, &outside).is_ok()
                    {
                        landed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                g.forget(c.nodeid, 1);
            }
            tries
        })
    };
    for _ in 0..1000 {
        share.add_container("c").unwrap();
        share
            .mount_rootfs("c", &[], &pod.volume, false, &[])
            .unwrap();
        share.bind("c", 0, &pod.volume, true, true, false).unwrap();
        share.remove_container("c").unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let tries = guest.join().unwrap();
    assert!(tries > 0);
    assert_eq!(
        landed.load(Ordering::Relaxed),
        0,
        "a guest change got through"
    );
    pod.assert_outside_untouched();
    pod.assert_volume_alive();
    drop(share);
    share::remove_pod_dir(&pod.root).unwrap();
}
