//! The checker: converts raw values to typed ones, collecting every problem with its
//! position instead of stopping at the first.

use std::path::PathBuf;
use std::time::Duration;

use serde_spanned::Spanned;

use super::position::line_column;
use super::units::{RawSize, parse_duration, parse_size};
use super::{Str, StrList};
use crate::secret::{Secret, read_secret_file};
use crate::types::Action;

/// The fix for a `*_file` or `ca_file` path that cannot be read.
const PATH_FIX: &str = "check the path (relative paths start at the config file's directory; %d/ is systemd's credentials directory) and that walhook's user may read it";

pub(super) struct Checker<'a> {
    pub(super) text: &'a str,
    pub(super) file: String,
    pub(super) dir: PathBuf,
    pub(super) env: &'a dyn Fn(&str) -> Option<String>,
    pub(super) errors: Vec<(usize, String)>,
}

impl Checker<'_> {
    pub(super) fn report(&mut self, at: usize, key: &str, problem: &str, fix: &str) {
        let (line, column) = line_column(self.text, at);
        self.errors.push((
            at,
            format!("{}:{line}:{column}: {key}: {problem}; {fix}", self.file),
        ));
    }

    /// Reports a message that already has the `problem; fix` form.
    pub(super) fn report_message(&mut self, at: usize, key: &str, message: &str) {
        let (line, column) = line_column(self.text, at);
        self.errors.push((
            at,
            format!("{}:{line}:{column}: {key}: {message}", self.file),
        ));
    }

    /// The string after `${ENV}` substitution; `None` (reported) when substitution fails.
    pub(super) fn string(&mut self, value: &Spanned<String>, key: &str) -> Option<String> {
        match substitute(value.get_ref(), self.env) {
            Ok(s) => Some(s),
            Err((problem, fix)) => {
                self.report(value.span().start, key, &problem, &fix);
                None
            }
        }
    }

    pub(super) fn duration(&mut self, value: &Str, key: &str, default: Duration) -> Duration {
        let Some(value) = value else { return default };
        let Some(s) = self.string(value, key) else {
            return default;
        };
        match parse_duration(s.trim()) {
            Ok(d) => d,
            Err(message) => {
                self.report_message(value.span().start, key, &message);
                default
            }
        }
    }

    /// A file path: `${ENV}` substituted, a leading `%d/` resolved to systemd's credentials
    /// directory (`$CREDENTIALS_DIRECTORY`, set by `LoadCredential=`), a relative path taken
    /// from the config file's directory.
    pub(super) fn path(&mut self, value: &Spanned<String>, key: &str) -> Option<PathBuf> {
        let s = self.string(value, key)?;
        let s = s.trim();
        if s.is_empty() {
            self.report(
                value.span().start,
                key,
                "the path is empty",
                "write a file path",
            );
            return None;
        }
        if let Some(rest) = s.strip_prefix("%d/") {
            return match (self.env)("CREDENTIALS_DIRECTORY") {
                Some(dir) => Some(PathBuf::from(dir).join(rest)),
                None => {
                    self.report(
                        value.span().start,
                        key,
                        "%d/ stands for systemd's credentials directory, but CREDENTIALS_DIRECTORY is not set",
                        "load the credential with LoadCredential= in the unit (systemd sets CREDENTIALS_DIRECTORY), or write the file's full path",
                    );
                    None
                }
            };
        }
        Some(self.dir.join(s))
    }

    /// A secret written inline (`key`) or read from a file (`key_file`); at most one of
    /// them may be set. `key` is the full key of the inline form, like `listener[0].secret`.
    pub(super) fn secret(&mut self, inline: &Str, file: &Str, key: &str) -> Option<Secret> {
        let file_key = format!("{key}_file");
        match (inline, file) {
            (Some(_), Some(f)) => {
                let name = key.rsplit('.').next().unwrap_or(key);
                self.report(
                    f.span().start,
                    &file_key,
                    &format!("both {name} and {name}_file are set"),
                    "keep only one of them",
                );
                None
            }
            (Some(v), None) => self.string(v, key).map(Secret::new),
            (None, Some(f)) => self.secret_file(f, &file_key),
            (None, None) => None,
        }
    }

    /// A secret read from the file named by `value`.
    pub(super) fn secret_file(&mut self, value: &Spanned<String>, key: &str) -> Option<Secret> {
        let path = self.path(value, key)?;
        match read_secret_file(&path) {
            Ok(secret) => Some(secret),
            Err(problem) if problem.ends_with("is empty") => {
                let name = key.rsplit('.').next().unwrap_or(key);
                self.report(
                    value.span().start,
                    key,
                    &problem,
                    &format!("write the secret into the file, or remove {name}"),
                );
                None
            }
            Err(problem) => {
                self.report(value.span().start, key, &problem, PATH_FIX);
                None
            }
        }
    }

    /// A CA certificate file (`ca_file`) for internal CAs.
    pub(super) fn ca_file(&mut self, value: &Str, key: &str) -> Option<crate::tls::CaFile> {
        let value = value.as_ref()?;
        let path = self.path(value, key)?;
        match crate::tls::CaFile::load(&path) {
            Ok(ca) => Some(ca),
            Err(problem) if problem.starts_with("cannot read") => {
                self.report(value.span().start, key, &problem, PATH_FIX);
                None
            }
            Err(problem) => {
                self.report(
                    value.span().start,
                    key,
                    &problem,
                    "point ca_file at the CA certificate(s) in PEM form (-----BEGIN CERTIFICATE-----)",
                );
                None
            }
        }
    }

    /// A duration that may also be "off" (or zero): `None`.
    pub(super) fn duration_or_off(
        &mut self,
        value: &Str,
        key: &str,
        default: Option<Duration>,
    ) -> Option<Duration> {
        let Some(v) = value else { return default };
        let s = self.string(v, key)?;
        if s.trim() == "off" {
            return None;
        }
        match parse_duration(s.trim()) {
            Ok(d) => Some(d).filter(|d| !d.is_zero()),
            Err(message) => {
                self.report_message(v.span().start, key, &format!("{message}, or \"off\""));
                None
            }
        }
    }

    /// A required, non-empty string.
    pub(super) fn required(
        &mut self,
        value: &Str,
        key: &str,
        section_at: usize,
        example: &str,
    ) -> Option<String> {
        match value {
            None => {
                let name = key.rsplit('.').next().unwrap_or(key);
                self.report(
                    section_at,
                    key,
                    "missing key",
                    &format!("add {name} = {example}"),
                );
                None
            }
            Some(v) => {
                let s = self.string(v, key)?;
                if s.trim().is_empty() {
                    let name = key.rsplit('.').next().unwrap_or(key);
                    self.report(
                        v.span().start,
                        key,
                        "must not be empty",
                        &format!("write {name} = {example}"),
                    );
                    return None;
                }
                Some(s)
            }
        }
    }

    /// Checks a listener or monitor name: up to 63 letters, digits, '_', '-' or '.',
    /// starting with a letter or digit, and not used twice in its section.
    pub(super) fn unique_name(
        &mut self,
        section: &str,
        name: &str,
        at: usize,
        key: &str,
        names: &mut std::collections::HashSet<String>,
    ) {
        let ok = name.len() <= 63
            && name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !ok {
            self.report(
                at,
                key,
                &format!("invalid {section} name {name:?}"),
                "use up to 63 letters, digits, '_', '-' or '.', starting with a letter or digit",
            );
        } else if !names.insert(name.to_owned()) {
            self.report(
                at,
                key,
                &format!("{section} {name:?} is defined twice"),
                &format!("give each [[{section}]] its own name"),
            );
        }
    }

    /// A byte size given as a number or as text like "1GB"; must be above 0.
    pub(super) fn size(&mut self, v: &Option<Spanned<RawSize>>, key: &str, default: u64) -> u64 {
        let Some(v) = v else {
            return default;
        };
        let parsed = match v.get_ref() {
            RawSize::Bytes(n) => u64::try_from(*n).map_err(|_| format!("{n} is negative")),
            RawSize::Text(t) => match substitute(t, self.env) {
                Ok(t) => parse_size(t.trim()),
                Err((problem, _)) => Err(problem),
            },
        };
        match parsed {
            Ok(0) | Err(_) => {
                let problem = parsed
                    .err()
                    .unwrap_or_else(|| format!("{key} must be above 0"));
                self.report(
                    v.span().start,
                    key,
                    &problem,
                    "use a byte count like 1073741824 or a size like \"1GB\" or \"512MB\" (units B, kB, MB, GB, TB; 1 kB = 1024 bytes)",
                );
                default
            }
            Ok(n) => n,
        }
    }

    /// `default` applies when the key is absent: entities capture row changes, listeners
    /// receive every action.
    pub(super) fn actions(&mut self, raw: &StrList, key: &str, default: &[Action]) -> Vec<Action> {
        let Some(list) = raw else {
            return default.to_vec();
        };
        if list.get_ref().is_empty() {
            self.report(
                list.span().start,
                key,
                "actions is empty",
                "list at least one of created, updated, deleted, truncated, or remove the key for the default",
            );
            return default.to_vec();
        }
        let mut actions = Vec::new();
        for (i, item) in list.get_ref().iter().enumerate() {
            let item_key = format!("{key}[{i}]");
            let Some(s) = self.string(item, &item_key) else {
                continue;
            };
            let action = Action::ALL
                .into_iter()
                .find(|a| a.config_name() == s.trim());
            match action {
                None => self.report(
                    item.span().start,
                    &item_key,
                    &format!("unknown action {s:?}"),
                    "use created, updated, deleted or truncated",
                ),
                Some(a) if actions.contains(&a) => self.report(
                    item.span().start,
                    &item_key,
                    &format!("action {s:?} is listed twice"),
                    "remove the duplicate",
                ),
                Some(a) => actions.push(a),
            }
        }
        actions
    }

    /// An integer from 1 to `max`; `default` when absent, reported when out of range.
    pub(super) fn count<T: TryFrom<i64> + std::fmt::Display + Copy>(
        &mut self,
        value: &Option<Spanned<i64>>,
        key: &str,
        max: i64,
        default: T,
    ) -> T {
        let Some(v) = value else {
            return default;
        };
        let n = *v.get_ref();
        match T::try_from(n) {
            Ok(c) if (1..=max).contains(&n) => c,
            _ => {
                self.report(
                    v.span().start,
                    key,
                    &format!("{n} is out of range"),
                    &format!("use a number from 1 to {max} (default {default})"),
                );
                default
            }
        }
    }
}

