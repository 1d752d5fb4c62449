//! A small Prometheus registry: counters, gauges and fixed-bucket histograms, optionally
//! labelled, rendered in the text exposition format (0.0.4).
//!
//! Hot paths only touch atomics; labelled families add one read-locked map lookup. Every
//! metric voicectl exports is a field of [`Metrics`], so the full list, names and help texts
//! live in one place, and [`Metrics::render`] writes them in that order.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A family stops growing at this many label combinations; further ones share one series
/// whose labels all read `_overflow`, so a labelling mistake cannot exhaust memory.
pub const MAX_SERIES_PER_FAMILY: usize = 1000;
const OVERFLOW: &str = "_overflow";

/// Buckets (seconds) for HTTP request handling.
pub const HTTP_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Buckets (seconds) for conversational latencies: greeting, turn, barge-in.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0,
];
/// Buckets (seconds) for whole calls.
pub const CALL_DURATION_BUCKETS: &[f64] = &[
    5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0,
];

/// A monotonically increasing count.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.inc_by(1);
    }
    pub fn inc_by(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down (integers: counts, states, Unix timestamps).
#[derive(Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn add(&self, d: i64) {
        self.0.fetch_add(d, Ordering::Relaxed);
    }
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn dec(&self) {
        self.add(-1);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Observations counted into fixed buckets (upper bounds, ascending), plus their sum.
pub struct Histogram {
    bounds: &'static [f64],
    /// Non-cumulative counts; the last slot is the implicit `+Inf` bucket.
    counts: Box<[AtomicU64]>,
    /// f64 bits, updated with a compare-exchange loop.
    sum: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }

    pub fn observe(&self, v: f64) {
        if v.is_nan() {
            return;
        }
        let i = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let mut cur = self.sum.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(cur) + v).to_bits();
            match self
                .sum
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    pub fn sum(&self) -> f64 {
        f64::from_bits(self.sum.load(Ordering::Relaxed))
    }
}

/// Label values (for rendering) and the series they name.
type Series<M> = (Box<[String]>, Arc<M>);

/// One metric per combination of label values.
pub struct Family<M> {
    labels: &'static [&'static str],
    /// Keyed by the values joined with U+001F (which never appears in a sane label value);
    /// the values themselves are kept for rendering.
    series: RwLock<HashMap<String, Series<M>>>,
    make: Box<dyn Fn() -> M + Send + Sync>,
}

impl<M> Family<M> {
    pub fn new(
        labels: &'static [&'static str],
        make: impl Fn() -> M + Send + Sync + 'static,
    ) -> Self {
        Family {
            labels,
            series: RwLock::new(HashMap::new()),
            make: Box::new(make),
        }
    }

    /// The series for these label values (in the family's label order), created on first use.
    /// Label values must come from a small fixed set (route templates, statuses, engine
    /// names), never from request data.
    pub fn with(&self, values: &[&str]) -> Arc<M> {
        debug_assert_eq!(values.len(), self.labels.len(), "label count");
        let key = values.join("\u{1f}");
        {
            // A poisoned lock only means a panic elsewhere; the map is still consistent.
            let map = self.series.read().unwrap_or_else(|p| p.into_inner());
            if let Some((_, m)) = map.get(&key) {
                return m.clone();
            }
        }
        let mut map = self.series.write().unwrap_or_else(|p| p.into_inner());
        let (key, values): (String, Box<[String]>) =
            if map.len() >= MAX_SERIES_PER_FAMILY && !map.contains_key(&key) {
                let v: Box<[String]> = self.labels.iter().map(|_| OVERFLOW.to_owned()).collect();
                (v.join("\u{1f}"), v)
            } else {
                (key, values.iter().map(|v| (*v).to_owned()).collect())
            };
        map.entry(key)
            .or_insert_with(|| (values, Arc::new((self.make)())))
            .1
            .clone()
    }
}

