//! A physical replication connection: libpq-style parameters, startup with
//! `replication=true`, password/md5/SCRAM-SHA-256 authentication, simple queries, and the
//! CopyBoth stream of START_REPLICATION (XLogData, keepalives, standby status updates).
//!
//! Built on `postgres-protocol` (the protocol crate of the tokio-postgres family) over tokio;
//! tokio-postgres itself has no CopyBoth support. Reference: PostgreSQL's
//! src/bin/pg_basebackup/receivelog.c and the streaming replication protocol docs.

use super::tls::{take_ssl_params, SslMode, TlsSettings};
use crate::wal::Lsn;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{
    ChannelBinding, ScramSha256, SCRAM_SHA_256, SCRAM_SHA_256_PLUS,
};
use postgres_protocol::message::{backend, frontend};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("connection parameters: {0}")]
    Params(String),
    #[error(
        "connecting to {target}: {source} (the server is -d/--dbname's host= and port=, else \
         PGHOST and PGPORT, else /var/run/postgresql and 5432)"
    )]
    Connect {
        target: String,
        source: std::io::Error,
    },
    #[error("server: {0}")]
    Server(String),
    #[error("authentication: {0}")]
    Auth(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("connection lost: {0}")]
    Io(#[from] std::io::Error),
}

impl ConnError {
    /// Errors a retry cannot fix (bad settings, refused credentials).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            ConnError::Params(_) | ConnError::Auth(_) | ConnError::Tls(_)
        )
    }
}

/// Where and as whom to connect, resolved the way libpq tools do.
#[derive(Clone)]
pub struct ConnParams {
    pub host: Host,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub application_name: String,
    pub tls: TlsSettings,
    pub channel_binding: ChannelBindingMode,
    /// The database of a SQL session ([`ReplicationConn::connect_sql`]; default: the user's).
    pub dbname: Option<String>,
}

impl std::fmt::Debug for ConnParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("ConnParams")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("application_name", &self.application_name)
            .field("tls", &self.tls)
            .field("channel_binding", &self.channel_binding)
            .field("dbname", &self.dbname)
            .finish()
    }
}

/// libpq's `channel_binding`: whether SCRAM binds itself to the TLS connection (so a man in
/// the middle holding a certificate the client trusts still cannot relay the login).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelBindingMode {
    Disable,
    /// Bind when TLS and the server allow it (libpq's default).
    Prefer,
    /// Refuse to authenticate any other way.
    Require,
}

impl ChannelBindingMode {
    pub fn parse(s: &str) -> Result<ChannelBindingMode, String> {
        match s {
            "disable" => Ok(ChannelBindingMode::Disable),
            "prefer" => Ok(ChannelBindingMode::Prefer),
            "require" => Ok(ChannelBindingMode::Require),
            other => Err(format!(
                "channel_binding {other:?}: use disable, prefer or require"
            )),
        }
    }
}

#[derive(Clone, Debug)]
pub enum Host {
    Tcp(String),
    Unix(PathBuf),
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// A password from ~/.pgpass (or $PGPASSFILE): `host:port:database:user:password`.
fn pgpass(host: &str, port: u16, user: &str) -> Option<String> {
    let path = env("PGPASSFILE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pgpass")))?;
    let file = std::fs::File::open(&path).ok()?;
    let meta = file.metadata().ok()?;
    if std::os::unix::fs::MetadataExt::mode(&meta) & 0o077 != 0 && meta.is_file() {
        // As libpq: a password file others may read is not used.
        tracing::warn!(path = %path.display(),
            "password file has group or world access; permissions should be u=rw (0600) or less: ignored");
        return None;
    }
    let text = std::io::read_to_string(file).ok()?;
    let port = port.to_string();
    text.lines().find_map(|line| {
        if line.starts_with('#') {
            return None;
        }
        // Fields are separated by unescaped colons.
        let mut fields = Vec::new();
        let mut cur = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => cur.extend(chars.next()),
                ':' if fields.len() < 4 => fields.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        fields.push(cur);
        let [h, p, db, u, pw] = <[String; 5]>::try_from(fields).ok()?;
        let ok = |pat: &str, v: &str| pat == "*" || pat == v;
        (ok(&h, host) && ok(&p, &port) && ok(&db, "replication") && ok(&u, user)).then_some(pw)
    })
}

