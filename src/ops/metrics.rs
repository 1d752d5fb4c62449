//! Every metric voicectl exports, as named handles over a `prometheus-client` registry,
//! served in the Prometheus text format (0.0.4).
//!
//! Every metric is a field of [`Metrics`], so the full list, names and help texts live in one
//! place. Partly hand-written: the crate's families neither cap their series nor list them
//! (`/api/v1/status` reads them back), and process statistics come from `/proc`.

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, prometheus_text};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::{Family as Series, MetricConstructor};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Metric, Registry};

/// A monotonically increasing count.
pub type Counter = prometheus_client::metrics::counter::Counter;
/// A value that goes up and down (integers: counts, states, Unix timestamps).
pub type Gauge = prometheus_client::metrics::gauge::Gauge;
/// Observations counted into fixed buckets (upper bounds, ascending), plus their sum.
pub type Histogram = prometheus_client::metrics::histogram::Histogram;

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

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

fn histogram(bounds: &'static [f64]) -> Histogram {
    Histogram::new(bounds.iter().copied())
}

/// Makes each new histogram of a family with the family's buckets.
#[derive(Clone, Copy)]
pub struct Buckets(&'static [f64]);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        histogram(self.0)
    }
}

/// Label names and values, in the family's label order.
type Labels = Vec<(&'static str, String)>;

/// One metric per combination of label values.
pub struct Family<M, C = fn() -> M> {
    labels: &'static [&'static str],
    series: Series<Labels, M, C>,
    /// Label values of every series, in creation order; also serialises the creation of new
    /// series so the cap counts each once.
    created: Mutex<Vec<Vec<String>>>,
}

impl<M: Clone, C: MetricConstructor<M>> Family<M, C> {
    fn with_constructor(labels: &'static [&'static str], make: C) -> Self {
        Family {
            labels,
            series: Series::new_with_constructor(make),
            created: Mutex::new(Vec::new()),
        }
    }

    fn label_set(&self, values: &[String]) -> Labels {
        self.labels
            .iter()
            .copied()
            .zip(values.iter().cloned())
            .collect()
    }

    /// The series for these label values (in the family's label order), created on first use.
    /// Label values must come from a small fixed set (route templates, statuses, engine
    /// names), never from request data.
    pub fn with(&self, values: &[&str]) -> M {
        debug_assert_eq!(values.len(), self.labels.len(), "label count");
        let values: Vec<String> = values.iter().map(|v| (*v).to_owned()).collect();
        let key = self.label_set(&values);
        if let Some(m) = self.series.get(&key) {
            return m.clone();
        }
        // A poisoned lock only means a panic elsewhere; the list is still consistent.
        let mut created = self.created.lock().unwrap_or_else(|p| p.into_inner());
        if self.series.get(&key).is_some() {
            return self.series.get_or_create_owned(&key);
        }
        let (key, values) = if created.len() >= MAX_SERIES_PER_FAMILY {
            let v: Vec<String> = self.labels.iter().map(|_| OVERFLOW.to_owned()).collect();
            (self.label_set(&v), v)
        } else {
            (key, values)
        };
        if self.series.get(&key).is_none() {
            created.push(values);
        }
        self.series.get_or_create_owned(&key)
    }

    /// How many series exist (at most [`MAX_SERIES_PER_FAMILY`] + 1).
    pub fn len(&self) -> usize {
        self.created.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every series with its label values, sorted by them.
    pub fn snapshot(&self) -> Vec<(Vec<String>, M)> {
        let mut all: Vec<Vec<String>> = self
            .created
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        all.sort();
        all.into_iter()
            .map(|v| {
                let m = self.series.get_or_create_owned(&self.label_set(&v));
                (v, m)
            })
            .collect()
    }
}

impl Family<Counter> {
    pub fn counter(labels: &'static [&'static str]) -> Self {
        Self::with_constructor(labels, Counter::default)
    }
}

impl Family<Gauge> {
    pub fn gauge(labels: &'static [&'static str]) -> Self {
        Self::with_constructor(labels, Gauge::default)
    }
}

