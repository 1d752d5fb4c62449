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
