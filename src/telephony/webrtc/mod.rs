//! Browser calls: a WebRTC endpoint (str0m, ICE-lite) on one UDP socket for all calls, and the
//! [`WebLeg`] that makes a browser look like any other phone leg to the bridge.
//!
//! One endpoint task owns the socket and every call's `Rtc` (sans-IO, cheap): it demultiplexes
//! datagrams by source address (learned from the first STUN check that a call's `Rtc`
//! accepts), paces agent audio out at one 20 ms frame per tick, echoes marks when the audio
//! before them has gone out, and notices a peer that vanished. The codec work (Opus ⇄ μ-law)
//! runs in each call's own task, inside [`WebLeg`].

mod leg;

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use str0m::change::SdpOffer;
use str0m::media::{Frequency, MediaKind, MediaTime, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use leg::WebLeg;

use crate::audio::opus::FRAME_TICKS;

/// Largest SDP offer accepted (a browser's audio-only offer is 3-6 KB).
pub const MAX_OFFER_BYTES: usize = 32 * 1024;
const FRAME: Duration = Duration::from_millis(20);
const TICK: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum WebRtcError {
    #[error("not a valid SDP offer: {0}")]
    BadOffer(String),
    #[error("the offer has no audio")]
    NoAudio,
    #[error("too many browser calls at once")]
    Full,
    #[error("the WebRTC endpoint is not running")]
    Down,
    #[error("codec: {0}")]
    Codec(#[from] crate::audio::opus::OpusError),
}

/// What the endpoint tells a call's leg.
#[derive(Debug)]
enum ToLeg {
    Audio(Arc<[u8]>),
    Mark(u64),
    /// The peer is gone (`reason` for the log).
    Gone(&'static str),
}

/// What a call's leg asks of the endpoint.
#[derive(Debug)]
enum Cmd {
    Frame(Vec<u8>),
    Mark(u64),
    Clear,
    Close,
}

struct NewPeer {
    id: u64,
    rtc: Rtc,
    to_leg: mpsc::Sender<ToLeg>,
}

/// The running endpoint: hands out legs for offers.
pub struct Endpoint {
    addr: SocketAddr,
    new_peers: mpsc::UnboundedSender<NewPeer>,
    cmds: mpsc::Sender<(u64, Cmd)>,
    live: Arc<AtomicUsize>,
    max: usize,
    next_id: AtomicUsize,
}

impl Endpoint {
    /// Binds `ip:port` (`ip` is also what is advertised) and runs until `shutdown`.
    pub async fn start(
        ip: IpAddr,
        port: u16,
        max: usize,
        peer_timeout: Duration,
        shutdown: CancellationToken,
    ) -> std::io::Result<Arc<Self>> {
        // Bind the advertised address itself when it is local (loopback in tests and `--dev`);
        // otherwise (behind NAT) every interface.
        let bind_ip = if ip.is_loopback() {
            ip
        } else {
            IpAddr::from([0, 0, 0, 0])
        };
        let socket = UdpSocket::bind((bind_ip, port)).await?;
        let addr = SocketAddr::new(ip, socket.local_addr()?.port());
        let (new_tx, new_rx) = mpsc::unbounded_channel();
        let (cmd_tx, cmd_rx) = mpsc::channel(4096);
        let run = Runner {
            socket,
            addr,
            peers: HashMap::new(),
            routes: HashMap::new(),
            peer_timeout,
        };
        tokio::spawn(run.run(new_rx, cmd_rx, shutdown));
        tracing::info!(%addr, "WebRTC endpoint listening");
        Ok(Arc::new(Self {
            addr,
            new_peers: new_tx,
            cmds: cmd_tx,
            live: Arc::new(AtomicUsize::new(0)),
            max,
            next_id: AtomicUsize::new(1),
        }))
    }

    /// The advertised candidate address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Browser calls now connected or connecting.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Answers an offer: the SDP answer and the leg that carries the call's audio.
    pub fn accept(&self, offer: &str) -> Result<(String, WebLeg), WebRtcError> {
        if offer.len() > MAX_OFFER_BYTES {
            return Err(WebRtcError::BadOffer("too large".into()));
        }
        let parsed =
            SdpOffer::from_sdp_string(offer).map_err(|e| WebRtcError::BadOffer(e.to_string()))?;
        if !offer.lines().any(|l| l.starts_with("m=audio ")) {
            return Err(WebRtcError::NoAudio);
        }
        // A reservation, released when the leg drops.
        let slot = Slot::take(&self.live, self.max).ok_or(WebRtcError::Full)?;
        let mut rtc = Rtc::builder()
            .set_ice_lite(true)
            .clear_codecs()
            .enable_opus(true, false)
            .set_crypto_provider(Arc::new(str0m::crypto::from_feature_flags()))
            .build(Instant::now());
        let cand =
            Candidate::host(self.addr, "udp").map_err(|e| WebRtcError::BadOffer(e.to_string()))?;
        rtc.add_local_candidate(cand);
        let answer = rtc
            .sdp_api()
            .accept_offer(parsed)
            .map_err(|e| WebRtcError::BadOffer(e.to_string()))?;
        let answer = answer.to_sdp_string();
        if !answer
            .lines()
            .any(|l| l.starts_with("a=rtpmap:") && l.contains("opus/48000"))
        {
            return Err(WebRtcError::NoAudio);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) as u64;
        let (to_leg, from_endpoint) = mpsc::channel(256);
        self.new_peers
            .send(NewPeer { id, rtc, to_leg })
            .map_err(|_| WebRtcError::Down)?;
        let leg = WebLeg::new(id, from_endpoint, self.cmds.clone(), slot)?;
        Ok((answer, leg))
    }
}

/// One of the endpoint's call slots.
pub(crate) struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(live: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        live.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| Self(live.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

enum Queued {
    Frame(Vec<u8>),
    Mark(u64),
}

struct Peer {
    rtc: Rtc,
    to_leg: mpsc::Sender<ToLeg>,
    mid: Option<Mid>,
    queue: VecDeque<Queued>,
    next_send: Instant,
    rtp_time: u64,
    last_rx: Instant,
    gone: bool,
}

struct Runner {
    socket: UdpSocket,
    addr: SocketAddr,
    peers: HashMap<u64, Peer>,
    /// Source address → peer, learned from the first datagram a peer's `Rtc` accepts.
    routes: HashMap<SocketAddr, u64>,
    peer_timeout: Duration,
}

impl Runner {
    async fn run(
        mut self,
        mut new_rx: mpsc::UnboundedReceiver<NewPeer>,
        mut cmd_rx: mpsc::Receiver<(u64, Cmd)>,
        shutdown: CancellationToken,
    ) {
        let mut buf = vec![0u8; 2048];
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(p) = new_rx.recv() => {
                    let now = Instant::now();
                    self.peers.insert(p.id, Peer {
                        rtc: p.rtc, to_leg: p.to_leg, mid: None, queue: VecDeque::new(),
                        next_send: now, rtp_time: 0, last_rx: now, gone: false,
                    });
                    self.drain(p.id).await;
                }
                Some((id, cmd)) = cmd_rx.recv() => self.command(id, cmd).await,
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok((n, from)) => self.datagram(&buf[..n], from).await,
                    Err(e) => tracing::debug!(error = %e, "WebRTC socket read"),
                },
                _ = tick.tick() => self.tick().await,
            }
        }
        for p in self.peers.values_mut() {
            p.rtc.disconnect();
        }
    }

    async fn datagram(&mut self, data: &[u8], source: SocketAddr) {
        let Ok(contents) = data.try_into() else {
            return;
        };
        let input = Input::Receive(
            Instant::now(),
            Receive {
                proto: Protocol::Udp,
                source,
                destination: self.addr,
                contents,
            },
        );
        let id = match self.routes.get(&source) {
            Some(id) => *id,
            None => match self.peers.iter().find(|(_, p)| p.rtc.accepts(&input)) {
                Some((id, _)) => {
                    self.routes.insert(source, *id);
                    *id
                }
                None => return,
            },
        };
        let Some(p) = self.peers.get_mut(&id) else {
            self.routes.remove(&source);
            return;
        };
        p.last_rx = Instant::now();
        if let Err(e) = p.rtc.handle_input(input) {
            tracing::debug!(error = %e, "WebRTC input refused");
        }
        self.drain(id).await;
    }

    async fn command(&mut self, id: u64, cmd: Cmd) {
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        match cmd {
            Cmd::Frame(f) => p.queue.push_back(Queued::Frame(f)),
            Cmd::Mark(seq) => p.queue.push_back(Queued::Mark(seq)),
            Cmd::Clear => {
                // Marks stay (in order), so the bridge still learns where playback stopped.
                p.queue.retain(|q| matches!(q, Queued::Mark(_)));
            }
            Cmd::Close => {
                p.rtc.disconnect();
                self.remove(id);
            }
        }
    }

    fn remove(&mut self, id: u64) {
        self.peers.remove(&id);
        self.routes.retain(|_, v| *v != id);
    }

    async fn tick(&mut self) {
        let now = Instant::now();
        let ids: Vec<u64> = self.peers.keys().copied().collect();
        for id in ids {
            let Some(p) = self.peers.get_mut(&id) else {
                continue;
            };
            if !p.gone && now.duration_since(p.last_rx) > self.peer_timeout {
                p.gone = true;
                let _ = p.to_leg.try_send(ToLeg::Gone("peer_timeout"));
            }
            send_due(p, now);
            self.drain(id).await;
            if let Some(p) = self.peers.get_mut(&id)
                && let Err(e) = p.rtc.handle_input(Input::Timeout(now))
            {
                tracing::debug!(error = %e, "WebRTC timeout");
            }
            self.drain(id).await;
        }
    }

    /// Runs a peer's `Rtc` until it has nothing more to do now.
    async fn drain(&mut self, id: u64) {
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        loop {
            match p.rtc.poll_output() {
                Ok(Output::Timeout(_)) => break,
                Ok(Output::Transmit(t)) => {
                    let _ = self.socket.send_to(&t.contents, t.destination).await;
                }
                Ok(Output::Event(e)) => match e {
                    Event::MediaAdded(m) if m.kind == MediaKind::Audio && p.mid.is_none() => {
                        p.mid = Some(m.mid);
                    }
                    Event::MediaData(d) => {
                        // A full leg queue drops a frame rather than stall every call.
                        let _ = p.to_leg.try_send(ToLeg::Audio(d.data));
                    }
                    Event::IceConnectionStateChange(IceConnectionState::Disconnected)
                        if !p.gone =>
                    {
                        p.gone = true;
                        let _ = p.to_leg.try_send(ToLeg::Gone("peer_disconnected"));
                    }
                    _ => {}
                },
                Err(e) => {
                    tracing::debug!(error = %e, "WebRTC peer failed");
                    if !p.gone {
                        p.gone = true;
                        let _ = p.to_leg.try_send(ToLeg::Gone("peer_failed"));
                    }
                    break;
                }
            }
        }
        if !p.rtc.is_alive() && !p.gone {
            p.gone = true;
            let _ = p.to_leg.try_send(ToLeg::Gone("peer_disconnected"));
        }
    }
}

/// Writes the frame that is due (one per 20 ms; one per call, as str0m wants its output
/// drained after each write) and echoes the marks it reaches.
fn send_due(p: &mut Peer, now: Instant) {
    // Marks at the head: everything before them has gone out.
    while let Some(Queued::Mark(seq)) = p.queue.front() {
        let _ = p.to_leg.try_send(ToLeg::Mark(*seq));
        p.queue.pop_front();
    }
    if p.queue.is_empty() {
        p.next_send = p.next_send.max(now);
        return;
    }
    if now < p.next_send {
        return;
    }
    // Late by more than a few frames (a stall): resume at once rather than burst.
    if now.duration_since(p.next_send) > 3 * FRAME {
        p.next_send = now;
    }
    if let Some(Queued::Frame(f)) = p.queue.pop_front() {
        if let Some(mid) = p.mid {
            write(&mut p.rtc, mid, now, p.rtp_time, f);
        }
        p.rtp_time += FRAME_TICKS;
        p.next_send += FRAME;
    }
    while let Some(Queued::Mark(seq)) = p.queue.front() {
        let _ = p.to_leg.try_send(ToLeg::Mark(*seq));
        p.queue.pop_front();
    }
}

fn write(rtc: &mut Rtc, mid: Mid, now: Instant, rtp_time: u64, frame: Vec<u8>) {
    let Some(writer) = rtc.writer(mid) else {
        return;
    };
    let Some(pt) = writer.payload_params().next().map(|p| p.pt()) else {
        return;
    };
    let time = MediaTime::new(rtp_time, Frequency::FORTY_EIGHT_KHZ);
    if let Err(e) = writer.write(pt, now, time, frame) {
        tracing::debug!(error = %e, "WebRTC write");
    }
}
