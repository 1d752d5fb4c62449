//! A browser call as a [`Leg`]: Opus from the browser decoded to μ-law 8 kHz for the bridge,
//! the bridge's μ-law encoded to 20 ms Opus frames that the endpoint paces out.

use std::borrow::Cow;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use tokio::sync::mpsc;

use super::{Cmd, Slot, ToLeg, WebRtcError};
use crate::audio::mulaw;
use crate::audio::opus::{Decoder, Encoder, FRAME_SAMPLES};
use crate::media::leg::{Leg, LegEvent, Refusal};

pub struct WebLeg {
    id: u64,
    rx: mpsc::Receiver<ToLeg>,
    cmds: mpsc::Sender<(u64, Cmd)>,
    _slot: Slot,
    dec: Decoder,
    enc: Encoder,
    /// Agent audio not yet a whole frame.
    pending: Vec<i16>,
    /// Fed but not flushed.
    outbox: Vec<Cmd>,
    packet: Vec<u8>,
    mulaw: Vec<u8>,
    b64: String,
    closed: bool,
    /// Why the peer went, once it has.
    gone: Option<&'static str>,
}

impl WebLeg {
    pub(super) fn new(
        id: u64,
        rx: mpsc::Receiver<ToLeg>,
        cmds: mpsc::Sender<(u64, Cmd)>,
        slot: Slot,
    ) -> Result<Self, WebRtcError> {
        Ok(Self {
            id,
            rx,
            cmds,
            _slot: slot,
            dec: Decoder::new()?,
            enc: Encoder::new()?,
            pending: Vec::with_capacity(FRAME_SAMPLES * 2),
            outbox: Vec::new(),
            packet: Vec::new(),
            mulaw: Vec::new(),
            b64: String::new(),
            closed: false,
            gone: None,
        })
    }

    fn encode_pending(&mut self, pad: bool) -> Result<(), String> {
        if pad && !self.pending.is_empty() {
            let whole = self.pending.len().div_ceil(FRAME_SAMPLES) * FRAME_SAMPLES;
            self.pending.resize(whole, 0);
        }
        let mut start = 0;
        while self.pending.len() - start >= FRAME_SAMPLES {
            let frame = &self.pending[start..start + FRAME_SAMPLES];
            self.enc
                .encode(frame, &mut self.packet)
                .map_err(|e| e.to_string())?;
            self.outbox.push(Cmd::Frame(self.packet.clone()));
            start += FRAME_SAMPLES;
        }
        self.pending.drain(..start);
        Ok(())
    }

    async fn send(&mut self, cmd: Cmd) -> Result<(), String> {
        self.cmds
            .send((self.id, cmd))
            .await
            .map_err(|_| "the WebRTC endpoint stopped".to_string())
    }
}

impl Leg for WebLeg {
    async fn recv(&mut self) -> LegEvent<'_> {
        if self.gone.is_some() || self.closed {
            return LegEvent::Closed;
        }
        let Some(msg) = self.rx.recv().await else {
            return LegEvent::Failed;
        };
        match msg {
            ToLeg::Audio(packet) => match self.dec.decode(&packet) {
                Ok(pcm) => {
                    self.mulaw.clear();
                    self.mulaw.extend(pcm.iter().map(|&s| mulaw::encode(s)));
                    self.b64.clear();
                    B64.encode_string(&self.mulaw, &mut self.b64);
                    LegEvent::Audio(Cow::Borrowed(&self.b64))
                }
                Err(e) => {
                    tracing::debug!(error = %e, "undecodable Opus packet");
                    LegEvent::Ignored
                }
            },
            ToLeg::Mark(seq) => LegEvent::Mark(seq),
            ToLeg::Gone(reason) => {
                tracing::info!(reason, "browser peer gone");
                self.gone = Some(reason);
                LegEvent::Closed
            }
        }
    }

    async fn feed_audio(&mut self, payload_b64: &str) -> Result<(), String> {
        self.mulaw.clear();
        B64.decode_vec(payload_b64, &mut self.mulaw)
            .map_err(|e| e.to_string())?;
        self.pending
            .extend(self.mulaw.iter().map(|&b| mulaw::decode(b)));
        self.encode_pending(false)
    }

    async fn feed_mark(&mut self, seq: u64) -> Result<(), String> {
        // The mark must follow all audio fed before it: a partial frame goes out padded.
        self.encode_pending(true)?;
        self.outbox.push(Cmd::Mark(seq));
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), String> {
        let out = std::mem::take(&mut self.outbox);
        for cmd in out {
            self.send(cmd).await?;
        }
        Ok(())
    }

    async fn clear(&mut self) -> Result<(), String> {
        self.pending.clear();
        self.outbox.retain(|c| matches!(c, Cmd::Mark(_)));
        self.send(Cmd::Clear).await
    }

    async fn close(&mut self) {
        if !self.closed {
            self.closed = true;
            let _ = self.send(Cmd::Close).await;
        }
    }

    async fn refuse(&mut self, _why: Refusal) {
        self.close().await;
    }

    /// Why the browser went away, if it did (`peer_timeout`, `peer_disconnected`, ...).
    fn gone_reason(&self) -> Option<&'static str> {
        self.gone
    }
}

impl Drop for WebLeg {
    fn drop(&mut self) {
        if !self.closed {
            let _ = self.cmds.try_send((self.id, Cmd::Close));
        }
    }
}
