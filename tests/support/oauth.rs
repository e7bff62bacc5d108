//! An OAuth2 token endpoint issuing short-lived tokens (client credentials checked) and a
//! listener that accepts only live, unrevoked tokens.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::json;
use walhook::config::ListenerConfig;

use super::receiver::{Received, Receiver, Reply};

/// The client secret the token endpoint accepts.
pub const CLIENT_SECRET: &str = "cl13nt-s3cr3t~with.odd_chars";
/// How long a token lives.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(2);

/// A token endpoint that checks the client credentials and issues `tok-N` tokens valid for
/// two seconds; a listener that accepts only live, unrevoked tokens.
pub struct OAuthWorld {
    pub idp: Receiver,
    pub listener: Receiver,
    /// Token → when it was issued.
    pub issued: Arc<Mutex<HashMap<String, Instant>>>,
    pub revoked: Arc<Mutex<HashSet<String>>>,
}

/// The bearer token of a request.
pub fn bearer(r: &Received) -> Option<String> {
    r.header("authorization")?
        .strip_prefix("Bearer ")
        .map(str::to_owned)
}

impl OAuthWorld {
    /// Starts both servers.
    pub async fn start() -> OAuthWorld {
        let idp = Receiver::start().await;
        let listener = Receiver::start().await;
        let issued: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let revoked: Arc<Mutex<HashSet<String>>> = Arc::default();
        let expected_basic = format!(
            "Basic {}",
            STANDARD.encode(format!("walhook-client:{CLIENT_SECRET}"))
        );
        {
            let issued = issued.clone();
            idp.respond_with(move |r, n| {
                let form: HashMap<String, String> =
                    url::form_urlencoded::parse(&r.body).into_owned().collect();
                if r.header("authorization") != Some(expected_basic.as_str()) {
                    return Reply::status(401).body(r#"{"error":"invalid_client"}"#);
                }
                if r.header("content-type") != Some("application/x-www-form-urlencoded")
                    || form.get("grant_type").map(String::as_str) != Some("client_credentials")
                    || form.get("scope").map(String::as_str) != Some("api://crm/.default")
                {
                    return Reply::status(400).body(r#"{"error":"invalid_request"}"#);
                }
                let token = format!("tok-{n}");
                issued.lock().unwrap().insert(token.clone(), Instant::now());
                Reply::status(200)
                    .header("content-type", "application/json")
                    .body(
                        &json!({"access_token": token, "token_type": "Bearer", "expires_in": TOKEN_LIFETIME.as_secs()})
                            .to_string(),
                    )
            });
        }
        {
            let (issued, revoked) = (issued.clone(), revoked.clone());
            listener.respond_with(move |r, _| {
                let Some(token) = bearer(r) else {
                    return Reply::status(401);
                };
                let live = issued
                    .lock()
                    .unwrap()
                    .get(&token)
                    .is_some_and(|at| at.elapsed() < TOKEN_LIFETIME);
                if live && !revoked.lock().unwrap().contains(&token) {
                    Reply::status(200)
                } else {
                    Reply::status(401).body(&format!("token {token} refused"))
                }
            });
        }
        OAuthWorld {
            idp,
            listener,
            issued,
            revoked,
        }
    }

    /// A `[[listener]]` block named `name` for the listener, with this client secret.
    pub fn block(&self, name: &str, secret: &str) -> String {
        format!(
            r#"
[[listener]]
name = "{name}"
url = "{}"
timeout = "5s"
auth = {{ oauth2 = {{ token_url = "{}", client_id = "walhook-client", client_secret = "{secret}", scope = "api://crm/.default" }} }}
"#,
            self.listener.url("/hook"),
            self.idp.url("/oauth2/token"),
        )
    }

    /// The listener's config, with this client secret.
    pub fn listener(&self, secret: &str) -> ListenerConfig {
        super::queue::listeners(&self.block("crm", secret)).remove(0)
    }

    /// The bearer token of the listener's last request.
    pub fn last_token(&self) -> String {
        bearer(self.listener.requests().last().expect("a request")).expect("a bearer token")
    }
}
