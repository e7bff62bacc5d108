//! TLS to PostgreSQL with rustls: the client configuration libpq's settings ask for
//! (trust anchors, client certificate, protocol versions, how much of the server
//! certificate is checked) and the `tls-server-end-point` channel binding data for SCRAM.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use sha2::Digest;

use super::conninfo::{ConnError, ConnectParams, RootCert, TlsVersion};

/// ALPN protocol name PostgreSQL 17 requires for direct TLS and accepts otherwise.
const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// How much of the server certificate was checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verification {
    /// Nothing: encrypted, but the server is not authenticated.
    None,
    /// The chain up to a trusted root, not the host name.
    Chain,
    /// The chain and the host name.
    Full,
}

/// What a TLS session negotiated, for `walhook check` and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsInfo {
    /// Protocol version, e.g. `TLSv1.3`.
    pub protocol: String,
    /// Cipher suite, e.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher: String,
    /// How much of the server certificate was checked.
    pub verification: Verification,
    /// The name the certificate was checked against (or would have been).
    pub host: String,
}

impl fmt::Display for TlsInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}), ", self.protocol, self.cipher)?;
        match self.verification {
            Verification::Full => write!(f, "certificate verified for host {}", self.host),
            Verification::Chain => write!(
                f,
                "certificate chain verified, host name {} not checked",
                self.host
            ),
            Verification::None => f.write_str("server certificate NOT verified"),
        }
    }
}

impl TlsInfo {
    /// Reads what the finished handshake of `conn` negotiated.
    pub(crate) fn of(conn: &rustls::ClientConnection, params: &ConnectParams) -> TlsInfo {
        let protocol = match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_owned(),
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_owned(),
            Some(other) => format!("{other:?}"),
            None => "unknown".to_owned(),
        };
        let cipher = conn
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()))
            .unwrap_or_else(|| "unknown".to_owned());
        let tls = params.tls();
        let verification = match (tls.verifies_chain(), tls.verifies_host()) {
            (true, true) => Verification::Full,
            (true, false) => Verification::Chain,
            (false, _) => Verification::None,
        };
        TlsInfo {
            protocol,
            cipher,
            verification,
            host: params.tls_host().unwrap_or_default().to_owned(),
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    // Explicit, so a second provider compiled in by another crate cannot make the
    // process-wide default ambiguous.
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(msg: String) -> ConnError {
    ConnError::Tls(msg)
}

/// The server name for SNI and certificate checks: the host, as DNS name or IP address.
pub(crate) fn server_name(params: &ConnectParams) -> Result<ServerName<'static>, ConnError> {
    let host = params.tls_host().unwrap_or("localhost");
    ServerName::try_from(host.to_owned()).map_err(|_| {
        tls_err(format!(
            "host \"{host}\" is neither a DNS name nor an IP address, so TLS cannot check the server certificate against it"
        ))
    })
}

/// The rustls client configuration for `params`. Files are read on every call, so a
/// rotated certificate is picked up by the next connection.
pub(crate) fn client_config(params: &ConnectParams) -> Result<Arc<ClientConfig>, ConnError> {
    let tls = params.tls();
    let provider = provider();
    let mut versions: Vec<&'static rustls::SupportedProtocolVersion> = Vec::new();
    let max = tls.max_version.unwrap_or(TlsVersion::V1_3);
    if max >= TlsVersion::V1_3 {
        versions.push(&rustls::version::TLS13);
    }
    if tls.min_version <= TlsVersion::V1_2 {
        versions.push(&rustls::version::TLS12);
    }
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| tls_err(format!("TLS protocol versions: {e}")))?;
    let verifier: Arc<dyn ServerCertVerifier> = match &tls.root_cert {
        RootCert::None => Arc::new(NoVerification(provider.clone())),
        RootCert::System => webpki_verifier(system_roots()?, params, &provider)?,
        RootCert::File(path) => webpki_verifier(Arc::new(file_roots(path)?), params, &provider)?,
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match &tls.client_cert {
        Some((cert, key)) => {
            let certs = read_certs(cert, "client certificate")?;
            let key = read_key(key)?;
            builder.with_client_auth_cert(certs, key).map_err(|e| {
                tls_err(format!(
                    "client certificate {} and key do not fit together: {e}",
                    cert.display()
                ))
            })?
        }
        None => builder.with_no_client_auth(),
    };
    config.enable_sni = tls.sni;
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Arc::new(config))
}

