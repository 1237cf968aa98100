//! The object format. Version 2 is written; version 1 (walfs before it) is still read.
//!
//! Every object is a fixed header, then the file in independent chunks, each zstd-compressed
//! (when that helps) and sealed with AES-256-GCM, or, in an archive without a key, followed by
//! a checksum tag. docs/FORMAT.md describes both versions for other implementations.
//!
//! ```text
//! header, version 2 (64 bytes, little-endian)
//!   0  magic "WALFSENV"          8  version (2)         9  cipher (0 none, 1 AES-256-GCM)
//!   10 compression (0 none, 1 zstd)   11 reserved (0)
//!   12 chunk size (u32)          16 plaintext length (u64)
//!   24 key id (8 bytes; zeros without a key)
//!   32 salt (32 random bytes)
//! chunk* : u32 sealed length, then sealed bytes = seal(kind byte (0 raw, 1 zstd) ++ body) ++ tag (16)
//! ```
//!
//! With a key, each object has a key of its own: `HKDF-SHA256(ikm = archive key, salt = the
//! header's salt, info = "walfs v2 object key")`, 32 bytes. Chunk `i` of `n` is sealed with
//! AES-256-GCM under it, with the STREAM construction's nonce (`7 zero bytes ++ i as u32 BE ++
//! 1 if i = n-1 else 0`: unique within the object, and the key is never used for another), and
//! associated data = the whole header ++ the file's archive name. So a flipped byte anywhere, a
//! truncated, reordered or extended object, an object swapped with another or renamed fails to
//! open. Two objects share a key only if their 256-bit salts collide: among 2^40 objects (a
//! cluster archiving a segment a second for 35,000 years) the chance is below 2^-177, and no
//! nonce is ever repeated under one key; GCM's per-key limits (2^32 chunks of at most 64 MiB)
//! are far above the 2^18 chunks of the largest WAL file.
//!
//! In an archive with a key, an object that is not encrypted, or is encrypted under a key the
//! keyring does not hold, is damage, never data. Without a key the tag is a truncated SHA-256
//! over the same inputs: it detects damage, not forgery. The header carries no digest of the
//! plaintext (it would confirm guesses of small files to whoever reads the bucket). The
//! plaintext length sits at a fixed offset, so `st_size` needs only [`HEADER_LEN`] bytes.
//!
//! Version 1 differs in its header (72 bytes: a 7-byte random nonce prefix at 32, a reserved
//! byte at 39, the SHA-256 of the plaintext at 40), its chunks being sealed directly under the
//! archive key with `nonce prefix ++ i ++ last` as the nonce, and "walfs chunk tag v1" in the
//! checksum tag.

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit};
use sha2::{Digest, Sha256};
use std::fmt;

pub const MAGIC: &[u8; 8] = b"WALFSENV";
/// The version written.
pub const VERSION: u8 = 2;
const V1_HEADER_LEN: usize = 72;
const V2_HEADER_LEN: usize = 64;
/// Bytes that hold the header of any version (a ranged read of this many gives `st_size`).
pub const HEADER_LEN: usize = V1_HEADER_LEN;
const TAG_LEN: usize = 16;
const FRAME_LEN: usize = 4;
/// No file PostgreSQL archives is larger than the largest segment.
pub const MAX_PLAINTEXT: u64 = 1 << 30;
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
/// The chunk sizes a header may claim. walfs has only ever written [`DEFAULT_CHUNK_SIZE`]
/// (tests write 4096). The header is authenticated only when chunk 0 opens, so this bound is
/// what caps the memory a forged header can make a reader spend before it is refused: one
/// chunk per opening thread and per queued record.
const MIN_CHUNK_SIZE: u32 = 4096;
const MAX_CHUNK_SIZE: u32 = DEFAULT_CHUNK_SIZE;
const KIND_RAW: u8 = 0;
const KIND_ZSTD: u8 = 1;

/// A 256-bit archive key and its public id (a hash of it, stored in every object header).
#[derive(Clone)]
pub struct Key {
    bytes: [u8; 32],
    id: KeyId,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
    #[error("a key file holds keys of 64 hex digits, one per line (or 32 raw bytes); line {line} holds {len} characters")]
    WrongLength { line: usize, len: usize },
    #[error("a key file holds 64 hex digits per line; line {line} is not hex")]
    NotHex { line: usize },
    #[error("the key file holds no key")]
    Empty,
    #[error("the key file holds the key with id {0} twice")]
    Duplicate(KeyId),
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

    /// The line a key file holds for this key: 64 hex digits and a newline.
    pub fn to_file_line(&self) -> String {
        format!("{}\n", hex::encode(self.bytes))
    }

    pub fn id(&self) -> KeyId {
        self.id
    }

    /// A key of 32 bytes derived from this one for `purpose` (HKDF-SHA256, optional salt).
    pub(crate) fn derive(&self, salt: Option<&[u8]>, purpose: &[u8]) -> [u8; 32] {
        let mut out = [0u8; 32];
        hkdf::Hkdf::<Sha256>::new(salt, &self.bytes)
            .expand(purpose, &mut out)
            .unwrap_or_else(|_| unreachable!("HKDF-SHA256 gives 32 bytes"));
        out
    }
}

