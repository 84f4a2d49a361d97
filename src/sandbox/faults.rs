//! Fault injection for the sandbox (being written). API fixed here.
