//! walfs: a PostgreSQL WAL archive in an object store, presented as a directory.
//!
//! Data flows one way: `cli`/`fuse` → `fs` → `cache` → `store` → `envelope`; `wal` is
//! vocabulary shared by all, `restore` and `caller` decide what a failed read means. Base
//! backups: `cli` → `backup` → `store`, and the mount's `backups/` view `fs` → `backupfs` →
//! `backup`/`store`.

pub mod ahead;
pub mod backup;
pub mod backupfs;
pub mod cache;
pub mod caller;
pub mod cli;
pub mod config;
pub mod dirlock;
pub mod envelope;
pub mod fs;
pub mod fuse;
pub mod ops;
#[cfg(test)]
mod proptests;
pub mod readahead;
pub mod receive;
pub mod restore;
pub mod spool;
pub mod store;
pub mod telemetry;
pub mod wal;
