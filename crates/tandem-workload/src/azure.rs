//! Azure LLM inference trace 2023 (Splitwise): CSV `TIMESTAMP,ContextTokens,GeneratedTokens`
//! with timestamps like `2023-11-16 18:15:46.6805900`.
//!
//! The trace has no prefix information, so each prompt is one [`Source::Unique`] segment keyed by
//! its row; [`crate::Trace::with_shared_prefix`] can add synthetic sharing afterwards.

use std::io::BufRead;

use crate::error::{Result, WorkloadError};
use crate::trace::{PromptSpec, Request, Segment, Source, Trace};

const COLUMNS: [&str; 3] = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"];

/// Parse an Azure 2023 trace (pass a `&str` as `text.as_bytes()`).
///
/// The header is required and columns are found by name (case-insensitive), so reordered or
/// extra columns are fine. Arrival times are milliseconds after the earliest row (the first row
/// in the published files, which are sorted). Blank lines are skipped; `\r\n` endings accepted.
///
/// # Errors
/// [`WorkloadError::Read`] or [`WorkloadError::Csv`] naming the 1-based line: missing header or
/// column, wrong field count, a non-integer token count, or a malformed timestamp.
pub fn parse_azure(reader: impl BufRead) -> Result<Trace> {
    let mut header: Option<[usize; 3]> = None;
    let mut rows: Vec<(f64, u32, u32)> = Vec::new();
    let mut width = 0;
    for (i, line) in reader.lines().enumerate() {
        let line_no = i + 1;
        let line = line.map_err(|source| WorkloadError::Read {
            line: line_no,
            source,
        })?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let csv = |reason: String| WorkloadError::Csv {
            line: line_no,
            reason,
        };
        let Some(cols) = header else {
            let mut cols = [0; 3];
            for (slot, name) in cols.iter_mut().zip(COLUMNS) {
                *slot = fields
                    .iter()
                    .position(|f| f.eq_ignore_ascii_case(name))
                    .ok_or_else(|| csv(format!("header lacks column {name} (found `{line}`)")))?;
            }
            header = Some(cols);
            width = fields.len();
            continue;
        };
        if fields.len() != width {
            return Err(csv(format!("{} fields, header has {width}", fields.len())));
        }
        let at = parse_timestamp_ms(fields[cols[0]])
            .ok_or_else(|| csv(format!("bad TIMESTAMP `{}`", fields[cols[0]])))?;
        let count = |k: usize| {
            fields[cols[k]]
                .parse::<u32>()
                .map_err(|e| csv(format!("bad {} `{}`: {e}", COLUMNS[k], fields[cols[k]])))
        };
        rows.push((at, count(1)?, count(2)?));
    }
    if header.is_none() {
        return Err(WorkloadError::Csv {
            line: 1,
            reason: "empty input: expected a TIMESTAMP,ContextTokens,GeneratedTokens header".into(),
        });
    }
    let t0 = rows.iter().map(|r| r.0).fold(f64::INFINITY, f64::min);
    let requests = rows
        .into_iter()
        .enumerate()
        .map(|(k, (at, context, generated))| Request {
            at_ms: at - t0,
            input: PromptSpec {
                segments: vec![Segment {
                    source: Source::Unique(k as u64),
                    len: context,
                }],
            },
            output_tokens: generated,
        })
        .collect();
    Ok(Trace::new("azure", requests, None))
}

