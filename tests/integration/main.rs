//! One integration-test binary (fast linking); topics are modules.

mod api;
mod browser;
mod calls;
mod campaigns;
mod cli;
mod dashboard;
mod e2e;
mod engines;
mod fakes_selftest;
mod handover;
mod layering;
mod lifecycle;
mod limits;
mod openapi;
mod ops;
mod pipeline;
mod proxy;
mod serve;
mod support;
mod tls;
