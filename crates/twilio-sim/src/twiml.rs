//! A small TwiML reader: enough XML (elements, attributes in either quote style, text,
//! comments, CDATA, the five named entities and numeric character references) to execute
//! the verbs voicectl emits. Anything malformed is Twilio's error 12100.

/// A verb the simulator executes, in document order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verb {
    Say {
        text: String,
        loops: u32,
    },
    Pause {
        length_secs: u64,
    },
    Hangup,
    /// `reason` is `rejected` (default) or `busy`.
    Reject {
        reason: String,
    },
    /// `<Connect><Stream>`.
    Stream(StreamSpec),
    /// A verb (or `<Connect>` noun) the simulator does not implement; skipped and recorded.
    Unsupported(String),
    /// `<Play digits="…"/>`: DTMF tones played on the call (`w`/`W`: a half-second pause).
    PlayDigits(String),
    /// `<Dial>` with one `<Number>` (or the number as text).
    Dial(DialSpec),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DialSpec {
    pub number: String,
    pub action: Option<String>,
    pub method: String,
    pub timeout_secs: u64,
    /// `<Number url>`: TwiML for the person answering, before the parties are joined.
    pub whisper_url: Option<String>,
    pub caller_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamSpec {
    pub url: String,
    pub name: Option<String>,
    pub track: Option<String>,
    pub status_callback: Option<String>,
    pub status_callback_method: Option<String>,
    pub parameters: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TwimlError {
    #[error("malformed XML at byte {at}: {what}")]
    Xml { at: usize, what: &'static str },
    #[error("unknown entity &{0};")]
    Entity(String),
    #[error("root element is <{0}>, expected <Response>")]
    Root(String),
    #[error("<{verb}> has an invalid {attr:?} attribute: {value:?}")]
    Attribute {
        verb: &'static str,
        attr: &'static str,
        value: String,
    },
    #[error("<Stream> without a url attribute")]
    StreamUrl,
}

/// Parses a TwiML document into verbs.
pub fn parse(xml: &str) -> Result<Vec<Verb>, TwimlError> {
    let root = Reader::new(xml).document()?;
    if root.name != "Response" {
        return Err(TwimlError::Root(root.name));
    }
    let mut verbs = Vec::new();
    for el in root.elements() {
        verbs.push(verb(el)?);
    }
    Ok(verbs)
}

fn verb(el: &Element) -> Result<Verb, TwimlError> {
    Ok(match el.name.as_str() {
        "Say" => {
            let loops = match el.attr("loop") {
                None => 1,
                // loop="0" repeats until the call ends; a large finite count is equivalent.
                Some(v) => match v.trim().parse::<u32>() {
                    Ok(0) => 10_000,
                    Ok(n) => n,
                    Err(_) => return Err(attr_err("Say", "loop", v)),
                },
            };
            Verb::Say {
                text: el.text().trim().to_owned(),
                loops,
            }
        }
        "Pause" => {
            let length_secs = match el.attr("length") {
                None => 1,
                Some(v) => v
                    .trim()
                    .parse()
                    .map_err(|_| attr_err("Pause", "length", v))?,
            };
            Verb::Pause { length_secs }
        }
        "Hangup" => Verb::Hangup,
        "Dial" => {
            let number_el = el.elements().find(|n| n.name == "Number");
            let number = match number_el {
                Some(n) => n.text().trim().to_owned(),
                None => el.text().trim().to_owned(),
            };
            let timeout_secs = match el.attr("timeout") {
                None => 30,
                Some(v) => v
                    .trim()
                    .parse()
                    .map_err(|_| attr_err("Dial", "timeout", v))?,
            };
            Verb::Dial(DialSpec {
                number,
                action: el.attr("action").map(str::to_owned),
                method: el.attr("method").unwrap_or("POST").to_owned(),
                timeout_secs,
                whisper_url: number_el.and_then(|n| n.attr("url")).map(str::to_owned),
                caller_id: el.attr("callerId").map(str::to_owned),
            })
        }
        "Play" if el.attr("digits").is_some() => {
            let digits = el.attr("digits").unwrap_or_default().trim().to_owned();
            if digits.is_empty()
                || !digits
                    .chars()
                    .all(|c| c.is_ascii_digit() || matches!(c, '*' | '#' | 'w' | 'W'))
            {
                return Err(attr_err("Play", "digits", &digits));
            }
            Verb::PlayDigits(digits)
        }
        "Reject" => Verb::Reject {
            reason: el.attr("reason").unwrap_or("rejected").to_owned(),
        },
        "Connect" => {
            let nouns: Vec<&Element> = el.elements().collect();
            match nouns.as_slice() {
                [s] if s.name == "Stream" => Verb::Stream(stream(s)?),
                [other] => Verb::Unsupported(format!("Connect/{}", other.name)),
                _ => Verb::Unsupported("Connect".into()),
            }
        }
        other => Verb::Unsupported(other.to_owned()),
    })
}

fn stream(el: &Element) -> Result<StreamSpec, TwimlError> {
    let url = el.attr("url").ok_or(TwimlError::StreamUrl)?.to_owned();
    let mut parameters = Vec::new();
    for p in el.elements().filter(|p| p.name == "Parameter") {
        if let (Some(n), Some(v)) = (p.attr("name"), p.attr("value")) {
            parameters.push((n.to_owned(), v.to_owned()));
        }
    }
    let owned = |k: &str| el.attr(k).map(str::to_owned);
    Ok(StreamSpec {
        url,
        name: owned("name"),
        track: owned("track"),
        status_callback: owned("statusCallback"),
        status_callback_method: owned("statusCallbackMethod"),
        parameters,
    })
}

fn attr_err(verb: &'static str, attr: &'static str, value: &str) -> TwimlError {
    TwimlError::Attribute {
        verb,
        attr,
        value: value.to_owned(),
    }
}

#[derive(Debug)]
struct Element {
    name: String,
    attrs: Vec<(String, String)>,
    children: Vec<Node>,
}

#[derive(Debug)]
enum Node {
    Element(Element),
    Text(String),
}

impl Element {
    fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        })
    }

    fn text(&self) -> String {
        let mut s = String::new();
        for n in &self.children {
            if let Node::Text(t) = n {
                s.push_str(t);
            }
        }
        s
    }
}