impl Family<Histogram, Buckets> {
    pub fn histogram(labels: &'static [&'static str], bounds: &'static [f64]) -> Self {
        Self::with_constructor(labels, Buckets(bounds))
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
    pub http_request_duration: Family<Histogram, Buckets>,
    pub rate_limited: Family<Counter>,
    pub websockets_active: Gauge,
    pub draining: Gauge,
    pub calls_active: Gauge,
    pub calls_queued: Gauge,
    pub calls_finished: Family<Counter>,
    pub call_duration: Histogram,
    pub greeting_latency: Family<Histogram, Buckets>,
    pub turn_latency: Family<Histogram, Buckets>,
    pub barge_in_latency: Family<Histogram, Buckets>,
    /// Pipeline engine: `.with(&[stage, provider])`, stage ∈ stt_final, llm_first_token,
    /// tts_first_audio, turn.
    pub pipeline_stage: Family<Histogram, Buckets>,
    pub media_frames: Family<Counter>,
    pub engine_errors: Family<Counter>,
    pub engine_circuit_state: Family<Gauge>,
    pub certificate_expiry: Family<Gauge>,
    /// Listener limits (SPEC §10): connections closed at accept (`global`, `per_ip`) or for
    /// being too slow (`head_timeout`, `idle`).
    pub connections_refused: Family<Counter>,
    pub connections_open: Gauge,
    /// Outbound requests to tenant-supplied URLs refused by the guard, by reason.
    pub outbound_refused: Family<Counter>,
    /// Rows and files deleted by retention, by kind (`calls`, `recordings`).
    pub retention_purged: Family<Counter>,
    registry: Registry,
}

/// Registers under `name` (counters without their `_total`, which the encoder appends).
fn register(registry: &mut Registry, name: &str, help: &str, metric: impl Metric) {
    // The registry ends every help text with a full stop itself.
    registry.register(name, help.strip_suffix('.').unwrap_or(help), metric);
}

impl<M, C> Family<M, C>
where
    Series<Labels, M, C>: Metric + Clone,
{
    fn register(&self, registry: &mut Registry, name: &str, help: &str) {
        register(registry, name, help, self.series.clone());
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let m = Metrics {
            http_requests: Family::counter(&["method", "route", "status"]),
            http_request_duration: Family::histogram(&["route"], HTTP_BUCKETS),
            rate_limited: Family::counter(&["limit"]),
            websockets_active: Gauge::default(),
            draining: Gauge::default(),
            calls_active: Gauge::default(),
            calls_queued: Gauge::default(),
            calls_finished: Family::counter(&["status"]),
            call_duration: histogram(CALL_DURATION_BUCKETS),
            greeting_latency: Family::histogram(&["engine"], LATENCY_BUCKETS),
            turn_latency: Family::histogram(&["engine"], LATENCY_BUCKETS),
            barge_in_latency: Family::histogram(&["engine"], LATENCY_BUCKETS),
            pipeline_stage: Family::histogram(&["stage", "provider"], LATENCY_BUCKETS),
            media_frames: Family::counter(&["direction"]),
            engine_errors: Family::counter(&["engine", "kind"]),
            engine_circuit_state: Family::gauge(&["engine"]),
            certificate_expiry: Family::gauge(&["domain"]),
            connections_refused: Family::counter(&["reason"]),
            connections_open: Gauge::default(),
            outbound_refused: Family::counter(&["reason"]),
            retention_purged: Family::counter(&["kind"]),
            registry: Registry::default(),
        };
        m.registered()
    }

    fn registered(mut self) -> Metrics {
        let r = &mut self.registry;
        let build_info = Family::gauge(&["version"]);
        build_info.with(&[env!("CARGO_PKG_VERSION")]).set(1);
        build_info.register(
            r,
            "voicectl_build_info",
            "Always 1; the version label says which voicectl is running.",
        );
        r.register_collector(Box::new(Process {
            start_time: process_start_time(),
        }));
        self.http_requests.register(
            r,
            "voicectl_http_requests",
            "HTTP requests answered, by method, matched route template and status code.",
        );
        self.http_request_duration.register(
            r,
            "voicectl_http_request_duration_seconds",
            "Time to answer HTTP requests, by matched route template.",
        );
        self.rate_limited.register(
            r,
            "voicectl_rate_limited",
            "Requests refused by a rate or concurrency limit (api, webhook, websocket, tenant_calls, headers).",
        );
        register(
            r,
            "voicectl_websockets_active",
            "WebSocket connections currently held.",
            self.websockets_active.clone(),
        );
        register(
            r,
            "voicectl_draining",
            "1 while the server drains before stopping, else 0.",
            self.draining.clone(),
        );
        register(
            r,
            "voicectl_calls_active",
            "Calls currently live (initiating, ringing or in progress).",
            self.calls_active.clone(),
        );
        register(
            r,
            "voicectl_calls_queued",
            "Calls waiting for a free slot (queue depth).",
            self.calls_queued.clone(),
        );
        self.calls_finished.register(
            r,
            "voicectl_calls_finished",
            "Calls that reached a final status, by status.",
        );
        register(
            r,
            "voicectl_call_duration_seconds",
            "Duration of answered calls, in seconds.",
            self.call_duration.clone(),
        );
        self.greeting_latency.register(
            r,
            "voicectl_greeting_latency_seconds",
            "From answer to the first agent audio sent to the caller, by engine.",
        );
        self.turn_latency.register(
            r,
            "voicectl_turn_latency_seconds",
            "From the caller's end of speech to the first agent audio, by engine.",
        );
        self.barge_in_latency.register(
            r,
            "voicectl_barge_in_latency_seconds",
            "From detected caller speech to agent audio stopped, by engine.",
        );
        self.pipeline_stage.register(
            r,
            "voicectl_pipeline_stage_seconds",
            "Pipeline engine stage latency per caller turn, by stage and provider.",
        );
        self.media_frames.register(
            r,
            "voicectl_media_frames",
            "Media frames relayed, by direction (in: from the caller, out: to the caller).",
        );
        self.engine_errors.register(
            r,
            "voicectl_engine_errors",
            "Voice engine errors, by engine and kind.",
        );
        self.connections_refused.register(
            r,
            "voicectl_connections_refused",
            "Client connections closed by a listener limit: global, per_ip (at accept), head_timeout, idle.",
        );
        register(
            r,
            "voicectl_connections_open",
            "Client connections currently open on all listeners (upgraded WebSockets included).",
            self.connections_open.clone(),
        );
        self.outbound_refused.register(
            r,
            "voicectl_outbound_refused",
            "Requests to tenant-supplied URLs refused (scheme, address, redirect).",
        );
        self.retention_purged.register(
            r,
            "voicectl_retention_purged",
            "Finished calls and call recordings deleted by [retention], by kind.",
        );
        self.engine_circuit_state.register(
            r,
            "voicectl_engine_circuit_state",
            "Circuit breaker per engine: 0 closed, 1 half-open, 2 open.",
        );
        self.certificate_expiry.register(
            r,
            "voicectl_tls_certificate_expiry_timestamp_seconds",
            "Expiry (notAfter) of the served certificate, by domain, as a Unix timestamp.",
        );
        self
    }

    /// One HTTP request, labelled by the matched route template (never the raw path).
    pub fn record_http(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let status = status.to_string();
        self.http_requests.with(&[method, route, &status]).inc();
        self.http_request_duration
            .with(&[route])
            .observe(elapsed.as_secs_f64());
    }

    /// The whole exposition, as served on `GET /metrics` (with [`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail, and our collector never errors.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Process statistics, read from `/proc` when scraped.
#[derive(Debug)]
struct Process {
    start_time: f64,
}

impl Collector for Process {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauges = [
            (
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch, in seconds.",
                Some(self.start_time),
            ),
            (
                "process_resident_memory_bytes",
                "Resident memory size, in bytes.",
                proc_resident_bytes(),
            ),
            (
                "process_open_fds",
                "Open file descriptors.",
                proc_open_fds(),
            ),
            (
                "process_max_fds",
                "Limit on open file descriptors (LimitNOFILE).",
                proc_max_fds(),
            ),
        ];
        if let Some(v) = proc_cpu_seconds() {
            let m = encoder.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time spent, in seconds.",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(v).encode(m)?;
        }
        for (name, help, value) in gauges {
            if let Some(v) = value {
                let m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
                ConstGauge::new(v).encode(m)?;
            }
        }
        Ok(())
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

fn proc_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut f = rest.split_whitespace().skip(11);
    let utime: f64 = f.next()?.parse().ok()?;
    let stime: f64 = f.next()?.parse().ok()?;
    Some((utime + stime) / clock_ticks()?)
}

fn proc_resident_bytes() -> Option<f64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: f64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    (page > 0).then_some(pages * page as f64)
}

