//! The object format: a fixed header, then the file in independent chunks, each zstd-compressed
//! (when that helps) and sealed with AES-256-GCM, or, without a key, followed by a checksum tag.
//!
//! ```text
//! header (72 bytes, little-endian)
//!   0  magic "WALFSENV"          8  version (1)         9  cipher (0 none, 1 AES-256-GCM)
//!   10 compression (0 none, 1 zstd)   11 reserved (0)
//!   12 chunk size (u32)          16 plaintext length (u64)
//!   24 key id (8 bytes)          32 nonce prefix (7 bytes)   39 reserved (0)
//!   40 SHA-256 of the plaintext (32 bytes)
//! chunk* : u32 sealed length, then sealed bytes = seal(kind byte (0 raw, 1 zstd) ++ body) ++ tag (16)
//! ```
//!
//! Every chunk's nonce is `nonce prefix ++ chunk index (u32 BE) ++ last-chunk flag`, and its
//! associated data is the whole header followed by the file's archive name. So a flipped byte
//! anywhere, a truncated, reordered or extended object, an object swapped with another or renamed
//! fails to open. Without a key the tag is a truncated SHA-256 over the same inputs: it detects
//! damage, not forgery. The plaintext length sits at a fixed offset, so `st_size` needs only
//! [`HEADER_LEN`] bytes.

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit};
use sha2::{Digest, Sha256};
use std::fmt;

pub const MAGIC: &[u8; 8] = b"WALFSENV";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 72;
const TAG_LEN: usize = 16;
const FRAME_LEN: usize = 4;
/// No file PostgreSQL archives is larger than the largest segment.
pub const MAX_PLAINTEXT: u64 = 1 << 30;
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
const KIND_RAW: u8 = 0;
const KIND_ZSTD: u8 = 1;

/// A 256-bit archive key and its public id (a hash of it, stored in every object header).
#[derive(Clone)]
pub struct Key {
    bytes: [u8; 32],
    id: KeyId,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        write!(f, "Key(id {})", self.id)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("a key file holds 64 hex digits (or 32 raw bytes); this one holds {0} bytes")]
    WrongLength(usize),
    #[error("the key file is not hex: {0}")]
    NotHex(String),
}

impl Key {
    pub fn from_bytes(bytes: [u8; 32]) -> Key {
        let mut h = Sha256::new();
        h.update(b"walfs key id v1\0");
        h.update(bytes);
        let mut id = [0u8; 8];
        id.copy_from_slice(&h.finalize()[..8]);
        Key {
            bytes,
            id: KeyId(id),
        }
    }

    /// A fresh random key.
    pub fn generate() -> std::io::Result<Key> {
        let mut bytes = [0u8; 32];
        getrandom::getrandom(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Key::from_bytes(bytes))
    }

    /// Reads a key file: 64 hex digits (surrounding white space ignored) or 32 raw bytes.
    pub fn from_file_contents(contents: &[u8]) -> Result<Key, KeyError> {
        let text = std::str::from_utf8(contents).map(str::trim);
        match text {
            Ok(t) if t.len() == 64 => {
                let mut bytes = [0u8; 32];
                hex::decode_to_slice(t, &mut bytes).map_err(|e| KeyError::NotHex(e.to_string()))?;
                Ok(Key::from_bytes(bytes))
            }
            _ if contents.len() == 32 => {
                let mut bytes = [0u8; 32];
                bytes.copy_from_slice(contents);
                Ok(Key::from_bytes(bytes))
            }
            Ok(t) => Err(KeyError::WrongLength(t.len())),
            Err(_) => Err(KeyError::WrongLength(contents.len())),
        }
    }

    /// The text a key file holds: 64 hex digits and a newline.
    pub fn to_file_contents(&self) -> String {
        format!("{}\n", hex::encode(self.bytes))
    }

