#!/usr/bin/env python3
"""A stand-in for qemu-system-x86_64 that speaks to the driver as QEMU and the guest do.

The driver's tests without a VM start this instead of QEMU, on the very command line vmrig
gives QEMU: it connects the backdoor shell's and QMP's sockets (vmrig's line) or listens
for QMP (a NixOS start command's line), prints a console on stdout (`-serial stdio`), and
runs the guest's shell as a real bash on the shell socket, with the banner the guest's init
prints. QMP answers what the driver asks: capabilities, status, send-key (Ctrl+Alt+Delete
reboots), set_link, human-monitor-command, screendump, stop/cont, migrate/query-migrate
(a boot snapshot's state file) and quit. `-incoming` restores: no banner, the shell is up.

The guest's PATH starts with stubs: `poweroff` and `reboot` signal this process,
`systemctl` answers `is-system-running` and `show UNIT` from files in $FAKE_GUEST/units,
`mount`/`umount` of a 9p export link and unlink its `-fsdev` directory,
`date` records what it was asked, `modprobe` does nothing.

Behaviour for one test comes from FAKE_QEMU_* variables, set by the wrapper script each test
writes (tests share one process, so never through the test's environment):
  FAKE_QEMU_MODE     normal | no-banner | exit-at-start | die-booting
  FAKE_QEMU_DELAY    seconds before the banner (default 0)
  FAKE_GUEST         the guest's "root": its cwd, units/, state files
"""

import json
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

BANNER = b"Spawning backdoor root shell...\n"
ARGS = sys.argv[1:]
MODE = os.environ.get("FAKE_QEMU_MODE", "normal")
DELAY = float(os.environ.get("FAKE_QEMU_DELAY", "0"))
GUEST = os.environ.get("FAKE_GUEST", os.getcwd())
STUBS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guest-bin")
actions = queue.Queue()
console_lock = threading.Lock()


def console(line):
    with console_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def values(flag):
    return [ARGS[i + 1] for i, a in enumerate(ARGS[:-1]) if a == flag]


def split_opts(text):
    """QEMU's option syntax: `a,b=c,d=e`, a doubled comma is a comma."""
    parts = re.split(r"(?<!,),(?!,)", text)
    return [p.replace(",,", ",") for p in parts]


def chardev_paths():
    paths = {}
    for spec in values("-chardev"):
        opts = dict(o.split("=", 1) for o in split_opts(spec) if "=" in o)
        if "path" in opts:
            paths[opts["id"]] = opts["path"]
    return paths


def connect(path):
    deadline = time.time() + 10
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except OSError:
            s.close()
            if time.time() > deadline:
                raise
            time.sleep(0.01)


