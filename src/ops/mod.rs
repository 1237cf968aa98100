//! Operations on a whole archive, one module each: `verify` (ranges, gaps, integrity),
//! `retention` (what `delete` may remove), `import` (bulk-load a plain directory), `summary`
//! (what `status` shows of the archive).

pub mod import;
pub mod retention;
pub mod summary;
pub mod verify;

pub use verify::{verify, TimelineReport, VerifyReport};

use crate::readahead::{parse_history, Switch};
use crate::store::{Archive, Error};
use crate::wal::ArchiveName;
use std::collections::BTreeMap;

/// The archived history files among `names`, parsed: timeline → its switches, oldest first.
pub async fn read_histories<'a>(
    archive: &Archive,
    names: impl IntoIterator<Item = &'a ArchiveName>,
) -> Result<BTreeMap<u32, Vec<Switch>>, Error> {
    let mut out = BTreeMap::new();
    for name in names {
        if let Some(data) = archive.fetch(name).await? {
            out.insert(
                name.timeline(),
                parse_history(&String::from_utf8_lossy(&data)),
            );
        }
    }
    Ok(out)
}
