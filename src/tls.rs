//! Trust for walhook's outgoing TLS (listeners, monitor webhooks, SMTP): Mozilla's roots
//! built in, the OS trust store, and a `ca_file` per listener or monitor for internal CAs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// The CA certificates of a `ca_file`, read and checked when the configuration is loaded.
#[derive(Clone, PartialEq, Eq)]
pub struct CaFile {
    path: PathBuf,
    certs: Vec<CertificateDer<'static>>,
}

impl CaFile {
    /// Reads the PEM certificates in `path`; the message says what is wrong with the file.
    pub fn load(path: &Path) -> Result<CaFile, String> {
        let pem =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut certs = Vec::new();
        for (i, item) in CertificateDer::pem_slice_iter(&pem).enumerate() {
            let cert = item.map_err(|e| format!("{} is not valid PEM ({e})", path.display()))?;
            // A certificate rustls cannot use as a trust anchor would only fail later, at
            // every handshake.
            RootCertStore::empty().add(cert.clone()).map_err(|e| {
                format!(
                    "certificate {} in {} cannot be used as a CA ({e})",
                    i + 1,
                    path.display()
                )
            })?;
            certs.push(cert);
        }
        if certs.is_empty() {
            return Err(format!(
                "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                path.display()
            ));
        }
        Ok(CaFile {
            path: path.to_owned(),
            certs,
        })
    }

    /// Where the certificates were read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The certificates, in file order.
    pub fn certificates(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }
}

impl std::fmt::Debug for CaFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CaFile({}, {} certificate(s))",
            self.path.display(),
            self.certs.len()
        )
    }
}

/// The OS trust store (`SSL_CERT_FILE` / `SSL_CERT_DIR`, or the distribution's bundle),
/// read once per process and kept to the certificates rustls accepts as trust anchors.
fn native_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::debug!("OS trust store: {e}");
        }
        let roots: Vec<CertificateDer<'static>> = found
            .certs
            .into_iter()
            .filter(|c| RootCertStore::empty().add(c.clone()).is_ok())
            .collect();
        tracing::debug!(certificates = roots.len(), "OS trust store read");
        roots
    })
}

/// Every CA walhook trusts for one listener or monitor: the built-in Mozilla roots, the OS
/// trust store and `ca`.
pub fn root_store(ca: Option<&CaFile>) -> RootCertStore {
    let mut store = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    store.add_parsable_certificates(native_roots().iter().cloned());
    if let Some(ca) = ca {
        store.add_parsable_certificates(ca.certs.iter().cloned());
    }
    store
}

/// A rustls client configuration trusting [`root_store`]`(ca)`.
pub fn client_config(ca: Option<&CaFile>) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(root_store(ca))
        .with_no_client_auth())
}

/// An HTTP client builder whose TLS trusts [`root_store`]`(ca)`.
pub fn http_client_builder(ca: Option<&CaFile>) -> Result<reqwest::ClientBuilder, rustls::Error> {
    Ok(reqwest::Client::builder().use_preconfigured_tls(client_config(ca)?))
}

/// SMTP TLS parameters for `domain` trusting the built-in roots, the OS store and `ca`.
pub fn smtp_tls_parameters(
    domain: &str,
    ca: Option<&CaFile>,
) -> Result<lettre::transport::smtp::client::TlsParameters, lettre::transport::smtp::Error> {
    use lettre::transport::smtp::client::{Certificate, CertificateStore, TlsParameters};
    let mut builder =
        TlsParameters::builder(domain.to_owned()).certificate_store(CertificateStore::WebpkiRoots);
    let extra = native_roots()
        .iter()
        .chain(ca.map(CaFile::certificates).unwrap_or_default());
    for cert in extra {
        builder = builder.add_root_certificate(Certificate::from_der(cert.to_vec())?);
    }
    builder.build_rustls()
}

/// A certificate problem found in an error's chain, in plain words with the fix, or `None`
/// when the error is not about the peer's certificate.
pub fn certificate_problem(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    use rustls::CertificateError as C;
    let rustls_error = find_rustls_error(error)?;
    let rustls::Error::InvalidCertificate(cert) = rustls_error else {
        return None;
    };
    Some(match cert {
        C::UnknownIssuer | C::BadSignature => {
            "its TLS certificate is signed by a CA walhook does not trust; set ca_file to the PEM file of that CA (an internal CA) or add the CA to the OS trust store".to_owned()
        }
        C::NotValidForName | C::NotValidForNameContext { .. } => {
            "its TLS certificate is not valid for this host name; use a host name the certificate names in the url".to_owned()
        }
        C::Expired | C::ExpiredContext { .. } => {
            "its TLS certificate has expired; renew the certificate on the server".to_owned()
        }
        other => format!("its TLS certificate was refused ({other:?}); check the server's certificate"),
    })
}

/// The rustls error in a chain: rustls errors travel inside (possibly nested) `io::Error`s,
/// whose `source()` skips the wrapped error, so each `io::Error` is opened with `get_ref`.
fn find_rustls_error<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        current = match e.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn ca_files_must_hold_usable_pem_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".to_owned()]).unwrap();
        let good = write(dir.path(), "ca.pem", &ca.cert.pem());
        let loaded = CaFile::load(&good).unwrap();
        assert_eq!(loaded.certificates().len(), 1);
        assert!(format!("{loaded:?}").contains("1 certificate"));

        let empty = write(dir.path(), "empty.pem", "not a certificate\n");
        assert!(
            CaFile::load(&empty)
                .unwrap_err()
                .contains("holds no PEM certificate")
        );
        let missing = CaFile::load(&dir.path().join("missing.pem")).unwrap_err();
        assert!(missing.starts_with("cannot read "), "{missing}");
        let broken = write(
            dir.path(),
            "broken.pem",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        assert!(CaFile::load(&broken).is_err());
    }

    #[test]
    fn certificate_problems_are_found_inside_nested_io_errors() {
        let rustls_error =
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let nested = std::io::Error::other(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls_error,
        ));
        let problem = certificate_problem(&nested).unwrap();
        assert!(problem.contains("set ca_file"), "{problem}");
        let plain = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(certificate_problem(&plain), None);
    }

    #[test]
    fn the_root_store_holds_builtin_roots_and_the_ca_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".to_owned()]).unwrap();
        let ca = CaFile::load(&write(dir.path(), "ca.pem", &ca.cert.pem())).unwrap();
        let without = root_store(None).len();
        assert!(without >= webpki_roots::TLS_SERVER_ROOTS.len());
        assert_eq!(root_store(Some(&ca)).len(), without + 1);
        assert!(client_config(Some(&ca)).is_ok());
        assert!(smtp_tls_parameters("mail.test", Some(&ca)).is_ok());
    }
}
