//! `[admin]`: the HTTP admin endpoint.

use std::net::SocketAddr;

use serde::Deserialize;
use serde_spanned::Spanned;

use super::Str;
use super::check::Checker;

/// `[admin]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminConfig {
    /// Address of the HTTP endpoint serving /metrics and /healthz (default
    /// 127.0.0.1:8187).
    pub listen: SocketAddr,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    listen: Str,
}

/// The default port: outside 9100-9999 and 10000+, the blocks the Prometheus default port
/// allocation list gives to exporters (9100-9999 is fully allocated; 9187 is
/// postgres_exporter's, which usually runs on the same host), so it collides with no
/// registered exporter. Easy to remember next to postgres_exporter's 9187.
pub const DEFAULT_ADMIN_PORT: u16 = 8187;

impl Checker<'_> {
    pub(super) fn admin(&mut self, raw: &Spanned<RawAdmin>) -> AdminConfig {
        let default = SocketAddr::from(([127, 0, 0, 1], DEFAULT_ADMIN_PORT));
        let Some(v) = &raw.get_ref().listen else {
            return AdminConfig { listen: default };
        };
        let Some(s) = self.string(v, "admin.listen") else {
            return AdminConfig { listen: default };
        };
        match s.trim().parse() {
            Ok(listen) => AdminConfig { listen },
            Err(_) => {
                self.report(
                    v.span().start,
                    "admin.listen",
                    &format!("invalid address {s:?}"),
                    &format!("write an IP address and port, like \"127.0.0.1:{DEFAULT_ADMIN_PORT}\" or \"[::1]:{DEFAULT_ADMIN_PORT}\""),
                );
                AdminConfig { listen: default }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{MINIMAL, errors, parse};

    #[test]
    fn admin_listen_defaults_and_is_checked() {
        let c = parse(&format!("{MINIMAL}[admin]\n")).unwrap();
        assert_eq!(c.admin.unwrap().listen, "127.0.0.1:8187".parse().unwrap());
        let lines = errors(&format!("{MINIMAL}[admin]\nlisten = \"localhost\"\n"));
        assert_eq!(lines.len(), 1);
        assert!(lines[0].starts_with("walhook.toml:8:10: admin.listen: invalid address \"localhost\"; write an IP address and port"), "{}", lines[0]);
    }
}
