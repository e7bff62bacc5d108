//! The byte stream under both kinds of connection: TCP with keepalives or a Unix socket,
//! then SSLRequest and a rustls handshake when the sslmode asks for TLS.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use super::conninfo::{ConnError, ConnectParams, Host, SslMode, SslNegotiation, socket_path};
use super::tls::{self, TlsInfo};
use crate::error::{Classify, ErrorClass};

/// A connected socket, encrypted or not.
pub(crate) enum PgStream {
    /// Plain TCP.
    Tcp(TcpStream),
    /// A local Unix socket (never encrypted, as in libpq).
    Unix(UnixStream),
    /// TLS over TCP.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl PgStream {
    /// True for TCP without TLS: passwords must not cross it in a readable form.
    pub(crate) fn is_plain_tcp(&self) -> bool {
        matches!(self, PgStream::Tcp(_))
    }

    /// The `tls-server-end-point` channel binding data, when TLS is on.
    pub(crate) fn channel_binding(&self) -> Option<Vec<u8>> {
        match self {
            PgStream::Tls(s) => {
                let (_, conn) = s.get_ref();
                let cert = conn.peer_certificates()?.first()?;
                tls::server_end_point(cert.as_ref())
            }
            _ => None,
        }
    }
}

impl AsyncRead for PgStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            PgStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PgStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PgStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            PgStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            PgStream::Unix(s) => Pin::new(s).poll_flush(cx),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            PgStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// One way of opening the stream; an sslmode is a list of them tried in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Attempt {
    /// No TLS.
    Plain,
    /// TLS; `or_plain`: go on unencrypted when the server does not offer TLS.
    Tls { or_plain: bool },
}

/// The attempts libpq makes for the sslmode of `params`: `allow` tries plain then TLS,
/// `prefer` TLS (plain when the server has none) then plain; Unix sockets never use TLS.
pub(crate) fn attempts(params: &ConnectParams) -> Vec<Attempt> {
    if matches!(params.host(), Host::Unix(_)) {
        return vec![Attempt::Plain];
    }
    match params.sslmode() {
        SslMode::Disable => vec![Attempt::Plain],
        SslMode::Allow => vec![Attempt::Plain, Attempt::Tls { or_plain: false }],
        SslMode::Prefer => vec![Attempt::Tls { or_plain: true }, Attempt::Plain],
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
            vec![Attempt::Tls { or_plain: false }]
        }
    }
}

/// The stream opened by one attempt.
pub(crate) struct Opened {
    /// The socket, encrypted or not.
    pub stream: PgStream,
    /// What TLS negotiated, when on.
    pub tls: Option<TlsInfo>,
}

/// Why the stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The TLS settings cannot be used (unreadable file, contradiction).
    #[error(transparent)]
    Params(#[from] ConnError),
    /// The TCP or socket connection could not be opened (refused, DNS failure, no socket).
    #[error(
        "cannot connect to {addr}: {source}; is the server running and accepting connections there?"
    )]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    /// The server does not do TLS and the sslmode requires it.
    #[error(
        "the server at {addr} does not accept TLS connections (sslmode={mode}); set ssl = on in its postgresql.conf, or choose sslmode=prefer"
    )]
    TlsRefused { addr: String, mode: &'static str },
    /// The TLS handshake failed.
    #[error("TLS to {addr}: {message}")]
    Handshake {
        addr: String,
        message: String,
        /// Retrying cannot help (a refused certificate).
        permanent: bool,
    },
    /// Reading or writing failed before the session started.
    #[error("connection to {addr} failed: {source}")]
    Io {
        addr: String,
        #[source]
        source: io::Error,
    },
}

impl Classify for TransportError {
    fn class(&self) -> ErrorClass {
        match self {
            TransportError::Params(e) => e.class(),
            TransportError::TlsRefused { .. } => ErrorClass::Config,
            TransportError::Handshake { permanent, .. } => {
                if *permanent {
                    ErrorClass::Config
                } else {
                    ErrorClass::Transient
                }
            }
            TransportError::Connect { .. } | TransportError::Io { .. } => ErrorClass::Transient,
        }
    }
}

