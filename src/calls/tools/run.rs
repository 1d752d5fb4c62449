//! The per-call executor: one task per call receives the engine's tool calls from the bridge,
//! runs each once (a repeated id is ignored), speaks the tool's messages so there is no dead
//! air, and sends the result down. Results travel to the engine whatever the caller does, so a
//! barge-in never loses one; only `on_interrupt = "cancel"` tools stop at a barge-in.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use super::{CallInfo, ToolCall, request};
use crate::calls::handover;
use crate::calls::shared::Shared;
use crate::domain::Direction;
use crate::domain::ids::CallId;
use crate::domain::tool::{MAX_TIMEOUT, OnInterrupt, ToolDefinition};
use crate::engines::ToolSpec;
use crate::media::tools::{ToolCallEvent, ToolLink, ToolReply};
use crate::store::calls::Call;
use crate::store::tenants::Tenant;
use crate::store::{campaigns, tools as db};

/// What the executor knows of its call.
struct CallTools {
    call_id: CallId,
    tenant_id: i64,
    secret: Option<String>,
    info: CallInfo,
    /// The other party's number (the one `opt_out` puts on the do-not-call list).
    party: String,
    goodbye: String,
    defs: HashMap<String, ToolDefinition>,
    allow: Vec<String>,
    http: Option<reqwest::Client>,
}

/// The built-ins offered on every call; `transfer_call` only when the tenant has transfer
/// numbers.
fn built_ins(transfer: bool) -> Vec<ToolSpec> {
    let mut v = vec![
        ToolSpec {
            name: "end_call".into(),
            description: "End the call politely when the conversation is over.".into(),
            parameters: json!({"type": "object", "properties": {}}),
        },
        ToolSpec {
            name: "opt_out".into(),
            description: "The person asks not to be called again: put them on the do-not-call list and end the call politely.".into(),
            parameters: json!({"type": "object", "properties": {}}),
        },
        ToolSpec {
            name: "send_dtmf".into(),
            description: "Press keypad keys on the call (phone menus).".into(),
            parameters: json!({"type": "object", "properties": {"digits": {"type": "string", "pattern": "^[0-9*#wW]{1,32}$"}}, "required": ["digits"]}),
        },
    ];
    if transfer {
        v.push(ToolSpec {
            name: "transfer_call".into(),
            description: "Transfer the caller to a person (one of the configured transfer numbers or labels).".into(),
            parameters: json!({"type": "object", "properties": {"destination": {"type": "string"}, "summary": {"type": "string"}}, "required": ["destination", "summary"]}),
        });
    }
    v
}

/// What a call offers the engine: the built-ins (`transfer_call` only when the tenant has
/// transfer numbers), then the tenant's tools.
pub(crate) fn specs(stored: &[db::Tool], transfer: bool) -> Vec<ToolSpec> {
    let mut specs = built_ins(transfer);
    specs.extend(stored.iter().map(|t| ToolSpec {
        name: t.name.clone(),
        description: t.definition.description.clone(),
        parameters: t.definition.parameters.clone(),
    }));
    specs
}

impl Shared {
    /// Loads the tenant's tools for `call` and starts its executor: the functions to offer
    /// the engine, and the link the bridge holds. The executor ends when the bridge drops it.
    pub(crate) async fn start_tools(
        self: &Arc<Self>,
        call: &Call,
        tenant: &Tenant,
    ) -> (Vec<ToolSpec>, ToolLink) {
        let tenant_id = tenant.id;
        let stored = match self.store.read(move |c| db::list(c, tenant_id)).await {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "cannot load the tenant's tools; offering built-ins only");
                Vec::new()
            }
        };
        let cfg = self.config();
        let allow = cfg.server.allow_private_targets.clone();
        let specs = specs(&stored, !tenant.transfer_numbers.is_empty());
        let party = match call.direction {
            Direction::Inbound => call.from.clone(),
            _ => call.to.clone(),
        };
        let tools = CallTools {
            call_id: call.id.clone(),
            tenant_id,
            secret: tenant.webhook_secret.clone(),
            info: CallInfo {
                id: call.id.to_string(),
                tenant: tenant.name.clone(),
                to: call.to.clone(),
                from: call.from.clone(),
                metadata: call.metadata.clone(),
            },
            party,
            goodbye: cfg.agent.goodbye.clone(),
            defs: stored.into_iter().map(|t| (t.name, t.definition)).collect(),
            http: self.tool_client(&allow, MAX_TIMEOUT),
            allow,
        };
        let (calls_tx, calls_rx) = mpsc::unbounded_channel();
        let (replies_tx, replies_rx) = mpsc::unbounded_channel();
        let (barge_tx, barge_rx) = watch::channel(0);
        let to_bridge = replies_tx.clone();
        tokio::spawn(serve(
            self.clone(),
            Arc::new(tools),
            calls_rx,
            replies_tx,
            barge_rx,
        ));
        (
            specs,
            ToolLink {
                calls: calls_tx,
                replies: replies_rx,
                barge_ins: barge_tx,
                to_bridge,
            },
        )
    }
}