/// The keys an archive is read with; the first (the current key) also writes. A key file
/// holds one key per line, current first: adding a key on top and moving the archive to it
/// (`walfs key rotate`) rotates keys, and older objects stay readable while their key is kept.
#[derive(Clone, Debug)]
pub struct Keyring {
    keys: Vec<Key>,
}

impl Keyring {
    pub fn new(current: Key, older: Vec<Key>) -> Result<Keyring, KeyError> {
        let mut keys = vec![current];
        for k in older {
            if keys.iter().any(|o| o.id() == k.id()) {
                return Err(KeyError::Duplicate(k.id()));
            }
            keys.push(k);
        }
        Ok(Keyring { keys })
    }

    /// Reads a key file: keys of 64 hex digits, one per line, the current one first (blank
    /// lines and `#` comments ignored); or a single key of 32 raw bytes.
    pub fn from_file_contents(contents: &[u8]) -> Result<Keyring, KeyError> {
        let Ok(text) = std::str::from_utf8(contents) else {
            return if contents.len() == 32 {
                let mut bytes = [0u8; 32];
                bytes.copy_from_slice(contents);
                Ok(Keyring {
                    keys: vec![Key::from_bytes(bytes)],
                })
            } else {
                Err(KeyError::WrongLength {
                    line: 1,
                    len: contents.len(),
                })
            };
        };
        let mut keys: Vec<Key> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let t = line.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            if t.len() != 64 {
                // 32 raw bytes that happen to be valid UTF-8.
                if contents.len() == 32 && keys.is_empty() {
                    let mut bytes = [0u8; 32];
                    bytes.copy_from_slice(contents);
                    return Ok(Keyring {
                        keys: vec![Key::from_bytes(bytes)],
                    });
                }
                return Err(KeyError::WrongLength {
                    line: i + 1,
                    len: t.len(),
                });
            }
            let mut bytes = [0u8; 32];
            hex::decode_to_slice(t, &mut bytes).map_err(|_| KeyError::NotHex { line: i + 1 })?;
            let k = Key::from_bytes(bytes);
            if keys.iter().any(|o| o.id() == k.id()) {
                return Err(KeyError::Duplicate(k.id()));
            }
            keys.push(k);
        }
        if keys.is_empty() {
            return Err(KeyError::Empty);
        }
        Ok(Keyring { keys })
    }

    /// The text of a key file for this keyring.
    pub fn to_file_contents(&self) -> String {
        self.keys.iter().map(Key::to_file_line).collect()
    }

    /// The key new objects are sealed with.
    pub fn current(&self) -> &Key {
        &self.keys[0]
    }

    pub fn get(&self, id: KeyId) -> Option<&Key> {
        self.keys.iter().find(|k| k.id() == id)
    }

    pub fn keys(&self) -> &[Key] {
        &self.keys
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
    pub version: u8,
    pub cipher: Cipher,
    pub compression: Compression,
    pub chunk_size: u32,
    pub plaintext_len: u64,
    pub key_id: KeyId,
    /// Version 2: the salt the object's key is derived with. Version 1: bytes 32..39 are the
    /// nonce prefix (the rest is unused).
    salt: [u8; 32],
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    #[error("not a walfs object (bad magic)")]
    NotWalfs,
    #[error("object format version {0} is newer than this walfs understands")]
    UnsupportedVersion(u8),
    #[error("the object is encrypted (key id {0}) and no key is configured (--key-file)")]
    KeyRequired(KeyId),
    #[error("the object was sealed with key id {object}, which the configured key file does not hold (its current key has id {configured})")]
    WrongKey { object: KeyId, configured: KeyId },
    #[error("the object is not encrypted, but this archive is: walfs never writes one, so it is damage or tampering")]
    Unencrypted,
    #[error("damaged object: {0}")]
    Corrupt(String),
    #[error("writing the opened file: {0}")]
    Output(String),
}

fn corrupt(why: impl Into<String>) -> OpenError {
    OpenError::Corrupt(why.into())
}

impl Header {
    /// Parses and sanity-checks a header of either version. It is authenticated only when the
    /// chunks are opened.
    pub fn parse(bytes: &[u8]) -> Result<Header, OpenError> {
        if bytes.len() < 9 {
            return if bytes.len() >= 8 && &bytes[..8] != MAGIC {
                Err(OpenError::NotWalfs)
            } else {
                Err(corrupt(format!("truncated header ({} bytes)", bytes.len())))
            };
        }
        if &bytes[..8] != MAGIC {
            return Err(OpenError::NotWalfs);
        }
        let version = bytes[8];
        let len = match version {
            1 => V1_HEADER_LEN,
            2 => V2_HEADER_LEN,
            v => return Err(OpenError::UnsupportedVersion(v)),
        };
        if bytes.len() < len {
            return Err(corrupt(format!("truncated header ({} bytes)", bytes.len())));
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
        if bytes[11] != 0 || (version == 1 && bytes[39] != 0) {
            return Err(corrupt("reserved header bytes are set"));
        }
        let u32_at =
            |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let chunk_size = u32_at(12);
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(corrupt(format!("implausible chunk size {chunk_size}")));
        }
        let mut b8 = [0u8; 8];
        b8.copy_from_slice(&bytes[16..24]);
        let plaintext_len = u64::from_le_bytes(b8);
        if plaintext_len > MAX_PLAINTEXT {
            return Err(corrupt(format!("implausible length {plaintext_len}")));
        }
        let mut key_id = [0u8; 8];
        key_id.copy_from_slice(&bytes[24..32]);
        let mut salt = [0u8; 32];
        match version {
            1 => salt[..7].copy_from_slice(&bytes[32..39]),
            _ => salt.copy_from_slice(&bytes[32..64]),
        }
        Ok(Header {
            version,
            cipher,
            compression,
            chunk_size,
            plaintext_len,
            key_id: KeyId(key_id),
            salt,
        })
    }

