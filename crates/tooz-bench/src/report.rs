//! Turning samples into figures, and figures into the table and the JSON file.

use std::time::Duration;

use serde_json::{Map, Value, json};

/// What one scenario measured.
#[derive(Debug, Clone)]
pub(crate) struct Measured {
    /// One duration per operation (or per batch, see `ops_per_sample`).
    pub(crate) samples: Vec<Duration>,
    /// Operations each sample covers (1, except for batched micro-operations).
    pub(crate) ops_per_sample: u64,
    /// Client round trips over all samples, when the backend is reached over a network.
    pub(crate) round_trips: Option<u64>,
}

/// The figures of one scenario.
#[derive(Debug, Clone)]
pub(crate) struct Figures {
    pub(crate) name: &'static str,
    pub(crate) median_us: f64,
    pub(crate) p99_us: f64,
    /// Operations per second of measured time (sum of the samples): 1 / mean latency.
    pub(crate) ops_per_s: f64,
    pub(crate) requests_per_op: Option<f64>,
    /// memcached only: command lines per operation (see [`crate::proxy`]).
    pub(crate) commands_per_op: Option<f64>,
    pub(crate) ratio_to_floor: Option<f64>,
    pub(crate) ratio_to_write_floor: Option<f64>,
}

impl Measured {
    /// Operations the samples cover.
    pub(crate) fn ops(&self) -> u64 {
        self.samples.len() as u64 * self.ops_per_sample.max(1)
    }

    pub(crate) fn figures(&self, name: &'static str) -> Figures {
        let per = self.ops_per_sample.max(1) as f64;
        let mut us: Vec<f64> = self
            .samples
            .iter()
            .map(|d| d.as_secs_f64() * 1e6 / per)
            .collect();
        us.sort_by(f64::total_cmp);
        let total_s: f64 = self.samples.iter().map(Duration::as_secs_f64).sum();
        let ops = self.samples.len() as f64 * per;
        Figures {
            name,
            median_us: percentile(&us, 0.5),
            p99_us: percentile(&us, 0.99),
            ops_per_s: if total_s > 0.0 { ops / total_s } else { 0.0 },
            requests_per_op: self.round_trips.map(|n| n as f64 / ops.max(1.0)),
            commands_per_op: None,
            ratio_to_floor: None,
            ratio_to_write_floor: None,
        }
    }
}

/// Nearest-rank percentile of sorted values (0 when empty).
pub(crate) fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Fills in the ratios: every scenario's median over the `floor_rtt` median, and over the
/// `floor_write` median where that floor exists.
pub(crate) fn add_ratios(figures: &mut [Figures]) {
    let floor = |n: &str| {
        figures
            .iter()
            .find(|f| f.name == n)
            .map(|f| f.median_us)
            .filter(|m| *m > 0.0)
    };
    let rtt = floor("floor_rtt");
    let write = floor("floor_write");
    for f in figures.iter_mut() {
        f.ratio_to_floor = rtt.map(|r| f.median_us / r);
        f.ratio_to_write_floor = write.map(|w| f.median_us / w);
    }
}

fn fmt_opt(v: Option<f64>, digits: usize, none: &str) -> String {
    v.map_or_else(|| none.to_owned(), |v| format!("{v:.digits$}"))
}

/// The table printed on stdout.
pub(crate) fn table(driver: &str, figures: &[Figures], notes: &[String]) -> String {
    let mut out = format!("tooz-bench: driver {driver}\n");
    out.push_str(&format!(
        "{:<18} | {:>12} | {:>12} | {:>12} | {:>7} | {:>9}\n",
        "scenario", "median µs", "p99 µs", "ops/s", "req/op", "×floor"
    ));
    out.push_str(&format!("{}\n", "-".repeat(18 + 12 * 3 + 7 + 9 + 15)));
    for f in figures {
        out.push_str(&format!(
            "{:<18} | {:>12.2} | {:>12.2} | {:>12.0} | {:>7} | {:>9}\n",
            f.name,
            f.median_us,
            f.p99_us,
            f.ops_per_s,
            fmt_opt(f.requests_per_op, 2, "n/a"),
            fmt_opt(f.ratio_to_floor, 2, "-"),
        ));
    }
    let commands: Vec<String> = figures
        .iter()
        .filter_map(|f| Some(format!("{} {:.2}", f.name, f.commands_per_op?)))
        .collect();
    if !commands.is_empty() {
        out.push_str(&format!(
            "memcached commands per op: {}\n",
            commands.join(", ")
        ));
    }
    for n in notes {
        out.push_str(&format!("note: {n}\n"));
    }
    out
}

/// The JSON document written to `--json-out`.
pub(crate) fn json(driver: &str, figures: &[Figures], notes: &[String]) -> Value {
    let mut scenarios = Map::new();
    for f in figures {
        scenarios.insert(f.name.to_owned(), figure_json(f));
    }
    json!({ "driver": driver, "scenarios": scenarios, "notes": notes })
}

/// One scenario's figures as JSON (also the shape of a peer's scenarios).
pub(crate) fn figure_json(f: &Figures) -> Value {
    let mut s = json!({
        "median_us": f.median_us,
        "p99_us": f.p99_us,
        "ops_per_s": f.ops_per_s,
        "requests_per_op": f.requests_per_op,
        "ratio_to_floor": f.ratio_to_floor,
    });
    if let Some(w) = f.ratio_to_write_floor {
        s["ratio_to_write_floor"] = json!(w);
    }
    if let Some(c) = f.commands_per_op {
        s["commands_per_op"] = json!(c);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert!((percentile(&v, 0.5) - 50.0).abs() < f64::EPSILON);
        assert!((percentile(&v, 0.99) - 99.0).abs() < f64::EPSILON);
        assert!((percentile(&[7.0], 0.99) - 7.0).abs() < f64::EPSILON);
        assert!(percentile(&[], 0.5).abs() < f64::EPSILON);
    }

    #[test]
    fn figures_and_ratios() {
        let m = Measured {
            samples: vec![Duration::from_micros(10); 4],
            ops_per_sample: 1,
            round_trips: Some(8),
        };
        let mut f = vec![m.figures("floor_rtt"), m.figures("lock_pair")];
        add_ratios(&mut f);
        assert_eq!(f[1].requests_per_op, Some(2.0));
        assert!((f[1].ops_per_s - 100_000.0).abs() < 1.0);
        assert_eq!(f[1].ratio_to_floor, Some(1.0));
        assert_eq!(f[1].ratio_to_write_floor, None);
    }
}
