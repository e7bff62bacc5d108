//! `auth = { … }` of a listener: HTTP Basic, a bearer token (inline or from a file that is
//! read again when it changes) or OAuth2 client credentials. Secrets come from `${ENV}` or
//! `*_file` and are never shown.

use std::path::PathBuf;

use serde::Deserialize;
use serde_spanned::Spanned;

use super::Str;
use super::check::Checker;
use crate::secret::{Secret, SecretUrl};

/// How walhook authenticates to a listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenerAuth {
    /// `basic = { user, password | password_file }`: `Authorization: Basic …`.
    Basic {
        /// The user name.
        user: String,
        /// The password.
        password: Secret,
    },
    /// `bearer` or `bearer_file`: `Authorization: Bearer <token>`.
    Bearer(BearerToken),
    /// `oauth2 = { token_url, client_id, client_secret | client_secret_file, scope }`:
    /// tokens from the client-credentials grant, cached until shortly before they expire.
    OAuth2(OAuth2Config),
}

/// Where a bearer token comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BearerToken {
    /// Written in the file (usually as `${ENV}`).
    Inline(Secret),
    /// Read from a file, and read again whenever the file changes (a token that another
    /// process renews); `initial` is its content at load.
    File {
        /// The token file.
        path: PathBuf,
        /// The token when the configuration was loaded.
        initial: Secret,
    },
}

/// OAuth2 client-credentials settings (RFC 6749 section 4.4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OAuth2Config {
    /// The authorization server's token endpoint.
    pub token_url: SecretUrl,
    /// The client id.
    pub client_id: String,
    /// The client secret.
    pub client_secret: Secret,
    /// The `scope` asked for, if any (space-separated scopes).
    pub scope: Option<String>,
    /// How the client authenticates to the token endpoint.
    pub client_auth: ClientAuth,
}

