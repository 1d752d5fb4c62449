//! Calls in the database, split by job: records (create, get, list), the dial queue, state
//! changes, transcripts and analytics. Everything is re-exported here so callers keep
//! writing `store::calls::get`, `store::calls::transition`, …

pub mod analytics;
pub mod queue;
pub mod records;
pub mod state;
pub mod transcripts;

pub use analytics::{Analytics, Percentiles, analytics};
pub use queue::{
    OpenCounts, active, claim_for_dialing, expired_queued, live_counts, open_counts, queued,
    queued_count, unfinished,
};
pub use records::{
    Call, CallDetail, Cursor, ListQuery, MachineFacts, NewCall, OutboundRequest, Scope,
    create_inbound, create_outbound, detail, get, insert, list, machine_action, machine_facts,
};
pub use state::{
    AfterEnd, EndedCall, Transition, add_event, after_end, confirm_person, engine_call_id,
    enqueue_webhook, events, id_by_sid, set_analysis, set_end_reason, set_engine_call_id,
    set_error, set_latency, set_providers, set_stream_token, set_transfer, set_twilio_sid,
    take_stream_token, transition, transition_with, webhook_job,
};
pub use transcripts::{TranscriptEntry, add_transcript, replace_transcript, transcript};
