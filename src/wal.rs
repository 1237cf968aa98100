//! PostgreSQL WAL vocabulary: archive file names, LSN and timeline arithmetic for any
//! `wal_segment_size`, and the checks on a segment's first (long) page header.
//!
//! Pure functions, no I/O. Everything else in walfs asks this module what a name means.

use std::fmt;

/// Smallest and largest `wal_segment_size` PostgreSQL accepts (powers of two in between).
pub const MIN_SEGMENT_SIZE: u64 = 1 << 20;
pub const MAX_SEGMENT_SIZE: u64 = 1 << 30;

/// `XLP_LONG_HEADER` in `xlp_info`: the first page of every segment carries a long header.
const XLP_LONG_HEADER: u16 = 0x0002;
/// Size of `XLogLongPageHeaderData` on the 64-bit little-endian platforms PostgreSQL ships for.
pub const LONG_HEADER_LEN: usize = 40;

/// A position in the WAL stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// As PostgreSQL writes it, `0/2000028`.
impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for Lsn {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let bad = || NameError::BadLsn(s.to_string());
        let (hi, lo) = s.split_once('/').ok_or_else(bad)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(bad());
        }
        let hi = u64::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| bad())?;
        Ok(Lsn((hi << 32) | lo))
    }
}

/// A validated `wal_segment_size`: a power of two from 1 MiB to 1 GiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SegmentSize(u64);

impl SegmentSize {
    pub const DEFAULT: SegmentSize = SegmentSize(16 << 20);

    pub fn new(bytes: u64) -> Result<Self, NameError> {
        if bytes.is_power_of_two() && (MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&bytes) {
            Ok(SegmentSize(bytes))
        } else {
            Err(NameError::BadSegmentSize(bytes))
        }
    }

    pub fn bytes(self) -> u64 {
        self.0
    }

    /// Segments per "xlogid" (the middle eight hex digits of a segment name).
    pub fn segments_per_xlogid(self) -> u64 {
        0x1_0000_0000 / self.0
    }

    /// The segment number holding `lsn`.
    pub fn segno(self, lsn: Lsn) -> u64 {
        lsn.0 / self.0
    }

    /// The first LSN of segment `segno`.
    pub fn start_lsn(self, segno: u64) -> Lsn {
        Lsn(segno * self.0)
    }
}

/// A segment on a timeline: the 24 hex digits `TTTTTTTTXXXXXXXXYYYYYYYY`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentId {
    pub timeline: u32,
    /// `xlogid * segments_per_xlogid + seg`, i.e. `lsn / segment_size`.
    pub segno: u64,
}

impl SegmentId {
    /// The file name for this segment under `size`.
    pub fn file_name(self, size: SegmentSize) -> String {
        let per = size.segments_per_xlogid();
        format!(
            "{:08X}{:08X}{:08X}",
            self.timeline,
            self.segno / per,
            self.segno % per
        )
    }

    /// The next segment on the same timeline (the log-id rollover is in the arithmetic).
    pub fn next(self) -> SegmentId {
        SegmentId {
            timeline: self.timeline,
            segno: self.segno + 1,
        }
    }

    /// Parses 24 hex digits. The third group must be below the segments per xlogid of `size`.
    pub fn parse(name: &str, size: SegmentSize) -> Result<SegmentId, NameError> {
        let (timeline, xlogid, seg) = split_segment_digits(name)?;
        if u64::from(seg) >= size.segments_per_xlogid() {
            return Err(NameError::SegmentOutOfRange {
                name: name.to_string(),
                segment_size: size.bytes(),
            });
        }
        Ok(SegmentId {
            timeline,
            segno: u64::from(xlogid) * size.segments_per_xlogid() + u64::from(seg),
        })
    }
}

fn is_upper_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

