//! Benchmarks behind `credvault bench SCENARIO`: each starts what it needs,
//! runs bounded, prints a table and writes JSON. Bars are ratios measured in
//! one run on one machine. Timing lives here, never in tests.

pub mod audit;
pub mod backup;
pub mod grpc;
pub mod journal;
pub mod memory;
pub mod rotation;
pub mod store;

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

/// CPU counters at one moment, in seconds (from `/proc`, 10 ms ticks).
pub(crate) struct CpuSample {
    pub at: std::time::Instant,
    /// The machine's busy and total CPU time, all cores.
    pub machine_busy: f64,
    pub machine_total: f64,
    /// This process's user and system time.
    pub process: f64,
}

impl CpuSample {
    const TICK: f64 = 0.01;

    pub fn now() -> Self {
        let (machine_busy, machine_total) = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|stat| {
                let ticks: Vec<f64> = stat
                    .lines()
                    .next()?
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|t| t.parse().ok())
                    .collect();
                let total: f64 = ticks.iter().take(8).sum();
                let idle = ticks.get(3)? + ticks.get(4)?; // idle and iowait
                Some(((total - idle) * Self::TICK, total * Self::TICK))
            })
            .unwrap_or_default();
        let process = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| {
                // The command name may hold spaces: count fields after its ')'.
                let fields: Vec<&str> = s.get(s.rfind(')')? + 2..)?.split_whitespace().collect();
                let utime: f64 = fields.get(11)?.parse().ok()?;
                let stime: f64 = fields.get(12)?.parse().ok()?;
                Some((utime + stime) * Self::TICK)
            })
            .unwrap_or_default();
        Self {
            at: std::time::Instant::now(),
            machine_busy,
            machine_total,
            process,
        }
    }
}

impl CpuSample {
    /// The CPU seconds used between `earlier` and this sample (totals; see
    /// [`CpuWindow::average`]).
    pub fn since(&self, earlier: &Self) -> CpuWindow {
        let busy = self.machine_busy - earlier.machine_busy;
        let process = self.process - earlier.process;
        CpuWindow {
            phase: String::new(),
            seconds: (self.at - earlier.at).as_secs_f64(),
            machine_busy: busy,
            machine_cores: self.machine_total - earlier.machine_total,
            process,
            others: busy - process,
        }
    }
}

/// CPU use over a phase: CPU seconds (totals) until [`CpuWindow::average`]
/// turns them into cores (CPU seconds per second).
#[derive(Debug, Clone, Default, Serialize)]
pub struct CpuWindow {
    pub phase: String,
    pub seconds: f64,
    pub machine_busy: f64,
    pub machine_cores: f64,
    /// This process.
    pub process: f64,
    /// Every other process on the machine.
    pub others: f64,
}

impl CpuWindow {
    /// Adds another window's totals.
    pub fn add(&mut self, other: &CpuWindow) {
        self.seconds += other.seconds;
        self.machine_busy += other.machine_busy;
        self.machine_cores += other.machine_cores;
        self.process += other.process;
        self.others += other.others;
    }

    /// Totals over `seconds` → cores.
    pub fn average(self) -> CpuWindow {
        let s = self.seconds.max(f64::MIN_POSITIVE);
        CpuWindow {
            machine_busy: self.machine_busy / s,
            machine_cores: self.machine_cores / s,
            process: self.process / s,
            others: self.others / s,
            ..self
        }
    }
}

/// One measured row.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub name: String,
    pub ops: u64,
    pub seconds: f64,
    pub ops_per_sec: f64,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub p999_us: Option<f64>,
}

impl Row {
    /// A row from an operation count, the elapsed time and (optionally) latencies.
    pub fn new(
        name: impl Into<String>,
        ops: u64,
        elapsed: Duration,
        latencies: Option<&mut [Duration]>,
    ) -> Self {
        let seconds = elapsed.as_secs_f64();
        let (p50_us, p99_us, p999_us) = match latencies {
            Some(l) if !l.is_empty() => {
                l.sort_unstable();
                (
                    Some(percentile(l, 0.50)),
                    Some(percentile(l, 0.99)),
                    Some(percentile(l, 0.999)),
                )
            }
            _ => (None, None, None),
        };
        Self {
            name: name.into(),
            ops,
            seconds,
            ops_per_sec: ops as f64 / seconds,
            p50_us,
            p99_us,
            p999_us,
        }
    }
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    let index = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index].as_secs_f64() * 1e6
}

/// A bar: a ratio between two rows and the value it must reach.
#[derive(Debug, Clone, Serialize)]
pub struct Bar {
    pub name: String,
    pub ratio: f64,
    /// The ratio must be at least this.
    pub at_least: f64,
    pub pass: bool,
}

impl Bar {
    pub fn new(name: impl Into<String>, ratio: f64, at_least: f64) -> Self {
        Self {
            name: name.into(),
            ratio,
            at_least,
            pass: ratio >= at_least,
        }
    }
}

/// The result of one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub machine: String,
    pub rows: Vec<Row>,
    pub bars: Vec<Bar>,
}

impl Report {
    pub fn new(scenario: &str) -> Self {
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        Self {
            scenario: scenario.into(),
            machine: format!("{cores} cores"),
            rows: Vec::new(),
            bars: Vec::new(),
        }
    }

    /// The table, as printed.
    pub fn table(&self) -> String {
        let fmt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
        let mut out = format!(
            "scenario: {} ({})\n{:<44} {:>10} {:>8} {:>12} {:>9} {:>9} {:>9}\n",
            self.scenario,
            self.machine,
            "measurement",
            "ops",
            "secs",
            "ops/s",
            "p50 µs",
            "p99 µs",
            "p99.9 µs"
        );
        for r in &self.rows {
            out += &format!(
                "{:<44} {:>10} {:>8.2} {:>12.0} {:>9} {:>9} {:>9}\n",
                r.name,
                r.ops,
                r.seconds,
                r.ops_per_sec,
                fmt(r.p50_us),
                fmt(r.p99_us),
                fmt(r.p999_us)
            );
        }
        for b in &self.bars {
            out += &format!(
                "bar: {:<50} {:>8.3} (≥ {:.2}) {}\n",
                b.name,
                b.ratio,
                b.at_least,
                if b.pass { "PASS" } else { "FAIL" }
            );
        }
        out
    }

    /// Prints the table and writes the JSON to `out`.
    pub fn finish(&self, out: &Path) -> std::io::Result<()> {
        print!("{}", self.table());
        write_json(out, self)
    }

    pub fn row(&self, name: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.name == name)
    }
}

/// Writes `value` as pretty JSON to `out` (creating its directory) and says where.
pub fn write_json(out: &Path, value: &impl serde::Serialize) -> std::io::Result<()> {
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(
        out,
        serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?,
    )?;
    println!("wrote {}", out.display());
    Ok(())
}
