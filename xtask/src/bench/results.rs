//! The benchmark's results as serde types: results.json (schema-versioned, canonical),
//! results.csv (one flat row per run, for spreadsheets), and a loader that also reads
//! the hand-written format earlier versions wrote (no `schema` field, flat runs).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use hv_tools::stats::{self, MigrationStats};
use serde::{Deserialize, Serialize};

/// Version of results.json's layout. 1 was the hand-written file without a `schema`
/// field (still loaded); 2 nests each run's `MIGRATION-STATS` record.
pub const SCHEMA: u32 = 2;

/// One benchmark run (results.json).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Results {
    /// [`SCHEMA`].
    pub schema: u32,
    /// UTC start time.
    pub date: String,
    /// Host name.
    pub host: String,
    /// Short git revision.
    pub git: String,
    /// Emulator and its settings, e.g. `bochs ips=50000000`.
    pub emulator: String,
    /// The link's throughput measured by netbench in the same run.
    pub link_bytes_per_s: f64,
    /// The same netbench over two parallel connections, right after (absent in
    /// results from before it was measured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_two_connections_bytes_per_s: Option<f64>,
    /// The secure channel's sealing rate on the source (`key bench`), in the same run;
    /// absent in results from before the channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cipher_seal_bytes_per_s: Option<f64>,
    /// Cycles per byte of sealing, from the same measurement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cipher_seal_cycles_per_byte: Option<f64>,
    /// Every migration.
    pub runs: Vec<Record>,
}

/// One migration of the matrix.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Guest memory.
    pub mem_mib: u64,
    /// Dirty-rate level (`idle`, `low`, `quarter`, `high`).
    pub dirty_level: String,
    /// Pages the guest rewrites per second.
    pub rate_pps: u64,
    /// Pages the writes are spread over.
    pub ws_pages: u64,
    /// Guest: `verify` (all of memory) or `dirtier` (a working set).
    pub workload: String,
    /// Dirty tracking asked for: `pml`, `ad`, `wp`, or `none` for stop-and-copy.
    pub method: String,
    /// `precopy`, `precopy+full` (with `verify=full`), `precopy+delta` (with
    /// `cache=`, delta compression) or `stop`.
    pub mode: String,
    /// 1-based repeat of this configuration.
    pub repeat: u32,
    /// Stream throughput / link throughput.
    pub throughput_vs_link: f64,
    /// Downtime / (final bytes at link speed).
    pub downtime_vs_final_at_link: f64,
    /// Bytes on the wire / guest memory.
    pub wire_vs_mem: f64,
    /// What the source hypervisor reported.
    pub stats: MigrationStats,
}

/// A configuration of the matrix: what groups repeats together.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    /// Guest memory.
    pub mem_mib: u64,
    /// Dirty-rate level.
    pub dirty_level: String,
    /// Method (`none` for stop-and-copy).
    pub method: String,
    /// Mode.
    pub mode: String,
    /// Working set.
    pub ws_pages: u64,
    /// Guest.
    pub workload: String,
}

impl Key {
    /// The method column: `stop`, the tracking method, or e.g. `pml+delta` for a
    /// pre-copy variant.
    pub fn method_label(&self) -> String {
        if self.mode == "stop" {
            "stop".into()
        } else if self.mode == "postcopy" {
            "postcopy".into()
        } else if self.mode == "hybrid" {
            format!("{}+hybrid", self.method)
        } else if let Some(extra) = self.mode.strip_prefix("precopy+") {
            format!("{}+{extra}", self.method)
        } else {
            self.method.clone()
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} MiB {} {} ws {}",
            self.mem_mib,
            self.dirty_level,
            self.method_label(),
            self.ws_pages
        )
    }
}

