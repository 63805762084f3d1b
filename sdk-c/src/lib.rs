//! The C SDK (`libnefele.so`/`.a`, cbindgen headers).
//!
//! This crate is an empty placeholder that keeps the workspace layout fixed;
//! it exports nothing and claims nothing yet.
