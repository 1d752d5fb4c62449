//! One integration-test binary (fast linking); topics are modules.

mod api;
mod calls;
mod cli;
mod e2e;
mod engines;
mod fakes_selftest;
mod layering;
mod lifecycle;
mod ops;
mod pipeline;
mod proxy;
mod serve;
mod support;
mod tls;
