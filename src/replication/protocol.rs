//! Framing of the streaming replication sub-protocol carried in CopyData messages.
//!
//! Also the backend message framing and body parsers the replication connection needs:
//! postgres-protocol's backend enum has no CopyBothResponse ('W'), so the connection frames
//! every backend message itself. Everything here is pure: bytes in, values out, every length
//! checked, malformed input an error and never a panic.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{Classify, ErrorClass};
use crate::replication::pgoutput::PgTimestamp;
use crate::types::Lsn;

/// A CopyData payload received from the server during START_REPLICATION.
#[derive(Clone, Debug, PartialEq)]
pub enum ReplicationMessage {
    /// 'w': WAL data; for logical replication `data` is one pgoutput message.
    XLogData {
        wal_start: Lsn,
        wal_end: Lsn,
        server_time: PgTimestamp,
        data: Bytes,
    },
    /// 'k': primary keepalive.
    Keepalive {
        wal_end: Lsn,
        server_time: PgTimestamp,
        reply_requested: bool,
    },
}

/// Largest backend message accepted. The server's own limit for a single message is 1 GB;
/// anything larger means the stream is out of sync, and buffering it would exhaust memory.
pub const MAX_MESSAGE_LEN: usize = 1 << 30;

/// A message from the server did not follow the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A message body ended before a field it announced.
    #[error("malformed '{tag}' message from the server: truncated {what}")]
    Truncated { tag: char, what: &'static str },
    /// A message header announced an impossible length.
    #[error("malformed message from the server: '{tag}' announces length {len}")]
    BadLength { tag: char, len: i64 },
    /// A CopyData payload started with a byte that is not 'w' or 'k'.
    #[error("unknown replication message type {0:#04x} in CopyData")]
    UnknownCopyData(u8),
    /// A CopyData payload was empty.
    #[error("empty CopyData message from the server")]
    EmptyCopyData,
    /// A string was not NUL-terminated or not UTF-8.
    #[error("malformed '{tag}' message from the server: bad string in {what}")]
    BadString { tag: char, what: &'static str },
    /// Extra bytes followed a complete message body.
    #[error("malformed '{tag}' message from the server: {extra} trailing byte(s)")]
    TrailingBytes { tag: char, extra: usize },
}

impl Classify for ProtocolError {
    fn class(&self) -> ErrorClass {
        // A garbled stream is most likely a broken connection; a fresh one usually fixes it.
        ErrorClass::Transient
    }
}

/// One complete backend message: its type byte and body (without the length word).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendFrame {
    /// Message type byte, e.g. `b'd'` for CopyData.
    pub tag: u8,
    /// The body after the Int32 length.
    pub body: Bytes,
}

/// Removes one complete message from the front of `buf`, or returns `None` (leaving `buf`
/// untouched) when more bytes are needed. Leaving partial frames in place is what makes a
/// reader built on this cancel-safe.
pub fn take_frame(buf: &mut BytesMut) -> Result<Option<BackendFrame>, ProtocolError> {
    let Some(header) = buf.get(..5) else {
        return Ok(None);
    };
    let tag = header[0];
    let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    let body_len = usize::try_from(len)
        .ok()
        .filter(|l| *l >= 4 && *l <= MAX_MESSAGE_LEN)
        .map(|l| l - 4)
        .ok_or(ProtocolError::BadLength {
            tag: char::from(tag),
            len: i64::from(len),
        })?;
    if buf.len() < 5 + body_len {
        buf.reserve(5 + body_len - buf.len());
        return Ok(None);
    }
    buf.advance(5);
    let body = buf.split_to(body_len).freeze();
    Ok(Some(BackendFrame { tag, body }))
}