impl ConnParams {
    /// From a conninfo string or URI (`--dbname`), then `PG*` variables, then defaults
    /// (unix socket in /var/run/postgresql, port 5432, the OS user).
    pub fn resolve(
        conninfo: Option<&str>,
        application_name: &str,
    ) -> Result<ConnParams, ConnError> {
        let (rest, ssl) = take_ssl_params(conninfo.unwrap_or("")).map_err(ConnError::Params)?;
        let cfg = if rest.trim().is_empty() {
            tokio_postgres::Config::new()
        } else {
            // Its own words only: the string may hold a password.
            tokio_postgres::Config::from_str(&rest).map_err(|e| {
                ConnError::Params(format!("the connection string does not parse ({e})"))
            })?
        };
        let channel_binding = ChannelBindingMode::parse(
            &ssl.channel_binding
                .clone()
                .or_else(|| env("PGCHANNELBINDING"))
                .unwrap_or_else(|| "prefer".into()),
        )
        .map_err(ConnError::Params)?;
        let mode = SslMode::parse(
            &ssl.mode
                .or_else(|| env("PGSSLMODE"))
                .unwrap_or_else(|| "prefer".into()),
        )
        .map_err(ConnError::Params)?;
        // As libpq: a parameter, else its PG* variable, else the file in ~/.postgresql if it
        // exists.
        let file = |given: Option<String>, var: &str, default: &str| {
            given.or_else(|| env(var)).map(PathBuf::from).or_else(|| {
                let path = PathBuf::from(std::env::var_os("HOME")?)
                    .join(".postgresql")
                    .join(default);
                path.exists().then_some(path)
            })
        };
        let root_cert = file(ssl.root_cert, "PGSSLROOTCERT", "root.crt");
        let client_cert = match (
            file(ssl.cert, "PGSSLCERT", "postgresql.crt"),
            file(ssl.key, "PGSSLKEY", "postgresql.key"),
        ) {
            (Some(c), Some(k)) => Some((c, k)),
            (Some(c), None) => {
                return Err(ConnError::Params(format!(
                    "sslcert {} given without sslkey",
                    c.display()
                )))
            }
            _ => None,
        };
        let host = match cfg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => host_from(h),
            Some(tokio_postgres::config::Host::Unix(p)) => Host::Unix(p.clone()),
            None => host_from(&env("PGHOST").unwrap_or_else(|| "/var/run/postgresql".into())),
        };
        let port = match cfg.get_ports().first() {
            Some(p) => *p,
            None => match env("PGPORT") {
                Some(p) => p.parse().map_err(|_| {
                    ConnError::Params(format!(
                        "PGPORT={p:?} is not a port number: fix or unset PGPORT, or give \
                             port= in -d/--dbname"
                    ))
                })?,
                None => 5432,
            },
        };
        let user = cfg
            .get_user()
            .map(str::to_string)
            .or_else(|| env("PGUSER"))
            .or_else(|| env("USER"))
            .unwrap_or_else(|| "postgres".into());
        let host_key = match &host {
            Host::Tcp(h) => h.clone(),
            Host::Unix(_) => "localhost".into(),
        };
        let password = cfg
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .or_else(|| env("PGPASSWORD"))
            .or_else(|| pgpass(&host_key, port, &user));
        Ok(ConnParams {
            host,
            port,
            user,
            password,
            application_name: cfg
                .get_application_name()
                .map(str::to_string)
                .or_else(|| env("PGAPPNAME"))
                .unwrap_or_else(|| application_name.to_string()),
            tls: TlsSettings {
                mode,
                root_cert,
                client_cert,
            },
            channel_binding,
            dbname: cfg
                .get_dbname()
                .map(str::to_string)
                .or_else(|| env("PGDATABASE")),
        })
    }

    pub fn describe(&self) -> String {
        match &self.host {
            Host::Tcp(h) => format!("{h}:{} as {}", self.port, self.user),
            Host::Unix(d) => format!("{}/.s.PGSQL.{} as {}", d.display(), self.port, self.user),
        }
    }
}

