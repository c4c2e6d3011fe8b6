//! Port forwarding into the pod's VM (CRI PortForward, `kubectl port-forward`).
//!
//! containerd serves PortForward itself: it enters the pod's network namespace and dials
//! `localhost:<port>` there, expecting the pod's server to listen on the namespace's
//! loopback. With a VM the pod's servers listen on the guest's loopback, and nothing
//! listens in the host namespace. So the shim puts one listener on `127.0.0.1` in that
//! namespace and steers every TCP connection to `127.0.0.1:<any port>` onto it with a BPF
//! `sk_lookup` program attached to the namespace (Linux 5.9+); the accepted socket's local
//! address keeps the port that was dialled. Each connection is carried to the agent over a
//! vsock stream that starts with that port (2 bytes, big-endian); the agent dials
//! `127.0.0.1:<port>` in the guest and both sides copy until EOF.
//!
//! Rules: only TCP to 127.0.0.1 is steered (no other address or protocol of the namespace
//! changes; nothing else listens on its loopback: the namespace holds only the pod's
//! wiring); the program, its socket map and the listener belong to the pod and go with
//! it (closing the link detaches the program); the shim only copies bytes between
//! containerd's socket and the vsock stream, it parses nothing the guest sends.

use std::io::{self, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::Netns;

/// Opens a stream to the agent's port-forward listener.
pub type Connect = Arc<dyn Fn() -> io::Result<UnixStream> + Send + Sync>;

/// `bpf(2)` commands, map, program and attach types used here (linux/bpf.h).
const BPF_MAP_CREATE: libc::c_int = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_LINK_CREATE: libc::c_int = 28;
const BPF_MAP_TYPE_SOCKMAP: u32 = 15;
const BPF_PROG_TYPE_SK_LOOKUP: u32 = 30;
const BPF_SK_LOOKUP: u32 = 36;

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Insn {
    code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | (dst & 0xf),
        off,
        imm,
    }
}

// Opcodes: class | op | source.
const MOV64_REG: u8 = 0x07 | 0xb0 | 0x08;
const MOV64_IMM: u8 = 0x07 | 0xb0;
const ADD64_IMM: u8 = 0x07;
const LDX_W: u8 = 0x01 | 0x60;
const ST_W: u8 = 0x02 | 0x60;
const JNE_IMM: u8 = 0x05 | 0x50;
const JEQ_IMM: u8 = 0x05 | 0x10;
const LD_IMM64: u8 = 0x18;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
/// `src_reg` of a 64-bit immediate load that is a map fd.
const PSEUDO_MAP_FD: u8 = 1;
// Helpers.
const FN_MAP_LOOKUP_ELEM: i32 = 1;
const FN_SK_RELEASE: i32 = 86;
const FN_SK_ASSIGN: i32 = 124;
// `struct bpf_sk_lookup` offsets.
const CTX_PROTOCOL: i16 = 12;
const CTX_LOCAL_IP4: i16 = 40;
/// 127.0.0.1 as the u32 the context holds (network byte order, read little-endian).
const LOOPBACK_IP4: i32 = i32::from_ne_bytes([127, 0, 0, 1]);
const SK_PASS: i32 = 1;