    /// The header's length in the object.
    pub fn encoded_len(&self) -> usize {
        match self.version {
            1 => V1_HEADER_LEN,
            _ => V2_HEADER_LEN,
        }
    }

    /// The version 2 header's bytes (version 1 is never written).
    fn to_bytes(&self) -> [u8; V2_HEADER_LEN] {
        let mut b = [0u8; V2_HEADER_LEN];
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
        b[32..64].copy_from_slice(&self.salt);
        b
    }

    /// Where chunk `i`'s plaintext goes: (offset, length).
    fn span(&self, i: usize) -> (u64, usize) {
        let cs = u64::from(self.chunk_size);
        let start = (i as u64 * cs).min(self.plaintext_len);
        (start, (self.plaintext_len - start).min(cs) as usize)
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
struct Sealer {
    aead: Option<Aes256Gcm>,
    header: Header,
    aad: Vec<u8>,
}

impl Sealer {
    fn new(header: &Header, header_bytes: &[u8], name: &str, key: Option<&Key>) -> Self {
        let mut aad = Vec::with_capacity(header_bytes.len() + name.len());
        aad.extend_from_slice(header_bytes);
        aad.extend_from_slice(name.as_bytes());
        let aead = key.map(|k| match header.version {
            1 => Aes256Gcm::new((&k.bytes).into()),
            _ => Aes256Gcm::new(&k.derive(Some(&header.salt), b"walfs v2 object key").into()),
        });
        Sealer {
            aead,
            header: header.clone(),
            aad,
        }
    }

    fn nonce(&self, i: usize) -> [u8; 12] {
        let mut n = [0u8; 12];
        if self.header.version == 1 {
            n[..7].copy_from_slice(&self.header.salt[..7]);
        }
        n[7..11].copy_from_slice(&(i as u32).to_be_bytes());
        n[11] = u8::from(i + 1 == self.header.chunk_count());
        n
    }

    fn checksum_tag(&self, nonce: &[u8; 12], payload: &[u8]) -> [u8; TAG_LEN] {
        let mut h = Sha256::new();
        h.update(match self.header.version {
            1 => &b"walfs chunk tag v1\0"[..],
            _ => &b"walfs chunk tag v2\0"[..],
        });
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
/// object's length. Memory stays at a few chunks whatever the file's size: a window of chunks
/// is compressed on every core and written in order. CPU-bound: call from a blocking context.
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
    // The object's key is derived with this salt: no two objects share a key (see the module
    // documentation for the bound).
    let mut salt = [0u8; 32];
    getrandom::getrandom(&mut salt).map_err(|e| std::io::Error::other(e.to_string()))?;
    let header = Header {
        version: VERSION,
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
        salt,
    };
    let header_bytes = header.to_bytes();
    let sealer = Sealer::new(&header, &header_bytes, name, key);
    out.write_all(&header_bytes)?;
    let mut written = header_bytes.len() as u64;
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

/// A sink that can be handed to another thread.
pub type OwnedSink = dyn Fn(u64, &[u8]) -> std::io::Result<()> + Send + Sync + 'static;

/// Who waits for an open: a reader (now), or read-ahead (whose work must not take the CPU
/// that PostgreSQL's replay needs: its threads run at a lower priority).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    Reader,
    Background,
}

/// The key an object opens with, chosen from its header: an archive with a key holds only
/// objects encrypted under one of its keys; an archive without one, only unencrypted ones.
fn key_for<'k>(header: &Header, keys: Option<&'k Keyring>) -> Result<Option<&'k Key>, OpenError> {
    match (header.cipher, keys) {
        // An archive with a key holds only encrypted objects: anything else was planted.
        (Cipher::None, Some(_)) => Err(OpenError::Unencrypted),
        (Cipher::None, None) => Ok(None),
        (Cipher::Aes256Gcm, None) => Err(OpenError::KeyRequired(header.key_id)),
        (Cipher::Aes256Gcm, Some(ring)) => {
            ring.get(header.key_id)
                .map(Some)
                .ok_or(OpenError::WrongKey {
                    object: header.key_id,
                    configured: ring.current().id(),
                })
        }
    }
}

/// One object's chunks, authenticated and expanded one at a time (from any thread): the key
/// is chosen and the object's own key derived once, from its header.
pub struct Opener {
    sealer: Sealer,
}

impl Opener {
    /// `header_bytes`: the object's header, exactly (see [`Framer`]).
    pub fn new(
        name: &str,
        header_bytes: &[u8],
        keys: Option<&Keyring>,
    ) -> Result<Opener, OpenError> {
        let header = Header::parse(header_bytes)?;
        let key = key_for(&header, keys)?;
        let header_len = header.encoded_len();
        Ok(Opener {
            sealer: Sealer::new(&header, &header_bytes[..header_len], name, key),
        })
    }