    pub fn id(&self) -> KeyId {
        self.id
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cipher {
    None,
    Aes256Gcm,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd,
}

/// The fixed-size header at the start of every object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub cipher: Cipher,
    pub compression: Compression,
    pub chunk_size: u32,
    pub plaintext_len: u64,
    pub key_id: KeyId,
    nonce_prefix: [u8; 7],
    /// SHA-256 of the plaintext: what "same content" means on re-archive.
    pub digest: [u8; 32],
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    #[error("not a walfs object (bad magic)")]
    NotWalfs,
    #[error("object format version {0} is newer than this walfs understands")]
    UnsupportedVersion(u8),
    #[error("the object is encrypted (key id {0}) and no key is configured (--key-file)")]
    KeyRequired(KeyId),
    #[error("wrong key: the object was sealed with key id {object}, the configured key has id {configured}")]
    WrongKey { object: KeyId, configured: KeyId },
    #[error("damaged object: {0}")]
    Corrupt(String),
    #[error("writing the opened file: {0}")]
    Output(String),
}

fn corrupt(why: impl Into<String>) -> OpenError {
    OpenError::Corrupt(why.into())
}

impl Header {
    /// Parses and sanity-checks a header. It is authenticated only when the chunks are opened.
    pub fn parse(bytes: &[u8]) -> Result<Header, OpenError> {
        if bytes.len() < HEADER_LEN {
            return if bytes.len() >= 8 && &bytes[..8] != MAGIC {
                Err(OpenError::NotWalfs)
            } else {
                Err(corrupt(format!("truncated header ({} bytes)", bytes.len())))
            };
        }
        if &bytes[..8] != MAGIC {
            return Err(OpenError::NotWalfs);
        }
        if bytes[8] != VERSION {
            return Err(OpenError::UnsupportedVersion(bytes[8]));
        }
        let cipher = match bytes[9] {
            0 => Cipher::None,
            1 => Cipher::Aes256Gcm,
            c => return Err(corrupt(format!("unknown cipher {c}"))),
        };
        let compression = match bytes[10] {
            0 => Compression::None,
            1 => Compression::Zstd,
            c => return Err(corrupt(format!("unknown compression {c}"))),
        };
        if bytes[11] != 0 || bytes[39] != 0 {
            return Err(corrupt("reserved header bytes are set"));
        }
        let chunk_size = u32::from_le_bytes(bytes[12..16].try_into().unwrap_or_default());
        if !(4096..=(64 << 20)).contains(&chunk_size) {
            return Err(corrupt(format!("implausible chunk size {chunk_size}")));
        }
        let plaintext_len = u64::from_le_bytes(bytes[16..24].try_into().unwrap_or_default());
        if plaintext_len > MAX_PLAINTEXT {
            return Err(corrupt(format!("implausible length {plaintext_len}")));
        }
        let mut key_id = [0u8; 8];
        key_id.copy_from_slice(&bytes[24..32]);
        let mut nonce_prefix = [0u8; 7];
        nonce_prefix.copy_from_slice(&bytes[32..39]);
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&bytes[40..72]);
        Ok(Header {
            cipher,
            compression,
            chunk_size,
            plaintext_len,
            key_id: KeyId(key_id),
            nonce_prefix,
            digest,
        })
    }

    fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..8].copy_from_slice(MAGIC);
        b[8] = VERSION;
        b[9] = match self.cipher {
            Cipher::None => 0,
            Cipher::Aes256Gcm => 1,
        };
        b[10] = match self.compression {
            Compression::None => 0,
            Compression::Zstd => 1,
        };
        b[12..16].copy_from_slice(&self.chunk_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.plaintext_len.to_le_bytes());
        b[24..32].copy_from_slice(&self.key_id.0);
        b[32..39].copy_from_slice(&self.nonce_prefix);
        b[40..72].copy_from_slice(&self.digest);
        b
    }

    fn chunk_count(&self) -> usize {
        // An empty file still has one (empty, last) chunk, so cutting every chunk is detected.
        (self.plaintext_len.div_ceil(u64::from(self.chunk_size))).max(1) as usize
    }
}

/// The digest of a file's content as shown to operators (SHA-256, as `sha256sum` prints it).
pub fn digest(plaintext: &[u8]) -> [u8; 32] {
    Sha256::digest(plaintext).into()
}

/// How to seal.
#[derive(Clone, Copy, Debug)]
pub struct SealOptions {
    /// zstd level; 0 stores chunks uncompressed.
    pub level: i32,
    pub chunk_size: u32,
}

