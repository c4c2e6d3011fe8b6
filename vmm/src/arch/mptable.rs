//! The Intel MultiProcessor Specification (1.4) table.
//!
//! Without ACPI, this is how a Linux guest finds its processors, its IOAPIC and how ISA
//! interrupts are wired. The table goes at the start of the EBDA (0x9fc00), where the kernel
//! scans for the floating pointer: a floating pointer (16 bytes) followed by the
//! configuration table (header + entries).
//!
//! Wiring: one processor entry per vCPU (APIC id = vCPU index), one ISA bus, one IOAPIC
//! (id = vCPU count) with all its pins as ISA interrupts 0..23 (edge, active high, as the
//! bus conforms), LINT0 = ExtINT and LINT1 = NMI on every local APIC.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout::{APIC_START, EBDA_START, HIMEM_START, IOAPIC_PINS, IOAPIC_START};

/// Errors of MP table creation.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("the MP table supports 1 to {MAX_CPUS} vCPUs, not {0}: lower --vcpus")]
    TooManyCpus(usize),
    #[error("the MP table ({0} bytes) does not fit between the EBDA and 1 MiB")]
    TooLarge(usize),
    #[error("the MP table's {what} ({addr:#x}) is not below 4 GiB")]
    Above4G { what: &'static str, addr: u64 },
    #[error("cannot write the MP table into guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// Largest vCPU count one table describes (APIC ids 0..=254, one id kept for the IOAPIC).
pub const MAX_CPUS: usize = 254;

const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const SPEC_REV: u8 = 4; // MP spec 1.4
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const ISA_BUS_ID: u8 = 0;
// Family 6 signature with FPU + APIC feature bits, as a generic processor entry.
const CPU_SIGNATURE: u32 = (6 << 8) | (1 << 4);
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

/// Little-endian byte writer for the table.
#[derive(Default)]
struct Table(Vec<u8>);

impl Table {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
}

/// Two's-complement checksum: the byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// The IOAPIC's APIC id for a guest with `num_cpus` vCPUs.
pub fn ioapic_id(num_cpus: u8) -> u8 {
    num_cpus
}

/// A 32-bit physical address in the table, or an error naming `what`.
fn addr32(what: &'static str, addr: u64) -> Result<u32, MptableError> {
    u32::try_from(addr).map_err(|_| MptableError::Above4G { what, addr })
}

/// Builds the floating pointer and configuration table as they are placed at `base`.
pub fn build(num_cpus: usize, base: u64) -> Result<Vec<u8>, MptableError> {
    // APIC ids are bytes: MAX_CPUS (254) fits.
    let cpus = u8::try_from(num_cpus)
        .ok()
        .filter(|&n| n > 0 && usize::from(n) <= MAX_CPUS)
        .ok_or(MptableError::TooManyCpus(num_cpus))?;
    let mut entries = Table::default();
    let mut count: u16 = 0;
    for cpu in 0..cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        entries
            .u8(ENTRY_PROCESSOR)
            .u8(cpu)
            .u8(APIC_VERSION)
            .u8(flags)
            .u32(CPU_SIGNATURE)
            .u32(CPU_FEATURES)
            .u32(0)
            .u32(0);
        count += 1;
    }
    entries.u8(ENTRY_BUS).u8(ISA_BUS_ID).bytes(b"ISA   ");
    count += 1;
    let ioapic = ioapic_id(cpus);
    entries
        .u8(ENTRY_IOAPIC)
        .u8(ioapic)
        .u8(IOAPIC_VERSION)
        .u8(1) // enabled
        .u32(addr32("IOAPIC", IOAPIC_START)?);
    count += 1;
    for pin in 0..u8::try_from(IOAPIC_PINS).expect("an IOAPIC has 24 pins") {
        entries
            .u8(ENTRY_IO_INTERRUPT)
            .u8(INT_TYPE_INT)
            .u16(0) // polarity and trigger conform to the bus
            .u8(ISA_BUS_ID)
            .u8(pin)
            .u8(ioapic)
            .u8(pin);
        count += 1;
    }
    for (lint, kind) in [(0u8, INT_TYPE_EXTINT), (1u8, INT_TYPE_NMI)] {
        entries
            .u8(ENTRY_LOCAL_INTERRUPT)
            .u8(kind)
            .u16(0)
            .u8(ISA_BUS_ID)
            .u8(0)
            .u8(0xff) // every local APIC
            .u8(lint);
        count += 1;
    }

    let table_len = HEADER_LEN + entries.0.len();
    let mut header = Table::default();
    header
        .bytes(b"PCMP")
        .u16(u16::try_from(table_len).map_err(|_| MptableError::TooLarge(table_len))?)
        .u8(SPEC_REV)
        .u8(0) // checksum, patched below
        .bytes(b"PODVISOR")
        .bytes(b"MICROVM     ")
        .u32(0) // OEM table pointer
        .u16(0) // OEM table size
        .u16(count)
        .u32(addr32("local APIC", APIC_START)?)
        .u16(0) // extended table length
        .u8(0) // extended table checksum
        .u8(0);
    debug_assert_eq!(header.0.len(), HEADER_LEN);
    let mut config = header.0;
    config.extend_from_slice(&entries.0);
    config[7] = checksum(&config);

    let config_addr = base + FLOATING_LEN as u64;
    let mut floating = Table::default();
    floating
        .bytes(b"_MP_")
        .u32(addr32("configuration table", config_addr)?)
        .u8(1) // length in 16-byte units
        .u8(SPEC_REV)
        .u8(0) // checksum, patched below
        .bytes(&[0; 5]); // default configuration 0: the table is present; no IMCR
    let mut table = floating.0;
    table[10] = checksum(&table);
    table.extend_from_slice(&config);
    Ok(table)
}

