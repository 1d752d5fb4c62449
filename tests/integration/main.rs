//! One integration-test binary (fast linking); topics are modules.

mod amd;
mod api;
mod browser;
mod calls;
mod campaigns;
mod cli;
mod dashboard;
mod e2e;
mod engine_tools;
mod engines;
mod fakes_selftest;
mod handover;
mod keypad;
mod layering;
mod lifecycle;
mod limits;
mod openapi;
mod ops;
mod pipeline;
mod proxy;
mod recording;
mod serve;
mod support;
mod tls;
mod tools;
mod webrtc;
