//! Process manager procmgrd and the nefele CLI. Not built yet: see the procmgr issue.
//!
//! This crate is an empty placeholder that keeps the workspace layout fixed;
//! it exports nothing and claims nothing.
