//! Query parameters: each is checked and a bad one is named in the 400
//! problem. Unknown and repeated parameters are errors too, so a typo never
//! silently widens a search.

use std::collections::BTreeMap;

use super::problem::Problem;
use super::store::{Cursor, Search, Selection};

/// Default page size.
pub const DEFAULT_LIMIT: i64 = 50;
/// Largest page size.
pub const MAX_LIMIT: i64 = 500;
/// Longest full-text query, bytes.
pub const MAX_QUERY_BYTES: usize = 512;
/// Most terms and phrases in a full-text query.
pub const MAX_TERMS: usize = 16;
/// Longest address, bytes (RFC 7622 §3.1: 3 × 1023 plus separators).
pub const MAX_ADDRESS_BYTES: usize = 3071;
/// Most query parameters in one request.
pub const MAX_PARAMETERS: usize = 32;

/// The parameters of a request, by name, each given at most once.
#[derive(Debug, Default)]
pub struct Params(BTreeMap<String, String>);

impl Params {
    /// Collects the decoded pairs; `allowed` names the accepted parameters.
    pub fn new(pairs: Vec<(String, String)>, allowed: &[&str]) -> Result<Self, Problem> {
        if pairs.len() > MAX_PARAMETERS {
            return Err(Problem::invalid(
                &pairs[MAX_PARAMETERS].0,
                format!("at most {MAX_PARAMETERS} query parameters"),
            ));
        }
        let mut map = BTreeMap::new();
        for (k, v) in pairs {
            if !allowed.contains(&k.as_str()) {
                return Err(Problem::invalid(
                    &k,
                    format!("unknown parameter (accepted: {})", allowed.join(", ")),
                ));
            }
            if map.contains_key(&k) {
                return Err(Problem::invalid(&k, "given more than once"));
            }
            map.insert(k, v);
        }
        Ok(Self(map))
    }

    /// The parameters as given (for the audit record).
    pub fn audit(&self) -> BTreeMap<String, String> {
        self.0.clone()
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// A bare address (user or room): lowercased, no resource.
    pub fn address(&self, name: &str) -> Result<Option<String>, Problem> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        if v.is_empty() || v.len() > MAX_ADDRESS_BYTES {
            return Err(Problem::invalid(
                name,
                format!("must be a bare address of 1 to {MAX_ADDRESS_BYTES} bytes"),
            ));
        }
        if v.contains('/') || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(Problem::invalid(
                name,
                "must be a bare address (local@domain): no resource, spaces or control characters",
            ));
        }
        let (local, domain) = v.split_once('@').unwrap_or(("", v));
        if domain.is_empty() || domain.contains('@') || (v.contains('@') && local.is_empty()) {
            return Err(Problem::invalid(
                name,
                "must be a bare address (local@domain)",
            ));
        }
        Ok(Some(v.to_lowercase()))
    }

    /// A required bare address.
    pub fn required_address(&self, name: &str) -> Result<String, Problem> {
        self.address(name)?
            .ok_or_else(|| Problem::invalid(name, "is required"))
    }

    /// An RFC 3339 time, as microseconds since the Unix epoch.
    pub fn time(&self, name: &str) -> Result<Option<i64>, Problem> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        chrono::DateTime::parse_from_rfc3339(v)
            .map(|t| Some(t.timestamp_micros()))
            .map_err(|e| {
                Problem::invalid(
                    name,
                    format!("must be an RFC 3339 time such as 2026-01-31T09:00:00Z ({e})"),
                )
            })
    }

    /// The page size.
    pub fn limit(&self) -> Result<i64, Problem> {
        let Some(v) = self.get("limit") else {
            return Ok(DEFAULT_LIMIT);
        };
        match v.parse::<i64>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            _ => Err(Problem::invalid(
                "limit",
                format!("must be an integer from 1 to {MAX_LIMIT}"),
            )),
        }
    }

    /// The cursor of the page to read.
    pub fn cursor(&self) -> Result<Option<Cursor>, Problem> {
        let Some(v) = self.get("cursor") else {
            return Ok(None);
        };
        Cursor::decode(v).map(Some).ok_or_else(|| {
            Problem::invalid("cursor", "is not a cursor this API returned (next_cursor)")
        })
    }

    /// The full-text query `q`: words and "quoted phrases", all required.
    pub fn text(&self) -> Result<Option<Vec<String>>, Problem> {
        let Some(v) = self.get("q") else {
            return Ok(None);
        };
        if v.len() > MAX_QUERY_BYTES {
            return Err(Problem::invalid(
                "q",
                format!("at most {MAX_QUERY_BYTES} bytes"),
            ));
        }
        let terms = split_terms(v);
        if terms.is_empty() {
            return Err(Problem::invalid("q", "needs at least one word"));
        }
        if terms.len() > MAX_TERMS {
            return Err(Problem::invalid(
                "q",
                format!("at most {MAX_TERMS} words or phrases"),
            ));
        }
        if let Some(t) = terms.iter().find(|t| !t.chars().any(char::is_alphanumeric)) {
            return Err(Problem::invalid(
                "q",
                format!("{t:?} has no letter or digit to search for"),
            ));
        }
        Ok(Some(terms))
    }

    /// The search of `GET /api/v1/archive/messages` and of the export.
    pub fn search(&self) -> Result<Search, Problem> {
        let search = Search {
            selection: Selection::All,
            participant: self.address("participant")?,
            peer: self.address("peer")?,
            room: self.address("room")?,
            start_us: self.time("start")?,
            end_us: self.time("end")?,
            text: self.text()?,
        };
        if search.room.is_some() && search.participant.is_some() {
            return Err(Problem::invalid(
                "room",
                "room and participant exclude each other (a room's messages by one sender: \
                 room and peer)",
            ));
        }
        check_range(&search)?;
        Ok(search)
    }

    /// The conversation of `GET /api/v1/archive/conversation`.
    pub fn conversation(&self) -> Result<Search, Problem> {
        let a = self.required_address("participant")?;
        let b = self.required_address("peer")?;
        let search = Search {
            selection: Selection::Conversation { a, b },
            start_us: self.time("start")?,
            end_us: self.time("end")?,
            text: self.text()?,
            ..Search::default()
        };
        check_range(&search)?;
        Ok(search)
    }

    /// The export format.
    pub fn format(&self) -> Result<ExportFormat, Problem> {
        match self.get("format") {
            Some("jsonl") => Ok(ExportFormat::JsonLines),
            Some("csv") => Ok(ExportFormat::Csv),
            Some(_) => Err(Problem::invalid("format", "must be jsonl or csv")),
            None => Err(Problem::invalid("format", "is required (jsonl or csv)")),
        }
    }
}