fn split_segment_digits(name: &str) -> Result<(u32, u32, u32), NameError> {
    if name.len() != 24 || !is_upper_hex(name) {
        return Err(NameError::NotArchiveName(name.to_string()));
    }
    let part = |r: std::ops::Range<usize>| u32::from_str_radix(&name[r], 16);
    match (part(0..8), part(8..16), part(16..24)) {
        (Ok(t), Ok(x), Ok(s)) if t != 0 => Ok((t, x, s)),
        _ => Err(NameError::NotArchiveName(name.to_string())),
    }
}

/// What kind of file an archive name denotes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileKind {
    /// A complete segment: `000000010000000000000003`.
    Segment,
    /// An incomplete segment: `000000010000000000000003.partial`.
    Partial,
    /// A timeline history file: `00000002.history`.
    History,
    /// A backup label: `000000010000000000000003.00000028.backup`.
    Backup,
}

impl fmt::Display for FileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileKind::Segment => "WAL segment",
            FileKind::Partial => "partial WAL segment",
            FileKind::History => "timeline history file",
            FileKind::Backup => "backup history file",
        })
    }
}

/// A file name PostgreSQL may hand to archive_command or ask of restore_command.
///
/// Parsing checks the shape only; whether the segment digits fit the archive's segment size is
/// checked by [`SegmentId::parse`] once that size is known.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ArchiveName {
    name: String,
}

impl ArchiveName {
    pub fn parse(name: &str) -> Result<ArchiveName, NameError> {
        let ok = || {
            Ok(ArchiveName {
                name: name.to_string(),
            })
        };
        if let Some(seg) = name.strip_suffix(".partial") {
            split_segment_digits(seg).map_err(|_| NameError::NotArchiveName(name.into()))?;
            return ok();
        }
        if let Some(tli) = name.strip_suffix(".history") {
            if tli.len() == 8 && is_upper_hex(tli) && tli != "00000000" {
                return ok();
            }
            return Err(NameError::NotArchiveName(name.into()));
        }
        if let Some(rest) = name.strip_suffix(".backup") {
            let valid = rest.len() == 33
                && rest.as_bytes()[24] == b'.'
                && split_segment_digits(&rest[..24]).is_ok()
                && is_upper_hex(&rest[25..]);
            return if valid {
                ok()
            } else {
                Err(NameError::NotArchiveName(name.into()))
            };
        }
        split_segment_digits(name)?;
        ok()
    }

    pub fn as_str(&self) -> &str {
        &self.name
    }

    pub fn kind(&self) -> FileKind {
        if self.name.ends_with(".partial") {
            FileKind::Partial
        } else if self.name.ends_with(".history") {
            FileKind::History
        } else if self.name.ends_with(".backup") {
            FileKind::Backup
        } else {
            FileKind::Segment
        }
    }

    /// The timeline this file belongs to.
    pub fn timeline(&self) -> u32 {
        // Every accepted shape starts with eight hex digits naming the timeline.
        u32::from_str_radix(&self.name[..8], 16).unwrap_or(0)
    }

    /// The segment a segment or `.partial` file holds (None for history and backup files).
    pub fn segment(&self, size: SegmentSize) -> Result<Option<SegmentId>, NameError> {
        match self.kind() {
            FileKind::Segment | FileKind::Partial => {
                SegmentId::parse(&self.name[..24], size).map(Some)
            }
            FileKind::History | FileKind::Backup => Ok(None),
        }
    }

    /// The segment a file belongs to in WAL order: the one a segment or `.partial` holds, the
    /// one a `.backup` file's backup started in; None for history files.
    pub fn wal_position(&self, size: SegmentSize) -> Result<Option<SegmentId>, NameError> {
        match self.kind() {
            FileKind::History => Ok(None),
            _ => SegmentId::parse(&self.name[..24], size).map(Some),
        }
    }
}

impl fmt::Display for ArchiveName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error(
        "{0:?} is not a PostgreSQL WAL archive name (expected a 24-hex-digit segment, \
         SEGMENT.partial, TIMELINE.history or SEGMENT.OFFSET.backup)"
    )]
    NotArchiveName(String),
    #[error("{name}: segment number out of range for wal_segment_size {segment_size}")]
    SegmentOutOfRange { name: String, segment_size: u64 },
    #[error("wal_segment_size {0} is not a power of two between 1 MiB and 1 GiB")]
    BadSegmentSize(u64),
    #[error("{0:?} is not an LSN (expected X/X in hex)")]
    BadLsn(String),
}

