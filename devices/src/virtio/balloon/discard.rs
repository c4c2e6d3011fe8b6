//! Giving guest pages back to the host: `madvise(MADV_DONTNEED)` on the host mapping of a
//! range of guest RAM, once the range is known to be page-aligned and wholly inside one RAM
//! region (a guest can name any address; only its own RAM may be touched).

use std::sync::OnceLock;

use vm_memory::{Address, GuestAddress, GuestMemory, GuestMemoryRegion};

use super::PAGE_SIZE;
use crate::virtio::GuestMem;

/// Why a range was not discarded. The guest only loses the chance to give memory back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiscardError {
    #[error("{len:#x} bytes at guest address {addr:#x} are not aligned to {align:#x}-byte pages")]
    Unaligned { addr: u64, len: u64, align: u64 },
    #[error("{len:#x} bytes at guest address {addr:#x} are not inside one guest RAM region")]
    OutsideRam { addr: u64, len: u64 },
    #[error("madvise(MADV_DONTNEED) on {len:#x} bytes at guest address {addr:#x}: {reason}")]
    Madvise { addr: u64, len: u64, reason: String },
}

/// The granularity of a discard: the balloon's page or the host's, whichever is larger.
fn page_align() -> u64 {
    static ALIGN: OnceLock<u64> = OnceLock::new();
    *ALIGN.get_or_init(|| {
        // SAFETY: sysconf reads a constant of the system; no memory is involved.
        let host = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        u64::try_from(host).unwrap_or(PAGE_SIZE).max(PAGE_SIZE)
    })
}

/// Frees the host memory behind `len` bytes of guest RAM at `addr`. The guest reads zeros
/// there afterwards (or, for RAM mapped privately from a template's memory file, the
/// template's page).
pub fn discard_guest_range(
    mem: &GuestMem,
    addr: GuestAddress,
    len: u64,
) -> Result<(), DiscardError> {
    let align = page_align();
    if !addr.raw_value().is_multiple_of(align) || !len.is_multiple_of(align) {
        return Err(DiscardError::Unaligned {
            addr: addr.raw_value(),
            len,
            align,
        });
    }
    if len == 0 {
        return Ok(());
    }
    let outside = || DiscardError::OutsideRam {
        addr: addr.raw_value(),
        len,
    };
    let (region, offset) = mem.to_region_addr(addr).ok_or_else(outside)?;
    let end = offset.raw_value().checked_add(len).ok_or_else(outside)?;
    if end > region.len() {
        return Err(outside());
    }
    let host = region.get_host_address(offset).map_err(|_| outside())?;
    let host_len = usize::try_from(len).map_err(|_| outside())?;
    // SAFETY: `host..host + host_len` lies inside the mapping of one guest RAM region (checked
    // above), which lives as long as `mem`. MADV_DONTNEED on this private mapping only drops
    // page contents (later accesses refault zeros or the file's page); it never unmaps, so
    // no reference into guest memory held elsewhere becomes dangling.
    let rc = unsafe { libc::madvise(host.cast::<libc::c_void>(), host_len, libc::MADV_DONTNEED) };
    if rc != 0 {
        return Err(DiscardError::Madvise {
            addr: addr.raw_value(),
            len,
            reason: std::io::Error::last_os_error().to_string(),
        });
    }
    Ok(())
}