/// A cursor over a message body that turns every short read into a [`ProtocolError`].
pub(crate) struct Reader<'a> {
    tag: char,
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(tag: u8, data: &'a [u8]) -> Self {
        Reader {
            tag: char::from(tag),
            data,
        }
    }

    fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ProtocolError> {
        if self.data.len() < n {
            return Err(ProtocolError::Truncated {
                tag: self.tag,
                what,
            });
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], ProtocolError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N, what)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, ProtocolError> {
        Ok(self.array::<1>(what)?[0])
    }

    pub(crate) fn i16(&mut self, what: &'static str) -> Result<i16, ProtocolError> {
        Ok(i16::from_be_bytes(self.array(what)?))
    }

    pub(crate) fn i32(&mut self, what: &'static str) -> Result<i32, ProtocolError> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }

    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64, ProtocolError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    pub(crate) fn i64(&mut self, what: &'static str) -> Result<i64, ProtocolError> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }

    /// A NUL-terminated UTF-8 string.
    pub(crate) fn cstr(&mut self, what: &'static str) -> Result<&'a str, ProtocolError> {
        let bad = ProtocolError::BadString {
            tag: self.tag,
            what,
        };
        let end = self
            .data
            .iter()
            .position(|b| *b == 0)
            .ok_or_else(|| bad.clone())?;
        let s = std::str::from_utf8(self.bytes(end, what)?).map_err(|_| bad)?;
        self.bytes(1, what)?;
        Ok(s)
    }

    pub(crate) fn finish(&self) -> Result<(), ProtocolError> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::TrailingBytes {
                tag: self.tag,
                extra: self.data.len(),
            })
        }
    }
}

/// Parses a CopyData payload received during START_REPLICATION.
pub fn parse_copy_data(payload: &Bytes) -> Result<ReplicationMessage, ProtocolError> {
    let kind = *payload.first().ok_or(ProtocolError::EmptyCopyData)?;
    let mut r = Reader::new(kind, payload.get(1..).unwrap_or_default());
    match kind {
        b'w' => {
            let wal_start = Lsn(r.u64("XLogData wal_start")?);
            let wal_end = Lsn(r.u64("XLogData wal_end")?);
            let server_time = PgTimestamp(r.i64("XLogData server time")?);
            // 1 type byte + 3 × 8 header bytes precede the WAL data.
            let data = payload.slice(25..);
            Ok(ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                server_time,
                data,
            })
        }
        b'k' => {
            let wal_end = Lsn(r.u64("keepalive wal_end")?);
            let server_time = PgTimestamp(r.i64("keepalive server time")?);
            let reply_requested = r.u8("keepalive reply flag")? != 0;
            r.finish()?;
            Ok(ReplicationMessage::Keepalive {
                wal_end,
                server_time,
                reply_requested,
            })
        }
        other => Err(ProtocolError::UnknownCopyData(other)),
    }
}

/// The CopyData payload of a standby status update ('r').
pub fn encode_standby_status(
    write: Lsn,
    flush: Lsn,
    apply: Lsn,
    now: PgTimestamp,
    reply_requested: bool,
) -> Bytes {
    let mut b = BytesMut::with_capacity(34);
    b.put_u8(b'r');
    b.put_u64(write.0);
    b.put_u64(flush.0);
    b.put_u64(apply.0);
    b.put_i64(now.0);
    b.put_u8(u8::from(reply_requested));
    b.freeze()
}

/// Appends a frontend CopyData message carrying `payload` to `out`.
pub fn encode_copy_data(payload: &[u8], out: &mut BytesMut) {
    out.put_u8(b'd');
    // Payloads written here are status updates of a few dozen bytes.
    out.put_i32(i32::try_from(payload.len() + 4).unwrap_or(i32::MAX));
    out.put_slice(payload);
}

/// The current time as PostgreSQL counts it (µs since 2000-01-01 UTC).
pub fn pg_now() -> PgTimestamp {
    let unix_micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    PgTimestamp(unix_micros - PgTimestamp::UNIX_OFFSET_SECS * 1_000_000)
}

/// The fields of an ErrorResponse or NoticeResponse that walhook reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerMessage {
    /// Severity (non-localized when the server sends it), e.g. `ERROR`, `FATAL`.
    pub severity: String,
    /// SQLSTATE code, e.g. `28P01`.
    pub code: String,
    /// Primary message.
    pub message: String,
    /// Optional detail.
    pub detail: Option<String>,
    /// Optional hint.
    pub hint: Option<String>,
}

