//! Copying files between the host and a guest, through the command channel (tar + the
//! backdoor's base64 framing), so no shared directory has to be mounted.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use base64::Engine;
use vmrig_vm::backdoor::shell_quote;

use crate::machine::Machine;
use crate::ApiError;

const COPY_TIMEOUT: f64 = 600.0;
/// The status of the guest's copy command when the path does not exist.
const MISSING: i32 = 66;

/// `copy_from_host(source, target)`: a file or directory of the host to `target` in the guest.
pub fn from_host(m: &mut Machine, source: &str, target: &str) -> Result<(), ApiError> {
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
pub fn from_machine(m: &mut Machine, source: &str, target_dir: &str) -> Result<(), ApiError> {
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
    // The archive comes back through the exact framing (base64 in the guest); the status
    // is tar's own, so a path it cannot read fails the copy.
    let command = format!(
        "cd {} || exit 3; [ -e {base_q} ] || [ -L {base_q} ] || exit {MISSING}; tar -c {base_q}",
        shell_quote(&parent),
        base_q = shell_quote(&base)
    );
    let logger = m.logger().clone();
    let name_m = m.name.clone();
    logger.nested(
        format!("copying {source} from the guest to {}", dest.display()),
        Some(&name_m),
        || {
            let (status, tar) = m.execute_exact(&command, Some(COPY_TIMEOUT))?;
            if status == MISSING {
                return Err(ApiError::Assertion(format!(
                    "copy_from_machine: {source} does not exist in the guest"
                )));
            }
            if status != 0 {
                return Err(ApiError::Assertion(format!(
                    "copy_from_machine: cannot read {source} in the guest (exit code {status}; tar's message is on the console)"
                )));
            }
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
