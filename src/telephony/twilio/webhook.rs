//! Twilio's webhook forms (already signature-checked) parsed into the carrier seam's types.

use super::super::{CarrierUpdate, InboundCall};
use crate::domain::CallStatus;

fn get<'a>(params: &'a [(String, String)], k: &str) -> Option<&'a str> {
    params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
}

/// Twilio's `CallStatus` values (callbacks and resources) in our terms.
pub fn map_twilio_status(s: &str) -> Option<CallStatus> {
    Some(match s {
        "queued" | "initiated" => CallStatus::Initiating,
        "ringing" => CallStatus::Ringing,
        "in-progress" | "answered" => CallStatus::InProgress,
        "completed" => CallStatus::Completed,
        "busy" => CallStatus::Busy,
        "no-answer" => CallStatus::NoAnswer,
        "failed" => CallStatus::Failed,
        "canceled" => CallStatus::Canceled,
        _ => return None,
    })
}

/// A status callback; `None` without a known `CallStatus`.
pub fn status_update(params: &[(String, String)]) -> Option<CarrierUpdate> {
    let status = get(params, "CallStatus").and_then(map_twilio_status)?;
    Some(CarrierUpdate {
        status: Some(status),
        seq: get(params, "SequenceNumber").and_then(|s| s.parse().ok()),
        duration: get(params, "CallDuration").and_then(|s| s.parse().ok()),
        answered_by: get(params, "AnsweredBy").map(str::to_owned),
        error: get(params, "SipResponseCode")
            .filter(|_| status == CallStatus::Failed)
            .map(|c| format!("SIP {c}")),
    })
}

/// The answer webhook of an outbound call: Twilio says the call is in progress.
pub fn answer_update(params: &[(String, String)]) -> CarrierUpdate {
    CarrierUpdate {
        status: (get(params, "CallStatus") == Some("in-progress"))
            .then_some(CallStatus::InProgress),
        ..Default::default()
    }
}

/// An asynchronous answering-machine-detection result.
pub fn amd_update(params: &[(String, String)]) -> Option<CarrierUpdate> {
    Some(CarrierUpdate {
        answered_by: Some(get(params, "AnsweredBy")?.to_owned()),
        ..Default::default()
    })
}

/// The voice webhook of a call to one of our numbers; `None` if a field is missing.
pub fn inbound_call(params: &[(String, String)]) -> Option<InboundCall> {
    Some(InboundCall {
        to: get(params, "To")?.to_owned(),
        from: get(params, "From")?.to_owned(),
        sid: get(params, "CallSid")?.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twilio_statuses_map() {
        assert_eq!(
            map_twilio_status("in-progress"),
            Some(CallStatus::InProgress)
        );
        assert_eq!(map_twilio_status("no-answer"), Some(CallStatus::NoAnswer));
        assert_eq!(map_twilio_status("bogus"), None);
    }

    #[test]
    fn failed_callbacks_carry_the_sip_code() {
        let p = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        let u = status_update(&p(&[("CallStatus", "failed"), ("SipResponseCode", "503")])).unwrap();
        assert_eq!(u.error.as_deref(), Some("SIP 503"));
        let u = status_update(&p(&[("CallStatus", "busy"), ("SipResponseCode", "486")])).unwrap();
        assert_eq!(u.error, None);
        assert!(status_update(&p(&[("CallStatus", "bogus")])).is_none());
    }
}

/// Property tests (issue 11): any form body parses into our types without panicking, and a
/// form we encode and sign verifies after the round trip through the wire encoding.
#[cfg(test)]
mod props {
    use super::super::signature;
    use super::*;
    use proptest::prelude::*;

    fn field() -> impl Strategy<Value = (String, String)> {
        let name = prop_oneof![
            Just("CallStatus".to_owned()),
            Just("CallSid".to_owned()),
            Just("To".to_owned()),
            Just("From".to_owned()),
            Just("AnsweredBy".to_owned()),
            Just("SequenceNumber".to_owned()),
            Just("CallDuration".to_owned()),
            Just("SipResponseCode".to_owned()),
            "\\PC{0,8}",
        ];
        let value = prop_oneof![
            Just("failed".to_owned()),
            Just("in-progress".to_owned()),
            Just("completed".to_owned()),
            any::<i64>().prop_map(|n| n.to_string()),
            "\\PC{0,16}",
        ];
        (name, value)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let params: Vec<(String, String)> =
                form_urlencoded::parse(&body).into_owned().collect();
            let _ = status_update(&params);
            let _ = answer_update(&params);
            let _ = amd_update(&params);
            let _ = inbound_call(&params);
        }

        #[test]
        fn forms_map_as_documented(fields in proptest::collection::vec(field(), 0..8)) {
            let first = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            let inbound = inbound_call(&fields);
            prop_assert_eq!(
                inbound.is_some(),
                first("To").is_some() && first("From").is_some() && first("CallSid").is_some()
            );
            let status = first("CallStatus").as_deref().and_then(map_twilio_status);
            match status_update(&fields) {
                Some(u) => {
                    prop_assert_eq!(u.status, status);
                    prop_assert!(u.error.is_none() || status == Some(CallStatus::Failed));
                }
                None => prop_assert!(status.is_none()),
            }
            prop_assert_eq!(amd_update(&fields).and_then(|u| u.answered_by), first("AnsweredBy"));
        }

        #[test]
        fn signed_forms_survive_the_wire(
            token in "[A-Za-z0-9]{1,32}",
            fields in proptest::collection::vec(field(), 0..8),
        ) {
            let url = "https://voice.example.com/twilio/status?call=c_1";
            let sig = signature::compute(&token, url, &fields);
            let body = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(&fields)
                .finish();
            let parsed: Vec<(String, String)> =
                form_urlencoded::parse(body.as_bytes()).into_owned().collect();
            prop_assert_eq!(&parsed, &fields);
            prop_assert!(signature::validate(&token, url, &parsed, &sig));
        }
    }
}
