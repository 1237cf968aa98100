//! Operations on a whole archive, one module each: `verify` (ranges, gaps, integrity),
//! `retention` (what `delete` may remove), `import` (bulk-load a plain directory), `summary`
//! (what `status` shows of the archive).

pub mod check;
pub mod import;
pub mod retention;
pub mod summary;
pub mod verify;

pub use verify::{verify, TimelineReport, VerifyReport};

use crate::store::{Archive, Error};
use crate::wal::{parse_history_file, ArchiveName, Switch};
use std::collections::BTreeMap;

/// The archived history files among `names`, parsed: timeline → its switches, oldest first.
/// One that does not parse is an error: what retention keeps depends on it.
pub async fn read_histories<'a>(
    archive: &Archive,
    names: impl IntoIterator<Item = &'a ArchiveName>,
) -> Result<BTreeMap<u32, Vec<Switch>>, Error> {
    let mut out = BTreeMap::new();
    for name in names {
        if let Some(data) = archive.fetch(name).await? {
            let history =
                parse_history_file(&data, name.timeline()).map_err(|why| Error::Refused {
                    name: name.to_string(),
                    why: format!("not a timeline history file: {why}"),
                })?;
            out.insert(name.timeline(), history);
        }
    }
    Ok(out)
}
