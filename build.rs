//! Generates the gRPC and protobuf code from `proto/` with protox (pure Rust), so
//! no system `protoc` is needed. The encoded descriptor set is kept for server
//! reflection.
use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["proto/account.proto", "proto/events.proto"], ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out.join("descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    // The replicas' own transport: compiled apart, so it is neither in the
    // client contract nor in the reflection of the client port.
    let raft = protox::compile(["proto/raft.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(raft)?;
    Ok(())
}
