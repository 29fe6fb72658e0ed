"""vmrig's test-script API: the NixOS test driver's names, over JSON-RPC.

vmrig writes this file next to the test script and runs it in the host's
CPython (3.9 or newer; keep it free of newer syntax and APIs). Every call on a
machine is one request to the Rust driver, which does the work, the waiting
and the logging. Only what needs a Python callable (retry, polling
conditions, wait_for_qmp_event's filter) loops here.

Protocol: newline-delimited JSON on the socket inherited as fd $VMRIG_RPC_FD.
Request {"id": n, "method": m, "params": {...}}; response {"id": n,
"result": x} or {"id": n, "error": {"kind": k, "message": s}}. One request
at a time. Init data (machines, vlans, out_dir, mode, script) is in
$VMRIG_INIT.
"""

# Annotations stay strings (never evaluated), so they may use any typing syntax on 3.9;
# `vmrig stubs` turns them into the API's .pyi and `vmrig check` reads the signatures.
from __future__ import annotations

import code
import contextlib
import datetime
import json
import linecache
import os
import re
import socket
import sys
import threading
import time
import traceback
import types
import unicodedata
import unittest
from math import ceil, isfinite
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, Iterable, List, Optional, Tuple, Union

# A timeout or a wait: seconds, or a datetime.timedelta (sent as seconds).
Seconds = Union[float, datetime.timedelta]

# --------------------------------------------------------------------- errors


class TestScriptError(Exception):
    """Base of the errors that mean "the test script failed" (not a driver
    bug). Only the script's own frames are reported for these."""


class RequestedAssertionFailed(TestScriptError, AssertionError):
    """A requested assertion failed: `machine.succeed(...)` returned non-zero,
    a wait timed out, `t.assertEqual(...)` did not hold."""


class MachineError(TestScriptError):
    """A machine could not do what was asked (not running, no display, ...)."""


class PollingConditionError(Exception):
    """A polling condition failed while the script was inside its block."""


class VmrigInternalError(RuntimeError):
    """The driver failed in a way that is not the test's fault."""


class _ConnectionLost(BaseException):
    """The driver went away. A BaseException so `except Exception` in a
    test script cannot swallow it."""


# A wait that runs out of time is a failed assertion upstream (retry raises
# RequestedAssertionFailed), so the "Timeout" kind maps to that class.
_ERROR_CLASSES = {
    "RequestedAssertionFailed": RequestedAssertionFailed,
    "MachineError": MachineError,
    "Timeout": RequestedAssertionFailed,
    "Internal": VmrigInternalError,
}


