//! Aggregates over calls: counts by status, success rate, latency percentiles.

use rusqlite::{Connection, params};
use serde::Serialize;

use super::Scope;
use crate::domain::CallStatus;
use crate::domain::timefmt::rfc3339;
use crate::store::Result;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Analytics {
    pub since: Option<String>,
    pub total: i64,
    /// Count of calls per status.
    #[schema(value_type = std::collections::BTreeMap<String, i64>)]
    pub by_status: serde_json::Map<String, serde_json::Value>,
    pub success_rate: Option<f64>,
    pub average_duration_seconds: Option<f64>,
    pub greeting_latency_ms: Percentiles,
    pub turn_latency_ms: Percentiles,
    pub barge_in_latency_ms: Percentiles,
    /// Pipeline calls: each stage of each caller turn (`latency.turns[]`).
    pub pipeline_stages_ms: PipelineStages,
}

#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
pub struct PipelineStages {
    pub stt_final_ms: Percentiles,
    pub llm_first_token_ms: Percentiles,
    pub tts_first_audio_ms: Percentiles,
    pub turn_ms: Percentiles,
}

#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
pub struct Percentiles {
    pub count: usize,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
}

impl Percentiles {
    pub fn of(mut v: Vec<f64>) -> Self {
        v.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| (!v.is_empty()).then(|| v[((v.len() as f64 - 1.0) * q).round() as usize]);
        Percentiles {
            count: v.len(),
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
        }
    }
}

pub fn analytics(conn: &Connection, scope: Scope, since_ms: Option<i64>) -> Result<Analytics> {
    let mut st = conn.prepare_cached(
        "SELECT status, COUNT(*), AVG(duration_seconds) FROM calls \
         WHERE (?1 IS NULL OR tenant_id = ?1) AND (?2 IS NULL OR created_at >= ?2) GROUP BY status",
    )?;
    let mut by_status = serde_json::Map::new();
    let (mut total, mut finished, mut completed) = (0i64, 0i64, 0i64);
    let mut avg = None;
    for row in st.query_map(params![scope.tenant_id(), since_ms], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, Option<f64>>(2)?,
        ))
    })? {
        let (status, n, a) = row?;
        total += n;
        if let Some(s) = CallStatus::parse(&status) {
            if s.is_terminal() {
                finished += n;
            }
            if s == CallStatus::Completed {
                completed = n;
                avg = a;
            }
        }
        by_status.insert(status, n.into());
    }
    let mut lat = conn.prepare_cached(
        "SELECT latency FROM calls WHERE latency IS NOT NULL \
         AND (?1 IS NULL OR tenant_id = ?1) AND (?2 IS NULL OR created_at >= ?2)",
    )?;
    let (mut greet, mut turn, mut barge) = (Vec::new(), Vec::new(), Vec::new());
    let mut stages: [Vec<f64>; 4] = Default::default();
    const STAGES: [&str; 4] = [
        "stt_final_ms",
        "llm_first_token_ms",
        "tts_first_audio_ms",
        "turn_ms",
    ];
    for row in lat.query_map(params![scope.tenant_id(), since_ms], |r| {
        r.get::<_, String>(0)
    })? {
        let v: serde_json::Value = serde_json::from_str(&row?).unwrap_or_default();
        greet.extend(v["greeting_ms"].as_f64());
        turn.extend(
            v["turn_ms"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x.as_f64()),
        );
        barge.extend(
            v["barge_in_ms"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x.as_f64()),
        );
        for t in v["turns"].as_array().into_iter().flatten() {
            for (i, k) in STAGES.iter().enumerate() {
                stages[i].extend(t[*k].as_f64());
            }
        }
    }
    let [stt, llm, tts, whole] = stages;
    Ok(Analytics {
        greeting_latency_ms: Percentiles::of(greet),
        turn_latency_ms: Percentiles::of(turn),
        barge_in_latency_ms: Percentiles::of(barge),
        pipeline_stages_ms: PipelineStages {
            stt_final_ms: Percentiles::of(stt),
            llm_first_token_ms: Percentiles::of(llm),
            tts_first_audio_ms: Percentiles::of(tts),
            turn_ms: Percentiles::of(whole),
        },
        since: since_ms.map(rfc3339),
        total,
        by_status,
        success_rate: (finished > 0).then(|| completed as f64 / finished as f64),
        average_duration_seconds: avg,
    })
}
