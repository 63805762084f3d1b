//! Compiles `proto/procmgr.proto` with protox: no `protoc` needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/procmgr.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