/// Opens the socket for `attempt`: connects, sets keepalives, negotiates TLS.
pub(crate) async fn open(
    params: &ConnectParams,
    attempt: Attempt,
) -> Result<Opened, TransportError> {
    let addr = params.host_description();
    let connect_err = |source| TransportError::Connect {
        addr: addr.clone(),
        source,
    };
    let tcp = match params.host() {
        Host::Unix(dir) => {
            let s = UnixStream::connect(socket_path(dir, params.port()))
                .await
                .map_err(connect_err)?;
            return Ok(Opened {
                stream: PgStream::Unix(s),
                tls: None,
            });
        }
        Host::Tcp(h) => TcpStream::connect((h.as_str(), params.port()))
            .await
            .map_err(connect_err)?,
    };
    configure_tcp(&tcp, params);
    let Attempt::Tls { or_plain } = attempt else {
        return Ok(Opened {
            stream: PgStream::Tcp(tcp),
            tls: None,
        });
    };
    // Built before anything is sent, so a bad file is reported as such.
    let config = tls::client_config(params)?;
    let server_name = tls::server_name(params)?;
    let mut tcp = tcp;
    if params.tls().negotiation == SslNegotiation::Postgres && !ssl_request(&mut tcp, &addr).await?
    {
        if or_plain {
            return Ok(Opened {
                stream: PgStream::Tcp(tcp),
                tls: None,
            });
        }
        return Err(TransportError::TlsRefused {
            addr,
            mode: params.sslmode().as_str(),
        });
    }
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(server_name, tcp)
        .await
        .map_err(|e| {
            let (message, permanent) = tls::describe_handshake_error(&e, params);
            TransportError::Handshake {
                addr: addr.clone(),
                message,
                permanent,
            }
        })?;
    let info = TlsInfo::of(stream.get_ref().1, params);
    tracing::debug!(server = %addr, tls = %info, "TLS established");
    Ok(Opened {
        stream: PgStream::Tls(Box::new(stream)),
        tls: Some(info),
    })
}

/// Sends SSLRequest; true when the server agrees to TLS. Exactly one byte is read, so
/// nothing a man in the middle sends before the handshake is taken as protocol data.
async fn ssl_request(tcp: &mut TcpStream, addr: &str) -> Result<bool, TransportError> {
    let io_err = |source| TransportError::Io {
        addr: addr.to_owned(),
        source,
    };
    let mut buf = BytesMut::new();
    frontend::ssl_request(&mut buf);
    tcp.write_all(&buf).await.map_err(io_err)?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(io_err)?;
    // 'N': no TLS; servers before 7.0 answered with an ErrorResponse ('E').
    Ok(answer[0] == b'S')
}

/// Low latency for tiny status messages, and keepalives so a dead peer is noticed.
fn configure_tcp(tcp: &TcpStream, params: &ConnectParams) {
    let _ = tcp.set_nodelay(true);
    let k = params.keepalive();
    let sock = socket2::SockRef::from(tcp);
    if k.enabled {
        let ka = socket2::TcpKeepalive::new()
            .with_time(k.idle)
            .with_interval(k.interval)
            .with_retries(k.count);
        if let Err(e) = sock.set_tcp_keepalive(&ka) {
            tracing::debug!(error = %e, "cannot set TCP keepalives");
        }
    }
    #[cfg(target_os = "linux")]
    if let Err(e) = sock.set_tcp_user_timeout(k.user_timeout) {
        tracing::debug!(error = %e, "cannot set TCP_USER_TIMEOUT");
    }
}

/// The message for a server that asks for a password in a readable form (cleartext, or an
/// md5 hash anyone can replay against this server) over TCP without TLS; `None` when it
/// may be sent.
pub(crate) fn insecure_password_refusal(
    params: &ConnectParams,
    stream_is_plain_tcp: bool,
    method: &str,
) -> Option<String> {
    if !stream_is_plain_tcp || params.policy().allow_insecure_password {
        return None;
    }
    Some(format!(
        "the server at {} asks for the password of user \"{}\" by {method} over an unencrypted TCP connection, and walhook does not send it there: turn on TLS (ssl = on on the server, sslmode=verify-full), use scram-sha-256 in pg_hba.conf, connect over the Unix socket, or set allow_insecure_password = true in [source]",
        params.host_description(),
        params.user()
    ))
}
