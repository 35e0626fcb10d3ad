//! Generates the kvfabric.v1 tonic/prost code. Needs `protoc` (Debian's
//! protobuf-compiler, installed by scripts/install-test-deps.sh) or PROTOC.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=kvfabric/v1/kvfabric.proto");
    println!("cargo:rerun-if-changed=kvfabric/v1/local.proto");
    tonic_prost_build::configure()
        .bytes(".")
        .compile_protos(&["kvfabric/v1/kvfabric.proto", "kvfabric/v1/local.proto"], &["."])?;
    Ok(())
}
