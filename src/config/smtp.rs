//! A monitor's mail server: `smtp_url` parsed into host, port, TLS mode and login.

use url::{Host, Url};

use crate::secret::{REDACTED, Secret};

/// Where and how a monitor sends email.
#[derive(Clone, Debug, PartialEq)]
pub struct SmtpServer {
    /// Host name or IP address (without brackets).
    pub host: String,
    /// TCP port (default 25 for plain SMTP, 587 with STARTTLS, 465 for smtps).
    pub port: u16,
    /// How the connection is protected.
    pub tls: SmtpTls,
    /// The name sent with EHLO (the URL's path, as lettre reads it); `None` for the default.
    pub hello_name: Option<String>,
    /// The login, from the URL's user info or `smtp_password` / `smtp_password_file`.
    pub credentials: Option<SmtpCredentials>,
    redacted: String,
}

impl SmtpServer {
    /// The server as a URL without the password, for messages.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }
}

/// An SMTP login.
#[derive(Clone, Debug, PartialEq)]
pub struct SmtpCredentials {
    /// The user name.
    pub user: String,
    /// The password.
    pub password: Secret,
}

/// How an SMTP connection is protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmtpTls {
    /// `smtp://`: plain text.
    Plain,
    /// `smtp://…?tls=opportunistic`: STARTTLS when the server offers it, plain text otherwise.
    StartTlsOpportunistic,
    /// `smtp://…?tls=required`: STARTTLS or no mail.
    StartTlsRequired,
    /// `smtps://`: TLS from the first byte.
    Tls,
}

impl SmtpTls {
    /// Whether a password sent on this connection is always encrypted.
    pub fn protects_password(self) -> bool {
        matches!(self, SmtpTls::StartTlsRequired | SmtpTls::Tls)
    }
}

