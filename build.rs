//! Compiles proto/sms/v1/sms.proto with protox (in Rust: no protoc to
//! install) into the gRPC front door's messages, server and client
//! (`adapters::grpc::proto`), and writes its encoded descriptor set for the
//! reflection service.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "sms/v1/sms.proto";
    println!("cargo:rerun-if-changed=proto");
    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_source_info(true).include_imports(true);
    compiler.open_file(proto)?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("sms_v1_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Channels come from the caller (tests bring tonic's transport).
        .build_transport(false)
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
