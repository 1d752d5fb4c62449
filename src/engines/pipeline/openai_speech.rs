//! OpenAI speech (`POST {api_base_url}/audio/speech`, `response_format: "pcm"`): 24 kHz s16le,
//! resampled to 8 kHz by a band-limited filter and μ-law encoded for the phone. One request
//! per sentence, in order, so the first sentence plays while later ones are synthesized.

use futures_util::StreamExt;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::tts::TtsOut;
use crate::audio::resample::Decimate24To8;

#[derive(Clone)]
pub struct SpeechParams {
    pub url: String,
    pub api_key: String,
    pub model: String,
    pub voice: String,
}

pub struct OpenAiTts {
    http: reqwest::Client,
    params: SpeechParams,
    sentences: Option<mpsc::UnboundedSender<String>>,
    out: Option<mpsc::Receiver<TtsOut>>,
    task: Option<JoinHandle<()>>,
}

/// Audio goes to the bridge in pieces of at most this (100 ms).
const PIECE: usize = 800;

impl OpenAiTts {
    pub fn new(http: reqwest::Client, params: SpeechParams) -> Self {
        Self {
            http,
            params,
            sentences: None,
            out: None,
            task: None,
        }
    }

    pub fn begin(&mut self) {
        self.cancel();
        let (stx, mut srx) = mpsc::unbounded_channel::<String>();
        let (otx, orx) = mpsc::channel(64);
        let http = self.http.clone();
        let p = self.params.clone();
        self.task = Some(tokio::spawn(async move {
            while let Some(s) = srx.recv().await {
                if let Err(e) = sentence(&http, &p, &s, &otx).await {
                    let _ = otx.send(TtsOut::Failed(e)).await;
                    return;
                }
                if otx.send(TtsOut::Segment(s)).await.is_err() {
                    return;
                }
            }
            let _ = otx.send(TtsOut::Done).await;
        }));
        self.sentences = Some(stx);
        self.out = Some(orx);
    }

    pub fn speak(&mut self, text: &str) -> Result<(), String> {
        match &self.sentences {
            Some(tx) => tx
                .send(text.to_owned())
                .map_err(|_| "speech worker gone".to_owned()),
            None => Err("speech not begun".into()),
        }
    }

    pub fn finish(&mut self) {
        self.sentences = None;
    }

    pub fn cancel(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        self.sentences = None;
        self.out = None;
    }

    pub async fn next(&mut self) -> TtsOut {
        match &mut self.out {
            Some(rx) => match rx.recv().await {
                Some(o) => o,
                None => {
                    self.out = None;
                    std::future::pending().await
                }
            },
            None => std::future::pending().await,
        }
    }
}

async fn sentence(
    http: &reqwest::Client,
    p: &SpeechParams,
    text: &str,
    out: &mpsc::Sender<TtsOut>,
) -> Result<(), String> {
    let body = json!({"model": p.model, "input": text, "voice": p.voice, "response_format": "pcm"});
    let mut req = http.post(&p.url).json(&body);
    if !p.api_key.is_empty() {
        req = req.bearer_auth(&p.api_key);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| format!("cannot reach the speech API: {}", e.without_url()))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(match status.as_u16() {
            401 | 403 => format!("HTTP {}: check openai.api_key", status.as_u16()),
            s => format!("HTTP {s}"),
        });
    }
    let mut body = resp.bytes_stream();
    let mut dec = Decimate24To8::new();
    let mut mu = Vec::with_capacity(PIECE * 2);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| format!("speech stream broken: {}", e.without_url()))?;
        dec.push(&chunk, &mut mu);
        while mu.len() >= PIECE {
            let rest = mu.split_off(PIECE);
            let piece = std::mem::replace(&mut mu, rest);
            out.send(TtsOut::Audio(piece))
                .await
                .map_err(|_| "cancelled".to_owned())?;
        }
    }
    if !mu.is_empty() {
        out.send(TtsOut::Audio(std::mem::take(&mut mu)))
            .await
            .map_err(|_| "cancelled".to_owned())?;
    }
    Ok(())
}