impl Record {
    /// A record with its ratios against the link computed.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        mem_mib: u64,
        dirty_level: &str,
        rate_pps: u64,
        ws_pages: u64,
        workload: &str,
        method: &str,
        mode: &str,
        repeat: u32,
        stats: MigrationStats,
        link_bps: f64,
    ) -> Self {
        let s = &stats;
        let total_s = s.total_us.max(1) as f64 / 1e6;
        let final_us = s.final_bytes as f64 / link_bps * 1e6;
        Self {
            mem_mib,
            dirty_level: dirty_level.into(),
            rate_pps,
            ws_pages,
            workload: workload.into(),
            method: method.into(),
            mode: mode.into(),
            repeat,
            throughput_vs_link: s.bytes as f64 / total_s / link_bps,
            downtime_vs_final_at_link: s.downtime_us as f64 / final_us.max(1.0),
            wire_vs_mem: s.bytes as f64 / (mem_mib << 20).max(1) as f64,
            stats,
        }
    }

    /// The configuration this run belongs to.
    pub fn key(&self) -> Key {
        Key {
            mem_mib: self.mem_mib,
            dirty_level: self.dirty_level.clone(),
            method: self.method.clone(),
            mode: self.mode.clone(),
            ws_pages: self.ws_pages,
            workload: self.workload.clone(),
        }
    }
}

/// Why a results file cannot be read.
#[derive(Debug)]
pub enum LoadError {
    /// Reading the file.
    Io(std::io::Error),
    /// Not JSON, or not a results file of the version it claims.
    Json(serde_json::Error),
    /// A schema newer than this xtask knows.
    Schema(u64),
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(e) => write!(f, "{e}"),
            Self::Json(e) => write!(f, "not a benchmark results file: {e}"),
            Self::Schema(n) => write!(
                f,
                "results schema {n} is newer than this xtask reads ({SCHEMA})"
            ),
        }
    }
}

impl std::error::Error for LoadError {}

impl From<serde_json::Error> for LoadError {
    fn from(e: serde_json::Error) -> Self {
        Self::Json(e)
    }
}

/// A run as the hand-written format (schema 1) spelled it.
#[derive(Deserialize)]
struct LegacyRun {
    mem_mib: u64,
    dirty_level: String,
    rate_pps: u64,
    ws_pages: u64,
    mode: String,
    method: String,
    total_us: u64,
    downtime_us: u64,
    rounds: u32,
    bytes: u64,
    zero_pages: u64,
    final_dirty: u64,
    final_bytes: u64,
    stop: String,
    per_round: String,
    throughput_vs_link: f64,
    downtime_vs_final_at_link: f64,
    wire_vs_mem: f64,
}

#[derive(Deserialize)]
struct LegacyResults {
    date: String,
    host: String,
    git: String,
    emulator: String,
    link_bytes_per_s: f64,
    runs: Vec<LegacyRun>,
}

impl From<LegacyResults> for Results {
    fn from(l: LegacyResults) -> Self {
        let mut repeats: BTreeMap<Key, u32> = BTreeMap::new();
        let runs = l
            .runs
            .into_iter()
            .map(|r| {
                let stats = MigrationStats {
                    mem_bytes: r.mem_mib << 20,
                    method: r.method.clone(),
                    mode: r.mode.clone(),
                    outcome: "ok".into(),
                    total_us: r.total_us,
                    downtime_us: r.downtime_us,
                    rounds: r.rounds,
                    bytes: r.bytes,
                    zero_pages: r.zero_pages,
                    final_dirty: r.final_dirty,
                    final_bytes: r.final_bytes,
                    stop: r.stop,
                    per_round: stats::parse_rounds(&r.per_round).unwrap_or_default(),
                    ..MigrationStats::default()
                };
                // Schema 1 predates the working-set runs: every run was `verify`.
                let mut rec = Record {
                    mem_mib: r.mem_mib,
                    dirty_level: r.dirty_level,
                    rate_pps: r.rate_pps,
                    ws_pages: r.ws_pages,
                    workload: "verify".into(),
                    method: r.method,
                    mode: r.mode,
                    repeat: 0,
                    throughput_vs_link: r.throughput_vs_link,
                    downtime_vs_final_at_link: r.downtime_vs_final_at_link,
                    wire_vs_mem: r.wire_vs_mem,
                    stats,
                };
                let n = repeats.entry(rec.key()).or_default();
                *n += 1;
                rec.repeat = *n;
                rec
            })
            .collect();
        Self {
            schema: SCHEMA,
            date: l.date,
            host: l.host,
            git: l.git,
            emulator: l.emulator,
            link_bytes_per_s: l.link_bytes_per_s,
            link_two_connections_bytes_per_s: None,
            cipher_seal_bytes_per_s: None,
            cipher_seal_cycles_per_byte: None,
            runs,
        }
    }
}