impl Default for SealOptions {
    fn default() -> Self {
        SealOptions {
            level: 3,
            chunk_size: DEFAULT_CHUNK_SIZE,
        }
    }
}

/// Per-object sealing state shared by all chunks.
struct Sealer<'a> {
    aead: Option<Aes256Gcm>,
    header: &'a Header,
    aad: Vec<u8>,
}

impl<'a> Sealer<'a> {
    fn new(header: &'a Header, header_bytes: &[u8], name: &str, key: Option<&Key>) -> Self {
        let mut aad = Vec::with_capacity(HEADER_LEN + name.len());
        aad.extend_from_slice(header_bytes);
        aad.extend_from_slice(name.as_bytes());
        Sealer {
            aead: key.map(|k| Aes256Gcm::new((&k.bytes).into())),
            header,
            aad,
        }
    }

    fn nonce(&self, i: usize) -> [u8; 12] {
        let mut n = [0u8; 12];
        n[..7].copy_from_slice(&self.header.nonce_prefix);
        n[7..11].copy_from_slice(&(i as u32).to_be_bytes());
        n[11] = u8::from(i + 1 == self.header.chunk_count());
        n
    }

    fn checksum_tag(&self, nonce: &[u8; 12], payload: &[u8]) -> [u8; TAG_LEN] {
        let mut h = Sha256::new();
        h.update(b"walfs chunk tag v1\0");
        h.update(nonce);
        h.update((self.aad.len() as u64).to_le_bytes());
        h.update(&self.aad);
        h.update(payload);
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&h.finalize()[..TAG_LEN]);
        tag
    }

    /// Seals a compressed payload (kind byte ++ body, after a frame placeholder) of chunk `i`
    /// in place into a framed record.
    fn seal_record(&self, i: usize, out: &mut Vec<u8>) {
        let nonce = self.nonce(i);
        let tag = match &self.aead {
            Some(aead) => {
                let t = aead
                    .encrypt_in_place_detached((&nonce).into(), &self.aad, &mut out[FRAME_LEN..])
                    .expect("AES-GCM encryption of a chunk below 64 GiB cannot fail");
                let mut tag = [0u8; TAG_LEN];
                tag.copy_from_slice(&t);
                tag
            }
            None => self.checksum_tag(&nonce, &out[FRAME_LEN..]),
        };
        out.extend_from_slice(&tag);
        let sealed_len = (out.len() - FRAME_LEN) as u32;
        out[..FRAME_LEN].copy_from_slice(&sealed_len.to_le_bytes());
    }

    /// Authenticates and expands one sealed record into `dest` (exactly its chunk's length).
    fn open_chunk(&self, i: usize, sealed: &[u8], dest: &mut [u8]) -> Result<(), OpenError> {
        let (body, tag) = sealed.split_at(sealed.len() - TAG_LEN);
        let nonce = self.nonce(i);
        let mut payload = body.to_vec();
        match &self.aead {
            Some(aead) => aead
                .decrypt_in_place_detached((&nonce).into(), &self.aad, &mut payload, tag.into())
                .map_err(|_| corrupt(format!("chunk {i} fails authentication")))?,
            None => {
                if self.checksum_tag(&nonce, &payload) != tag {
                    return Err(corrupt(format!("chunk {i} fails its checksum")));
                }
            }
        }
        let (kind, body) = payload
            .split_first()
            .ok_or_else(|| corrupt(format!("chunk {i} is empty")))?;
        match *kind {
            KIND_RAW if body.len() == dest.len() => dest.copy_from_slice(body),
            KIND_ZSTD => {
                let n = zstd::bulk::decompress_to_buffer(body, dest)
                    .map_err(|e| corrupt(format!("chunk {i} does not decompress: {e}")))?;
                if n != dest.len() {
                    return Err(corrupt(format!(
                        "chunk {i} has {n} bytes, expected {}",
                        dest.len()
                    )));
                }
            }
            _ => return Err(corrupt(format!("chunk {i} has the wrong shape"))),
        }
        Ok(())
    }
}

