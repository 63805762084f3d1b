//! Tenancy ledger ledgerd. Not built yet: nothing here works.
//!
//! This crate is an empty placeholder that keeps the workspace layout fixed;
//! it exports nothing and claims nothing.
