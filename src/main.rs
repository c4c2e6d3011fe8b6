//! `podvisor`: the command-line tool.
//!
//! * `podvisor boot`: boot a kernel + initrd with podvisor's VMM, stream the console, exit
//!   with the guest's status (a debugging tool for kernels, initrds and devices).
//! * `podvisor bench boot`: boot timings, median of N fresh processes.
//! * `podvisor bench density`: N idle pods through containerd, podvisor vs runc.
//! * `podvisor template create|list|rm`: the shim's pod templates by hand.

mod boot;
mod template_cli;

use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "podvisor",
    version,
    about = "podvisor: a containerd runtime whose shim is the pod's KVM hypervisor"
)]
struct Cli {
    /// More logging (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest kernel in podvisor's VMM and stream its console.
    Boot(Box<boot::BootArgs>),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(Box<podvisor_bench::BenchCommand>),
    /// Pod templates (booted VMs that pods restore as copy-on-write clones).
    #[command(subcommand)]
    Template(Box<template_cli::TemplateCommand>),
}

fn main() -> ExitCode {
    let process_start = Instant::now();
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp_millis()
        .target(env_logger::Target::Stderr)
        .init();
    let result = match cli.command {
        Command::Boot(args) => boot::run(*args, process_start),
        Command::Bench(cmd) => podvisor_bench::run(*cmd),
        Command::Template(cmd) => template_cli::run(*cmd).map_err(Into::into),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("podvisor: error: {e}");
            ExitCode::from(2)
        }
    }
}
