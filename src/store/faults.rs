//! A fault-injecting `ObjectStore` wrapper, for deterministic tests of what walfs does when the
//! store misbehaves.
//!
//! Wrap any backend (`InMemory` in unit tests), then say which operations on which paths fail
//! and how: a transient error (what a 5xx or a reset looks like once the client gave up), a
//! timeout after a delay, a request that never answers, extra latency, a response lost after
//! the operation took effect (the ambiguous case: stored, yet the caller saw an error), or a
//! download whose body breaks half-way. Rules match in the order they were added; a rule may
//! fire a fixed number of times. Nothing here is used outside tests and the fault campaign.

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The kind of store operation a rule applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Whole or ranged reads (`get_opts`, `get_ranges`); `head` too.
    Get,
    Put,
    List,
    Delete,
}

/// What happens to a matching request.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Fails at once with a transient backend error.
    Error,
    /// Fails after the given delay (a request timing out).
    Timeout(Duration),
    /// Never answers; only the caller giving up ends it.
    Hang,
    /// Answers normally after the given delay.
    Latency(Duration),
    /// Performs the operation, then reports an error: the response was lost on the way.
    LostResponse,
    /// Reads: the body breaks after half of it was delivered.
    BrokenBody,
}

struct Rule {
    op: Op,
    path_contains: String,
    fault: Fault,
    remaining: Option<u32>,
}

/// See the module documentation.
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    rules: Mutex<Vec<Rule>>,
    calls: [AtomicU64; 4],
}

fn injected(what: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "faulty",
        source: format!("injected fault: {what}").into(),
    }
}

