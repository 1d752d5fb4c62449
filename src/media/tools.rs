//! The bridge's narrow link to the call domain's tool executor: tool calls go up, replies come
//! down. The bridge never decides what a tool does; it only forwards, speaks and hangs up.

use tokio::sync::{mpsc, watch};

/// A function call an engine made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCallEvent {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// What the executor asks of the bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolReply {
    /// Hand `output` to the engine as the answer to call `id` (and note it in the transcript).
    Result {
        id: String,
        name: String,
        output: String,
    },
    /// Say this now (a tool's start / delayed / failed message, a goodbye).
    Say(String),
    /// End the call once what was said has played.
    Hangup(&'static str),
    /// An answering machine is recording (its beep has sounded): stop talking, say this,
    /// then hang up (`end_reason = "voicemail_left"`).
    LeaveMessage(String),
}

/// Both ends as the bridge holds them.
pub struct ToolLink {
    pub calls: mpsc::UnboundedSender<ToolCallEvent>,
    pub replies: mpsc::UnboundedReceiver<ToolReply>,
    /// Bumped at every barge-in, so tools with `on_interrupt = "cancel"` can stop.
    pub barge_ins: watch::Sender<u64>,
    /// Another way into `replies`, for the call domain outside the tool executor (a machine
    /// report asking for the voicemail message); held by the call's session, not the bridge.
    pub to_bridge: mpsc::UnboundedSender<ToolReply>,
}

impl ToolLink {
    /// The next reply; never resolves when the executor is gone (the call goes on).
    pub async fn next(link: &mut Option<ToolLink>) -> ToolReply {
        match link {
            Some(l) => match l.replies.recv().await {
                Some(r) => r,
                None => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }
}