impl<M> Family<M> {
    /// Every series with its label values, sorted by them.
    pub fn snapshot(&self) -> Vec<(Vec<String>, Arc<M>)> {
        let map = self.series.read().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<_> = map.values().map(|(v, m)| (v.to_vec(), m.clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

impl Family<Counter> {
    pub fn counter(labels: &'static [&'static str]) -> Self {
        Self::new(labels, Counter::default)
    }
}

impl Family<Gauge> {
    pub fn gauge(labels: &'static [&'static str]) -> Self {
        Self::new(labels, Gauge::default)
    }
}

impl Family<Histogram> {
    pub fn histogram(labels: &'static [&'static str], bounds: &'static [f64]) -> Self {
        Self::new(labels, move || Histogram::new(bounds))
    }
}

/// Something that writes its samples under a metric name.
pub trait Render {
    const KIND: &'static str;
    /// `labels` is already rendered (`a="x",b="y"`) or empty.
    fn samples(&self, name: &str, labels: &str, out: &mut String);
}

fn sample(out: &mut String, name: &str, labels: &str, value: impl std::fmt::Display) {
    if labels.is_empty() {
        let _ = writeln!(out, "{name} {value}");
    } else {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

impl Render for Counter {
    const KIND: &'static str = "counter";
    fn samples(&self, name: &str, labels: &str, out: &mut String) {
        sample(out, name, labels, self.get());
    }
}

impl Render for Gauge {
    const KIND: &'static str = "gauge";
    fn samples(&self, name: &str, labels: &str, out: &mut String) {
        sample(out, name, labels, self.get());
    }
}

impl Render for Histogram {
    const KIND: &'static str = "histogram";
    fn samples(&self, name: &str, labels: &str, out: &mut String) {
        let sep = if labels.is_empty() { "" } else { "," };
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c.load(Ordering::Relaxed);
            let le = match self.bounds.get(i) {
                Some(b) => fmt_f64(*b),
                None => "+Inf".to_owned(),
            };
            sample(
                out,
                &bucket,
                &format!("{labels}{sep}le=\"{le}\""),
                cumulative,
            );
        }
        sample(out, &format!("{name}_sum"), labels, fmt_f64(self.sum()));
        sample(out, &format!("{name}_count"), labels, cumulative);
    }
}

impl<M: Render> Render for Family<M> {
    const KIND: &'static str = M::KIND;
    fn samples(&self, name: &str, _: &str, out: &mut String) {
        for (values, m) in self.snapshot() {
            let labels: Vec<String> = self
                .labels
                .iter()
                .zip(values.iter())
                .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
                .collect();
            m.samples(name, &labels.join(","), out);
        }
    }
}

/// A value computed when scraped (process statistics).
struct Computed {
    kind: &'static str,
    value: f64,
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn fmt_f64(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{v}")
    }
}

/// Writes one metric family: `# HELP`, `# TYPE`, samples.
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn new() -> Self {
        Exposition { out: String::new() }
    }

    pub fn metric<M: Render>(&mut self, name: &str, help: &str, m: &M) -> &mut Self {
        self.header(name, help, M::KIND);
        m.samples(name, "", &mut self.out);
        self
    }

    fn computed(&mut self, name: &str, help: &str, c: Option<Computed>) -> &mut Self {
        if let Some(c) = c {
            self.header(name, help, c.kind);
            sample(&mut self.out, name, "", fmt_f64(c.value));
        }
        self
    }

    fn header(&mut self, name: &str, help: &str, kind: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    pub fn finish(self) -> String {
        self.out
    }
}

impl Default for Exposition {
    fn default() -> Self {
        Self::new()
    }
}

/// Circuit-breaker states as `voicectl_engine_circuit_state` values.
pub mod circuit {
    pub const CLOSED: i64 = 0;
    pub const HALF_OPEN: i64 = 1;
    pub const OPEN: i64 = 2;
}

/// Every metric voicectl exports. Shared as `Arc<Metrics>` (see `Ops::metrics`).
///
/// The "hooks" below have no producer yet; the code that owns each event updates them:
/// - `calls_active` / `calls_queued`: set on every change of the live set / queue depth;
/// - `calls_finished.with(&[status]).inc()` when a call reaches a terminal status;
/// - `call_duration.observe(secs)` for each answered call that ends;
/// - `greeting_latency` / `turn_latency` / `barge_in_latency`
///   `.with(&[engine]).observe(secs)`;
/// - `media_frames.with(&["in" | "out"]).inc_by(n)`;
/// - `engine_errors.with(&[engine, kind]).inc()`;
/// - `engine_circuit_state.with(&[engine]).set(circuit::OPEN)`;
/// - `certificate_expiry.with(&[domain]).set(not_after_unix_secs)`.
pub struct Metrics {
    pub http_requests: Family<Counter>,
    pub http_request_duration: Family<Histogram>,
    pub rate_limited: Family<Counter>,
    pub websockets_active: Gauge,
    pub draining: Gauge,
    pub calls_active: Gauge,
    pub calls_queued: Gauge,
    pub calls_finished: Family<Counter>,
    pub call_duration: Histogram,
    pub greeting_latency: Family<Histogram>,
    pub turn_latency: Family<Histogram>,
    pub barge_in_latency: Family<Histogram>,
    pub media_frames: Family<Counter>,
    pub engine_errors: Family<Counter>,
    pub engine_circuit_state: Family<Gauge>,
    pub certificate_expiry: Family<Gauge>,
    build_info: Family<Gauge>,
    start_time: f64,
}

impl Metrics {
    pub fn new() -> Metrics {
        let build_info = Family::gauge(&["version"]);
        build_info.with(&[env!("CARGO_PKG_VERSION")]).set(1);
        Metrics {
            http_requests: Family::counter(&["method", "route", "status"]),
            http_request_duration: Family::histogram(&["route"], HTTP_BUCKETS),
            rate_limited: Family::counter(&["limit"]),
            websockets_active: Gauge::default(),
            draining: Gauge::default(),
            calls_active: Gauge::default(),
            calls_queued: Gauge::default(),
            calls_finished: Family::counter(&["status"]),
            call_duration: Histogram::new(CALL_DURATION_BUCKETS),
            greeting_latency: Family::histogram(&["engine"], LATENCY_BUCKETS),
            turn_latency: Family::histogram(&["engine"], LATENCY_BUCKETS),
            barge_in_latency: Family::histogram(&["engine"], LATENCY_BUCKETS),
            media_frames: Family::counter(&["direction"]),
            engine_errors: Family::counter(&["engine", "kind"]),
            engine_circuit_state: Family::gauge(&["engine"]),
            certificate_expiry: Family::gauge(&["domain"]),
            build_info,
            start_time: process_start_time(),
        }
    }

    /// One HTTP request, labelled by the matched route template (never the raw path).
    pub fn record_http(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let status = status.to_string();
        self.http_requests.with(&[method, route, &status]).inc();
        self.http_request_duration
            .with(&[route])
            .observe_duration(elapsed);
    }

    /// The whole exposition, as served on `GET /metrics`.
    pub fn render(&self) -> String {
        let mut e = Exposition::new();
        e.metric(
            "voicectl_build_info",
            "Always 1; the version label says which voicectl is running.",
            &self.build_info,
        )
        .computed(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch, in seconds.",
            Some(Computed {
                kind: "gauge",
                value: self.start_time,
            }),
        )
        .computed(
            "process_cpu_seconds_total",
            "User and system CPU time spent, in seconds.",
            proc_cpu_seconds(),
        )
        .computed(
            "process_resident_memory_bytes",
            "Resident memory size, in bytes.",
            proc_resident_bytes(),
        )
        .computed(
            "process_open_fds",
            "Open file descriptors.",
            proc_open_fds(),
        )
        .computed(
            "process_max_fds",
            "Limit on open file descriptors (LimitNOFILE).",
            proc_max_fds(),
        )
        .metric(
            "voicectl_http_requests_total",
            "HTTP requests answered, by method, matched route template and status code.",
            &self.http_requests,
        )
        .metric(
            "voicectl_http_request_duration_seconds",
            "Time to answer HTTP requests, by matched route template.",
            &self.http_request_duration,
        )
        .metric(
            "voicectl_rate_limited_total",
            "Requests refused by a rate or concurrency limit (api, webhook, websocket, tenant_calls, headers).",
            &self.rate_limited,
        )
        .metric(
            "voicectl_websockets_active",
            "WebSocket connections currently held.",
            &self.websockets_active,
        )
        .metric(
            "voicectl_draining",
            "1 while the server drains before stopping, else 0.",
            &self.draining,
        )
        .metric(
            "voicectl_calls_active",
            "Calls currently live (initiating, ringing or in progress).",
            &self.calls_active,
        )
        .metric(
            "voicectl_calls_queued",
            "Calls waiting for a free slot (queue depth).",
            &self.calls_queued,
        )
        .metric(
            "voicectl_calls_finished_total",
            "Calls that reached a final status, by status.",
            &self.calls_finished,
        )
        .metric(
            "voicectl_call_duration_seconds",
            "Duration of answered calls, in seconds.",
            &self.call_duration,
        )
        .metric(
            "voicectl_greeting_latency_seconds",
            "From answer to the first agent audio sent to the caller, by engine.",
            &self.greeting_latency,
        )
        .metric(
            "voicectl_turn_latency_seconds",
            "From the caller's end of speech to the first agent audio, by engine.",
            &self.turn_latency,
        )
        .metric(
            "voicectl_barge_in_latency_seconds",
            "From detected caller speech to agent audio stopped, by engine.",
            &self.barge_in_latency,
        )
        .metric(
            "voicectl_media_frames_total",
            "Media frames relayed, by direction (in: from the caller, out: to the caller).",
            &self.media_frames,
        )
        .metric(
            "voicectl_engine_errors_total",
            "Voice engine errors, by engine and kind.",
            &self.engine_errors,
        )
        .metric(
            "voicectl_engine_circuit_state",
            "Circuit breaker per engine: 0 closed, 1 half-open, 2 open.",
            &self.engine_circuit_state,
        )
        .metric(
            "voicectl_tls_certificate_expiry_timestamp_seconds",
            "Expiry (notAfter) of the served certificate, by domain, as a Unix timestamp.",
            &self.certificate_expiry,
        );
        e.finish()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// When this process started, from `/proc/self/stat` (field 22, clock ticks after boot) and the
/// boot time in `/proc/stat`; falls back to "now" (first call) off Linux.
fn process_start_time() -> f64 {
    fn from_proc() -> Option<f64> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name (field 2) may contain spaces; fields resume after its ')'.
        let rest = &stat[stat.rfind(')')? + 2..];
        let ticks: f64 = rest.split_whitespace().nth(19)?.parse().ok()?;
        let btime: f64 = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        Some(btime + ticks / clock_ticks()?)
    }
    from_proc().unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    })
}

fn clock_ticks() -> Option<f64> {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (t > 0).then_some(t as f64)
}

fn proc_cpu_seconds() -> Option<Computed> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut f = rest.split_whitespace().skip(11);
    let utime: f64 = f.next()?.parse().ok()?;
    let stime: f64 = f.next()?.parse().ok()?;
    Some(Computed {
        kind: "counter",
        value: (utime + stime) / clock_ticks()?,
    })
}