    pub fn header(&self) -> &Header {
        &self.sealer.header
    }

    /// Where chunk `i`'s plaintext goes: (offset, length).
    fn span(&self, i: usize) -> (u64, usize) {
        self.header().span(i)
    }

    /// Ok when `opened` (what [`open_records`] returned) is every chunk of the object: fewer
    /// is a truncated object (or a download cut short, which its own error says first).
    pub fn all_opened(&self, opened: usize) -> Result<(), OpenError> {
        let n = self.header().chunk_count();
        if opened != n {
            return Err(corrupt(format!("{opened} of {n} chunks arrived")));
        }
        Ok(())
    }
}

/// The length of the header at the start of `prefix`, once `prefix` holds it (None: not yet).
fn header_len(prefix: &[u8]) -> Result<Option<usize>, OpenError> {
    if prefix.len() >= 8 && &prefix[..8] != MAGIC {
        return Err(OpenError::NotWalfs);
    }
    if prefix.len() < 9 {
        return Ok(None);
    }
    let len = match prefix[8] {
        1 => V1_HEADER_LEN,
        2 => V2_HEADER_LEN,
        v => return Err(OpenError::UnsupportedVersion(v)),
    };
    Ok((prefix.len() >= len).then_some(len))
}

/// The sealed length of record `i` at the start of `buf`, once its frame is there (None: not
/// yet). A length chunk `i` cannot seal to is refused before anything waits for its bytes, so
/// a hostile frame cannot make a reader buffer more than that chunk (whose size the header
/// claims: at most [`MAX_CHUNK_SIZE`]).
fn record_len(buf: &[u8], header: &Header, i: usize) -> Result<Option<usize>, OpenError> {
    let Some(frame) = buf.get(..FRAME_LEN) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
    // The kind byte, the body (never longer than zstd's bound for the chunk) and the tag.
    let chunk = header.span(i).1;
    let most = 1 + chunk + chunk / 128 + 1024 + TAG_LEN;
    if len <= TAG_LEN || len > most {
        return Err(corrupt(format!("chunk {i} claims {len} bytes")));
    }
    Ok(Some(len))
}

/// One piece of an object cut by a [`Framer`].
pub enum Piece {
    /// The header's bytes (for [`Opener::new`]).
    Header(bytes::Bytes),
    /// Record `i`'s sealed bytes.
    Record(usize, bytes::Bytes),
}

/// Cuts an object that arrives in pieces of any size (a download) into its header and its
/// sealed records, in order. It holds at most one record: a frame longer than any chunk can
/// seal to, a record past the header's count, and bytes after the last record are refused as
/// they arrive. [`Framer::finish`] says whether the object was whole.
#[derive(Default)]
pub struct Framer {
    buf: bytes::BytesMut,
    header: Option<Header>,
    next: usize,
}

impl Framer {
    /// Adds `data`; the pieces it completes are appended to `out`.
    pub fn push(&mut self, data: &[u8], out: &mut Vec<Piece>) -> Result<(), OpenError> {
        self.buf.extend_from_slice(data);
        loop {
            let Some(header) = &self.header else {
                let Some(len) = header_len(&self.buf)? else {
                    return Ok(());
                };
                let bytes = self.buf.split_to(len).freeze();
                self.header = Some(Header::parse(&bytes)?);
                out.push(Piece::Header(bytes));
                continue;
            };
            if self.next == header.chunk_count() {
                return match self.buf.len() {
                    0 => Ok(()),
                    n => Err(corrupt(format!("{n} bytes after the last chunk"))),
                };
            }
            let Some(len) = record_len(&self.buf, header, self.next)? else {
                return Ok(());
            };
            if self.buf.len() < FRAME_LEN + len {
                return Ok(());
            }
            let _ = self.buf.split_to(FRAME_LEN);
            out.push(Piece::Record(self.next, self.buf.split_to(len).freeze()));
            self.next += 1;
        }
    }

    /// The header, once it arrived.
    pub fn header(&self) -> Option<&Header> {
        self.header.as_ref()
    }

