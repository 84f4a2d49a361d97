//! pis-worker: a Kafka-driven PSD2 payment-initiation worker for Belfius and Banx.
//!
//! Layout: `domain` is pure (state machine, validation); `contract` is the Avro wire format;
//! `belfius` is the bank edge; `kafka` is the broker edge; `engine` ties them together per
//! partition; `sandbox` is the Belfius simulator.

pub mod belfius;
pub mod cli;
pub mod contract;
pub mod domain;
pub mod engine;
pub mod http;
pub mod kafka;
pub mod memory;
pub mod metrics;
pub mod sandbox;
pub mod secret;