/// A record in the making: frame placeholder, kind byte, zstd body (or the raw chunk when
/// compression does not help).
fn compress_chunk(chunk: &[u8], level: i32) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_LEN + 1 + chunk.len() / 2 + TAG_LEN);
    out.extend_from_slice(&[0u8; FRAME_LEN]);
    let compressed = if level > 0 && !chunk.is_empty() {
        zstd::bulk::compress(chunk, level)
            .ok()
            .filter(|c| c.len() < chunk.len())
    } else {
        None
    };
    match compressed {
        Some(c) => {
            out.push(KIND_ZSTD);
            out.extend_from_slice(&c);
        }
        None => {
            out.push(KIND_RAW);
            out.extend_from_slice(chunk);
        }
    }
    out
}

/// How many threads to spread `chunks` chunks over.
fn workers(chunks: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.min(chunks).max(1)
}

/// Plaintext to seal, read at offsets: bytes in memory, or a file of known length (so a
/// 1 GiB segment is never held in memory whole).
#[derive(Clone, Copy)]
pub enum Source<'a> {
    Bytes(&'a [u8]),
    File(&'a std::fs::File, u64),
}

impl Source<'_> {
    pub fn len(&self) -> u64 {
        match self {
            Source::Bytes(b) => b.len() as u64,
            Source::File(_, len) => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fills `buf` from `offset`; a file shorter than its announced length is an error.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        match self {
            Source::Bytes(b) => {
                let start = usize::try_from(offset).unwrap_or(usize::MAX);
                let src = b
                    .get(start..start.saturating_add(buf.len()))
                    .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
                buf.copy_from_slice(src);
                Ok(())
            }
            Source::File(f, _) => std::os::unix::fs::FileExt::read_exact_at(*f, buf, offset),
        }
    }

    /// SHA-256 of the whole plaintext, read block by block.
    pub fn digest(&self) -> std::io::Result<[u8; 32]> {
        if let Source::Bytes(b) = self {
            return Ok(digest(b));
        }
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0u64;
        while at < self.len() {
            let n = (self.len() - at).min(buf.len() as u64) as usize;
            self.read_exact_at(&mut buf[..n], at)?;
            h.update(&buf[..n]);
            at += n as u64;
        }
        Ok(h.finalize().into())
    }
}

/// Seals `plaintext` as the object for archive name `name`, in memory. CPU-bound: call from a
/// blocking context.
pub fn seal(name: &str, plaintext: &[u8], key: Option<&Key>, opts: SealOptions) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() / 2);
    match seal_to(name, Source::Bytes(plaintext), key, opts, &mut out) {
        Ok(_) => out,
        // Reading memory and writing a Vec cannot fail.
        Err(e) => unreachable!("sealing in memory failed: {e}"),
    }
}

/// Seals `src` as the object for archive name `name` and writes it to `out`; returns the
/// object's length. Memory stays at a few chunks whatever the file's size: one pass hashes the
/// plaintext (the digest is in the header, which every chunk authenticates), a second
/// compresses a window of chunks on every core and writes them in order. CPU-bound: call from
/// a blocking context.
pub fn seal_to(
    name: &str,
    src: Source<'_>,
    key: Option<&Key>,
    opts: SealOptions,
    out: &mut dyn std::io::Write,
) -> std::io::Result<u64> {
    if src.len() > MAX_PLAINTEXT {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{} bytes: larger than any WAL file ({MAX_PLAINTEXT})",
                src.len()
            ),
        ));
    }
    let mut nonce_prefix = [0u8; 7];
    if key.is_some() {
        // A nonce must never repeat under one key: 56 random bits per object, plus the chunk
        // index, leave the chance of a collision negligible for any archive's lifetime.
        getrandom::getrandom(&mut nonce_prefix)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
    }
    let header = Header {
        cipher: if key.is_some() {
            Cipher::Aes256Gcm
        } else {
            Cipher::None
        },
        compression: if opts.level > 0 {
            Compression::Zstd
        } else {
            Compression::None
        },
        chunk_size: opts.chunk_size,
        plaintext_len: src.len(),
        key_id: key.map_or(KeyId([0; 8]), Key::id),
        nonce_prefix,
        digest: src.digest()?,
    };
    let header_bytes = header.to_bytes();
    let sealer = Sealer::new(&header, &header_bytes, name, key);
    out.write_all(&header_bytes)?;
    let mut written = HEADER_LEN as u64;
    let chunk_size = opts.chunk_size as usize;
    let n = header.chunk_count();
    let threads = workers(n);
    let mut buffers: Vec<Vec<u8>> = vec![vec![0u8; chunk_size]; threads];
    let mut first = 0;
    while first < n {
        let count = threads.min(n - first);
        let records: Vec<std::io::Result<Vec<u8>>> = std::thread::scope(|s| {
            let handles: Vec<_> = buffers[..count]
                .iter_mut()
                .enumerate()
                .map(|(j, buf)| {
                    let i = first + j;
                    s.spawn(move || {
                        let start = (i * chunk_size) as u64;
                        let len =
                            (src.len() - start.min(src.len())).min(chunk_size as u64) as usize;
                        src.read_exact_at(&mut buf[..len], start)?;
                        Ok(compress_chunk(&buf[..len], opts.level))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(std::io::Error::other("sealing worker panicked")))
                })
                .collect()
        });
        for (j, record) in records.into_iter().enumerate() {
            let mut record = record?;
            sealer.seal_record(first + j, &mut record);
            out.write_all(&record)?;
            written += record.len() as u64;
        }
        first += count;
    }
    Ok(written)
}

