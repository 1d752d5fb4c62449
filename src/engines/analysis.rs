//! Post-call analysis (SPEC §8): the finished call's transcript goes to an LLM (the first
//! `[[llm]]`, else OpenAI's chat completions), which answers one JSON object: `summary`,
//! `data` (valid against the tenant's schema) and `success`. An answer off the schema is asked
//! for once more; a second one is an error, never stored as data.

use std::time::Duration;

use serde_json::{Value, json};

use super::pipeline::llm;
use crate::config::{Config, LlmConfig, Secret};
use crate::domain::analysis::{AnalysisSpec, CallAnalysis};
use crate::store::calls::TranscriptEntry;

/// The webhook waits for the analysis at most 60 s (SPEC §8): one request must end sooner.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(25);
/// A transcript longer than this is cut (its start kept: the call's purpose comes first).
const MAX_TRANSCRIPT_CHARS: usize = 60_000;

/// Where analysis requests go: the first `[[llm]]`, else OpenAI's chat completions.
pub fn llm_config(cfg: &Config) -> LlmConfig {
    match cfg.llm.first() {
        Some(l) => LlmConfig {
            temperature: 0.0,
            ..l.clone()
        },
        None => LlmConfig {
            name: "openai".into(),
            base_url: cfg.openai.api_base_url.clone(),
            api_key: Secret::new(cfg.openai.api_key.expose()),
            model: "gpt-4o-mini".into(),
            temperature: 0.0,
        },
    }
}

fn prompt(spec: &AnalysisSpec) -> String {
    let mut p = String::from(
        "You analyse a finished phone call between an AI agent and a caller. Answer with one \
         JSON object and nothing else, with these keys:\n",
    );
    if spec.summary {
        p.push_str(
            "- \"summary\": two or three sentences on what the call was about and how it ended.\n",
        );
    }
    if let Some(schema) = &spec.schema {
        p.push_str(&format!(
            "- \"data\": facts from the call as an object valid against this JSON Schema: {schema}\n"
        ));
    }
    if let Some(criteria) = &spec.success {
        p.push_str(&format!(
            "- \"success\": true if the call met these criteria, else false: {criteria}\n"
        ));
    }
    p
}

/// The JSON Schema of the whole answer, for `response_format`.
fn answer_schema(spec: &AnalysisSpec) -> Value {
    let (mut props, mut required) = (serde_json::Map::new(), Vec::new());
    if spec.summary {
        props.insert("summary".into(), json!({"type": "string"}));
        required.push("summary");
    }
    if let Some(s) = &spec.schema {
        props.insert("data".into(), s.clone());
        required.push("data");
    }
    if spec.success.is_some() {
        props.insert("success".into(), json!({"type": "boolean"}));
        required.push("success");
    }
    json!({"type": "object", "properties": props, "required": required})
}

fn transcript_text(entries: &[TranscriptEntry]) -> String {
    let mut t = String::new();
    for e in entries {
        t.push_str(&format!("{}: {}\n", e.speaker, e.text));
        if t.len() > MAX_TRANSCRIPT_CHARS {
            t.push_str("[transcript cut]\n");
            break;
        }
    }
    t
}

/// Checks one answer: JSON, the keys asked for, `data` valid against the tenant's schema.
fn parse(spec: &AnalysisSpec, text: &str) -> Result<CallAnalysis, String> {
    let v: Value = serde_json::from_str(text.trim())
        .map_err(|e| format!("the model's answer is not JSON: {e}"))?;
    let summary = v["summary"].as_str().map(str::to_owned);
    if spec.summary && summary.is_none() {
        return Err("the model's answer has no summary".into());
    }
    let data = match &spec.schema {
        Some(_) => {
            let d = v.get("data").cloned().unwrap_or(Value::Null);
            spec.check_data(&d)
                .map_err(|e| format!("the model's data does not match the schema: {e}"))?;
            Some(d)
        }
        None => None,
    };
    let success = v["success"].as_bool();
    if spec.success.is_some() && success.is_none() {
        return Err("the model's answer has no success verdict".into());
    }
    Ok(CallAnalysis {
        summary,
        data,
        success,
        error: None,
    })
}

/// Analyses a call; the error is what the call records when the model cannot be used.
pub async fn analyse(
    cfg: &LlmConfig,
    spec: &AnalysisSpec,
    transcript: &[TranscriptEntry],
) -> CallAnalysis {
    let messages = [
        json!({"role": "system", "content": prompt(spec)}),
        json!({"role": "user", "content": transcript_text(transcript)}),
    ];
    let format = json!({"response_format": {"type": "json_schema",
        "json_schema": {"name": "call_analysis", "schema": answer_schema(spec)}}});
    let http = super::pipeline::http();
    let mut last = String::new();
    // One more chance for an answer off the schema; a failed request is not retried (the
    // webhook is waiting).
    for _ in 0..2 {
        let answer = tokio::time::timeout(
            REQUEST_TIMEOUT,
            llm::complete(&http, cfg, &messages, format.clone()),
        )
        .await;
        match answer {
            Err(_) => {
                last = format!("the model did not answer within {REQUEST_TIMEOUT:?}");
                break;
            }
            Ok(Err(e)) => {
                last = format!("{}: {e}", cfg.name);
                break;
            }
            Ok(Ok(text)) => match parse(spec, &text) {
                Ok(a) => return a,
                Err(e) => last = e,
            },
        }
    }
    CallAnalysis {
        error: Some(last),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> AnalysisSpec {
        serde_json::from_value(json!({"summary": true, "success": "booked",
            "schema": {"type": "object", "properties": {"day": {"type": "string"}}, "required": ["day"]}}))
        .unwrap()
    }

    #[test]
    fn answers_are_checked_against_what_was_asked() {
        let s = spec();
        let ok = parse(
            &s,
            r#"{"summary": "Booked.", "data": {"day": "Tue"}, "success": true}"#,
        )
        .unwrap();
        assert_eq!(ok.data, Some(json!({"day": "Tue"})));
        assert_eq!(ok.success, Some(true));
        for bad in [
            "not json",
            r#"{"data": {"day": "Tue"}, "success": true}"#,
            r#"{"summary": "x", "data": {"day": 3}, "success": true}"#,
            r#"{"summary": "x", "data": {"day": "Tue"}}"#,
        ] {
            assert!(parse(&s, bad).is_err(), "{bad}");
        }
        let schema = answer_schema(&s);
        assert_eq!(schema["required"], json!(["summary", "data", "success"]));
    }
}
