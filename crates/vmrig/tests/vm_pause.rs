//! `vmrig run --pause-on-failure` with a real VM: where the script fails, the REPL opens
//! with the failing frame's names and the machine as the failure left it; leaving it ends
//! the run as failed. The REPL reads the test's stdin (a pipe here, a terminal for users).

use std::path::Path;
use std::process::Output;

mod common;
use common::text;

/// Runs `script` on examples/single.toml's node with `--pause-on-failure`, typing `input`
/// into the REPL.
fn paused_run(tmp: &Path, script: &str, global_timeout: u32, input: &str) -> Output {
    let file = tmp.join("pause.toml");
    std::fs::write(
        &file,
        format!(
            "name = \"pause\"\nglobal_timeout = {global_timeout}\ntest_script = '''\n{script}\n'''\n\n[nodes.machine]\npackages = [\"less\"]\n"
        ),
    )
    .unwrap();
    common::output_with_input(
        common::command(tmp)
            .args(["run", "--pause-on-failure", "--rerun", "-o"])
            .arg(tmp.join("out"))
            .arg(&file),
        input,
    )
}

#[test]
fn a_failed_assertion_pauses_with_the_frames_names_and_the_machine_running() {
    let tmp = tempfile::tempdir().unwrap();
    let script = "x = 41\n\
                  machine.succeed('echo at-the-failure > /tmp/state')\n\
                  def check(value):\n    \
                      answer = value + 0\n    \
                      assert answer == 42, f'answer is {answer}'\n\
                  check(x)";
    let input = "print('seen', answer, value, x)\n\
                 print(machine.succeed('cat /tmp/state').strip())\n\
                 machine.fly()\n";
    let out = paused_run(tmp.path(), script, 600, input);
    let all = text(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{all}");
    // The pause says where and shows the frame's locals.
    assert!(stderr.contains("vmrig: the test failed at "), "{all}");
    assert!(stderr.contains("pause.toml:8"), "{all}");
    assert!(stderr.contains("AssertionError: answer is 41"), "{all}");
    assert!(stderr.contains("  answer = 41\n  value = 41"), "{all}");
    // The REPL has the failing frame's names and the machine as it was.
    assert!(stdout.contains("seen 41 41 41"), "{all}");
    assert!(stdout.contains("at-the-failure"), "{all}");
    // An error in the REPL shows no frame of vmrig's own module.
    assert!(stderr.contains("has no attribute 'fly'"), "{all}");
    assert!(!stderr.contains("vmrig_driver.py"), "{all}");
    // Leaving the REPL ended the run as the failure would have.
    assert!(stderr.contains("test pause FAILED"), "{all}");
    common::assert_no_leftovers(tmp.path());
}

#[test]
fn the_global_timeout_pauses_the_script_and_is_lifted_for_the_repl() {
    let tmp = tempfile::tempdir().unwrap();
    let script = "import time\nmachine.succeed('true')\nwaited = 0\nwhile True:\n    time.sleep(1)\n    waited += 1";
    // The REPL's command runs after the deadline: it would time out at once if the
    // deadline stood.
    let input = "print('waited', waited > 0, machine.succeed('echo still-here').strip())\n";
    let out = paused_run(tmp.path(), script, 25, input);
    let all = text(&out);
    assert!(all.contains("global timeout of 25 s reached"), "{all}");
    assert!(all.contains("KeyboardInterrupt"), "{all}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("waited True still-here"),
        "{all}"
    );
    // A failed test, as any run that hit its global timeout.
    assert_eq!(out.status.code(), Some(1), "{all}");
    common::assert_no_leftovers(tmp.path());
}