    /// The object ended: Ok only if it held its header and exactly the records it announces.
    pub fn finish(&self) -> Result<(), OpenError> {
        let Some(header) = &self.header else {
            return Err(match Header::parse(&self.buf) {
                Err(e) => e,
                Ok(_) => corrupt("truncated header"),
            });
        };
        if self.next < header.chunk_count() {
            return Err(corrupt(if self.buf.len() < FRAME_LEN {
                format!("truncated before chunk {}", self.next)
            } else {
                format!("truncated inside chunk {}", self.next)
            }));
        }
        Ok(())
    }
}

/// Opens records on every core as `next` hands them out (None: no more), each into `sink`,
/// until one fails; returns how many it opened, which [`Opener::all_opened`] must accept before
/// the sink's output means anything. Memory: one chunk per thread. CPU-bound: call from a
/// blocking context.
pub fn open_records<R: AsRef<[u8]>>(
    opener: &Opener,
    next: &(dyn Fn() -> Option<(usize, R)> + Sync),
    sink: &Sink<'_>,
    priority: Priority,
) -> Result<usize, OpenError> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let failed = AtomicBool::new(false);
    let opened = AtomicUsize::new(0);
    let header = opener.header();
    let cs = (header.chunk_size as usize).min(header.plaintext_len as usize);
    let work = || -> Result<(), OpenError> {
        if priority == Priority::Background {
            lower_priority();
        }
        // What the object claims, within bounds: no more than its plaintext.
        let mut buf = vec![0u8; cs];
        while !failed.load(Ordering::Relaxed) {
            let Some((i, sealed)) = next() else {
                return Ok(());
            };
            let (at, len) = opener.span(i);
            let dest = &mut buf[..len];
            opener.sealer.open_chunk(i, sealed.as_ref(), dest)?;
            sink(at, dest).map_err(|e| OpenError::Output(e.to_string()))?;
            opened.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    };
    let results: Vec<Result<(), OpenError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers(header.chunk_count()))
            .map(|_| {
                // A thread the system refuses (a task limit) is a local failure, never damage.
                std::thread::Builder::new().spawn_scoped(s, || {
                    let r = work();
                    if r.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h {
                Ok(h) => h.join().unwrap_or_else(|_| {
                    Err(OpenError::Output("an opening thread panicked".into()))
                }),
                Err(e) => {
                    failed.store(true, Ordering::Relaxed);
                    Err(OpenError::Output(format!(
                        "starting an opening thread: {e}"
                    )))
                }
            })
            .collect()
    });
    results.into_iter().collect::<Result<(), _>>()?;
    Ok(opened.into_inner())
}

/// Makes the calling thread yield the CPU to work at its process's priority: 10 nicer than
/// it was. A thread that decodes ahead must not slow the reader, or the replay, it works for.
/// (Per thread on Linux; under cgroup CPU weights, between services those weights decide.)
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: nice() changes the calling thread's nice value (Linux keeps it per thread; glibc
    // and musl implement it with getpriority/setpriority on the caller); no memory is touched.
    unsafe {
        let _ = libc::nice(10);
    }
}

/// Opens the object stored for `name` into `sink`, chunk by chunk on every core. Nothing the
/// sink received may be used unless this returns Ok (with the plaintext length): a damaged
/// chunk anywhere fails the whole object. CPU-bound: call from a blocking context.
pub fn open_into(
    name: &str,
    object: &[u8],
    keys: Option<&Keyring>,
    sink: &Sink<'_>,
) -> Result<u64, OpenError> {
    // Frame the records (cheap, and the same code as a download's), then open them.
    let mut pos = match header_len(object)? {
        Some(len) => len,
        None => {
            return Err(Header::parse(object)
                .err()
                .unwrap_or(corrupt("truncated header")))
        }
    };
    let opener = Opener::new(name, &object[..pos], keys)?;
    let n = opener.header().chunk_count();
    let mut records = Vec::new();
    for i in 0..n {
        let Some(len) = record_len(&object[pos..], opener.header(), i)? else {
            return Err(corrupt(format!("truncated before chunk {i}")));
        };
        let sealed = object
            .get(pos + FRAME_LEN..pos + FRAME_LEN + len)
            .ok_or_else(|| corrupt(format!("truncated inside chunk {i}")))?;
        records.push(sealed);
        pos += FRAME_LEN + len;
    }
    if pos != object.len() {
        return Err(corrupt(format!(
            "{} bytes after the last chunk",
            object.len() - pos
        )));
    }
    let taken = std::sync::atomic::AtomicUsize::new(0);
    let next = || {
        let i = taken.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        records.get(i).map(|r| (i, *r))
    };
    opener.all_opened(open_records(&opener, &next, sink, Priority::Reader)?)?;
    // No whole-file hash here: every chunk authenticated against the header (which fixes the
    // chunk count and each chunk's length) and its index, the last chunk carries the last
    // flag, and nothing follows it, so the plaintext is exactly what was sealed.
    Ok(opener.header().plaintext_len)
}

