//! vmrig-net