def _to_json(value):
    """Arguments that JSON does not know: paths, machines, sets."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Machine):
        return value.name
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    raise TypeError(
        "cannot send {!r} (type {}) to the vmrig driver".format(
            value, type(value).__name__
        )
    )


# ------------------------------------------------------------------------ rpc


class _Rpc:
    def __init__(self, fd):
        os.set_inheritable(fd, False)  # children of the script must not hold it
        self._sock = socket.socket(fileno=fd)
        self._reader = self._sock.makefile("rb")
        self._lock = threading.Lock()
        self._next_id = 0
        self._abandoned = set()

    def call(self, method, params):
        # Threads in a test script are allowed; their calls are serialised.
        with self._lock:
            self._next_id += 1
            rid = self._next_id
            # Strict JSON and strict UTF-8: a value the driver could not
            # read (inf, a lone surrogate) fails here, at the script's call.
            data = json.dumps(
                {"id": rid, "method": method, "params": params},
                default=_to_json,
                allow_nan=False,
                ensure_ascii=False,
            ).encode("utf-8")
            try:
                self._sock.sendall(data + b"\n")
            except OSError as e:
                raise _ConnectionLost("lost the vmrig driver: {}".format(e))
            try:
                msg = self._read_response(rid)
            except KeyboardInterrupt:
                # The answer still comes; skip it when it does.
                self._abandoned.add(rid)
                raise
        error = msg.get("error")
        if error is not None:
            kind = error.get("kind")
            exc = _ERROR_CLASSES.get(kind, VmrigInternalError)(error.get("message", ""))
            # Same class as upstream; the mark lets wait_for_qmp_event tell.
            exc.timed_out = kind == "Timeout"
            raise exc
        return msg.get("result")

    def _read_response(self, rid):
        while True:
            try:
                raw = self._reader.readline()
            except OSError as e:
                raise _ConnectionLost("lost the vmrig driver: {}".format(e))
            if not raw:
                raise _ConnectionLost("the vmrig driver closed the connection")
            msg = json.loads(raw.decode("utf-8"))
            got = msg.get("id")
            if got == rid:
                return msg
            if got in self._abandoned:
                self._abandoned.discard(got)
                continue
            raise VmrigInternalError(
                "vmrig protocol error: expected response {}, got {!r}".format(rid, msg)
            )


# The one session of this process; set by main().
_session = None


def _rpc(method, params=None):
    if _session is None:
        raise VmrigInternalError("vmrig_driver is not connected to a driver")
    return _session.rpc.call(method, {} if params is None else params)


def _describe(exc):
    text = str(exc)
    name = type(exc).__name__
    return "{}: {}".format(name, text) if text else name


@contextlib.contextmanager
def _block(message, kind, attributes):
    result = _rpc(
        "block.begin",
        {"message": str(message), "kind": kind, "attrs": dict(attributes or {})},
    )
    block_id = result["id"] if isinstance(result, dict) else result
    try:
        yield
    except _ConnectionLost:
        raise
    except BaseException as e:
        _rpc("block.end", {"id": block_id, "error": _describe(e)})
        raise
    _rpc("block.end", {"id": block_id, "error": None})


# --------------------------------------------------------------------- logger


class Logger:
    """The `log` object of a test script (upstream's AbstractLogger API).
    Unlike upstream, `error` never exits the process."""

    def _message(self, level, message, attributes):
        _rpc(
            "log.message",
            {"level": level, "message": str(message), "attrs": dict(attributes or {})},
        )

    def log(self, message: str, attributes: Dict[str, str] = {}) -> None:
        """Log a message at level info."""
        self._message("info", message, attributes)

    def debug(self, message: str, attributes: Dict[str, str] = {}) -> None:
        """Log a message at level debug."""
        self._message("debug", message, attributes)

    def info(self, message: str, attributes: Dict[str, str] = {}) -> None:
        """Log a message at level info."""
        self._message("info", message, attributes)

    def warning(self, message: str, attributes: Dict[str, str] = {}) -> None:
        """Log a message at level warning."""
        self._message("warning", message, attributes)

    def error(self, message: str, attributes: Dict[str, str] = {}) -> None:
        """Log a message at level error (the run goes on)."""
        self._message("error", message, attributes)

    def log_test_error(self, message: str, attributes: Dict[str, str] = {}) -> None:
        """Log a test error (level error)."""
        self._message("error", message, attributes)

    def nested(self, message: str, attributes: Dict[str, str] = {}) -> ContextManager[None]:
        """Context manager: a timed, nested log block."""
        return _block(message, "nested", attributes)

    def subtest(self, name: str, attributes: Dict[str, str] = {}) -> ContextManager[None]:
        """Context manager: a named subtest (a block in the log and the report)."""
        return _block(name, "subtest", attributes)

    def print_serial_logs(self, enable: bool) -> None:
        """Show (or stop showing) the machines' console lines in the log."""
        _rpc("serial_stdout", {"on": bool(enable)})

    def log_serial(self, message: str, machine: str) -> None:
        """Log a console line of `machine`."""
        self._message("info", message, {"machine": str(machine)})

    @staticmethod
    def sanitise(message: str) -> str:
        """Drops control characters, as upstream's logger does."""
        return "".join(ch for ch in message if unicodedata.category(ch)[0] != "C")


log = Logger()


# ---------------------------------------------------------------------- retry


_UNSET = object()


def _given(**params):
    """The parameters that are not None (optional ones the Rust side defaults)."""
    return {k: v for k, v in params.items() if v is not None}


def _seconds(value):
    """A timeout as seconds: a number or a datetime.timedelta."""
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    return value


def retry(
    fn: Callable[[Any], Any],
    timeout_seconds: Optional[Seconds] = 900,
    *,
    timeout: Optional[Seconds] = _UNSET,
) -> None:
    """Call fn(last_try) once a second until it returns true, at most
    `timeout_seconds` times (and for at most that many seconds); then once
    more with last_try=True, so it can explain itself, and raise
    RequestedAssertionFailed if that fails too. Tries are counted as
    upstream: a script that replaces time.sleep does not spin for the whole
    timeout.

    `timeout=` (a number, a timedelta, or None for no bound) is the newest
    upstream API, with its semantics: fn gets the seconds left (None without
    a bound), is not called once none are left, and there is no extra last
    try."""
    if timeout is not _UNSET:
        return _retry_with_time_left(fn, _seconds(timeout))
    seconds = _seconds(timeout_seconds)
    start = time.monotonic()
    if seconds is None:
        while not fn(False):
            time.sleep(1)
        return
    tries = int(ceil(seconds)) if isfinite(seconds) and seconds > 0 else 0
    for _ in range(tries):
        if time.monotonic() - start >= seconds:
            break
        if fn(False):
            return
        time.sleep(1)
    elapsed = time.monotonic() - start
    if not fn(True):
        raise RequestedAssertionFailed(
            "action timed out after {:.2f} seconds (timeout={})".format(
                elapsed, timeout_seconds
            )
        )


def _retry_with_time_left(fn, seconds):
    """Newest upstream `retry(fn, timeout=...)`: fn(seconds left) about once a
    second until it returns true; RequestedAssertionFailed when no time is left."""
    if seconds is None:
        while not fn(None):
            time.sleep(1)
        return
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RequestedAssertionFailed(
                "action timed out after {:.2f} seconds (timeout={:g})".format(
                    seconds - left, seconds
                )
            )
        if fn(left):
            return
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


# ---------------------------------------------------------- polling condition


class PollingCondition:
    condition: Callable[[], Any]
    seconds_interval: float
    description: str
    last_called: float
    entry_count: int

    def __init__(
        self,
        condition: Callable[[], Any],
        seconds_interval: float = 2.0,
        description: Optional[str] = None,
    ) -> None:
        self.condition = condition
        self.seconds_interval = seconds_interval
        if description is None:
            doc = getattr(condition, "__doc__", None)
            self.description = doc if doc else getattr(condition, "__name__", "?")
        else:
            self.description = str(description)
        self.last_called = float("-inf")
        self.entry_count = 0

    def check(self, force: bool = False) -> bool:
        """Check the condition now if it is due (or `force`); whether it holds."""
        if (self.entered or not self.overdue) and not force:
            return True
        with self, log.nested(self.nested_message):
            since = time.monotonic() - self.last_called
            if isfinite(since):
                log.info("Time since last: {:.2f}s".format(since))
            else:
                log.info("(not called yet)")
            try:
                res = self.condition()
            except _ConnectionLost:
                raise
            except Exception:
                res = False
            res = res is None or bool(res)
            log.info(self.status_message(res))
            return res

    def maybe_raise(self) -> None:
        """Raise PollingConditionError when the condition is due and fails."""
        if not self.check():
            raise PollingConditionError(self.status_message(False))

    def status_message(self, status: bool) -> str:
        return "Polling condition {}: {}".format(
            "succeeded" if status else "failed", self.description
        )

    @property
    def nested_message(self) -> str:
        return "Checking polling condition {!r}".format(self.description)

    @property
    def overdue(self) -> bool:
        return self.last_called + self.seconds_interval < time.monotonic()

    @property
    def entered(self) -> bool:
        return self.entry_count > 0

    def __enter__(self) -> None:
        self.entry_count += 1

    def __exit__(self, exc_type: Any, exc_value: Any, tb: Any) -> None:
        self.entry_count -= 1
        self.last_called = time.monotonic()


# Conditions of the `with cond:` blocks the script is in, innermost last.
_active_conditions = []


def _check_polling_conditions():
    for condition in list(_active_conditions):
        condition.maybe_raise()


class _Poll:
    condition: PollingCondition

    def __init__(
        self, fun: Callable[[], Any], seconds_interval: float, description: Optional[str]
    ) -> None:
        self.condition = PollingCondition(fun, seconds_interval, description)

    def __enter__(self) -> None:
        _active_conditions.append(self.condition)

    def __exit__(self, exc_type: Any, exc_value: Any, tb: Any) -> None:
        popped = _active_conditions.pop()
        assert popped is self.condition

    def __call__(self) -> Any:
        return self.condition.condition()

    def wait(self, timeout: Seconds = 900) -> None:
        """Wait until the condition holds (at most `timeout` seconds)."""
        timeout = _seconds(timeout)
        description = self.condition.description

        def holds(last):
            if last:
                log.info("Last chance for {}".format(description))
            ok = self.condition.check(force=True)
            if not ok and not last:
                log.info("({} failure not fatal yet)".format(description))
            return ok

        with log.nested("waiting for {}".format(description)):
            retry(holds, timeout_seconds=timeout)


def polling_condition(
    fun_: Optional[Callable[[], Any]] = None,
    *,
    seconds_interval: float = 2.0,
    description: Optional[str] = None,
) -> Any:
    """Decorator: `@polling_condition` or `@polling_condition(seconds_interval=10)`.
    Inside `with cond:`, the condition is checked (at most every
    seconds_interval) around each machine call; when it fails, the call
    raises PollingConditionError."""
    if fun_ is None:
        return lambda fun: _Poll(fun, seconds_interval, description)
    return _Poll(fun_, seconds_interval, description)


# -------------------------------------------------------------------- machine


class Machine:
    """A handle to one node. Each method is one request to the driver."""

    name: str
    out_dir: Path

    def __init__(self, name: str, out_dir: Union[str, os.PathLike[str]]) -> None:
        self.name = name
        self.out_dir = Path(out_dir)

    def __repr__(self):
        return "<Machine '{}'>".format(self.name)

    def _call(self, method, **params):
        full = {"machine": self.name}
        full.update(params)
        _check_polling_conditions()
        result = _rpc("machine." + method, full)
        _check_polling_conditions()
        return result

    # -- state

    def is_up(self) -> bool:
        """Whether the machine is running and its shell answers."""
        return bool(_rpc("machine.is_up", {"machine": self.name}))

    @property
    def booted(self) -> bool:
        """Whether the machine has been started (and not shut down since)."""
        return bool(_rpc("machine.state", {"machine": self.name}).get("booted"))

    @property
    def connected(self) -> bool:
        """Whether the driver talks to the machine's shell."""
        return bool(_rpc("machine.state", {"machine": self.name}).get("connected"))

    def log(self, msg: str) -> None:
        """Log a message about this machine."""
        log.log(msg, {"machine": self.name})

    def nested(self, msg: str, attrs: Dict[str, str] = {}) -> ContextManager[None]:
        """Context manager: a timed, nested log block about this machine."""
        attributes = {"machine": self.name}
        attributes.update(attrs)
        return log.nested(msg, attributes)

    # -- lifecycle

    def start(self, allow_reboot: bool = False) -> None:
        """Start the machine (does not wait for it to boot)."""
        self._call("start", allow_reboot=allow_reboot)

    def connect(self) -> None:
        """Start the machine if needed and wait until its shell answers."""
        self._call("connect")

    def shutdown(self) -> None:
        """Power the machine off cleanly and wait until it is down."""
        self._call("shutdown")

    def crash(self) -> None:
        """Stop the machine at once, as a power cut."""
        self._call("crash")

    def reboot(self) -> None:
        """Reboot the machine (as Ctrl-Alt-Del) and wait for it to come back."""
        self._call("reboot")

    def wait_for_shutdown(self) -> None:
        """Wait until the machine has powered itself off."""
        self._call("wait_for_shutdown")

    def switch_root(self) -> None:
        """From the initrd's backdoor shell to the system's (a NixOS guest with
        testing.initrdBackdoor and a systemd initrd)."""
        self._call("switch_root")

    # -- commands

    def execute(
        self,
        command: str,
        check_return: bool = True,
        check_output: bool = True,
        timeout: Optional[Seconds] = 900,
    ) -> Tuple[int, str]:
        """Run a shell command; its exit status and output (no failure on non-zero)."""
        status, output = self._call(
            "execute",
            command=command,
            check_return=check_return,
            check_output=check_output,
            timeout=timeout,
        )
        return (status, output)

    def succeed(self, *commands: str, timeout: Optional[Seconds] = None) -> str:
        """Run commands; fail the test unless each exits 0; their output."""
        return self._call("succeed", commands=list(commands), timeout=timeout)

    def fail(self, *commands: str, timeout: Optional[Seconds] = None) -> str:
        """Run commands; fail the test unless each exits non-zero; their output."""
        return self._call("fail", commands=list(commands), timeout=timeout)

    def wait_until_succeeds(
        self, command: str, timeout: Seconds = 900, attempt_timeout: Optional[Seconds] = None
    ) -> str:
        """Run a command until it exits 0 (at most `timeout` s); its last output."""
        return self._call(
            "wait_until_succeeds",
            command=command,
            timeout=timeout,
            **_given(attempt_timeout=attempt_timeout),
        )

    def wait_until_fails(
        self, command: str, timeout: Seconds = 900, attempt_timeout: Optional[Seconds] = None
    ) -> str:
        """Run a command until it exits non-zero (at most `timeout` s); its last output."""
        return self._call(
            "wait_until_fails",
            command=command,
            timeout=timeout,
            **_given(attempt_timeout=attempt_timeout),
        )

    def sleep(self, secs: float) -> None:
        """Sleep `secs` seconds of the guest's time."""
        self._call("sleep", secs=secs)

    # -- systemd

    def systemctl(self, q: str, user: Optional[str] = None) -> Tuple[int, str]:
        """Run `systemctl q` (of `user`'s manager when given); status and output."""
        status, output = self._call("systemctl", q=q, user=user)
        return (status, output)

    def start_job(self, jobname: str, user: Optional[str] = None) -> Tuple[int, str]:
        """`systemctl start jobname`; status and output."""
        status, output = self._call("start_job", jobname=jobname, user=user)
        return (status, output)

    def stop_job(self, jobname: str, user: Optional[str] = None) -> Tuple[int, str]:
        """`systemctl stop jobname`; status and output."""
        status, output = self._call("stop_job", jobname=jobname, user=user)
        return (status, output)

    def get_unit_info(self, unit: str, user: Optional[str] = None) -> Dict[str, str]:
        """The unit's properties (`systemctl show`), by name."""
        return dict(self._call("get_unit_info", unit=unit, user=user))

    def get_unit_property(self, unit: str, property: str, user: Optional[str] = None) -> str:
        """One property of the unit (`systemctl show -p`)."""
        return self._call("get_unit_property", unit=unit, property=property, user=user)

    def wait_for_unit(self, unit: str, user: Optional[str] = None, timeout: Seconds = 900) -> None:
        """Wait until the unit is active; fail if it fails or the time runs out."""
        self._call("wait_for_unit", unit=unit, user=user, timeout=timeout)

    def wait_for_unit_active_state(
        self, unit: str, state: str, user: Optional[str] = None, timeout: Seconds = 900
    ) -> None:
        """Wait until the unit's ActiveState is `state` (any state: "inactive",
        "activating", "reloading", "failed", ...)."""
        self._call(
            "wait_for_unit_active_state",
            unit=unit,
            state=state,
            user=user,
            timeout=timeout,
        )

    def require_unit_state(self, unit: str, require_state: str = "active") -> None:
        """Fail unless the unit's ActiveState is `require_state` now."""
        self._call("require_unit_state", unit=unit, require_state=require_state)

    # -- waiting

    def wait_for_file(self, filename: str, timeout: Seconds = 900) -> None:
        """Wait until the file exists in the guest."""
        self._call("wait_for_file", filename=filename, timeout=timeout)

    def wait_for_open_port(self, port: int, addr: str = "localhost", timeout: Seconds = 900) -> None:
        """Wait until something listens on the TCP port."""
        self._call("wait_for_open_port", port=port, addr=addr, timeout=timeout)

    def wait_for_closed_port(
        self, port: int, addr: str = "localhost", timeout: Seconds = 900
    ) -> None:
        """Wait until nothing listens on the TCP port."""
        self._call("wait_for_closed_port", port=port, addr=addr, timeout=timeout)

    def wait_for_open_unix_socket(
        self, addr: str, is_datagram: bool = False, timeout: Seconds = 900
    ) -> None:
        """Wait until something listens on the unix socket."""
        self._call(
            "wait_for_open_unix_socket",
            addr=addr,
            is_datagram=is_datagram,
            timeout=timeout,
        )

    # -- console and monitor

    def wait_for_console_text(self, regex: str, timeout: Optional[Seconds] = None) -> None:
        """Wait until a console line (from now on) matches the regex."""
        self._call("wait_for_console_text", regex=regex, timeout=timeout)

    def get_console_log(self) -> str:
        """The console output since the last start."""
        return self._call("get_console_log")

    def send_console(self, chars: str) -> None:
        """Write characters to the serial console."""
        self._call("send_console", chars=chars)

    def send_monitor_command(self, command: str) -> str:
        """Run a QEMU monitor (HMP) command; its output."""
        return self._call("send_monitor_command", command=command)

    def wait_for_qmp_event(
        self, event_filter: Callable[[Dict[str, Any]], bool], timeout: Seconds = 60 * 10
    ) -> Dict[str, Any]:
        """Wait for a QMP event for which event_filter(event) is true and
        return it; events that do not match are dropped. Raises TimeoutError
        after `timeout` seconds."""
        timeout = _seconds(timeout)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    "no matching QMP event within {} seconds".format(timeout)
                )
            try:
                event = self._call("next_qmp_event", timeout=remaining)
            except RequestedAssertionFailed as e:
                if getattr(e, "timed_out", False):
                    raise TimeoutError(str(e))
                raise
            if event is None:
                raise TimeoutError(
                    "no matching QMP event within {} seconds".format(timeout)
                )
            if event_filter(event):
                return event

    # -- keyboard and screen

    def send_key(self, key: str, delay: Optional[float] = 0.01, log: bool = True) -> None:
        """Press a key or combination (QEMU names: "ctrl-alt-delete", "ret", "a")."""
        self._call("send_key", key=key, delay=delay, log=log)

    def send_chars(self, chars: str, delay: Optional[float] = 0.01) -> None:
        """Type the characters on the keyboard."""
        self._call("send_chars", chars=chars, delay=delay)

    def screenshot(self, filename: str) -> None:
        """Save the screen as PNG (in the output directory unless a path is given)."""
        self._call("screenshot", filename=filename)

    def get_screen_text(self) -> str:
        """The text on the screen (OCR)."""
        return self._call("get_screen_text")

    def get_screen_text_variants(self) -> List[str]:
        """The text on the screen, OCRed from several processed images."""
        return list(self._call("get_screen_text_variants"))

    def wait_for_text(self, regex: str, timeout: Seconds = 900) -> None:
        """Wait until the screen's text (OCR) matches the regex."""
        self._call("wait_for_text", regex=regex, timeout=timeout)

    def wait_for_x(self, timeout: Seconds = 900) -> None:
        """Wait until the X server accepts connections."""
        self._call("wait_for_x", timeout=timeout)

    def get_window_names(self) -> List[str]:
        """The names of the X windows."""
        return list(self._call("get_window_names"))

    def wait_for_window(self, regexp: str, timeout: Seconds = 900) -> None:
        """Wait until an X window's name matches the regex."""
        self._call("wait_for_window", regexp=regexp, timeout=timeout)

    # Beyond NixOS: find a reference image (PNG) anywhere on the screen.

    def wait_for_image(
        self, path: Union[str, os.PathLike[str]], threshold: float = 0.95, timeout: Seconds = 900
    ) -> None:
        """Wait until the reference image (PNG) appears anywhere on the screen."""
        self._call("wait_for_image", path=str(path), threshold=threshold, timeout=timeout)

    def screen_matches(self, path: Union[str, os.PathLike[str]], threshold: float = 0.95) -> bool:
        """Whether the reference image (PNG) is on the screen now."""
        return bool(self._call("screen_matches", path=str(path), threshold=threshold))

    # The tty is formatted into a command upstream: 1 and "1" both work.

    def get_tty_text(self, tty: Union[int, str]) -> str:
        """The text of virtual terminal `tty`."""
        return self._call("get_tty_text", tty=str(tty))

    def wait_until_tty_matches(self, tty: Union[int, str], regexp: str, timeout: Seconds = 900) -> None:
        """Wait until virtual terminal `tty`'s text matches the regex."""
        self._call(
            "wait_until_tty_matches", tty=str(tty), regexp=regexp, timeout=timeout
        )

    def dump_tty_contents(self, tty: Union[int, str]) -> None:
        """Write virtual terminal `tty`'s text to the journal."""
        self.execute("fold -w 80 /dev/vcs{} | systemd-cat".format(tty))

    # -- files

    def copy_from_host(self, source: Union[str, os.PathLike[str]], target: str) -> None:
        """Copy a host file or directory into the guest."""
        self._call("copy_from_host", source=source, target=target)

    def copy_from_host_via_shell(self, source: Union[str, os.PathLike[str]], target: str) -> None:
        """Copy a host file into the guest through its shell."""
        self._call("copy_from_host_via_shell", source=source, target=target)

    def copy_from_machine(self, source: str, target_dir: str = "") -> None:
        """Copy a guest file or directory into the output directory."""
        self._call("copy_from_machine", source=source, target_dir=target_dir)

    def copy_from_vm(self, source: str, target_dir: str = "") -> None:
        """Old name of copy_from_machine."""
        self.copy_from_machine(source, target_dir)

    # -- network

    def forward_port(self, host_port: int = 8080, guest_port: int = 80) -> None:
        """Forward a host TCP port to a guest port."""
        self._call("forward_port", host_port=host_port, guest_port=guest_port)

    def block(self) -> None:
        """Take the machine's VLAN links down."""
        self._call("block")

    def unblock(self) -> None:
        """Bring the machine's VLAN links back up."""
        self._call("unblock")

    # -- interactive

    def shell_interact(self, address: Optional[str] = None) -> None:
        """A root shell on the machine in this terminal, line by line, through the
        backdoor (each line runs as one command; `cd` and variables do not carry over
        between lines). Ctrl-D returns to the REPL. Unlike upstream there is no raw
        terminal, so full-screen programs do not work."""
        if address is not None:
            raise MachineError("vmrig's shell_interact() talks to the terminal only (no address)")
        self.connect()
        self.log("root shell on %s: one command per line, Ctrl-D to return" % self.name)
        while True:
            try:
                line = input("%s# " % self.name)
            except EOFError:
                print()
                return
            except KeyboardInterrupt:
                print()
                continue
            if not line.strip():
                continue
            try:
                status, output = self.execute(line + " 2>&1", timeout=None)
            except KeyboardInterrupt:
                print("(interrupted; the command may still run in the guest)")
                continue
            sys.stdout.write(output)
            if output and not output.endswith("\n"):
                sys.stdout.write("\n")
            if status != 0:
                print("[exit status %d]" % status)

    def console_interact(self) -> None:
        """Forward the terminal's input to the machine's console, one
        character at a time, until Ctrl-D."""
        self.log("Terminal is ready (there is no prompt):")
        while True:
            try:
                char = sys.stdin.buffer.read(1)
            except KeyboardInterrupt:
                break
            if char == b"":
                self.log("Closing connection to the console")
                break
            self.send_console(char.decode("utf-8", errors="replace"))


