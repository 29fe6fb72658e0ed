//! vmrig-image
