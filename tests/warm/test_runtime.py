"""The warm runtime (decision 0600): a command run through the shim is a child forked from
the runtime, and behaves as the same command started by a fresh interpreter would, with
the client's descriptors, environment, credentials and mount namespace; it ends with its
client. Real processes, a real server, light preloads."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hydraserve.backends.local.sandbox import sandbox_available, sandbox_prefix
from hydraserve.warm.client import write_shim
from hydraserve.warm.protocol import ENV_CLIENT_STARTED, ENV_SOCKET, parse_command
from hydraserve.warm.server import wait_for_client_exit
from hydraserve.warm.tree import process_tree


@dataclass
class Runtime:
    name: str
    shim: Path
    process: subprocess.Popen[bytes]
    children_dir: Path

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, ENV_SOCKET: self.name, **extra}

    def run(self, *argv: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # type: ignore[call-overload, no-any-return]
            [str(self.shim), *argv],
            env=kwargs.pop("env", self.env()),
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
            **kwargs,
        )


def wait_until(check: Callable[[], object], what: str, timeout: float = 30) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    tmp = tmp_path_factory.mktemp("warm")
    shim = write_shim(tmp / "warm-python")
    name = f"test-{os.getpid()}"
    log = tmp / "server.log"
    children = tmp / "children"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "hydraserve.warm.server", "--name", name),
                *("--shim", str(shim), "--preload", "json"),
                *("--preload", "tests.support.preload_probe:mark", "--children-dir", str(children)),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    wait_until(lambda: "warm.ready" in log.read_text(), "the runtime's warm.ready")
    yield Runtime(name, shim, process, children)
    process.terminate()
    process.wait(10)


def test_command_lines_it_runs_warm_and_those_it_leaves_to_the_interpreter() -> None:
    assert parse_command(["-c", "pass", "a"]) == ("c", "pass", ["a"])
    assert parse_command(["-B", "-X", "dev", "-m", "mod", "--x"]) == ("m", "mod", ["--x"])
    assert parse_command(["-u", "script.py", "1"]) == ("path", "script.py", ["1"])
    assert parse_command([]) is None  # interactive
    assert parse_command(["-"]) is None  # stdin
    assert parse_command(["--version"]) is None
    assert parse_command(["-c"]) is None


def test_a_command_runs_in_a_child_of_the_runtime_as_the_client_started_it(
    runtime: Runtime, tmp_path: Path
) -> None:
    code = textwrap.dedent(
        """
        import json, os, sys
        print(json.dumps({"ppid": os.getppid(), "argv": sys.argv, "cwd": os.getcwd(),
                          "marker": os.environ.get("MARKER"), "stdin": sys.stdin.read(),
                          "warm": "json" in sys.modules, "exe": sys.executable}))
        sys.stderr.write("to stderr\\n")
        sys.exit(7)
        """
    )
    result = runtime.run(
        "-c", code, "one", "two", input="from stdin", cwd=tmp_path, env=runtime.env(MARKER="m")
    )
    assert result.returncode == 7
    assert result.stderr.strip().endswith("to stderr")
    seen = json.loads(result.stdout)
    assert seen["ppid"] == runtime.process.pid  # forked by the runtime
    assert seen["argv"] == ["-c", "one", "two"]
    assert seen["cwd"] == str(tmp_path)
    assert seen["marker"] == "m" and seen["stdin"] == "from stdin"
    assert seen["warm"] and seen["exe"] == str(runtime.shim)


def test_a_child_knows_when_its_client_started(runtime: Runtime) -> None:
    before = time.time()
    result = runtime.run("-c", f"import os; print(os.environ[{ENV_CLIENT_STARTED!r}])")
    after = time.time()
    assert result.returncode == 0, result.stderr
    assert before <= float(result.stdout) <= after


def test_a_function_preload_runs_once_in_the_runtime_before_any_child(runtime: Runtime) -> None:
    code = "import tests.support.preload_probe as p, os; print(p.LOADED_IN, os.getpid())"
    first, second = runtime.run("-c", code), runtime.run("-c", code)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    loaded_in, child = (int(v) for v in first.stdout.split())
    assert loaded_in == runtime.process.pid != child  # ran in the runtime, not the child
    assert second.stdout.split()[0] == str(runtime.process.pid)


def test_modules_scripts_and_exceptions_behave_as_with_the_interpreter(
    runtime: Runtime, tmp_path: Path
) -> None:
    script = tmp_path / "script.py"
    script.write_text("import sys\nprint(__name__, sys.argv[1:])\nraise SystemExit('bye')\n")
    result = runtime.run(str(script), "x")
    assert (result.returncode, result.stdout.strip(), result.stderr.strip()) == (
        1,
        "__main__ ['x']",
        "bye",
    )
    result = runtime.run("-m", "json.tool", input='{"a": 1}')
    assert result.returncode == 0 and json.loads(result.stdout) == {"a": 1}
    result = runtime.run("-c", "raise ValueError('boom')")
    assert result.returncode == 1 and "ValueError: boom" in result.stderr


def test_a_command_ends_as_with_the_interpreter_threads_exit_handlers_and_output(
    runtime: Runtime, tmp_path: Path
) -> None:
    """A child skips tearing down the runtime's modules (decision 0600, addendum), but not
    what a command expects at its end: its non-daemon threads finish, its exit handlers
    run, its buffered output arrives, its exit code stands."""
    code = textwrap.dedent(
        """
        import atexit, sys, threading, time
        from pathlib import Path
        out = Path(sys.argv[1])
        def late():
            time.sleep(0.3)
            with open(out / "thread", "w") as f:
                f.write("done")
        threading.Thread(target=late).start()
        atexit.register(lambda: (out / "atexit").write_text("ran"))
        sys.stdout.write("buffered, never flushed")
        sys.exit(5)
        """
    )
    result = runtime.run("-c", code, str(tmp_path))
    assert result.returncode == 5
    assert result.stdout == "buffered, never flushed"
    assert (tmp_path / "thread").read_text() == "done"
    assert (tmp_path / "atexit").read_text() == "ran"


def test_processes_it_spawns_come_from_the_runtime_too(runtime: Runtime, tmp_path: Path) -> None:
    """multiprocessing's spawn (vLLM's engine core) starts the shim, so the grandchild is
    forked by the runtime as well, and answers through the inherited pipes."""
    script = tmp_path / "spawner.py"
    script.write_text(
        textwrap.dedent(
            """
            import multiprocessing as mp, os

            def child(queue):
                queue.put(os.getppid())

            if __name__ == "__main__":
                ctx = mp.get_context("spawn")
                queue = ctx.Queue()
                proc = ctx.Process(target=child, args=(queue,))
                proc.start()
                print(queue.get(timeout=30), os.getppid())
                proc.join()
                print(proc.exitcode)
            """
        )
    )
    result = runtime.run(str(script))
    assert result.returncode == 0, result.stderr
    spawned_parent, my_parent, exitcode = result.stdout.split()
    assert int(spawned_parent) == int(my_parent) == runtime.process.pid
    assert exitcode == "0"


def test_signals_reach_the_child_and_it_dies_with_its_client(
    runtime: Runtime, tmp_path: Path
) -> None:
    code = textwrap.dedent(
        """
        import os, signal, sys, time
        from pathlib import Path
        out = Path(sys.argv[1])
        def on_term(*_):
            out.with_suffix(".term").write_text("term")
            sys.exit(3)
        signal.signal(signal.SIGTERM, on_term)
        out.write_text(str(os.getpid()))
        while True:
            time.sleep(0.05)
        """
    )
    # SIGTERM to the client: the child handles it, the client exits with its code.
    marker = tmp_path / "a.pid"
    client = subprocess.Popen([str(runtime.shim), "-c", code, str(marker)], env=runtime.env())
    wait_until(marker.exists, "the child's pid file")
    child = int(marker.read_text())
    assert child in process_tree([runtime.process.pid])
    assert child in process_tree([client.pid], [runtime.children_dir])  # noted for the client
    client.send_signal(signal.SIGTERM)
    assert client.wait(30) == 3
    assert marker.with_suffix(".term").read_text() == "term"

    # SIGKILL to the client (it cannot forward it): the child goes too.
    marker = tmp_path / "b.pid"
    client = subprocess.Popen([str(runtime.shim), "-c", code, str(marker)], env=runtime.env())
    wait_until(marker.exists, "the child's pid file")
    child = int(marker.read_text())
    client.kill()
    client.wait(30)
    wait_until(lambda: not Path(f"/proc/{child}").exists(), "the orphaned child to end")
    wait_until(lambda: not (runtime.children_dir / str(child)).exists(), "its note to go")


def test_a_client_ends_as_its_child_did_even_by_sigkill(runtime: Runtime) -> None:
    # SIGKILL takes no handler: the shim must still end by it, not with a traceback.
    killed = runtime.run("-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert "Traceback" not in killed.stderr
    segv = runtime.run("-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert segv.returncode == -signal.SIGSEGV, segv.stderr


def test_the_childs_watchdog_waits_for_the_clients_end_on_a_non_blocking_descriptor() -> None:
    # The runtime reads a request with a timeout, which makes the open file non-blocking
    # for the forked child's copy too; the watchdog must still wait for the client's end.
    runtime_end, client_end = socket.socketpair()
    runtime_end.settimeout(5)
    assert not os.get_blocking(runtime_end.fileno())
    copy = socket.socket(fileno=os.dup(runtime_end.fileno()))
    result: list[int | BaseException] = []

    def watch() -> None:
        try:
            result.append(wait_for_client_exit(copy))
        except BaseException as exc:  # reported by the assertion below
            result.append(exc)

    watchdog = threading.Thread(target=watch)
    watchdog.start()
    wchan = f"/proc/self/task/{watchdog.native_id}/wchan"
    # Waiting in the kernel for the client's bytes (or already given up, as it used to).
    wait_until(
        lambda: not watchdog.is_alive() or "unix_stream" in Path(wchan).read_text(),
        "the watchdog to block on the connection",
    )
    assert watchdog.is_alive(), result
    client_end.sendall(b"xy")
    client_end.close()
    watchdog.join(10)
    assert result == [2]  # read what the client sent, then its end, and nothing else
    copy.close()
    runtime_end.close()


def test_without_a_reachable_runtime_the_command_starts_cold(runtime: Runtime) -> None:
    code = "import os, json; print(json.dumps(os.getppid()))"
    unreachable = runtime.run("-c", code, env=runtime.env(**{ENV_SOCKET: "nobody-listens"}))
    assert unreachable.returncode == 0
    assert json.loads(unreachable.stdout) != runtime.process.pid
    assert (
        "nobody-listens unreachable" in unreachable.stderr and "starting cold" in unreachable.stderr
    )
    unset = {k: v for k, v in os.environ.items() if k != ENV_SOCKET}
    cold = runtime.run("-c", code, env=unset)
    assert cold.returncode == 0 and cold.stderr == ""


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/setpriv").exists(),
                    reason="needs root and setpriv")  # fmt: skip
def test_a_client_gets_its_own_credentials_never_the_runtimes(
    runtime: Runtime, tmp_path: Path
) -> None:
    """The runtime runs as root; an unprivileged client's child is unprivileged."""
    # Outside pytest's private (0700) directory, so the client can reach the shim and the
    # secret is kept from it by the file's own mode alone.
    public = Path(tempfile.mkdtemp(prefix="hydraserve-warm-"))
    public.chmod(0o755)
    shim = write_shim(public / "warm-python")
    secret = public / "secret"
    secret.write_text("root only")
    secret.chmod(0o600)
    code = textwrap.dedent(
        f"""
        import json, os
        try:
            open({str(secret)!r}).read(); read = "yes"
        except PermissionError:
            read = "denied"
        caps = [l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff")]
        print(json.dumps({{"uid": os.getuid(), "gid": os.getgid(), "read": read,
                          "caps": caps[0], "ppid": os.getppid()}}))
        """
    )
    result = subprocess.run(
        [
            *("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"),
            *(str(shim), "-c", code),
        ],
        env=runtime.env(),
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    shutil.rmtree(public)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen == {
        "uid": 65534,
        "gid": 65534,
        "read": "denied",
        "caps": "0000000000000000",
        "ppid": runtime.process.pid,
    }


@pytest.mark.skipif(not sandbox_available(), reason="needs root and unshare (mount namespaces)")
def test_a_sandboxed_client_gets_a_sandboxed_child(runtime: Runtime, tmp_path: Path) -> None:
    """The child joins the client's mount namespace: the worker sandbox holds for a
    worker forked from the runtime (what another model's files are, it cannot see)."""
    hide = tmp_path / "shm"
    own, other = hide / "model-a", hide / "model-b"
    for directory in (own, other):
        directory.mkdir(parents=True)
        (directory / "weights").write_text(directory.name)
    code = textwrap.dedent(
        f"""
        import json, os
        out = {{"ppid": os.getppid(), "own": open({str(own / "weights")!r}).read()}}
        for what, path, flags in (("other", {str(other / "weights")!r}, os.O_RDONLY),
                                  ("write_own", {str(own / "weights")!r}, os.O_WRONLY)):
            try:
                os.close(os.open(path, flags)); out[what] = "ok"
            except OSError as exc:
                out[what] = type(exc).__name__
        print(json.dumps(out))
        """
    )
    result = subprocess.run(
        [*sandbox_prefix(hide, [own], []), str(runtime.shim), "-c", code],
        env=runtime.env(),
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "ppid": runtime.process.pid,
        "own": "model-a",
        "other": "FileNotFoundError",
        "write_own": "OSError",
    }
    assert (other / "weights").read_text() == "model-b"  # outside, all is as it was
