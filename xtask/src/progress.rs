//! Progress of long runs (the benchmark matrix, the end-to-end scenarios): a live
//! indicatif bar with the current item, elapsed time and an estimate when stderr is a
//! terminal; one plain line per item otherwise, so CI logs stay readable.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// A run of `total` items.
pub struct Progress {
    bar: Option<ProgressBar>,
    what: &'static str,
    total: u64,
    done: u64,
    started: Instant,
}

/// Prints log lines without tearing the bar; cheap to clone into reader threads.
#[derive(Clone)]
pub struct Logger {
    bar: Option<ProgressBar>,
}

impl Logger {
    /// Prints `text` on stderr (above the bar when there is one).
    pub fn line(&self, text: &str) {
        match &self.bar {
            // println on a bar prints above it and redraws it.
            Some(b) => b.println(text),
            None => eprintln!("{text}"),
        }
    }
}

impl Progress {
    /// Starts a run of `total` items, labelled `what` (the line prefix).
    pub fn new(what: &'static str, total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(total);
            let style = ProgressStyle::with_template(
                "{prefix}: {pos}/{len} [{bar:24}] {elapsed_precise} elapsed, ~{eta} left  {wide_msg}",
            )
            .expect("static template")
            .progress_chars("=> ");
            b.set_style(style);
            b.set_prefix(what);
            b.enable_steady_tick(Duration::from_millis(500));
            b
        });
        Self {
            bar,
            what,
            total,
            done: 0,
            started: Instant::now(),
        }
    }

    /// A printer for log lines.
    pub fn logger(&self) -> Logger {
        Logger {
            bar: self.bar.clone(),
        }
    }

    /// Prints a log line.
    pub fn line(&self, text: &str) {
        self.logger().line(text);
    }

    /// The next item begins.
    pub fn start(&mut self, label: &str) {
        match &self.bar {
            Some(b) => b.set_message(label.to_string()),
            None => eprintln!(
                "{}",
                plain_line(
                    self.what,
                    self.done + 1,
                    self.total,
                    label,
                    self.started.elapsed(),
                    self.done
                )
            ),
        }
    }

    /// The current item is finished.
    pub fn finish_one(&mut self) {
        self.done += 1;
        if let Some(b) = &self.bar {
            b.inc(1);
        }
    }

    /// The run is over (the bar is replaced by a summary line).
    pub fn finish(self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        eprintln!(
            "{}: {} of {} done in {}",
            self.what,
            self.done,
            self.total,
            hms(self.started.elapsed())
        );
    }
}

/// `bench: [3/40] label (1m05s elapsed, ~2m10s left)`: the estimate is the mean time
/// per finished item times the items left.
fn plain_line(what: &str, n: u64, total: u64, label: &str, elapsed: Duration, done: u64) -> String {
    let eta = if done == 0 {
        String::new()
    } else {
        let left = elapsed.mul_f64((total.saturating_sub(done)) as f64 / done as f64);
        format!(", ~{} left", hms(left))
    };
    format!(
        "{what}: [{n}/{total}] {label} ({} elapsed{eta})",
        hms(elapsed)
    )
}

/// `1h02m03s`, `2m03s`, `3s`.
fn hms(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, s) => format!("{h}h{m:02}m{s:02}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_carry_position_elapsed_and_estimate() {
        assert_eq!(
            plain_line("bench", 1, 4, "16 MiB idle pml", Duration::ZERO, 0),
            "bench: [1/4] 16 MiB idle pml (0s elapsed)"
        );
        // Two done in 2 min: two left take about 2 min more.
        assert_eq!(
            plain_line("bench", 3, 4, "x", Duration::from_secs(120), 2),
            "bench: [3/4] x (2m00s elapsed, ~2m00s left)"
        );
        assert_eq!(hms(Duration::from_secs(3723)), "1h02m03s");
    }
}
