//! PostgreSQL text output → JSON, by type oid.
//!
//! pgoutput sends every value in its type's text output form. Listeners want JSON types
//! (numbers, booleans, embedded JSON, arrays), so well-known built-in types are converted;
//! everything else, and any text that does not look the way the type prints, stays a string.
//! Timestamps assume `DateStyle = ISO` and bytea either output format.

use base64::prelude::*;
use serde_json::{Number, Value};

use crate::types::Oid;

const BOOL: u32 = 16;
const BYTEA: u32 = 17;
const INT8: u32 = 20;
const INT2: u32 = 21;
const INT4: u32 = 23;
const OID: u32 = 26;
const JSON: u32 = 114;
const FLOAT4: u32 = 700;
const FLOAT8: u32 = 701;
const TIMESTAMP: u32 = 1114;
const TIMESTAMPTZ: u32 = 1184;
const JSONB: u32 = 3802;

/// PostgreSQL's MAXDIM: deeper nesting is not an array PostgreSQL printed.
const MAX_ARRAY_DEPTH: usize = 6;

/// Converts a value in PostgreSQL text output form to JSON according to its type.
pub(crate) fn text_to_json(type_oid: Oid, text: &str) -> Value {
    let string = || Value::String(text.to_owned());
    match type_oid.0 {
        INT2 | INT4 | INT8 => text.parse::<i64>().map_or_else(|_| string(), Value::from),
        OID => text.parse::<u32>().map_or_else(|_| string(), Value::from),
        FLOAT4 | FLOAT8 => float(text).unwrap_or_else(string),
        BOOL => match text {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => string(),
        },
        // serde_json bounds nesting depth itself, so hostile input cannot overflow the stack.
        JSON | JSONB => serde_json::from_str(text).unwrap_or_else(|_| string()),
        TIMESTAMPTZ => timestamptz(text).map_or_else(string, Value::String),
        TIMESTAMP => timestamp(text).map_or_else(string, Value::String),
        BYTEA => bytea(text).map_or_else(string, |b| Value::String(BASE64_STANDARD.encode(b))),
        other => match array_element(other) {
            Some((elem, delim)) => parse_array(text, Oid(elem), delim).unwrap_or_else(string),
            None => string(),
        },
    }
}

/// The element type and delimiter of a built-in array type.
fn array_element(array_oid: u32) -> Option<(u32, u8)> {
    let elem = match array_oid {
        1000 => BOOL,
        1001 => BYTEA,
        1002 => 18, // char
        1003 => 19, // name
        1005 => INT2,
        1007 => INT4,
        1009 => 25,   // text
        1014 => 1042, // bpchar
        1015 => 1043, // varchar
        1016 => INT8,
        1020 => return Some((603, b';')), // box[] is the one built-in array not split by ','
        1021 => FLOAT4,
        1022 => FLOAT8,
        1028 => OID,
        1040 => 829, // macaddr
        1041 => 869, // inet
        651 => 650,  // cidr
        1115 => TIMESTAMP,
        1182 => 1082, // date
        1183 => 1083, // time
        1185 => TIMESTAMPTZ,
        1187 => 1186, // interval
        1231 => 1700, // numeric
        1270 => 1266, // timetz
        143 => 142,   // xml
        199 => JSON,
        791 => 790,   // money
        2951 => 2950, // uuid
        3807 => JSONB,
        _ => return None,
    };
    Some((elem, b','))
}

fn float(text: &str) -> Option<Value> {
    // Rust's parser also accepts "inf"/"nan"; from_f64 rejects non-finite values, so NaN and
    // ±Infinity fall back to their PostgreSQL spelling as strings.
    let f = text.parse::<f64>().ok()?;
    Number::from_f64(f).map(Value::Number)
}

/// `2024-01-02 03:04:05.123456` → `2024-01-02T03:04:05.123456`.
fn timestamp(text: &str) -> Option<String> {
    let (date, time) = text.split_once(' ')?;
    check_date(date)?;
    check_time(time)?;
    Some(format!("{date}T{time}"))
}