fn host_from(h: &str) -> Host {
    if h.starts_with('/') {
        Host::Unix(PathBuf::from(h))
    } else {
        Host::Tcp(h.to_string())
    }
}

/// SSLRequest and, when the server agrees, the TLS handshake (libpq's sslmode rules).
/// The stream, and the server's certificate (DER) when TLS is on.
async fn negotiate_tls(
    mut tcp: tokio::net::TcpStream,
    p: &ConnParams,
) -> Result<(Box<dyn Stream>, Option<Vec<u8>>), ConnError> {
    if p.tls.mode == SslMode::Disable {
        return Ok((Box::new(tcp), None));
    }
    let mut req = BytesMut::new();
    frontend::ssl_request(&mut req);
    tcp.write_all(&req).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => {
            let config = super::tls::client_config(&p.tls).map_err(ConnError::Tls)?;
            let host = match &p.host {
                Host::Tcp(h) => h.clone(),
                Host::Unix(_) => "localhost".into(),
            };
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| ConnError::Tls(format!("{host}: {e}")))?;
            let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
                .connect(name, tcp)
                .await
                .map_err(|e| {
                    ConnError::Tls(format!(
                        "handshake with {host}: {e} (the server's certificate is checked \
                         against sslrootcert= in -d/--dbname or PGSSLROOTCERT, and its name \
                         against host= from sslmode=verify-full)"
                    ))
                })?;
            let cert = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.as_ref().to_vec());
            Ok((Box::new(tls), cert))
        }
        b'N' if p.tls.mode == SslMode::Prefer => Ok((Box::new(tcp), None)),
        b'N' => Err(ConnError::Tls(format!(
            "the server does not accept TLS, and sslmode {} requires it: set ssl = on in the \
             server's postgresql.conf, or sslmode=prefer in -d/--dbname or PGSSLMODE",
            format!("{:?}", p.tls.mode).to_lowercase()
        ))),
        other => Err(ConnError::Protocol(format!(
            "unexpected answer {other:?} to SSLRequest"
        ))),
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// What the CopyBoth stream delivers.
#[derive(Debug)]
pub enum ReplMessage {
    XLogData {
        start: Lsn,
        /// The server's WAL end when it sent this.
        end: Lsn,
        data: Bytes,
    },
    Keepalive {
        end: Lsn,
        reply_requested: bool,
    },
    /// The server ended the stream (end of timeline, or shutdown).
    CopyDone,
}

/// The text rows of a query result.
pub type Rows = Vec<Vec<Option<String>>>;

/// One part of a command's answer.
#[derive(Debug)]
pub enum QueryEvent {
    /// A result set ended (CommandComplete): its rows, none for a command without any.
    Rows(Rows),
    /// A COPY out begins.
    CopyStart,
    /// One CopyData message's body.
    Data(Bytes),
    /// The COPY ended.
    CopyDone,
    /// The command is over (ReadyForQuery).
    Ready,
}

pub struct ReplicationConn {
    stream: Box<dyn Stream>,
    buf: BytesMut,
    out: BytesMut,
}

/// Microseconds since 2000-01-01, PostgreSQL's timestamp epoch.
fn pg_now() -> i64 {
    const PG_EPOCH_OFFSET: u64 = 946_684_800;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (now.as_micros() as i64) - (PG_EPOCH_OFFSET as i64) * 1_000_000
}

/// What a notice says, in one line.
fn server_error_text(body: &backend::NoticeResponseBody) -> String {
    let mut message = String::new();
    let mut fields = body.fields();
    while let Ok(Some(f)) = fields.next() {
        if f.type_() == b'M' {
            message = String::from_utf8_lossy(f.value_bytes()).into_owned();
        }
    }
    message
}

