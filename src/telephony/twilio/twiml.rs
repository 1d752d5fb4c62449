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
}
