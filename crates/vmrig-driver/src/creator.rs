//! Machines from NixOS start commands (`nixos-driver`'s machines, `create_machine`).
//!
//! As the upstream driver: each machine has a state directory `vm-state-<name>` (its
//! `TMPDIR`, working directory and socket home), `SHARED_DIR` names `shared-xchg` next to
//! it, `QEMU_VDE_SOCKET_<n>` names VLAN `n`'s switch (vmrig's switch speaks VDE), and the
//! driver's options are appended to the command ([`vmrig_vm::cmdline::nixos_driver_args`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use vmrig_vm::machine::StartCommand;

use crate::machine::{Machine, RunContext};
use crate::ApiError;

/// The machine name of a start command, as upstream takes it: `run-<name>-vm` at its end,
/// else `machine`.
pub fn machine_name_from_command(command: &str) -> String {
    let command = command.trim_end();
    command
        .strip_suffix("-vm")
        .and_then(|rest| rest.rfind("run-").map(|i| &rest[i + 4..]))
        .filter(|name| !name.is_empty() && !name.contains('/') && !name.contains(' '))
        .unwrap_or("machine")
        .to_owned()
}

/// Makes machines from start commands for a run (`create_machine`, `nixos-driver`).
/// Nothing is prepared until a machine is made: most runs never make one.
pub struct MachineCreator {
    ctx: Arc<RunContext>,
    /// Where `vm-state-<name>` directories (and `shared-xchg`) go when their state is kept
    /// (`-K`, or `keep_vm_state=True`); otherwise they live in the run directory and go
    /// with it.
    keep_dir: PathBuf,
    vlans: BTreeMap<u8, Arc<vmrig_net::Vlan>>,
    /// `-K` for the whole run.
    keep_all: bool,
}

impl MachineCreator {
    pub fn new(
        ctx: Arc<RunContext>,
        keep_dir: PathBuf,
        vlans: &BTreeMap<u8, Arc<vmrig_net::Vlan>>,
        keep_all: bool,
    ) -> MachineCreator {
        MachineCreator {
            ctx,
            keep_dir,
            vlans: vlans.clone(),
            keep_all,
        }
    }

    /// The environment start commands get besides `TMPDIR` and `USE_TMPDIR`: `SHARED_DIR`
    /// (made here) and `QEMU_VDE_SOCKET_<n>` for every VLAN (its switch starts listening
    /// for VDE clients on the first call).
    pub fn env(&self) -> Result<Vec<(String, String)>, ApiError> {
        let base = if self.keep_all {
            &self.keep_dir
        } else {
            &self.ctx.run_dir
        };
        let shared_dir = base.join("shared-xchg");
        std::fs::create_dir_all(&shared_dir)
            .map_err(|e| ApiError::Machine(format!("creating {}: {e}", shared_dir.display())))?;
        let mut env = vec![(
            "SHARED_DIR".to_owned(),
            shared_dir.to_string_lossy().into_owned(),
        )];
        for (nr, vlan) in &self.vlans {
            let dir = vlan
                .vde_dir()
                .map_err(|e| ApiError::Machine(format!("the VDE socket of VLAN {nr}: {e}")))?;
            env.push((
                format!("QEMU_VDE_SOCKET_{nr}"),
                dir.to_string_lossy().into_owned(),
            ));
        }
        Ok(env)
    }

    /// A machine for `command` (named `name`, else from the command). Without kept state,
    /// a fresh state directory; with it, the one a previous run left.
    pub fn create(
        &self,
        name: Option<&str>,
        command: &str,
        keep_state: bool,
    ) -> Result<Machine, ApiError> {
        let name = name
            .map(str::to_owned)
            .unwrap_or_else(|| machine_name_from_command(command));
        if name.is_empty() || name.contains('/') {
            return Err(ApiError::Machine(format!(
                "`{name}` cannot name a machine (it names its state directory)"
            )));
        }
        let keep = keep_state || self.keep_all;
        let base = if keep {
            &self.keep_dir
        } else {
            &self.ctx.run_dir
        };
        let state_dir = base.join(format!("vm-state-{name}"));
        if !keep && state_dir.exists() {
            std::fs::remove_dir_all(&state_dir)
                .map_err(|e| ApiError::Machine(format!("removing {}: {e}", state_dir.display())))?;
        }
        let command = StartCommand {
            name: name.clone(),
            command: command.to_owned(),
            state_dir,
            env: self.env()?,
            allow_reboot: false,
        };
        let vlans = self.vlans.iter().map(|(nr, v)| (*nr, v.clone())).collect();
        Ok(Machine::from_start_command(
            self.ctx.clone(),
            command,
            vlans,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logger::Logger;
    use std::sync::atomic::AtomicBool;
    use std::time::{Duration, Instant};

    #[test]
    fn machine_names_come_from_run_name_vm() {
        assert_eq!(
            machine_name_from_command("/nix/store/abc-nixos-vm/bin/run-server-vm"),
            "server"
        );
        assert_eq!(machine_name_from_command("./run-my-node-vm"), "my-node");
        assert_eq!(
            machine_name_from_command("qemu-system-x86_64 -m 512"),
            "machine"
        );
        assert_eq!(machine_name_from_command("/x/run--vm"), "machine");
    }

    /// What makes start scripts' `-netdev vde,sock=$QEMU_VDE_SOCKET_<n>` hermetic (see
    /// `vmrig_vm::cmdline`'s `guests_are_hermetic_in_start_scripts_too`): the driver names
    /// vmrig's own switch of VLAN `n` there, in the run directory, and nothing else.
    #[test]
    fn guests_are_hermetic_start_scripts_get_vmrigs_switch_as_vde_socket() {
        let tmp = tempfile::tempdir().unwrap();
        let run_dir = tmp.path().join("run");
        std::fs::create_dir(&run_dir).unwrap();
        let ctx = Arc::new(RunContext {
            node_qemu: None,
            accel: vmrig_vm::accel::Accel::Tcg,
            logger: Logger::new(Vec::new()),
            out_dir: tmp.path().join("out"),
            run_dir: run_dir.clone(),
            serial_stdout: Arc::new(AtomicBool::new(false)),
            deadline: Arc::new(crate::deadline::Deadline::new(
                Instant::now() + Duration::from_secs(60),
            )),
            store: vmrig_store::Store::open(tmp.path().join("store")).unwrap(),
            snapshots: false,
            keep_state_in: None,
        });
        let vlans: BTreeMap<u8, Arc<vmrig_net::Vlan>> = [1, 5]
            .into_iter()
            .map(|nr| (nr, Arc::new(vmrig_net::Vlan::start(nr, &run_dir).unwrap())))
            .collect();
        let creator = MachineCreator::new(ctx, tmp.path().join("keep"), &vlans, false);
        let env = creator.env().unwrap();
        let vde: Vec<(&str, &str)> = env
            .iter()
            .filter(|(k, _)| k.starts_with("QEMU"))
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let expected: Vec<(String, String)> = vlans
            .iter()
            .map(|(nr, vlan)| {
                let dir = vlan.vde_dir().unwrap();
                assert!(dir.starts_with(&run_dir), "{}", dir.display());
                assert!(dir.join("ctl").exists(), "the switch listens there");
                (
                    format!("QEMU_VDE_SOCKET_{nr}"),
                    dir.to_string_lossy().into_owned(),
                )
            })
            .collect();
        let expected: Vec<(&str, &str)> = expected
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(vde, expected, "no QEMU_NET_OPTS or QEMU_OPTS either");
    }
}
