//! Generates the gRPC code from proto/ with protox (pure Rust: no protoc needed)
//! and writes the encoded file descriptor set for server reflection.
//!
//! The benchmark's echo service (`proto/credvault/bench/v1`, package
//! `credvault.bench.v1`) is compiled from its own descriptor set, so the
//! product's reflection descriptor (`credvault_descriptor.bin`) never lists it.

use std::path::PathBuf;

use prost::Message;

/// The messages with a `secret` field.
const SECRET_MESSAGES: [&str; 2] = [".credvault.v1.SealRequest", ".credvault.v1.UnsealResponse"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let files = [
        "proto/credvault/v1/vault.proto",
        "proto/credvault/v1/admin.proto",
    ];
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("credvault_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Messages that carry a secret get a hand-written Debug that hides it
        // (src/service/mod.rs, `pb`).
        .skip_debug(SECRET_MESSAGES)
        .compile_fds(fds)?;

    // Bench only: `credvault bench grpc`'s transport floor. Not in the product's
    // descriptor set, not registered by `service::router`.
    let bench = protox::compile(["proto/credvault/bench/v1/echo.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(bench)?;
    Ok(())
}