fn check_range(search: &Search) -> Result<(), Problem> {
    if let (Some(s), Some(e)) = (search.start_us, search.end_us)
        && e <= s
    {
        return Err(Problem::invalid("end", "must be later than start"));
    }
    Ok(())
}

/// Export formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// One JSON object per line.
    JsonLines,
    /// RFC 4180 CSV with a header line.
    Csv,
}

/// Splits a full-text query into words and "quoted phrases" (an unclosed
/// quote runs to the end).
fn split_terms(q: &str) -> Vec<String> {
    let mut terms = Vec::new();
    let mut rest = q;
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            break;
        }
        if let Some(after) = rest.strip_prefix('"') {
            let (phrase, next) = after.split_once('"').unwrap_or((after, ""));
            let phrase = phrase.split_whitespace().collect::<Vec<_>>().join(" ");
            if !phrase.is_empty() {
                terms.push(phrase);
            }
            rest = next;
        } else {
            let end = rest
                .find(|c: char| c.is_whitespace() || c == '"')
                .unwrap_or(rest.len());
            terms.push(rest[..end].to_owned());
            rest = &rest[end..];
        }
    }
    terms
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Result<Params, Problem> {
        Params::new(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            &[
                "participant",
                "peer",
                "room",
                "start",
                "end",
                "q",
                "limit",
                "cursor",
            ],
        )
    }

    fn bad(pairs: &[(&str, &str)]) -> String {
        let p = params(pairs).and_then(|p| {
            p.limit()?;
            p.cursor()?;
            p.search()
        });
        p.expect_err("must be rejected")
            .parameter
            .expect("names a parameter")
    }

    #[test]
    fn terms_and_phrases() {
        assert_eq!(
            split_terms("  budget \"q3  plan\" café\"x"),
            vec!["budget", "q3 plan", "café", "x"]
        );
        assert_eq!(split_terms("\"unclosed phrase"), vec!["unclosed phrase"]);
        assert!(split_terms("   \"\"  ").is_empty());
    }

    #[test]
    fn each_bad_parameter_is_named() {
        assert_eq!(bad(&[("limit", "0")]), "limit");
        assert_eq!(bad(&[("limit", "501")]), "limit");
        assert_eq!(bad(&[("limit", "ten")]), "limit");
        assert_eq!(bad(&[("cursor", "zz")]), "cursor");
        assert_eq!(bad(&[("start", "yesterday")]), "start");
        assert_eq!(bad(&[("end", "2026-13-01T00:00:00Z")]), "end");
        assert_eq!(
            bad(&[
                ("start", "2026-02-01T00:00:00Z"),
                ("end", "2026-01-01T00:00:00Z")
            ]),
            "end"
        );
        assert_eq!(
            bad(&[("participant", "alice@example.com/phone")]),
            "participant"
        );
        assert_eq!(bad(&[("peer", "a b@example.com")]), "peer");
        assert_eq!(bad(&[("peer", "@example.com")]), "peer");
        assert_eq!(bad(&[("q", "  ")]), "q");
        assert_eq!(bad(&[("q", "!!!")]), "q");
        assert_eq!(bad(&[("q", &"w ".repeat(17))]), "q");
        assert_eq!(
            bad(&[("room", "r@muc.example.com"), ("participant", "a@b")]),
            "room"
        );
        assert_eq!(bad(&[("sender", "x@y")]), "sender");
        assert_eq!(bad(&[("peer", "x@y"), ("peer", "z@y")]), "peer");
    }

    #[test]
    fn good_parameters_are_normalised() {
        let p = params(&[
            ("participant", "Alice@Example.COM"),
            ("start", "2026-01-01T01:00:00+01:00"),
            ("q", "Café"),
        ])
        .unwrap();
        let s = p.search().unwrap();
        assert_eq!(s.participant.as_deref(), Some("alice@example.com"));
        assert_eq!(s.start_us, Some(1_767_225_600_000_000));
        assert_eq!(s.text, Some(vec!["Café".to_owned()]));
        assert_eq!(p.limit().unwrap(), DEFAULT_LIMIT);
    }
}
