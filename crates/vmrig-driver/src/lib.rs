//! vmrig-driver