async fn serve(
    shared: Arc<Shared>,
    tools: Arc<CallTools>,
    mut calls: mpsc::UnboundedReceiver<ToolCallEvent>,
    replies: mpsc::UnboundedSender<ToolReply>,
    barge: watch::Receiver<u64>,
) {
    let mut seen = HashSet::new();
    while let Some(c) = calls.recv().await {
        // Exactly one execution per tool call id, however often an engine repeats it.
        if !seen.insert(c.id.clone()) {
            tracing::warn!(tool_call_id = %c.id, "repeated tool call ignored");
            continue;
        }
        let call = ToolCall {
            id: c.id,
            name: c.name,
            arguments: c.arguments,
        };
        tokio::spawn(one(
            shared.clone(),
            tools.clone(),
            call,
            replies.clone(),
            barge.clone(),
        ));
    }
}

fn args_of(call: &ToolCall) -> Value {
    serde_json::from_str(&call.arguments).unwrap_or(Value::Null)
}

async fn one(
    shared: Arc<Shared>,
    t: Arc<CallTools>,
    call: ToolCall,
    replies: mpsc::UnboundedSender<ToolReply>,
    mut barge: watch::Receiver<u64>,
) {
    let result = |output: String| ToolReply::Result {
        id: call.id.clone(),
        name: call.name.clone(),
        output,
    };
    let send = |r: ToolReply| {
        let _ = replies.send(r);
    };
    match call.name.as_str() {
        "end_call" => {
            send(result("the call is ending".into()));
            send(ToolReply::Say(t.goodbye.clone()));
            send(ToolReply::Hangup("agent_hangup"));
            return;
        }
        "opt_out" => {
            let (tenant_id, number) = (t.tenant_id, t.party.clone());
            let stored = shared
                .store
                .run(move |c| campaigns::dnc_add(c, tenant_id, &[number]))
                .await;
            match stored {
                Ok(_) => {
                    tracing::info!("caller opted out: added to the do-not-call list");
                    send(result(
                        "the number is on the do-not-call list; the call is ending".into(),
                    ));
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot add the caller to the do-not-call list");
                    send(result(
                        "error: the do-not-call list could not be updated".into(),
                    ));
                }
            }
            send(ToolReply::Say(t.goodbye.clone()));
            send(ToolReply::Hangup("opt_out"));
            return;
        }
        "send_dtmf" => {
            let a = args_of(&call);
            let out = match a["digits"].as_str() {
                Some(d) => match handover::send_dtmf(&shared, &t.call_id, d).await {
                    Ok(()) => format!("pressed {d}"),
                    Err(e) => format!("error: {e}"),
                },
                None => "error: \"digits\" (a string) is required".into(),
            };
            send(result(out));
            return;
        }
        "transfer_call" => {
            let a = args_of(&call);
            let out = match (a["destination"].as_str(), a["summary"].as_str()) {
                (Some(d), summary) => {
                    match handover::transfer(&shared, &t.call_id, d, summary.unwrap_or("")).await {
                        Ok(()) => "the transfer is under way".into(),
                        Err(e) => format!("error: {e}"),
                    }
                }
                (None, _) => "error: \"destination\" is required".into(),
            };
            send(result(out));
            return;
        }
        _ => {}
    }
    let Some(def) = t.defs.get(&call.name) else {
        tracing::warn!(tool = %call.name, "the model called an unknown tool");
        send(result(format!(
            "error: {}",
            super::ToolError::Unknown(call.name.clone())
        )));
        return;
    };
    // Bad arguments are answered at once, before any message or request.
    if let Err(e) = super::checked_arguments(def, &call) {
        tracing::warn!(tool = %call.name, error = %e, "tool arguments refused");
        send(result(format!("error: {e}")));
        return;
    }
    let Some(http) = &t.http else {
        send(result("error: the tool client could not be built".into()));
        return;
    };
    if let Some(text) = &def.messages.start {
        send(ToolReply::Say(text.clone()));
    }
    // Barge-ins from now on count (not the ones before this call).
    barge.borrow_and_update();
    let cancel = def.on_interrupt == OnInterrupt::Cancel;
    let req = request(http, &t.allow, t.secret.as_deref(), def, &t.info, &call);
    tokio::pin!(req);
    let delayed = async {
        match def.delayed() {
            Some((after, text)) => {
                tokio::time::sleep(after).await;
                text.to_owned()
            }
            None => std::future::pending().await,
        }
    };
    tokio::pin!(delayed);
    let mut delayed_said = false;
    let started = std::time::Instant::now();
    let outcome = loop {
        tokio::select! {
            r = &mut req => break Some(r),
            text = &mut delayed, if !delayed_said => {
                delayed_said = true;
                send(ToolReply::Say(text));
            }
            changed = barge.changed(), if cancel => {
                if changed.is_err() {
                    // The bridge is gone: nobody to answer, stop here.
                    return;
                }
                break None;
            }
        }
    };
    let ms = started.elapsed().as_millis() as u64;
    match outcome {
        Some(Ok(answer)) => {
            tracing::info!(tool = %call.name, ms, "tool answered");
            send(result(answer));
        }
        Some(Err(e)) => {
            tracing::warn!(tool = %call.name, ms, kind = e.kind(), error = %e, "tool failed");
            if let Some(text) = &def.messages.failed {
                send(ToolReply::Say(text.clone()));
            }
            send(result(format!("error: {e}")));
        }
        None => {
            tracing::info!(tool = %call.name, ms, "tool cancelled by a barge-in");
            send(result(
                "cancelled: the caller spoke before the tool answered".into(),
            ));
        }
    }
}
