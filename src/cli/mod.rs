//! Subcommands of the `troupe` binary, one module each.

pub mod bench;
pub mod generate;
pub mod swarm;
pub mod train;
