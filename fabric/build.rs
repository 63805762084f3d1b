//! Compiles `proto/*.proto` with protox (a protobuf compiler in Rust), so the
//! build never needs a `protoc` binary installed by hand.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/control.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    prost_build::Config::new()
        // The largest answer, boxed so that every other one stays small.
        .boxed(".nefele.fabric.v1.Response.body.stats")
        .compile_fds(descriptors)?;
    Ok(())
}
