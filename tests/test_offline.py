"""Every tool stays off the network outside CI: an audit hook in every Python process logs DNS lookups and
non-loopback connects, and the log must stay empty.

NNCF and OpenVINO's converter send telemetry unless they detect CI (``CI``, ``NNCF_CI``, ...) or, for NNCF, an imported
pytest; a user's shell has neither. So each tool runs in a subprocess whose environment has no CI marker, no
``PYTEST_*`` variable (Ultralytics turns its events off under pytest), none of the offline settings the test process
makes (the tool must make them itself), and a fresh ``HOME`` (no telemetry consent file, no caches). A
``sitecustomize.py`` on ``PYTHONPATH`` installs the hook at interpreter start, so dataloader and other child processes
are audited too.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from ultralytics import YOLO

from qarep_det.data.synthetic import make_dataset
from qarep_det_launcher import OFFLINE_ENV, TELEMETRY_MODULE, block_telemetry, configure_offline

ROOT = Path(__file__).resolve().parents[1]
CI_MARKERS = ("CI", "NNCF_CI", "NNCF_DEV", "TF_BUILD", "JENKINS_URL", "GITHUB_ACTIONS", "BUILD_BUILDID")
OFFLINE_SETTINGS = ("YOLO_OFFLINE", "YOLO_AUTOINSTALL", "YOLO_CONFIG_DIR", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")
LOG_VARIABLE = "QAREP_NETWORK_AUDIT_LOG"

SITECUSTOMIZE = '''
"""Audit hook (from tests/test_offline.py): log every DNS lookup and every non-loopback connect or sendto."""
import os
import socket
import sys
import traceback

_LOG = os.environ.get("QAREP_NETWORK_AUDIT_LOG")
_LOOKUPS = {"socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr"}
_SENDS = {"socket.connect", "socket.sendto"}
_STDLIB = os.path.dirname(os.__file__)


def _remote(sock, address):
    if getattr(socket, "AF_UNIX", None) is not None and sock.family == socket.AF_UNIX:
        return False
    host = address[0] if isinstance(address, tuple) else address
    return not (isinstance(host, str) and (host.startswith("127.") or host in ("::1", "localhost")))


def _hook(event, args):
    if event not in _LOOKUPS and event not in _SENDS:
        return
    if event in _SENDS and not _remote(args[0], args[1]):
        return
    stack = traceback.extract_stack()[:-1]
    frames = [f for f in stack if not f.filename.startswith(_STDLIB) or "-packages" in f.filename]
    where = " <- ".join(f"{f.filename}:{f.lineno}" for f in reversed(frames[-4:]))
    detail = args[1] if event in _SENDS else args[0]
    with open(_LOG, "a") as log:
        log.write(f"{os.getpid()} {sys.argv[0]} {event} {detail!r} at {where}\\n")


if _LOG:
    sys.addaudithook(_hook)
'''


@pytest.fixture(scope="module")
def audit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the audit ``sitecustomize.py``."""
    folder = tmp_path_factory.mktemp("audit")
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), n_train=6, n_val=2, imgsz=64, seed=5)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "qarep" / "weights" / "best.pt"
    path.parent.mkdir(parents=True)
    YOLO(str(ROOT / "model_yamls/yolo_qarep_n.yaml")).save(path)
    return path


def run_audited(audit: Path, tmp_path: Path, tool: str, *args: str) -> tuple[list[str], str]:
    """Run ``tools/<tool>`` outside CI with a fresh HOME under the audit hook; returns the logged network attempts
    and the tool's standard output (a tool that stayed offline by doing nothing must not pass)."""
    log = tmp_path / "network.log"
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)  # a test may run several tools; their attempts share one log
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in CI_MARKERS + OFFLINE_SETTINGS and not k.startswith(("XDG_", "PYTEST"))  # Ultralytics mutes in tests
    }
    python_path = os.pathsep.join(filter(None, [str(audit), os.environ.get("PYTHONPATH")]))  # the hook first
    env |= {"HOME": str(home), "PYTHONPATH": python_path, LOG_VARIABLE: str(log)}
    # a script, or a subcommand only the console command has (yolo)
    command = [str(ROOT / "tools" / tool)] if tool.endswith(".py") else ["-m", "qarep_det_launcher", tool]
    result = subprocess.run([sys.executable, *command, *args], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return log.read_text().splitlines() if log.exists() else [], result.stdout


def test_audit_hook_catches_a_lookup(audit: Path, tmp_path: Path) -> None:
    """The hook itself works: a plain lookup in a child process is logged (else an empty log would prove nothing)."""
    log = tmp_path / "network.log"
    env = {**os.environ, "PYTHONPATH": str(audit), LOG_VARIABLE: str(log)}
    code = "import socket\ntry:\n    socket.getaddrinfo('example.invalid', 80)\nexcept OSError:\n    pass"
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    assert "socket.getaddrinfo 'example.invalid'" in log.read_text()


def test_block_telemetry_makes_the_module_unimportable_or_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, TELEMETRY_MODULE, raising=False)
    assert block_telemetry()
    with pytest.raises(ImportError):  # what NNCF and OpenVINO catch to fall back to their no-op stubs
        importlib.import_module(TELEMETRY_MODULE)
    monkeypatch.setitem(sys.modules, TELEMETRY_MODULE, types.ModuleType(TELEMETRY_MODULE))
    with pytest.warns(UserWarning, match="imported before the offline set-up"):
        assert not block_telemetry()


