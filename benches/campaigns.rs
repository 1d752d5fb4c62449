//! Campaign scale benchmark (SPEC §7): importing 300,000 CSV rows (time and extra memory),
//! the progress query at 300,000 recipients, and the scheduler's per-dial store work at 1,000
//! vs 300,000 recipients (it must stay flat: due recipients come from an index).
//!
//! ```text
//! cargo bench --bench campaigns                  # 300,000 rows
//! cargo bench --bench campaigns -- --rows 50000
//! ```
//!
//! In-process against the library: the same functions `POST /campaigns/{id}/recipients`
//! (`calls::campaigns::import::csv` into `store::campaigns::add_recipients` in 20,000-row
//! transactions), `GET /campaigns/{id}` (`store::campaigns::get`) and the scheduler
//! (`store::campaigns::due` + `start_attempt`) run, on a fresh database in a temp dir.

use std::time::Instant;

use voicectl::calls::campaigns::import;
use voicectl::domain::campaign::RetryPolicy;
use voicectl::domain::ids::CampaignId;
use voicectl::store::Store;
use voicectl::store::campaigns::{self as db, AttemptCall, NewCampaign};
use voicectl::store::tenants::{self, TenantPatch};

fn rss_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn csv_body(rows: usize) -> Vec<u8> {
    let mut out = String::from("to,name,plan,timezone\n");
    for i in 0..rows {
        out.push_str(&format!(
            "+1212{:07},\"Customer {i}, Jr\",gold,{}\n",
            i,
            if i % 3 == 0 { "America/Chicago" } else { "" }
        ));
    }
    out.into_bytes()
}

fn campaign(store: &Store, tenant_id: i64) -> String {
    let id = CampaignId::generate();
    let c = NewCampaign {
        id: id.clone(),
        tenant_id,
        name: "bench".into(),
        paused: false,
        settings: serde_json::json!({"greeting": "Hi {{name}}", "from": "+14155550100", "engine": "scripted"}),
        hours_start: 8 * 60,
        hours_end: 21 * 60,
        days: 0x7f,
        max_concurrent: 1000,
        calls_per_second: 100.0,
        retry: RetryPolicy::default(),
    };
    store
        .blocking(|conn| db::create(conn, &c))
        .expect("create campaign");
    id.as_str().to_owned()
}

fn import(store: &Store, id: &str, tenant_id: i64, body: &[u8]) -> u64 {
    let needed = ["name".to_owned()].into_iter().collect();
    let mut accepted = 0;
    let rejected = import::csv(body, &needed, 20_000, |rows| {
        let c = store.blocking(|conn| db::add_recipients(conn, id, tenant_id, &rows))?;
        accepted += c.accepted;
        Ok(())
    })
    .expect("header")
    .expect("store");
    assert!(rejected.is_empty());
    accepted
}

/// Mean store work of one dial (due → start_attempt), over `n` dials.
fn per_dial_us(store: &Store, id: &str, tenant_id: i64, n: usize) -> f64 {
    let call = AttemptCall {
        from: "+14155550100".into(),
        engine: "scripted".into(),
        system_prompt: None,
        greeting: Some("Hi".into()),
        voice: None,
        machine_detection: false,
        machine_action: None,
        voicemail_message: None,
        metadata: serde_json::json!({}),
    };
    let t = Instant::now();
    for _ in 0..n {
        let due = store
            .blocking(|c| db::due(c, id, i64::MAX / 2, 1))
            .expect("due");
        let r = &due[0];
        store
            .blocking(|c| db::start_attempt(c, id, tenant_id, r.id, &call))
            .expect("start");
    }
    t.elapsed().as_secs_f64() * 1e6 / n as f64
}

fn main() {
    let mut rows = 300_000usize;
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--rows") {
        rows = args[i + 1].parse().expect("--rows N");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("data")).expect("store");
    let tenant_id = store
        .blocking(|c| {
            tenants::create(
                c,
                TenantPatch {
                    name: Some("bench".into()),
                    ..Default::default()
                },
            )
        })
        .expect("tenant")
        .id;

    let body = csv_body(rows);
    let big = campaign(&store, tenant_id);
    let base = rss_kb("VmRSS:");
    let t = Instant::now();
    let n = import(&store, &big, tenant_id, &body);
    let secs = t.elapsed().as_secs_f64();
    let peak = rss_kb("VmHWM:");
    println!(
        "import: {n} rows ({:.1} MB CSV) in {secs:.2} s ({:.0} rows/s); extra memory (peak RSS - before) {:.1} MB",
        body.len() as f64 / 1e6,
        n as f64 / secs,
        peak.saturating_sub(base) as f64 / 1024.0
    );
    drop(body);

    let mut times = Vec::new();
    for _ in 0..21 {
        let t = Instant::now();
        let c = store
            .blocking(|conn| db::get(conn, Some(tenant_id), &big))
            .expect("get");
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(c.progress.total as u64, n);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "progress (GET /campaigns/{{id}}) at {n} recipients: median {:.1} ms, max {:.1} ms",
        times[10], times[20]
    );

    let small = campaign(&store, tenant_id);
    let small_body = csv_body(1_000);
    import(&store, &small, tenant_id, &small_body);
    let small_us = per_dial_us(&store, &small, tenant_id, 300);
    let big_us = per_dial_us(&store, &big, tenant_id, 300);
    println!(
        "per-dial store work (due + start_attempt): {small_us:.0} µs at 1,000 recipients, {big_us:.0} µs at {n}"
    );
}
