//! The simulated caller: a script of steps turned into one 20 ms μ-law frame at a time,
//! reacting to what the agent's audio is doing.

use std::sync::{Arc, LazyLock};

use crate::mulaw::{self, FRAME_BYTES as MULAW_FRAME_BYTES};

/// One thing the caller does. Durations are milliseconds, rounded up to whole 20 ms frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send silence.
    Silence(u64),
    /// Send speech-like audio (a 200–400 Hz voiced tone, syllable-modulated, loud enough for
    /// an energy VAD).
    Speak(u64),
    /// Send these μ-law bytes (e.g. recorded speech for an STT engine).
    Play(Arc<[u8]>),
    /// Wait until the agent has said something since the caller last stopped speaking (or
    /// since the stream started), its buffer has drained, and it has then been silent for
    /// `min_ms`: "wait for the reply to finish".
    WaitForAgentSilence { min_ms: u64 },
    /// Wait until agent audio has been playing continuously for `after_ms`.
    WaitForAgentSpeech { after_ms: u64 },
    /// Barge-in: once the agent has been talking for `after_ms`, speak for `speak_ms` over it.
    SpeakWhileAgentTalks { after_ms: u64, speak_ms: u64 },
    /// Press a key (sent as a `dtmf` message).
    Dtmf(char),
    /// Hang up: the simulator sends `stop`, closes the socket and completes the call.
    Hangup,
    /// Stop sending media frames for good while keeping the socket open (a stalled media
    /// path): what the app's no-media watchdog is for.
    StopMedia,
    /// An answering machine's beep ([`BEEP_MS`] of a 1 kHz tone): its greeting is over and it
    /// records from here. A `DetectMessageEnd` detection reports when it ends.
    Beep,
}

/// How long [`Step::Beep`] sounds.
pub const BEEP_MS: u64 = 500;

/// What the caller does once the media stream is up. When the steps run out without a
/// `Hangup`, the caller stays on the line in silence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerScript {
    pub steps: Vec<Step>,
    /// A wait step lasting longer than this makes the caller give up and hang up, so a
    /// silent agent cannot keep a simulated call open forever.
    pub max_wait_ms: u64,
}

impl CallerScript {
    pub fn new(steps: Vec<Step>) -> Self {
        Self {
            steps,
            max_wait_ms: 15_000,
        }
    }

    /// The dev-mode conversation: let the greeting finish, speak ~1.2 s, wait for the
    /// reply, speak ~1 s, wait for the reply, hang up.
    pub fn conversation() -> Self {
        Self::new(vec![
            Step::WaitForAgentSilence { min_ms: 600 },
            Step::Speak(1200),
            Step::WaitForAgentSilence { min_ms: 600 },
            Step::Speak(1000),
            Step::WaitForAgentSilence { min_ms: 600 },
            Step::Hangup,
        ])
    }

    /// A caller who never says anything and never hangs up.
    pub fn silent() -> Self {
        Self::new(Vec::new())
    }

    pub fn with_max_wait_ms(mut self, ms: u64) -> Self {
        self.max_wait_ms = ms;
        self
    }
}

impl Default for CallerScript {
    fn default() -> Self {
        Self::conversation()
    }
}

/// One second of synthetic voiced speech at 8 kHz, looped. Pitch glides 200–400 Hz once a
/// second and loudness follows a 4 Hz "syllable" envelope; both are whole cycles per second
/// so the loop has no click. Generated once: the 20 ms loop only copies from it.
static SPEECH: LazyLock<Vec<u8>> = LazyLock::new(|| {
    use std::f64::consts::TAU;
    let mut phase = 0.0f64;
    (0..8000)
        .map(|n| {
            let t = n as f64 / 8000.0;
            let f0 = 300.0 + 100.0 * (TAU * t).sin();
            phase += TAU * f0 / 8000.0;
            let env = 0.65 + 0.35 * (TAU * 4.0 * t).sin();
            let s = 8000.0 * env * (0.8 * phase.sin() + 0.2 * (2.0 * phase).sin());
            mulaw::encode(s as i16)
        })
        .collect()
});

/// 1 kHz at 8 kHz sampling: 8 samples a cycle, so one cycle loops without a click.
static BEEP: LazyLock<Vec<u8>> = LazyLock::new(|| {
    use std::f64::consts::TAU;
    (0..8)
        .map(|n| mulaw::encode((10_000.0 * (TAU * n as f64 / 8.0).sin()) as i16))
        .collect()
});

/// The agent side as the caller perceives it, updated each tick by playback.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct AgentView {
    /// Agent audio played during the tick just processed.
    pub playing: bool,
    /// When the current uninterrupted stretch of agent audio began.
    pub stretch_start_ms: Option<u64>,
    /// The tick time at which agent audio last played.
    pub last_audio_ms: Option<u64>,
    /// Agent bytes still queued.
    pub pending: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Emit {
    SpeechStarted,
    SpeechEnded,
    Dtmf(char),
    Hangup,
    GaveUp,
    /// A machine's beep just ended.
    BeepEnded,
}