/// `2024-01-02 03:04:05.123456+05:30` → `2024-01-02T03:04:05.123456+05:30`.
fn timestamptz(text: &str) -> Option<String> {
    let (date, rest) = text.split_once(' ')?;
    let (y, mo, d) = check_date(date)?;
    // The offset sign is the first '+' or '-' after the time; the time itself has neither.
    let sign_at = rest.find(['+', '-'])?;
    let (time, offset) = rest.split_at(sign_at);
    let (h, mi, s) = check_time(time)?;
    let negative = offset.starts_with('-');
    let mut parts = offset.get(1..)?.split(':');
    let oh = two_digits(parts.next()?, 15)?;
    let om = parts.next().map_or(Some(0), |p| two_digits(p, 59))?;
    let os = parts.next().map_or(Some(0), |p| two_digits(p, 59))?;
    if parts.next().is_some() {
        return None;
    }
    let sign = if negative { '-' } else { '+' };
    if os == 0 {
        return Some(format!("{date}T{time}{sign}{oh:02}:{om:02}"));
    }
    // RFC 3339 offsets have no seconds (historic local mean times do): normalise to UTC.
    let fraction = time.get(8..).unwrap_or("");
    let offset_secs = i64::from(oh * 3600 + om * 60 + os) * if negative { -1 } else { 1 };
    let local = days_from_civil(y, mo, d) * 86_400 + i64::from(h * 3600 + mi * 60 + s);
    let utc = local - offset_secs;
    let (uy, umo, ud) = civil_from_days(utc.div_euclid(86_400));
    if !(1..=9999).contains(&uy) {
        return None;
    }
    let secs = utc.rem_euclid(86_400);
    Some(format!(
        "{uy:04}-{umo:02}-{ud:02}T{:02}:{:02}:{:02}{fraction}+00:00",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    ))
}

/// Checks `YYYY-MM-DD` (four-digit years only: RFC 3339 cannot express others).
fn check_date(date: &str) -> Option<(i64, u32, u32)> {
    let b = date.as_bytes();
    if b.len() != 10 || b.get(4) != Some(&b'-') || b.get(7) != Some(&b'-') {
        return None;
    }
    let y = digits(date.get(0..4)?)?;
    let m = two_digits(date.get(5..7)?, 12)?;
    let d = two_digits(date.get(8..10)?, 31)?;
    if y == 0 || m == 0 || d == 0 {
        return None;
    }
    Some((i64::from(y), m, d))
}

/// Checks `HH:MM:SS` with an optional fraction of 1 to 6 digits.
fn check_time(time: &str) -> Option<(u32, u32, u32)> {
    let b = time.as_bytes();
    if b.len() < 8 || b.get(2) != Some(&b':') || b.get(5) != Some(&b':') {
        return None;
    }
    let h = two_digits(time.get(0..2)?, 23)?;
    let m = two_digits(time.get(3..5)?, 59)?;
    let s = two_digits(time.get(6..8)?, 59)?;
    let fraction = time.get(8..)?;
    if !fraction.is_empty() {
        let f = fraction.strip_prefix('.')?;
        if f.is_empty() || f.len() > 6 || !f.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
    }
    Some((h, m, s))
}

fn two_digits(s: &str, max: u32) -> Option<u32> {
    if s.len() != 2 {
        return None;
    }
    digits(s).filter(|v| *v <= max)
}

fn digits(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of [`days_from_civil`].
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    // d is 1..=31 and m 1..=12 by construction.
    (
        y,
        u32::try_from(m).unwrap_or(1),
        u32::try_from(d).unwrap_or(1),
    )
}

/// Decodes bytea text: hex (`\x0102`, the default) or the legacy escape format.
fn bytea(text: &str) -> Option<Vec<u8>> {
    if let Some(hex) = text.strip_prefix("\\x") {
        let b = hex.as_bytes();
        if b.len() % 2 != 0 {
            return None;
        }
        return b
            .chunks_exact(2)
            .map(|pair| Some(hex_value(pair[0])? << 4 | hex_value(pair[1])?))
            .collect();
    }
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c != b'\\' {
            out.push(c);
            i += 1;
        } else if b.get(i + 1) == Some(&b'\\') {
            out.push(b'\\');
            i += 2;
        } else {
            let oct = b.get(i + 1..i + 4)?;
            if !oct.iter().all(|d| (b'0'..=b'7').contains(d)) || oct[0] > b'3' {
                return None;
            }
            out.push((oct[0] - b'0') << 6 | (oct[1] - b'0') << 3 | (oct[2] - b'0'));
            i += 4;
        }
    }
    Some(out)
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Parses an array literal such as `{1,2}`, `{{"a b",NULL},{c,"NULL"}}` or `[0:1]={1,2}`;
/// `None` when the text is not one.
fn parse_array(text: &str, elem: Oid, delim: u8) -> Option<Value> {
    let mut body = text.trim_start();
    if body.starts_with('[') {
        // Non-default lower bounds: JSON arrays have none, so the decoration is dropped.
        let (dims, rest) = body.split_once('=')?;
        if !dims.trim_end().ends_with(']') {
            return None;
        }
        body = rest;
    }
    let mut parser = ArrayParser {
        b: body.as_bytes(),
        pos: 0,
        elem,
        delim,
    };
    let value = parser.array(1)?;
    parser.skip_ws();
    (parser.pos == parser.b.len()).then_some(value)
}