# Upstream class names, for scripts that use them in annotations/isinstance.
BaseMachine = Machine
QemuMachine = Machine


# ----------------------------------------------------------------------- vlan


class VLan:
    """A virtual LAN. Beyond upstream: loss and delay for fault injection."""

    nr: int

    def __init__(self, nr: int) -> None:
        self.nr = nr

    def __repr__(self):
        return "<VLan {}>".format(self.nr)

    def set_loss(self, percent: float) -> None:
        """Drop this share (0-100) of the frames on the VLAN."""
        _rpc("vlan.set_loss", {"vlan": self.nr, "percent": percent})

    def set_delay(self, ms: float) -> None:
        """Delay every frame on the VLAN by `ms` milliseconds."""
        _rpc("vlan.set_delay", {"vlan": self.nr, "ms": ms})


def _node_names(group):
    if isinstance(group, (Machine, str)):
        group = [group]
    return [m.name if isinstance(m, Machine) else str(m) for m in group]


def partition(
    group_a: Union[Machine, str, Iterable[Union[Machine, str]]],
    group_b: Union[Machine, str, Iterable[Union[Machine, str]]],
) -> None:
    """Cut all traffic between the machines of group_a and those of group_b."""
    _rpc(
        "net.partition",
        {"group_a": _node_names(group_a), "group_b": _node_names(group_b)},
    )


