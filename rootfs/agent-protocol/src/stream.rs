//! The stdio stream header: what a client writes first on a stream connection to say which
//! process and which stdio stream the connection is, and the agent's one-byte answer.
//!
//! Wire format (see the header comment of `proto/agent.proto`):
//! `"PVS1" | kind u8 | container id len u16 BE | container id | exec id len u16 BE | exec id`,
//! answered by one [`Ack`] byte.

use std::io::{self, Read, Write};

/// First four bytes of every stream connection.
pub const MAGIC: [u8; 4] = *b"PVS1";

/// Longest container id or exec id accepted in a header.
pub const MAX_ID_LEN: usize = 1024;

/// Errors while writing, reading or answering a stream header.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("stream I/O failed: {0}; check that the agent's stream listener is reachable")]
    Io(#[from] io::Error),
    #[error("stream header does not start with \"PVS1\": the peer does not speak this protocol")]
    BadMagic,
    #[error("unknown stream kind {0}: expected 0 (stdin), 1 (stdout), 2 (stderr) or 3 (pty)")]
    BadKind(u8),
    #[error(
        "{what} is {len} bytes long: ids must be 1..={MAX_ID_LEN} bytes (exec id may be empty)"
    )]
    BadIdLength { what: &'static str, len: usize },
    #[error("{0} is not UTF-8")]
    NotUtf8(&'static str),
    #[error("agent refused the stream: {0}")]
    Refused(Ack),
}

/// Which stdio stream a connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum StreamKind {
    /// Client to agent: the process's stdin.
    Stdin = 0,
    /// Agent to client: the process's stdout.
    Stdout = 1,
    /// Agent to client: the process's stderr.
    Stderr = 2,
    /// Both ways: the process's terminal (pty master).
    Pty = 3,
}

impl TryFrom<u8> for StreamKind {
    type Error = StreamError;

    fn try_from(value: u8) -> Result<Self, StreamError> {
        match value {
            0 => Ok(Self::Stdin),
            1 => Ok(Self::Stdout),
            2 => Ok(Self::Stderr),
            3 => Ok(Self::Pty),
            other => Err(StreamError::BadKind(other)),
        }
    }
}

/// The agent's one-byte answer to a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[repr(u8)]
pub enum Ack {
    #[error("attached")]
    Attached = 0,
    #[error("malformed header")]
    Malformed = 1,
    #[error("a stream of this kind is already attached to this process")]
    Duplicate = 2,
}

impl Ack {
    fn from_byte(byte: u8) -> Self {
        match byte {
            0 => Self::Attached,
            2 => Self::Duplicate,
            _ => Self::Malformed,
        }
    }
}

/// Identifies the process and the stream of a connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamHeader {
    pub kind: StreamKind,
    pub container_id: String,
    /// Empty for the container's init process.
    pub exec_id: String,
}

fn check_len(what: &'static str, len: usize, allow_empty: bool) -> Result<u16, StreamError> {
    match u16::try_from(len) {
        Ok(n) if len <= MAX_ID_LEN && (len != 0 || allow_empty) => Ok(n),
        _ => Err(StreamError::BadIdLength { what, len }),
    }
}

fn read_id<R: Read>(
    reader: &mut R,
    what: &'static str,
    allow_empty: bool,
) -> Result<String, StreamError> {
    let mut len = [0u8; 2];
    reader.read_exact(&mut len)?;
    let len = usize::from(u16::from_be_bytes(len));
    check_len(what, len, allow_empty)?;
    let mut bytes = vec![0u8; len];
    reader.read_exact(&mut bytes)?;
    String::from_utf8(bytes).map_err(|_| StreamError::NotUtf8(what))
}

impl StreamHeader {
    pub fn new(kind: StreamKind, container_id: &str, exec_id: &str) -> Self {
        Self {
            kind,
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
        }
    }

