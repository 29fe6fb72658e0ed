//! vmrig-store
