//! The `scripted` engine: needs no account. It greets, detects caller turns with an energy
//! VAD, answers each turn with the next configured line, and says goodbye when the lines run
//! out. Its "speech" is a synthetic voice-like tone whose length follows the text, which is
//! all a phone (or the simulator) needs to exercise the whole call path.

use std::collections::VecDeque;

use base64::Engine as _;

use super::{CallContext, EngineEvent, ItemId, Speaker};
use crate::audio::mulaw;

/// A frame is "loud" above this mean absolute amplitude (of 32767).
const LOUD: u32 = 600;
/// Loud frames in a row that start a caller turn (40 ms).
const START_FRAMES: u32 = 2;
/// Quiet frames in a row that end it (400 ms).
const END_FRAMES: u32 = 20;
/// Agent audio is handed to the bridge in 100 ms pieces.
const CHUNK_BYTES: usize = 800;

pub struct ScriptedEngine {
    ctx: CallContext,
    out: VecDeque<EngineEvent>,
    next_line: usize,
    speaking: bool,
    loud_run: u32,
    quiet_run: u32,
    speech_frames: u32,
    items: u32,
    done: bool,
    decode_buf: Vec<u8>,
    tool_calls: u32,
}

impl ScriptedEngine {
    pub fn new(ctx: CallContext) -> Self {
        Self {
            ctx,
            out: VecDeque::new(),
            next_line: 0,
            speaking: false,
            loud_run: 0,
            quiet_run: 0,
            speech_frames: 0,
            items: 0,
            done: false,
            decode_buf: Vec::with_capacity(crate::audio::MULAW_FRAME_BYTES),
            tool_calls: 0,
        }
    }

    pub fn stream_started(&mut self) {
        let greeting = self.ctx.greeting.clone();
        if !greeting.is_empty() {
            self.say(&greeting);
        }
    }

    pub fn say(&mut self, text: &str) {
        self.items += 1;
        let item: ItemId = format!("scripted_{}", self.items);
        self.out.push_back(EngineEvent::Transcript {
            speaker: Speaker::Agent,
            text: text.to_owned(),
        });
        let audio = synthesize(text);
        let b64 = base64::engine::general_purpose::STANDARD;
        for chunk in audio.chunks(CHUNK_BYTES) {
            self.out.push_back(EngineEvent::AgentAudio {
                item: item.clone(),
                payload_b64: b64.encode(chunk),
            });
        }
    }

    pub fn caller_audio(&mut self, payload_b64: &str) {
        self.decode_buf.clear();
        if base64::engine::general_purpose::STANDARD
            .decode_vec(payload_b64, &mut self.decode_buf)
            .is_err()
        {
            return;
        }
        let loud = mulaw::mean_abs(&self.decode_buf) > LOUD;
        if loud {
            self.loud_run += 1;
            self.quiet_run = 0;
        } else {
            self.quiet_run += 1;
            self.loud_run = 0;
        }
        if self.speaking {
            self.speech_frames += 1;
        }
        if !self.speaking && self.loud_run >= START_FRAMES {
            self.speaking = true;
            self.speech_frames = self.loud_run;
            self.out.push_back(EngineEvent::CallerSpeechStarted);
        } else if self.speaking && self.quiet_run >= END_FRAMES {
            self.speaking = false;
            let spoken_ms = (self.speech_frames.saturating_sub(END_FRAMES)) * 20;
            self.out.push_back(EngineEvent::CallerSpeechStopped);
            self.out.push_back(EngineEvent::Transcript {
                speaker: Speaker::Caller,
                text: format!("(caller spoke for {:.1} s)", spoken_ms as f64 / 1000.0),
            });
            self.reply();
        }
    }

    /// A caller turn given as text (keypad): answered like a spoken one.
    pub fn caller_text(&mut self, text: &str) {
        self.out.push_back(EngineEvent::CallerSpeechStopped);
        tracing::debug!(text, "caller text");
        self.reply();
    }

    fn reply(&mut self) {
        if self.done {
            return;
        }
        match self.ctx.script.get(self.next_line).cloned() {
            Some(line) => {
                self.next_line += 1;
                match parse_tool_line(&line) {
                    Some((name, arguments)) => {
                        self.tool_calls += 1;
                        self.out.push_back(EngineEvent::ToolCall {
                            id: format!("scripted_call_{}", self.tool_calls),
                            name: name.to_owned(),
                            arguments: arguments.to_owned(),
                        });
                    }
                    None => self.say(&line),
                }
            }
            None => {
                let bye = self.ctx.goodbye.clone();
                self.say(&bye);
                self.done = true;
                self.out.push_back(EngineEvent::Hangup {
                    reason: "agent_hangup",
                });
            }
        }
    }

    pub fn interrupted(&mut self, item: &str, _played_ms: u64) {
        // Drop what is still queued of the interrupted utterance.
        self.out
            .retain(|e| !matches!(e, EngineEvent::AgentAudio { item: i, .. } if i == item));
    }

    /// A tool answered: the agent reads (the start of) the answer out.
    pub fn tool_result(&mut self, _id: &str, output: &str) {
        let short: String = output.chars().take(200).collect();
        self.say(&short);
    }