/// A sink for opened plaintext: `(offset, bytes)`, called from several threads.
pub type Sink<'a> = dyn Fn(u64, &[u8]) -> std::io::Result<()> + Sync + 'a;

/// Opens the object stored for `name` into `sink`, chunk by chunk on every core. Nothing the
/// sink received may be used unless this returns Ok (with the plaintext length): a damaged
/// chunk anywhere fails the whole object. CPU-bound: call from a blocking context.
pub fn open_into(
    name: &str,
    object: &[u8],
    key: Option<&Key>,
    sink: &Sink<'_>,
) -> Result<u64, OpenError> {
    let header = Header::parse(object)?;
    let key = match (header.cipher, key) {
        (Cipher::None, _) => None,
        (Cipher::Aes256Gcm, None) => return Err(OpenError::KeyRequired(header.key_id)),
        (Cipher::Aes256Gcm, Some(k)) if k.id() != header.key_id => {
            return Err(OpenError::WrongKey {
                object: header.key_id,
                configured: k.id(),
            })
        }
        (Cipher::Aes256Gcm, Some(k)) => Some(k),
    };
    let n = header.chunk_count();
    // Each record needs at least a frame, a kind byte and a tag: refuse lengths the object
    // cannot hold before allocating for them.
    let min_record = FRAME_LEN + 1 + TAG_LEN;
    if (object.len() - HEADER_LEN) / min_record < n {
        return Err(corrupt("truncated: fewer chunks than the header announces"));
    }
    // Frame the records (cheap), then open them in parallel.
    let mut records = Vec::with_capacity(n);
    let mut pos = HEADER_LEN;
    for i in 0..n {
        let len_bytes = object
            .get(pos..pos + FRAME_LEN)
            .ok_or_else(|| corrupt(format!("truncated before chunk {i}")))?;
        let len = u32::from_le_bytes(len_bytes.try_into().unwrap_or_default()) as usize;
        pos += FRAME_LEN;
        let sealed = object
            .get(pos..pos + len)
            .filter(|s| s.len() > TAG_LEN)
            .ok_or_else(|| corrupt(format!("truncated inside chunk {i}")))?;
        records.push(sealed);
        pos += len;
    }
    if pos != object.len() {
        return Err(corrupt(format!(
            "{} bytes after the last chunk",
            object.len() - pos
        )));
    }
    let sealer = Sealer::new(&header, &object[..HEADER_LEN], name, key);
    // Workers take chunks in turn and hand each, once authenticated and expanded, to the
    // sink: memory stays at one chunk per worker whatever the file's size.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let cs = header.chunk_size as usize;
    let results: Vec<Result<(), OpenError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers(n))
            .map(|_| {
                let (sealer, records, next) = (&sealer, &records, &next);
                let header = &header;
                s.spawn(move || {
                    let mut buf = vec![0u8; cs];
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= n {
                            return Ok(());
                        }
                        let start = i * cs;
                        let len = cs.min(
                            header.plaintext_len as usize
                                - start.min(header.plaintext_len as usize),
                        );
                        let dest = &mut buf[..len];
                        sealer.open_chunk(i, records[i], dest)?;
                        sink(start as u64, dest).map_err(|e| OpenError::Output(e.to_string()))?;
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(corrupt("worker panicked"))))
            .collect()
    });
    results.into_iter().collect::<Result<(), _>>()?;
    // No whole-file hash here: every chunk authenticated against the header (which fixes the
    // chunk count and each chunk's length) and its index, the last chunk carries the last
    // flag, and nothing follows it, so the plaintext is exactly what was sealed. The header's
    // digest serves content comparisons (re-archive), not integrity.
    Ok(header.plaintext_len)
}

