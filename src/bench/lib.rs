//! `podvisor bench`: benchmarks that print tables (never timed assertions).
//!
//! * `bench boot` ([`boot`]): boot timings of the VMM alone, median of N fresh processes.
//! * `bench density` ([`density`]): N idle pods through a real containerd, podvisor next to
//!   runc: start latency, host memory per pod, Markdown/JSON/PNG reports.
//! * `bench template` ([`template`]): pod start from a template clone vs a cold boot vs
//!   runc, and clones' shared/private memory at N = 1, 10, 50.
//! * `bench net` ([`net`]): TCP throughput and latency between a pod and a peer network
//!   namespace, podvisor's virtio-net path next to runc's veth.

mod boot;
pub mod density;
mod net;
mod template;

use clap::Subcommand;

pub use boot::TimingsRecord;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Boot timings: host set-up, guest time to init, VMM RSS, guest RAM touched.
    Boot(boot::BenchBootArgs),
    /// N idle busybox pods through containerd (podvisor and/or runc): start latency and
    /// host memory per pod; writes density.md, density.json and density.png.
    Density(density::DensityArgs),
    /// Pod start from a template clone vs a cold boot vs runc, and the clones' memory
    /// (shared template pages vs private) at N = 1, 10, 50; writes template.md/json/png.
    Template(template::TemplateBenchArgs),
    /// Network throughput and latency pod ↔ peer network namespace over a veth (TCP
    /// stream both ways, connect, request/response), podvisor next to runc; writes
    /// net.md and net.json.
    Net(net::NetBenchArgs),
}

pub fn run(cmd: BenchCommand) -> Result<u8, Box<dyn std::error::Error>> {
    match cmd {
        BenchCommand::Boot(args) => boot::run(args),
        BenchCommand::Density(args) => density::run(args),
        BenchCommand::Template(args) => template::run(args),
        BenchCommand::Net(args) => net::run(args),
    }
}

/// Parses `line` as the arguments of one bench subcommand (for tests).
#[cfg(test)]
pub(crate) fn try_parse_args<A: clap::Args>(line: &str) -> Result<A, clap::Error> {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli<A: clap::Args> {
        #[command(flatten)]
        args: A,
    }
    Cli::<A>::try_parse_from(std::iter::once("bench").chain(line.split_whitespace()))
        .map(|c| c.args)
}

/// [`try_parse_args`] of arguments that must parse.
#[cfg(test)]
pub(crate) fn parse_args<A: clap::Args>(line: &str) -> A {
    try_parse_args(line).unwrap()
}
