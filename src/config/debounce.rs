//! `debounce` of a `[[listener]]`: changes to one entity within a window coalesce into one
//! notification. `debounce = "5s"`, or a table for the details:
//! `debounce = { window = "5s", from = "last", max = "1m", drop_created_deleted = false }`.

use std::time::Duration;

use serde_spanned::Spanned;

use super::check::Checker;

/// How a listener's changes are coalesced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Debounce {
    /// The window (above zero).
    pub window: Duration,
    /// What the window is measured from.
    pub from: DebounceFrom,
    /// With [`DebounceFrom::Last`]: the longest a change waits however busy the entity
    /// stays, counted from its first change; `None`: no limit.
    pub max: Option<Duration>,
    /// A created entity deleted within the window sends nothing (default); `false` sends
    /// the Created and then the Deleted.
    pub drop_created_deleted: bool,
}

/// What a debounce window is measured from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DebounceFrom {
    /// The first change: a notification waits at most the window (max wait). Default.
    First,
    /// The last change: a notification goes out once the entity was quiet for the window.
    Last,
}

/// `debounce` as written: a duration, or a table (read by hand: its keys carry no
/// positions of their own, so problems are reported at `debounce`).
pub(super) type RawDebounce = toml::Value;

const KEYS: &str = "window, from, max, drop_created_deleted";

impl Checker<'_> {
    /// `debounce`: `None` when absent or `"0s"` (every change on its own).
    pub(super) fn debounce(
        &mut self,
        raw: &Option<Spanned<RawDebounce>>,
        key: &str,
    ) -> Option<Debounce> {
        let raw = raw.as_ref()?;
        let span = raw.span();
        let at = span.start;
        let text = |me: &mut Self, v: &toml::Value, k: &str| -> Option<String> {
            match v {
                toml::Value::String(s) => me.string(&Spanned::new(span.clone(), s.clone()), k),
                _ => {
                    me.report(at, k, "expected text", "write a duration like \"5s\"");
                    None
                }
            }
        };
        let duration = |me: &mut Self, v: &toml::Value, k: &str| -> Option<Duration> {
            let s = text(me, v, k)?;
            me.duration(&Some(Spanned::new(span.clone(), s)), k, Duration::ZERO)
                .into()
        };
        let table = match raw.get_ref() {
            toml::Value::Table(t) => t,
            other => {
                let window = duration(self, other, key)?;
                return (!window.is_zero()).then_some(Debounce {
                    window,
                    from: DebounceFrom::First,
                    max: None,
                    drop_created_deleted: true,
                });
            }
        };
        for k in table.keys() {
            if !KEYS.split(", ").any(|known| known == k) {
                self.report(
                    at,
                    &format!("{key}.{k}"),
                    "unknown key",
                    &format!("expected one of {KEYS}"),
                );
            }
        }
        let window_key = format!("{key}.window");
        let Some(window) = table.get("window") else {
            self.report(at, &window_key, "missing key", "add window = \"5s\"");
            return None;
        };
        let window = duration(self, window, &window_key)?;
        let from_key = format!("{key}.from");
        let from = match table.get("from") {
            None => DebounceFrom::First,
            Some(v) => match text(self, v, &from_key).as_deref().map(str::trim) {
                None | Some("first") => DebounceFrom::First,
                Some("last") => DebounceFrom::Last,
                Some(other) => {
                    self.report(
                        at,
                        &from_key,
                        &format!("unknown value {other:?}"),
                        "use from = \"first\" (a change waits at most the window) or \"last\" (until the entity is quiet for the window)",
                    );
                    DebounceFrom::First
                }
            },
        };
        let max_key = format!("{key}.max");
        let max = match table.get("max") {
            None => None,
            Some(v) => Some(duration(self, v, &max_key)?),
        };
        if let Some(max) = max {
            if from == DebounceFrom::First {
                self.report(
                    at,
                    &max_key,
                    "max applies only with from = \"last\"",
                    "remove max: measured from the first change, the window is the longest wait",
                );
            } else if max < window {
                self.report(
                    at,
                    &max_key,
                    "max is shorter than the window",
                    "make max at least as long as window",
                );
            }
        }
        let drop_key = format!("{key}.drop_created_deleted");
        let drop_created_deleted = match table.get("drop_created_deleted") {
            None => true,
            Some(toml::Value::Boolean(b)) => *b,
            Some(_) => {
                self.report(
                    at,
                    &drop_key,
                    "expected true or false",
                    "write drop_created_deleted = false to send both",
                );
                true
            }
        };
        if window.is_zero() {
            self.report(
                at,
                &window_key,
                "window must be above 0",
                "use a duration like \"5s\", or remove debounce to deliver every change on its own",
            );
            return None;
        }
        Some(Debounce {
            window,
            from,
            max,
            drop_created_deleted,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::tests::{MINIMAL, errors, parse};

    fn listener(debounce: &str) -> String {
        format!(
            "{MINIMAL}\n[[listener]]\nname = \"crm\"\nurl = \"https://example.com/\"\ndebounce = {debounce}\n"
        )
    }

    #[test]
    fn debounce_takes_a_duration_or_a_table() {
        let d = |text: &str| parse(&listener(text)).unwrap().listeners[0].debounce;
        assert_eq!(d("\"0s\""), None);
        assert_eq!(
            d("\"5s\""),
            Some(Debounce {
                window: Duration::from_secs(5),
                from: DebounceFrom::First,
                max: None,
                drop_created_deleted: true,
            })
        );
        assert_eq!(
            d("{ window = \"2s\", from = \"last\", max = \"1m\", drop_created_deleted = false }"),
            Some(Debounce {
                window: Duration::from_secs(2),
                from: DebounceFrom::Last,
                max: Some(Duration::from_secs(60)),
                drop_created_deleted: false,
            })
        );
    }

    #[test]
    fn debounce_problems_are_reported() {
        for (text, problem) in [
            ("\"soon\"", "debounce"),
            ("{ from = \"last\" }", "debounce.window: missing key"),
            ("{ window = \"0s\" }", "window must be above 0"),
            (
                "{ window = \"5s\", from = \"middle\" }",
                "unknown value \"middle\"",
            ),
            (
                "{ window = \"5s\", max = \"1m\" }",
                "max applies only with from = \"last\"",
            ),
            (
                "{ window = \"5s\", from = \"last\", max = \"1s\" }",
                "max is shorter than the window",
            ),
        ] {
            let lines = errors(&listener(text));
            assert_eq!(lines.len(), 1, "{text}: {lines:?}");
            assert!(
                lines[0].contains("listener[0].debounce") && lines[0].contains(problem),
                "{text}: {lines:?}"
            );
        }
    }
}
