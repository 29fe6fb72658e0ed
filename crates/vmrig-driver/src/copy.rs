//! Copying files between the host and a guest. A node's VM has a transfer directory
//! shared over 9p (`VmConfig::transfer_dir`): the file is staged there on one side and
//! copied out with `cp` on the other, the share mounted only for the copy (so a boot
//! snapshot can always be saved). Machines without one (NixOS start commands) and
//! `copy_from_host_via_shell` go through the command channel (tar + base64).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use base64::Engine;
use vmrig_vm::backdoor::shell_quote;

use crate::machine::Machine;
use crate::ApiError;

const COPY_TIMEOUT: f64 = 600.0;
/// Where the guest mounts the transfer directory while it copies: a shell word that sets
/// `$m` in the guest's command. (`VMRIG_XFER` is for the driver's tests, whose fake guest
/// is a bash on the host: it points the mount point into the test's directory.)
const GUEST_MOUNT: &str = "m=${VMRIG_XFER:-/run/vmrig-xfer}";

/// `copy_from_host`: `source` (a file or a directory, modes kept) to `target` in the guest.
pub fn from_host(m: &mut Machine, source: &str, target: &str) -> Result<(), ApiError> {
    let Some(xfer) = m.transfer_dir() else {
        return from_host_via_shell(m, source, target);
    };
    // The transfer directory is made when the machine starts.
    m.connect()?;
    let src = Path::new(source);
    let meta = std::fs::metadata(src)
        .map_err(|e| ApiError::Assertion(format!("copy_from_host: {source}: {e}")))?;
    let base = src
        .file_name()
        .ok_or_else(|| ApiError::Assertion(format!("copy_from_host: {source} has no file name")))?;
    let stage = Stage::new(&xfer)?;
    host_cp(src, &stage.path.join(base))?;
    let staged = format!(
        "\"$m\"/{}/{}",
        stage.name,
        shell_quote(&base.to_string_lossy())
    );
    let command = with_transfer_mount(&format!(
        "t={}; mkdir -p \"$(dirname \"$t\")\" && rm -rf \"$t\" && cp -R --preserve=mode,timestamps,links {staged} \"$t\"",
        shell_quote(target),
    ));
    let logger = m.logger().clone();
    let name = m.name.clone();
    let what = if meta.is_dir() {
        format!("copying the directory {source} to {target}")
    } else {
        format!("copying {source} ({} bytes) to {target}", meta.len())
    };
    logger.nested(what, Some(&name), || {
        let (status, output) = m.execute(&command, Some(COPY_TIMEOUT))?;
        if status != 0 {
            return Err(ApiError::Machine(format!(
                "copying into the guest failed (exit code {status}): {}",
                output.trim()
            )));
        }
        Ok(())
    })
}

/// `copy_from_machine`: `source` in the guest to `<out>/<target_dir>/` on the host.
pub fn from_machine(m: &mut Machine, source: &str, target_dir: &str) -> Result<(), ApiError> {
    let Some(xfer) = m.transfer_dir() else {
        return from_machine_via_shell(m, source, target_dir);
    };
    // The transfer directory is made when the machine starts.
    m.connect()?;
    let dest = m.out_dir().join(target_dir);
    std::fs::create_dir_all(&dest)
        .map_err(|e| ApiError::Machine(format!("creating {}: {e}", dest.display())))?;
    let base = Path::new(source)
        .file_name()
        .map(|b| b.to_string_lossy().into_owned())
        .ok_or_else(|| {
            ApiError::Assertion(format!("copy_from_machine: {source} has no file name"))
        })?;
    let stage = Stage::new(&xfer)?;
    let src = shell_quote(source);
    let copy = format!(
        "cp -R --preserve=mode,timestamps,links {src} \"$m\"/{}/",
        stage.name
    );
    let command = format!(
        "[ -e {src} ] || [ -L {src} ] || exit {MISSING}; {}",
        with_transfer_mount(&copy)
    );
    let logger = m.logger().clone();
    let name = m.name.clone();
    logger.nested(
        format!("copying {source} from the guest to {}", dest.display()),
        Some(&name),
        || {
            let (status, output) = m.execute(&command, Some(COPY_TIMEOUT))?;
            copied_out(source, status, &output)?;
            let target = dest.join(&base);
            if std::fs::symlink_metadata(&target).is_ok() {
                vmrig_store::remove_all(&target).map_err(|e| {
                    ApiError::Machine(format!("replacing {}: {e}", target.display()))
                })?;
            }
            let staged = stage.path.join(&base);
            if std::fs::rename(&staged, &target).is_err() {
                // Another file system: copy.
                host_cp(&staged, &target)?;
            }
            Ok(())
        },
    )
}

