//! `[admin]`: the HTTP admin endpoint.

use std::net::SocketAddr;

use serde::Deserialize;
use serde_spanned::Spanned;
use url::Url;

use super::check::Checker;
use super::{Secret, Str};

/// `[admin]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminConfig {
    /// Address of the HTTP endpoint serving /metrics and /healthz (default
    /// 127.0.0.1:8187).
    pub listen: SocketAddr,
    /// The URL under which listeners reach this endpoint (`public_url`): the base of
    /// Event Grid's `validationUrl`. `None`: `http://{listen}`.
    pub public_url: Option<Url>,
    /// The web console's login token (`token_file`); `None` turns the console (/ui) off.
    pub token: Option<Secret>,
}

/// Shortest `[admin] token_file` content accepted: guessing it must stay out of reach.
const MIN_ADMIN_TOKEN_BYTES: usize = 24;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    listen: Str,
    public_url: Str,
    token_file: Str,
}

/// The default port: outside 9100-9999 and 10000+, the blocks the Prometheus default port
/// allocation list gives to exporters (9100-9999 is fully allocated; 9187 is
/// postgres_exporter's, which usually runs on the same host), so it collides with no
/// registered exporter. Easy to remember next to postgres_exporter's 9187.
pub const DEFAULT_ADMIN_PORT: u16 = 8187;

impl Checker<'_> {
    pub(super) fn admin(&mut self, raw: &Spanned<RawAdmin>) -> AdminConfig {
        let public_url = raw.get_ref().public_url.as_ref().and_then(|_| {
            self.http_url(
                &raw.get_ref().public_url,
                "admin.public_url",
                raw.span().start,
                "\"https://walhook.example.com\"",
            )
            .map(|u| u.expose().clone())
        });
        let token = raw.get_ref().token_file.as_ref().and_then(|file| {
            let token = self.secret_file(file, "admin.token_file")?;
            if token.expose().len() < MIN_ADMIN_TOKEN_BYTES {
                self.report(
                    file.span().start,
                    "admin.token_file",
                    &format!("the token is shorter than {MIN_ADMIN_TOKEN_BYTES} bytes"),
                    "write a long random token into the file, e.g. `openssl rand -base64 32`",
                );
                return None;
            }
            Some(token)
        });
        let listen = self.admin_listen(raw);
        AdminConfig {
            listen,
            public_url,
            token,
        }
    }

    fn admin_listen(&mut self, raw: &Spanned<RawAdmin>) -> SocketAddr {
        let default = SocketAddr::from(([127, 0, 0, 1], DEFAULT_ADMIN_PORT));
        let Some(v) = &raw.get_ref().listen else {
            return default;
        };
        let Some(s) = self.string(v, "admin.listen") else {
            return default;
        };
        match s.trim().parse() {
            Ok(listen) => listen,
            Err(_) => {
                self.report(
                    v.span().start,
                    "admin.listen",
                    &format!("invalid address {s:?}"),
                    &format!("write an IP address and port, like \"127.0.0.1:{DEFAULT_ADMIN_PORT}\" or \"[::1]:{DEFAULT_ADMIN_PORT}\""),
                );
                default
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::config::tests::{MINIMAL, errors, no_env, parse};

    #[test]
    fn admin_token_file_is_read_and_must_be_long() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("walhook.toml");
        std::fs::write(dir.path().join("token"), "0123456789abcdefghijklmnop\n").unwrap();
        std::fs::write(dir.path().join("short"), "tooshort\n").unwrap();
        let text = format!("{MINIMAL}[admin]\ntoken_file = \"token\"\n");
        let c = Config::parse_with_env(&text, &config, &no_env).unwrap();
        let admin = c.admin.unwrap();
        assert_eq!(
            admin.token.as_ref().map(Secret::expose),
            Some("0123456789abcdefghijklmnop")
        );
        assert!(!format!("{admin:?}").contains("0123456789"));

        let text = format!("{MINIMAL}[admin]\ntoken_file = \"short\"\n");
        let e = Config::parse_with_env(&text, &config, &no_env)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(":8:14: admin.token_file: the token is shorter than 24 bytes; write a long random token"),
            "{e}"
        );
        assert!(!e.contains("tooshort"), "{e}");

        let c = parse(&format!("{MINIMAL}[admin]\n")).unwrap();
        assert_eq!(c.admin.unwrap().token, None);
    }

    #[test]
    fn admin_listen_defaults_and_is_checked() {
        let c = parse(&format!("{MINIMAL}[admin]\n")).unwrap();
        assert_eq!(c.admin.unwrap().listen, "127.0.0.1:8187".parse().unwrap());
        let lines = errors(&format!("{MINIMAL}[admin]\nlisten = \"localhost\"\n"));
        assert_eq!(lines.len(), 1);
        assert!(lines[0].starts_with("walhook.toml:8:10: admin.listen: invalid address \"localhost\"; write an IP address and port"), "{}", lines[0]);
    }
}
