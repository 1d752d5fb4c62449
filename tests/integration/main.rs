//! One integration-test binary (fast linking); topics are modules.

mod api;
mod calls;
mod campaigns;
mod cli;
mod e2e;
mod engines;
mod fakes_selftest;
mod layering;
mod lifecycle;
mod ops;
mod proxy;
mod serve;
mod support;
mod tls;