/// What the long page header at the start of a segment says about the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LongPageHeader {
    pub magic: u16,
    pub timeline: u32,
    pub page_addr: Lsn,
    pub system_identifier: u64,
    pub segment_size: SegmentSize,
    pub block_size: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("too short to be a WAL segment ({0} bytes)")]
    TooShort(usize),
    #[error("the first page has no long header (xlp_info {0:#06x}): not a WAL segment")]
    NoLongHeader(u16),
    #[error("unexpected WAL page magic {0:#06x}")]
    BadMagic(u16),
    #[error("page header names wal_segment_size {0}, which PostgreSQL cannot produce")]
    BadSegmentSize(u32),
    #[error("page header names block size {0}, which PostgreSQL cannot produce")]
    BadBlockSize(u32),
}

/// Parses the long page header that starts every WAL segment.
pub fn parse_long_header(data: &[u8]) -> Result<LongPageHeader, HeaderError> {
    if data.len() < LONG_HEADER_LEN {
        return Err(HeaderError::TooShort(data.len()));
    }
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes([data[o], data[o + 1], data[o + 2], data[o + 3]]);
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&data[o..o + 8]);
        u64::from_le_bytes(b)
    };
    let magic = u16_at(0);
    let info = u16_at(2);
    // Every release since 9.x uses 0xD0xx/0xD1xx; anything else is not WAL at all.
    if magic & 0xFE00 != 0xD000 {
        return Err(HeaderError::BadMagic(magic));
    }
    if info & XLP_LONG_HEADER == 0 {
        return Err(HeaderError::NoLongHeader(info));
    }
    let seg_size = u32_at(32);
    let segment_size =
        SegmentSize::new(u64::from(seg_size)).map_err(|_| HeaderError::BadSegmentSize(seg_size))?;
    let block_size = u32_at(36);
    if !block_size.is_power_of_two() || !(1024..=65536).contains(&block_size) {
        return Err(HeaderError::BadBlockSize(block_size));
    }
    Ok(LongPageHeader {
        magic,
        timeline: u32_at(4),
        page_addr: Lsn(u64_at(8)),
        system_identifier: u64_at(24),
        segment_size,
        block_size,
    })
}

/// One entry of a timeline history file: the parent timeline and where the child left it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Switch {
    pub parent: u32,
    pub end: Lsn,
}

/// Text files (history, backup labels) larger than this are not PostgreSQL's.
pub const MAX_TEXT_FILE: u64 = 16 << 20;

/// Checks a timeline history file as PostgreSQL writes it (`writeTimeLineHistory`) and reads
/// it (`readTimeLineHistory`): text, complete lines (`parent TAB X/X TAB reason NEWLINE`, blank
/// and `#` lines allowed), at least one entry, parents increasing and below `timeline`, switch
/// points not going back. Returns the entries, oldest first. A file cut short ends without its
/// newline and is refused; one cut exactly at a line end cannot be told from a shorter history.
pub fn parse_history_file(data: &[u8], timeline: u32) -> Result<Vec<Switch>, String> {
    let text = std::str::from_utf8(data).map_err(|_| "not text".to_string())?;
    if !text.ends_with('\n') {
        return Err(
            "its last line is incomplete (no final newline): the file was cut short".into(),
        );
    }
    let mut out: Vec<Switch> = Vec::new();
    for (no, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let bad = |why: &str| format!("line {}: {why}: {line:?}", no + 1);
        let mut f = l.split_whitespace();
        let parent: u32 = f
            .next()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| bad("expected a timeline number"))?;
        let end: Lsn = f
            .next()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| bad("expected a switch point X/X"))?;
        if let Some(prev) = out.last() {
            if parent <= prev.parent {
                return Err(bad("timelines must increase"));
            }
            if end < prev.end {
                return Err(bad("switch points must not go back"));
            }
        }
        if parent == 0 || parent >= timeline {
            return Err(bad(&format!(
                "timeline {parent} cannot be an ancestor of timeline {timeline}"
            )));
        }
        out.push(Switch { parent, end });
    }
    if out.is_empty() {
        return Err("no timeline entries".into());
    }
    Ok(out)
}