def die_with_parent():
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Guest:
    """The guest's backdoor shell: a bash on the shell socket."""

    def __init__(self, shell_sock):
        self.sock = shell_sock
        self.proc = None
        self.boots = 0

    def boot(self, banner=True):
        self.boots += 1
        for marker in os.listdir(GUEST):
            if marker.startswith(".9p-mounted-"):  # a new boot has no mounts
                os.remove(os.path.join(GUEST, marker))
        console(f"fake-qemu: booting (boot {self.boots})")
        if DELAY:
            time.sleep(DELAY)
        if MODE == "die-booting":
            console("fake-qemu: kernel panic - not syncing: fake")
            os._exit(1)
        if MODE == "no-banner":
            console("fake-qemu: stuck before the shell")
            return
        env = dict(os.environ)
        env["PATH"] = STUBS + ":" + env.get("PATH", "/usr/bin:/bin")
        env["FAKE_QEMU_PID"] = str(os.getpid())
        # The 9p transfer directory: the guest's `mount` stub links it where the copy
        # command mounts it (inside the test's directory, never /run on the host).
        paths = {}
        for spec in values("-fsdev"):
            opts = dict(o.split("=", 1) for o in split_opts(spec) if "=" in o)
            paths[opts["id"]] = opts["path"]
        for spec in values("-device"):
            opts = dict(o.split("=", 1) for o in split_opts(spec) if "=" in o)
            if "mount_tag" in opts:
                env["FAKE_9P_" + opts["mount_tag"].replace("-", "_")] = paths[opts["fsdev"]]
        env["VMRIG_XFER"] = os.path.join(GUEST, "xfer-mount")
        env.pop("BASH_ENV", None)
        if banner:
            self.sock.sendall(BANNER)
        self.proc = subprocess.Popen(
            ["bash", "--norc", "--noprofile"],
            stdin=self.sock.fileno(),
            stdout=self.sock.fileno(),
            stderr=sys.stdout.fileno(),
            cwd=GUEST,
            env=env,
            # No controlling terminal, as the guest's shell after the release (a test run from
            # a terminal would otherwise hand it the developer's).
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        console("fake-qemu: reached the shell")

    def stop(self):
        if self.proc is not None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
            self.proc = None


class Machine:
    def __init__(self):
        self.status = "running"
        self.migration = None
        self.no_reboot = "-no-reboot" in ARGS
        self.links = {}
        # What a command sets going once its reply is out: a real QEMU answers send-key
        # long before the guest acts on the keys, so this fake must not exit first.
        self.after_reply = None

    def qmp_loop(self, sock):
        sock.sendall(json.dumps({"QMP": {"version": {"qemu": {"major": 9, "minor": 2, "micro": 0}}, "capabilities": []}}).encode() + b"\n")
        buf = b""
        while True:
            data = sock.recv(65536)
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if not line.strip():
                    continue
                req = json.loads(line)
                reply = self.answer(req.get("execute"), req.get("arguments") or {})
                if "id" in req:
                    reply["id"] = req["id"]
                sock.sendall(json.dumps(reply).encode() + b"\n")
                if self.after_reply:
                    self.after_reply, then = None, self.after_reply
                    then()

    def answer(self, cmd, args):
        if cmd == "qmp_capabilities":
            return {"return": {}}
        if cmd == "query-status":
            return {"return": {"status": self.status, "running": self.status == "running"}}
        if cmd == "send-key":
            keys = [k.get("data") for k in args.get("keys", [])]
            if keys == ["ctrl", "alt", "delete"]:
                self.after_reply = lambda: actions.put("reboot")
            return {"return": {}}
        if cmd == "set_link":
            self.links[args["name"]] = args["up"]
            console(f"fake-qemu: link {args['name']} {'up' if args['up'] else 'down'}")
            return {"return": {}}
        if cmd == "human-monitor-command":
            return {"return": f"fake monitor: {args['command-line']}\r\n"}
        if cmd == "screendump":
            with open(args["filename"], "wb") as f:
                if args.get("format") == "png":
                    f.write(png(4, 2))
                else:
                    f.write(b"P6\n4 2\n255\n" + bytes(range(24)))
            return {"return": {}}
        if cmd == "stop":
            self.status = "paused"
            return {"return": {}}
        if cmd == "cont":
            self.status = "running"
            return {"return": {}}
        if cmd == "migrate":
            mounted = [m for m in os.listdir(GUEST) if m.startswith(".9p-mounted-")]
            if mounted:
                tag = mounted[0][len(".9p-mounted-"):]
                return {"error": {"class": "GenericError", "desc": f"Migration is disabled when VirtFS export path is mounted in the guest using mount_tag '{tag}'"}}
            uri = args["uri"]
            assert uri.startswith("exec:"), uri
            subprocess.run(["sh", "-c", "echo fake-state | " + uri[len("exec:"):]], check=True)
            self.migration = "completed"
            self.status = "postmigrate"
            return {"return": {}}
        if cmd == "query-migrate":
            return {"return": {"status": self.migration} if self.migration else {}}
        if cmd == "system_powerdown":
            actions.put("poweroff")
            return {"return": {}}
        if cmd == "quit":
            actions.put("quit")
            return {"return": {}}
        return {"error": {"class": "CommandNotFound", "desc": f"The command {cmd} has not been found"}}


def qmp_socket():
    """vmrig's line: QEMU connects to the driver (returns the stream). A start command's:
    QEMU listens (returns the listening socket; the driver connects once it has the shell)."""
    paths = chardev_paths()
    if "qmp" in paths:
        return connect(paths["qmp"])
    for spec in values("-qmp"):
        path = split_opts(spec)[0][len("unix:"):]
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        server.listen(1)
        return server
    raise SystemExit("fake-qemu: no QMP on the command line")


def serve_qmp(machine, sock):
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock = sock.accept()[0]
    machine.qmp_loop(sock)


def png(width, height):
    """A grey PNG, without a library."""
    import struct
    import zlib

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(b"\0" + b"\x80" * (3 * width) for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def main():
    name = (values("-name") or ["?"])[0]
    if MODE == "exit-at-start":
        sys.stderr.write("qemu-system-x86_64: -drive file=disk.qcow2: Could not open: fake\n")
        sys.exit(1)
    signal.signal(signal.SIGUSR1, lambda *_: actions.put("reboot"))
    signal.signal(signal.SIGUSR2, lambda *_: actions.put("poweroff"))
    console(f"fake-qemu: {name} starting")
    console("fake-qemu: argv " + shlex.join(ARGS))
    for spec in values("-monitor"):
        # A start command's human monitor: QEMU connects; the driver keeps it open.
        if spec.startswith("unix:"):
            monitor = connect(split_opts(spec)[0][len("unix:"):])  # noqa: F841 (held open)
    machine = Machine()
    incoming = values("-incoming")
    if incoming:
        machine.status = "inmigrate"
    qmp = qmp_socket()
    guest = Guest(connect(chardev_paths()["shell"]))
    threading.Thread(target=serve_qmp, args=(machine, qmp), daemon=True).start()
    if incoming:
        state = re.match(r"exec:cat '(.*)'$", incoming[0]).group(1).replace("'\\''", "'")
        with open(state) as f:
            assert f.read() == "fake-state\n", "not a state this fake saved"
        time.sleep(0.05)
        machine.status = "running"
        console("fake-qemu: restored")
        guest.boot(banner=False)
    else:
        guest.boot()
    while True:
        action = actions.get()
        guest.stop()
        if action == "reboot" and not machine.no_reboot:
            console("reboot: Restarting system")
            guest.boot()
            continue
        console("reboot: Power down" if action == "poweroff" else f"fake-qemu: {action}")
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