/// Opens the object stored for `name` into memory: authenticates every chunk before
/// returning a single byte. CPU-bound: call from a blocking context.
pub fn open(name: &str, object: &[u8], key: Option<&Key>) -> Result<Vec<u8>, OpenError> {
    let len = Header::parse(object)?.plaintext_len as usize;
    let out = std::sync::Mutex::new(vec![0u8; len]);
    open_into(name, object, key, &|at, bytes| {
        let mut v = out.lock().unwrap_or_else(|p| p.into_inner());
        v[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
        Ok(())
    })?;
    Ok(out.into_inner().unwrap_or_else(|p| p.into_inner()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAME: &str = "000000010000000000000003";

    fn key(b: u8) -> Key {
        Key::from_bytes([b; 32])
    }

    fn sample(len: usize) -> Vec<u8> {
        // Compressible but not trivial: text-like runs and a counter.
        (0..len)
            .map(|i| {
                if (i / 4096) % 3 == 0 {
                    (i % 251) as u8
                } else {
                    0
                }
            })
            .collect()
    }

    fn small_chunks() -> SealOptions {
        SealOptions {
            level: 3,
            chunk_size: 4096,
        }
    }

    #[test]
    fn round_trips_with_and_without_key() {
        for len in [0, 1, 4095, 4096, 4097, 3 * 4096 + 17, 100_000] {
            let data = sample(len);
            for k in [None, Some(key(7))] {
                for level in [0, 3] {
                    let opts = SealOptions {
                        level,
                        chunk_size: 4096,
                    };
                    let obj = seal(NAME, &data, k.as_ref(), opts);
                    assert_eq!(open(NAME, &obj, k.as_ref()).unwrap(), data, "len {len}");
                    let h = Header::parse(&obj[..HEADER_LEN]).unwrap();
                    assert_eq!(h.plaintext_len, len as u64);
                    assert_eq!(h.digest, digest(&data));
                }
            }
        }
    }

    #[test]
    fn compresses() {
        let data = sample(1 << 20);
        let obj = seal(NAME, &data, Some(&key(1)), SealOptions::default());
        assert!(obj.len() < data.len() / 3, "{} bytes", obj.len());
    }

    #[test]
    fn nonces_differ_between_objects() {
        let data = sample(10_000);
        let a = seal(NAME, &data, Some(&key(1)), small_chunks());
        let b = seal(NAME, &data, Some(&key(1)), small_chunks());
        assert_ne!(a, b);
    }

    fn assert_corrupt(r: Result<Vec<u8>, OpenError>, what: &str) {
        match r {
            Err(OpenError::Corrupt(_)) | Err(OpenError::NotWalfs) => {}
            other => panic!("{what}: expected a damaged-object error, got {other:?}"),
        }
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let data = sample(3 * 4096 + 100);
        for k in [None, Some(key(3))] {
            let obj = seal(NAME, &data, k.as_ref(), small_chunks());
            for pos in 0..obj.len() {
                let mut bad = obj.clone();
                bad[pos] ^= 0x40;
                let r = open(NAME, &bad, k.as_ref());
                // A flip inside the key id of an encrypted object reads as another key.
                let key_id_field = (24..32).contains(&pos);
                match r {
                    Ok(_) => panic!(
                        "flip at {pos} of {} accepted (key {})",
                        obj.len(),
                        k.is_some()
                    ),
                    Err(OpenError::WrongKey { .. }) if key_id_field => {}
                    Err(OpenError::UnsupportedVersion(_)) if pos == 8 => {}
                    Err(e) => assert!(
                        matches!(e, OpenError::Corrupt(_) | OpenError::NotWalfs),
                        "flip at {pos}: {e:?}"
                    ),
                }
            }
        }
    }

    #[test]
    fn truncation_and_extension_are_refused() {
        let data = sample(3 * 4096 + 100);
        for k in [None, Some(key(3))] {
            let obj = seal(NAME, &data, k.as_ref(), small_chunks());
            for cut in [
                0,
                7,
                HEADER_LEN - 1,
                HEADER_LEN,
                HEADER_LEN + 3,
                obj.len() / 2,
                obj.len() - 1,
            ] {
                assert_corrupt(
                    open(NAME, &obj[..cut], k.as_ref()),
                    &format!("cut at {cut}"),
                );
            }
            let mut longer = obj.clone();
            longer.extend_from_slice(&[0u8; 21]);
            assert_corrupt(open(NAME, &longer, k.as_ref()), "extended");
            // Dropping whole trailing chunks while fixing up nothing else.
            let empty = seal(NAME, &[], k.as_ref(), small_chunks());
            assert_corrupt(
                open(NAME, &empty[..HEADER_LEN], k.as_ref()),
                "empty file cut",
            );
        }
    }

    #[test]
    fn reordered_chunks_are_refused() {
        let data = sample(2 * 4096);
        for k in [None, Some(key(9))] {
            let obj = seal(
                NAME,
                &sample(2 * 4096),
                k.as_ref(),
                SealOptions {
                    level: 0,
                    chunk_size: 4096,
                },
            );
            // Two raw chunks of equal length: swap the records.
            let rec = (obj.len() - HEADER_LEN) / 2;
            let mut swapped = obj[..HEADER_LEN].to_vec();
            swapped.extend_from_slice(&obj[HEADER_LEN + rec..]);
            swapped.extend_from_slice(&obj[HEADER_LEN..HEADER_LEN + rec]);
            assert_corrupt(open(NAME, &swapped, k.as_ref()), "swapped chunks");
            assert_eq!(open(NAME, &obj, k.as_ref()).unwrap(), data);
        }
    }

    #[test]
    fn renamed_or_swapped_objects_are_refused() {
        for k in [None, Some(key(4))] {
            let a = seal(NAME, &sample(5000), k.as_ref(), small_chunks());
            assert_corrupt(open("000000010000000000000004", &a, k.as_ref()), "renamed");
            // Another object's body under this object's header.
            let b = seal(
                "000000010000000000000004",
                &sample(5000),
                k.as_ref(),
                small_chunks(),
            );
            let mut mixed = a[..HEADER_LEN].to_vec();
            mixed.extend_from_slice(&b[HEADER_LEN..]);
            assert_corrupt(open(NAME, &mixed, k.as_ref()), "swapped body");
        }
    }

    #[test]
    fn key_errors_are_named() {
        let obj = seal(NAME, &sample(100), Some(&key(1)), small_chunks());
        assert!(matches!(
            open(NAME, &obj, Some(&key(2))),
            Err(OpenError::WrongKey { .. })
        ));
        assert!(matches!(
            open(NAME, &obj, None),
            Err(OpenError::KeyRequired(_))
        ));
        // An object sealed without a key opens with one configured (key added later).
        let plain = seal(NAME, &sample(100), None, small_chunks());
        assert_eq!(open(NAME, &plain, Some(&key(2))).unwrap(), sample(100));
        assert_eq!(
            open(NAME, b"not an object at all, clearly", None),
            Err(OpenError::NotWalfs)
        );
    }

    #[test]
    fn key_files() {
        let k = Key::generate().unwrap();
        let again = Key::from_file_contents(k.to_file_contents().as_bytes()).unwrap();
        assert_eq!(again.id(), k.id());
        assert_eq!(
            Key::from_file_contents(&[5u8; 32]).unwrap().id(),
            key(5).id()
        );
        assert!(matches!(
            Key::from_file_contents(b"abcd\n"),
            Err(KeyError::WrongLength(4))
        ));
        assert!(matches!(
            Key::from_file_contents("z".repeat(64).as_bytes()),
            Err(KeyError::NotHex(_))
        ));
        assert!(!format!("{k:?}").contains(&k.to_file_contents()[..10]));
    }
}