def heal() -> None:
    """Undo every partition."""
    _rpc("net.heal", {})


# ------------------------------------------------------------------- globals


def start_all() -> None:
    """Start all machines (in parallel; does not wait for them to boot)."""
    _rpc("driver.start_all", {})


def join_all() -> None:
    """Wait for all machines to shut down."""
    _rpc("driver.join_all", {})


def subtest(name: str) -> ContextManager[None]:
    """Context manager: a named subtest (a block in the log and the report)."""
    return log.subtest(name)


def serial_stdout_on() -> None:
    """Show the machines' console lines in the log."""
    _rpc("serial_stdout", {"on": True})


def serial_stdout_off() -> None:
    """Stop showing the machines' console lines in the log."""
    _rpc("serial_stdout", {"on": False})


def create_machine(
    start_command: Union[str, Dict[str, Any], None] = None,
    *,
    name: Optional[str] = None,
    keep_vm_state: bool = False,
) -> Machine:
    """A new machine from a NixOS start command: a `run-<name>-vm` script (as
    `vmrig build --start-scripts` writes them, or Nix builds them) or any command that
    starts QEMU and passes its arguments on. It starts with start() or its first
    command. The name comes from `name`, else from `run-<name>-vm`, else "machine".
    The old form create_machine({"startCommand": ..., "name": ...}) works too."""
    if isinstance(start_command, dict):
        legacy = start_command
        start_command = legacy.get("startCommand")
        name = legacy.get("name", name)
        keep_vm_state = legacy.get("keepVmState", keep_vm_state)
    if not isinstance(start_command, str) or not start_command.strip():
        raise MachineError(
            "create_machine() needs a start command, e.g. "
            "create_machine('./scripts/run-extra-vm') (see `vmrig build --start-scripts`)"
        )
    reply = _rpc(
        "driver.create_machine",
        {"start_command": start_command, "name": name, "keep_vm_state": bool(keep_vm_state)},
    )
    machine = Machine(reply["name"], _session.out_dir)
    _session.machines.append(machine)
    return machine


