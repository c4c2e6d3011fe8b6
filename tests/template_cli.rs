//! `podvisor template list|rm|create` without a guest: listing and removing templates
//! (a corrupt one shows as unusable), and clear errors for bad keys and a missing kernel.
//! Building a real template is covered by the guest tier (`shim_containerd_template`).

mod common;

use common::{podvisor, temp_path};

fn text(out: &std::process::Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn lists_and_removes_templates() {
    let dir = temp_path("template-cli");
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();

    let out = podvisor(&["template", "list", "--dir", d], &[]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("no templates"), "{stdout}");

    // A corrupt template, a lock and a build in progress: only the template is listed.
    let key = "0123456789abcdef0123456789abcdef";
    std::fs::create_dir_all(dir.join(key)).unwrap();
    std::fs::write(dir.join(key).join("state"), b"not a snapshot").unwrap();
    std::fs::write(dir.join(format!("{key}.lock")), b"").unwrap();
    std::fs::create_dir_all(dir.join(format!("{key}.tmp-1"))).unwrap();
    let out = podvisor(&["template", "list", "--dir", d], &[]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let rows: Vec<&str> = stdout.lines().skip(1).collect();
    assert_eq!(rows.len(), 1, "{stdout}");
    assert!(
        rows[0].starts_with(key) && rows[0].contains("unusable"),
        "{stdout}"
    );

    // Bad keys are refused, with exit status 1 and nothing removed.
    for bad in ["../etc", "no-such-key"] {
        let out = podvisor(&["template", "rm", "--dir", d, bad], &[]);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(bad), "{stderr}");
    }
    assert!(dir.join(key).is_dir());

    let out = podvisor(&["template", "rm", "--dir", d, "--all"], &[]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains(&format!("removed {key}")), "{stdout}");
    assert!(!dir.join(key).exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn create_without_a_kernel_fails_clearly_and_leaves_nothing() {
    let dir = temp_path("template-cli-nokernel");
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    let out = podvisor(
        &["template", "create", "--dir", d],
        &[
            ("PODVISOR_CONFIG", "/nonexistent/podvisor.toml"),
            ("PODVISOR_KERNEL", "/nonexistent/vmlinux"),
        ],
    );
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("/nonexistent/podvisor.toml"), "{stderr}");

    let out = podvisor(
        &["template", "create", "--dir", d],
        &[
            ("PODVISOR_KERNEL", "/nonexistent/vmlinux"),
            ("PODVISOR_INITRD", env!("CARGO_BIN_EXE_podvisor")),
        ],
    );
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("/nonexistent/vmlinux"), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "nothing left behind: {left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
