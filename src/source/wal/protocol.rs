//! The streaming replication protocol on one connection: start-up in `replication=database`
//! mode (TLS by the URL's `sslmode` through the OpenSSL connector every other PostgreSQL
//! connection uses, SCRAM-SHA-256 / MD5 / cleartext through `postgres-protocol`, the library
//! tokio-postgres itself authenticates with), simple queries before streaming, then
//! `START_REPLICATION` and the COPY-both frames (`XLogData`, keepalives, standby status).
//!
//! Reads are cancel-safe: bytes go into a buffer owned by the connection and a frame is taken
//! out only once complete, so a read dropped half-way loses nothing.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};

use crate::error::{Error, WalError};

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// A byte stream, plain or TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One backend message: its tag and body.
#[derive(Debug)]
pub struct Frame {
    pub tag: u8,
    pub body: BytesMut,
}

/// What a replication connection receives once streaming.
#[derive(Debug, PartialEq)]
pub enum StreamMessage {
    /// `XLogData`: a pgoutput message starting at `start`.
    XLogData { start: u64, data: bytes::Bytes },
    /// The server's position; `reply` when it wants a status update now.
    Keepalive { wal_end: u64, reply: bool },
    /// The server ended the COPY (shutdown, or the slot was dropped).
    End,
}

/// A connection in replication mode.
pub struct ReplicationConnection {
    io: Box<dyn Io>,
    buf: BytesMut,
}

/// A row of a simple query's result, as text (`None` for NULL).
pub type TextRow = Vec<Option<String>>;

/// Settings of the replication session (startup `options`): text output pinned so the
/// decoder reads timestamps one way, and `wal_sender_timeout` (settable per session since
/// PostgreSQL 12) so a relay that vanished frees the slot within its lease.
pub fn session_options(wal_sender_timeout: Duration) -> String {
    format!(
        "-c datestyle=ISO -c timezone=UTC -c extra_float_digits=3 -c wal_sender_timeout={}",
        wal_sender_timeout.as_millis()
    )
}

impl ReplicationConnection {
    /// Connects to the first host of `url` in `replication=database` mode.
    pub async fn connect(url: &str, options: &str) -> Result<Self, Error> {
        let config: tokio_postgres::Config = url.parse()?;
        let host = match config.get_hosts().first() {
            Some(Host::Tcp(host)) => host.clone(),
            Some(_) => {
                return Err(Error::Misconfigured(
                    "source.url: capture = \"wal\" connects over TCP; a Unix socket host is not supported".into(),
                ))
            }
            None => "localhost".into(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let timeout = config
            .get_connect_timeout()
            .copied()
            .unwrap_or(crate::pg::CONNECT_TIMEOUT);
        let tcp = tokio::time::timeout(timeout, TcpStream::connect((host.as_str(), port)))
            .await
            .map_err(|_| WalError::Io(format!("connecting to {host}:{port} timed out")))?
            .map_err(|e| WalError::Io(format!("connecting to {host}:{port}: {e}")))?;
        tcp.set_nodelay(true).ok();
        let io = negotiate_tls(tcp, &host, config.get_ssl_mode()).await?;
        let mut conn = Self {
            io,
            buf: BytesMut::with_capacity(64 * 1024),
        };
        let user = config.get_user().unwrap_or("postgres").to_string();
        let database = config.get_dbname().unwrap_or(&user).to_string();
        let mut params = [
            ("user", user.as_str()),
            ("database", database.as_str()),
            ("replication", "database"),
            ("application_name", "dualsync relay"),
            ("options", options),
        ];
        if let Some(name) = config.get_application_name() {
            params[3].1 = name;
        }
        let mut out = BytesMut::new();
        frontend::startup_message(params.iter().copied(), &mut out).map_err(io_error)?;
        conn.write(&out).await?;
        conn.authenticate(&user, config.get_password()).await?;
        Ok(conn)
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.io.write_all(bytes).await.map_err(io_error)?;
        self.io.flush().await.map_err(io_error)?;
        Ok(())
    }

    /// The next complete backend message (cancel-safe).
    pub async fn read_frame(&mut self) -> Result<Frame, Error> {
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes(self.buf[1..5].try_into().expect("4 bytes"));
                let len = usize::try_from(len)
                    .ok()
                    .filter(|l| *l >= 4)
                    .ok_or_else(|| WalError::Protocol(format!("bad message length {len}")))?;
                if self.buf.len() > len {
                    let mut frame = self.buf.split_to(len + 1);
                    let tag = frame[0];
                    frame.advance(5);
                    return Ok(Frame { tag, body: frame });
                }
                self.buf.reserve(len + 1 - self.buf.len());
            }
            let n = self.io.read_buf(&mut self.buf).await.map_err(io_error)?;
            if n == 0 {
                return Err(
                    WalError::Io("the server closed the replication connection".into()).into(),
                );
            }
        }
    }

