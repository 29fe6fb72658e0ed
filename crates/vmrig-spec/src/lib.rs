//! vmrig-spec
