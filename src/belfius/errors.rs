//! Typed Belfius error codes (being written).