/// The program: TCP to 127.0.0.1 goes to the socket at key 0 of map `map_fd`; everything
/// else passes untouched.
fn program(map_fd: i32) -> Vec<Insn> {
    let tcp = libc::IPPROTO_TCP;
    // Jumps are relative to the next instruction; PASS is the last two instructions.
    vec![
        /* 0 */ insn(MOV64_REG, 6, 1, 0, 0), // r6 = ctx
        /* 1 */ insn(LDX_W, 2, 6, CTX_PROTOCOL, 0), // r2 = ctx->protocol
        /* 2 */ insn(JNE_IMM, 2, 0, 16, tcp), // not TCP: pass
        /* 3 */ insn(LDX_W, 2, 6, CTX_LOCAL_IP4, 0), // r2 = ctx->local_ip4
        /* 4 */ insn(JNE_IMM, 2, 0, 14, LOOPBACK_IP4), // not 127.0.0.1: pass
        /* 5 */ insn(ST_W, 10, 0, -4, 0), // key = 0 on the stack
        /* 6 */ insn(LD_IMM64, 1, PSEUDO_MAP_FD, 0, map_fd), // r1 = map
        /* 7 */ insn(0, 0, 0, 0, 0),
        /* 8 */ insn(MOV64_REG, 2, 10, 0, 0), // r2 = fp
        /* 9 */ insn(ADD64_IMM, 2, 0, 0, -4), // r2 = &key
        /* 10 */ insn(CALL, 0, 0, 0, FN_MAP_LOOKUP_ELEM), // r0 = socket or NULL
        /* 11 */ insn(JEQ_IMM, 0, 0, 7, 0), // no socket: pass
        /* 12 */ insn(MOV64_REG, 7, 0, 0, 0), // r7 = socket
        /* 13 */ insn(MOV64_REG, 1, 6, 0, 0), // r1 = ctx
        /* 14 */ insn(MOV64_REG, 2, 7, 0, 0), // r2 = socket
        /* 15 */ insn(MOV64_IMM, 3, 0, 0, 0), // r3 = flags
        /* 16 */ insn(CALL, 0, 0, 0, FN_SK_ASSIGN),
        /* 17 */ insn(MOV64_REG, 1, 7, 0, 0), // r1 = socket
        /* 18 */ insn(CALL, 0, 0, 0, FN_SK_RELEASE),
        /* 19 PASS */ insn(MOV64_IMM, 0, 0, 0, SK_PASS),
        /* 20 */ insn(EXIT, 0, 0, 0, 0),
    ]
}

/// `bpf(cmd, attr)` with `attr` a `union bpf_attr` prefix of the size passed.
fn bpf<T>(cmd: libc::c_int, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a plain `#[repr(C)]` struct of the size passed; the kernel reads it
    // (and the memory its pointers name, which the caller keeps alive) during the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

fn owned(fd: libc::c_long) -> io::Result<OwnedFd> {
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("bpf returned a bad fd"))?;
    // SAFETY: a descriptor bpf(2) just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A socket map of one entry holding `listener`.
fn socket_map(listener: &TcpListener) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    let map = owned(bpf(
        BPF_MAP_CREATE,
        &MapCreate {
            map_type: BPF_MAP_TYPE_SOCKMAP,
            key_size: 4,
            value_size: 8,
            max_entries: 1,
            map_flags: 0,
        },
    )?)?;
    #[repr(C)]
    struct MapUpdate {
        map_fd: u32,
        pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let key = 0u32;
    let value = u64::try_from(listener.as_raw_fd()).map_err(io::Error::other)?;
    bpf(
        BPF_MAP_UPDATE_ELEM,
        &MapUpdate {
            map_fd: u32::try_from(map.as_raw_fd()).map_err(io::Error::other)?,
            pad: 0,
            key: &key as *const u32 as u64,
            value: &value as *const u64 as u64,
            flags: 0,
        },
    )?;
    Ok(map)
}

/// Loads [`program`] for `map`; the verifier's log is in the error.
fn load(map: &OwnedFd) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }
    let insns = program(map.as_raw_fd());
    let license = c"GPL";
    let mut log = vec![0u8; 4096];
    let mut name = [0u8; 16];
    name[..10].copy_from_slice(b"pv_forward");
    let attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_SK_LOOKUP,
        insn_cnt: u32::try_from(insns.len()).map_err(io::Error::other)?,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: u32::try_from(log.len()).map_err(io::Error::other)?,
        log_buf: log.as_mut_ptr() as u64,
        kern_version: 0,
        prog_flags: 0,
        prog_name: name,
        prog_ifindex: 0,
        expected_attach_type: BPF_SK_LOOKUP,
    };
    match bpf(BPF_PROG_LOAD, &attr) {
        Ok(fd) => owned(fd),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            Err(io::Error::new(
                e.kind(),
                format!(
                    "{e}; verifier: {}",
                    String::from_utf8_lossy(&log[..end]).trim()
                ),
            ))
        }
    }
}