class AssertionTester(unittest.TestCase):
    """`t`: unittest's assertions, raising RequestedAssertionFailed."""

    failureException = RequestedAssertionFailed

    def runTest(self) -> None:  # lets TestCase() be built without a test method
        pass


class _Debug:
    def breakpoint(self) -> None:
        """Does nothing (upstream's debug hook)."""
        pass


class Driver:
    """The `driver` object of a test script."""

    machines: List[Machine]
    machines_qemu: List[Machine]
    machines_nspawn: List[Machine]
    vlans: List[VLan]
    out_dir: Path
    logger: Logger

    def __init__(self, session) -> None:
        self._session = session
        self.machines = session.machines
        self.machines_qemu = session.machines
        self.machines_nspawn = []
        self.vlans = session.vlans
        self.out_dir = session.out_dir
        self.logger = log

    start_all = staticmethod(start_all)
    join_all = staticmethod(join_all)
    serial_stdout_on = staticmethod(serial_stdout_on)
    serial_stdout_off = staticmethod(serial_stdout_off)
    polling_condition = staticmethod(polling_condition)
    create_machine = staticmethod(create_machine)

    def subtest(self, name: str) -> ContextManager[None]:
        """Context manager: a named subtest (a block in the log and the report)."""
        return subtest(name)

    def test_script(self) -> None:
        """Run the test script (again, in interactive mode)."""
        self._session.test_script()

    def run_tests(self) -> None:
        """Run the test script (again, in interactive mode)."""
        self._session.test_script()


