//! What the HTTP sink does for Azure listeners: the `aeg-sas-key` header of an Event Grid
//! topic, and Service Bus's per-entity address (`{namespace}/{topic}/messages`) with
//! Shared Access Signature tokens, generated per topic and renewed before they expire.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use reqwest::header::{AUTHORIZATION, HeaderName, HeaderValue};
use sha2::Sha256;
use url::Url;

use crate::config::{EventGridDelivery, ListenerConfig, ListenerFormat};
use crate::secret::Secret;

/// The header carrying an Event Grid topic's access key.
const AEG_SAS_KEY: &str = "aeg-sas-key";
/// Tokens are renewed when less than this share of their lifetime is left…
const RENEW_SHARE: u32 = 4;
/// …or less than this, whichever comes first.
const RENEW_AT_MOST: Duration = Duration::from_secs(300);

/// How an Azure listener is authenticated and addressed.
pub(super) enum Azure {
    /// An Event Grid topic endpoint: a fixed `aeg-sas-key` header.
    TopicKey(HeaderValue),
    /// Service Bus: messages go to their topic under the namespace url, with a token.
    ServiceBus(SasTokens),
}

impl Azure {
    /// What `listener` needs, if it is an Azure listener that needs anything.
    pub(super) fn for_listener(listener: &ListenerConfig) -> Result<Option<Azure>, String> {
        match &listener.format {
            ListenerFormat::EventGrid(c) => match &c.delivery {
                EventGridDelivery::Topic { key } => {
                    let mut value = HeaderValue::from_str(key.expose()).map_err(|_| {
                        "aeg_sas_key is not a valid header value (visible ASCII only); copy the key again from the topic's Access keys".to_owned()
                    })?;
                    value.set_sensitive(true);
                    Ok(Some(Azure::TopicKey(value)))
                }
                EventGridDelivery::Webhook { .. } => Ok(None),
            },
            ListenerFormat::ServiceBus(c) => Ok(Some(Azure::ServiceBus(SasTokens::new(
                &c.sas_key_name,
                c.sas_key.clone(),
                c.token_ttl,
            )))),
            ListenerFormat::CloudEvents(_)
            | ListenerFormat::Form(_)
            | ListenerFormat::Template(_) => Ok(None),
        }
    }

    /// The secrets a listener might quote back, for scrubbing comments.
    pub(super) fn secrets(&self) -> Vec<String> {
        match self {
            Azure::TopicKey(v) => v.to_str().map(|s| vec![s.to_owned()]).unwrap_or_default(),
            Azure::ServiceBus(t) => vec![t.key.expose().to_owned()],
        }
    }

    /// Where a message for `topic` goes, given the listener url `base`. `Err` explains a
    /// message that cannot be addressed.
    pub(super) fn target(&self, base: &Url, topic: Option<&str>) -> Result<Url, String> {
        match self {
            Azure::TopicKey(_) => Ok(base.clone()),
            Azure::ServiceBus(_) => {
                let topic = topic.ok_or_else(|| {
                    "a Service Bus batch must hold the messages of one topic, and this one spans several".to_owned()
                })?;
                let mut url = entity_url(base, topic)?;
                url.path_segments_mut()
                    .map_err(|_| "the listener url cannot carry a path".to_owned())?
                    .push("messages");
                Ok(url)
            }
        }
    }

    /// The authentication header for a request to `target`.
    pub(super) fn header(&self, target: &Url) -> (HeaderName, HeaderValue) {
        match self {
            Azure::TopicKey(v) => (HeaderName::from_static(AEG_SAS_KEY), v.clone()),
            Azure::ServiceBus(tokens) => {
                // The token's resource is the topic (the url without `/messages`), which
                // a namespace-wide policy and a policy on the topic itself both accept.
                let mut resource = target.clone();
                if let Ok(mut segments) = resource.path_segments_mut() {
                    segments.pop();
                }
                resource.set_query(None);
                let token = tokens.token(resource.as_str(), SystemTime::now());
                let mut value = HeaderValue::from_str(&token)
                    .unwrap_or_else(|_| HeaderValue::from_static("invalid"));
                value.set_sensitive(true);
                (AUTHORIZATION, value)
            }
        }
    }
}

/// `{namespace}/{topic}`: the topic's segments appended to the namespace url's path.
fn entity_url(base: &Url, topic: &str) -> Result<Url, String> {
    let mut url = base.clone();
    url.set_query(None);
    url.set_fragment(None);
    {
        let mut segments = url
            .path_segments_mut()
            .map_err(|_| "the listener url cannot carry a path".to_owned())?;
        segments.pop_if_empty();
        for segment in topic.split('/') {
            segments.push(segment);
        }
    }
    Ok(url)
}

/// Shared Access Signature tokens of one policy, cached per resource until shortly before
/// they expire.
pub(super) struct SasTokens {
    key_name: String,
    key: Secret,
    ttl: Duration,
    cache: Mutex<HashMap<String, (String, SystemTime)>>,
}