/// Parses an SMTP URL. `password` (from `smtp_password` or `smtp_password_file`) is the
/// login's password instead of one in the URL. Messages never repeat the URL.
pub(super) fn parse_smtp_url(text: &str, password: Option<Secret>) -> Result<SmtpServer, String> {
    if text.chars().any(char::is_whitespace) {
        return Err("the SMTP URL contains whitespace".to_owned());
    }
    let url = match Url::parse(text) {
        Ok(url) => url,
        Err(url::ParseError::InvalidPort) => {
            return Err("the SMTP URL's port is not a number from 1 to 65535".to_owned());
        }
        Err(url::ParseError::RelativeUrlWithoutBase) => {
            return Err("the SMTP URL must start with smtp:// or smtps://".to_owned());
        }
        Err(url::ParseError::EmptyHost) => return Err("the SMTP URL has no host".to_owned()),
        Err(e) => return Err(format!("the SMTP URL is not valid ({e})")),
    };
    let plain = match url.scheme() {
        "smtp" => true,
        "smtps" => false,
        _ => return Err("the SMTP URL must start with smtp:// or smtps://".to_owned()),
    };
    let host = match url.host() {
        Some(Host::Domain(d)) if !d.is_empty() => d.to_owned(),
        Some(Host::Ipv4(a)) => a.to_string(),
        Some(Host::Ipv6(a)) => a.to_string(),
        _ => return Err("the SMTP URL has no host".to_owned()),
    };
    let mut tls = if plain { SmtpTls::Plain } else { SmtpTls::Tls };
    for (k, v) in url.query_pairs() {
        match (k.as_ref(), v.as_ref()) {
            ("tls", "required") if plain => tls = SmtpTls::StartTlsRequired,
            ("tls", "opportunistic") if plain => tls = SmtpTls::StartTlsOpportunistic,
            ("tls", _) => {
                return Err(
                    "tls= must be required or opportunistic, and only with smtp://".to_owned(),
                );
            }
            _ => return Err("the only query option of an SMTP URL is tls=".to_owned()),
        }
    }
    let port = match url.port() {
        Some(0) => return Err("the SMTP URL's port is not a number from 1 to 65535".to_owned()),
        Some(p) => p,
        None => match tls {
            SmtpTls::Plain => 25,
            SmtpTls::StartTlsOpportunistic | SmtpTls::StartTlsRequired => 587,
            SmtpTls::Tls => 465,
        },
    };
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|s| s.into_owned())
            .map_err(|_| "the SMTP URL's user info is not UTF-8 after percent-decoding".to_owned())
    };
    let user = decode(url.username())?;
    let credentials = match (url.password(), password) {
        (Some(_), Some(_)) => {
            return Err(
                "the SMTP URL has a password and smtp_password or smtp_password_file is set too"
                    .to_owned(),
            );
        }
        (Some(p), None) => Some(Secret::new(decode(p)?)),
        (None, p) => p,
    }
    .map(|password| SmtpCredentials {
        user: user.clone(),
        password,
    });
    if credentials.as_ref().is_some_and(|c| c.user.is_empty()) {
        return Err("a password needs a user name in the SMTP URL".to_owned());
    }
    let hello_name = (url.path().len() > 1).then(|| url.path().trim_matches('/').to_owned());

    let mut redacted = format!("{}://", url.scheme());
    if credentials.is_some() || !user.is_empty() {
        redacted.push_str(REDACTED);
        redacted.push('@');
    }
    match url.host() {
        Some(Host::Ipv6(a)) => redacted.push_str(&format!("[{a}]:{port}")),
        _ => redacted.push_str(&format!("{host}:{port}")),
    }
    match tls {
        SmtpTls::StartTlsRequired => redacted.push_str("?tls=required"),
        SmtpTls::StartTlsOpportunistic => redacted.push_str("?tls=opportunistic"),
        SmtpTls::Plain | SmtpTls::Tls => {}
    }
    Ok(SmtpServer {
        host,
        port,
        tls,
        hello_name,
        credentials,
        redacted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smtp_urls_give_host_port_tls_and_login() {
        let s = parse_smtp_url("smtps://w%40x:p%2Fw@mx.example.com", None).unwrap();
        assert_eq!(
            (s.host.as_str(), s.port, s.tls),
            ("mx.example.com", 465, SmtpTls::Tls)
        );
        let login = s.credentials.as_ref().unwrap();
        assert_eq!(
            (login.user.as_str(), login.password.expose()),
            ("w@x", "p/w")
        );
        assert_eq!(s.redacted(), "smtps://***@mx.example.com:465");

        let s = parse_smtp_url("smtp://mail.example.com:2525?tls=required", None).unwrap();
        assert_eq!((s.port, s.tls), (2525, SmtpTls::StartTlsRequired));
        assert_eq!(s.redacted(), "smtp://mail.example.com:2525?tls=required");
        assert_eq!(parse_smtp_url("smtp://[::1]", None).unwrap().host, "::1");

        let s = parse_smtp_url(
            "smtp://walhook@mx?tls=opportunistic",
            Some(Secret::new("pw".into())),
        )
        .unwrap();
        assert_eq!(s.port, 587);
        assert_eq!(s.credentials.unwrap().password.expose(), "pw");
    }

    #[test]
    fn bad_smtp_urls_are_refused_without_repeating_them() {
        for (bad, reason) in [
            ("http://mx", "must start with smtp:// or smtps://"),
            ("mx.example.com", "must start with smtp:// or smtps://"),
            ("smtp://mx:99999", "port is not a number"),
            ("smtps://mx?tls=required", "only with smtp://"),
            (
                "smtp://mx?tls=maybe",
                "tls= must be required or opportunistic",
            ),
            ("smtp://mx?user=x", "the only query option"),
            ("smtp://", "has no host"),
            ("smtp://:pw@mx", "needs a user name"),
        ] {
            let e = parse_smtp_url(bad, None).unwrap_err();
            assert!(e.contains(reason), "{bad}: {e}");
        }
        let e = parse_smtp_url("smtps://u:secretpw@mx", Some(Secret::new("x".into()))).unwrap_err();
        assert!(
            e.contains("smtp_password") && !e.contains("secretpw"),
            "{e}"
        );
    }
}