    async fn authenticate(&mut self, user: &str, password: Option<&[u8]>) -> Result<(), Error> {
        let mut scram: Option<ScramSha256> = None;
        loop {
            let mut frame = self.read_frame().await?;
            match frame.tag {
                b'R' => {
                    let code = get_i32(&mut frame.body)?;
                    let mut out = BytesMut::new();
                    let password = || {
                        password.ok_or_else(|| {
                            Error::Misconfigured(
                                "source.url: the server asks for a password and the URL has none"
                                    .into(),
                            )
                        })
                    };
                    match code {
                        0 => continue,
                        3 => frontend::password_message(password()?, &mut out).map_err(io_error)?,
                        5 => {
                            let salt: [u8; 4] = frame.body[..4]
                                .try_into()
                                .map_err(|_| WalError::Protocol("short MD5 salt".into()))?;
                            let hash = postgres_protocol::authentication::md5_hash(
                                user.as_bytes(),
                                password()?,
                                salt,
                            );
                            frontend::password_message(hash.as_bytes(), &mut out)
                                .map_err(io_error)?;
                        }
                        10 => {
                            let mechanisms = String::from_utf8_lossy(&frame.body).to_string();
                            if !mechanisms.split('\0').any(|m| m == "SCRAM-SHA-256") {
                                return Err(WalError::Protocol(format!(
                                    "no supported SASL mechanism offered ({mechanisms:?})"
                                ))
                                .into());
                            }
                            let s = ScramSha256::new(password()?, ChannelBinding::unsupported());
                            frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut out)
                                .map_err(io_error)?;
                            scram = Some(s);
                        }
                        11 | 12 => {
                            let s = scram.as_mut().ok_or_else(|| {
                                WalError::Protocol("SASL message before SASL started".into())
                            })?;
                            if code == 11 {
                                s.update(&frame.body).map_err(io_error)?;
                                frontend::sasl_response(s.message(), &mut out).map_err(io_error)?;
                            } else {
                                s.finish(&frame.body).map_err(io_error)?;
                                continue;
                            }
                        }
                        other => {
                            return Err(WalError::Protocol(format!(
                                "unsupported authentication request {other}"
                            ))
                            .into())
                        }
                    }
                    self.write(&out).await?;
                }
                b'E' => return Err(server_error(&frame.body).into()),
                b'Z' => return Ok(()),
                // ParameterStatus, BackendKeyData, NoticeResponse.
                _ => {}
            }
        }
    }

    /// Runs one simple query (SQL or a replication command) and returns its rows as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<TextRow>, Error> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).map_err(io_error)?;
        self.write(&out).await?;
        let mut rows = Vec::new();
        let mut failed = None;
        loop {
            let mut frame = self.read_frame().await?;
            match frame.tag {
                b'D' => {
                    let n = get_i16(&mut frame.body)?;
                    let mut row = Vec::with_capacity(n.max(0) as usize);
                    for _ in 0..n {
                        let len = get_i32(&mut frame.body)?;
                        if len < 0 {
                            row.push(None);
                        } else {
                            let bytes = take(&mut frame.body, len as usize)?;
                            row.push(Some(String::from_utf8_lossy(&bytes).into_owned()));
                        }
                    }
                    rows.push(row);
                }
                b'E' => failed = Some(server_error(&frame.body)),
                b'Z' => {
                    return match failed {
                        Some(e) => Err(e.into()),
                        None => Ok(rows),
                    }
                }
                _ => {}
            }
        }
    }

    /// Sends `START_REPLICATION` and waits for the server to accept it (the slot is then held
    /// by this session) or refuse it (55006: another session streams the slot).
    pub async fn start_replication(&mut self, command: &str) -> Result<(), Error> {
        let mut out = BytesMut::new();
        frontend::query(command, &mut out).map_err(io_error)?;
        self.write(&out).await?;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'W' => return Ok(()),
                b'E' => return Err(server_error(&frame.body).into()),
                _ => {}
            }
        }
    }

    /// The next message of the stream (cancel-safe).
    pub async fn next_message(&mut self) -> Result<StreamMessage, Error> {
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'd' => return parse_copy_data(frame.body),
                b'c' => return Ok(StreamMessage::End),
                b'E' => return Err(server_error(&frame.body).into()),
                _ => {}
            }
        }
    }

    /// A standby status update: everything up to `flushed` is processed (the slot's confirmed
    /// flush position may move there); `reply` asks the server to answer at once.
    pub async fn send_status(&mut self, flushed: u64, reply: bool) -> Result<(), Error> {
        let mut out = BytesMut::new();
        out.put_u8(b'd');
        out.put_i32(4 + 1 + 8 * 4 + 1);
        out.put_u8(b'r');
        out.put_u64(flushed);
        out.put_u64(flushed);
        out.put_u64(flushed);
        out.put_i64(now_pg_micros());
        out.put_u8(u8::from(reply));
        self.write(&out).await
    }
}

