//! Decoder for the pgoutput logical replication protocol (version 1).
//!
//! Input is the payload of one XLogData message; output is a typed [`Message`].
//! Every length is checked before it is read: malformed input yields a [`DecodeError`],
//! never a panic.

use bytes::Bytes;

use crate::error::{Classify, ErrorClass};
use crate::types::{Lsn, Oid, Xid};

/// Microseconds since 2000-01-01 00:00:00 UTC, as PostgreSQL sends timestamps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PgTimestamp(pub i64);

impl PgTimestamp {
    /// Seconds between the Unix epoch and the PostgreSQL epoch (2000-01-01).
    pub const UNIX_OFFSET_SECS: i64 = 946_684_800;

    /// Microseconds since the Unix epoch.
    pub fn unix_micros(self) -> i64 {
        self.0 + Self::UNIX_OFFSET_SECS * 1_000_000
    }
}

/// One decoded pgoutput message.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// 'B': a transaction starts.
    Begin(Begin),
    /// 'C': the transaction committed.
    Commit(Commit),
    /// 'O': the transaction originated on another node.
    Origin { commit_lsn: Lsn, name: String },
    /// 'R': describes a relation; sent before the first change to it in a session and after DDL.
    Relation(Relation),
    /// 'Y': describes a non-builtin type.
    Type {
        oid: Oid,
        namespace: String,
        name: String,
    },
    /// 'I': a row was inserted.
    Insert { relation: Oid, new: TupleData },
    /// 'U': a row was updated. `old` is present with REPLICA IDENTITY FULL, or when a key changed.
    Update {
        relation: Oid,
        old: Option<OldTuple>,
        new: TupleData,
    },
    /// 'D': a row was deleted; `old` holds the key or, with FULL, the whole row.
    Delete { relation: Oid, old: OldTuple },
    /// 'T': relations were truncated.
    Truncate {
        cascade: bool,
        restart_identity: bool,
        relations: Vec<Oid>,
    },
    /// 'M': a logical decoding message (`pg_logical_emit_message`).
    LogicalMessage {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Bytes,
    },
}

/// 'B' message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the transaction's commit record: known at Begin, so events can be keyed early.
    pub final_lsn: Lsn,
    /// Commit timestamp.
    pub commit_time: PgTimestamp,
    /// Transaction id.
    pub xid: Xid,
}

/// 'C' message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    /// Flags (currently unused by PostgreSQL, always 0).
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// End LSN of the transaction: the position to confirm as flushed once it is durable.
    pub end_lsn: Lsn,
    /// Commit timestamp.
    pub commit_time: PgTimestamp,
}

/// The relation's REPLICA IDENTITY setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// 'd': primary key columns.
    Default,
    /// 'n': nothing.
    Nothing,
    /// 'f': all columns.
    Full,
    /// 'i': the columns of a chosen unique index.
    Index,
}

/// 'R' message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relation {
    /// Relation oid; later change messages refer to it.
    pub oid: Oid,
    /// Schema name ("pg_catalog" is sent as an empty string by PostgreSQL).
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// Replica identity of the table.
    pub replica_identity: ReplicaIdentity,
    /// Columns in table order.
    pub columns: Vec<Column>,
}

/// One column of a [`Relation`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    /// True when the column is part of the replica identity key.
    pub is_key: bool,
    /// Column name.
    pub name: String,
    /// Type oid.
    pub type_oid: Oid,
    /// Type modifier (atttypmod).
    pub type_modifier: i32,
}

/// The old row sent with an Update or Delete.
#[derive(Clone, Debug, PartialEq)]
pub enum OldTuple {
    /// 'K': only the replica identity key columns are meaningful (others are null).
    Key(TupleData),
    /// 'O': the whole old row (REPLICA IDENTITY FULL).
    Full(TupleData),
}

/// The columns of a row, in relation column order.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct TupleData(pub Vec<ColumnValue>);

/// One column value in a row.
#[derive(Clone, Debug, PartialEq)]
pub enum ColumnValue {
    /// 'n': SQL NULL.
    Null,
    /// 'u': a TOASTed value that did not change and was not sent.
    UnchangedToast,
    /// 't': the value in the type's text output form.
    Text(Bytes),
    /// 'b': the value in binary form (only with the `binary` option, which walhook does not use).
    Binary(Bytes),
}

/// The payload was not a well-formed pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message ended before a field it announced.
    #[error("pgoutput message '{tag}' truncated: needed {needed} more byte(s) at offset {offset}")]
    Truncated {
        tag: char,
        offset: usize,
        needed: usize,
    },
    /// The first byte is not a message type this decoder knows.
    #[error("unknown pgoutput message type {0:#04x}")]
    UnknownTag(u8),
    /// A byte that selects a variant had a value the protocol does not define.
    #[error("pgoutput message '{tag}': unexpected {what} byte {byte:#04x} at offset {offset}")]
    UnexpectedByte {
        tag: char,
        what: &'static str,
        byte: u8,
        offset: usize,
    },
    /// A string was not NUL-terminated or not UTF-8.
    #[error("pgoutput message '{tag}': bad string at offset {offset}: {reason}")]
    BadString {
        tag: char,
        offset: usize,
        reason: &'static str,
    },
    /// Extra bytes followed a complete message.
    #[error("pgoutput message '{tag}': {extra} unexpected trailing byte(s)")]
    TrailingBytes { tag: char, extra: usize },
    /// The input was empty.
    #[error("empty pgoutput message")]
    Empty,
    /// A count or length field was negative.
    #[error("pgoutput message '{tag}': negative {what} {length} at offset {offset}")]
    BadLength {
        tag: char,
        what: &'static str,
        length: i64,
        offset: usize,
    },
}

