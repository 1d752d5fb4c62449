//! Post-call analysis (SPEC §8): what a tenant asks for (`analysis` on the tenant) and what a
//! call gets (`analysis` on the call).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Invalid;

/// A tenant's schema travels in every analysis request: kept small.
pub const MAX_SCHEMA_BYTES: usize = 16 * 1024;
pub const MAX_CRITERIA_CHARS: usize = 2_000;

/// `analysis = {"summary": true, "schema": {JSON Schema}, "success": "criteria text"}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AnalysisSpec {
    /// A short summary of the call.
    #[serde(default)]
    pub summary: bool,
    /// The structured data to extract, as a JSON Schema (`data` on the call is valid
    /// against it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub schema: Option<Value>,
    /// What makes a call a success; the verdict is `success` (true/false) on the call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success: Option<String>,
}

impl AnalysisSpec {
    /// Nothing asked for: the same as no analysis.
    pub fn is_empty(&self) -> bool {
        !self.summary && self.schema.is_none() && self.success.is_none()
    }

    pub fn validate(&self) -> Result<(), Invalid> {
        let bad = |m: String| Invalid::new("analysis", m);
        if let Some(schema) = &self.schema {
            if !schema.is_object() {
                return Err(bad("schema must be a JSON Schema object".into()));
            }
            if schema.to_string().len() > MAX_SCHEMA_BYTES {
                return Err(bad(format!("schema is over {MAX_SCHEMA_BYTES} bytes")));
            }
            jsonschema::meta::validate(schema)
                .map_err(|e| bad(format!("schema is not a valid JSON Schema: {e}")))?;
        }
        if let Some(c) = &self.success {
            if c.trim().is_empty() {
                return Err(bad("success criteria must not be empty".into()));
            }
            if c.chars().count() > MAX_CRITERIA_CHARS {
                return Err(bad(format!(
                    "success criteria are over {MAX_CRITERIA_CHARS} characters"
                )));
            }
        }
        Ok(())
    }

    /// Checks `data` against the tenant's schema; the error says where it is wrong.
    pub fn check_data(&self, data: &Value) -> Result<(), String> {
        let Some(schema) = &self.schema else {
            return Ok(());
        };
        let v = jsonschema::validator_for(schema).map_err(|e| e.to_string())?;
        match v.iter_errors(data).next() {
            None => Ok(()),
            Some(e) => Err(format!("{} at {}", e, e.instance_path())),
        }
    }
}

/// `analysis` on a call: what the model found, or why there is nothing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CallAnalysis {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// Valid against the tenant's schema (never stored otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub data: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success: Option<bool>,
    /// Why the analysis could not be made (the model failed or kept answering off-schema).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_spec_needs_a_valid_small_schema_and_real_criteria() {
        let ok: AnalysisSpec = serde_json::from_value(json!({"summary": true,
            "schema": {"type": "object", "properties": {"date": {"type": "string"}}},
            "success": "a date was agreed"}))
        .unwrap();
        assert!(ok.validate().is_ok());
        for bad in [
            json!({"schema": "nope"}),
            json!({"schema": {"type": "nonsense"}}),
            json!({"schema": {"type": "object", "description": "x".repeat(MAX_SCHEMA_BYTES)}}),
            json!({"success": " "}),
        ] {
            let s: AnalysisSpec = serde_json::from_value(bad.clone()).unwrap();
            assert!(s.validate().is_err(), "{bad}");
        }
        assert!(serde_json::from_value::<AnalysisSpec>(json!({"sumary": true})).is_err());
        assert!(AnalysisSpec::default().is_empty());
    }

    #[test]
    fn data_is_checked_against_the_schema() {
        let s: AnalysisSpec = serde_json::from_value(json!({"schema": {"type": "object",
            "properties": {"n": {"type": "integer"}}, "required": ["n"]}}))
        .unwrap();
        assert!(s.check_data(&json!({"n": 3})).is_ok());
        assert!(s.check_data(&json!({"n": "three"})).is_err());
        assert!(s.check_data(&json!({})).is_err());
    }
}