# -------------------------------------------------------------------- session


def pythonize_name(name):
    return re.sub(r"^[^A-Za-z_]|[^A-Za-z0-9_]", "_", name)


class _Session:
    def __init__(self, init, rpc):
        self.init = init
        self.rpc = rpc
        self.out_dir = Path(init.get("out_dir") or ".")
        self.machines = []
        self.python_names = []
        for m in init.get("machines", []):
            self.machines.append(Machine(m["name"], self.out_dir))
            self.python_names.append(m.get("python_name") or pythonize_name(m["name"]))
        self.vlans = [VLan(nr) for nr in init.get("vlans", [])]
        script = init.get("script") or {}
        self.filename = script.get("filename", "<test script>")
        self.first_line = max(1, int(script.get("first_line", 1)))
        text = ""
        if script.get("path"):
            with open(script["path"], encoding="utf-8") as f:
                text = f.read()
        self.source = "\n" * (self.first_line - 1) + text
        if not self.source.endswith("\n"):
            self.source += "\n"
        # Tracebacks show the script's lines even when the script is inline
        # in a TOML file or the file changed since.
        linecache.cache[self.filename] = (
            len(self.source),
            None,
            self.source.splitlines(True),
            self.filename,
        )
        self.code = None
        self.driver = Driver(self)

    def symbols(self):
        s = {
            "start_all": start_all,
            "join_all": join_all,
            "test_script": self.test_script,
            "run_tests": self.test_script,
            "machines": self.machines,
            "machines_qemu": self.machines,
            "machines_nspawn": [],
            "vlans": self.vlans,
            "driver": self.driver,
            "log": log,
            "os": os,
            "create_machine": create_machine,
            "subtest": subtest,
            "retry": retry,
            "serial_stdout_on": serial_stdout_on,
            "serial_stdout_off": serial_stdout_off,
            "polling_condition": polling_condition,
            "partition": partition,
            "heal": heal,
            "BaseMachine": Machine,
            "Machine": Machine,
            "t": AssertionTester(),
            "debug": _Debug(),
            "RequestedAssertionFailed": RequestedAssertionFailed,
            "MachineError": MachineError,
            "TestScriptError": TestScriptError,
            "PollingConditionError": PollingConditionError,
        }
        for vlan in self.vlans:
            s["vlan{}".format(vlan.nr)] = vlan
        for machine, pyname in zip(self.machines, self.python_names):
            s[pyname] = machine
        if len(self.machines) == 1:
            s["machine"] = self.machines[0]
        return s

    def test_script(self) -> None:
        """Run the test script (again, in interactive mode)."""
        if self.code is None:
            self.code = compile(self.source, self.filename, "exec", dont_inherit=True)
        namespace = self.symbols()
        namespace["__name__"] = "__main__"
        namespace["__file__"] = self.filename
        with log.nested("run the VM test script"):
            exec(self.code, namespace)

    def failure_report(self, exc):
        frames = traceback.extract_tb(exc.__traceback__)
        user = [f for f in frames if f.filename == self.filename]
        if isinstance(exc, TestScriptError):
            shown = user
        else:
            ours = (_module_file(), os.path.abspath(sys.argv[0] if sys.argv else ""))
            shown = [f for f in frames if os.path.abspath(f.filename) not in ours]
        line = user[-1].lineno if user else None
        if (
            line is None
            and isinstance(exc, SyntaxError)
            and exc.filename == self.filename
        ):
            line = exc.lineno
        text = ""
        if shown:
            text = "Traceback (most recent call last):\n" + "".join(
                traceback.format_list(shown)
            )
        return {
            "type": type(exc).__name__,
            "message": str(exc),
            "line": line,
            "traceback": text,
        }

    def interact(self, namespace=None, banner=None):
        namespace = self.symbols() if namespace is None else namespace
        history = None
        try:
            import readline
            import rlcompleter

            readline.set_completer(rlcompleter.Completer(namespace).complete)
            readline.parse_and_bind("tab: complete")
            state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser(
                "~/.local/state"
            )
            history = os.path.join(state, "vmrig", "history")
            try:
                os.makedirs(os.path.dirname(history), exist_ok=True)
                readline.read_history_file(history)
            except OSError:
                pass
            readline.set_history_length(10000)
        except ImportError:
            readline = None
        if banner is None:
            banner = self.banner() + "\nrun the test script with test_script(); Ctrl-D ends the session"
        try:
            _Console(namespace).interact(banner=banner, exitmsg="")
        except SystemExit:
            pass
        finally:
            if readline is not None and history is not None:
                try:
                    readline.write_history_file(history)
                except OSError:
                    pass

    def banner(self):
        names = ", ".join(
            pyname if pyname == m.name else "{} (node {})".format(pyname, m.name)
            for m, pyname in zip(self.machines, self.python_names)
        ) or "(none)"
        return (
            "vmrig interactive test driver (Python {}.{})\n"
            "machines: {}\n"
            "vlans: {}"
        ).format(
            sys.version_info[0],
            sys.version_info[1],
            names,
            ", ".join("vlan{}".format(v.nr) for v in self.vlans) or "(none)",
        )

    def pause(self, exc, report):
        """--pause-on-failure: the REPL where the script failed, with that frame's names
        (its globals, then its locals), the machines still running."""
        _rpc("driver.pause", {})
        frame = None
        tb = exc.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == self.filename:
                frame = tb.tb_frame
            tb = tb.tb_next
        namespace = dict(frame.f_globals) if frame is not None else self.symbols()
        local_names = []
        if frame is not None and frame.f_locals is not frame.f_globals:
            namespace.update(frame.f_locals)
            local_names = sorted(frame.f_locals)
        place = "{}:{}".format(self.filename, report["line"]) if report["line"] else self.filename
        lines = ["", "vmrig: the test failed at {}".format(place)]
        if report["traceback"]:
            lines.append(report["traceback"].rstrip())
        first = (report["message"].splitlines() or [""])[0]
        lines.append("{}: {}".format(report["type"], first))
        driver_names = self.symbols()
        shown = local_names or sorted(
            n for n, v in namespace.items()
            if not n.startswith("_") and n not in driver_names
            and not isinstance(v, (types.ModuleType, types.FunctionType, type))
        )
        if shown:
            lines.append("names at the failure:")
            for name in shown:
                value = namespace.get(name)
                text = repr(value)
                if len(text) > 200:
                    text = text[:197] + "..."
                lines.append("  {} = {}".format(name, text))
        lines.append(self.banner())
        lines.append("the machines are as the failure left them; Ctrl-D ends the run (it fails)")
        self.interact(namespace, "\n".join(lines))


