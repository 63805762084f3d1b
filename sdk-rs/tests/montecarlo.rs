//! The seed's Monte Carlo sample on the Rust SDK, under `nefele run` (an
//! embedded single node).

mod support;

#[test]
fn the_rust_sample_estimates_pi_on_one_node() {
    let sample = env!("CARGO_BIN_EXE_nefele-montecarlo");
    let nefele = std::path::Path::new(sample).with_file_name("nefele");
    support::run_pi_sample(&nefele, &[sample.as_ref(), "main".as_ref()]);
}