    /// The header's bytes.
    pub fn encode(&self) -> Result<Vec<u8>, StreamError> {
        let cid_len = check_len("container id", self.container_id.len(), false)?;
        let eid_len = check_len("exec id", self.exec_id.len(), true)?;
        let mut out = Vec::with_capacity(9 + self.container_id.len() + self.exec_id.len());
        out.extend_from_slice(&MAGIC);
        out.push(self.kind as u8);
        out.extend_from_slice(&cid_len.to_be_bytes());
        out.extend_from_slice(self.container_id.as_bytes());
        out.extend_from_slice(&eid_len.to_be_bytes());
        out.extend_from_slice(self.exec_id.as_bytes());
        Ok(out)
    }

    /// Reads a header (agent side).
    pub fn read_from<R: Read>(reader: &mut R) -> Result<Self, StreamError> {
        let mut magic = [0u8; 4];
        reader.read_exact(&mut magic)?;
        if magic != MAGIC {
            return Err(StreamError::BadMagic);
        }
        let mut kind = [0u8; 1];
        reader.read_exact(&mut kind)?;
        let kind = StreamKind::try_from(kind[0])?;
        let container_id = read_id(reader, "container id", false)?;
        let exec_id = read_id(reader, "exec id", true)?;
        Ok(Self {
            kind,
            container_id,
            exec_id,
        })
    }

    /// Client side: writes the header and waits for the agent's answer. On `Ok` the
    /// connection is attached and carries raw stdio bytes from now on.
    pub fn attach<S: Read + Write>(&self, conn: &mut S) -> Result<(), StreamError> {
        conn.write_all(&self.encode()?)?;
        conn.flush()?;
        let mut ack = [0u8; 1];
        conn.read_exact(&mut ack)?;
        match Ack::from_byte(ack[0]) {
            Ack::Attached => Ok(()),
            refused => Err(StreamError::Refused(refused)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let header = StreamHeader::new(StreamKind::Stderr, "ctr-1", "exec-7");
        let bytes = header.encode().unwrap();
        assert_eq!(&bytes[..5], b"PVS1\x02");
        let decoded = StreamHeader::read_from(&mut bytes.as_slice()).unwrap();
        assert_eq!(decoded, header);
    }

    #[test]
    fn init_process_has_empty_exec_id() {
        let header = StreamHeader::new(StreamKind::Stdout, "c", "");
        let bytes = header.encode().unwrap();
        assert_eq!(bytes, b"PVS1\x01\x00\x01c\x00\x00");
        assert_eq!(
            StreamHeader::read_from(&mut bytes.as_slice()).unwrap(),
            header
        );
    }

    #[test]
    fn rejects_bad_headers() {
        assert!(matches!(
            StreamHeader::read_from(&mut &b"XXXX\x01\x00\x01c\x00\x00"[..]),
            Err(StreamError::BadMagic)
        ));
        assert!(matches!(
            StreamHeader::read_from(&mut &b"PVS1\x09\x00\x01c\x00\x00"[..]),
            Err(StreamError::BadKind(9))
        ));
        assert!(matches!(
            StreamHeader::read_from(&mut &b"PVS1\x01\x00\x00\x00\x00"[..]),
            Err(StreamError::BadIdLength { .. })
        ));
        assert!(StreamHeader::new(StreamKind::Stdin, "", "")
            .encode()
            .is_err());
        assert!(StreamHeader::new(StreamKind::Stdin, &"x".repeat(1025), "")
            .encode()
            .is_err());
    }

    #[test]
    fn attach_reports_refusal() {
        struct Fake {
            written: Vec<u8>,
            answer: &'static [u8],
        }
        impl Read for Fake {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                self.answer.read(buf)
            }
        }
        impl Write for Fake {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.written.write(buf)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let header = StreamHeader::new(StreamKind::Stdin, "c", "e");
        let mut ok = Fake {
            written: Vec::new(),
            answer: b"\x00",
        };
        header.attach(&mut ok).unwrap();
        assert_eq!(ok.written, header.encode().unwrap());
        let mut dup = Fake {
            written: Vec::new(),
            answer: b"\x02",
        };
        assert!(matches!(
            header.attach(&mut dup),
            Err(StreamError::Refused(Ack::Duplicate))
        ));
    }
}