/// What a backup history file (`SEGMENT.OFFSET.backup`) says about its backup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupLabel {
    pub start: Lsn,
    pub stop: Lsn,
}

/// Checks a backup history file as `pg_backup_stop` writes it: text that starts with
/// `START WAL LOCATION: X/X (file SEGMENT)`, has a `STOP WAL LOCATION` line and ends with a
/// complete `STOP TIME` or `STOP TIMELINE` line (the last ones written), and whose start
/// matches `name` (the segment digits always; the offset too when `size` is known).
pub fn parse_backup_file(
    data: &[u8],
    name: &ArchiveName,
    size: Option<SegmentSize>,
) -> Result<BackupLabel, String> {
    let text = std::str::from_utf8(data).map_err(|_| "not text".to_string())?;
    if !text.ends_with('\n') {
        return Err(
            "its last line is incomplete (no final newline): the file was cut short".into(),
        );
    }
    let location = |key: &str| -> Result<(Lsn, String), String> {
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .ok_or_else(|| format!("no {key} line"))?;
        let (lsn, rest) = line.trim().split_once(' ').unwrap_or((line.trim(), ""));
        let lsn: Lsn = lsn
            .parse()
            .map_err(|_| format!("{key} {line:?} is not an LSN"))?;
        let file = rest
            .trim()
            .strip_prefix("(file ")
            .and_then(|r| r.strip_suffix(')'))
            .ok_or_else(|| format!("{key} {line:?} names no file"))?;
        Ok((lsn, file.to_string()))
    };
    if !text.starts_with("START WAL LOCATION: ") {
        return Err("it does not start with START WAL LOCATION: not a backup history file".into());
    }
    let (start, start_file) = location("START WAL LOCATION: ")?;
    let (stop, _) = location("STOP WAL LOCATION: ")?;
    let last = text.lines().last().unwrap_or_default();
    if !(last.starts_with("STOP TIME: ") || last.starts_with("STOP TIMELINE: ")) {
        return Err(format!(
            "its last line is {last:?}, not STOP TIME or STOP TIMELINE: the file was cut short"
        ));
    }
    if stop < start {
        return Err(format!("it stops ({stop}) before it starts ({start})"));
    }
    let n = name.as_str();
    // Bytes, not characters: the text is the file's and may hold anything.
    if start_file.len() != 24 || start_file.as_bytes()[8..] != n.as_bytes()[8..24] {
        return Err(format!(
            "it starts in {start_file}, but its name {n} says segment {}",
            &n[8..24]
        ));
    }
    if let Some(size) = size {
        let offset = format!("{:08X}", start.0 % size.bytes());
        if n[25..33] != offset {
            return Err(format!(
                "it starts at {start} (offset {offset} in its segment), but its name says {}",
                &n[25..33]
            ));
        }
    }
    Ok(BackupLabel { start, stop })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(mb: u64) -> SegmentSize {
        SegmentSize::new(mb << 20).unwrap()
    }

    #[test]
    fn accepts_every_archive_name_shape() {
        for (name, kind) in [
            ("000000010000000000000003", FileKind::Segment),
            ("00000001000000A5000000FF", FileKind::Segment),
            ("000000010000000000000003.partial", FileKind::Partial),
            ("00000002.history", FileKind::History),
            ("000000010000000000000003.00000028.backup", FileKind::Backup),
        ] {
            let n = ArchiveName::parse(name).unwrap();
            assert_eq!(n.kind(), kind, "{name}");
            assert_eq!(n.as_str(), name);
        }
        assert_eq!(
            ArchiveName::parse("0000000A.history").unwrap().timeline(),
            10
        );
    }

    #[test]
    fn refuses_other_names() {
        for name in [
            "",
            "foo",
            "00000001000000000000003",   // 23 digits
            "0000000100000000000000033", // 25 digits
            "000000010000000000000003.gz",
            "00000001000000000000000g",
            "000000010000000000000003a",
            "0000000100000000000000a3", // lower case: PostgreSQL never writes it
            "000000000000000000000003", // timeline 0 does not exist
            "00000000.history",
            "0000002.history",
            "00000002.history.tmp",
            "000000010000000000000003.backup",
            "000000010000000000000003.0000028.backup",
            "../000000010000000000000003",
            "archive_status",
            "000000010000000000000003.partial.partial",
        ] {
            assert!(ArchiveName::parse(name).is_err(), "{name:?} accepted");
        }
    }

    #[test]
    fn segment_names_follow_segment_size() {
        // 16 MiB: 256 segments per xlogid.
        let s16 = size(16);
        assert_eq!(s16.segments_per_xlogid(), 256);
        let id = SegmentId::parse("0000000100000001000000FF", s16).unwrap();
        assert_eq!(id.segno, 511);
        assert_eq!(id.next().file_name(s16), "000000010000000200000000");
        // 1 MiB: 4096 per xlogid; 1 GiB: 4 per xlogid.
        let s1 = size(1);
        assert_eq!(
            SegmentId::parse("000000010000000000000FFF", s1)
                .unwrap()
                .next()
                .file_name(s1),
            "000000010000000100000000"
        );
        let s1g = size(1024);
        assert!(SegmentId::parse("000000010000000000000004", s1g).is_err());
        assert_eq!(
            SegmentId::parse("000000010000000000000003", s1g)
                .unwrap()
                .next()
                .file_name(s1g),
            "000000010000000100000000"
        );
        // 16 MiB names above 0xFF in the low group do not exist.
        assert!(SegmentId::parse("000000010000000000000100", s16).is_err());
    }

    #[test]
    fn lsn_arithmetic() {
        let lsn: Lsn = "1/A2000028".parse().unwrap();
        assert_eq!(lsn.0, 0x1_A200_0028);
        assert_eq!(lsn.to_string(), "1/A2000028");
        let s16 = size(16);
        let id = SegmentId {
            timeline: 3,
            segno: s16.segno(lsn),
        };
        assert_eq!(id.file_name(s16), "0000000300000001000000A2");
        assert_eq!(s16.start_lsn(id.segno), Lsn(0x1_A200_0000));
        assert!("1A2000028".parse::<Lsn>().is_err());
        assert!("/0".parse::<Lsn>().is_err());
        assert!("123456789/0".parse::<Lsn>().is_err());
    }

    #[test]
    fn segment_sizes() {
        assert!(SegmentSize::new(1 << 20).is_ok());
        assert!(SegmentSize::new(1 << 30).is_ok());
        assert!(SegmentSize::new(1 << 19).is_err());
        assert!(SegmentSize::new(1 << 31).is_err());
        assert!(SegmentSize::new(3 << 20).is_err());
    }

    fn header(magic: u16, info: u16, seg: u32, blk: u32) -> Vec<u8> {
        let mut h = vec![0u8; 8192];
        h[0..2].copy_from_slice(&magic.to_le_bytes());
        h[2..4].copy_from_slice(&info.to_le_bytes());
        h[4..8].copy_from_slice(&1u32.to_le_bytes());
        h[8..16].copy_from_slice(&0x300_0000u64.to_le_bytes());
        h[24..32].copy_from_slice(&7_123_456_789u64.to_le_bytes());
        h[32..36].copy_from_slice(&seg.to_le_bytes());
        h[36..40].copy_from_slice(&blk.to_le_bytes());
        h
    }

    #[test]
    fn long_header() {
        let h = parse_long_header(&header(0xD110, 0x0002, 16 << 20, 8192)).unwrap();
        assert_eq!(h.system_identifier, 7_123_456_789);
        assert_eq!(h.segment_size, size(16));
        assert_eq!(h.page_addr, Lsn(0x300_0000));
        assert_eq!(
            parse_long_header(&header(0xD110, 0, 16 << 20, 8192)),
            Err(HeaderError::NoLongHeader(0))
        );
        assert!(parse_long_header(&header(0x1234, 2, 16 << 20, 8192)).is_err());
        assert!(parse_long_header(&header(0xD110, 2, 3 << 20, 8192)).is_err());
        assert!(parse_long_header(&header(0xD110, 2, 16 << 20, 1000)).is_err());
        assert_eq!(
            parse_long_header(&[0u8; 10]),
            Err(HeaderError::TooShort(10))
        );
    }

    #[test]
    fn history_files_are_checked_whole() {
        let good =
            b"1\t0/3000000\tno recovery target specified\n\n2\t0/5000000\tat restore point \"x\"\n";
        let h = parse_history_file(good, 3).unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(
            h[1],
            Switch {
                parent: 2,
                end: Lsn(0x500_0000)
            }
        );
        assert!(parse_history_file(b"# comment\n1\t0/3000000\treason\n", 2).is_ok());
        for (bad, why) in [
            (&b""[..], "newline"),
            (b"\n", "no timeline"),
            (b"1\t0/3000000\tno recovery", "newline"),
            (b"1\t0/30", "newline"),
            (b"1\t0/3000000\tx\n1\t0/4000000\ty\n", "increase"),
            (b"2\t0/3000000\tx\n", "ancestor"),
            (b"x\t0/3000000\tx\n", "timeline number"),
            (b"1\tzz\tx\n", "switch point"),
            (b"1\t0/5000000\tx\n2\t0/4000000\ty\n", "go back"),
            (b"\xff\xfe\n", "text"),
        ] {
            let e = parse_history_file(bad, if why == "ancestor" { 2 } else { 3 }).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn backup_files_are_checked_whole_and_against_their_name() {
        let text = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n\
                    STOP WAL LOCATION: 0/2000100 (file 000000010000000000000002)\n\
                    CHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\n\
                    BACKUP FROM: primary\nSTART TIME: 2026-11-22 10:00:00 UTC\n\
                    LABEL: base\nSTART TIMELINE: 1\nSTOP TIME: 2026-11-22 10:00:01 UTC\n\
                    STOP TIMELINE: 1\n";
        let name = ArchiveName::parse("000000010000000000000002.00000028.backup").unwrap();
        let l = parse_backup_file(text.as_bytes(), &name, Some(size(16))).unwrap();
        assert_eq!(l.start, Lsn(0x200_0028));
        assert!(parse_backup_file(text.as_bytes(), &name, None).is_ok());
        // Every cut is refused, whether or not it falls on a line end.
        for cut in [0, 10, 70, text.len() - 16, text.len() - 1] {
            assert!(
                parse_backup_file(&text.as_bytes()[..cut], &name, Some(size(16))).is_err(),
                "cut at {cut} accepted"
            );
        }
        let cut_at_line = &text[..text.rfind("STOP TIMELINE").unwrap()];
        assert!(
            parse_backup_file(cut_at_line.as_bytes(), &name, None).is_ok(),
            "STOP TIME ends older labels"
        );
        let cut_more = &text[..text.rfind("STOP TIME:").unwrap()];
        assert!(parse_backup_file(cut_more.as_bytes(), &name, None).is_err());
        for other in [
            "000000010000000000000003.00000028.backup",
            "000000010000000000000002.00000030.backup",
        ] {
            let n = ArchiveName::parse(other).unwrap();
            assert!(
                parse_backup_file(text.as_bytes(), &n, Some(size(16))).is_err(),
                "{other}"
            );
        }
        assert!(parse_backup_file(b"hello\n", &name, None).is_err());
        // A multi-byte character where a digit should be: an error, not a panic.
        let odd = "START WAL LOCATION: 0/2000028 (file 0000000\u{e9}000000000000002)\n\
                   STOP WAL LOCATION: 0/2000100 (file x)\nSTOP TIME: x\n";
        assert!(parse_backup_file(odd.as_bytes(), &name, None).is_err());
    }
}
