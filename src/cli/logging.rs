//! Logging: readable text on a terminal and in systemd's journal, JSON lines for log
//! collectors; `WALHOOK_LOG` filters (tracing's `EnvFilter` syntax).
//!
//! Under systemd, stderr is a stream into the journal. Each line then starts with the
//! sd-daemon priority prefix (`<4>` for a warning), which journald strips and stores as the
//! entry's PRIORITY, so `journalctl -p warning` shows warnings and errors only.

use std::io::{IsTerminal, Write};
use std::os::unix::fs::MetadataExt;

use clap::ValueEnum;
use tracing::{Level, Metadata};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// The `--log-format` choices.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(super) enum LogFormat {
    /// One readable line per event.
    Text,
    /// One JSON object per line.
    Json,
}

/// Where stderr leads, which decides the default format and the priority prefixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Destination {
    Terminal,
    Journal,
    Other,
}

/// Installs the global subscriber: `format` if given, else text on a terminal or in the
/// journal and JSON otherwise; `WALHOOK_LOG` overrides `default_filter`.
pub(super) fn init(format: Option<LogFormat>, default_filter: &str) {
    let filter =
        EnvFilter::try_from_env("WALHOOK_LOG").unwrap_or_else(|_| EnvFilter::new(default_filter));
    let destination = destination();
    let format = format.unwrap_or(match destination {
        Destination::Terminal | Destination::Journal => LogFormat::Text,
        Destination::Other => LogFormat::Json,
    });
    let writer = StderrWriter {
        priorities: destination == Destination::Journal,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(destination == Destination::Terminal && !no_color());
    // The journal stamps every entry itself.
    let _ = match (format, destination) {
        (LogFormat::Text, Destination::Journal) => builder.without_time().try_init(),
        (LogFormat::Text, _) => builder.try_init(),
        (LogFormat::Json, _) => builder.json().try_init(),
    };
}

/// <https://no-color.org>: a non-empty `NO_COLOR` turns colours off.
fn no_color() -> bool {
    std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
}

fn destination() -> Destination {
    let stderr = std::io::stderr();
    if stderr.is_terminal() {
        return Destination::Terminal;
    }
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return Destination::Other;
    };
    // A duplicate of fd 2 as a File, for its metadata; dropping it closes only the copy.
    let meta = std::os::fd::AsFd::as_fd(&stderr)
        .try_clone_to_owned()
        .ok()
        .map(std::fs::File::from)
        .and_then(|f| f.metadata().ok());
    match meta {
        Some(m) if names_stream(&stream, m.dev(), m.ino()) => Destination::Journal,
        _ => Destination::Other,
    }
}

/// Whether `JOURNAL_STREAM` ("DEVICE:INODE", decimal) names the file with this device and
/// inode. systemd sets it for the service's own stderr; a child whose stderr was redirected
/// inherits the variable, so it only counts when it matches.
fn names_stream(journal_stream: &str, dev: u64, ino: u64) -> bool {
    journal_stream
        .split_once(':')
        .and_then(|(d, i)| Some((d.trim().parse::<u64>().ok()?, i.trim().parse::<u64>().ok()?)))
        == Some((dev, ino))
}

/// The sd-daemon(3) prefix for a level: `<3>` err, `<4>` warning, `<6>` info, `<7>` debug.
fn priority_prefix(level: &Level) -> &'static [u8] {
    match *level {
        Level::ERROR => b"<3>",
        Level::WARN => b"<4>",
        Level::INFO => b"<6>",
        Level::DEBUG | Level::TRACE => b"<7>",
    }
}

/// stderr, with the priority prefix on every line when it leads to the journal.
#[derive(Clone, Copy, Debug)]
struct StderrWriter {
    priorities: bool,
}

impl<'a> MakeWriter<'a> for StderrWriter {
    type Writer = EventWriter;

    fn make_writer(&'a self) -> EventWriter {
        EventWriter {
            prefix: None,
            at_line_start: true,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> EventWriter {
        EventWriter {
            prefix: self.priorities.then(|| priority_prefix(meta.level())),
            at_line_start: true,
        }
    }
}

/// Writes one event to stderr, prefixing each of its lines (a message may hold several)
/// so that journald files every line under the event's priority.
#[derive(Debug)]
struct EventWriter {
    prefix: Option<&'static [u8]>,
    at_line_start: bool,
}

impl EventWriter {
    /// `buf` with the prefix at every line start; continues the line state across calls.
    fn prefixed(&mut self, prefix: &[u8], buf: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(buf.len() + prefix.len() * 2);
        for piece in buf.split_inclusive(|b| *b == b'\n') {
            if self.at_line_start {
                out.extend_from_slice(prefix);
            }
            out.extend_from_slice(piece);
            self.at_line_start = piece.ends_with(b"\n");
        }
        out
    }
}

impl Write for EventWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.prefix {
            // One write_all per event keeps lines of concurrent events apart.
            Some(prefix) => {
                let out = self.prefixed(prefix, buf);
                std::io::stderr().write_all(&out)?;
            }
            None => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_must_name_this_device_and_inode() {
        assert!(names_stream("64769:123456", 64769, 123456));
        assert!(!names_stream("64769:123457", 64769, 123456));
        assert!(!names_stream("", 1, 2));
        assert!(!names_stream("1:2:3", 1, 2));
        assert!(!names_stream("x:2", 1, 2));
    }

    #[test]
    fn every_line_of_an_event_carries_its_priority() {
        let mut w = EventWriter {
            prefix: Some(b"<4>"),
            at_line_start: true,
        };
        let mut out = w.prefixed(b"<4>", b"WARN one\ntwo");
        out.extend(w.prefixed(b"<4>", b" still two\nthree\n"));
        assert_eq!(out, b"<4>WARN one\n<4>two still two\n<4>three\n");
    }

    #[test]
    fn levels_map_to_syslog_priorities() {
        assert_eq!(priority_prefix(&Level::ERROR), b"<3>");
        assert_eq!(priority_prefix(&Level::WARN), b"<4>");
        assert_eq!(priority_prefix(&Level::INFO), b"<6>");
        assert_eq!(priority_prefix(&Level::DEBUG), b"<7>");
        assert_eq!(priority_prefix(&Level::TRACE), b"<7>");
    }
}