/// Parses the body of an ErrorResponse ('E') or NoticeResponse ('N').
pub fn parse_server_message(tag: u8, body: &[u8]) -> Result<ServerMessage, ProtocolError> {
    let mut r = Reader::new(tag, body);
    let mut m = ServerMessage::default();
    let mut localized_severity = String::new();
    loop {
        let field = r.u8("field type")?;
        if field == 0 {
            break;
        }
        let value = r.cstr("field value")?.to_owned();
        match field {
            b'S' => localized_severity = value,
            b'V' => m.severity = value,
            b'C' => m.code = value,
            b'M' => m.message = value,
            b'D' => m.detail = Some(value),
            b'H' => m.hint = Some(value),
            _ => {}
        }
    }
    if m.severity.is_empty() {
        m.severity = localized_severity;
    }
    Ok(m)
}

/// An authentication request ('R') from the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthRequest {
    /// AuthenticationOk.
    Ok,
    /// AuthenticationCleartextPassword.
    Cleartext,
    /// AuthenticationMD5Password with its salt.
    Md5([u8; 4]),
    /// AuthenticationSASL with the mechanisms the server offers.
    Sasl(Vec<String>),
    /// AuthenticationSASLContinue with the server's challenge.
    SaslContinue(Bytes),
    /// AuthenticationSASLFinal with the server's signature.
    SaslFinal(Bytes),
    /// A method walhook does not implement (Kerberos, GSSAPI, SSPI), by its code.
    Unsupported(i32),
}

/// Parses the body of an Authentication ('R') message.
pub fn parse_auth_request(body: &Bytes) -> Result<AuthRequest, ProtocolError> {
    let mut r = Reader::new(b'R', body);
    let code = r.i32("authentication code")?;
    let req = match code {
        0 => AuthRequest::Ok,
        3 => AuthRequest::Cleartext,
        5 => AuthRequest::Md5(r.array("md5 salt")?),
        10 => {
            let mut mechanisms = Vec::new();
            loop {
                let m = r.cstr("SASL mechanism")?;
                if m.is_empty() {
                    break;
                }
                mechanisms.push(m.to_owned());
            }
            AuthRequest::Sasl(mechanisms)
        }
        11 => return Ok(AuthRequest::SaslContinue(body.slice(4..))),
        12 => return Ok(AuthRequest::SaslFinal(body.slice(4..))),
        other => return Ok(AuthRequest::Unsupported(other)),
    };
    r.finish()?;
    Ok(req)
}

/// Parses a ParameterStatus ('S') body into name and value.
pub fn parse_parameter_status(body: &[u8]) -> Result<(String, String), ProtocolError> {
    let mut r = Reader::new(b'S', body);
    let name = r.cstr("parameter name")?.to_owned();
    let value = r.cstr("parameter value")?.to_owned();
    Ok((name, value))
}

/// Parses a RowDescription ('T') body into the column names.
pub fn parse_row_description(body: &[u8]) -> Result<Vec<String>, ProtocolError> {
    let mut r = Reader::new(b'T', body);
    let count = r.i16("field count")?;
    let mut names = Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(1024));
    for _ in 0..count {
        names.push(r.cstr("field name")?.to_owned());
        // table oid, column number, type oid, type size, type modifier, format code
        r.bytes(4 + 2 + 4 + 2 + 4 + 2, "field description")?;
    }
    r.finish()?;
    Ok(names)
}