fn server_error(body: &backend::ErrorResponseBody) -> ConnError {
    let (mut severity, mut code, mut message) = (String::new(), String::new(), String::new());
    let (mut detail, mut hint) = (String::new(), String::new());
    let mut fields = body.fields();
    while let Ok(Some(f)) = fields.next() {
        let text = || String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            b'S' => severity = text(),
            b'C' => code = text(),
            b'M' => message = text(),
            b'D' => detail = text(),
            b'H' => hint = text(),
            _ => {}
        }
    }
    let mut line = format!("{severity} {code}: {message}");
    for extra in [detail, hint].iter().filter(|t| !t.is_empty()) {
        line.push_str(&format!(" ({extra})"));
    }
    if let Some(fix) = server_error_fix(&code, &message) {
        line.push_str(&format!(": {fix}"));
    }
    ConnError::Server(line)
}

/// What the operator changes for the server errors a newcomer meets first.
fn server_error_fix(code: &str, message: &str) -> Option<&'static str> {
    match code {
        "28P01" => Some(
            "fix password= in -d/--dbname, PGPASSWORD, or the line for this user in ~/.pgpass \
             (PGPASSFILE)",
        ),
        "28000" => Some(
            "the server's pg_hba.conf needs a line for this user (for receive and backup, with \
             the database `replication`), and the role LOGIN and REPLICATION",
        ),
        "3D000" => Some("fix dbname= in -d/--dbname or PGDATABASE"),
        "42704" if message.contains("replication slot") => {
            Some("create it with --create-slot, or name another with --slot")
        }
        "53300" => Some("the server's max_wal_senders or max_connections is used up"),
        _ => None,
    }
}

impl ReplicationConn {
    /// Connects, starts a physical replication session and authenticates.
    pub async fn connect(p: &ConnParams, timeout: Duration) -> Result<ReplicationConn, ConnError> {
        Self::open(p, timeout, true).await
    }

    /// A plain SQL session (no replication), with the same connection code: for `walfs
    /// check`'s queries; answers are read with [`ReplicationConn::send_query`] and
    /// [`ReplicationConn::next_event`].
    pub async fn connect_sql(
        p: &ConnParams,
        timeout: Duration,
    ) -> Result<ReplicationConn, ConnError> {
        Self::open(p, timeout, false).await
    }