fn proc_open_fds() -> Option<f64> {
    let n = std::fs::read_dir("/proc/self/fd").ok()?.count();
    // read_dir itself holds one descriptor while counting.
    Some(n.saturating_sub(1) as f64)
}

fn proc_max_fds() -> Option<f64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and has no other preconditions.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    Some(lim.rlim_cur as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sample lines of `family` registered as `name`.
    fn samples<M, C>(family: &Family<M, C>, name: &str) -> String
    where
        Series<Labels, M, C>: Metric + Clone,
    {
        let mut r = Registry::default();
        family.register(&mut r, name, "test");
        let mut text = String::new();
        prometheus_text::encode(&mut text, &r).unwrap();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect()
    }

    #[test]
    fn histogram_is_cumulative_with_sum_and_count() {
        let f = Family::histogram(&["a"], &[0.1, 1.0]);
        let h = f.with(&["b"]);
        for v in [0.05, 0.1, 0.5, 3.0] {
            h.observe(v);
        }
        let out = samples(&f, "x_seconds");
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
        let out = samples(&f, "t");
        assert_eq!(out, "t_total{route=\"/a\\\"b\\\\c\\nd\"} 1\n");
        for i in 0..MAX_SERIES_PER_FAMILY + 50 {
            f.with(&[&format!("r{i}")]).inc();
        }
        assert_eq!(
            f.len(),
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