struct Reader<'a> {
    s: &'a str,
    pos: usize,
}

/// Nesting deeper than this is not TwiML; refusing it keeps recursion bounded.
const MAX_DEPTH: usize = 32;

impl<'a> Reader<'a> {
    fn new(s: &'a str) -> Self {
        Self {
            s: s.strip_prefix('\u{feff}').unwrap_or(s),
            pos: 0,
        }
    }

    fn err(&self, what: &'static str) -> TwimlError {
        TwimlError::Xml { at: self.pos, what }
    }

    fn rest(&self) -> &'a str {
        &self.s[self.pos..]
    }

    fn eat(&mut self, lit: &str) -> bool {
        if self.rest().starts_with(lit) {
            self.pos += lit.len();
            true
        } else {
            false
        }
    }

    fn skip_ws(&mut self) {
        let n = self.rest().len() - self.rest().trim_start().len();
        self.pos += n;
    }

    /// Skips up to and including `end`.
    fn skip_past(&mut self, end: &str, what: &'static str) -> Result<&'a str, TwimlError> {
        match self.rest().find(end) {
            Some(i) => {
                let inner = &self.rest()[..i];
                self.pos += i + end.len();
                Ok(inner)
            }
            None => Err(self.err(what)),
        }
    }

    /// Prolog, comments and processing instructions around the root element.
    fn skip_misc(&mut self) -> Result<(), TwimlError> {
        loop {
            self.skip_ws();
            if self.eat("<?") {
                self.skip_past("?>", "unterminated processing instruction")?;
            } else if self.eat("<!--") {
                self.skip_past("-->", "unterminated comment")?;
            } else if self.rest().starts_with("<!DOCTYPE") {
                // Entity declarations would let a document expand itself; Twilio refuses them too.
                return Err(self.err("DOCTYPE is not allowed"));
            } else {
                return Ok(());
            }
        }
    }

    fn document(mut self) -> Result<Element, TwimlError> {
        self.skip_misc()?;
        if !self.rest().starts_with('<') {
            return Err(self.err("expected the root element"));
        }
        let root = self.element(0)?;
        self.skip_misc()?;
        if !self.rest().is_empty() {
            return Err(self.err("content after the root element"));
        }
        Ok(root)
    }

    fn name(&mut self) -> Result<String, TwimlError> {
        let rest = self.rest();
        let end = rest
            .find(|c: char| c.is_whitespace() || matches!(c, '/' | '>' | '=' | '<'))
            .unwrap_or(rest.len());
        if end == 0 {
            return Err(self.err("expected a name"));
        }
        self.pos += end;
        Ok(rest[..end].to_owned())
    }

    fn element(&mut self, depth: usize) -> Result<Element, TwimlError> {
        if depth > MAX_DEPTH {
            return Err(self.err("elements nested too deeply"));
        }
        if !self.eat("<") {
            return Err(self.err("expected '<'"));
        }
        let name = self.name()?;
        let mut attrs = Vec::new();
        loop {
            self.skip_ws();
            if self.eat("/>") {
                return Ok(Element {
                    name,
                    attrs,
                    children: Vec::new(),
                });
            }
            if self.eat(">") {
                break;
            }
            let key = self.name()?;
            self.skip_ws();
            if !self.eat("=") {
                return Err(self.err("expected '=' after an attribute name"));
            }
            self.skip_ws();
            let quote = match self.rest().chars().next() {
                Some(q @ ('"' | '\'')) => q,
                _ => return Err(self.err("expected a quoted attribute value")),
            };
            self.pos += 1;
            let raw = match self.rest().find(quote) {
                Some(i) => &self.rest()[..i],
                None => return Err(self.err("unterminated attribute value")),
            };
            if raw.contains('<') {
                return Err(self.err("'<' inside an attribute value"));
            }
            self.pos += raw.len() + 1;
            attrs.push((key, unescape(raw)?));
        }
        let mut children = Vec::new();
        loop {
            if self.eat("</") {
                let close = self.name()?;
                self.skip_ws();
                if close != name || !self.eat(">") {
                    return Err(self.err("mismatched closing tag"));
                }
                return Ok(Element {
                    name,
                    attrs,
                    children,
                });
            }
            if self.eat("<!--") {
                self.skip_past("-->", "unterminated comment")?;
            } else if self.eat("<![CDATA[") {
                let text = self.skip_past("]]>", "unterminated CDATA section")?;
                children.push(Node::Text(text.to_owned()));
            } else if self.eat("<?") {
                self.skip_past("?>", "unterminated processing instruction")?;
            } else if self.rest().starts_with('<') {
                children.push(Node::Element(self.element(depth + 1)?));
            } else if self.rest().is_empty() {
                return Err(self.err("unterminated element"));
            } else {
                let rest = self.rest();
                let end = rest.find('<').unwrap_or(rest.len());
                let raw = &rest[..end];
                self.pos += end;
                children.push(Node::Text(unescape(raw)?));
            }
        }
    }
}