    async fn open(
        p: &ConnParams,
        timeout: Duration,
        replication: bool,
    ) -> Result<ReplicationConn, ConnError> {
        let target = p.describe();
        let connect = async {
            let s: Box<dyn Stream> = match &p.host {
                Host::Tcp(h) => {
                    let s = tokio::net::TcpStream::connect((h.as_str(), p.port)).await?;
                    s.set_nodelay(true)?;
                    // A server host that vanished (power, network) never closes the
                    // connection: keepalives end it in about two minutes, where libpq's
                    // default waits for the system's two hours. A server that is only slow
                    // (a spread checkpoint before a backup's data) still answers them.
                    socket2::SockRef::from(&s).set_tcp_keepalive(
                        &socket2::TcpKeepalive::new()
                            .with_time(Duration::from_secs(60))
                            .with_interval(Duration::from_secs(10))
                            .with_retries(6),
                    )?;
                    return Ok(Err(s));
                }
                Host::Unix(dir) => {
                    let path = dir.join(format!(".s.PGSQL.{}", p.port));
                    Box::new(tokio::net::UnixStream::connect(path).await?)
                }
            };
            Ok::<_, std::io::Error>(Ok(s))
        };
        let stream = tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| ConnError::Connect {
                target: target.clone(),
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"),
            })?
            .map_err(|source| ConnError::Connect {
                target: target.clone(),
                source,
            })?;
        let (stream, server_cert) = match stream {
            Ok(unix) => (unix, None),
            Err(tcp) => negotiate_tls(tcp, p).await?,
        };
        let mut conn = ReplicationConn {
            stream,
            buf: BytesMut::with_capacity(1 << 20),
            out: BytesMut::new(),
        };
        let params = [
            ("user", p.user.as_str()),
            if replication {
                ("replication", "true")
            } else {
                ("database", p.dbname.as_deref().unwrap_or(p.user.as_str()))
            },
            ("application_name", p.application_name.as_str()),
        ];
        frontend::startup_message(params.iter().copied(), &mut conn.out)
            .map_err(|e| ConnError::Protocol(e.to_string()))?;
        conn.send().await?;
        conn.authenticate(p, server_cert.as_deref()).await?;
        Ok(conn)
    }

    async fn send(&mut self) -> Result<(), ConnError> {
        let out = self.out.split();
        self.stream.write_all(&out).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// The next backend message: (tag, body) for CopyBothResponse, which postgres-protocol
    /// does not know, else the parsed message.
    async fn recv(&mut self) -> Result<Msg, ConnError> {
        loop {
            if self.buf.len() >= 5 {
                let tag = self.buf[0];
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if len < 4 {
                    return Err(ConnError::Protocol(format!("message length {len}")));
                }
                if self.buf.len() > len {
                    if tag == b'W' {
                        self.buf.advance(len + 1);
                        return Ok(Msg::CopyBoth);
                    }
                    return match backend::Message::parse(&mut self.buf)? {
                        Some(m) => Ok(Msg::Backend(m)),
                        None => Err(ConnError::Protocol("incomplete message".into())),
                    };
                }
                self.buf.reserve(len + 1 - self.buf.len());
            }
            let n = self.stream.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Err(ConnError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                )));
            }
        }
    }

    /// Answers the server's authentication request. `server_cert`: the TLS server's
    /// certificate, which SCRAM binds to when `channel_binding` allows (tls-server-end-point).
    async fn authenticate(
        &mut self,
        p: &ConnParams,
        server_cert: Option<&[u8]>,
    ) -> Result<(), ConnError> {
        let password = || {
            p.password.clone().ok_or_else(|| {
                ConnError::Auth(format!(
                    "the server asks {} for a password: set one in the connection string, PGPASSWORD or ~/.pgpass",
                    p.user
                ))
            })
        };
        let mut scram: Option<ScramSha256> = None;
        let mut bound = false;
        let binding_hash = match p.channel_binding {
            ChannelBindingMode::Disable => None,
            _ => server_cert.and_then(super::tls::end_point_hash),
        };
        loop {
            let msg = match self.recv().await? {
                Msg::Backend(m) => m,
                Msg::CopyBoth => return Err(ConnError::Protocol("CopyBoth during startup".into())),
            };
            match msg {
                backend::Message::AuthenticationOk => {
                    if p.channel_binding == ChannelBindingMode::Require && !bound {
                        return Err(ConnError::Auth(
                            "channel binding required, but the server authenticated walfs \
                             without it (it used another method than SCRAM over TLS)"
                                .into(),
                        ));
                    }
                }
                backend::Message::AuthenticationCleartextPassword => {
                    frontend::password_message(password()?.as_bytes(), &mut self.out)?;
                    self.send().await?;
                }
                backend::Message::AuthenticationMd5Password(body) => {
                    let hash = postgres_protocol::authentication::md5_hash(
                        p.user.as_bytes(),
                        password()?.as_bytes(),
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.out)?;
                    self.send().await?;
                }
                backend::Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let (mut has_scram, mut has_plus) = (false, false);
                    while let Ok(Some(m)) = mechanisms.next() {
                        has_scram |= m == SCRAM_SHA_256;
                        has_plus |= m == SCRAM_SHA_256_PLUS;
                    }
                    // As libpq: bind when both can; say "could have" when only walfs can (so a
                    // server stripped of -PLUS by a man in the middle notices); refuse when
                    // binding is required and impossible.
                    let (mechanism, binding) = match (&binding_hash, has_plus) {
                        (Some(h), true) => (
                            SCRAM_SHA_256_PLUS,
                            ChannelBinding::tls_server_end_point(h.clone()),
                        ),
                        _ if p.channel_binding == ChannelBindingMode::Require => {
                            return Err(ConnError::Auth(if binding_hash.is_none() {
                                "channel binding required, but this connection has no TLS \
                                 (or a server certificate walfs cannot bind to)"
                                    .into()
                            } else {
                                "channel binding required, but the server does not offer \
                                 SCRAM-SHA-256-PLUS"
                                    .into()
                            }))
                        }
                        (Some(_), false) => (SCRAM_SHA_256, ChannelBinding::unrequested()),
                        (None, _) => (SCRAM_SHA_256, ChannelBinding::unsupported()),
                    };
                    if !has_scram && mechanism == SCRAM_SHA_256 {
                        return Err(ConnError::Auth(
                            "the server offers no SASL mechanism walfs knows".into(),
                        ));
                    }
                    bound = mechanism == SCRAM_SHA_256_PLUS;
                    let s = ScramSha256::new(password()?.as_bytes(), binding);
                    frontend::sasl_initial_response(mechanism, s.message(), &mut self.out)?;
                    self.send().await?;
                    scram = Some(s);
                }
                backend::Message::AuthenticationSaslContinue(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| ConnError::Protocol("SASL out of order".into()))?;
                    s.update(body.data())
                        .map_err(|e| ConnError::Auth(e.to_string()))?;
                    frontend::sasl_response(s.message(), &mut self.out)?;
                    self.send().await?;
                }
                backend::Message::AuthenticationSaslFinal(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| ConnError::Protocol("SASL out of order".into()))?;
                    s.finish(body.data())
                        .map_err(|e| ConnError::Auth(e.to_string()))?;
                }
                backend::Message::ErrorResponse(body) => {
                    let e = server_error(&body);
                    let text = e.to_string();
                    // 28P01 bad password, 28000 no pg_hba entry / no replication privilege.
                    return Err(if text.contains(" 28") {
                        ConnError::Auth(text)
                    } else {
                        e
                    });
                }
                backend::Message::ReadyForQuery(_) => return Ok(()),
                backend::Message::ParameterStatus(_)
                | backend::Message::BackendKeyData(_)
                | backend::Message::NoticeResponse(_) => {}
                _ => return Err(ConnError::Auth("unsupported authentication method".into())),
            }
        }
    }

    /// Runs a replication command with the simple query protocol; returns the rows of the
    /// last result set.
    pub async fn query(&mut self, sql: &str) -> Result<Rows, ConnError> {
        frontend::query(sql, &mut self.out)?;
        self.send().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.recv().await? {
                Msg::Backend(backend::Message::RowDescription(_)) => rows.clear(),
                Msg::Backend(backend::Message::DataRow(row)) => rows.push(data_row(&row)?),
                Msg::Backend(backend::Message::ErrorResponse(body)) => {
                    error = Some(server_error(&body))
                }
                Msg::Backend(backend::Message::ReadyForQuery(_)) => {
                    return match error {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    }
                }
                Msg::CopyBoth => {
                    return Err(ConnError::Protocol(format!("{sql}: unexpected CopyBoth")))
                }
                Msg::Backend(_) => {}
            }
        }
    }

    /// Sends a command whose answer is read with [`ReplicationConn::next_event`] (BASE_BACKUP:
    /// result sets, then a COPY out of archive data, then more result sets).
    pub async fn send_query(&mut self, sql: &str) -> Result<(), ConnError> {
        frontend::query(sql, &mut self.out)?;
        self.send().await
    }

    /// The next part of the answer to [`ReplicationConn::send_query`]. A server error ends
    /// the command: it is returned once the server is ready again.
    pub async fn next_event(&mut self) -> Result<QueryEvent, ConnError> {
        let mut rows = Vec::new();
        loop {
            match self.recv().await? {
                Msg::Backend(backend::Message::RowDescription(_)) => rows.clear(),
                Msg::Backend(backend::Message::DataRow(row)) => rows.push(data_row(&row)?),
                Msg::Backend(backend::Message::CommandComplete(_)) => {
                    return Ok(QueryEvent::Rows(std::mem::take(&mut rows)))
                }
                Msg::Backend(backend::Message::CopyOutResponse(_)) => {
                    return Ok(QueryEvent::CopyStart)
                }
                Msg::Backend(backend::Message::CopyData(body)) => {
                    return Ok(QueryEvent::Data(body.into_bytes()))
                }
                Msg::Backend(backend::Message::CopyDone) => return Ok(QueryEvent::CopyDone),
                Msg::Backend(backend::Message::ReadyForQuery(_)) => return Ok(QueryEvent::Ready),
                Msg::Backend(backend::Message::ErrorResponse(body)) => {
                    return Err(self.after_error(&body).await)
                }
                Msg::Backend(backend::Message::NoticeResponse(body)) => {
                    tracing::info!("server: {}", server_error_text(&body));
                }
                Msg::Backend(_) => {}
                Msg::CopyBoth => {
                    return Err(ConnError::Protocol("unexpected CopyBoth".into()));
                }
            }
        }
    }

    /// The server's error, once the connection is usable again (drained to ReadyForQuery);
    /// the error is kept even when the server closes the connection after it.
    async fn after_error(&mut self, body: &backend::ErrorResponseBody) -> ConnError {
        let e = server_error(body);
        loop {
            match self.recv().await {
                Ok(Msg::Backend(backend::Message::ReadyForQuery(_))) | Err(_) => return e,
                Ok(_) => {}
            }
        }
    }

    /// Sends START_REPLICATION (or any command answered with CopyBoth) and waits for the
    /// stream to begin.
    pub async fn start_copy(&mut self, sql: &str) -> Result<(), ConnError> {
        frontend::query(sql, &mut self.out)?;
        self.send().await?;
        loop {
            match self.recv().await? {
                Msg::CopyBoth => return Ok(()),
                Msg::Backend(backend::Message::ErrorResponse(body)) => {
                    return Err(self.after_error(&body).await)
                }
                Msg::Backend(backend::Message::NoticeResponse(_)) => {}
                Msg::Backend(m) => {
                    return Err(ConnError::Protocol(format!(
                        "{sql}: unexpected reply {}",
                        kind(&m)
                    )))
                }
            }
        }
    }

    /// Whether a whole message is already buffered (more WAL is waiting to be processed).
    fn has_buffered(&self) -> bool {
        self.buf.len() >= 5 && {
            let len =
                u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
            self.buf.len() > len
        }
    }

    /// Whether more of the stream is waiting: a whole message already buffered, or, after one
    /// read of the socket that does not wait (pg_receivewal's PQconsumeInput before it
    /// flushes), a whole message now. A synchronous receiver fsyncs and reports only when
    /// nothing is waiting, so one fsync covers every commit that arrived together.
    pub fn more_waiting(&mut self) -> Result<bool, ConnError> {
        use futures::FutureExt;
        if self.has_buffered() {
            return Ok(true);
        }
        self.buf.reserve(8192);
        // Ok(0), the end of the stream, is left for the next read to report.
        if let Some(Err(e)) = self.stream.read_buf(&mut self.buf).now_or_never() {
            return Err(ConnError::Io(e));
        }
        Ok(self.has_buffered())
    }

    /// The next message of the replication stream, or None when `wait` passed without one.
    pub async fn next(&mut self, wait: Duration) -> Result<Option<ReplMessage>, ConnError> {
        let msg = match tokio::time::timeout(wait, self.recv()).await {
            Err(_) => return Ok(None),
            Ok(m) => m?,
        };
        match msg {
            Msg::Backend(backend::Message::CopyData(body)) => {
                // The message's own buffer: WAL is not copied again on its way to the file.
                let mut d = body.into_bytes();
                if d.is_empty() {
                    return Err(ConnError::Protocol("empty CopyData".into()));
                }
                match d.get_u8() {
                    b'w' if d.len() >= 24 => {
                        let start = Lsn(d.get_u64());
                        let end = Lsn(d.get_u64());
                        let _time = d.get_i64();
                        Ok(Some(ReplMessage::XLogData {
                            start,
                            end,
                            data: d,
                        }))
                    }
                    b'k' if d.len() >= 17 => {
                        let end = Lsn(d.get_u64());
                        let _time = d.get_i64();
                        Ok(Some(ReplMessage::Keepalive {
                            end,
                            reply_requested: d.get_u8() != 0,
                        }))
                    }
                    t => Err(ConnError::Protocol(format!(
                        "unknown CopyData kind {:?}",
                        t as char
                    ))),
                }
            }
            Msg::Backend(backend::Message::CopyDone) => Ok(Some(ReplMessage::CopyDone)),
            Msg::Backend(backend::Message::ErrorResponse(body)) => Err(server_error(&body)),
            Msg::Backend(backend::Message::NoticeResponse(_)) => Ok(None),
            Msg::Backend(m) => Err(ConnError::Protocol(format!(
                "unexpected {} in the stream",
                kind(&m)
            ))),
            Msg::CopyBoth => Err(ConnError::Protocol("CopyBoth inside the stream".into())),
        }
    }

    /// A standby status update: what is written, what is flushed (fsynced), what is applied.
    pub async fn send_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        reply: bool,
    ) -> Result<(), ConnError> {
        let mut body = BytesMut::with_capacity(34);
        body.put_u8(b'r');
        body.put_u64(write.0);
        body.put_u64(flush.0);
        body.put_u64(0); // apply: a receiver applies nothing (pg_receivewal sends invalid)
        body.put_i64(pg_now());
        body.put_u8(u8::from(reply));
        frontend::CopyData::new(&body[..])?.write(&mut self.out);
        self.send().await
    }

    /// After the server's CopyDone: answers with CopyDone and reads what follows. At the end
    /// of a timeline the server names the next one and where it starts.
    pub async fn end_copy(&mut self) -> Result<Option<(u32, Lsn)>, ConnError> {
        frontend::copy_done(&mut self.out);
        self.send().await?;
        let mut next = None;
        loop {
            match self.recv().await? {
                Msg::Backend(backend::Message::DataRow(row)) => {
                    let r = data_row(&row)?;
                    let tli = r.first().cloned().flatten().and_then(|t| t.parse().ok());
                    let lsn = r.get(1).cloned().flatten().and_then(|l| l.parse().ok());
                    if let (Some(t), Some(l)) = (tli, lsn) {
                        next = Some((t, l));
                    }
                }
                Msg::Backend(backend::Message::ReadyForQuery(_)) => return Ok(next),
                Msg::Backend(backend::Message::ErrorResponse(body)) => {
                    return Err(server_error(&body))
                }
                Msg::Backend(backend::Message::CopyData(_)) => {} // late data after CopyDone
                _ => {}
            }
        }
    }
}

