//! Recipient lists: CSV (header row; `to`, optional `timezone`, every other column a
//! variable; BOM, CRLF, quoted fields with commas and newlines) or JSON. Rows are checked one
//! by one (errors carry the CSV line number, header = 1); the header and the template
//! variables are checked first, so a bad request stores nothing.

use std::collections::BTreeSet;

use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::domain::Invalid;
use crate::domain::phone::E164;
use crate::store::campaigns::NewRecipient;

/// A row that was not accepted.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Rejected {
    pub row: u64,
    pub to: String,
    pub error: String,
}

/// Checks one recipient; `Err` is the reason it is rejected.
fn check(to: &str, timezone: Option<&str>) -> Result<(), String> {
    E164::parse(to).map_err(|e| e.to_string())?;
    if let Some(tz) = timezone
        && tz.parse::<Tz>().is_err()
    {
        return Err(format!(
            "unknown time zone {tz:?} (use an IANA name such as America/Chicago)"
        ));
    }
    Ok(())
}

fn missing_var(needed: &BTreeSet<String>, provided: impl Fn(&str) -> bool) -> Result<(), Invalid> {
    for v in needed {
        if v != "to" && !provided(v) {
            return Err(Invalid::new(
                "recipients",
                format!("template variable {{{{{v}}}}} is not provided by any column"),
            ));
        }
    }
    Ok(())
}

