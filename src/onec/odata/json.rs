//! Reading 1C's OData JSON with every number literal kept as the text 1C wrote.
//!
//! See the module docs of `onec::odata` for why numbers are quoted before parsing. After
//! [`parse`], a JSON number `231.74` is the string `"231.74"`; [`decimal`] reads it exactly.

use chrono::{NaiveDate, NaiveDateTime};
use rust_decimal::Decimal;
use serde_json::{Map, Value};

use super::Failure;
use crate::core::money::parse_decimal;

/// A JSON object as OData answers it.
pub type Obj = Map<String, Value>;

/// The empty reference 1C writes for a reference field that points nowhere.
pub const EMPTY_GUID: &str = "00000000-0000-0000-0000-000000000000";

/// Rewrites every number literal outside strings into a string of the same characters.
/// Linear, allocation-bounded (the output is at most the input plus two quotes per number),
/// and safe on any input: malformed JSON stays malformed and fails in the parser.
pub fn quote_numbers(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len() + text.len() / 8);
    let mut copied = 0;
    let mut i = 0;
    let mut in_string = false;
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            match b {
                b'\\' => i += 2,
                b'"' => {
                    in_string = false;
                    i += 1;
                }
                _ => i += 1,
            }
            continue;
        }
        match b {
            b'"' => {
                in_string = true;
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < bytes.len() && matches!(bytes[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') {
                    i += 1;
                }
                // number characters are ASCII, so these are character boundaries
                out.push_str(&text[copied..start]);
                out.push('"');
                out.push_str(&text[start..i]);
                out.push('"');
                copied = i;
            }
            _ => i += 1,
        }
    }
    out.push_str(text.get(copied..).unwrap_or(""));
    out
}

/// Parses an OData JSON body; numbers arrive as strings of their literal text.
pub fn parse(text: &str) -> Result<Value, serde_json::Error> {
    serde_json::from_str(&quote_numbers(text))
}

/// How a body that does not parse failed: cut off (retriable) or malformed (permanent).
pub fn failure(e: &serde_json::Error) -> Failure {
    if e.is_eof() {
        Failure::Truncated(e.to_string())
    } else {
        Failure::BadJson(e.to_string())
    }
}

/// A field's text: a string, or a number's literal.
pub fn text<'a>(o: &'a Obj, field: &str) -> Option<&'a str> {
    o.get(field).and_then(Value::as_str)
}

/// A boolean field (`Posted`, `DeletionMark`, `IsFolder`).
pub fn flag(o: &Obj, field: &str) -> Option<bool> {
    match o.get(field)? {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    }
}

/// A reference field's GUID, or `None` for a missing or empty reference.
pub fn reference<'a>(o: &'a Obj, field: &str) -> Option<&'a str> {
    text(o, field)
        .map(str::trim)
        .filter(|s| !s.is_empty() && *s != EMPTY_GUID)
}

/// Reads a decimal literal exactly; exponents (`1E-5`) are accepted as 1C may write them.
pub fn decimal_text(t: &str) -> Result<Decimal, String> {
    let t = t.trim();
    if t.contains(['e', 'E']) {
        return Decimal::from_scientific(t).map_err(|_| format!("{t:?} is not a number"));
    }
    parse_decimal(t).map_err(|e| e.to_string())
}

/// A decimal field: `Ok(None)` when absent or null, an error naming the field otherwise.
pub fn decimal(o: &Obj, field: &str) -> Result<Option<Decimal>, String> {
    match o.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => decimal_text(s).map(Some).map_err(|e| format!("{field}: {e}")),
        Some(other) => Err(format!("{field}: {other} is not a number")),
    }
}

