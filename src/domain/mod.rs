//! The pure payment domain: value types, validation and the state machine. No I/O here.

pub mod bank;
pub mod consent;
pub mod machine;
pub mod model;
pub mod reason;
pub mod settlement;
pub mod validation;