impl Classify for DecodeError {
    /// A stream we cannot parse will not parse better on retry: the server or protocol version
    /// is not what walhook speaks.
    fn class(&self) -> ErrorClass {
        ErrorClass::Permanent
    }
}

/// Decodes one pgoutput message from an XLogData payload.
///
/// Column values are zero-copy slices of `data`.
pub fn decode(data: &Bytes) -> Result<Message, DecodeError> {
    let Some(&first) = data.first() else {
        return Err(DecodeError::Empty);
    };
    let mut r = Reader {
        buf: data,
        pos: 1,
        tag: char::from(first),
    };
    let msg = match first {
        b'B' => Message::Begin(Begin {
            final_lsn: Lsn(r.u64()?),
            commit_time: PgTimestamp(r.i64()?),
            xid: Xid(r.u32()?),
        }),
        b'C' => Message::Commit(Commit {
            flags: r.u8()?,
            commit_lsn: Lsn(r.u64()?),
            end_lsn: Lsn(r.u64()?),
            commit_time: PgTimestamp(r.i64()?),
        }),
        b'O' => Message::Origin {
            commit_lsn: Lsn(r.u64()?),
            name: r.string()?,
        },
        b'R' => Message::Relation(r.relation()?),
        b'Y' => Message::Type {
            oid: Oid(r.u32()?),
            namespace: r.string()?,
            name: r.string()?,
        },
        b'I' => {
            let relation = Oid(r.u32()?);
            r.expect(b'N', "new tuple marker")?;
            Message::Insert {
                relation,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let relation = Oid(r.u32()?);
            let offset = r.pos;
            let old = match r.u8()? {
                b'K' => Some(OldTuple::Key(r.tuple()?)),
                b'O' => Some(OldTuple::Full(r.tuple()?)),
                b'N' => None,
                byte => return Err(r.unexpected("tuple kind", byte, offset)),
            };
            if old.is_some() {
                r.expect(b'N', "new tuple marker")?;
            }
            Message::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation = Oid(r.u32()?);
            let offset = r.pos;
            let old = match r.u8()? {
                b'K' => OldTuple::Key(r.tuple()?),
                b'O' => OldTuple::Full(r.tuple()?),
                byte => return Err(r.unexpected("tuple kind", byte, offset)),
            };
            Message::Delete { relation, old }
        }
        b'T' => {
            let count = r.count32("relation count")?;
            let options = r.u8()?;
            // Each oid is 4 bytes: a count larger than the rest of the message is caught by the
            // reads below, and the capacity bound keeps a hostile count from allocating.
            let mut relations = Vec::with_capacity(count.min(r.remaining() / 4));
            for _ in 0..count {
                relations.push(Oid(r.u32()?));
            }
            Message::Truncate {
                cascade: options & TRUNCATE_CASCADE != 0,
                restart_identity: options & TRUNCATE_RESTART_IDENTITY != 0,
                relations,
            }
        }
        b'M' => {
            let flags = r.u8()?;
            let lsn = Lsn(r.u64()?);
            let prefix = r.string()?;
            let len = r.count32("content length")?;
            Message::LogicalMessage {
                transactional: flags & MESSAGE_TRANSACTIONAL != 0,
                lsn,
                prefix,
                content: r.bytes(len)?,
            }
        }
        other => return Err(DecodeError::UnknownTag(other)),
    };
    r.finish()?;
    Ok(msg)
}

/// Truncate option bit: CASCADE.
const TRUNCATE_CASCADE: u8 = 1;
/// Truncate option bit: RESTART IDENTITY.
const TRUNCATE_RESTART_IDENTITY: u8 = 2;
/// Logical message flag bit: the message was emitted inside a transaction.
const MESSAGE_TRANSACTIONAL: u8 = 1;
/// Relation column flag bit: the column is part of the replica identity key.
const COLUMN_IS_KEY: u8 = 1;

/// A cursor over one message; every read checks the remaining length first.
struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
    tag: char,
}