    pub async fn next_event(&mut self) -> EngineEvent {
        match self.out.pop_front() {
            Some(e) => e,
            // Nothing until the next caller frame; the bridge's select! wakes us then.
            None => std::future::pending().await,
        }
    }
}

/// A script line `tool:NAME {json arguments}` makes the engine call tool NAME instead of
/// speaking (the arguments may be omitted: `{}`).
fn parse_tool_line(line: &str) -> Option<(&str, &str)> {
    let rest = line.trim().strip_prefix("tool:")?;
    let (name, args) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let args = args.trim();
    Some((name, if args.is_empty() { "{}" } else { args }))
}

/// A voice-like signal for `text`: ~55 ms per character (0.6–6 s), a 140 Hz fundamental with
/// harmonics and a 4 Hz syllable envelope, at moderate loudness.
pub fn synthesize(text: &str) -> Vec<u8> {
    let ms = (text.chars().count() as u64 * 55).clamp(600, 6000);
    let n = (ms * 8) as usize;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let t = i as f64 / 8000.0;
        let syllable = (std::f64::consts::PI * 4.0 * t).sin().abs();
        let f0 = 140.0 + 20.0 * (std::f64::consts::TAU * 0.5 * t).sin();
        let wave = (std::f64::consts::TAU * f0 * t).sin()
            + 0.5 * (std::f64::consts::TAU * 2.0 * f0 * t).sin()
            + 0.25 * (std::f64::consts::TAU * 3.0 * f0 * t).sin();
        let sample = (wave * syllable * 6000.0).clamp(-32000.0, 32000.0) as i16;
        out.push(mulaw::encode(sample));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ids::CallId;

    fn ctx() -> CallContext {
        CallContext {
            call_id: CallId::generate(),
            tenant: "t".into(),
            inbound: false,
            system_prompt: String::new(),
            greeting: "Hello".into(),
            voice: "alloy".into(),
            script: vec!["One".into()],
            goodbye: "Bye".into(),
            tools: Vec::new(),
        }
    }

    fn frame(loud: bool) -> String {
        let bytes: Vec<u8> = (0..160)
            .map(|i| {
                if loud {
                    mulaw::encode(((i as f64 * 0.3).sin() * 8000.0) as i16)
                } else {
                    mulaw::SILENCE
                }
            })
            .collect();
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn drain(e: &mut ScriptedEngine) -> Vec<EngineEvent> {
        e.out.drain(..).collect()
    }

    #[test]
    fn greets_then_answers_turns_then_hangs_up() {
        let mut e = ScriptedEngine::new(ctx());
        e.stream_started();
        let ev = drain(&mut e);
        assert!(
            matches!(&ev[0], EngineEvent::Transcript { speaker: Speaker::Agent, text } if text == "Hello")
        );
        assert!(
            ev.iter()
                .any(|e| matches!(e, EngineEvent::AgentAudio { .. }))
        );
        for turn in 0..2 {
            for _ in 0..25 {
                e.caller_audio(&frame(true));
            }
            for _ in 0..25 {
                e.caller_audio(&frame(false));
            }
            let ev = drain(&mut e);
            assert!(matches!(ev[0], EngineEvent::CallerSpeechStarted), "{ev:?}");
            assert!(ev.iter().any(|e| matches!(
                e,
                EngineEvent::Transcript {
                    speaker: Speaker::Caller,
                    ..
                }
            )));
            let hung_up = ev.iter().any(|e| matches!(e, EngineEvent::Hangup { .. }));
            assert_eq!(hung_up, turn == 1, "hangs up after the script runs out");
        }
    }

    #[test]
    fn a_tool_line_calls_the_tool_and_the_answer_is_spoken() {
        let mut c = ctx();
        c.script = vec![
            r#"tool:lookup_order {"order":"123"}"#.into(),
            "tool:end_call".into(),
        ];
        let mut e = ScriptedEngine::new(c);
        for expect in [("lookup_order", r#"{"order":"123"}"#), ("end_call", "{}")] {
            for _ in 0..25 {
                e.caller_audio(&frame(true));
            }
            for _ in 0..25 {
                e.caller_audio(&frame(false));
            }
            let ev = drain(&mut e);
            let call = ev.iter().find_map(|e| match e {
                EngineEvent::ToolCall {
                    id,
                    name,
                    arguments,
                } => Some((id.clone(), name.clone(), arguments.clone())),
                _ => None,
            });
            let (id, name, args) = call.expect("a tool call");
            assert_eq!((name.as_str(), args.as_str()), expect);
            e.tool_result(&id, "shipped");
            assert!(drain(&mut e).iter().any(|e| matches!(
                e,
                EngineEvent::Transcript { speaker: Speaker::Agent, text } if text == "shipped"
            )));
        }
    }

    #[test]
    fn silence_is_not_speech() {
        let mut e = ScriptedEngine::new(ctx());
        for _ in 0..100 {
            e.caller_audio(&frame(false));
        }
        assert!(drain(&mut e).is_empty());
    }
}
