//! TwiML responses, always built with XML escaping (values come from tenants and callers).

use crate::telephony::Script;

pub use crate::domain::markup::escape;

const HEADER: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>";

/// `<Connect><Stream url=…>` with `<Parameter>`s: a bidirectional media stream. When the
/// socket closes, the following `<Hangup/>` ends the call instead of leaving dead air.
pub fn connect_stream(url: &str, params: &[(&str, &str)]) -> String {
    let mut xml = format!(
        "{HEADER}<Response><Connect><Stream url=\"{}\">",
        escape(url)
    );
    for (name, value) in params {
        xml.push_str(&format!(
            "<Parameter name=\"{}\" value=\"{}\"/>",
            escape(name),
            escape(value)
        ));
    }
    xml.push_str("</Stream></Connect><Hangup/></Response>");
    xml
}

/// A short spoken message, then hang up.
pub fn say_hangup(text: &str) -> String {
    format!(
        "{HEADER}<Response><Say>{}</Say><Hangup/></Response>",
        escape(text)
    )
}

/// Hang up at once.
pub fn hangup() -> String {
    format!("{HEADER}<Response><Hangup/></Response>")
}

/// `<Play digits>` (DTMF tones on the call), then a new `<Connect><Stream>`.
pub fn play_digits_then_stream(digits: &str, url: &str, params: &[(&str, &str)]) -> String {
    let stream = connect_stream(url, params);
    let body = stream.strip_prefix(HEADER).unwrap_or(&stream);
    let body = body.strip_prefix("<Response>").unwrap_or(body);
    format!(
        "{HEADER}<Response><Play digits=\"{}\"/>{body}",
        escape(digits)
    )
}

/// `<Dial action=…><Number url=…>` : join the call to `number`; Twilio requests `action`
/// when the dial ends and continues with what it answers. `answerOnBridge`: the caller hears
/// ringing until the target answers.
pub fn dial(
    number: &str,
    action: &str,
    whisper_url: Option<&str>,
    timeout_secs: u32,
    caller_id: Option<&str>,
) -> String {
    let caller = caller_id
        .map(|c| format!(" callerId=\"{}\"", escape(c)))
        .unwrap_or_default();
    let url = whisper_url
        .map(|u| format!(" url=\"{}\"", escape(u)))
        .unwrap_or_default();
    format!(
        "{HEADER}<Response><Dial action=\"{}\" method=\"POST\" timeout=\"{timeout_secs}\" answerOnBridge=\"true\"{caller}><Number{url}>{}</Number></Dial></Response>",
        escape(action),
        escape(number)
    )
}

/// A spoken message; the call goes on.
pub fn say(text: &str) -> String {
    format!("{HEADER}<Response><Say>{}</Say></Response>", escape(text))
}

/// The TwiML for a carrier-neutral [`Script`].
pub fn render(script: &Script) -> String {
    match script {
        Script::ConnectStream { url, params } => {
            let params: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
            connect_stream(url, &params)
        }
        Script::ConnectUrl { url } => connect_stream(url, &[]),
        Script::SayHangup(text) => say_hangup(text),
        Script::Hangup => hangup(),
        Script::PlayDigitsThenStream {
            digits,
            url,
            params,
        } => {
            let params: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
            play_digits_then_stream(digits, url, &params)
        }
        Script::Dial {
            number,
            action,
            whisper_url,
            timeout_secs,
            caller_id,
        } => dial(
            number,
            action,
            whisper_url.as_deref(),
            *timeout_secs,
            caller_id.as_deref(),
        ),
        Script::Say(text) => say(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_everything_user_controlled() {
        let x = connect_stream("wss://h/media?x=1&y=\"2\"", &[("token", "a<b>&'c'")]);
        assert!(
            x.contains("url=\"wss://h/media?x=1&amp;y=&quot;2&quot;\""),
            "{x}"
        );
        assert!(x.contains("value=\"a&lt;b&gt;&amp;&#39;c&#39;\""), "{x}");
        let s = say_hangup("Sorry </Say><Dial>+1900</Dial>\u{1}");
        assert!(!s.contains("<Dial>") && !s.contains('\u{1}'), "{s}");
    }

    #[test]
    fn scripts_render_as_before() {
        let s = Script::ConnectStream {
            url: "wss://h/twilio/media".into(),
            params: vec![("call_id", "c1".into()), ("token", "t".into())],
        };
        assert_eq!(
            render(&s),
            connect_stream("wss://h/twilio/media", &[("call_id", "c1"), ("token", "t")])
        );
        let u = Script::ConnectUrl {
            url: "wss://uv/join".into(),
        };
        assert_eq!(render(&u), connect_stream("wss://uv/join", &[]));
        assert_eq!(render(&Script::SayHangup("Bye.")), say_hangup("Bye."));
        assert_eq!(render(&Script::Hangup), hangup());
    }

    #[test]
    fn handover_scripts_escape_and_keep_the_stream_after_the_digits() {
        let x = play_digits_then_stream("12w#", "wss://h/twilio/media", &[("token", "a&b")]);
        assert!(
            x.contains(
                "<Response><Play digits=\"12w#\"/><Connect><Stream url=\"wss://h/twilio/media\">"
            ),
            "{x}"
        );
        assert!(
            x.contains("value=\"a&amp;b\"") && x.ends_with("<Hangup/></Response>"),
            "{x}"
        );
        let d = dial(
            "+14155550100",
            "https://h/a?x=1&y=2",
            Some("https://h/w"),
            20,
            None,
        );
        assert!(d.contains("action=\"https://h/a?x=1&amp;y=2\""), "{d}");
        assert!(
            d.contains("<Number url=\"https://h/w\">+14155550100</Number>"),
            "{d}"
        );
        assert_eq!(
            say("a<b"),
            format!("{HEADER}<Response><Say>a&lt;b</Say></Response>")
        );
    }
}