impl Reader<'_> {
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let end = self.pos.checked_add(N).ok_or_else(|| self.truncated(N))?;
        let bytes = self
            .buf
            .get(self.pos..end)
            .ok_or_else(|| self.truncated(N))?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        self.pos = end;
        Ok(out)
    }

    fn truncated(&self, want: usize) -> DecodeError {
        DecodeError::Truncated {
            tag: self.tag,
            offset: self.pos,
            needed: want.saturating_sub(self.remaining()),
        }
    }

    fn unexpected(&self, what: &'static str, byte: u8, offset: usize) -> DecodeError {
        DecodeError::UnexpectedByte {
            tag: self.tag,
            what,
            byte,
            offset,
        }
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take::<1>()?[0])
    }

    fn i16(&mut self) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.take()?))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.take()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take()?))
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.take()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take()?))
    }

    fn expect(&mut self, want: u8, what: &'static str) -> Result<(), DecodeError> {
        let offset = self.pos;
        match self.u8()? {
            b if b == want => Ok(()),
            b => Err(self.unexpected(what, b, offset)),
        }
    }

    /// Reads a signed Int16 count, rejecting negative values.
    fn count16(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let offset = self.pos;
        let n = self.i16()?;
        usize::try_from(n).map_err(|_| self.bad_length(what, n.into(), offset))
    }

    /// Reads a signed Int32 count or length, rejecting negative values.
    fn count32(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let offset = self.pos;
        let n = self.i32()?;
        usize::try_from(n).map_err(|_| self.bad_length(what, n.into(), offset))
    }

    fn bad_length(&self, what: &'static str, length: i64, offset: usize) -> DecodeError {
        DecodeError::BadLength {
            tag: self.tag,
            what,
            length,
            offset,
        }
    }

    fn bytes(&mut self, len: usize) -> Result<Bytes, DecodeError> {
        if len > self.remaining() {
            return Err(self.truncated(len));
        }
        let start = self.pos;
        self.pos += len;
        Ok(self.buf.slice(start..self.pos))
    }

    /// Reads a NUL-terminated UTF-8 string.
    fn string(&mut self) -> Result<String, DecodeError> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let Some(nul) = rest.iter().position(|&b| b == 0) else {
            return Err(DecodeError::BadString {
                tag: self.tag,
                offset: self.pos,
                reason: "missing NUL terminator",
            });
        };
        let text = rest.get(..nul).unwrap_or_default();
        let s = std::str::from_utf8(text)
            .map_err(|_| DecodeError::BadString {
                tag: self.tag,
                offset: self.pos,
                reason: "not valid UTF-8",
            })?
            .to_owned();
        self.pos += nul + 1;
        Ok(s)
    }

    fn relation(&mut self) -> Result<Relation, DecodeError> {
        let oid = Oid(self.u32()?);
        let namespace = self.string()?;
        let name = self.string()?;
        let offset = self.pos;
        let replica_identity = match self.u8()? {
            b'd' => ReplicaIdentity::Default,
            b'n' => ReplicaIdentity::Nothing,
            b'f' => ReplicaIdentity::Full,
            b'i' => ReplicaIdentity::Index,
            byte => return Err(self.unexpected("replica identity", byte, offset)),
        };
        let count = self.count16("column count")?;
        // A column takes at least 10 bytes (flags, empty name, type oid, modifier).
        let mut columns = Vec::with_capacity(count.min(self.remaining() / 10));
        for _ in 0..count {
            let flags = self.u8()?;
            columns.push(Column {
                is_key: flags & COLUMN_IS_KEY != 0,
                name: self.string()?,
                type_oid: Oid(self.u32()?),
                type_modifier: self.i32()?,
            });
        }
        Ok(Relation {
            oid,
            namespace,
            name,
            replica_identity,
            columns,
        })
    }

    fn tuple(&mut self) -> Result<TupleData, DecodeError> {
        let count = self.count16("column count")?;
        let mut values = Vec::with_capacity(count.min(self.remaining()));
        for _ in 0..count {
            let offset = self.pos;
            let value = match self.u8()? {
                b'n' => ColumnValue::Null,
                b'u' => ColumnValue::UnchangedToast,
                b't' => {
                    let len = self.count32("value length")?;
                    ColumnValue::Text(self.bytes(len)?)
                }
                b'b' => {
                    let len = self.count32("value length")?;
                    ColumnValue::Binary(self.bytes(len)?)
                }
                byte => return Err(self.unexpected("column kind", byte, offset)),
            };
            values.push(value);
        }
        Ok(TupleData(values))
    }

    fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(DecodeError::TrailingBytes {
                tag: self.tag,
                extra,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // Captured from PostgreSQL 15.x with pg_logical_slot_peek_binary_changes(..., 'proto_version',
    // '1', 'publication_names', 'pub', 'messages', 'true'). Schema:
    //   CREATE TYPE mood AS ENUM ('ok','sad');                         -- oid 16385
    //   CREATE TABLE t1 (id int PRIMARY KEY, name varchar(20), flag bool, amount numeric(10,2),
    //                    ts timestamptz, doc jsonb, raw bytea, big text);  -- oid 16389, DEFAULT
    //   ALTER TABLE t1 ALTER COLUMN big SET STORAGE EXTERNAL;
    //   CREATE TABLE t2 (id int PRIMARY KEY, m mood, v text);          -- oid 16396, FULL

    /// BEGIN of xid 730.
    const BEGIN: &str = "4200000000015301f00003046f1923000e000002da";
    /// COMMIT of xid 730.
    const COMMIT: &str = "430000000000015301f000000000015302200003046f1923000e";
    /// Relation t1 (REPLICA IDENTITY DEFAULT).
    const RELATION_T1: &str = "52000040057075626c6963007431006400080169640000000017ffffffff006e616d6500000004130000001800666c61670000000010ffffffff00616d6f756e7400000006a4000a000600747300000004a0ffffffff00646f630000000edaffffffff007261770000000011ffffffff006269670000000019ffffffff";
    /// INSERT INTO t1 VALUES (1, 'ab', true, 1.50, '2024-01-02 03:04:05+00', '{"a":1}', '\x0102', NULL).
    const INSERT_T1: &str = "49000040054e0008740000000131740000000261627400000001747400000004312e35307400000016323032342d30312d30322030333a30343a30352b303074000000087b2261223a20317d74000000065c78303130326e";
    /// UPDATE t1 SET id = 2 WHERE id = 1: the key changed, so the old key is sent.
    const UPDATE_T1_KEY: &str = "55000040054b00087400000001316e6e6e6e6e6e6e4e0008740000000132740000000263647400000001747400000004312e35307400000016323032342d30312d30322030333a30343a30352b303074000000087b2261223a20317d74000000065c78303130326e";
    /// DELETE FROM t1 WHERE id = 2.
    const DELETE_T1: &str = "44000040054b00087400000001326e6e6e6e6e6e6e";
    /// UPDATE t1 SET name = 'e' WHERE id = 3, where `big` holds a 9000-byte TOASTed value.
    const UPDATE_T1_TOAST: &str = "55000040054e00087400000001337400000001656e6e6e6e6e75";
    /// Type message for the enum `mood`.
    const TYPE_MOOD: &str = "59000040017075626c6963006d6f6f6400";
    /// Relation t2 (REPLICA IDENTITY FULL).
    const RELATION_T2: &str = "520000400c7075626c6963007432006600030169640000000017ffffffff016d0000004001ffffffff01760000000019ffffffff";
    /// UPDATE t2 SET v = 'b' WHERE id = 1 (FULL: the whole old row is sent).
    const UPDATE_T2_FULL: &str = "550000400c4f000374000000013174000000026f6b7400000001614e000374000000013174000000026f6b740000000162";
    /// DELETE FROM t2 WHERE id = 1 (FULL).
    const DELETE_T2_FULL: &str = "440000400c4f000374000000013174000000026f6b740000000162";
    /// TRUNCATE t2.
    const TRUNCATE_T2: &str = "5400000001000000400c";
    /// TRUNCATE t1, t2 RESTART IDENTITY CASCADE.
    const TRUNCATE_BOTH: &str = "540000000203000040050000400c";
    /// pg_logical_emit_message(true, 'p', 'hi').
    const MESSAGE_TX: &str = "4d0100000000015354987000000000026869";
    /// pg_logical_emit_message(false, 'q', 'x').
    const MESSAGE_NON_TX: &str = "4d00000000000153550071000000000178";
    /// BEGIN of a transaction with pg_replication_origin_xact_setup('0/1234', '2024-01-01 00:00:00+00').
    const BEGIN_ORIGIN: &str = "4200000000015358380002b0d5d4e94000000002e7";
    /// Origin message of that transaction (origin `orig`).
    const ORIGIN: &str = "4f00000000000012346f72696700";
    /// INSERT INTO t2 VALUES (1, 'ok', 'a'), captured with the extra option 'binary' 'true'.
    const INSERT_T2_BINARY: &str = "490000400c4e000362000000040000000162000000026f6b620000000161";

    const ALL: &[&str] = &[
        BEGIN,
        COMMIT,
        RELATION_T1,
        INSERT_T1,
        UPDATE_T1_KEY,
        DELETE_T1,
        UPDATE_T1_TOAST,
        TYPE_MOOD,
        RELATION_T2,
        UPDATE_T2_FULL,
        DELETE_T2_FULL,
        TRUNCATE_T2,
        TRUNCATE_BOTH,
        MESSAGE_TX,
        MESSAGE_NON_TX,
        BEGIN_ORIGIN,
        ORIGIN,
        INSERT_T2_BINARY,
    ];

    fn hex(s: &str) -> Bytes {
        assert!(s.len().is_multiple_of(2), "odd hex length");
        let v: Vec<u8> = (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect();
        Bytes::from(v)
    }

    fn dec(s: &str) -> Message {
        decode(&hex(s)).unwrap()
    }

    fn text(s: &str) -> ColumnValue {
        ColumnValue::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn col(is_key: bool, name: &str, type_oid: u32, type_modifier: i32) -> Column {
        Column {
            is_key,
            name: name.to_owned(),
            type_oid: Oid(type_oid),
            type_modifier,
        }
    }

    const T1: Oid = Oid(16389);
    const T2: Oid = Oid(16396);

    fn t1_row(id: &str, name: &str) -> TupleData {
        TupleData(vec![
            text(id),
            text(name),
            text("t"),
            text("1.50"),
            text("2024-01-02 03:04:05+00"),
            text(r#"{"a": 1}"#),
            text(r"\x0102"),
            ColumnValue::Null,
        ])
    }

    fn t1_key(id: &str) -> TupleData {
        let mut v = vec![text(id)];
        v.extend(std::iter::repeat_n(ColumnValue::Null, 7));
        TupleData(v)
    }

    #[test]
    fn decodes_captured_begin_and_commit() {
        assert_eq!(
            dec(BEGIN),
            Message::Begin(Begin {
                final_lsn: Lsn(0x0153_01F0),
                commit_time: PgTimestamp(0x0003_046f_1923_000e),
                xid: Xid(730),
            })
        );
        assert_eq!(
            dec(COMMIT),
            Message::Commit(Commit {
                flags: 0,
                commit_lsn: Lsn(0x0153_01F0),
                end_lsn: Lsn(0x0153_0220),
                commit_time: PgTimestamp(0x0003_046f_1923_000e),
            })
        );
    }

    #[test]
    fn decodes_captured_origin_with_its_begin_timestamp() {
        let Message::Begin(begin) = dec(BEGIN_ORIGIN) else {
            panic!("not a Begin")
        };
        assert_eq!(begin.xid, Xid(743));
        assert_eq!(begin.final_lsn, Lsn(0x0153_5838));
        // The origin's commit timestamp was set to 2024-01-01T00:00:00Z.
        assert_eq!(begin.commit_time.unix_micros(), 1_704_067_200_000_000);
        assert_eq!(
            dec(ORIGIN),
            Message::Origin {
                commit_lsn: Lsn(0x1234),
                name: "orig".into()
            }
        );
    }

    #[test]
    fn decodes_captured_relation_with_typmods_and_key_flags() {
        assert_eq!(
            dec(RELATION_T1),
            Message::Relation(Relation {
                oid: T1,
                namespace: "public".into(),
                name: "t1".into(),
                replica_identity: ReplicaIdentity::Default,
                columns: vec![
                    col(true, "id", 23, -1),
                    col(false, "name", 1043, 24),
                    col(false, "flag", 16, -1),
                    col(false, "amount", 1700, (10 << 16 | 2) + 4),
                    col(false, "ts", 1184, -1),
                    col(false, "doc", 3802, -1),
                    col(false, "raw", 17, -1),
                    col(false, "big", 25, -1),
                ],
            })
        );
        assert_eq!(
            dec(RELATION_T2),
            Message::Relation(Relation {
                oid: T2,
                namespace: "public".into(),
                name: "t2".into(),
                replica_identity: ReplicaIdentity::Full,
                columns: vec![
                    col(true, "id", 23, -1),
                    col(true, "m", 16385, -1),
                    col(true, "v", 25, -1),
                ],
            })
        );
    }

    #[test]
    fn decodes_captured_type() {
        assert_eq!(
            dec(TYPE_MOOD),
            Message::Type {
                oid: Oid(16385),
                namespace: "public".into(),
                name: "mood".into()
            }
        );
    }

    #[test]
    fn decodes_captured_insert_with_text_values_and_null() {
        assert_eq!(
            dec(INSERT_T1),
            Message::Insert {
                relation: T1,
                new: t1_row("1", "ab")
            }
        );
    }

    #[test]
    fn decodes_captured_insert_with_binary_values() {
        assert_eq!(
            dec(INSERT_T2_BINARY),
            Message::Insert {
                relation: T2,
                new: TupleData(vec![
                    ColumnValue::Binary(Bytes::from_static(&[0, 0, 0, 1])),
                    ColumnValue::Binary(Bytes::from_static(b"ok")),
                    ColumnValue::Binary(Bytes::from_static(b"a")),
                ]),
            }
        );
    }

    #[test]
    fn decodes_captured_update_that_changed_the_key() {
        assert_eq!(
            dec(UPDATE_T1_KEY),
            Message::Update {
                relation: T1,
                old: Some(OldTuple::Key(t1_key("1"))),
                new: t1_row("2", "cd"),
            }
        );
    }

    #[test]
    fn decodes_captured_update_leaving_toast_unchanged() {
        let Message::Relation(rel) = dec(RELATION_T1) else {
            panic!("not a Relation")
        };
        let Message::Update { relation, old, new } = dec(UPDATE_T1_TOAST) else {
            panic!("not an Update")
        };
        assert_eq!(relation, rel.oid);
        assert_eq!(old, None);
        assert_eq!(new.0.len(), rel.columns.len());
        assert_eq!(new.0[0], text("3"));
        assert_eq!(new.0[1], text("e"));
        assert!(new.0[2..7].iter().all(|v| *v == ColumnValue::Null));
        assert_eq!(rel.columns[7].name, "big");
        assert_eq!(new.0[7], ColumnValue::UnchangedToast);
    }

    #[test]
    fn decodes_captured_update_and_delete_with_full_identity() {
        let row = |v: &str| TupleData(vec![text("1"), text("ok"), text(v)]);
        assert_eq!(
            dec(UPDATE_T2_FULL),
            Message::Update {
                relation: T2,
                old: Some(OldTuple::Full(row("a"))),
                new: row("b")
            }
        );
        assert_eq!(
            dec(DELETE_T2_FULL),
            Message::Delete {
                relation: T2,
                old: OldTuple::Full(row("b"))
            }
        );
    }

    #[test]
    fn decodes_captured_delete_with_default_identity() {
        assert_eq!(
            dec(DELETE_T1),
            Message::Delete {
                relation: T1,
                old: OldTuple::Key(t1_key("2"))
            }
        );
    }

    #[test]
    fn decodes_captured_truncate_options() {
        assert_eq!(
            dec(TRUNCATE_T2),
            Message::Truncate {
                cascade: false,
                restart_identity: false,
                relations: vec![T2]
            }
        );
        assert_eq!(
            dec(TRUNCATE_BOTH),
            Message::Truncate {
                cascade: true,
                restart_identity: true,
                relations: vec![T1, T2]
            }
        );
    }

    #[test]
    fn decodes_captured_logical_messages() {
        assert_eq!(
            dec(MESSAGE_TX),
            Message::LogicalMessage {
                transactional: true,
                lsn: Lsn(0x0153_5498),
                prefix: "p".into(),
                content: Bytes::from_static(b"hi"),
            }
        );
        assert_eq!(
            dec(MESSAGE_NON_TX),
            Message::LogicalMessage {
                transactional: false,
                lsn: Lsn(0x0153_5500),
                prefix: "q".into(),
                content: Bytes::from_static(b"x"),
            }
        );
    }

    #[test]
    fn column_values_share_the_input_buffer() {
        let data = hex(INSERT_T1);
        let Ok(Message::Insert { new, .. }) = decode(&data) else {
            panic!("not an Insert")
        };
        let ColumnValue::Text(v) = &new.0[1] else {
            panic!("not text")
        };
        let range = data.as_ptr_range();
        assert!(
            range.contains(&v.as_ptr()),
            "value was copied out of the input buffer"
        );
    }

    #[test]
    fn every_truncated_prefix_of_a_captured_message_is_an_error() {
        for msg in ALL {
            let full = hex(msg);
            for len in 0..full.len() {
                let res = decode(&full.slice(..len));
                assert!(res.is_err(), "prefix {len} of {msg} decoded as {res:?}");
            }
        }
    }

    #[test]
    fn truncated_value_reports_the_missing_byte_count() {
        let full = hex(MESSAGE_TX);
        let cut = full.slice(..full.len() - 1);
        assert_eq!(
            decode(&cut),
            Err(DecodeError::Truncated {
                tag: 'M',
                offset: cut.len() - 1,
                needed: 1
            })
        );
        assert_eq!(decode(&Bytes::new()), Err(DecodeError::Empty));
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        for msg in ALL {
            let mut v = hex(msg).to_vec();
            v.push(0);
            let res = decode(&Bytes::from(v));
            assert!(
                matches!(res, Err(DecodeError::TrailingBytes { extra: 1, .. })),
                "{msg} with a trailing byte gave {res:?}"
            );
        }
    }

    #[test]
    fn unknown_tag_is_an_error() {
        assert_eq!(
            decode(&Bytes::from_static(b"Z")),
            Err(DecodeError::UnknownTag(b'Z'))
        );
        // 'S' (stream start) exists only in protocol version 2.
        assert_eq!(
            decode(&Bytes::from_static(b"S\0\0\0\x01\x01")),
            Err(DecodeError::UnknownTag(b'S'))
        );
    }

    #[test]
    fn bad_tuple_kind_byte_is_an_error() {
        // 'X' where 'K', 'O' or 'N' must follow the relation oid.
        let mut v = hex(UPDATE_T2_FULL).to_vec();
        v[5] = b'X';
        assert_eq!(
            decode(&Bytes::from(v)),
            Err(DecodeError::UnexpectedByte {
                tag: 'U',
                what: "tuple kind",
                byte: b'X',
                offset: 5
            })
        );
        // A Delete always carries an old tuple: 'N' is not allowed.
        let mut v = hex(DELETE_T1).to_vec();
        v[5] = b'N';
        assert!(matches!(
            decode(&Bytes::from(v)),
            Err(DecodeError::UnexpectedByte {
                tag: 'D',
                byte: b'N',
                ..
            })
        ));
        // An Insert must carry 'N'.
        let mut v = hex(INSERT_T1).to_vec();
        v[5] = b'K';
        assert!(matches!(
            decode(&Bytes::from(v)),
            Err(DecodeError::UnexpectedByte {
                tag: 'I',
                byte: b'K',
                ..
            })
        ));
    }

    #[test]
    fn bad_column_kind_and_replica_identity_bytes_are_errors() {
        // The first column of the Insert is at offset 8: tag, oid (4), 'N', count (2).
        let mut v = hex(INSERT_T1).to_vec();
        v[8] = b'x';
        assert_eq!(
            decode(&Bytes::from(v)),
            Err(DecodeError::UnexpectedByte {
                tag: 'I',
                what: "column kind",
                byte: b'x',
                offset: 8
            })
        );
        // Replica identity follows "public\0t1\0" at offset 15.
        let mut v = hex(RELATION_T1).to_vec();
        assert_eq!(v[15], b'd');
        v[15] = b'z';
        assert!(matches!(
            decode(&Bytes::from(v)),
            Err(DecodeError::UnexpectedByte {
                what: "replica identity",
                byte: b'z',
                ..
            })
        ));
    }

    #[test]
    fn negative_and_oversized_lengths_are_errors() {
        // Content length of the logical message sits at offset 12 (tag, flags, lsn, "p\0").
        let mut v = hex(MESSAGE_TX).to_vec();
        v[12..16].copy_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(
            decode(&Bytes::from(v.clone())),
            Err(DecodeError::BadLength {
                tag: 'M',
                what: "content length",
                length: -1,
                offset: 12
            })
        );
        v[12..16].copy_from_slice(&i32::MAX.to_be_bytes());
        assert!(matches!(
            decode(&Bytes::from(v)),
            Err(DecodeError::Truncated { tag: 'M', .. })
        ));

        // Tuple column count at offset 6 of an Insert.
        let mut v = hex(INSERT_T1).to_vec();
        v[6..8].copy_from_slice(&(-2i16).to_be_bytes());
        assert!(matches!(
            decode(&Bytes::from(v)),
            Err(DecodeError::BadLength {
                what: "column count",
                length: -2,
                ..
            })
        ));

        // First value length of the Insert (after the 't' at offset 8).
        let mut v = hex(INSERT_T1).to_vec();
        v[9..13].copy_from_slice(&i32::MIN.to_be_bytes());
        assert!(matches!(
            decode(&Bytes::from(v)),
            Err(DecodeError::BadLength {
                what: "value length",
                ..
            })
        ));

        // Truncate relation count, negative and huge.
        let mut v = hex(TRUNCATE_T2).to_vec();
        v[1..5].copy_from_slice(&(-1i32).to_be_bytes());
        assert!(matches!(
            decode(&Bytes::from(v.clone())),
            Err(DecodeError::BadLength {
                what: "relation count",
                ..
            })
        ));
        v[1..5].copy_from_slice(&i32::MAX.to_be_bytes());
        assert!(matches!(
            decode(&Bytes::from(v)),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn unterminated_and_non_utf8_strings_are_errors() {
        assert!(matches!(
            decode(&Bytes::from_static(b"O\0\0\0\0\0\0\x12\x34orig")),
            Err(DecodeError::BadString {
                reason: "missing NUL terminator",
                ..
            })
        ));
        assert!(matches!(
            decode(&Bytes::from_static(b"O\0\0\0\0\0\0\x12\x34\xff\xfe\0")),
            Err(DecodeError::BadString {
                reason: "not valid UTF-8",
                ..
            })
        ));
    }

    #[test]
    fn decode_errors_are_permanent() {
        assert_eq!(DecodeError::Empty.class(), ErrorClass::Permanent);
        assert_eq!(DecodeError::UnknownTag(0).class(), ErrorClass::Permanent);
    }

    /// Test-only encoder: the inverse of [`decode`], used to check round trips.
    fn encode(msg: &Message) -> Vec<u8> {
        fn s(out: &mut Vec<u8>, v: &str) {
            out.extend_from_slice(v.as_bytes());
            out.push(0);
        }
        fn tuple(out: &mut Vec<u8>, t: &TupleData) {
            out.extend_from_slice(&(t.0.len() as i16).to_be_bytes());
            for v in &t.0 {
                match v {
                    ColumnValue::Null => out.push(b'n'),
                    ColumnValue::UnchangedToast => out.push(b'u'),
                    ColumnValue::Text(b) | ColumnValue::Binary(b) => {
                        out.push(if matches!(v, ColumnValue::Text(_)) {
                            b't'
                        } else {
                            b'b'
                        });
                        out.extend_from_slice(&(b.len() as i32).to_be_bytes());
                        out.extend_from_slice(b);
                    }
                }
            }
        }
        fn old(out: &mut Vec<u8>, o: &OldTuple) {
            let (k, t) = match o {
                OldTuple::Key(t) => (b'K', t),
                OldTuple::Full(t) => (b'O', t),
            };
            out.push(k);
            tuple(out, t);
        }
        let mut out = Vec::new();
        match msg {
            Message::Begin(b) => {
                out.push(b'B');
                out.extend_from_slice(&b.final_lsn.0.to_be_bytes());
                out.extend_from_slice(&b.commit_time.0.to_be_bytes());
                out.extend_from_slice(&b.xid.0.to_be_bytes());
            }
            Message::Commit(c) => {
                out.push(b'C');
                out.push(c.flags);
                out.extend_from_slice(&c.commit_lsn.0.to_be_bytes());
                out.extend_from_slice(&c.end_lsn.0.to_be_bytes());
                out.extend_from_slice(&c.commit_time.0.to_be_bytes());
            }
            Message::Origin { commit_lsn, name } => {
                out.push(b'O');
                out.extend_from_slice(&commit_lsn.0.to_be_bytes());
                s(&mut out, name);
            }
            Message::Relation(r) => {
                out.push(b'R');
                out.extend_from_slice(&r.oid.0.to_be_bytes());
                s(&mut out, &r.namespace);
                s(&mut out, &r.name);
                out.push(match r.replica_identity {
                    ReplicaIdentity::Default => b'd',
                    ReplicaIdentity::Nothing => b'n',
                    ReplicaIdentity::Full => b'f',
                    ReplicaIdentity::Index => b'i',
                });
                out.extend_from_slice(&(r.columns.len() as i16).to_be_bytes());
                for c in &r.columns {
                    out.push(u8::from(c.is_key));
                    s(&mut out, &c.name);
                    out.extend_from_slice(&c.type_oid.0.to_be_bytes());
                    out.extend_from_slice(&c.type_modifier.to_be_bytes());
                }
            }
            Message::Type {
                oid,
                namespace,
                name,
            } => {
                out.push(b'Y');
                out.extend_from_slice(&oid.0.to_be_bytes());
                s(&mut out, namespace);
                s(&mut out, name);
            }
            Message::Insert { relation, new } => {
                out.push(b'I');
                out.extend_from_slice(&relation.0.to_be_bytes());
                out.push(b'N');
                tuple(&mut out, new);
            }
            Message::Update {
                relation,
                old: o,
                new,
            } => {
                out.push(b'U');
                out.extend_from_slice(&relation.0.to_be_bytes());
                if let Some(o) = o {
                    old(&mut out, o);
                }
                out.push(b'N');
                tuple(&mut out, new);
            }
            Message::Delete { relation, old: o } => {
                out.push(b'D');
                out.extend_from_slice(&relation.0.to_be_bytes());
                old(&mut out, o);
            }
            Message::Truncate {
                cascade,
                restart_identity,
                relations,
            } => {
                out.push(b'T');
                out.extend_from_slice(&(relations.len() as i32).to_be_bytes());
                out.push(u8::from(*cascade) | u8::from(*restart_identity) << 1);
                for r in relations {
                    out.extend_from_slice(&r.0.to_be_bytes());
                }
            }
            Message::LogicalMessage {
                transactional,
                lsn,
                prefix,
                content,
            } => {
                out.push(b'M');
                out.push(u8::from(*transactional));
                out.extend_from_slice(&lsn.0.to_be_bytes());
                s(&mut out, prefix);
                out.extend_from_slice(&(content.len() as i32).to_be_bytes());
                out.extend_from_slice(content);
            }
        }
        out
    }

    #[test]
    fn test_encoder_reproduces_every_captured_message() {
        for msg in ALL {
            let data = hex(msg);
            assert_eq!(encode(&dec(msg)), data.to_vec(), "re-encoding {msg}");
        }
    }

    fn name() -> impl Strategy<Value = String> {
        "[^\u{0}]{0,6}"
    }

    fn payload() -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..8).prop_map(Bytes::from)
    }

    fn value() -> impl Strategy<Value = ColumnValue> {
        prop_oneof![
            Just(ColumnValue::Null),
            Just(ColumnValue::UnchangedToast),
            payload().prop_map(ColumnValue::Text),
            payload().prop_map(ColumnValue::Binary),
        ]
    }

    fn tuple_data() -> impl Strategy<Value = TupleData> {
        proptest::collection::vec(value(), 0..5).prop_map(TupleData)
    }

    fn old_tuple() -> impl Strategy<Value = OldTuple> {
        prop_oneof![
            tuple_data().prop_map(OldTuple::Key),
            tuple_data().prop_map(OldTuple::Full)
        ]
    }

    fn message() -> impl Strategy<Value = Message> {
        let column = (any::<bool>(), name(), any::<u32>(), any::<i32>()).prop_map(
            |(is_key, name, t, type_modifier)| Column {
                is_key,
                name,
                type_oid: Oid(t),
                type_modifier,
            },
        );
        let identity = prop_oneof![
            Just(ReplicaIdentity::Default),
            Just(ReplicaIdentity::Nothing),
            Just(ReplicaIdentity::Full),
            Just(ReplicaIdentity::Index),
        ];
        prop_oneof![
            (any::<u64>(), any::<i64>(), any::<u32>()).prop_map(|(l, t, x)| Message::Begin(
                Begin {
                    final_lsn: Lsn(l),
                    commit_time: PgTimestamp(t),
                    xid: Xid(x),
                }
            )),
            (any::<u8>(), any::<u64>(), any::<u64>(), any::<i64>()).prop_map(|(f, c, e, t)| {
                Message::Commit(Commit {
                    flags: f,
                    commit_lsn: Lsn(c),
                    end_lsn: Lsn(e),
                    commit_time: PgTimestamp(t),
                })
            }),
            (any::<u64>(), name()).prop_map(|(l, name)| Message::Origin {
                commit_lsn: Lsn(l),
                name
            }),
            (
                any::<u32>(),
                name(),
                name(),
                identity,
                proptest::collection::vec(column, 0..4)
            )
                .prop_map(|(o, namespace, name, replica_identity, columns)| {
                    Message::Relation(Relation {
                        oid: Oid(o),
                        namespace,
                        name,
                        replica_identity,
                        columns,
                    })
                }),
            (any::<u32>(), name(), name()).prop_map(|(o, namespace, name)| Message::Type {
                oid: Oid(o),
                namespace,
                name
            }),
            (any::<u32>(), tuple_data()).prop_map(|(o, new)| Message::Insert {
                relation: Oid(o),
                new
            }),
            (
                any::<u32>(),
                proptest::option::of(old_tuple()),
                tuple_data()
            )
                .prop_map(|(o, old, new)| Message::Update {
                    relation: Oid(o),
                    old,
                    new
                }),
            (any::<u32>(), old_tuple()).prop_map(|(o, old)| Message::Delete {
                relation: Oid(o),
                old
            }),
            (
                any::<bool>(),
                any::<bool>(),
                proptest::collection::vec(any::<u32>(), 0..4)
            )
                .prop_map(|(cascade, restart_identity, r)| Message::Truncate {
                    cascade,
                    restart_identity,
                    relations: r.into_iter().map(Oid).collect(),
                }),
            (any::<bool>(), any::<u64>(), name(), payload()).prop_map(
                |(transactional, l, prefix, content)| Message::LogicalMessage {
                    transactional,
                    lsn: Lsn(l),
                    prefix,
                    content,
                }
            ),
        ]
    }

    /// One edit applied to a valid message: overwrite, insert or remove a byte.
    #[derive(Debug, Clone)]
    enum Mutation {
        Set(usize, u8),
        Insert(usize, u8),
        Remove(usize),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
            (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
            any::<usize>().prop_map(Mutation::Remove),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&Bytes::from(data));
        }

        #[test]
        fn arbitrary_bytes_after_a_known_tag_never_panic(
            tag in proptest::sample::select(b"BCORYIUDTM".to_vec()),
            rest in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut data = vec![tag];
            data.extend(rest);
            let _ = decode(&Bytes::from(data));
        }

        #[test]
        fn mutated_captured_messages_never_panic(
            msg in proptest::sample::select(ALL.to_vec()),
            edits in proptest::collection::vec(mutation(), 1..4),
        ) {
            let mut v = hex(msg).to_vec();
            for edit in edits {
                match edit {
                    Mutation::Set(i, b) => {
                        let n = v.len();
                        if n > 0 {
                            v[i % n] = b;
                        }
                    }
                    Mutation::Insert(i, b) => {
                        let at = i % (v.len() + 1);
                        v.insert(at, b);
                    }
                    Mutation::Remove(i) => {
                        let n = v.len();
                        if n > 0 {
                            v.remove(i % n);
                        }
                    }
                }
            }
            let _ = decode(&Bytes::from(v));
        }

        #[test]
        fn encoded_messages_decode_to_themselves(msg in message()) {
            let data = Bytes::from(encode(&msg));
            prop_assert_eq!(decode(&data), Ok(msg));
        }
    }
}