/// The guest's side of `copy_from_machine` ended with `status`: a missing `source` is the
/// test's mistake, any other failure the machine's (its message is `output`, or on the
/// console).
fn copied_out(source: &str, status: i32, output: &str) -> Result<(), ApiError> {
    match status {
        0 => Ok(()),
        MISSING => Err(ApiError::Assertion(format!(
            "copy_from_machine: {source} does not exist in the guest"
        ))),
        _ => Err(ApiError::Machine(format!(
            "copy_from_machine: cannot read {source} in the guest (exit code {status}): {}",
            if output.trim().is_empty() {
                "the message is on the console"
            } else {
                output.trim()
            }
        ))),
    }
}

/// `command` run with the transfer directory mounted at `$m` ([`GUEST_MOUNT`]); unmounted after,
/// whatever the command's status (which is the result).
fn with_transfer_mount(command: &str) -> String {
    format!(
        "{GUEST_MOUNT}; {} || exit 1; ( {command} ); __s=$?; umount \"$m\"; exit $__s",
        mount_9p(
            vmrig_vm::cmdline::TRANSFER_TAG,
            "\"$m\"",
            vmrig_vm::cmdline::TRANSFER_MOUNT_OPTIONS
        )
    )
}

/// The guest command that mounts the 9p export `tag` on `dir` (a shell word). The modules
/// are loaded first, synchronously: on a VM restored from a boot snapshot, udev may still
/// be probing the device, and a mount before the probe ends finds "no channels available".
pub(crate) fn mount_9p(tag: &str, dir: &str, options: &str) -> String {
    format!(
        "{{ modprobe -q 9pnet_virtio; modprobe -q 9p; mkdir -p {dir} && mount -t 9p -o {options} {tag} {dir}; }}"
    )
}

/// A directory of its own in the transfer directory, removed when dropped.
struct Stage {
    name: String,
    path: PathBuf,
}

impl Stage {
    fn new(xfer: &Path) -> Result<Stage, ApiError> {
        let dir = tempfile::Builder::new()
            .prefix("copy-")
            .tempdir_in(xfer)
            .map_err(|e| ApiError::Machine(format!("staging a copy in {}: {e}", xfer.display())))?;
        let path = dir.keep();
        let name = path
            .file_name()
            .expect("a temp dir has a name")
            .to_string_lossy()
            .into_owned();
        Ok(Stage { name, path })
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        let _ = vmrig_store::remove_all(&self.path);
    }
}

