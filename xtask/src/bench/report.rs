//! The benchmark's text outputs: the table of medians (min-max) per configuration, and
//! the comparison of two results files figure by figure.

use std::fmt::Write as _;

use super::results::{Key, Record, Results};

/// Median, min and max of a non-empty sample (the median of an even count is the
/// upper middle, as the table always showed).
pub fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// A figure of a run that the table and the comparison show.
pub struct Figure {
    /// Column name.
    pub name: &'static str,
    /// The value from a run.
    pub get: fn(&Record) -> f64,
}

/// The figures compared between runs, in column order.
pub const FIGURES: &[Figure] = &[
    Figure {
        name: "total ms",
        get: |r| r.stats.total_us as f64 / 1e3,
    },
    Figure {
        name: "downtime ms",
        get: |r| r.stats.downtime_us as f64 / 1e3,
    },
    Figure {
        name: "rounds",
        get: |r| f64::from(r.stats.rounds),
    },
    Figure {
        name: "MB",
        get: |r| r.stats.bytes as f64 / 1e6,
    },
    Figure {
        name: "thr/ln",
        get: |r| r.throughput_vs_link,
    },
    Figure {
        name: "dt/fin",
        get: |r| r.downtime_vs_final_at_link,
    },
    Figure {
        name: "wire",
        get: |r| r.wire_vs_mem,
    },
];

fn col(rs: &[&Record], f: fn(&Record) -> f64) -> (f64, f64, f64) {
    spread(rs.iter().map(|r| f(r)).collect())
}

/// results.txt: one row per configuration, medians with min-max where it matters.
pub fn table(res: &Results) -> String {
    let mut t = format!(
        "migration benchmark, {}, {}, git {}; link (netbench) {:.3} MB/s; times are the hypervisors' TSC clocks\n",
        res.date,
        res.emulator,
        res.git,
        res.link_bytes_per_s / 1e6
    );
    if let Some(bps) = res.link_two_connections_bytes_per_s {
        let _ = writeln!(
            t,
            "two connections in parallel (netbench): {:.3} MB/s = {:.2}x one",
            bps / 1e6,
            bps / res.link_bytes_per_s.max(1.0)
        );
    }
    if let (Some(bps), Some(cpb)) = (res.cipher_seal_bytes_per_s, res.cipher_seal_cycles_per_byte) {
        let _ = writeln!(
            t,
            "secure channel: the source seals {:.3} MB/s ({cpb:.1} cycles/byte, ChaCha20-Poly1305) = {:.1}x the link",
            bps / 1e6,
            bps / res.link_bytes_per_s.max(1.0)
        );
    }
    let _ = writeln!(
        t,
        "{:>4} {:<8} {:>6} {:>6} {:<8} {:>16} {:>18} {:>4} {:>9} {:>7} {:>7} {:>6}",
        "MiB",
        "dirty",
        "pg/s",
        "ws pg",
        "method",
        "total ms",
        "downtime ms",
        "rnd",
        "MB",
        "thr/ln",
        "dt/fin",
        "wire"
    );
    for (k, rs) in res.groups() {
        let [t_, d, rn, mb, thr, dt, w] = [0, 1, 2, 3, 4, 5, 6].map(|i| col(&rs, FIGURES[i].get));
        let method = k.method_label();
        let _ = writeln!(
            t,
            "{:>4} {:<8} {:>6} {:>6} {:<8} {:>16} {:>18} {:>4.0} {:>9.2} {:>7.2} {:>7.2} {:>6.2}",
            k.mem_mib,
            k.dirty_level,
            rs[0].rate_pps,
            k.ws_pages,
            method,
            format!("{:.0} ({:.0}-{:.0})", t_.0, t_.1, t_.2),
            format!("{:.1} ({:.1}-{:.1})", d.0, d.1, d.2),
            rn.0,
            mb.0,
            thr.0,
            dt.0,
            w.0
        );
    }
    t.push_str("thr/ln = stream throughput / netbench; dt/fin = downtime / (final bytes at link speed); wire = bytes on the wire / guest memory\n");
    let post: Vec<_> = res
        .groups()
        .into_iter()
        .filter(|(_, rs)| {
            rs.iter()
                .any(|r| r.stats.get("postcopy").as_deref() == Some("1"))
        })
        .collect();
    if !post.is_empty() {
        let _ = writeln!(
            t,
            "\npost-copy (medians): pages missing at the hand-over, remote faults, pages prepaged, fault service median/max (destination clock), last page after COMMIT\n{:>4} {:<8} {:<12} {:>8} {:>7} {:>8} {:>10} {:>10} {:>10}",
            "MiB", "dirty", "method", "missing", "faults", "prepaged", "med us", "max us", "last ms"
        );
        for (k, rs) in post {
            let f = |key: &'static str| {
                spread(
                    rs.iter()
                        .map(|r| {
                            r.stats
                                .get(key)
                                .and_then(|v| v.parse::<f64>().ok())
                                .unwrap_or(0.0)
                        })
                        .collect(),
                )
                .0
            };
            let _ = writeln!(
                t,
                "{:>4} {:<8} {:<12} {:>8.0} {:>7.0} {:>8.0} {:>10.0} {:>10.0} {:>10.0}",
                k.mem_mib,
                k.dirty_level,
                k.method_label(),
                f("post_missing"),
                f("faults"),
                f("prepaged"),
                f("fault_median_us"),
                f("fault_max_us"),
                f("last_page_us") / 1e3
            );
        }
    }
    t
}

