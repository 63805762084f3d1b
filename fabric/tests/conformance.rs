//! The conformance suite against every local transport.
use fabric::conformance_suite;

conformance_suite!(fabric_shm, fabric::transport::ShmTransport);
conformance_suite!(fabric_inproc, fabric::transport::InprocTransport);
conformance_suite!(fabric_remote, fabric::remote::TcpTransport);