/// `cp -a` on the host (modes, symlinks inside a directory, times; reflinks where the file
/// system has them); a symlink named as `from` is followed.
fn host_cp(from: &Path, to: &Path) -> Result<(), ApiError> {
    let out = vmrig_vm::process::command("cp")
        .args(["-a", "-H", "--reflink=auto", "--"])
        .arg(from)
        .arg(to)
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| ApiError::Machine(format!("running cp: {e}")))?;
    if !out.status.success() {
        return Err(ApiError::Machine(format!(
            "cp {} {}: {}",
            from.display(),
            to.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}
/// The status of the guest's copy command when the path does not exist.
const MISSING: i32 = 66;

/// `copy_from_host(source, target)`: a file or directory of the host to `target` in the guest.
pub fn from_host_via_shell(m: &mut Machine, source: &str, target: &str) -> Result<(), ApiError> {
    let src = PathBuf::from(source);
    let meta = std::fs::metadata(&src)
        .map_err(|e| ApiError::Assertion(format!("copy_from_host: {source}: {e}")))?;
    let parent = src
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let base = src
        .file_name()
        .ok_or_else(|| ApiError::Assertion(format!("copy_from_host: {source} has no file name")))?;
    let out = vmrig_vm::process::command("tar")
        .arg("-C")
        .arg(parent)
        .arg("-cz")
        .arg(base)
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| ApiError::Machine(format!("running tar: {e}")))?;
    if !out.status.success() {
        return Err(ApiError::Machine(format!(
            "tar failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let data = base64::engine::general_purpose::STANDARD.encode(&out.stdout);
    let name = shell_quote(&base.to_string_lossy());
    let target_q = shell_quote(target);
    // Unpack into a temporary directory next to the target, then move into place. The
    // archive is the command's input (read in bulk), base64 so that no byte can be taken
    // for a terminal control character on the way.
    let command = format!(
        "set -e; t={target_q}; d=$(dirname \"$t\"); mkdir -p \"$d\"; tmp=$(mktemp -d \"$d/.vmrig-copy.XXXXXX\"); \
         base64 -d | tar -xz -C \"$tmp\"; rm -rf \"$t\"; mv \"$tmp\"/{name} \"$t\"; rmdir \"$tmp\""
    );
    let logger = m.logger().clone();
    let name_m = m.name.clone();
    logger.nested(
        format!("copying {source} ({} bytes) to {target}", meta.len()),
        Some(&name_m),
        || {
            let (status, output) =
                m.execute_with_input(&command, Some(data.as_bytes()), Some(COPY_TIMEOUT))?;
            if status != 0 {
                return Err(ApiError::Machine(format!(
                    "copying into the guest failed (exit code {status}): {}",
                    output.trim()
                )));
            }
            Ok(())
        },
    )
}

/// `copy_from_machine(source, target_dir)`: a guest file or directory into the output
/// directory (`target_dir` relative to it).
fn from_machine_via_shell(m: &mut Machine, source: &str, target_dir: &str) -> Result<(), ApiError> {
    let dest = m.out_dir().join(target_dir);
    std::fs::create_dir_all(&dest)
        .map_err(|e| ApiError::Machine(format!("creating {}: {e}", dest.display())))?;
    let src = Path::new(source);
    let parent = src
        .parent()
        .map(|p| p.to_string_lossy().into_owned())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "/".into());
    let base = src
        .file_name()
        .map(|b| b.to_string_lossy().into_owned())
        .unwrap_or_default();
    // pipefail: a tar that cannot read the path fails the command (without it, the empty
    // output of base64 succeeded and nothing was copied).
    let command = format!(
        "set -o pipefail; cd {} || exit 3; [ -e {base_q} ] || [ -L {base_q} ] || exit {MISSING}; \
         tar -c {base_q} | base64 -w 0",
        shell_quote(&parent),
        base_q = shell_quote(&base)
    );
    let logger = m.logger().clone();
    let name_m = m.name.clone();
    logger.nested(
        format!("copying {source} from the guest to {}", dest.display()),
        Some(&name_m),
        || {
            let (status, output) = m.execute(&command, Some(COPY_TIMEOUT))?;
            copied_out(source, status, "")?;
            let tar = base64::engine::general_purpose::STANDARD
                .decode(output.trim())
                .map_err(|e| ApiError::Machine(format!("copy_from_machine: garbled data: {e}")))?;
            let mut child = vmrig_vm::process::command("tar")
                .arg("-C")
                .arg(&dest)
                .arg("-x")
                .stdin(Stdio::piped())
                .spawn()
                .map_err(|e| ApiError::Machine(format!("running tar: {e}")))?;
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("piped")
                .write_all(&tar)
                .map_err(|e| ApiError::Machine(format!("tar: {e}")))?;
            let status = child
                .wait()
                .map_err(|e| ApiError::Machine(format!("tar: {e}")))?;
            if !status.success() {
                return Err(ApiError::Machine(
                    "copy_from_machine: tar could not unpack the guest's files".into(),
                ));
            }
            Ok(())
        },
    )
}