/// Resolves the five predefined entities and numeric character references.
pub fn unescape(raw: &str) -> Result<String, TwimlError> {
    if !raw.contains('&') {
        return Ok(raw.to_owned());
    }
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let Some(semi) = after.find(';').filter(|&s| s <= 10) else {
            return Err(TwimlError::Entity(after.chars().take(10).collect()));
        };
        let name = &after[..semi];
        let c = match name {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" => '\'',
            n => {
                let code = if let Some(hex) = n.strip_prefix("#x").or(n.strip_prefix("#X")) {
                    u32::from_str_radix(hex, 16).ok()
                } else if let Some(dec) = n.strip_prefix('#') {
                    dec.parse().ok()
                } else {
                    None
                };
                code.and_then(char::from_u32)
                    .ok_or_else(|| TwimlError::Entity(n.to_owned()))?
            }
        };
        out.push(c);
        rest = &after[semi + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Byte for byte what voicectl's TwiML builder writes (kept literal: the simulator must
    /// not depend on the code it tests).
    const CONNECT_STREAM: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Connect><Stream url=\"wss://h.example/twilio/media?x=1&amp;y=&quot;2&quot;\"><Parameter name=\"token\" value=\"a&lt;b&gt;&amp;&apos;c&apos;\"/><Parameter name=\"call\" value=\"call_1\"/></Stream></Connect><Hangup/></Response>";
    const SAY_HANGUP: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Say>Sorry &amp; goodbye &lt;3</Say><Hangup/></Response>";

    #[test]
    fn reads_play_digits_and_dial_with_number_url() {
        let x = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Play digits=\"12w#\"/><Dial action=\"https://h/a?x=1&amp;y=2\" method=\"POST\" timeout=\"20\" answerOnBridge=\"true\" callerId=\"+14155550100\"><Number url=\"https://h/w\">+14155550900</Number></Dial></Response>";
        assert_eq!(
            parse(x).unwrap(),
            vec![
                Verb::PlayDigits("12w#".into()),
                Verb::Dial(DialSpec {
                    number: "+14155550900".into(),
                    action: Some("https://h/a?x=1&y=2".into()),
                    method: "POST".into(),
                    timeout_secs: 20,
                    whisper_url: Some("https://h/w".into()),
                    caller_id: Some("+14155550100".into()),
                })
            ]
        );
        assert!(parse("<Response><Play digits=\"12x\"/></Response>").is_err());
        assert_eq!(
            parse("<Response><Dial>+14155550900</Dial></Response>").unwrap(),
            vec![Verb::Dial(DialSpec {
                number: "+14155550900".into(),
                method: "POST".into(),
                timeout_secs: 30,
                ..Default::default()
            })]
        );
    }

    #[test]
    fn reads_what_our_builder_writes() {
        let verbs = parse(CONNECT_STREAM).unwrap();
        assert_eq!(
            verbs,
            vec![
                Verb::Stream(StreamSpec {
                    url: "wss://h.example/twilio/media?x=1&y=\"2\"".into(),
                    parameters: vec![
                        ("token".into(), "a<b>&'c'".into()),
                        ("call".into(), "call_1".into())
                    ],
                    ..Default::default()
                }),
                Verb::Hangup
            ]
        );
        let verbs = parse(SAY_HANGUP).unwrap();
        assert_eq!(
            verbs,
            vec![
                Verb::Say {
                    text: "Sorry & goodbye <3".into(),
                    loops: 1
                },
                Verb::Hangup
            ]
        );
    }

    #[test]
    fn handles_xml_odds_and_ends() {
        let xml = "\u{feff}<?xml version='1.0'?>\n<!-- hi -->\n<Response>\n  <Say loop='2'>caf&#233; &#x263A; <![CDATA[<raw> & stuff]]></Say>\n  <Pause length=\"2\"/>\n  <!-- c --><Play>x.mp3</Play>\n  <Connect><Stream url='wss://a/b' name=\"s1\" statusCallback=\"https://a/cb\"><Parameter name='k' value='v &amp; w'/></Stream></Connect>\n  <Reject reason=\"busy\" />\n</Response>\n";
        let verbs = parse(xml).unwrap();
        assert_eq!(
            verbs[0],
            Verb::Say {
                text: "café ☺ <raw> & stuff".into(),
                loops: 2
            }
        );
        assert_eq!(verbs[1], Verb::Pause { length_secs: 2 });
        assert_eq!(verbs[2], Verb::Unsupported("Play".into()));
        match &verbs[3] {
            Verb::Stream(s) => {
                assert_eq!(s.url, "wss://a/b");
                assert_eq!(s.name.as_deref(), Some("s1"));
                assert_eq!(s.status_callback.as_deref(), Some("https://a/cb"));
                assert_eq!(s.parameters, vec![("k".into(), "v & w".into())]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            verbs[4],
            Verb::Reject {
                reason: "busy".into()
            }
        );
        assert_eq!(parse("<Response/>").unwrap(), vec![]);
    }

    #[test]
    fn rejects_malformed_documents() {
        for bad in [
            "",
            "hello",
            "<Response>",
            "<Response><Say>x</Response>",
            "<Response><Say a=b/></Response>",
            "<Response><Say>&bogus;</Say></Response>",
            "<Response><Say>a & b</Say></Response>",
            "<Response></Response><Response/>",
            "<!DOCTYPE x [<!ENTITY a 'b'>]><Response/>",
            "<Response><Connect><Stream/></Connect></Response>",
            "<Response><Pause length=\"x\"/></Response>",
        ] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
        assert_eq!(
            parse("<Foo/>"),
            Err(TwimlError::Root("Foo".into())),
            "root must be Response"
        );
        let deep = "<a>".repeat(100);
        assert!(parse(&format!("<Response>{deep}</Response>")).is_err());
    }
}
