//! The hypervisor's `MIGRATION-STATS key=value ...` line as a typed record: the one parser
//! used by the demo, the benchmark and the end-to-end tests.
//!
//! The hypervisor adds fields over time, so keys this parser does not know are kept
//! verbatim in [`MigrationStats::extra`] rather than rejected: an older host tool still
//! reads a newer line, and nothing the hypervisor said is lost on the way to JSON.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The word that starts the line.
pub const PREFIX: &str = "MIGRATION-STATS";

/// One pre-copy round: `pages:bytes:us` in the line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Round {
    /// Pages sent in the round.
    pub pages: u64,
    /// Bytes on the wire in the round.
    pub bytes: u64,
    /// Duration of the round (hypervisor TSC clock).
    pub us: u64,
}

/// A finished migration's figures as the source hypervisor reported them. Keys missing
/// from a line keep their defaults (older hypervisors print fewer).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MigrationStats {
    /// Guest id on the source.
    pub guest: u32,
    /// Guest image name.
    pub image: String,
    /// Guest memory size.
    pub mem_bytes: u64,
    /// Destination `ip:port`.
    pub peer: String,
    /// Dirty tracking: `pml`, `ad`, `wp`, or `none` for stop-and-copy.
    pub method: String,
    /// `precopy` or `stop`.
    pub mode: String,
    /// `ok` or the failure, with spaces as `_`.
    pub outcome: String,
    /// Start to resume on the destination.
    pub total_us: u64,
    /// Guest paused time.
    pub downtime_us: u64,
    /// Pre-copy rounds.
    pub rounds: u32,
    /// Bytes on the wire.
    pub bytes: u64,
    /// Pages sent (all rounds and the final copy).
    pub pages: u64,
    /// Zero pages elided.
    pub zero_pages: u64,
    /// Pages dirty at the stop.
    pub final_dirty: u64,
    /// Bytes sent while paused.
    pub final_bytes: u64,
    /// Why pre-copy stopped.
    pub stop: String,
    /// Stream throughput in kB/s.
    #[serde(rename = "throughput_kBps")]
    pub throughput_kbps: u64,
    /// Per pre-copy round (empty for stop-and-copy, printed as `-`).
    pub per_round: Vec<Round>,
    /// Keys this version does not know, verbatim.
    pub extra: BTreeMap<String, String>,
}

/// Why a line is not a stats line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// The line does not contain `MIGRATION-STATS`.
    NoPrefix,
    /// A word after the prefix is not `key=value`.
    NotKeyValue(String),
    /// A known key whose value does not parse.
    BadValue {
        /// The key.
        key: String,
        /// Its value.
        value: String,
    },
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoPrefix => write!(f, "not a {PREFIX} line"),
            Self::NotKeyValue(w) => write!(f, "{PREFIX}: '{w}' is not key=value"),
            Self::BadValue { key, value } => write!(f, "{PREFIX}: bad value for {key}: '{value}'"),
        }
    }
}

impl std::error::Error for ParseError {}

/// Parses `pages:bytes:us,pages:bytes:us`; `-` or nothing is no round.
pub fn parse_rounds(s: &str) -> Option<Vec<Round>> {
    if s.is_empty() || s == "-" {
        return Some(Vec::new());
    }
    s.split(',')
        .map(|r| {
            let mut it = r.split(':').map(|n| n.parse::<u64>().ok());
            let round = Round {
                pages: it.next()??,
                bytes: it.next()??,
                us: it.next()??,
            };
            it.next().is_none().then_some(round)
        })
        .collect()
}

/// The inverse of [`parse_rounds`].
pub fn format_rounds(rounds: &[Round]) -> String {
    if rounds.is_empty() {
        return "-".into();
    }
    rounds
        .iter()
        .map(|r| format!("{}:{}:{}", r.pages, r.bytes, r.us))
        .collect::<Vec<_>>()
        .join(",")
}

impl MigrationStats {
    /// Parses a line; text before the prefix (a prompt, a guest's output) is skipped.
    pub fn parse(line: &str) -> Result<Self, ParseError> {
        let start = line.find(PREFIX).ok_or(ParseError::NoPrefix)?;
        let mut s = Self::default();
        for word in line[start + PREFIX.len()..].split_whitespace() {
            let (k, v) = word
                .split_once('=')
                .ok_or_else(|| ParseError::NotKeyValue(word.to_string()))?;
            s.set(k, v).map_err(|()| ParseError::BadValue {
                key: k.to_string(),
                value: v.to_string(),
            })?;
        }
        Ok(s)
    }

    fn set(&mut self, k: &str, v: &str) -> Result<(), ()> {
        fn num<T: std::str::FromStr>(v: &str) -> Result<T, ()> {
            v.parse().map_err(|_| ())
        }
        match k {
            "guest" => self.guest = num(v)?,
            "image" => self.image = v.into(),
            "mem_bytes" => self.mem_bytes = num(v)?,
            "peer" => self.peer = v.into(),
            "method" => self.method = v.into(),
            "mode" => self.mode = v.into(),
            "outcome" => self.outcome = v.into(),
            "total_us" => self.total_us = num(v)?,
            "downtime_us" => self.downtime_us = num(v)?,
            "rounds" => self.rounds = num(v)?,
            "bytes" => self.bytes = num(v)?,
            "pages" => self.pages = num(v)?,
            "zero_pages" => self.zero_pages = num(v)?,
            "final_dirty" => self.final_dirty = num(v)?,
            "final_bytes" => self.final_bytes = num(v)?,
            "stop" => self.stop = v.into(),
            "throughput_kBps" => self.throughput_kbps = num(v)?,
            "per_round" => self.per_round = parse_rounds(v).ok_or(())?,
            _ => {
                self.extra.insert(k.into(), v.into());
            }
        }
        Ok(())
    }