/// Writes the MP table for `num_cpus` vCPUs at the start of the EBDA.
pub fn setup<M: GuestMemory>(mem: &M, num_cpus: usize) -> Result<(), MptableError> {
    let table = build(num_cpus, EBDA_START)?;
    if EBDA_START + table.len() as u64 > HIMEM_START {
        return Err(MptableError::TooLarge(table.len()));
    }
    mem.write_slice(&table, GuestAddress(EBDA_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    /// Parses the table the way a guest does and returns (processor APIC ids, IOAPIC id).
    fn parse(table: &[u8], base: u64) -> (Vec<u8>, u8, usize) {
        assert_eq!(&table[..4], b"_MP_");
        assert_eq!(sum(&table[..FLOATING_LEN]), 0, "floating pointer checksum");
        let cfg_addr = u64::from(u32::from_le_bytes(table[4..8].try_into().unwrap()));
        let cfg = &table[usize::try_from(cfg_addr - base).unwrap()..];
        assert_eq!(&cfg[..4], b"PCMP");
        let len = u16::from_le_bytes(cfg[4..6].try_into().unwrap()) as usize;
        assert_eq!(len, cfg.len());
        assert_eq!(sum(&cfg[..len]), 0, "config table checksum");
        let count = u16::from_le_bytes(cfg[34..36].try_into().unwrap()) as usize;
        assert_eq!(
            u64::from(u32::from_le_bytes(cfg[36..40].try_into().unwrap())),
            APIC_START
        );
        let (mut cpus, mut ioapic, mut io_ints) = (vec![], 0xff, 0);
        let mut off = HEADER_LEN;
        for _ in 0..count {
            match cfg[off] {
                ENTRY_PROCESSOR => {
                    assert_ne!(cfg[off + 3] & CPU_ENABLED, 0);
                    assert_eq!(cfg[off + 3] & CPU_BOOTSTRAP != 0, cpus.is_empty());
                    cpus.push(cfg[off + 1]);
                    off += 20;
                }
                ENTRY_IOAPIC => {
                    ioapic = cfg[off + 1];
                    assert_eq!(
                        u64::from(u32::from_le_bytes(
                            cfg[off + 4..off + 8].try_into().unwrap()
                        )),
                        IOAPIC_START
                    );
                    off += 8;
                }
                ENTRY_IO_INTERRUPT => {
                    assert_eq!(cfg[off + 5], cfg[off + 7], "ISA irq n on IOAPIC pin n");
                    io_ints += 1;
                    off += 8;
                }
                ENTRY_BUS | ENTRY_LOCAL_INTERRUPT => off += 8,
                t => panic!("unknown entry type {t}"),
            }
        }
        assert_eq!(off, len, "entries fill the table exactly");
        (cpus, ioapic, io_ints)
    }

    #[test]
    fn describes_every_cpu_and_the_ioapic() {
        for n in [1, 2, 8, MAX_CPUS] {
            let table = build(n, EBDA_START).unwrap();
            let (cpus, ioapic, io_ints) = parse(&table, EBDA_START);
            assert_eq!(
                cpus,
                (0..n).map(|i| u8::try_from(i).unwrap()).collect::<Vec<_>>()
            );
            assert_eq!(ioapic as usize, n);
            assert_eq!(io_ints, IOAPIC_PINS as usize);
        }
    }

    #[test]
    fn rejects_bad_cpu_counts() {
        assert!(matches!(
            build(0, EBDA_START),
            Err(MptableError::TooManyCpus(0))
        ));
        assert!(matches!(
            build(MAX_CPUS + 1, EBDA_START),
            Err(MptableError::TooManyCpus(_))
        ));
    }

    #[test]
    fn lands_in_the_ebda() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        setup(&mem, 2).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&sig, b"_MP_");
    }
}