#[derive(Debug)]
enum Op {
    Silence(u64),
    Speak(u64),
    Play(Arc<[u8]>),
    WaitSilence(u64),
    WaitSpeech(u64),
    Dtmf(char),
    Hangup,
    StopMedia,
    Beep,
}

pub(crate) struct Runner {
    ops: Vec<Op>,
    idx: usize,
    step_start: Option<u64>,
    play_off: usize,
    speech_off: usize,
    speaking: bool,
    last_speech_end_ms: u64,
    max_wait_ms: u64,
    done: bool,
    /// Set by `Step::StopMedia`: no more media frames are sent.
    pub media_stopped: bool,
}

impl Runner {
    pub fn new(script: &CallerScript) -> Self {
        let mut ops = Vec::with_capacity(script.steps.len() + 2);
        for s in &script.steps {
            match s {
                Step::Silence(ms) => ops.push(Op::Silence(*ms)),
                Step::Speak(ms) => ops.push(Op::Speak(*ms)),
                Step::Play(a) => ops.push(Op::Play(a.clone())),
                Step::WaitForAgentSilence { min_ms } => ops.push(Op::WaitSilence(*min_ms)),
                Step::WaitForAgentSpeech { after_ms } => ops.push(Op::WaitSpeech(*after_ms)),
                Step::SpeakWhileAgentTalks { after_ms, speak_ms } => {
                    ops.push(Op::WaitSpeech(*after_ms));
                    ops.push(Op::Speak(*speak_ms));
                }
                Step::Dtmf(c) => ops.push(Op::Dtmf(*c)),
                Step::Hangup => ops.push(Op::Hangup),
                Step::StopMedia => ops.push(Op::StopMedia),
                Step::Beep => ops.push(Op::Beep),
            }
        }
        Self {
            ops,
            idx: 0,
            step_start: None,
            play_off: 0,
            speech_off: 0,
            speaking: false,
            last_speech_end_ms: 0,
            max_wait_ms: script.max_wait_ms,
            done: false,
            media_stopped: false,
        }
    }

    fn next_op(&mut self) {
        self.idx += 1;
        self.step_start = None;
        self.play_off = 0;
    }

    fn silence(&mut self, now_ms: u64, out: &mut [u8], emits: &mut Vec<Emit>) {
        out.fill(mulaw::SILENCE);
        if self.speaking {
            self.speaking = false;
            self.last_speech_end_ms = now_ms;
            emits.push(Emit::SpeechEnded);
        }
    }

    fn voice(&mut self, out: &mut [u8], emits: &mut Vec<Emit>) {
        if !self.speaking {
            self.speaking = true;
            emits.push(Emit::SpeechStarted);
        }
        let clip = SPEECH.as_slice();
        for b in out.iter_mut() {
            *b = clip[self.speech_off];
            self.speech_off = (self.speech_off + 1) % clip.len();
        }
    }

    /// Fills `out` (one frame) with the caller's audio for the frame at `now_ms`, pushing
    /// what happened into `emits`. After `Emit::Hangup` the frame must not be sent.
    pub fn frame(&mut self, now_ms: u64, agent: &AgentView, out: &mut [u8], emits: &mut Vec<Emit>) {
        debug_assert_eq!(out.len(), MULAW_FRAME_BYTES);
        loop {
            if self.done {
                return self.silence(now_ms, out, emits);
            }
            let start = *self.step_start.get_or_insert(now_ms);
            let elapsed = now_ms.saturating_sub(start);
            let Some(op) = self.ops.get(self.idx) else {
                self.done = true;
                continue;
            };
            match op {
                Op::Silence(ms) if elapsed < *ms => return self.silence(now_ms, out, emits),
                Op::Speak(ms) if elapsed < *ms => return self.voice(out, emits),
                Op::Play(audio) if self.play_off < audio.len() => {
                    let audio = audio.clone();
                    let end = (self.play_off + out.len()).min(audio.len());
                    let n = end - self.play_off;
                    out[..n].copy_from_slice(&audio[self.play_off..end]);
                    out[n..].fill(mulaw::SILENCE);
                    self.play_off = end;
                    if !self.speaking {
                        self.speaking = true;
                        emits.push(Emit::SpeechStarted);
                    }
                    return;
                }
                Op::WaitSilence(min) => {
                    let replied = agent
                        .last_audio_ms
                        .is_some_and(|t| t >= self.last_speech_end_ms);
                    let quiet_for = agent.last_audio_ms.map(|t| now_ms.saturating_sub(t));
                    if replied
                        && !agent.playing
                        && agent.pending == 0
                        && quiet_for.is_some_and(|q| q >= *min)
                    {
                        self.next_op();
                        continue;
                    }
                    if elapsed > self.max_wait_ms {
                        return self.give_up(now_ms, out, emits);
                    }
                    return self.silence(now_ms, out, emits);
                }
                Op::WaitSpeech(after) => {
                    let talking_for = agent
                        .stretch_start_ms
                        .filter(|_| agent.playing)
                        .map(|s| now_ms.saturating_sub(s));
                    if talking_for.is_some_and(|t| t >= *after) {
                        self.next_op();
                        continue;
                    }
                    if elapsed > self.max_wait_ms {
                        return self.give_up(now_ms, out, emits);
                    }
                    return self.silence(now_ms, out, emits);
                }
                Op::Dtmf(c) => {
                    emits.push(Emit::Dtmf(*c));
                    self.next_op();
                }
                // A tone, not speech: no speech events (the app's VAD may still hear it).
                Op::Beep if elapsed < BEEP_MS => {
                    let tone = BEEP.as_slice();
                    for (i, b) in out.iter_mut().enumerate() {
                        *b = tone[(elapsed as usize * 8 + i) % tone.len()];
                    }
                    return;
                }
                Op::Beep => {
                    emits.push(Emit::BeepEnded);
                    self.next_op();
                }
                Op::StopMedia => {
                    self.media_stopped = true;
                    self.done = true;
                    return self.silence(now_ms, out, emits);
                }
                Op::Hangup => {
                    if self.speaking {
                        self.silence(now_ms, out, emits);
                    }
                    emits.push(Emit::Hangup);
                    self.done = true;
                    return;
                }
                // A timed step that has run its course.
                Op::Silence(_) | Op::Speak(_) | Op::Play(_) => {
                    self.next_op();
                    // The utterance ends here unless more speech follows at once, so a
                    // DTMF or hangup right after speech comes after its end.
                    let more_speech =
                        matches!(self.ops.get(self.idx), Some(Op::Speak(_) | Op::Play(_)));
                    if self.speaking && !more_speech {
                        self.speaking = false;
                        self.last_speech_end_ms = now_ms;
                        emits.push(Emit::SpeechEnded);
                    }
                }
            }
        }
    }