def test_offline_variables_are_set_unless_the_user_set_them(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in OFFLINE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # a user's own choice wins
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path))
    assert configure_offline() == tmp_path and (tmp_path / "Ultralytics" / "Arial.ttf").is_file()
    assert {name: os.environ[name] for name in OFFLINE_ENV} == {**OFFLINE_ENV, "HF_HUB_OFFLINE": "0"}


@pytest.mark.parametrize("int8", [[], ["--int8", "--calib-images", "4", "--batch", "2"]], ids=["fp32", "int8"])
def test_export_openvino_is_offline(audit: Path, data: Path, weights: Path, tmp_path: Path, int8: list[str]) -> None:
    attempts, _ = run_audited(
        audit, tmp_path, "export.py", "--weights", str(weights), "--format", "openvino", "--imgsz", "64",
        "--data", str(data), "--overwrite", *int8,
    )  # fmt: skip
    assert not attempts, "\n".join(attempts[:3])
    folder = f"{weights.stem}_int8_openvino_model" if int8 else f"{weights.stem}_openvino_model"
    assert list((weights.parent / folder).glob("*.xml"))


def test_ptq_eval_all_backends_is_offline(audit: Path, data: Path, weights: Path, tmp_path: Path) -> None:
    attempts, _ = run_audited(
        audit, tmp_path, "ptq_eval.py", "--weights", str(weights), "--data", str(data), "--imgsz", "64",
        "--calib-images", "4", "--batch", "2", "--backend", "torch", "openvino", "onnxruntime",
        "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert not attempts, "\n".join(attempts[:3])
    rows = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [row["backend"] for row in rows] == ["torch", "openvino", "onnxruntime"]


def test_ptq_eval_max_drop_is_offline(audit: Path, data: Path, weights: Path, tmp_path: Path) -> None:
    """--max-drop's path: the tuning set, the search's OpenVINO candidates, the trade-off plot."""
    attempts, _ = run_audited(
        audit, tmp_path, "ptq_eval.py", "--weights", str(weights), "--data", str(data), "--imgsz", "64",
        "--calib-images", "2", "--tune-images", "2", "--batch", "2", "--backend", "openvino", "--max-drop", "0.3",
        "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert not attempts, "\n".join(attempts[:3])
    assert (tmp_path / "out" / "max_drop.png").is_file()


def test_benchmark_int8_is_offline(audit: Path, data: Path, tmp_path: Path) -> None:
    attempts, out = run_audited(
        audit, tmp_path, "benchmark.py", "int8", "--cfg", str(ROOT / "model_yamls/yolo_qarep_n.yaml"),
        "--data", str(data), "--imgsz", "64", "--calib-images", "2", "--runs", "1",
    )  # fmt: skip
    assert not attempts, "\n".join(attempts[:3])
    assert "ISA: " in out and "INT8 ours (openvino)" in out and "INT8 ours (onnxruntime-int8)" in out


def test_qat_and_diagnose_are_offline(audit: Path, data: Path, weights: Path, tmp_path: Path) -> None:
    """The two tools of this release that run ModelOpt and Ultralytics' trainer: one tiny QAT epoch, one diagnosis."""
    run_audited(
        audit, tmp_path, "qat.py", "--weights", str(weights), "--data", str(data), "--epochs", "1", "--imgsz", "64",
        "--batch", "2", "--device", "cpu", "--workers", "0", "--calib-images", "2", "--project", str(tmp_path / "qat"),
    )  # fmt: skip
    attempts, _ = run_audited(  # the shared log holds both runs' attempts
        audit, tmp_path, "diagnose.py", "--weights", str(weights), "--data", str(data), "--imgsz", "64",
        "--calib-images", "2", "--batch", "2", "--out", str(tmp_path / "diagnose"),
    )  # fmt: skip
    assert not attempts, "\n".join(attempts[:3])
    assert [path.name for path in (tmp_path / "qat").glob("*/weights/best.pt")] == ["best.pt"]
    assert len(json.loads((tmp_path / "diagnose" / "report.json").read_text())["models"]) == 1


def test_ultralytics_quantize_8_is_offline(audit: Path, data: Path, weights: Path, tmp_path: Path) -> None:
    """Ultralytics' own QAT checks its ModelOpt requirement before quantizing: that must not reach pip's index."""
    attempts, _ = run_audited(
        audit, tmp_path, "yolo", "train", f"model={weights}", f"data={data}", "quantize=8", "epochs=1", "imgsz=64",
        "batch=2", "workers=0", "device=cpu", f"project={tmp_path / 'q8'}", "name=run", "plots=False",
    )  # fmt: skip
    assert not attempts, "\n".join(attempts[:3])
    assert (tmp_path / "q8" / "run" / "weights" / "best.pt").is_file()


IMPORT_PROBE = """
import json, os, sys
env, modules = dict(os.environ), set(sys.modules)
if sys.argv[1] == "qarep_det":
    import qarep_det
    yaml = "yolo_qarep_n.yaml"
else:
    import ultralytics
    yaml = "yolov8n.yaml"
from ultralytics import YOLO
YOLO(yaml).save(sys.argv[2])
after = dict(os.environ)
print(json.dumps({
    "env": sorted(k for k in set(env) | set(after) if env.get(k) != after.get(k)),
    "modules": sorted(set(sys.modules) - modules),
    "blocked": sorted(k for k, v in sys.modules.items() if v is None),
}))
"""
REFUSE_NETWORK = "import socket\n\ndef _refuse(*args, **kwargs):\n    raise OSError('no network in this test')\n\n"
REFUSE_NETWORK += "socket.getaddrinfo = socket.create_connection = _refuse\n"


def test_import_changes_the_process_no_more_than_ultralytics_does(tmp_path: Path) -> None:
    """A user's ``import qarep_det; YOLO("yolo_qarep_n.yaml")`` against ``import ultralytics; YOLO("yolov8n.yaml")``,
    each in a fresh process with a fresh HOME and none of the offline settings (Ultralytics' own DNS probe is refused
    by a ``sitecustomize``, so nothing leaves the machine): the same environment variables change, no module is
    blocked, the only extra modules are ours, the same files are written; and the saved checkpoint loads in a process
    that imported only qarep_det."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(REFUSE_NETWORK)
    seen = {}
    for package in ("qarep_det", "ultralytics"):
        home = tmp_path / f"home_{package}"
        home.mkdir()
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in CI_MARKERS + OFFLINE_SETTINGS and not k.startswith(("XDG_", "PYTEST", "OMP_", "HF_"))
        }
        env |= {"HOME": str(home), "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)])}
        result = subprocess.run(
            [sys.executable, "-c", IMPORT_PROBE, package, str(tmp_path / f"{package}.pt")],
            env=env, cwd=tmp_path, capture_output=True, text=True,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        report = json.loads(result.stdout.strip().splitlines()[-1])
        report["files"] = sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file())
        seen[package] = report
    ours, theirs = seen["qarep_det"], seen["ultralytics"]
    assert ours["env"] == theirs["env"] and not set(ours["env"]) & set(OFFLINE_SETTINGS)
    assert ours["blocked"] == theirs["blocked"] == []
    extra = set(ours["modules"]) - set(theirs["modules"])
    assert extra and all(name == "qarep_det" or name.startswith("qarep_det.") for name in extra)
    assert ours["files"] == theirs["files"]
    load = "import sys, qarep_det; print(type(qarep_det.load_detector(sys.argv[1]).model[0]).__name__)"
    loaded = subprocess.run(
        [sys.executable, "-c", load, str(tmp_path / "qarep_det.pt")],
        env={**env, "HOME": str(tmp_path / "home_qarep_det")}, capture_output=True, text=True,
    )  # fmt: skip
    assert loaded.returncode == 0 and loaded.stdout.split() == ["QARepBlock"], loaded.stderr[-2000:]