fn proc_resident_bytes() -> Option<Computed> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: f64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    (page > 0).then_some(Computed {
        kind: "gauge",
        value: pages * page as f64,
    })
}

fn proc_open_fds() -> Option<Computed> {
    let n = std::fs::read_dir("/proc/self/fd").ok()?.count();
    Some(Computed {
        kind: "gauge",
        // read_dir itself holds one descriptor while counting.
        value: n.saturating_sub(1) as f64,
    })
}

fn proc_max_fds() -> Option<Computed> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and has no other preconditions.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    Some(Computed {
        kind: "gauge",
        value: lim.rlim_cur as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_with_sum_and_count() {
        let h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.1, 0.5, 3.0] {
            h.observe(v);
        }
        let mut out = String::new();
        h.samples("x_seconds", "a=\"b\"", &mut out);
        assert_eq!(
            out,
            "x_seconds_bucket{a=\"b\",le=\"0.1\"} 2\n\
             x_seconds_bucket{a=\"b\",le=\"1\"} 3\n\
             x_seconds_bucket{a=\"b\",le=\"+Inf\"} 4\n\
             x_seconds_sum{a=\"b\"} 3.65\n\
             x_seconds_count{a=\"b\"} 4\n"
        );
    }

    #[test]
    fn families_escape_labels_and_cap_series() {
        let f = Family::counter(&["route"]);
        f.with(&["/a\"b\\c\nd"]).inc();
        let mut out = String::new();
        f.samples("t_total", "", &mut out);
        assert_eq!(out, "t_total{route=\"/a\\\"b\\\\c\\nd\"} 1\n");
        for i in 0..MAX_SERIES_PER_FAMILY + 50 {
            f.with(&[&format!("r{i}")]).inc();
        }
        assert_eq!(
            f.series.read().unwrap().len(),
            MAX_SERIES_PER_FAMILY + 1,
            "extra series share the overflow one"
        );
        assert!(f.with(&["never-seen"]).get() >= 50);
    }

    #[test]
    fn render_has_help_type_and_build_info() {
        let m = Metrics::new();
        m.record_http("GET", "/health", 200, Duration::from_millis(3));
        m.rate_limited.with(&["api"]).inc();
        let text = m.render();
        assert!(text.contains("# TYPE voicectl_http_requests_total counter\n"));
        assert!(text.contains(
            "voicectl_http_requests_total{method=\"GET\",route=\"/health\",status=\"200\"} 1\n"
        ));
        assert!(text.contains(&format!(
            "voicectl_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        )));
        assert!(text.contains("voicectl_rate_limited_total{limit=\"api\"} 1\n"));
        let start = text
            .lines()
            .find_map(|l| l.strip_prefix("process_start_time_seconds "))
            .unwrap()
            .parse::<f64>()
            .unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            start <= now + 1.0 && start > now - 3600.0,
            "{start} vs {now}"
        );
        // Every family has HELP and TYPE exactly once.
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = line.split_whitespace().nth(2).unwrap();
            assert_eq!(
                text.matches(&format!("# HELP {name} ")).count(),
                1,
                "{name}"
            );
        }
    }
}