    /// Any field's value as the line spelled it, known or extra (for display and for
    /// callers that want a key this version has no field for).
    pub fn get(&self, key: &str) -> Option<String> {
        Some(match key {
            "guest" => self.guest.to_string(),
            "image" => self.image.clone(),
            "mem_bytes" => self.mem_bytes.to_string(),
            "peer" => self.peer.clone(),
            "method" => self.method.clone(),
            "mode" => self.mode.clone(),
            "outcome" => self.outcome.clone(),
            "total_us" => self.total_us.to_string(),
            "downtime_us" => self.downtime_us.to_string(),
            "rounds" => self.rounds.to_string(),
            "bytes" => self.bytes.to_string(),
            "pages" => self.pages.to_string(),
            "zero_pages" => self.zero_pages.to_string(),
            "final_dirty" => self.final_dirty.to_string(),
            "final_bytes" => self.final_bytes.to_string(),
            "stop" => self.stop.clone(),
            "throughput_kBps" => self.throughput_kbps.to_string(),
            "per_round" => format_rounds(&self.per_round),
            _ => return self.extra.get(key).cloned(),
        })
    }

    /// Whether the migration succeeded (`outcome=ok`; an older line without the key
    /// counts as success, since it was only printed for finished migrations).
    pub fn ok(&self) -> bool {
        self.outcome.is_empty() || self.outcome == "ok"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "MIGRATION-STATS guest=1 image=counter mem_bytes=16777216 peer=10.0.0.2:7000 method=pml mode=precopy outcome=ok total_us=300065 downtime_us=40670 rounds=2 bytes=123248 pages=4100 zero_pages=4086 final_dirty=0 final_bytes=272 stop=fits-downtime throughput_kBps=410 per_round=4096:106512:231453,4:16464:22875";

    #[test]
    fn parses_the_documented_line() {
        let s = MigrationStats::parse(LINE).unwrap();
        assert_eq!(s.guest, 1);
        assert_eq!(s.image, "counter");
        assert_eq!(s.mem_bytes, 16 << 20);
        assert_eq!(s.peer, "10.0.0.2:7000");
        assert_eq!((s.method.as_str(), s.mode.as_str()), ("pml", "precopy"));
        assert!(s.ok());
        assert_eq!((s.total_us, s.downtime_us, s.rounds), (300065, 40670, 2));
        assert_eq!((s.bytes, s.pages, s.zero_pages), (123248, 4100, 4086));
        assert_eq!((s.final_dirty, s.final_bytes), (0, 272));
        assert_eq!(s.stop, "fits-downtime");
        assert_eq!(s.throughput_kbps, 410);
        assert_eq!(
            s.per_round,
            vec![
                Round {
                    pages: 4096,
                    bytes: 106512,
                    us: 231453
                },
                Round {
                    pages: 4,
                    bytes: 16464,
                    us: 22875
                }
            ]
        );
        assert!(s.extra.is_empty());
        assert_eq!(
            s.get("per_round").unwrap(),
            "4096:106512:231453,4:16464:22875"
        );
    }

    #[test]
    fn keeps_unknown_keys() {
        let line = format!("hv> {LINE} downtime_send_us=120 heap_peak=65536 note=a=b");
        let s = MigrationStats::parse(&line).unwrap();
        assert_eq!(s.total_us, 300065);
        assert_eq!(s.extra.len(), 3);
        assert_eq!(s.extra["downtime_send_us"], "120");
        assert_eq!(s.extra["heap_peak"], "65536");
        // Only the first '=' splits.
        assert_eq!(s.extra["note"], "a=b");
        assert_eq!(s.get("heap_peak").as_deref(), Some("65536"));
        assert_eq!(s.get("nonexistent"), None);
    }

    #[test]
    fn stop_and_copy_and_short_lines() {
        let s = MigrationStats::parse("MIGRATION-STATS mode=stop per_round=- total_us=5").unwrap();
        assert!(s.per_round.is_empty());
        assert_eq!(s.total_us, 5);
        assert_eq!(s.rounds, 0);
        assert_eq!(format_rounds(&s.per_round), "-");
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(MigrationStats::parse("hello"), Err(ParseError::NoPrefix));
        assert!(matches!(
            MigrationStats::parse("MIGRATION-STATS total_us=abc"),
            Err(ParseError::BadValue { .. })
        ));
        assert!(matches!(
            MigrationStats::parse("MIGRATION-STATS oops"),
            Err(ParseError::NotKeyValue(_))
        ));
        assert!(MigrationStats::parse("MIGRATION-STATS per_round=1:2").is_err());
        assert!(MigrationStats::parse("MIGRATION-STATS per_round=1:2:3:4").is_err());
    }

    #[test]
    fn json_round_trip_keeps_extra() {
        let s = MigrationStats::parse(&format!("{LINE} future_key=7")).unwrap();
        let j = serde_json::to_string(&s).unwrap();
        assert!(j.contains("\"throughput_kBps\":410"));
        let back: MigrationStats = serde_json::from_str(&j).unwrap();
        assert_eq!(back, s);
        // Fewer keys (an older writer) still load.
        let old: MigrationStats = serde_json::from_str(r#"{"total_us": 9}"#).unwrap();
        assert_eq!(old.total_us, 9);
    }
}