/// Checks the chain against `roots` (and the revocation list), the host name only for
/// verify-full.
fn webpki_verifier(
    roots: Arc<RootCertStore>,
    params: &ConnectParams,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ServerCertVerifier>, ConnError> {
    let mut b = WebPkiServerVerifier::builder_with_provider(roots, provider.clone());
    if let Some(crl) = &params.tls().crl {
        b = b.with_crls(read_crls(crl)?);
    }
    let webpki = b
        .build()
        .map_err(|e| tls_err(format!("cannot use the TLS trust anchors: {e}")))?;
    Ok(if params.tls().verifies_host() {
        webpki
    } else {
        Arc::new(ChainOnly(webpki))
    })
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, ConnError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| tls_err(format!("cannot read {what} file {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(tls_err(format!(
            "{what} file {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

fn file_roots(path: &Path) -> Result<RootCertStore, ConnError> {
    let mut store = RootCertStore::empty();
    for cert in read_certs(path, "root certificate (sslrootcert)")? {
        store.add(cert).map_err(|e| {
            tls_err(format!(
                "root certificate file {} holds an unusable certificate: {e}",
                path.display()
            ))
        })?;
    }
    Ok(store)
}

/// The OS trust store, loaded once per process.
fn system_roots() -> Result<Arc<RootCertStore>, ConnError> {
    static ROOTS: OnceLock<Result<Arc<RootCertStore>, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let loaded = rustls_native_certs::load_native_certs();
            let mut store = RootCertStore::empty();
            let (added, _ignored) = store.add_parsable_certificates(loaded.certs);
            if added == 0 {
                let why = loaded
                    .errors
                    .first()
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "no certificates found".to_owned());
                return Err(format!(
                    "sslrootcert=system: the OS trust store is empty or unreadable ({why}); install ca-certificates or name a CA file in sslrootcert"
                ));
            }
            Ok(Arc::new(store))
        })
        .clone()
        .map_err(tls_err)
}

fn read_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, ConnError> {
    CertificateRevocationListDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            tls_err(format!(
                "cannot read certificate revocation list {} (sslcrl): {e}",
                path.display()
            ))
        })
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, ConnError> {
    check_key_permissions(path)?;
    let text = std::fs::read(path)
        .map_err(|e| tls_err(format!("cannot read private key {}: {e}", path.display())))?;
    if text.windows(9).any(|w| w == b"ENCRYPTED") {
        return Err(tls_err(format!(
            "private key {} is encrypted, which walhook cannot use; store it decrypted with mode 0600 (openssl pkey -in KEY -out KEY.plain)",
            path.display()
        )));
    }
    PrivateKeyDer::from_pem_slice(&text).map_err(|e| {
        tls_err(format!(
            "private key {} is not a PEM PKCS#8, PKCS#1 or SEC1 key: {e}",
            path.display()
        ))
    })
}

/// libpq's rule: the key may be readable by its owner only, or also by the group when
/// root owns it.
fn check_key_permissions(path: &Path) -> Result<(), ConnError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| tls_err(format!("cannot read private key {}: {e}", path.display())))?;
    let mode = meta.mode();
    let too_open = if meta.uid() == 0 {
        mode & 0o037 != 0
    } else {
        mode & 0o077 != 0
    };
    if too_open {
        return Err(tls_err(format!(
            "private key {} has group or world access (mode {:o}); run: chmod 0600 {}",
            path.display(),
            mode & 0o777,
            path.display()
        )));
    }
    Ok(())
}

