//! Operations on a whole archive, one module each: `verify` (ranges, gaps, integrity),
//! `retention` (what `delete` may remove), `import` (bulk-load a plain directory), `summary`
//! (what `status` shows of the archive).

pub mod import;
pub mod retention;
pub mod summary;
pub mod verify;

pub use verify::{verify, TimelineReport, VerifyReport};