/// Parses a DataRow ('D') body into text values (`None` for NULL).
pub fn parse_data_row(body: &[u8]) -> Result<Vec<Option<String>>, ProtocolError> {
    let mut r = Reader::new(b'D', body);
    let count = r.i16("column count")?;
    let mut values = Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(1024));
    for _ in 0..count {
        let len = r.i32("value length")?;
        if len < 0 {
            values.push(None);
            continue;
        }
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        let raw = r.bytes(len, "column value")?;
        let text = std::str::from_utf8(raw).map_err(|_| ProtocolError::BadString {
            tag: 'D',
            what: "column value",
        })?;
        values.push(Some(text.to_owned()));
    }
    r.finish()?;
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn take_frame_waits_for_a_complete_message_and_leaves_the_rest() {
        let mut wire = frame(b'd', b"hello");
        wire.extend(frame(b'Z', b"I"));
        let mut buf = BytesMut::new();
        // Feed one byte at a time: no frame may appear before its last byte arrives.
        let mut frames = Vec::new();
        for b in &wire {
            buf.put_u8(*b);
            while let Some(f) = take_frame(&mut buf).unwrap() {
                frames.push(f);
            }
        }
        assert_eq!(
            frames,
            vec![
                BackendFrame {
                    tag: b'd',
                    body: Bytes::from_static(b"hello")
                },
                BackendFrame {
                    tag: b'Z',
                    body: Bytes::from_static(b"I")
                },
            ]
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn take_frame_rejects_impossible_lengths() {
        for len in [-1i32, 0, 3, i32::MAX] {
            let mut buf = BytesMut::new();
            buf.put_u8(b'd');
            buf.put_i32(len);
            assert!(
                matches!(take_frame(&mut buf), Err(ProtocolError::BadLength { .. })),
                "{len}"
            );
        }
    }

    #[test]
    fn xlogdata_is_split_into_header_and_data() {
        let mut p = BytesMut::new();
        p.put_u8(b'w');
        p.put_u64(0x16_0000_0010);
        p.put_u64(0x16_0000_0020);
        p.put_i64(123);
        p.put_slice(b"Bxyz");
        let m = parse_copy_data(&p.freeze()).unwrap();
        assert_eq!(
            m,
            ReplicationMessage::XLogData {
                wal_start: Lsn(0x16_0000_0010),
                wal_end: Lsn(0x16_0000_0020),
                server_time: PgTimestamp(123),
                data: Bytes::from_static(b"Bxyz"),
            }
        );
    }

    #[test]
    fn keepalive_carries_the_reply_flag() {
        let mut p = BytesMut::new();
        p.put_u8(b'k');
        p.put_u64(42);
        p.put_i64(7);
        p.put_u8(1);
        assert_eq!(
            parse_copy_data(&p.freeze()).unwrap(),
            ReplicationMessage::Keepalive {
                wal_end: Lsn(42),
                server_time: PgTimestamp(7),
                reply_requested: true
            }
        );
    }

    #[test]
    fn truncated_or_unknown_copy_data_is_an_error() {
        assert_eq!(
            parse_copy_data(&Bytes::new()),
            Err(ProtocolError::EmptyCopyData)
        );
        assert_eq!(
            parse_copy_data(&Bytes::from_static(b"x")),
            Err(ProtocolError::UnknownCopyData(b'x'))
        );
        let mut full = BytesMut::new();
        full.put_u8(b'k');
        full.put_u64(1);
        full.put_i64(2);
        full.put_u8(0);
        let full = full.freeze();
        for n in 1..full.len() {
            assert!(
                parse_copy_data(&full.slice(..n)).is_err(),
                "keepalive cut at {n}"
            );
        }
        let mut long = full.to_vec();
        long.push(0);
        assert!(matches!(
            parse_copy_data(&Bytes::from(long)),
            Err(ProtocolError::TrailingBytes { .. })
        ));
        let w = Bytes::from(vec![b'w'; 25]);
        for n in 1..25 {
            assert!(
                parse_copy_data(&w.slice(..n)).is_err(),
                "xlogdata cut at {n}"
            );
        }
    }

    #[test]
    fn standby_status_update_has_the_documented_layout() {
        let p = encode_standby_status(Lsn(1), Lsn(2), Lsn(3), PgTimestamp(4), true);
        let mut expected = vec![b'r'];
        for v in [1u64, 2, 3, 4] {
            expected.extend_from_slice(&v.to_be_bytes());
        }
        expected.push(1);
        assert_eq!(p.as_ref(), expected.as_slice());
        let mut out = BytesMut::new();
        encode_copy_data(&p, &mut out);
        assert_eq!(out.as_ref(), frame(b'd', &expected).as_slice());
    }

    #[test]
    fn pg_now_is_after_2020() {
        // 2020-01-01 is 631_152_000 s after the PostgreSQL epoch.
        assert!(pg_now().0 > 631_152_000 * 1_000_000);
    }

    #[test]
    fn error_response_fields_are_extracted() {
        let body = b"SFEHLER\0VFATAL\0C28P01\0Mpassword authentication failed\0Dd\0Hh\0\0";
        let m = parse_server_message(b'E', body).unwrap();
        assert_eq!(m.severity, "FATAL");
        assert_eq!(m.code, "28P01");
        assert_eq!(m.message, "password authentication failed");
        assert_eq!(m.detail.as_deref(), Some("d"));
        assert_eq!(m.hint.as_deref(), Some("h"));
        for n in 0..body.len() {
            assert!(
                parse_server_message(b'E', &body[..n]).is_err(),
                "cut at {n}"
            );
        }
    }

    #[test]
    fn auth_requests_are_recognised() {
        let b = |v: &[u8]| Bytes::copy_from_slice(v);
        assert_eq!(
            parse_auth_request(&b(&[0, 0, 0, 0])).unwrap(),
            AuthRequest::Ok
        );
        assert_eq!(
            parse_auth_request(&b(&[0, 0, 0, 3])).unwrap(),
            AuthRequest::Cleartext
        );
        assert_eq!(
            parse_auth_request(&b(&[0, 0, 0, 5, 1, 2, 3, 4])).unwrap(),
            AuthRequest::Md5([1, 2, 3, 4])
        );
        assert_eq!(
            parse_auth_request(&b(b"\0\0\0\x0aSCRAM-SHA-256\0SCRAM-SHA-256-PLUS\0\0")).unwrap(),
            AuthRequest::Sasl(vec!["SCRAM-SHA-256".into(), "SCRAM-SHA-256-PLUS".into()])
        );
        assert_eq!(
            parse_auth_request(&b(b"\0\0\0\x0br=abc")).unwrap(),
            AuthRequest::SaslContinue(b(b"r=abc"))
        );
        assert_eq!(
            parse_auth_request(&b(&[0, 0, 0, 7])).unwrap(),
            AuthRequest::Unsupported(7)
        );
        assert!(parse_auth_request(&b(&[0, 0, 0, 5, 1, 2])).is_err());
        assert!(parse_auth_request(&b(&[0, 0])).is_err());
        assert!(parse_auth_request(&b(b"\0\0\0\x0aSCRAM")).is_err());
    }

    #[test]
    fn rows_and_descriptions_parse_and_reject_truncation() {
        let mut t = BytesMut::new();
        t.put_i16(2);
        for name in ["systemid", "timeline"] {
            t.put_slice(name.as_bytes());
            t.put_u8(0);
            t.put_slice(&[0u8; 18]);
        }
        assert_eq!(
            parse_row_description(&t).unwrap(),
            vec!["systemid", "timeline"]
        );
        for n in 0..t.len() {
            assert!(parse_row_description(&t[..n]).is_err(), "cut at {n}");
        }
        let mut d = BytesMut::new();
        d.put_i16(2);
        d.put_i32(3);
        d.put_slice(b"abc");
        d.put_i32(-1);
        assert_eq!(
            parse_data_row(&d).unwrap(),
            vec![Some("abc".to_owned()), None]
        );
        for n in 0..d.len() {
            assert!(parse_data_row(&d[..n]).is_err(), "cut at {n}");
        }
        let mut huge = BytesMut::new();
        huge.put_i16(1);
        huge.put_i32(i32::MAX);
        assert!(parse_data_row(&huge).is_err());
        assert_eq!(
            parse_parameter_status(b"server_version\x0015.4\0").unwrap(),
            ("server_version".to_owned(), "15.4".to_owned())
        );
    }
}
