//! Virtual machines: the QEMU command line, accelerator choice, processes that die with
//! the driver, the serial console, and the guest command channel (the backdoor shell).
//!
//! Knows nothing about tests or Python; the driver builds on [`machine::Vm`].

pub mod accel;
pub mod backdoor;
pub mod cmdline;
pub mod machine;
pub mod process;
pub mod qmp;
pub mod serial;
pub mod start_script;
