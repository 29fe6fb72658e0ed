//! vmrig-vm
