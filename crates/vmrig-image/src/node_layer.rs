//! The per-node configuration layer (filled in by the driver issues).
