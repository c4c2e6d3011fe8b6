//! Guest tier for the virtio devices: one boot of the real guest kernel whose init runs
//! `pvtest devices` (rootfs/guest-test) against a virtio-blk disk, a virtio-fs share and the
//! hybrid vsock, while this test plays the host side and checks the results on the host.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{guest_artifacts, temp_path};

const GUEST_TO_HOST_PORT: u32 = 5000;
const HOST_TO_GUEST_PORT: u32 = 6000;
const MARKER_OFFSET: usize = 1 << 20;
const MARKER: &[u8] = b"podvisor-guest-was-here";

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[test]
fn guest_uses_blk_fs_and_vsock() {
    let Some(guest) = guest_artifacts("guest_uses_blk_fs_and_vsock") else {
        return;
    };
    let initrd = guest.initrd.with_file_name("devices-test.cpio");
    if !common::require_file("guest_uses_blk_fs_and_vsock", &initrd, "run `make test`") {
        return;
    }
    let dir = temp_path("devices");
    std::fs::create_dir_all(dir.join("share")).unwrap();

    // Disk: a pattern in the first MiB, whose hash the guest reports.
    let pattern: Vec<u8> = (0..MARKER_OFFSET as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let disk = dir.join("disk.img");
    let mut image = pattern.clone();
    image.resize(64 << 20, 0);
    std::fs::write(&disk, &image).unwrap();
    std::fs::write(dir.join("share/from-host.txt"), "hello from host\n").unwrap();

    // Guest -> host vsock: the device connects to <uds>_<port>; echo one line.
    let uds = dir.join("vsock.sock");
    let listener = UnixListener::bind(format!("{}_{GUEST_TO_HOST_PORT}", uds.display())).unwrap();
    let echo = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(stream.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        (&stream).write_all(line.as_bytes()).unwrap();
        line
    });

    let mut child = Command::new(env!("CARGO_BIN_EXE_podvisor"))
        .args(["boot", "--kernel"])
        .arg(&guest.kernel)
        .arg("--initrd")
        .arg(&initrd)
        .arg("--disk")
        .arg(&disk)
        .arg("--share")
        .arg(format!("share={}", dir.join("share").display()))
        .arg("--vsock")
        .arg(&uds)
        .args(["--mem-mib", "256", "--timeout", "900"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Read the console; when the guest listens, play the host -> guest side.
    let (lines_tx, lines_rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut console = String::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap_or_default();
            console.push_str(&line);
            console.push('\n');
            let _ = lines_tx.send(line);
        }
        console
    });
    let mut host_to_guest = None;
    while let Ok(line) = lines_rx.recv_timeout(Duration::from_secs(900)) {
        if line.contains("pvtest: vsock-listen ready") {
            host_to_guest = Some(connect_and_echo(&uds));
        }
        if line.contains("pvtest: done") {
            break;
        }
    }
    let status = child.wait().unwrap();
    let console = reader.join().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "console:\n{console}\nstderr:\n{stderr}"
    );

    // blk: the guest saw the host's bytes, and the host sees the guest's marker.
    let expected = format!("pvtest: blk ok hash={:016x}", fnv1a(&pattern));
    assert!(console.contains(&expected), "{expected} not in:\n{console}");
    let image = std::fs::read(&disk).unwrap();
    assert_eq!(&image[MARKER_OFFSET..MARKER_OFFSET + MARKER.len()], MARKER);

    // fs: what the guest did is on the host.
    assert!(console.contains("pvtest: fs ok"), "{console}");
    let share = dir.join("share");
    assert_eq!(
        std::fs::read_to_string(share.join("from-guest.txt")).unwrap(),
        "guest read: hello from host"
    );
    assert_eq!(
        std::fs::metadata(share.join("hardlink.txt"))
            .unwrap()
            .nlink(),
        2
    );
    assert_eq!(
        std::fs::read_link(share.join("symlink.txt"))
            .unwrap()
            .to_str(),
        Some("from-guest.txt")
    );
    assert!(!share.join("doomed.txt").exists());
    assert_eq!(
        std::fs::metadata(share.join("big.bin")).unwrap().len(),
        4 << 20
    );

    // vsock both ways.
    assert_eq!(echo.join().unwrap(), "hello from guest\n");
    assert!(console.contains("pvtest: vsock-connect ok"), "{console}");
    let echoed = host_to_guest.expect("the guest never listened on vsock");
    assert_eq!(echoed, 1 << 20, "{console}");
    assert!(
        console.contains("pvtest: vsock-listen ok echoed_bytes=1048576"),
        "{console}"
    );
    assert!(console.contains("pvtest: done ok"), "{console}");

    // Nothing left behind: the VM's vsock socket is gone.
    assert!(!uds.exists(), "vsock socket left behind");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Host -> guest through the hybrid vsock: `CONNECT <port>`, `OK <hostport>`, then 1 MiB
/// echoed back. Returns the number of bytes echoed.
fn connect_and_echo(uds: &std::path::Path) -> usize {
    let mut stream = UnixStream::connect(uds).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(300)))
        .unwrap();
    stream
        .write_all(format!("CONNECT {HOST_TO_GUEST_PORT}\n").as_bytes())
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut ok = String::new();
    reader.read_line(&mut ok).unwrap();
    assert!(ok.starts_with("OK "), "hybrid vsock answered {ok:?}");
    let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
    let writer = {
        let mut s = stream.try_clone().unwrap();
        let data = data.clone();
        std::thread::spawn(move || {
            s.write_all(&data).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
        })
    };
    let mut back = Vec::new();
    reader.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    assert_eq!(back, data, "echo differs");
    back.len()
}
