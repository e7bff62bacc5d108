//! A real HTTP receiver on 127.0.0.1 for delivery tests: records every request and
//! answers as the test scripts it (status, headers, delay).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

/// One request as the receiver saw it.
#[derive(Clone, Debug)]
pub struct Received {
    /// When the request arrived (monotonic).
    pub at: Instant,
    /// When the request arrived (wall clock).
    pub wall: SystemTime,
    pub method: String,
    pub path: String,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Received {
    /// The first header with this (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

/// How the receiver answers one request.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub delay: Duration,
}

impl Reply {
    /// A plain answer with this status.
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: String::new(),
            delay: Duration::ZERO,
        }
    }

    /// Adds a header.
    pub fn header(mut self, k: &str, v: &str) -> Reply {
        self.headers.push((k.into(), v.into()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, b: &str) -> Reply {
        self.body = b.into();
        self
    }

    /// Answers only after `d`.
    pub fn after(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }
}

type Responder = Arc<dyn Fn(&Received, usize) -> Reply + Send + Sync>;

#[derive(Default)]
struct State {
    requests: Vec<Received>,
    script: std::collections::VecDeque<Reply>,
}

/// The receiver. Dropping it stops the server.
pub struct Receiver {
    pub addr: SocketAddr,
    /// "http" or "https".
    scheme: &'static str,
    state: Arc<Mutex<State>>,
    responder: Arc<Mutex<Option<Responder>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Receiver {
    /// Starts on a free port; answers 200 unless scripted.
    pub async fn start() -> Receiver {
        Self::start_on(0).await
    }

    /// Starts on `port` (0 = any free port).
    pub async fn start_on(port: u16) -> Receiver {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind receiver");
        Self::serve(listener, "http")
    }

    /// Starts an HTTPS receiver on a free port presenting `cert_chain` (DER) with `key`.
    pub async fn start_tls(
        cert_chain: Vec<rustls::pki_types::CertificateDer<'static>>,
        key: rustls::pki_types::PrivateKeyDer<'static>,
    ) -> Receiver {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(cert_chain, key)
            .expect("server certificate");
        let tcp = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind receiver");
        let listener = TlsListener {
            tcp,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        };
        Self::serve(listener, "https")
    }

    fn serve<L>(listener: L, scheme: &'static str) -> Receiver
    where
        L: axum::serve::Listener<Addr = SocketAddr>,
    {
        let addr = listener.local_addr().expect("receiver addr");
        let state: Arc<Mutex<State>> = Arc::default();
        let responder: Arc<Mutex<Option<Responder>>> = Arc::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = {
            let state = state.clone();
            let responder = responder.clone();
            axum::Router::new().fallback(
                move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                    let state = state.clone();
                    let responder = responder.clone();
                    async move { handle(state, responder, method, uri, headers, body).await }
                },
            )
        };
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        Receiver {
            addr,
            scheme,
            state,
            responder,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// `http://127.0.0.1:port{path}` (`https://` for a TLS receiver).
    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme, self.addr)
    }

    /// Answers the next requests with these replies, in order, then as before.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.state.lock().unwrap().script.extend(replies);
    }

    /// Decides every unscripted answer: gets the request and how many requests came before it.
    pub fn respond_with(&self, f: impl Fn(&Received, usize) -> Reply + Send + Sync + 'static) {
        *self.responder.lock().unwrap() = Some(Arc::new(f));
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Received> {
        self.state.lock().unwrap().requests.clone()
    }

    /// How many requests so far.
    pub fn count(&self) -> usize {
        self.state.lock().unwrap().requests.len()
    }

    /// Waits until at least `n` requests arrived; panics naming `what` after `timeout`.
    pub async fn wait_for_count(&self, n: usize, timeout: Duration, what: &str) {
        super::eventually(timeout, what, || async {
            (self.count() >= n).then_some(())
        })
        .await;
    }

    /// Stops the server and waits until the port is closed.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

async fn handle(
    state: Arc<Mutex<State>>,
    responder: Arc<Mutex<Option<Responder>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let received = Received {
        at: Instant::now(),
        wall: SystemTime::now(),
        method: method.to_string(),
        path: uri.to_string(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
            .collect(),
        body,
    };
    let reply = {
        let mut st = state.lock().unwrap();
        let index = st.requests.len();
        st.requests.push(received.clone());
        match st.script.pop_front() {
            Some(r) => r,
            None => match responder.lock().unwrap().as_ref() {
                Some(f) => f(&received, index),
                None => Reply::status(200),
            },
        }
    };
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let mut resp = (
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        reply.body,
    )
        .into_response();
    for (k, v) in reply.headers {
        if let (Ok(k), Ok(v)) = (
            axum::http::HeaderName::from_bytes(k.as_bytes()),
            axum::http::HeaderValue::from_str(&v),
        ) {
            resp.headers_mut().insert(k, v);
        }
    }
    resp
}

/// TCP with a TLS handshake per connection; connections whose handshake fails (a client
/// that does not trust the certificate) are dropped and the next one is accepted.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((stream, addr)) = self.tcp.accept().await else {
                continue;
            };
            if let Ok(tls) = self.acceptor.accept(stream).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// A test CA and a certificate it signed for 127.0.0.1 and localhost.
pub fn test_ca() -> (
    String,
    rustls::pki_types::CertificateDer<'static>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "walhook test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server_params =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into());
    (ca_cert.pem(), server_cert.der().clone(), key)
}