/// Replaces `${NAME}` with the variable's value; `$${` stands for a literal `${`.
pub(super) fn substitute(
    s: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, (String, String)> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(dollar) = rest.find('$') {
        let (before, from_dollar) = rest.split_at(dollar);
        out.push_str(before);
        if let Some(after) = from_dollar.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(after) = from_dollar.strip_prefix("${") {
            let Some(end) = after.find('}') else {
                return Err((
                    "unterminated ${ in the value".to_owned(),
                    "close the variable with }, like ${NAME}, or write $${ for a literal ${"
                        .to_owned(),
                ));
            };
            let (name, tail) = after.split_at(end);
            let valid = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err((
                    format!("${{{name}}} is not a valid environment variable name"),
                    "use letters, digits and '_' like ${DB_PASSWORD}, or write $${ for a literal ${"
                        .to_owned(),
                ));
            }
            match env(name) {
                Some(value) => out.push_str(&value),
                None => {
                    return Err((
                        format!("environment variable {name} is not set"),
                        format!(
                            "set {name} in walhook's environment (e.g. Environment= or EnvironmentFile= in the systemd unit), or write $${{ for a literal ${{"
                        ),
                    ));
                }
            }
            rest = tail.get(1..).unwrap_or("");
        } else {
            out.push('$');
            rest = from_dollar.get(1..).unwrap_or("");
        }
    }
    out.push_str(rest);
    Ok(out)
}
