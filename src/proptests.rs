//! Property tests of every parser that reads what walfs does not control: objects from the
//! bucket, archive names, history files and backup labels, page headers, key files,
//! connection strings, server certificates. Arbitrary input must give a result or an error,
//! never a panic or a hang; an object must open only if it is exactly what was sealed.
//!
//! Each target runs `WALFS_PROPTEST_CASES` cases (default 2,000) and prints how many it ran
//! and how long they took.

use crate::envelope::{self, Key, Keyring, SealOptions};
use crate::receive::{conninfo, tls};
use crate::wal::{self, ArchiveName};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::time::Instant;

fn cases() -> u32 {
    std::env::var("WALFS_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// Runs `test` over `strategy` and reports executions and time.
fn run<S: Strategy>(target: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let n = cases();
    let mut runner = TestRunner::new(Config {
        cases: n,
        failure_persistence: None,
        ..Config::default()
    });
    let t0 = Instant::now();
    runner
        .run(&strategy, test)
        .unwrap_or_else(|e| panic!("{target}: {e}"));
    eprintln!(
        "proptest {target}: {n} cases in {:.2?}, no panic",
        t0.elapsed()
    );
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

/// Text near the shapes the parsers expect: digits, hex, separators, quotes, escapes and a
/// few multi-byte characters.
fn texty(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            proptest::char::range('0', '9'),
            proptest::char::range('A', 'F'),
            Just('.'),
            Just('/'),
            Just('\t'),
            Just('\n'),
            Just(' '),
            Just('='),
            Just('\''),
            Just('\\'),
            Just('#'),
            Just('é'),
            Just('\u{1F600}'),
            any::<char>(),
        ],
        0..max,
    )
    .prop_map(|v| v.into_iter().collect())
}

fn ring(b: u8) -> Keyring {
    Keyring::new(Key::from_bytes([b; 32]), Vec::new()).unwrap()
}

const NAME: &str = "000000010000000000000003";

#[test]
fn envelope_reader_never_panics_on_arbitrary_bytes() {
    let keyed = ring(1);
    run("envelope open (arbitrary bytes)", bytes(4096), |b| {
        let _ = envelope::open(NAME, &b, Some(&keyed));
        let _ = envelope::open(NAME, &b, None);
        let _ = envelope::Header::parse(&b);
        Ok(())
    });
}

#[test]
fn envelope_reader_refuses_every_mutation_of_a_sealed_object() {
    let keyed = ring(2);
    let opts = SealOptions {
        level: 3,
        chunk_size: 4096,
    };
    let strategy = (
        bytes(12_000),
        any::<bool>(),
        proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        0usize..3,
    );
    run(
        "envelope open (mutated objects)",
        strategy,
        |(data, with_key, flips, cut)| {
            let r = with_key.then_some(&keyed);
            let obj = envelope::seal(NAME, &data, r.map(Keyring::current), opts);
            prop_assert_eq!(envelope::open(NAME, &obj, r).unwrap(), data.clone());
            let mut bad = obj.clone();
            for (at, x) in &flips {
                let i = at % bad.len();
                bad[i] ^= x.max(&1);
            }
            match cut {
                1 => bad.truncate(bad.len() / 2),
                2 => bad.extend_from_slice(&[0; 7]),
                _ => {}
            }
            if bad != obj {
                prop_assert!(
                    envelope::open(NAME, &bad, r).is_err(),
                    "a changed object opened"
                );
            }
            Ok(())
        },
    );
}

#[test]
fn name_parser_never_panics() {
    run("archive names", texty(48), |s| {
        if let Ok(n) = ArchiveName::parse(&s) {
            prop_assert_eq!(n.as_str(), s.as_str());
            let _ = (n.kind(), n.timeline());
            let _ = n.segment(wal::SegmentSize::DEFAULT);
            let _ = n.wal_position(wal::SegmentSize::DEFAULT);
        }
        Ok(())
    });
}

#[test]
fn history_and_backup_parsers_never_panic() {
    let backup = ArchiveName::parse("000000010000000000000002.00000028.backup").unwrap();
    run(
        "history files and backup labels",
        (texty(300), bytes(300)),
        |(text, raw)| {
            for b in [text.as_bytes(), &raw[..]] {
                let _ = wal::parse_history_file(b, 7);
                let _ = wal::parse_backup_file(b, &backup, Some(wal::SegmentSize::DEFAULT));
                let _ = wal::parse_backup_file(b, &backup, None);
            }
            Ok(())
        },
    );
    // Near misses of a real label: an LSN and a 24-character file name of odd characters.
    let file = proptest::collection::vec(
        prop_oneof![
            Just('0'),
            Just('2'),
            Just('A'),
            Just('\u{e9}'),
            Just('\u{1F600}'),
            Just(' ')
        ],
        20..28,
    )
    .prop_map(|v| v.into_iter().collect::<String>());
    run(
        "backup labels (near misses)",
        (any::<u64>(), file),
        |(lsn, file)| {
            let lsn = wal::Lsn(lsn % 0x1_0000_0000_0000);
            let label = format!(
            "START WAL LOCATION: {lsn} (file {file})\nSTOP WAL LOCATION: FFFF/FFFFFFFF (file x)\nSTOP TIME: x\n"
        );
            let _ =
                wal::parse_backup_file(label.as_bytes(), &backup, Some(wal::SegmentSize::DEFAULT));
            let _ = wal::parse_backup_file(label.as_bytes(), &backup, None);
            Ok(())
        },
    );
}

#[test]
fn page_header_and_key_file_parsers_never_panic() {
    run(
        "page headers and key files",
        (bytes(64), bytes(200), texty(200)),
        |(h, k, t)| {
            let _ = wal::parse_long_header(&h);
            let _ = Keyring::from_file_contents(&k);
            let _ = Keyring::from_file_contents(t.as_bytes());
            Ok(())
        },
    );
}

#[test]
fn conninfo_parser_never_panics_and_round_trips() {
    run("connection strings", texty(200), |s| {
        if let Ok(pairs) = conninfo::parse(&s) {
            prop_assert_eq!(conninfo::parse(&conninfo::format(&pairs)).unwrap(), pairs);
        }
        let _ = tls::take_ssl_params(&s);
        Ok(())
    });
}

#[test]
fn certificate_reader_never_panics() {
    run("server certificates (DER)", bytes(2048), |b| {
        let _ = tls::end_point_hash(&b);
        let mut der = vec![0x30, 0x82, (b.len() >> 8) as u8, b.len() as u8];
        der.extend_from_slice(&b);
        let _ = tls::end_point_hash(&der);
        Ok(())
    });
}