/// `sslmode=require` (and weaker) without a root certificate: encryption only. The
/// handshake signatures are still checked, so the session key belongs to whoever holds
/// the certificate's private key.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca` (and `require` with a root certificate): the chain must lead to a trusted
/// root, the host name is not compared. webpki checks the chain before the name, so a
/// name mismatch means the chain was good.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The `tls-server-end-point` channel binding data (RFC 5929): the hash of the server's
/// certificate with the hash function of its signature algorithm, MD5 and SHA-1 raised to
/// SHA-256. `None` for algorithms without one (Ed25519), as PostgreSQL does.
pub(crate) fn server_end_point(cert: &[u8]) -> Option<Vec<u8>> {
    use x509_cert::der::Decode;
    use x509_cert::der::oid::db::rfc5912 as oid;
    let parsed = x509_cert::Certificate::from_der(cert).ok()?;
    let alg = parsed.signature_algorithm.oid;
    if [
        oid::MD_5_WITH_RSA_ENCRYPTION,
        oid::SHA_1_WITH_RSA_ENCRYPTION,
        oid::SHA_256_WITH_RSA_ENCRYPTION,
        oid::ECDSA_WITH_SHA_256,
        oid::DSA_WITH_SHA_1,
        oid::ID_SHA_1,
        oid::ID_SHA_256,
    ]
    .contains(&alg)
    {
        Some(sha2::Sha256::digest(cert).to_vec())
    } else if [
        oid::SHA_384_WITH_RSA_ENCRYPTION,
        oid::ECDSA_WITH_SHA_384,
        oid::ID_SHA_384,
    ]
    .contains(&alg)
    {
        Some(sha2::Sha384::digest(cert).to_vec())
    } else if [
        oid::SHA_512_WITH_RSA_ENCRYPTION,
        oid::ECDSA_WITH_SHA_512,
        oid::ID_SHA_512,
    ]
    .contains(&alg)
    {
        Some(sha2::Sha512::digest(cert).to_vec())
    } else {
        None
    }
}

/// One line for a failed handshake, naming what to fix; `true` when retrying cannot help.
pub(crate) fn describe_handshake_error(
    e: &std::io::Error,
    params: &ConnectParams,
) -> (String, bool) {
    let host = params.tls_host().unwrap_or_default();
    let root = match &params.tls().root_cert {
        RootCert::File(p) => format!("sslrootcert {}", p.display()),
        RootCert::System => "the OS trust store (sslrootcert=system)".to_owned(),
        RootCert::None => "no root certificate".to_owned(),
    };
    let tls_error = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match tls_error {
        Some(rustls::Error::InvalidCertificate(cert)) => {
            let why = match cert {
                CertificateError::UnknownIssuer => format!(
                    "it is not signed by a CA in {root}; point sslrootcert at the CA that signed the server certificate"
                ),
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => format!(
                    "it is not valid for host name \"{host}\" (sslmode=verify-full); connect with a name the certificate lists, or reissue it with this name"
                ),
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    "it has expired; renew the server certificate".to_owned()
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    "it is not valid yet; check the clocks of both machines".to_owned()
                }
                CertificateError::Revoked => "it is revoked (sslcrl)".to_owned(),
                other => format!("{other:?}"),
            };
            (format!("the server certificate was refused: {why}"), true)
        }
        Some(rustls::Error::AlertReceived(alert)) => (
            format!(
                "the server ended the TLS handshake ({alert:?}); check ssl_min_protocol_version and the client certificate (sslcert/sslkey)"
            ),
            true,
        ),
        Some(other) => (format!("TLS handshake failed: {other}"), false),
        None => (format!("TLS handshake failed: {e}"), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn server_end_point_hashes_with_the_certificate_signature_hash() {
        // rcgen signs with ECDSA P-256 / SHA-256 by default.
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["db".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = cert.der().as_ref();
        assert_eq!(
            server_end_point(der),
            Some(sha2::Sha256::digest(der).to_vec())
        );
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["db".to_owned()])
            .unwrap()
            .self_signed(&p384)
            .unwrap();
        let der = cert.der().as_ref();
        assert_eq!(
            server_end_point(der),
            Some(sha2::Sha384::digest(der).to_vec())
        );
        // Ed25519 has no hash of its own: no channel binding, as in PostgreSQL.
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["db".to_owned()])
            .unwrap()
            .self_signed(&ed)
            .unwrap();
        assert_eq!(server_end_point(cert.der().as_ref()), None);
        assert_eq!(server_end_point(b"not a certificate"), None);
    }

    #[test]
    fn private_keys_must_be_private_and_unencrypted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.key");
        let key = rcgen::KeyPair::generate().unwrap();
        std::fs::write(&path, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let uid = nix::unistd::geteuid();
        let err = read_key(&path).unwrap_err().to_string();
        // root may leave a key group-readable (0640), not world-readable.
        assert!(err.contains("chmod 0600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read_key(&path).is_ok());
        if uid.is_root() {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
            assert!(read_key(&path).is_ok());
        }
        std::fs::write(
            &path,
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(
            read_key(&path)
                .unwrap_err()
                .to_string()
                .contains("encrypted")
        );
    }
}
