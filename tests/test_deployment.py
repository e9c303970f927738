"""The same ServerApp and ClientApp under Flower's Deployment Engine: a SuperLink and two
SuperNodes as separate processes (127.0.0.1 only, free ports, FLWR_HOME in tmp) run one round
of the tiny preset submitted with `flwr run <repo root> <connection> --stream --run-config ...`,
as the README's "Across machines" section does by hand."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONNECTION = "fedaigc-test"
START_TIMEOUT = 90  # SuperLink up and both SuperNodes online
RUN_TIMEOUT = 360  # `flwr run --stream` of one tiny round (about 2 min on one busy core)
LOG_TAIL = 4000


def free_ports(n: int) -> list[int]:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def executable(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    assert found, f"{name} not found next to {sys.executable} or on PATH (is flwr installed?)"
    return found


class Federation:
    """The processes of one local deployment, each in its own session, with logs in tmp."""

    def __init__(self, root: Path):
        self.root = root
        self.home = root / "flwr-home"
        self.logs = root / "logs"
        self.home.mkdir()
        self.logs.mkdir()
        self.procs: dict[str, subprocess.Popen] = {}
        self.outputs: dict[str, str] = {}
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.home),  # also marks every process this federation starts
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }

    def start(self, name: str, command: str, *args: str) -> None:
        with open(self.logs / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(
                [executable(command), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.root,
                start_new_session=True,
            )

    def flwr(self, name: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
        """Runs `flwr ARGS` to completion (killed after `timeout` s)."""
        cmd = [executable("flwr"), *args]
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.root,
            start_new_session=True,
            text=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            self.killpg(proc, signal.SIGKILL)
            out, _ = proc.communicate()
            timed_out = True
        self.outputs[name] = out
        if timed_out:
            pytest.fail(f"`flwr {' '.join(args)}` did not finish within {timeout} s\n{self.report()}", pytrace=False)
        return subprocess.CompletedProcess(cmd, proc.returncode, out)

    def check_alive(self, what: str) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with code {proc.returncode} while {what}\n{self.report()}")

    def report(self) -> str:
        parts = []
        for log in sorted(self.logs.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines(keepends=True)
            text = "".join(line for line in lines if "[uvicorn.access]" not in line)  # one line per HTTP request
            parts.append(f"----- {log.name} (last {LOG_TAIL} chars) -----\n{text[-LOG_TAIL:]}")
        for name, out in self.outputs.items():
            parts.append(f"----- {name} output (last {LOG_TAIL} chars) -----\n{out[-LOG_TAIL:]}")
        return "\n".join(parts)

    @staticmethod
    def killpg(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)  # start_new_session: the group id is the child's pid
        except (ProcessLookupError, PermissionError):
            pass

    def marked_pids(self) -> list[int]:
        """Every process whose environment carries this federation's FLWR_HOME: the SuperExecs
        and app processes that Flower starts in sessions of their own included."""
        marker = f"FLWR_HOME={self.home}".encode()
        pids = []
        for entry in Path("/proc").glob("[0-9]*"):
            pid = int(entry.name)
            if pid == os.getpid():
                continue
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker in env:
                pids.append(pid)
        return pids

    def stop(self) -> None:
        for proc in self.procs.values():
            self.killpg(proc, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs.values():
            self.killpg(proc, signal.SIGKILL)
        for _ in range(3):  # whatever Flower detached from our process groups
            for pid in self.marked_pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.2)
        for proc in self.procs.values():
            proc.wait(timeout=10)


def toml_string(value) -> str:
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def test_one_round_on_superlink_and_two_supernodes(tmp_path, tiny_data, tiny_model_dir):
    fed = Federation(tmp_path)
    link_port, *node_ports = free_ports(3)
    (fed.home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    run_dir = tmp_path / "run"
    try:
        # SuperLink: Control, Fleet and Runtime APIs on one HTTP port; the ServerApp's dependencies
        # are already installed here, so no `uv sync` (it would need the network).
        fed.start(
            "superlink",
            "flower-superlink",
            "--insecure",
            "--host",
            "127.0.0.1",
            "--port",
            str(link_port),
            "--disable-runtime-dependency-installation",
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            fed.check_alive("waiting for the SuperLink")
            try:
                socket.create_connection(("127.0.0.1", link_port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the SuperLink did not listen on port {link_port} in {START_TIMEOUT} s\n{fed.report()}")
                time.sleep(0.5)

        for pid, port in enumerate(node_ports):
            fed.start(
                f"supernode-{pid}",
                "flower-supernode",
                "--insecure",
                "--superlink",
                f"127.0.0.1:{link_port}",
                "--host",  # this node's ClientAppIo (Runtime HTTP API) address
                "127.0.0.1",
                "--port",
                str(port),
                "--node-config",
                f"partition-id={pid} num-partitions=2",
            )
        while True:
            fed.check_alive("waiting for the SuperNodes")
            res = fed.flwr("supernode-ls", "supernode", "ls", CONNECTION, "--format", "json", timeout=60)
            try:
                nodes = json.loads(res.stdout[res.stdout.index("{") :])["nodes"]
            except (ValueError, KeyError):
                nodes = []
            if sum(n.get("status") == "online" for n in nodes) >= 2:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the SuperNodes did not come online in {START_TIMEOUT} s\n{fed.report()}")
            time.sleep(1)

        res = fed.flwr(
            "flwr-run",
            "run",
            str(REPO),
            CONNECTION,
            "--stream",
            "--run-config",
            'preset="tiny"',
            "--run-config",
            "config=" + toml_string("[federation]\nrounds = 1\nnum_clients = 2\n"),
            "--run-config",
            "run-dir=" + toml_string(run_dir),
            "--run-config",
            "data=" + toml_string(tiny_data),
            "--run-config",
            "model=" + toml_string(tiny_model_dir),
            timeout=RUN_TIMEOUT,
        )
        assert res.returncode == 0 and "Successfully started run" in res.stdout, fed.report()
        metrics_file = run_dir / "metrics.json"
        assert metrics_file.is_file(), f"the ServerApp wrote no {metrics_file}\n{fed.report()}"
        rounds = json.loads(metrics_file.read_text())["rounds"]
        assert [r["round"] for r in rounds] == [1], fed.report()
        assert set(rounds[0]["clusters"]) == {"0", "1"} and rounds[0]["missing"] == [], fed.report()
        assert rounds[0]["bytes_up"] > 0
        assert list(run_dir.glob("adapters/cluster_*.safetensors")), fed.report()
    finally:
        fed.stop()
    assert not fed.marked_pids(), "processes of the federation survived the test"