    fn give_up(&mut self, now_ms: u64, out: &mut [u8], emits: &mut Vec<Emit>) {
        self.silence(now_ms, out, emits);
        emits.push(Emit::GaveUp);
        emits.push(Emit::Hangup);
        self.done = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(r: &mut Runner, from_ms: u64, frames: u64, agent: AgentView) -> Vec<(u64, Emit)> {
        let mut out = [0u8; MULAW_FRAME_BYTES];
        let mut emits = Vec::new();
        let mut all = Vec::new();
        for k in 0..frames {
            let t = from_ms + k * 20;
            r.frame(t, &agent, &mut out, &mut emits);
            all.extend(emits.drain(..).map(|e| (t, e)));
        }
        all
    }

    #[test]
    fn speech_is_loud_and_silence_is_silent() {
        let loud = mulaw::mean_abs(&SPEECH);
        assert!((2500..7000).contains(&loud), "mean abs {loud}");
        for w in SPEECH.chunks(160) {
            assert!(mulaw::mean_abs(w) > 1200, "every frame of speech is voiced");
        }
    }

    #[test]
    fn timed_steps_dtmf_and_hangup() {
        let mut r = Runner::new(&CallerScript::new(vec![
            Step::Silence(40),
            Step::Speak(60),
            Step::Dtmf('5'),
            Step::Hangup,
        ]));
        let emits = run(&mut r, 0, 10, AgentView::default());
        assert_eq!(
            emits,
            vec![
                (40, Emit::SpeechStarted),
                (100, Emit::SpeechEnded),
                (100, Emit::Dtmf('5')),
                (100, Emit::Hangup)
            ]
        );
    }

    #[test]
    fn waits_for_the_agent_reply_to_finish() {
        let mut r = Runner::new(&CallerScript::new(vec![
            Step::WaitForAgentSilence { min_ms: 100 },
            Step::Hangup,
        ]));
        // The agent has not said anything yet: keep waiting.
        assert!(run(&mut r, 0, 20, AgentView::default()).is_empty());
        let talking = AgentView {
            playing: true,
            stretch_start_ms: Some(400),
            last_audio_ms: Some(500),
            pending: 800,
        };
        assert!(run(&mut r, 500, 5, talking).is_empty());
        let quiet = AgentView {
            playing: false,
            stretch_start_ms: None,
            last_audio_ms: Some(600),
            pending: 0,
        };
        assert_eq!(run(&mut r, 620, 5, quiet), vec![(700, Emit::Hangup)]);
    }

    #[test]
    fn barge_in_and_giving_up() {
        let mut r = Runner::new(&CallerScript::new(vec![Step::SpeakWhileAgentTalks {
            after_ms: 100,
            speak_ms: 40,
        }]));
        let talking = AgentView {
            playing: true,
            stretch_start_ms: Some(0),
            last_audio_ms: Some(0),
            pending: 1600,
        };
        assert_eq!(
            run(&mut r, 60, 5, talking),
            vec![(100, Emit::SpeechStarted), (140, Emit::SpeechEnded)]
        );
        let mut r = Runner::new(
            &CallerScript::new(vec![Step::WaitForAgentSilence { min_ms: 0 }]).with_max_wait_ms(100),
        );
        assert_eq!(
            run(&mut r, 0, 10, AgentView::default()),
            vec![(120, Emit::GaveUp), (120, Emit::Hangup)]
        );
    }
}