/// One configuration present in both files: per figure, (old median, new median).
pub struct Compared {
    /// The configuration.
    pub key: Key,
    /// Medians in [`FIGURES`] order.
    pub figures: Vec<(f64, f64)>,
}

/// new / old, or NaN when old is 0 and new is not (no meaningful ratio); 1 when both
/// are 0.
pub fn ratio(old: f64, new: f64) -> f64 {
    if old == 0.0 {
        if new == 0.0 {
            1.0
        } else {
            f64::NAN
        }
    } else {
        new / old
    }
}

/// Matches configurations of `new` with `old`; also returns those only in one of them.
pub fn compare(old: &Results, new: &Results) -> (Vec<Compared>, Vec<Key>, Vec<Key>) {
    let og = old.groups();
    let ng = new.groups();
    let mut both = Vec::new();
    let mut only_new = Vec::new();
    for (k, nrs) in &ng {
        match og.iter().find(|(ok, _)| ok == k) {
            Some((_, ors)) => both.push(Compared {
                key: k.clone(),
                figures: FIGURES
                    .iter()
                    .map(|f| (col(ors, f.get).0, col(nrs, f.get).0))
                    .collect(),
            }),
            None => only_new.push(k.clone()),
        }
    }
    let only_old = og
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| !ng.iter().any(|(n, _)| n == k))
        .collect();
    (both, only_old, only_new)
}

/// The comparison as text: per configuration, each figure's new/old ratio of medians.
pub fn compare_text(old: &Results, new: &Results) -> String {
    let (both, only_old, only_new) = compare(old, new);
    let mut t = format!(
        "comparison: new/old ratios of medians\n  old: {} git {} {} link {:.3} MB/s\n  new: {} git {} {} link {:.3} MB/s (ratio {:.2})\n",
        old.date,
        old.git,
        old.emulator,
        old.link_bytes_per_s / 1e6,
        new.date,
        new.git,
        new.emulator,
        new.link_bytes_per_s / 1e6,
        ratio(old.link_bytes_per_s, new.link_bytes_per_s)
    );
    let _ = write!(t, "{:<32}", "configuration");
    for f in FIGURES {
        let _ = write!(t, " {:>11}", f.name);
    }
    t.push('\n');
    for c in &both {
        let _ = write!(t, "{:<32}", c.key.to_string());
        for &(o, n) in &c.figures {
            let r = ratio(o, n);
            let cell = if r.is_nan() {
                "n/a".to_string()
            } else {
                format!("{r:.2}x")
            };
            let _ = write!(t, " {cell:>11}");
        }
        t.push('\n');
    }
    for (what, keys) in [("only in old", only_old), ("only in new", only_new)] {
        if !keys.is_empty() {
            let names: Vec<String> = keys.iter().map(Key::to_string).collect();
            let _ = writeln!(t, "{what}: {}", names.join("; "));
        }
    }
    t.push_str("(below 1x: smaller in the new run; thr/ln above 1x is better)\n");
    t
}

#[cfg(test)]
mod tests {
    use super::super::results::tests::sample;
    use super::*;

    #[test]
    fn medians_and_spread() {
        assert_eq!(spread(vec![3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(spread(vec![4.0, 1.0]), (4.0, 1.0, 4.0));
        assert_eq!(spread(vec![]), (0.0, 0.0, 0.0));
    }

    #[test]
    fn ratios() {
        assert_eq!(ratio(2.0, 3.0), 1.5);
        assert_eq!(ratio(0.0, 0.0), 1.0);
        assert!(ratio(0.0, 1.0).is_nan());
    }

    #[test]
    fn compares_medians_per_configuration() {
        let old = sample();
        let mut new = sample();
        // Twice the downtime in every run, one configuration dropped.
        for r in &mut new.runs {
            r.stats.downtime_us *= 2;
        }
        new.runs.pop();
        let (both, only_old, only_new) = compare(&old, &new);
        assert_eq!(both.len(), 1);
        assert_eq!(only_old.len(), 1);
        assert!(only_new.is_empty());
        let (o, n) = both[0].figures[1];
        assert_eq!(ratio(o, n), 2.0);
        let (o, n) = both[0].figures[0];
        assert_eq!(ratio(o, n), 1.0);
        let text = compare_text(&old, &new);
        assert!(text.contains("16 MiB high pml ws 4096"), "{text}");
        assert!(text.contains("2.00x"), "{text}");
        assert!(
            text.contains("only in old: 16 MiB high stop ws 4096"),
            "{text}"
        );
    }

    #[test]
    fn table_has_a_row_per_configuration() {
        let t = table(&sample());
        assert_eq!(t.lines().count(), 2 + 2 + 1);
        // Two repeats: median (upper middle) with the range.
        assert!(t.contains("24000 (20000-24000)"), "{t}");
    }
}