impl Results {
    /// Parses results.json of the current schema or the hand-written schema 1.
    pub fn from_json(text: &str) -> Result<Self, LoadError> {
        let v: serde_json::Value = serde_json::from_str(text)?;
        match v.get("schema").map(serde_json::Value::as_u64) {
            None => Ok(serde_json::from_value::<LegacyResults>(v)?.into()),
            Some(Some(n)) if n == u64::from(SCHEMA) => Ok(serde_json::from_value(v)?),
            Some(n) => Err(LoadError::Schema(n.unwrap_or(u64::MAX))),
        }
    }

    /// Reads a results.json.
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        Self::from_json(&std::fs::read_to_string(path).map_err(LoadError::Io)?)
    }

    /// results.json's text.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("plain data serializes");
        s.push('\n');
        s
    }

    /// results.csv's text: a header and one row per run.
    pub fn to_csv(&self) -> Result<String, csv::Error> {
        let mut w = csv::Writer::from_writer(Vec::new());
        for r in &self.runs {
            w.serialize(CsvRow::from(r))?;
        }
        let bytes = w.into_inner().map_err(|e| e.into_error())?;
        Ok(String::from_utf8(bytes).expect("serde output is UTF-8"))
    }

    /// The runs back from results.csv's text (the file-level fields are not in it).
    pub fn runs_from_csv(text: &str) -> Result<Vec<Record>, csv::Error> {
        csv::Reader::from_reader(text.as_bytes())
            .deserialize::<CsvRow>()
            .map(|row| row.map(Record::from))
            .collect()
    }

    /// The configurations in order of first appearance, each with its runs.
    pub fn groups(&self) -> Vec<(Key, Vec<&Record>)> {
        let mut out: Vec<(Key, Vec<&Record>)> = Vec::new();
        for r in &self.runs {
            let k = r.key();
            match out.iter_mut().find(|(g, _)| *g == k) {
                Some((_, v)) => v.push(r),
                None => out.push((k, vec![r])),
            }
        }
        out
    }
}

/// One run flattened for CSV (which has no nesting): the record's fields, then the
/// stats' (`per_round` as in the stats line, unknown keys as `k=v k=v`).
#[derive(Serialize, Deserialize)]
struct CsvRow {
    mem_mib: u64,
    dirty_level: String,
    rate_pps: u64,
    ws_pages: u64,
    workload: String,
    method: String,
    mode: String,
    repeat: u32,
    total_us: u64,
    downtime_us: u64,
    rounds: u32,
    bytes: u64,
    pages: u64,
    zero_pages: u64,
    final_dirty: u64,
    final_bytes: u64,
    throughput_vs_link: f64,
    downtime_vs_final_at_link: f64,
    wire_vs_mem: f64,
    stop: String,
    outcome: String,
    guest: u32,
    image: String,
    peer: String,
    #[serde(rename = "throughput_kBps")]
    throughput_kbps: u64,
    per_round: String,
    extra: String,
}

