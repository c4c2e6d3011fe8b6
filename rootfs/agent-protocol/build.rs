//! Generates the Rust code of `proto/agent.proto` (messages + ttrpc client/server) with
//! ttrpc-codegen's pure-Rust protobuf parser: no `protoc` is needed.
//!
//! The generated files carry inner attributes (`#![allow(...)]`) and inner doc comments,
//! which `include!` does not accept; they are dropped here and `src/lib.rs` sets the
//! equivalent `#[allow]`s on the modules that include the files.

use std::fs;
use std::path::{Path, PathBuf};

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn strip_inner_attributes(path: &Path) {
    let text = fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read generated {}: {e}", path.display()));
    let kept: Vec<&str> = text
        .lines()
        .filter(|line| !line.starts_with("#![") && !line.starts_with("//!"))
        .collect();
    fs::write(path, kept.join("\n"))
        .unwrap_or_else(|e| panic!("write generated {}: {e}", path.display()));
}

fn main() {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed=proto/agent.proto");

    Codegen::new()
        .out_dir(&out_dir)
        .include("proto")
        .input("proto/agent.proto")
        .rust_protobuf()
        .customize(Customize {
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("ttrpc-codegen failed on proto/agent.proto: fix the .proto syntax it reports");

    for file in ["agent.rs", "agent_ttrpc.rs"] {
        strip_inner_attributes(&out_dir.join(file));
    }
}