/// `YYYY-MM-DD HH:MM:SS[.fraction]` (or with `T`) as milliseconds since 1970-01-01, UTC assumed.
/// Only differences are used, so the zone does not matter; any number of fraction digits.
fn parse_timestamp_ms(s: &str) -> Option<f64> {
    let (date, time) = s.split_once([' ', 'T'])?;
    let mut d = date.splitn(3, '-');
    let year: i64 = d.next()?.parse().ok()?;
    let month: u32 = d.next()?.parse().ok()?;
    let day: u32 = d.next()?.parse().ok()?;
    let (hms, frac) = match time.split_once('.') {
        Some((hms, frac)) => (hms, frac),
        None => (time, ""),
    };
    let mut t = hms.splitn(3, ':');
    let h: u32 = t.next()?.parse().ok()?;
    let m: u32 = t.next()?.parse().ok()?;
    let sec: u32 = t.next()?.parse().ok()?;
    let valid = (1..=12).contains(&month)
        && (1..=31).contains(&day)
        && h < 24
        && m < 60
        && sec < 61
        && frac.bytes().all(|b| b.is_ascii_digit());
    if !valid {
        return None;
    }
    let fraction = if frac.is_empty() {
        0.0
    } else {
        format!("0.{frac}").parse::<f64>().ok()?
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + i64::from(h * 3600 + m * 60 + sec);
    Some((secs as f64 + fraction) * 1000.0)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        let a = parse_timestamp_ms("2023-11-16 18:15:46.6805900").unwrap();
        let b = parse_timestamp_ms("2023-11-16T18:15:50").unwrap();
        assert!((b - a - 3319.41).abs() < 1e-3, "{}", b - a);
        // Across midnight and a month end.
        let c = parse_timestamp_ms("2023-11-30 23:59:59.5").unwrap();
        let d = parse_timestamp_ms("2023-12-01 00:00:00").unwrap();
        assert!((d - c - 500.0).abs() < 1e-6);
        for bad in [
            "2023-11-16",
            "2023-13-16 00:00:00",
            "2023-11-16 25:00:00",
            "2023-11-16 18:15:46.6x",
            "x-11-16 18:15:46",
        ] {
            assert_eq!(parse_timestamp_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn good_file() {
        let text = "TIMESTAMP,ContextTokens,GeneratedTokens\r\n\
                    2023-11-16 18:15:46.6805900,374,44\r\n\
                    \r\n\
                    2023-11-16 18:15:50.9951690,396,109\r\n";
        let t = parse_azure(text.as_bytes()).unwrap();
        assert_eq!(t.block_tokens, None);
        assert_eq!(t.requests.len(), 2);
        assert_eq!(t.requests[0].at_ms, 0.0);
        assert!((t.requests[1].at_ms - 4314.579).abs() < 1e-3);
        assert_eq!(t.requests[1].input.len(), 396);
        assert_eq!(t.requests[1].output_tokens, 109);
        assert_ne!(
            t.requests[0].input.segments[0].source,
            t.requests[1].input.segments[0].source
        );
    }

    #[test]
    fn columns_by_name() {
        let text = "GeneratedTokens,TIMESTAMP,ContextTokens\n7,2023-11-16 00:00:01,9\n";
        let t = parse_azure(text.as_bytes()).unwrap();
        assert_eq!(
            (t.requests[0].input.len(), t.requests[0].output_tokens),
            (9, 7)
        );
    }

    #[test]
    fn bad_lines_name_the_line() {
        let h = "TIMESTAMP,ContextTokens,GeneratedTokens\n";
        let cases = [
            (
                format!("{h}2023-11-16 00:00:00,1,2\n2023-11-16 00:00:00,x,2\n"),
                3,
                "ContextTokens",
            ),
            (format!("{h}2023-11-16 00:00:00,1\n"), 2, "fields"),
            (
                format!("{h}2023-11-16 00:00:00,1,-2\n"),
                2,
                "GeneratedTokens",
            ),
            (format!("{h}yesterday,1,2\n"), 2, "TIMESTAMP"),
            (
                "TIMESTAMP,Context,GeneratedTokens\n".to_string(),
                1,
                "ContextTokens",
            ),
            (String::new(), 1, "header"),
        ];
        for (text, line, word) in cases {
            let err = parse_azure(text.as_bytes()).unwrap_err();
            match &err {
                WorkloadError::Csv { line: l, reason } => {
                    assert_eq!(*l, line, "{err}");
                    assert!(reason.contains(word), "{err}");
                }
                other => panic!("{other}"),
            }
        }
    }
}