/// How the client id and secret reach the token endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// HTTP Basic (`client_secret_basic`), the RFC's recommendation; the default.
    Basic,
    /// Form fields `client_id` and `client_secret` in the body (`client_secret_post`).
    Body,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    basic: Option<Spanned<RawBasic>>,
    bearer: Str,
    bearer_file: Str,
    oauth2: Option<Spanned<RawOAuth2>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBasic {
    user: Str,
    password: Str,
    password_file: Str,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOAuth2 {
    token_url: Str,
    client_id: Str,
    client_secret: Str,
    client_secret_file: Str,
    scope: Str,
    client_auth: Str,
}

const ONE_OF: &str = "set one of basic = { user, password }, bearer, bearer_file or oauth2 = { token_url, client_id, client_secret, scope }";

impl Checker<'_> {
    /// A listener's `auth`: exactly one method.
    pub(super) fn auth(&mut self, raw: &Spanned<RawAuth>, key: &str) -> Option<ListenerAuth> {
        let a = raw.get_ref();
        let at = raw.span().start;
        let set = usize::from(a.basic.is_some())
            + usize::from(a.bearer.is_some())
            + usize::from(a.bearer_file.is_some())
            + usize::from(a.oauth2.is_some());
        if set != 1 {
            let problem = if set == 0 {
                "auth names no method"
            } else {
                "auth names more than one method"
            };
            self.report(at, key, problem, ONE_OF);
            return None;
        }
        if let Some(b) = &a.basic {
            let key = format!("{key}.basic");
            let user = self.required(
                &b.get_ref().user,
                &format!("{key}.user"),
                b.span().start,
                "\"walhook\"",
            );
            if let Some(u) = &user
                && u.contains(':')
            {
                let at = b
                    .get_ref()
                    .user
                    .as_ref()
                    .map_or(b.span().start, |v| v.span().start);
                self.report(
                    at,
                    &format!("{key}.user"),
                    "a Basic user name cannot contain ':'",
                    "use the user name without ':'",
                );
            }
            let password = self.secret(
                &b.get_ref().password,
                &b.get_ref().password_file,
                &format!("{key}.password"),
            );
            if b.get_ref().password.is_none() && b.get_ref().password_file.is_none() {
                self.report(
                    b.span().start,
                    &format!("{key}.password"),
                    "missing key",
                    "add password = \"${LISTENER_PASSWORD}\" or password_file = \"%d/listener-password\"",
                );
            }
            return Some(ListenerAuth::Basic {
                user: user?,
                password: password?,
            });
        }
        if let Some(v) = &a.bearer {
            let token = self.string(v, &format!("{key}.bearer"))?;
            return self
                .token_value(token.trim(), v.span().start, &format!("{key}.bearer"))
                .map(|t| ListenerAuth::Bearer(BearerToken::Inline(t)));
        }
        if let Some(v) = &a.bearer_file {
            let file_key = format!("{key}.bearer_file");
            let path = self.path(v, &file_key)?;
            let secret = self.secret_file(v, &file_key)?;
            let token = self.token_value(secret.expose().trim(), v.span().start, &file_key)?;
            return Some(ListenerAuth::Bearer(BearerToken::File {
                path,
                initial: token,
            }));
        }
        let o = a.oauth2.as_ref()?;
        self.oauth2(o, &format!("{key}.oauth2"))
            .map(ListenerAuth::OAuth2)
    }

    /// A bearer token must fit in a header value.
    fn token_value(&mut self, token: &str, at: usize, key: &str) -> Option<Secret> {
        if token.is_empty() {
            self.report(
                at,
                key,
                "the token is empty",
                "set the token, or remove auth",
            );
            return None;
        }
        if !token.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            self.report(
                at,
                key,
                "the token contains a space, a line break or a non-ASCII character",
                "a bearer token is visible ASCII without spaces; check that the file holds only the token",
            );
            return None;
        }
        Some(Secret::new(token.to_owned()))
    }

    fn oauth2(&mut self, raw: &Spanned<RawOAuth2>, key: &str) -> Option<OAuth2Config> {
        let o = raw.get_ref();
        let at = raw.span().start;
        let token_url = self.http_url(
            &o.token_url,
            &format!("{key}.token_url"),
            at,
            "\"https://login.example.com/oauth2/token\"",
        );
        let client_id = self.required(&o.client_id, &format!("{key}.client_id"), at, "\"walhook\"");
        let client_secret = self.secret(
            &o.client_secret,
            &o.client_secret_file,
            &format!("{key}.client_secret"),
        );
        if o.client_secret.is_none() && o.client_secret_file.is_none() {
            self.report(
                at,
                &format!("{key}.client_secret"),
                "missing key",
                "add client_secret = \"${OAUTH_CLIENT_SECRET}\" or client_secret_file = \"%d/oauth-client-secret\"",
            );
        }
        let scope = match &o.scope {
            Some(v) => self
                .string(v, &format!("{key}.scope"))
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty()),
            None => None,
        };
        let client_auth = match &o.client_auth {
            None => ClientAuth::Basic,
            Some(v) => match self
                .string(v, &format!("{key}.client_auth"))
                .as_deref()
                .map(str::trim)
            {
                Some("basic") | None => ClientAuth::Basic,
                Some("body") => ClientAuth::Body,
                Some(other) => {
                    self.report(
                        v.span().start,
                        &format!("{key}.client_auth"),
                        &format!("unknown client authentication {other:?}"),
                        "use \"basic\" (HTTP Basic, the default) or \"body\" (client_id and client_secret as form fields)",
                    );
                    ClientAuth::Basic
                }
            },
        };
        Some(OAuth2Config {
            token_url: token_url?,
            client_id: client_id?,
            client_secret: client_secret?,
            scope,
            client_auth,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{MINIMAL, errors, parse};

    use super::*;

    fn listener(auth: &str) -> String {
        format!(
            "{MINIMAL}\n[[listener]]\nname = \"crm\"\nurl = \"https://example.com/\"\nauth = {auth}\n"
        )
    }

    #[test]
    fn each_method_parses_with_its_secret_from_the_file_or_a_secret_file() {
        let c = parse(&listener(
            "{ basic = { user = \"walhook\", password = \"pa55word\" } }",
        ))
        .unwrap();
        assert_eq!(
            c.listeners[0].auth,
            Some(ListenerAuth::Basic {
                user: "walhook".into(),
                password: Secret::new("pa55word".into())
            })
        );
        let c = parse(&listener(
            "{ oauth2 = { token_url = \"https://idp.example.com/token\", client_id = \"w\", client_secret = \"s3cr3t\", scope = \"api\" } }",
        ))
        .unwrap();
        let Some(ListenerAuth::OAuth2(o)) = &c.listeners[0].auth else {
            panic!("{:?}", c.listeners[0].auth);
        };
        assert_eq!(o.client_id, "w");
        assert_eq!(o.scope.as_deref(), Some("api"));
        assert_eq!(o.client_auth, ClientAuth::Basic);
        assert!(!format!("{o:?}").contains("s3cr3t"));

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "eyJ.tok.en\n").unwrap();
        let text = listener("{ bearer_file = \"token\" }");
        let c =
            crate::config::Config::parse_with_env(&text, &dir.path().join("walhook.toml"), &|_| {
                None
            })
            .unwrap();
        assert_eq!(
            c.listeners[0].auth,
            Some(ListenerAuth::Bearer(BearerToken::File {
                path: dir.path().join("token"),
                initial: Secret::new("eyJ.tok.en".into())
            }))
        );
    }

    #[test]
    fn missing_conflicting_and_malformed_settings_are_named() {
        let lines = errors(&listener("{ }"));
        assert!(
            lines[0].ends_with(&format!("listener[0].auth: auth names no method; {ONE_OF}")),
            "{lines:?}"
        );
        let lines = errors(&listener("{ bearer = \"a\", bearer_file = \"b\" }"));
        assert!(
            lines[0].contains("auth names more than one method"),
            "{lines:?}"
        );
        let lines = errors(&listener("{ basic = { user = \"a:b\" } }"));
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].contains("listener[0].auth.basic.password: missing key"),
            "{lines:?}"
        );
        assert!(
            lines[1].contains("listener[0].auth.basic.user: a Basic user name cannot contain ':'"),
            "{lines:?}"
        );
        let lines = errors(&listener("{ bearer = \"two words\" }"));
        assert!(lines[0].contains("the token contains a space"), "{lines:?}");
        assert!(!lines[0].contains("two words"), "{lines:?}");
        let lines = errors(&listener(
            "{ oauth2 = { token_url = \"ftp://x\", client_id = \"w\", client_secret_file = \"nope\", client_auth = \"jwt\" } }",
        ));
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines[0].contains("auth.oauth2.token_url"), "{lines:?}");
        assert!(
            lines[1].contains("auth.oauth2.client_secret_file: cannot read"),
            "{lines:?}"
        );
        assert!(
            lines[2].contains("unknown client authentication \"jwt\""),
            "{lines:?}"
        );
        let lines = errors(&listener("{ bearer = \"t\", password = 1 }"));
        assert!(lines[0].contains("unknown key"), "{lines:?}");
    }
}
