//! Generates the gRPC code from `proto/deriva.proto` with the vendored protoc, so a fresh
//! machine needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // `bytes` fields decode as `bytes::Bytes`, so Get chunks are slices of one buffer.
    config.bytes(["."]);
    tonic_prost_build::configure().compile_with_config(
        config,
        &["proto/deriva.proto"],
        &["proto"],
    )?;
    println!("cargo:rerun-if-changed=proto/deriva.proto");
    Ok(())
}