/// Opens the object stored for `name` into memory: authenticates every chunk before
/// returning a single byte. CPU-bound: call from a blocking context.
pub fn open(name: &str, object: &[u8], keys: Option<&Keyring>) -> Result<Vec<u8>, OpenError> {
    // Grown as authenticated chunks arrive: a header claiming 1 GiB allocates nothing by itself.
    let out = std::sync::Mutex::new(Vec::new());
    open_into(name, object, keys, &|at, bytes| {
        let mut v = out.lock().unwrap_or_else(|p| p.into_inner());
        let end = at as usize + bytes.len();
        if v.len() < end {
            v.resize(end, 0);
        }
        v[at as usize..end].copy_from_slice(bytes);
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

    fn ring(b: u8) -> Keyring {
        Keyring::new(key(b), Vec::new()).unwrap()
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

    /// Seals with the ring's current key (as the archive does).
    fn seal_with(name: &str, data: &[u8], r: Option<&Keyring>, opts: SealOptions) -> Vec<u8> {
        seal(name, data, r.map(Keyring::current), opts)
    }

    #[test]
    fn round_trips_with_and_without_key() {
        for len in [0, 1, 4095, 4096, 4097, 3 * 4096 + 17, 100_000] {
            let data = sample(len);
            for r in [None, Some(ring(7))] {
                for level in [0, 3] {
                    let opts = SealOptions {
                        level,
                        chunk_size: 4096,
                    };
                    let obj = seal_with(NAME, &data, r.as_ref(), opts);
                    assert_eq!(open(NAME, &obj, r.as_ref()).unwrap(), data, "len {len}");
                    let h = Header::parse(&obj[..HEADER_LEN.min(obj.len())]).unwrap();
                    assert_eq!((h.version, h.plaintext_len), (2, len as u64));
                }
            }
        }
    }

    #[test]
    fn the_header_holds_no_digest_of_the_plaintext() {
        let data = b"1\t0/3000000\tno recovery target specified\n";
        let obj = seal_with("00000002.history", data, Some(&ring(1)), small_chunks());
        let d = digest(data);
        assert!(
            !obj.windows(32).any(|w| w == d),
            "the plaintext's SHA-256 is in the object"
        );
        assert!(
            !obj.windows(data.len()).any(|w| w == data),
            "plaintext in the object"
        );
    }

    #[test]
    fn compresses() {
        let data = sample(1 << 20);
        let obj = seal_with(NAME, &data, Some(&ring(1)), SealOptions::default());
        assert!(obj.len() < data.len() / 3, "{} bytes", obj.len());
    }

    #[test]
    fn every_object_has_its_own_salt() {
        let data = sample(10_000);
        let a = seal_with(NAME, &data, Some(&ring(1)), small_chunks());
        let b = seal_with(NAME, &data, Some(&ring(1)), small_chunks());
        assert_ne!(a[32..64], b[32..64]);
        assert_ne!(a, b);
    }

    fn assert_corrupt(r: Result<Vec<u8>, OpenError>, what: &str) {
        match r {
            Err(OpenError::Corrupt(_)) | Err(OpenError::NotWalfs) => {}
            other => panic!(
                "{what}: expected a damaged-object error, got {:?}",
                other.map(|v| v.len())
            ),
        }
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let data = sample(3 * 4096 + 100);
        for r in [None, Some(ring(3))] {
            let obj = seal_with(NAME, &data, r.as_ref(), small_chunks());
            for pos in 0..obj.len() {
                let mut bad = obj.clone();
                bad[pos] ^= 0x40;
                let res = open(NAME, &bad, r.as_ref());
                // A flip inside the key id of an encrypted object reads as another key; one in
                // the cipher byte as an unencrypted object.
                match res {
                    Ok(_) => panic!(
                        "flip at {pos} of {} accepted (key {})",
                        obj.len(),
                        r.is_some()
                    ),
                    Err(OpenError::WrongKey { .. }) if (24..32).contains(&pos) => {}
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
        for r in [None, Some(ring(3))] {
            let obj = seal_with(NAME, &data, r.as_ref(), small_chunks());
            for cut in [
                0,
                7,
                V2_HEADER_LEN - 1,
                V2_HEADER_LEN,
                V2_HEADER_LEN + 3,
                obj.len() / 2,
                obj.len() - 1,
            ] {
                assert_corrupt(
                    open(NAME, &obj[..cut], r.as_ref()),
                    &format!("cut at {cut}"),
                );
            }
            let mut longer = obj.clone();
            longer.extend_from_slice(&[0u8; 21]);
            assert_corrupt(open(NAME, &longer, r.as_ref()), "extended");
            let empty = seal_with(NAME, &[], r.as_ref(), small_chunks());
            assert_corrupt(
                open(NAME, &empty[..V2_HEADER_LEN], r.as_ref()),
                "empty file cut",
            );
        }
    }

    #[test]
    fn reordered_chunks_are_refused() {
        let data = sample(2 * 4096);
        for r in [None, Some(ring(9))] {
            let obj = seal_with(
                NAME,
                &data,
                r.as_ref(),
                SealOptions {
                    level: 0,
                    chunk_size: 4096,
                },
            );
            // Two raw chunks of equal length: swap the records.
            let rec = (obj.len() - V2_HEADER_LEN) / 2;
            let mut swapped = obj[..V2_HEADER_LEN].to_vec();
            swapped.extend_from_slice(&obj[V2_HEADER_LEN + rec..]);
            swapped.extend_from_slice(&obj[V2_HEADER_LEN..V2_HEADER_LEN + rec]);
            assert_corrupt(open(NAME, &swapped, r.as_ref()), "swapped chunks");
            assert_eq!(open(NAME, &obj, r.as_ref()).unwrap(), data);
        }
    }

    #[test]
    fn renamed_or_swapped_objects_are_refused() {
        for r in [None, Some(ring(4))] {
            let a = seal_with(NAME, &sample(5000), r.as_ref(), small_chunks());
            assert_corrupt(open("000000010000000000000004", &a, r.as_ref()), "renamed");
            // Another object's body under this object's header.
            let b = seal_with(
                "000000010000000000000004",
                &sample(5000),
                r.as_ref(),
                small_chunks(),
            );
            let mut mixed = a[..V2_HEADER_LEN].to_vec();
            mixed.extend_from_slice(&b[V2_HEADER_LEN..]);
            assert_corrupt(open(NAME, &mixed, r.as_ref()), "swapped body");
        }
    }

    /// Opens `obj` as a download does: fed to a [`Framer`] `piece` bytes at a time, records
    /// opened by [`open_records`] as they are cut.
    fn open_streamed(obj: &[u8], r: Option<&Keyring>, piece: usize) -> Result<Vec<u8>, OpenError> {
        let mut framer = Framer::default();
        let mut pieces = Vec::new();
        let mut opener = None;
        let mut records = std::collections::VecDeque::new();
        for part in obj.chunks(piece.max(1)) {
            framer.push(part, &mut pieces)?;
            for p in pieces.drain(..) {
                match p {
                    Piece::Header(h) => opener = Some(Opener::new(NAME, &h, r)?),
                    Piece::Record(i, b) => records.push_back((i, b)),
                }
            }
        }
        framer.finish()?;
        let opener = opener.expect("a finished framer saw the header");
        let records = std::sync::Mutex::new(records);
        let out = std::sync::Mutex::new(vec![0u8; opener.header().plaintext_len as usize]);
        let opened = open_records(
            &opener,
            &|| records.lock().unwrap().pop_front(),
            &|at, data| {
                out.lock().unwrap()[at as usize..at as usize + data.len()].copy_from_slice(data);
                Ok(())
            },
            Priority::Background,
        )?;
        opener.all_opened(opened)?;
        Ok(out.into_inner().unwrap())
    }

    #[test]
    fn a_download_in_pieces_opens_exactly_as_the_whole_object() {
        let data = sample(3 * 4096 + 100);
        for r in [None, Some(ring(5))] {
            let obj = seal_with(NAME, &data, r.as_ref(), small_chunks());
            let mut variants = vec![obj.clone()];
            for pos in (0..obj.len()).step_by(37) {
                let mut bad = obj.clone();
                bad[pos] ^= 0x01;
                variants.push(bad);
            }
            for cut in [0, 5, 8, 9, V2_HEADER_LEN, V2_HEADER_LEN + 2, obj.len() - 1] {
                variants.push(obj[..cut].to_vec());
            }
            let mut longer = obj.clone();
            longer.push(0);
            variants.push(longer);
            for v in &variants {
                let whole = open(NAME, v, r.as_ref());
                for piece in [1, 3, 100, 4096, v.len()] {
                    let streamed = open_streamed(v, r.as_ref(), piece);
                    assert_eq!(
                        streamed.as_ref().ok(),
                        whole.as_ref().ok(),
                        "{} bytes in pieces of {piece}: {:?} against {:?}",
                        v.len(),
                        streamed.as_ref().err(),
                        whole.as_ref().err()
                    );
                    if let (Err(a), Err(b)) = (&streamed, &whole) {
                        assert_eq!(
                            std::mem::discriminant(a),
                            std::mem::discriminant(b),
                            "{a:?} against {b:?}"
                        );
                    }
                }
            }
            assert_eq!(open_streamed(&obj, r.as_ref(), 7).unwrap(), data);
        }
    }

    #[test]
    fn a_download_is_refused_as_soon_as_it_cannot_be_an_object() {
        let obj = seal_with(NAME, &sample(3 * 4096), Some(&ring(2)), small_chunks());
        let mut out = Vec::new();
        // A frame claiming more than any chunk seals to: refused before its bytes are awaited.
        let mut huge = obj[..V2_HEADER_LEN].to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        let mut f = Framer::default();
        assert!(matches!(
            f.push(&huge, &mut out),
            Err(OpenError::Corrupt(_))
        ));
        // A header claiming chunks larger than walfs writes (which would let a forged object
        // make the reader hold that much per queued record before chunk 0 fails): refused with
        // the header, before any record. The largest size walfs writes is accepted.
        for (size, ok) in [
            (MAX_CHUNK_SIZE, true),
            (MAX_CHUNK_SIZE + 1, false),
            (64 << 20, false),
        ] {
            let mut h = obj[..V2_HEADER_LEN].to_vec();
            h[12..16].copy_from_slice(&size.to_le_bytes());
            let mut f = Framer::default();
            assert_eq!(f.push(&h, &mut out).is_ok(), ok, "chunk size {size}");
        }
        // Bytes after the last record: refused when they arrive, not at the end.
        let mut f = Framer::default();
        f.push(&obj, &mut out).unwrap();
        assert!(matches!(f.push(&[0], &mut out), Err(OpenError::Corrupt(_))));
        // Not an object at all: refused at the eighth byte.
        let mut f = Framer::default();
        assert!(matches!(
            f.push(b"PGDMP\0\0\0", &mut out),
            Err(OpenError::NotWalfs)
        ));
        // The framer never holds more than the record it is waiting for.
        let mut f = Framer::default();
        for b in obj.chunks(1) {
            f.push(b, &mut out).unwrap();
            assert!(f.buf.len() <= 4096 + 4096 / 128 + 1024 + 1 + TAG_LEN + FRAME_LEN);
        }
        f.finish().unwrap();
    }

    #[test]
    fn a_keyed_archive_opens_only_objects_under_its_keys() {
        let data = sample(100);
        let obj = seal_with(NAME, &data, Some(&ring(1)), small_chunks());
        assert!(matches!(
            open(NAME, &obj, Some(&ring(2))),
            Err(OpenError::WrongKey { .. })
        ));
        assert!(matches!(
            open(NAME, &obj, None),
            Err(OpenError::KeyRequired(_))
        ));
        // Downgrade: an object without encryption (anyone can make one) is never data under a key.
        let plain = seal_with(NAME, &data, None, small_chunks());
        assert_eq!(
            open(NAME, &plain, Some(&ring(2))),
            Err(OpenError::Unencrypted)
        );
        assert_eq!(open(NAME, &plain, None).unwrap(), data);
        assert_eq!(
            open(NAME, b"not an object at all, clearly", None),
            Err(OpenError::NotWalfs)
        );
        // A keyring reads objects under any of its keys; writes under the first.
        let rotated = Keyring::new(key(2), vec![key(1)]).unwrap();
        assert_eq!(open(NAME, &obj, Some(&rotated)).unwrap(), data);
        let new = seal_with(NAME, &data, Some(&rotated), small_chunks());
        assert_eq!(Header::parse(&new).unwrap().key_id, key(2).id());
        assert!(matches!(
            open(NAME, &new, Some(&ring(1))),
            Err(OpenError::WrongKey { .. })
        ));
    }

    /// Objects the first release wrote (format 1), kept in the repository as they were made.
    #[test]
    fn version_1_objects_stay_readable_and_tamper_evident() {
        let keyed: &[u8] = include_bytes!("envelope_testdata/v1-keyed.obj");
        let plain: &[u8] = include_bytes!("envelope_testdata/v1-plain.obj");
        let data = (0..10_000u32)
            .map(|i| {
                if (i / 4096) % 3 == 0 {
                    (i % 251) as u8
                } else {
                    0
                }
            })
            .collect::<Vec<u8>>();
        assert_eq!(Header::parse(keyed).unwrap().version, 1);
        let r7 = ring(7);
        assert_eq!(open(NAME, keyed, Some(&r7)).unwrap(), data);
        assert_eq!(open(NAME, plain, None).unwrap(), data);
        // The downgrade is refused for version 1 too.
        assert_eq!(open(NAME, plain, Some(&r7)), Err(OpenError::Unencrypted));
        for pos in [20, 50, 100, keyed.len() - 1] {
            let mut bad = keyed.to_vec();
            bad[pos] ^= 1;
            assert!(open(NAME, &bad, Some(&r7)).is_err(), "flip at {pos}");
        }
        assert!(open("000000010000000000000004", keyed, Some(&r7)).is_err());
    }

    #[test]
    fn key_files() {
        let k = Key::generate().unwrap();
        let again = Keyring::from_file_contents(k.to_file_line().as_bytes()).unwrap();
        assert_eq!(again.current().id(), k.id());
        assert_eq!(
            Keyring::from_file_contents(&[5u8; 32])
                .unwrap()
                .current()
                .id(),
            key(5).id()
        );
        let two = format!(
            "# rotated 2026-11-29\n{}\n{}",
            key(2).to_file_line(),
            key(1).to_file_line()
        );
        let r = Keyring::from_file_contents(two.as_bytes()).unwrap();
        assert_eq!(r.current().id(), key(2).id());
        assert!(r.get(key(1).id()).is_some());
        assert_eq!(
            Keyring::from_file_contents(r.to_file_contents().as_bytes())
                .unwrap()
                .keys()
                .len(),
            2
        );
        assert!(matches!(
            Keyring::from_file_contents(b"abcd\n"),
            Err(KeyError::WrongLength { line: 1, len: 4 })
        ));
        assert!(matches!(
            Keyring::from_file_contents("z".repeat(64).as_bytes()),
            Err(KeyError::NotHex { line: 1 })
        ));
        assert_eq!(
            Keyring::from_file_contents(b"\n# nothing\n").unwrap_err(),
            KeyError::Empty
        );
        let dup = format!("{}{}", key(1).to_file_line(), key(1).to_file_line());
        assert!(matches!(
            Keyring::from_file_contents(dup.as_bytes()),
            Err(KeyError::Duplicate(_))
        ));
        assert!(!format!("{k:?}").contains(&k.to_file_line()[..10]));
    }
}