/// A 1C date (`2016-12-26T17:08:57`, the base's wall clock, no zone). The empty date
/// `0001-01-01T00:00:00` is `None`.
pub fn local_time(text: &str) -> Result<Option<NaiveDateTime>, String> {
    let t = text.trim();
    let parsed = NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S")
        .or_else(|_| NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S%.f"))
        .or_else(|_| NaiveDate::parse_from_str(t, "%Y-%m-%d").map(|d| d.and_time(chrono::NaiveTime::MIN)))
        .map_err(|_| format!("{t:?} is not a 1C date"))?;
    Ok((parsed.and_utc().timestamp() > EMPTY_DATE_SECONDS).then_some(parsed))
}

/// `0001-01-01T00:00:00` as Unix seconds: 1C's "no date".
const EMPTY_DATE_SECONDS: i64 = -62_135_596_800;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::money::Money;

    fn kopecks(body: &str, field: &str) -> i64 {
        let v = parse(body).unwrap_or_else(|e| panic!("{e}: {body}"));
        let o = v.as_object().expect("an object");
        let d = decimal(o, field).expect("a number").expect("present");
        Money::from_rubles(d).expect("in range").0
    }

    #[test]
    fn number_literals_arrive_exact() {
        assert_eq!(kopecks(r#"{"Сумма": 231.74}"#, "Сумма"), 23174);
        assert_eq!(kopecks(r#"{"Сумма":0.1}"#, "Сумма"), 10);
        assert_eq!(kopecks(r#"{"n":[1, -2e1], "Сумма":-0.30}"#, "Сумма"), -30);
        assert_eq!(kopecks(r#"{"Сумма": 1E2}"#, "Сумма"), 10000);
        let v = parse(r#"{"q": 1.2345, "s": "x 1.5 \" 2", "b": true, "n": null, "i": "7"}"#).expect("parses");
        let o = v.as_object().expect("object");
        assert_eq!(decimal(o, "q"), Ok(Some(Decimal::new(12345, 4))));
        assert_eq!(text(o, "s"), Some("x 1.5 \" 2"));
        assert_eq!(flag(o, "b"), Some(true));
        assert_eq!(decimal(o, "n"), Ok(None));
        assert_eq!(decimal(o, "i"), Ok(Some(Decimal::from(7))));
        assert!(decimal(o, "b").is_err());
    }

    #[test]
    fn sums_of_tenths_stay_exact() {
        // 0.1 + 0.2 is 0.30000000000000004 in f64; here it is 30 kopecks.
        let v = parse(r#"{"value":[{"Сумма":0.1},{"Сумма":0.2}]}"#).expect("parses");
        let total: i64 = v["value"]
            .as_array()
            .expect("rows")
            .iter()
            .map(|r| {
                Money::from_rubles(
                    decimal(r.as_object().expect("row"), "Сумма")
                        .expect("n")
                        .expect("n"),
                )
                .expect("in range")
                .0
            })
            .sum();
        assert_eq!(total, 30);
    }

    #[test]
    fn cut_and_malformed_bodies_are_told_apart() {
        let cut = parse(r#"{"value":[{"Ref_Key":"1","Сумма":12"#).expect_err("cut off");
        assert!(matches!(failure(&cut), Failure::Truncated(_)));
        let bad = parse(r#"{"value":]"#).expect_err("malformed");
        assert!(matches!(failure(&bad), Failure::BadJson(_)));
        assert!(parse("<html>").is_err());
        // never panics on odd input
        for s in ["\"", "\\", "-", "\"\\", "{\"a\":-}", "1.2.3", "\u{0}", "[\"\\u12"] {
            let _ = parse(s);
        }
    }

    #[test]
    fn quoting_never_panics_and_keeps_valid_json_valid() {
        let alphabet: Vec<char> = "{}[]\":,-+.eE0123456789 \\nrtuфЖ€😀ab".chars().collect();
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let len = rng.usize(0..40);
            let s: String = (0..len).map(|_| alphabet[rng.usize(0..alphabet.len())]).collect();
            let quoted = quote_numbers(&s);
            if serde_json::from_str::<Value>(&s).is_ok() {
                assert!(
                    serde_json::from_str::<Value>(&quoted).is_ok(),
                    "{s:?} → {quoted:?}"
                );
            }
        }
    }

    #[test]
    fn dates_are_naive_and_the_empty_date_is_none() {
        let t = local_time("2016-12-26T17:08:57")
            .expect("a date")
            .expect("not empty");
        assert_eq!(t.to_string(), "2016-12-26 17:08:57");
        assert_eq!(local_time("0001-01-01T00:00:00"), Ok(None));
        assert!(local_time("26.12.2016").is_err());
        let o: Obj =
            serde_json::from_str(r#"{"a":"00000000-0000-0000-0000-000000000000","b":" "}"#).expect("json");
        assert_eq!(reference(&o, "a"), None);
        assert_eq!(reference(&o, "b"), None);
    }
}