impl SasTokens {
    pub(super) fn new(key_name: &str, key: Secret, ttl: Duration) -> SasTokens {
        SasTokens {
            key_name: key_name.to_owned(),
            key,
            ttl: ttl.max(Duration::from_secs(1)),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// A token for `resource` valid at `now` for at least the renewal margin.
    pub(super) fn token(&self, resource: &str, now: SystemTime) -> String {
        let margin = (self.ttl / RENEW_SHARE).min(RENEW_AT_MOST);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((token, expires)) = cache.get(resource)
            && now + margin < *expires
        {
            return token.clone();
        }
        let expiry = now
            .checked_add(self.ttl)
            .unwrap_or(now)
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let token = sas_token(resource, &self.key_name, self.key.expose(), expiry);
        cache.insert(
            resource.to_owned(),
            (token.clone(), UNIX_EPOCH + Duration::from_secs(expiry)),
        );
        token
    }
}

/// Microsoft's `SharedAccessSignature sr=…&sig=…&se=…&skn=…`: `sig` is the base64
/// HMAC-SHA256, keyed with the policy key's text, of the url-encoded resource, a newline
/// and the expiry in unix seconds.
pub fn sas_token(resource: &str, key_name: &str, key: &str, expiry: u64) -> String {
    let sr = url_encode(resource);
    // HMAC accepts keys of any length, so this cannot fail; an empty signature would be
    // refused by Service Bus rather than panic here.
    let sig = match <Hmac<Sha256> as KeyInit>::new_from_slice(key.as_bytes()) {
        Ok(mut mac) => {
            mac.update(format!("{sr}\n{expiry}").as_bytes());
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        }
        Err(_) => String::new(),
    };
    format!(
        "SharedAccessSignature sr={sr}&sig={}&se={expiry}&skn={}",
        url_encode(&sig),
        url_encode(key_name)
    )
}

/// Percent-encodes everything but unreserved characters (as `encodeURIComponent` and
/// .NET's `WebUtility.UrlEncode` do for these inputs).
fn url_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, UNRESERVED_ONLY).to_string()
}

const UNRESERVED_ONLY: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_microsofts_documented_form() {
        // The output of the Python sample on Microsoft's "Service Bus access control with
        // Shared Access Signatures" page (quote_plus(uri), quote(b64(hmac), safe='')).
        let token = sas_token(
            "https://contoso.servicebus.windows.net/api.event.customer",
            "RootManageSharedAccessKey",
            "c2VjcmV0LWtleQ==",
            1_700_000_000,
        );
        assert_eq!(
            token,
            "SharedAccessSignature sr=https%3A%2F%2Fcontoso.servicebus.windows.net%2Fapi.event.customer&sig=qqoi%2BQNPr3To8rt7il9lKNkACdv8J9Abfrwcgem1rhU%3D&se=1700000000&skn=RootManageSharedAccessKey"
        );
    }

    #[test]
    fn tokens_are_reused_until_shortly_before_expiry_then_renewed() {
        let tokens = SasTokens::new("send", Secret::new("k".into()), Duration::from_secs(3600));
        let t0 = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let first = tokens.token("https://ns/a", t0);
        assert!(first.contains("se=1700003600"));
        // Renewal margin: a quarter of the lifetime, at most 5 minutes.
        assert_eq!(
            tokens.token("https://ns/a", t0 + Duration::from_secs(3000)),
            first
        );
        let renewed = tokens.token("https://ns/a", t0 + Duration::from_secs(3301));
        assert_ne!(renewed, first);
        assert!(renewed.contains("se=1700006901"));
        // Per resource.
        let other = tokens.token("https://ns/b", t0 + Duration::from_secs(3301));
        assert!(other.contains("sr=https%3A%2F%2Fns%2Fb"));

        let short = SasTokens::new("send", Secret::new("k".into()), Duration::from_secs(8));
        let a = short.token("r", t0);
        assert_eq!(short.token("r", t0 + Duration::from_secs(5)), a);
        assert_ne!(short.token("r", t0 + Duration::from_secs(7)), a);
    }

    #[test]
    fn service_bus_messages_go_to_their_topic_under_the_namespace() {
        let azure = Azure::ServiceBus(SasTokens::new(
            "send",
            Secret::new("k".into()),
            Duration::from_secs(60),
        ));
        for (base, expected) in [
            (
                "https://ns.servicebus.windows.net",
                "https://ns.servicebus.windows.net/api.event.customer/messages",
            ),
            (
                "https://ns.servicebus.windows.net/",
                "https://ns.servicebus.windows.net/api.event.customer/messages",
            ),
            (
                "http://127.0.0.1:9/bus/",
                "http://127.0.0.1:9/bus/api.event.customer/messages",
            ),
        ] {
            let url = azure
                .target(&Url::parse(base).unwrap(), Some("api.event.customer"))
                .unwrap();
            assert_eq!(url.as_str(), expected);
        }
        let nested = azure
            .target(&Url::parse("https://ns/").unwrap(), Some("crm/customer"))
            .unwrap();
        assert_eq!(nested.as_str(), "https://ns/crm/customer/messages");
        let (name, value) = azure.header(&nested);
        assert_eq!(name, AUTHORIZATION);
        assert!(value.is_sensitive());
        assert!(
            value
                .to_str()
                .unwrap()
                .starts_with("SharedAccessSignature sr=https%3A%2F%2Fns%2Fcrm%2Fcustomer&sig=")
        );
        let e = azure
            .target(&Url::parse("https://ns/").unwrap(), None)
            .unwrap_err();
        assert!(e.contains("spans several"), "{e}");
    }
}