impl From<&Record> for CsvRow {
    fn from(r: &Record) -> Self {
        let s = &r.stats;
        Self {
            mem_mib: r.mem_mib,
            dirty_level: r.dirty_level.clone(),
            rate_pps: r.rate_pps,
            ws_pages: r.ws_pages,
            workload: r.workload.clone(),
            method: r.method.clone(),
            mode: r.mode.clone(),
            repeat: r.repeat,
            total_us: s.total_us,
            downtime_us: s.downtime_us,
            rounds: s.rounds,
            bytes: s.bytes,
            pages: s.pages,
            zero_pages: s.zero_pages,
            final_dirty: s.final_dirty,
            final_bytes: s.final_bytes,
            throughput_vs_link: r.throughput_vs_link,
            downtime_vs_final_at_link: r.downtime_vs_final_at_link,
            wire_vs_mem: r.wire_vs_mem,
            stop: s.stop.clone(),
            outcome: s.outcome.clone(),
            guest: s.guest,
            image: s.image.clone(),
            peer: s.peer.clone(),
            throughput_kbps: s.throughput_kbps,
            per_round: stats::format_rounds(&s.per_round),
            extra: s
                .extra
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}

impl From<CsvRow> for Record {
    fn from(c: CsvRow) -> Self {
        let stats = MigrationStats {
            guest: c.guest,
            image: c.image,
            mem_bytes: c.mem_mib << 20,
            peer: c.peer,
            method: c.method.clone(),
            mode: c.mode.clone(),
            outcome: c.outcome,
            total_us: c.total_us,
            downtime_us: c.downtime_us,
            rounds: c.rounds,
            bytes: c.bytes,
            pages: c.pages,
            zero_pages: c.zero_pages,
            final_dirty: c.final_dirty,
            final_bytes: c.final_bytes,
            stop: c.stop,
            throughput_kbps: c.throughput_kbps,
            per_round: stats::parse_rounds(&c.per_round).unwrap_or_default(),
            extra: c
                .extra
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        Self {
            mem_mib: c.mem_mib,
            dirty_level: c.dirty_level,
            rate_pps: c.rate_pps,
            ws_pages: c.ws_pages,
            workload: c.workload,
            method: c.method,
            mode: c.mode,
            repeat: c.repeat,
            throughput_vs_link: c.throughput_vs_link,
            downtime_vs_final_at_link: c.downtime_vs_final_at_link,
            wire_vs_mem: c.wire_vs_mem,
            stats,
        }
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A small results set: two configurations, the first with two repeats.
    pub fn sample() -> Results {
        let line = |total: u64, down: u64, extra: &str| {
            MigrationStats::parse(&format!(
                "MIGRATION-STATS guest=1 image=verify mem_bytes=16777216 peer=10.0.0.2:7000 method=pml mode=precopy outcome=ok total_us={total} downtime_us={down} rounds=2 bytes=20000000 pages=4100 zero_pages=10 final_dirty=3 final_bytes=12288 stop=fits-downtime throughput_kBps=800 per_round=4096:16000000:1000,4:16464:22875{extra}"
            ))
            .unwrap()
        };
        let link = 1e6;
        let mut stop = line(30_000_000, 29_000_000, "");
        stop.mode = "stop".into();
        stop.method = "none".into();
        stop.per_round.clear();
        Results {
            schema: SCHEMA,
            date: "2026-01-01T00:00:00Z".into(),
            host: "h, \"quoted\"".into(),
            git: "abc".into(),
            emulator: "bochs ips=1".into(),
            link_bytes_per_s: link,
            link_two_connections_bytes_per_s: None,
            cipher_seal_bytes_per_s: None,
            cipher_seal_cycles_per_byte: None,
            runs: vec![
                Record::new(
                    16,
                    "high",
                    100,
                    4096,
                    "verify",
                    "pml",
                    "precopy",
                    1,
                    line(20_000_000, 40_000, " heap_peak=4096"),
                    link,
                ),
                Record::new(
                    16,
                    "high",
                    100,
                    4096,
                    "verify",
                    "pml",
                    "precopy",
                    2,
                    line(24_000_000, 60_000, ""),
                    link,
                ),
                Record::new(
                    16, "high", 100, 4096, "verify", "none", "stop", 1, stop, link,
                ),
            ],
        }
    }

    #[test]
    fn ratios_against_the_link() {
        let r = &sample().runs[0];
        // 20 MB in 20 s over a 1 MB/s link.
        assert!((r.throughput_vs_link - 1.0).abs() < 1e-9);
        // 40 ms down for 12288 bytes that take 12.288 ms at link speed.
        assert!((r.downtime_vs_final_at_link - 40_000.0 / 12_288.0).abs() < 1e-9);
        assert!((r.wire_vs_mem - 20e6 / 16777216.0).abs() < 1e-9);
    }

    #[test]
    fn json_round_trip() {
        let s = sample();
        let j = s.to_json();
        assert!(j.contains("\"schema\": 2"));
        assert_eq!(Results::from_json(&j).unwrap(), s);
    }

    #[test]
    fn csv_round_trip() {
        let s = sample();
        let c = s.to_csv().unwrap();
        assert_eq!(c.lines().count(), 1 + s.runs.len());
        assert!(c.starts_with("mem_mib,dirty_level,"));
        assert_eq!(Results::runs_from_csv(&c).unwrap(), s.runs);
    }

    #[test]
    fn loads_the_hand_written_format() {
        let old = r#"{
  "date": "2026-11-22T22:38:31Z", "host": "vm", "git": "ddbdc1c", "emulator": "bochs ips=50000000", "link_bytes_per_s": 1159000,
  "runs": [
    {"mem_mib": 16, "dirty_level": "idle", "rate_pps": 1, "ws_pages": 4096, "mode": "precopy", "method": "pml", "total_us": 17525381, "downtime_us": 22018, "rounds": 2, "bytes": 15840016, "zero_pages": 275, "final_dirty": 7, "final_bytes": 29056, "stop": "fits-downtime", "per_round": "4096:15716368:17102822,23:94592:116039", "throughput_vs_link": 0.7798, "downtime_vs_final_at_link": 0.8783, "wire_vs_mem": 0.9441},
    {"mem_mib": 16, "dirty_level": "idle", "rate_pps": 1, "ws_pages": 4096, "mode": "stop", "method": "none", "total_us": 18386840, "downtime_us": 18384786, "rounds": 0, "bytes": 15716624, "zero_pages": 275, "final_dirty": 4096, "final_bytes": 15716624, "stop": "stop-and-copy", "per_round": "-", "throughput_vs_link": 0.7375, "downtime_vs_final_at_link": 1.3558, "wire_vs_mem": 0.9368}
  ]
}"#;
        let r = Results::from_json(old).unwrap();
        assert_eq!(r.schema, SCHEMA);
        assert_eq!(r.runs.len(), 2);
        assert_eq!(r.runs[0].stats.per_round.len(), 2);
        assert_eq!(r.runs[0].stats.total_us, 17525381);
        assert!(r.runs[1].stats.per_round.is_empty());
        assert_eq!(r.runs[1].key().to_string(), "16 MiB idle stop ws 4096");
        // Converted, it round-trips in the new schema.
        assert_eq!(Results::from_json(&r.to_json()).unwrap(), r);
    }

    #[test]
    fn rejects_newer_schema() {
        assert!(matches!(
            Results::from_json(r#"{"schema": 99}"#),
            Err(LoadError::Schema(99))
        ));
        assert!(matches!(
            Results::from_json("[1, 2]"),
            Err(LoadError::Json(_))
        ));
    }

    #[test]
    fn groups_keep_order_and_repeats() {
        let s = sample();
        let g = s.groups();
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].1.len(), 2);
        assert_eq!(g[1].0.mode, "stop");
    }
}