struct ArrayParser<'a> {
    b: &'a [u8],
    pos: usize,
    elem: Oid,
    delim: u8,
}

impl ArrayParser<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            self.pos += 1;
        }
    }

    fn array(&mut self, depth: usize) -> Option<Value> {
        if depth > MAX_ARRAY_DEPTH {
            return None;
        }
        self.skip_ws();
        if self.peek()? != b'{' {
            return None;
        }
        self.pos += 1;
        self.skip_ws();
        let mut items = Vec::new();
        if self.peek()? == b'}' {
            self.pos += 1;
            return Some(Value::Array(items));
        }
        loop {
            self.skip_ws();
            let item = match self.peek()? {
                b'{' => self.array(depth + 1)?,
                b'"' => {
                    let text = self.quoted()?;
                    text_to_json(self.elem, &text)
                }
                _ => self.unquoted()?,
            };
            items.push(item);
            self.skip_ws();
            match self.peek()? {
                b'}' => {
                    self.pos += 1;
                    return Some(Value::Array(items));
                }
                c if c == self.delim => self.pos += 1,
                _ => return None,
            }
        }
    }

    /// A double-quoted element; backslash escapes the next byte.
    fn quoted(&mut self) -> Option<String> {
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            let c = self.peek()?;
            self.pos += 1;
            match c {
                b'"' => return String::from_utf8(out).ok(),
                b'\\' => {
                    out.push(self.peek()?);
                    self.pos += 1;
                }
                _ => out.push(c),
            }
        }
    }

    /// An unquoted element up to the delimiter or `}`; the bare word NULL is SQL NULL.
    fn unquoted(&mut self) -> Option<Value> {
        let mut out = Vec::new();
        let mut escaped = false;
        // Trailing unescaped whitespace is not part of the element, as in PostgreSQL.
        let mut keep = 0;
        loop {
            let c = self.peek()?;
            if c == self.delim || c == b'}' {
                break;
            }
            if matches!(c, b'{' | b'"') {
                return None;
            }
            self.pos += 1;
            if c == b'\\' {
                out.push(self.peek()?);
                self.pos += 1;
                escaped = true;
                keep = out.len();
            } else {
                out.push(c);
                if !c.is_ascii_whitespace() {
                    keep = out.len();
                }
            }
        }
        out.truncate(keep);
        if out.is_empty() {
            return None;
        }
        let text = String::from_utf8(out).ok()?;
        if !escaped && text.eq_ignore_ascii_case("NULL") {
            return Some(Value::Null);
        }
        Some(text_to_json(self.elem, &text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn conv(oid: u32, text: &str) -> Value {
        text_to_json(Oid(oid), text)
    }

    #[test]
    fn integers_become_numbers_and_int8_keeps_full_range() {
        assert_eq!(conv(INT2, "-32768"), json!(-32768));
        assert_eq!(conv(INT4, "42"), json!(42));
        assert_eq!(conv(INT8, "9223372036854775807"), json!(i64::MAX));
        assert_eq!(conv(INT8, "-9223372036854775808"), json!(i64::MIN));
        assert_eq!(conv(OID, "4294967295"), json!(4_294_967_295u32));
    }

    #[test]
    fn malformed_integers_stay_strings() {
        assert_eq!(conv(INT4, "12a"), json!("12a"));
        assert_eq!(
            conv(INT8, "99999999999999999999"),
            json!("99999999999999999999")
        );
        assert_eq!(conv(OID, "-1"), json!("-1"));
        assert_eq!(conv(INT4, ""), json!(""));
    }

    #[test]
    fn floats_become_numbers_and_special_values_strings() {
        assert_eq!(conv(FLOAT8, "1.5"), json!(1.5));
        assert_eq!(conv(FLOAT4, "-0.25"), json!(-0.25));
        assert_eq!(conv(FLOAT8, "1e+300"), json!(1e300));
        assert_eq!(conv(FLOAT8, "NaN"), json!("NaN"));
        assert_eq!(conv(FLOAT8, "Infinity"), json!("Infinity"));
        assert_eq!(conv(FLOAT4, "-Infinity"), json!("-Infinity"));
        assert_eq!(conv(FLOAT8, "abc"), json!("abc"));
    }

    #[test]
    fn numeric_stays_a_string_without_precision_loss() {
        assert_eq!(
            conv(1700, "12345678901234567890.123456789"),
            json!("12345678901234567890.123456789")
        );
        assert_eq!(conv(1700, "NaN"), json!("NaN"));
    }

    #[test]
    fn booleans_become_true_false() {
        assert_eq!(conv(BOOL, "t"), json!(true));
        assert_eq!(conv(BOOL, "f"), json!(false));
        assert_eq!(conv(BOOL, "yes"), json!("yes"));
    }

    #[test]
    fn json_and_jsonb_are_embedded_and_bad_json_stays_text() {
        assert_eq!(conv(JSONB, r#"{"a": [1, null]}"#), json!({"a": [1, null]}));
        assert_eq!(conv(JSON, "\"s\""), json!("s"));
        assert_eq!(conv(JSON, "{bad"), json!("{bad"));
        let deep = "[".repeat(10_000);
        assert_eq!(conv(JSON, &deep), Value::String(deep.clone()));
    }

    #[test]
    fn timestamptz_becomes_rfc3339() {
        assert_eq!(
            conv(TIMESTAMPTZ, "2024-01-02 03:04:05.123456+05:30"),
            json!("2024-01-02T03:04:05.123456+05:30")
        );
        assert_eq!(
            conv(TIMESTAMPTZ, "2024-01-02 03:04:05+00"),
            json!("2024-01-02T03:04:05+00:00")
        );
        assert_eq!(
            conv(TIMESTAMPTZ, "2024-01-02 03:04:05.5-08"),
            json!("2024-01-02T03:04:05.5-08:00")
        );
    }

    #[test]
    fn timestamptz_with_seconds_in_offset_is_normalised_to_utc() {
        // Amsterdam local mean time before 1937: +00:19:32.
        assert_eq!(
            conv(TIMESTAMPTZ, "1900-01-01 00:10:00+00:19:32"),
            json!("1899-12-31T23:50:28+00:00")
        );
        assert_eq!(
            conv(TIMESTAMPTZ, "2000-02-28 23:59:59.25-00:00:02"),
            json!("2000-02-29T00:00:01.25+00:00")
        );
    }

    #[test]
    fn timestamptz_special_and_unrepresentable_values_stay_strings() {
        for text in [
            "infinity",
            "-infinity",
            "0044-03-15 12:00:00+00 BC",
            "10000-01-01 00:00:00+00",
            "Tue Jan 02 03:04:05 2024 PST",
            "2024-13-02 03:04:05+00",
            "2024-01-02 03:04:05",
            "2024-01-02 03:04:05+",
        ] {
            assert_eq!(conv(TIMESTAMPTZ, text), json!(text), "{text}");
        }
    }

    #[test]
    fn timestamp_without_zone_has_no_offset() {
        assert_eq!(
            conv(TIMESTAMP, "2024-01-02 03:04:05.123456"),
            json!("2024-01-02T03:04:05.123456")
        );
        assert_eq!(conv(TIMESTAMP, "infinity"), json!("infinity"));
        assert_eq!(
            conv(TIMESTAMP, "2024-01-02 03:04:05+00"),
            json!("2024-01-02 03:04:05+00")
        );
    }

    #[test]
    fn dates_uuids_text_and_unknown_types_are_strings() {
        assert_eq!(conv(1082, "2024-01-02"), json!("2024-01-02"));
        assert_eq!(
            conv(2950, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
        );
        assert_eq!(conv(25, "hello"), json!("hello"));
        assert_eq!(conv(1043, "42"), json!("42"));
        assert_eq!(conv(999_999, "{1,2}"), json!("{1,2}"));
    }

    #[test]
    fn bytea_hex_and_escape_forms_become_base64() {
        assert_eq!(conv(BYTEA, "\\x"), json!(""));
        assert_eq!(conv(BYTEA, "\\xdeadBEEF"), json!("3q2+7w=="));
        assert_eq!(
            conv(BYTEA, "ab\\\\\\001"),
            json!(BASE64_STANDARD.encode(b"ab\\\x01"))
        );
        assert_eq!(conv(BYTEA, "\\xabc"), json!("\\xabc"));
        assert_eq!(conv(BYTEA, "\\xzz"), json!("\\xzz"));
        assert_eq!(conv(BYTEA, "\\9"), json!("\\9"));
    }

    #[test]
    fn arrays_convert_elements_by_element_type() {
        assert_eq!(conv(1007, "{1,2,3}"), json!([1, 2, 3]));
        assert_eq!(conv(1016, "{-9223372036854775808}"), json!([i64::MIN]));
        assert_eq!(conv(1000, "{t,f,NULL}"), json!([true, false, null]));
        assert_eq!(
            conv(1022, "{1.5,NaN,-Infinity}"),
            json!([1.5, "NaN", "-Infinity"])
        );
        assert_eq!(conv(1231, "{1.10,NaN}"), json!(["1.10", "NaN"]));
        assert_eq!(conv(1009, "{}"), json!([]));
        assert_eq!(
            conv(1185, r#"{"2024-01-02 03:04:05+00",NULL}"#),
            json!(["2024-01-02T03:04:05+00:00", null])
        );
        assert_eq!(
            conv(3807, r#"{"{\"a\": 1}","[1, 2]"}"#),
            json!([{"a": 1}, [1, 2]])
        );
        assert_eq!(conv(1001, r#"{"\\x0102"}"#), json!(["AQI="]));
        assert_eq!(
            conv(1020, "{(1,1),(0,0);(2,2),(1,1)}"),
            json!(["(1,1),(0,0)", "(2,2),(1,1)"])
        );
    }

    #[test]
    fn array_quoting_escapes_and_null_are_honoured() {
        assert_eq!(
            conv(1009, r#"{"a b","c\"d","e\\f",NULL,"NULL",null, x y ,""}"#),
            json!(["a b", "c\"d", "e\\f", null, "NULL", null, "x y", ""])
        );
        assert_eq!(conv(1015, r#"{"a,b","{c}"}"#), json!(["a,b", "{c}"]));
        assert_eq!(conv(1009, r"{N\ULL}"), json!(["NULL"]));
        assert_eq!(conv(1009, r#"{"ü",ß}"#), json!(["ü", "ß"]));
    }

    #[test]
    fn nested_arrays_and_dimension_prefix_are_parsed() {
        assert_eq!(conv(1007, "{{1,2},{3,4}}"), json!([[1, 2], [3, 4]]));
        assert_eq!(conv(1007, "[1:2]={5,6}"), json!([5, 6]));
        assert_eq!(
            conv(1007, "[0:1][1:2]={{1,2},{3,4}}"),
            json!([[1, 2], [3, 4]])
        );
        assert_eq!(conv(1009, "{ { a } , { b } }"), json!([["a"], ["b"]]));
    }

    #[test]
    fn malformed_arrays_stay_strings() {
        for text in [
            "",
            "{",
            "}",
            "{1,",
            "{1,}",
            "{,1}",
            "{1}}",
            "{1} x",
            "{\"a}",
            "{a\"b}",
            "[1:2]{1}",
            "1,2",
            "{{{{{{{1}}}}}}}",
            "{a\\",
        ] {
            assert_eq!(conv(1007, text), json!(text), "{text}");
        }
        assert_eq!(conv(1007, "{{{{{{1}}}}}}"), json!([[[[[[1]]]]]]));
    }

    #[test]
    fn civil_date_conversion_round_trips() {
        for days in [-800_000i64, -1, 0, 1, 10_957, 11_016, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    }

    const OIDS: &[u32] = &[
        BOOL,
        BYTEA,
        INT8,
        INT2,
        INT4,
        OID,
        JSON,
        FLOAT4,
        FLOAT8,
        TIMESTAMP,
        TIMESTAMPTZ,
        JSONB,
        1700,
        1000,
        1001,
        1007,
        1009,
        1020,
        1185,
        1231,
        3807,
        199,
        25,
    ];

    proptest! {
        #[test]
        fn arbitrary_text_with_any_oid_never_panics(oid in any::<u32>(), text in ".*") {
            let _ = text_to_json(Oid(oid), &text);
        }

        #[test]
        fn array_like_text_never_panics(
            oid in proptest::sample::select(OIDS),
            text in r#"(\[[0-9:]*\]=)?[{}",;\\ NULtf0-9:x.+-]{0,40}"#,
        ) {
            let _ = text_to_json(Oid(oid), &text);
        }
    }
}
