//! walfs: a PostgreSQL WAL archive in an object store, presented as a directory.
//!
//! Data flows one way: `cli`/`fs` → `cache` → `store` → `envelope`; `wal` is vocabulary
//! shared by all.

pub mod cache;
pub mod cli;
pub mod config;
pub mod envelope;
pub mod fs;
pub mod ops;
pub mod readahead;
pub mod receive;
pub mod store;
pub mod telemetry;
pub mod wal;