/// Parses the payload of a CopyData message of the stream.
pub fn parse_copy_data(mut body: BytesMut) -> Result<StreamMessage, Error> {
    let kind = get_u8(&mut body)?;
    match kind {
        b'w' => {
            let start = get_u64(&mut body)?;
            let _end = get_u64(&mut body)?;
            let _time = get_u64(&mut body)?;
            Ok(StreamMessage::XLogData {
                start,
                data: body.freeze(),
            })
        }
        b'k' => {
            let wal_end = get_u64(&mut body)?;
            let _time = get_u64(&mut body)?;
            let reply = get_u8(&mut body)? == 1;
            Ok(StreamMessage::Keepalive { wal_end, reply })
        }
        other => Err(WalError::Protocol(format!(
            "unknown replication message {:?}",
            other as char
        ))
        .into()),
    }
}

fn now_pg_micros() -> i64 {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64);
    unix - PG_EPOCH_OFFSET_MICROS
}

async fn negotiate_tls(tcp: TcpStream, host: &str, mode: SslMode) -> Result<Box<dyn Io>, Error> {
    if mode == SslMode::Disable {
        return Ok(Box::new(tcp));
    }
    let mut tcp = tcp;
    let mut out = BytesMut::new();
    frontend::ssl_request(&mut out);
    tcp.write_all(&out).await.map_err(io_error)?;
    let answer = tcp.read_u8().await.map_err(io_error)?;
    if answer != b'S' {
        if mode == SslMode::Require {
            return Err(Error::Connect(format!(
                "source.url has sslmode=require and the server at {host} does not offer TLS"
            )));
        }
        return Ok(Box::new(tcp));
    }
    let mut maker = crate::pg::tls_connector()?;
    let connector = MakeTlsConnect::<TcpStream>::make_tls_connect(&mut maker, host)
        .map_err(|e| Error::Connect(format!("TLS to {host}: {e}")))?;
    let stream = connector
        .connect(tcp)
        .await
        .map_err(|e| Error::Connect(format!("TLS to {host}: {e}")))?;
    Ok(Box::new(stream))
}

fn io_error(e: std::io::Error) -> Error {
    WalError::Io(e.to_string()).into()
}

/// The fields of an ErrorResponse: SQLSTATE and message.
fn server_error(body: &[u8]) -> WalError {
    let (mut code, mut message, mut detail) = (String::new(), String::new(), String::new());
    for field in body.split(|b| *b == 0) {
        if let Some((kind, text)) = field.split_first() {
            let text = String::from_utf8_lossy(text).into_owned();
            match kind {
                b'C' => code = text,
                b'M' => message = text,
                b'D' => detail = text,
                _ => {}
            }
        }
    }
    if !detail.is_empty() {
        message = format!("{message} ({detail})");
    }
    WalError::Server { code, message }
}

fn short() -> Error {
    WalError::Protocol("message shorter than its fields".into()).into()
}

pub(super) fn get_u8(b: &mut impl Buf) -> Result<u8, Error> {
    (b.remaining() >= 1).then(|| b.get_u8()).ok_or_else(short)
}
pub(super) fn get_i16(b: &mut impl Buf) -> Result<i16, Error> {
    (b.remaining() >= 2).then(|| b.get_i16()).ok_or_else(short)
}
pub(super) fn get_i32(b: &mut impl Buf) -> Result<i32, Error> {
    (b.remaining() >= 4).then(|| b.get_i32()).ok_or_else(short)
}
pub(super) fn get_u64(b: &mut impl Buf) -> Result<u64, Error> {
    (b.remaining() >= 8).then(|| b.get_u64()).ok_or_else(short)
}
pub(super) fn take(b: &mut impl Buf, n: usize) -> Result<bytes::Bytes, Error> {
    (b.remaining() >= n)
        .then(|| b.copy_to_bytes(n))
        .ok_or_else(short)
}
/// A NUL-terminated string.
pub(super) fn get_cstr(b: &mut impl Buf) -> Result<String, Error> {
    let chunk = b.chunk();
    let end = chunk.iter().position(|c| *c == 0).ok_or_else(short)?;
    let text = String::from_utf8_lossy(&chunk[..end]).into_owned();
    b.advance(end + 1);
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalives_and_xlogdata_are_told_apart() {
        let mut k = BytesMut::new();
        k.put_u8(b'k');
        k.put_u64(0x1_0000_0028);
        k.put_i64(5);
        k.put_u8(1);
        assert_eq!(
            parse_copy_data(k).unwrap(),
            StreamMessage::Keepalive {
                wal_end: 0x1_0000_0028,
                reply: true
            }
        );
        let mut w = BytesMut::new();
        w.put_u8(b'w');
        w.put_u64(7);
        w.put_u64(9);
        w.put_i64(0);
        w.put_slice(b"B...");
        let StreamMessage::XLogData { start, data } = parse_copy_data(w).unwrap() else {
            panic!("not XLogData")
        };
        assert_eq!((start, &data[..]), (7, &b"B..."[..]));
        let mut cut = BytesMut::new();
        cut.put_u8(b'k');
        cut.put_u32(1);
        assert!(parse_copy_data(cut).is_err());
    }

    #[test]
    fn server_errors_keep_their_sqlstate() {
        let body = b"SERROR\0C55006\0Mreplication slot \"s\" is active for PID 7\0\0";
        let WalError::Server { code, message } = server_error(body) else {
            panic!()
        };
        assert_eq!(code, "55006");
        assert!(message.contains("is active"));
    }
}