class _Console(code.InteractiveConsole):
    """The REPL: an error shows the user's own frames, not vmrig's or the REPL's."""

    def showtraceback(self):
        typ, value, tb = sys.exc_info()
        ours = (_module_file(), os.path.abspath(code.__file__))
        frames = [
            f for f in traceback.extract_tb(tb)
            if os.path.abspath(f.filename) not in ours
        ]
        text = ""
        if frames:
            text = "Traceback (most recent call last):\n" + "".join(
                traceback.format_list(frames)
            )
        text += "".join(traceback.format_exception_only(typ, value))
        self.write(text)


def _module_file():
    return os.path.abspath(__file__)


def _install_compat_modules():
    """`from test_driver.errors import RequestedAssertionFailed` and friends
    keep working in scripts written for the upstream driver."""
    me = sys.modules[__name__]
    package = types.ModuleType("test_driver")
    package.__path__ = []
    errors = types.ModuleType("test_driver.errors")
    for name in ("TestScriptError", "RequestedAssertionFailed", "MachineError"):
        setattr(errors, name, getattr(me, name))
    logger = types.ModuleType("test_driver.logger")
    logger.rootlog = log
    logger.AbstractLogger = Logger
    machine = types.ModuleType("test_driver.machine")
    machine.retry = retry
    machine.Machine = machine.BaseMachine = machine.QemuMachine = Machine
    polling = types.ModuleType("test_driver.polling_condition")
    polling.PollingCondition = PollingCondition
    polling.PollingConditionError = PollingConditionError
    package.errors = errors
    package.logger = logger
    package.machine = machine
    package.polling_condition = polling
    for mod in (package, errors, logger, machine, polling):
        sys.modules.setdefault(mod.__name__, mod)


def main():
    global _session
    init = json.loads(os.environ.pop("VMRIG_INIT"))
    rpc = _Rpc(int(os.environ.get("VMRIG_RPC_FD", "3")))
    _session = _Session(init, rpc)
    _install_compat_modules()
    try:
        if init.get("mode") == "interactive":
            _session.interact()
        else:
            try:
                _session.test_script()
            except SystemExit as e:
                if e.code not in (None, 0):
                    raise
        rpc.call("script.finished", {})
    except _ConnectionLost:
        os._exit(3)
    except BaseException as e:
        try:
            report = _session.failure_report(e)
            if init.get("mode") == "pause_on_failure":
                _session.pause(e, report)
            rpc.call("script.failed", report)
        except _ConnectionLost:
            os._exit(3)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
