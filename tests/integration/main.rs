//! One integration-test binary (fast linking); topics are modules.

mod api;
mod calls;
mod cli;
mod e2e;
mod lifecycle;
mod ops;
mod serve;
mod support;
