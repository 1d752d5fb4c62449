//! `{{var}}` templates of greeting, prompt and voicemail message, filled per recipient.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

/// The variable names a template uses.
pub fn vars_of(template: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = template;
    while let Some(i) = rest.find("{{") {
        let after = &rest[i + 2..];
        let Some(j) = after.find("}}") else { break };
        let name = after[..j].trim();
        if !name.is_empty() {
            out.insert(name.to_owned());
        }
        rest = &after[j + 2..];
    }
    out
}

/// `template` with each `{{name}}` replaced by the variable's value (unknown names: empty).
pub fn render(template: &str, vars: &Map<String, Value>) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(i) = rest.find("{{") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let Some(j) = after.find("}}") else {
            out.push_str(&rest[i..]);
            return out;
        };
        match vars.get(after[..j].trim()) {
            Some(Value::String(s)) => out.push_str(s),
            Some(Value::Null) | None => {}
            Some(v) => out.push_str(&v.to_string()),
        }
        rest = &after[j + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_and_lists_vars() {
        let t = "Hi {{ name }}, your {{item}} is due{{x";
        assert_eq!(
            vars_of(t).into_iter().collect::<Vec<_>>(),
            vec!["item".to_string(), "name".to_string()]
        );
        let v = serde_json::json!({"name": "Ana", "item": "car"});
        assert_eq!(
            render(t, v.as_object().unwrap()),
            "Hi Ana, your car is due{{x"
        );
    }
}