/// Attaches `prog` to the network namespace `netns` (a link: closing it detaches).
fn attach(prog: &OwnedFd, netns: &impl AsRawFd) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct LinkCreate {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
    }
    owned(bpf(
        BPF_LINK_CREATE,
        &LinkCreate {
            prog_fd: u32::try_from(prog.as_raw_fd()).map_err(io::Error::other)?,
            target_fd: u32::try_from(netns.as_raw_fd()).map_err(io::Error::other)?,
            attach_type: BPF_SK_LOOKUP,
            flags: 0,
        },
    )?)
}

/// The pod's port forwarding: dropping it detaches the program and stops accepting.
pub struct PortForward {
    listener: Arc<TcpListener>,
    _link: OwnedFd,
    _prog: OwnedFd,
    _map: OwnedFd,
    accept: Option<JoinHandle<()>>,
}

impl PortForward {
    /// Steers `127.0.0.1` TCP connections in `netns` to a listener that carries each to
    /// the agent through `connect`.
    pub fn start(netns: &Netns, connect: Connect) -> io::Result<Self> {
        let listener = netns.run("pod-forward-bind", || TcpListener::bind("127.0.0.1:0"))??;
        let map = socket_map(&listener)?;
        let prog = load(&map)?;
        let link = attach(&prog, netns)?;
        let listener = Arc::new(listener);
        let accepting = listener.clone();
        let accept = std::thread::Builder::new()
            .name("pod-forward".into())
            .spawn(move || accept_loop(&accepting, &connect))?;
        Ok(Self {
            listener,
            _link: link,
            _prog: prog,
            _map: map,
            accept: Some(accept),
        })
    }
}

impl std::fmt::Debug for PortForward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortForward")
            .field("listener", &self.listener.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        // A listening socket shut down for reading makes accept fail (EINVAL): the loop
        // ends. Connections already carried go on until either side closes.
        // SAFETY: shutdown on a descriptor this value owns.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RD) };
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, connect: &Connect) {
    loop {
        let (client, _) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return,
            Err(e) => {
                log::warn!("port forward: accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        let port = match client.local_addr() {
            Ok(a) => a.port(),
            Err(e) => {
                log::warn!("port forward: the dialled port: {e}");
                continue;
            }
        };
        let connect = connect.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("forward-{port}"))
            .spawn(move || {
                if let Err(e) = carry(client, port, &connect) {
                    log::info!("port forward to guest port {port}: {e}");
                }
            });
        if let Err(e) = spawned {
            log::warn!("port forward: no thread for a connection to port {port}: {e}");
        }
    }
}

/// Carries one connection to the guest's `port` until both directions are done.
fn carry(client: TcpStream, port: u16, connect: &Connect) -> io::Result<()> {
    let mut guest = connect()?;
    guest.write_all(&port.to_be_bytes())?;
    let (mut guest_in, mut client_out) = (guest.try_clone()?, client.try_clone()?);
    let upstream = std::thread::Builder::new()
        .name(format!("forward-{port}-up"))
        .spawn(move || {
            let mut client = client;
            let _ = io::copy(&mut client, &mut guest_in);
            let _ = guest_in.shutdown(Shutdown::Write);
        })?;
    let _ = io::copy(&mut guest, &mut client_out);
    let _ = client_out.shutdown(Shutdown::Write);
    let _ = upstream.join();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_jumps_to_its_pass_exit() {
        let p = program(7);
        let pass = p.len() - 2;
        for (i, ins) in p.iter().enumerate() {
            if matches!(ins.code, JNE_IMM | JEQ_IMM) {
                let target = i64::try_from(i).unwrap() + 1 + i64::from(ins.off);
                assert_eq!(target, i64::try_from(pass).unwrap(), "jump at {i}");
            }
        }
        assert_eq!(p[pass], insn(MOV64_IMM, 0, 0, 0, SK_PASS));
        assert_eq!(p[6].regs >> 4, PSEUDO_MAP_FD);
        assert_eq!(p[6].imm, 7);
        assert_eq!(LOOPBACK_IP4.to_ne_bytes(), [127, 0, 0, 1]);
    }
}