/// Reads CSV rows, handing accepted ones to `sink` in batches of `batch`. Header problems and
/// template variables no column provides are errors before `sink` is ever called.
pub fn csv(
    body: &[u8],
    needed: &BTreeSet<String>,
    batch: usize,
    mut sink: impl FnMut(Vec<NewRecipient>) -> Result<(), crate::store::StoreError>,
) -> Result<Result<Vec<Rejected>, crate::store::StoreError>, Invalid> {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(Invalid::new("recipients", "the file is empty"));
    }
    let mut rd = ::csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(body);
    let header = rd
        .byte_headers()
        .map_err(|e| Invalid::new("recipients", format!("cannot read the header row: {e}")))?
        .clone();
    let names: Vec<String> = header
        .iter()
        .map(|h| String::from_utf8_lossy(h).trim().to_owned())
        .collect();
    let Some(to_col) = names.iter().position(|n| n == "to") else {
        return Err(Invalid::new(
            "recipients",
            "the header row has no \"to\" column",
        ));
    };
    let tz_col = names.iter().position(|n| n == "timezone");
    missing_var(needed, |v| names.iter().any(|n| n == v))?;
    let mut rejected = Vec::new();
    let mut pending = Vec::with_capacity(batch);
    let mut rec = ::csv::ByteRecord::new();
    // Line numbers are counted here from byte offsets: a quoted newline starts a new line.
    let (mut seen_byte, mut seen_line) = (0usize, 1u64);
    let mut line_at = |byte: u64| {
        // The csv crate's offset can sit on the terminator before the record.
        let mut byte = (byte as usize).min(body.len());
        while byte < body.len() && (body[byte] == b'\r' || body[byte] == b'\n') {
            byte += 1;
        }
        if byte > seen_byte {
            seen_line += body[seen_byte..byte]
                .iter()
                .filter(|&&b| b == b'\n')
                .count() as u64;
            seen_byte = byte;
        }
        seen_line
    };
    loop {
        match rd.read_byte_record(&mut rec) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                let row = e.position().map(|p| line_at(p.byte())).unwrap_or(0);
                rejected.push(Rejected {
                    row,
                    to: String::new(),
                    error: format!("unreadable row: {e}"),
                });
                continue;
            }
        }
        let row = rec.position().map(|p| line_at(p.byte())).unwrap_or(0);
        let field = |i: usize| rec.get(i).map(|f| std::str::from_utf8(f).map(str::trim));
        let to = match field(to_col) {
            Some(Ok(t)) => t.to_owned(),
            Some(Err(_)) => {
                rejected.push(Rejected {
                    row,
                    to: String::new(),
                    error: "not valid UTF-8".into(),
                });
                continue;
            }
            None => String::new(),
        };
        if rec
            .iter()
            .all(|f| f.iter().all(|b| b.is_ascii_whitespace()))
        {
            continue;
        }
        let mut vars = Map::new();
        let mut bad_utf8 = false;
        for (i, name) in names.iter().enumerate() {
            if i == to_col || Some(i) == tz_col {
                continue;
            }
            match field(i) {
                Some(Ok(v)) => {
                    vars.insert(name.clone(), Value::String(v.to_owned()));
                }
                Some(Err(_)) => bad_utf8 = true,
                None => {}
            }
        }
        let timezone = match tz_col.map(field) {
            Some(Some(Ok(t))) if !t.is_empty() => Some(t.to_owned()),
            Some(Some(Err(_))) => {
                bad_utf8 = true;
                None
            }
            _ => None,
        };
        if bad_utf8 {
            rejected.push(Rejected {
                row,
                to,
                error: "not valid UTF-8".into(),
            });
            continue;
        }
        if let Err(error) = check(&to, timezone.as_deref()) {
            rejected.push(Rejected { row, to, error });
            continue;
        }
        pending.push(NewRecipient {
            to,
            timezone,
            vars: Value::Object(vars).to_string(),
            metadata: "{}".into(),
        });
        if pending.len() >= batch
            && let Err(e) = sink(std::mem::replace(&mut pending, Vec::with_capacity(batch)))
        {
            return Ok(Err(e));
        }
    }
    if !pending.is_empty()
        && let Err(e) = sink(pending)
    {
        return Ok(Err(e));
    }
    Ok(Ok(rejected))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonBody {
    recipients: Vec<JsonRecipient>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRecipient {
    to: String,
    #[serde(default)]
    timezone: Option<String>,
    #[serde(default)]
    vars: Map<String, Value>,
    #[serde(default)]
    metadata: Map<String, Value>,
}

/// Reads `{"recipients": [...]}`. Rows are numbered from 1 in list order.
pub fn json(
    body: &[u8],
    needed: &BTreeSet<String>,
) -> Result<(Vec<NewRecipient>, Vec<Rejected>), Invalid> {
    let parsed: JsonBody = serde_json::from_slice(body)
        .map_err(|e| Invalid::new("recipients", format!("invalid JSON: {e}")))?;
    if parsed.recipients.is_empty() {
        return Err(Invalid::new("recipients", "the list is empty"));
    }
    for r in &parsed.recipients {
        missing_var(needed, |v| r.vars.contains_key(v))?;
    }
    let mut ok = Vec::with_capacity(parsed.recipients.len());
    let mut rejected = Vec::new();
    for (i, r) in parsed.recipients.into_iter().enumerate() {
        let timezone = r.timezone.filter(|t| !t.is_empty());
        if let Err(error) = check(&r.to, timezone.as_deref()) {
            rejected.push(Rejected {
                row: i as u64 + 1,
                to: r.to,
                error,
            });
            continue;
        }
        ok.push(NewRecipient {
            to: r.to,
            timezone,
            vars: Value::Object(r.vars).to_string(),
            metadata: Value::Object(r.metadata).to_string(),
        });
    }
    Ok((ok, rejected))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(body: &[u8], needed: &[&str]) -> Result<(Vec<NewRecipient>, Vec<Rejected>), Invalid> {
        let needed = needed.iter().map(|s| s.to_string()).collect();
        let mut all = Vec::new();
        let rej = csv(body, &needed, 2, |b| {
            all.extend(b);
            Ok(())
        })?
        .unwrap();
        Ok((all, rej))
    }

    #[test]
    fn bom_crlf_quotes_and_line_numbers() {
        let body = b"\xEF\xBB\xBFto,name,timezone\r\n+14155550100,\"Smith, Ann\",\r\n+14155550101,\"two\nlines\",Europe/Berlin\r\nbad,x,\r\n+14155550102,y,Mars/Base\r\n";
        let (ok, rej) = run(body, &["name"]).unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[0].vars, r#"{"name":"Smith, Ann"}"#);
        assert_eq!(ok[1].timezone.as_deref(), Some("Europe/Berlin"));
        assert_eq!(rej.len(), 2);
        // The quoted newline makes the third record start on line 5.
        assert_eq!((rej[0].row, rej[0].to.as_str()), (5, "bad"));
        assert_eq!(rej[1].row, 6);
        assert!(rej[1].error.contains("unknown time zone"));
    }

    #[test]
    fn invalid_utf8_rows_are_rejected_alone() {
        let body = b"to,name\n+14155550100,ok\n+14155550101,\xff\xfe\n";
        let (ok, rej) = run(body, &[]).unwrap();
        assert_eq!(ok.len(), 1);
        assert_eq!(rej[0].row, 3);
        assert!(rej[0].error.contains("UTF-8"));
    }

    #[test]
    fn header_and_variable_problems_refuse_everything() {
        assert!(run(b"", &[]).unwrap_err().message.contains("empty"));
        assert!(
            run(b"number,name\n+1415", &[])
                .unwrap_err()
                .message
                .contains("\"to\"")
        );
        let e = run(b"to,name\n+14155550100,a\n", &["plan"]).unwrap_err();
        assert!(e.message.contains("{{plan}}"), "{}", e.message);
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    fn read(body: &[u8]) -> Result<(Vec<NewRecipient>, Vec<Rejected>), Invalid> {
        let mut all = Vec::new();
        let rej = csv(body, &BTreeSet::new(), 3, |b| {
            all.extend(b);
            Ok(())
        })?
        .map_err(|e| Invalid::new("store", e.to_string()))?;
        Ok((all, rej))
    }

    /// One data row: a good or bad number, and a name that may hold a quoted comma, quote or
    /// newline (which moves the line numbers of every later row).
    fn row() -> impl Strategy<Value = (bool, String, u8)> {
        (
            any::<bool>(),
            "[a-z]{0,6}",
            prop_oneof![Just(0u8), Just(1), Just(2), Just(3)],
        )
            .prop_map(|(good, name, quirk)| {
                let name = match quirk {
                    1 => format!("\"{name}, jr\""),
                    2 => format!("\"{name}\nsecond line\""),
                    3 => format!("\"say \"\"{name}\"\"\""),
                    _ => name,
                };
                (good, name, quirk)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = read(&body);
            let _ = json(&body, &BTreeSet::new());
        }

        #[test]
        fn every_row_is_accepted_or_rejected_at_its_own_line(
            rows in proptest::collection::vec(row(), 1..40),
            crlf in any::<bool>(),
            bom in any::<bool>(),
        ) {
            let eol = if crlf { "\r\n" } else { "\n" };
            let mut body = String::new();
            if bom {
                body.push('\u{feff}');
            }
            body.push_str("to,name");
            body.push_str(eol);
            let mut line = 2u64;
            let mut want_bad = Vec::new();
            for (i, (good, name, quirk)) in rows.iter().enumerate() {
                let to = if *good { format!("+1415555{:04}", i) } else { format!("x{i}") };
                if !good {
                    want_bad.push((line, to.clone()));
                }
                body.push_str(&format!("{to},{name}{eol}"));
                line += if *quirk == 2 { 2 } else { 1 };
            }
            let (ok, rej) = read(body.as_bytes()).unwrap();
            let got_bad: Vec<(u64, String)> = rej.iter().map(|r| (r.row, r.to.clone())).collect();
            prop_assert_eq!(got_bad, want_bad);
            prop_assert_eq!(ok.len() + rej.len(), rows.len());
            for r in &ok {
                let vars: Value = serde_json::from_str(&r.vars).unwrap();
                prop_assert!(vars.get("name").is_some());
            }
        }
    }
}