enum Msg {
    Backend(backend::Message),
    CopyBoth,
}

fn kind(m: &backend::Message) -> &'static str {
    match m {
        backend::Message::RowDescription(_) => "RowDescription",
        backend::Message::DataRow(_) => "DataRow",
        backend::Message::CommandComplete(_) => "CommandComplete",
        backend::Message::ReadyForQuery(_) => "ReadyForQuery",
        backend::Message::CopyOutResponse(_) => "CopyOutResponse",
        backend::Message::CopyInResponse(_) => "CopyInResponse",
        _ => "message",
    }
}

fn data_row(row: &backend::DataRowBody) -> Result<Vec<Option<String>>, ConnError> {
    let buf = row.buffer();
    let mut ranges = row.ranges();
    let mut out = Vec::new();
    loop {
        match ranges.next()? {
            None => return Ok(out),
            Some(None) => out.push(None),
            Some(Some(r)) => out.push(Some(String::from_utf8_lossy(&buf[r]).into_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::server_error_fix;

    #[test]
    fn the_first_server_errors_name_their_fix() {
        assert!(server_error_fix("28P01", "password authentication failed")
            .is_some_and(|f| f.contains("PGPASSWORD")));
        assert!(server_error_fix("28000", "no pg_hba.conf entry")
            .is_some_and(|f| f.contains("pg_hba.conf")));
        assert!(
            server_error_fix("42704", "replication slot \"walfs\" does not exist")
                .is_some_and(|f| f.contains("--create-slot"))
        );
        assert_eq!(server_error_fix("42704", "type \"x\" does not exist"), None);
        assert_eq!(server_error_fix("57P01", "terminating connection"), None);
    }
}