fn op_index(op: Op) -> usize {
    match op {
        Op::Get => 0,
        Op::Put => 1,
        Op::List => 2,
        Op::Delete => 3,
    }
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Arc<FaultyStore> {
        Arc::new(FaultyStore {
            inner,
            rules: Mutex::new(Vec::new()),
            calls: Default::default(),
        })
    }

    /// The wrapped store, to read or plant objects behind walfs' back.
    pub fn inner(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    /// Makes `op` on paths containing `path_contains` ("" for all) meet `fault`, `times` times
    /// (None: until cleared).
    pub fn inject(&self, op: Op, path_contains: &str, fault: Fault, times: Option<u32>) {
        self.lock().push(Rule {
            op,
            path_contains: path_contains.to_string(),
            fault,
            remaining: times,
        });
    }

    /// Removes every rule: the store behaves again.
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// Requests of kind `op` seen so far (faulty or not).
    pub fn calls(&self, op: Op) -> u64 {
        self.calls[op_index(op)].load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Rule>> {
        self.rules.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The fault for this request, if a rule matches (and uses up one of its times).
    fn fault(&self, op: Op, path: &Path) -> Option<Fault> {
        self.calls[op_index(op)].fetch_add(1, Ordering::Relaxed);
        let mut rules = self.lock();
        let i = rules
            .iter()
            .position(|r| r.op == op && path.as_ref().contains(r.path_contains.as_str()))?;
        let fault = rules[i].fault.clone();
        if let Some(n) = rules[i].remaining.as_mut() {
            *n = n.saturating_sub(1);
            if *n == 0 {
                rules.remove(i);
            }
        }
        Some(fault)
    }

    /// Applies the part of `fault` that comes before the operation. Ok(true): run it and
    /// then report a lost response.
    async fn before(fault: Option<&Fault>) -> Result<bool> {
        match fault {
            None | Some(Fault::BrokenBody) => Ok(false),
            Some(Fault::Error) => Err(injected("error")),
            Some(Fault::Timeout(d)) => {
                tokio::time::sleep(*d).await;
                Err(injected("timeout"))
            }
            Some(Fault::Hang) => {
                futures::future::pending::<()>().await;
                Err(injected("hang"))
            }
            Some(Fault::Latency(d)) => {
                tokio::time::sleep(*d).await;
                Ok(false)
            }
            Some(Fault::LostResponse) => Ok(true),
        }
    }

    async fn guard<T>(
        &self,
        op: Op,
        path: &Path,
        f: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let fault = self.fault(op, path);
        let lose = Self::before(fault.as_ref()).await?;
        let r = f.await;
        if lose {
            r?;
            return Err(injected("lost response"));
        }
        r
    }
}

impl std::fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

impl std::fmt::Debug for FaultyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

/// A body that delivers its first half and then fails.
fn broken(bytes: Bytes) -> BoxStream<'static, Result<Bytes>> {
    let half = bytes.slice(..bytes.len() / 2);
    futures::stream::iter([Ok(half), Err(injected("body cut"))]).boxed()
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.guard(
            Op::Put,
            location,
            self.inner.put_opts(location, payload, opts),
        )
        .await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.guard(
            Op::Put,
            location,
            self.inner.put_multipart_opts(location, opts),
        )
        .await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let fault = self.fault(Op::Get, location);
        let lose = Self::before(fault.as_ref()).await?;
        let mut r = self.inner.get_opts(location, options).await?;
        if lose {
            return Err(injected("lost response"));
        }
        if matches!(fault, Some(Fault::BrokenBody)) {
            let meta = r.meta.clone();
            let range = r.range.clone();
            let attributes = std::mem::take(&mut r.attributes);
            let bytes = r.bytes().await?;
            return Ok(GetResult {
                payload: GetResultPayload::Stream(broken(bytes)),
                meta,
                range,
                attributes,
                extensions: Default::default(),
            });
        }
        Ok(r)
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[std::ops::Range<u64>],
    ) -> Result<Vec<Bytes>> {
        self.guard(Op::Get, location, self.inner.get_ranges(location, ranges))
            .await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let fault = {
            let root = Path::default();
            self.fault(Op::Delete, &root)
        };
        match fault {
            Some(Fault::Error) | Some(Fault::Hang) | Some(Fault::Timeout(_)) => {
                futures::stream::once(async { Err(injected("delete")) }).boxed()
            }
            _ => self.inner.delete_stream(locations),
        }
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let path = prefix.cloned().unwrap_or_default();
        match self.fault(Op::List, &path) {
            None | Some(Fault::BrokenBody) | Some(Fault::LostResponse) => self.inner.list(prefix),
            Some(fault) => {
                let inner = self.inner.list(prefix);
                futures::stream::once(async move {
                    match Self::before(Some(&fault)).await {
                        Ok(_) => inner,
                        Err(e) => futures::stream::once(async { Err(e) }).boxed(),
                    }
                })
                .flatten()
                .boxed()
            }
        }
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        let path = prefix.cloned().unwrap_or_default();
        match self.fault(Op::List, &path) {
            None => self.inner.list_with_offset(prefix, offset),
            Some(_) => futures::stream::once(async { Err(injected("list")) }).boxed(),
        }
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let path = prefix.cloned().unwrap_or_default();
        self.guard(Op::List, &path, self.inner.list_with_delimiter(prefix))
            .await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.guard(Op::Put, to, self.inner.copy_opts(from, to, options))
            .await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.guard(Op::Put, to, self.inner.rename_opts(from, to, options))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;
    use object_store::ObjectStoreExt;

    #[tokio::test]
    async fn faults_fire_as_told_then_stop() {
        let s = FaultyStore::new(Arc::new(InMemory::new()));
        let p = Path::from("a/b");
        s.inject(Op::Put, "a/", Fault::LostResponse, Some(1));
        assert!(s.put(&p, PutPayload::from_static(b"x")).await.is_err());
        // Lost, yet stored.
        assert_eq!(s.get(&p).await.unwrap().bytes().await.unwrap(), "x");
        s.inject(Op::Get, "b", Fault::Error, Some(2));
        assert!(s.get(&p).await.is_err());
        assert!(s.head(&p).await.is_err());
        assert!(s.get(&p).await.is_ok());
        s.inject(Op::Get, "", Fault::BrokenBody, None);
        assert!(s.get(&p).await.unwrap().bytes().await.is_err());
        s.clear();
        s.inject(Op::Get, "", Fault::Hang, None);
        let hung = tokio::time::timeout(Duration::from_millis(50), s.get(&p)).await;
        assert!(hung.is_err(), "a hang answered");
        assert!(s.calls(Op::Get) >= 5);
    }
}
