"""tools/train.py and qarep_det.ultralytics.trainer: tiny end-to-end runs, resume, DDP pickling, offline, bad input."""

from __future__ import annotations

import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cloudpickle
import pytest
import torch
from conftest import fresh_env, randomize_bn, results_epochs
from ultralytics.engine import trainer as engine_trainer
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils.dist import ddp_cleanup, generate_ddp_file

from qarep_det.cli.main import main as cli_main
from qarep_det.data.synthetic import make_dataset
from qarep_det.errors import InputError
from qarep_det.nn import RepVGGBlock
from qarep_det.ultralytics import amp as qamp
from qarep_det.ultralytics.run_options import TrainOptions
from qarep_det.ultralytics.trainer import CustomL2Trainer, QARepTrainer, make_trainer, rep_blocks, train

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "train.py"
QAREP_N = REPO / "model_yamls" / "yolo_qarep_n.yaml"
REPVGG_N = REPO / "model_yamls" / "yolo_repvgg_n.yaml"
TINY = {"epochs": 1, "imgsz": 64, "batch": 8, "device": "cpu", "workers": 0, "hyp": {"plots": False, "val": True}}
NETWORK_EVENTS = (
    "socket.connect",
    "socket.getaddrinfo",
    "socket.gethostbyname",
    "socket.gethostbyaddr",
    "urllib.Request",
)
# Runs a script under an audit hook that logs every network attempt to $NETWORK_LOG.
AUDITED = f"""
import os, runpy, sys
log = open(os.environ["NETWORK_LOG"], "a")
def hook(event, args):
    if event in {NETWORK_EVENTS!r}:
        log.write(f"{{event}} {{args!r}}\\n")
        log.flush()
sys.addaudithook(hook)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def main(argv: list[str]) -> int:
    """``qarep-det train ARGV`` in-process, through the command that reports bad input (exit status 2)."""
    return cli_main(["train", *argv])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), n_train=16, n_val=8, imgsz=64, seed=0)


@pytest.fixture(scope="module")
def cli_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path, str]:
    """One tiny run of the CLI in a fresh process without the offline env set, every network attempt logged."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "hyp.yaml").write_text("plots: false\n")
    network_log = tmp / "network.log"
    network_log.touch()
    env = fresh_env(NETWORK_LOG=str(network_log))
    for name in ("YOLO_OFFLINE", "YOLO_AUTOINSTALL", "YOLO_CONFIG_DIR"):  # the tool must set them itself
        env.pop(name, None)
    argv = ["--cfg", QAREP_N, "--data", dataset, "--epochs", "1", "--imgsz", "64", "--batch", "8", "--workers", "0",
            "--device", "cpu", "--project", tmp / "runs", "--name", "cli", "--hyp", tmp / "hyp.yaml"]  # fmt: skip
    result = subprocess.run([sys.executable, "-c", AUDITED, TOOL, *map(str, argv)], env=env, cwd=tmp,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    return result, tmp / "runs" / "cli", network_log.read_text()


def test_cli_trains_offline_and_writes_the_run(cli_run: tuple) -> None:
    result, run, network = cli_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert network == "", f"network attempts during train+val:\n{network}"
    assert (run / "weights" / "best.pt").is_file() and (run / "weights" / "last.pt").is_file()
    assert results_epochs(run) == [1]
    assert f"done: {run}" in result.stdout


def test_checkpoint_validates_in_fresh_process_without_importing_qarep_det(cli_run: tuple, dataset: Path) -> None:
    _, run, _ = cli_run
    code = (
        "import sys\n"
        "from ultralytics import YOLO\n"
        "metrics = YOLO(sys.argv[1]).val(data=sys.argv[2], imgsz=64, batch=8, device='cpu', plots=False,\n"
        "                                project=sys.argv[3], name='val')\n"
        "assert 'qarep_det' in sys.modules  # imported by unpickling the checkpoint\n"
        "print('map50-95', metrics.box.map)\n"
    )
    argv = [run / "weights" / "best.pt", dataset, run.parent]
    result = subprocess.run([sys.executable, "-c", code, *map(str, argv)], env=fresh_env(), cwd=run.parent,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "map50-95 " in result.stdout


def test_trainer_classes_unpickle_in_fresh_interpreter_with_blocks_registered(tmp_path: Path) -> None:
    payloads = [pickle.dumps(QARepTrainer), cloudpickle.dumps(CustomL2Trainer)]
    assert all(b"qarep_det.ultralytics.trainer" in p for p in payloads)  # by reference, not by value
    for i, payload in enumerate(payloads):
        (tmp_path / f"{i}.pkl").write_bytes(payload)
    code = (
        "import pickle, sys\n"
        "classes = [pickle.loads(open(f, 'rb').read()) for f in sys.argv[2:]]\n"
        "assert 'qarep_det' in sys.modules\n"
        "from ultralytics.nn.tasks import DetectionModel\n"
        "model = DetectionModel(sys.argv[1], nc=2, verbose=False)\n"
        "print([c.__name__ for c in classes], type(model.model[0]).__name__)\n"
    )
    argv = [QAREP_N, tmp_path / "0.pkl", tmp_path / "1.pkl"]
    result = subprocess.run([sys.executable, "-c", code, *map(str, argv)], env=fresh_env(), cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "['QARepTrainer', 'CustomL2Trainer'] QARepBlock" in result.stdout


def test_ddp_worker_script_trains_our_model(dataset: Path, tmp_path: Path) -> None:
    """Ultralytics' generated DDP worker script, run as is: outside torchrun it trains in one process."""
    trainer = make_trainer(TrainOptions(cfg=QAREP_N, data=dataset, project=tmp_path, name="ddp", **TINY))
    script = generate_ddp_file(trainer)
    try:
        result = subprocess.run([sys.executable, script], env=fresh_env(), cwd=tmp_path, capture_output=True,
                                text=True, timeout=600)  # fmt: skip
    finally:
        ddp_cleanup(trainer, script)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (trainer.save_dir / "weights" / "best.pt").is_file() and results_epochs(trainer.save_dir) == [1]


def test_resume_finishes_an_interrupted_run(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """RepVGG with the custom L2 (an extra optimizer group must survive the checkpoint), stopped after epoch 1."""
    amp_checks = []
    check = qamp.check_amp_offline
    monkeypatch.setattr(qamp, "check_amp_offline", lambda model: amp_checks.append(model) or check(model))

    class Interrupted(Exception):
        pass

    def interrupt(trainer: QARepTrainer) -> None:
        if trainer.epoch == 0:
            raise Interrupted

    options = TrainOptions(cfg=REPVGG_N, data=dataset, project=tmp_path, name="resume", rep_l2="custom",
                           **{**TINY, "epochs": 2})  # fmt: skip
    with pytest.raises(Interrupted):
        train(options, callbacks={"on_model_save": [interrupt]})
    run = tmp_path / "resume"
    assert results_epochs(run) == [1]
    assert amp_checks and engine_trainer.check_amp is not qamp.check_amp_offline  # ours ran, then was undone

    resumed = train(TrainOptions(resume=run / "weights" / "last.pt", workers=0))
    assert type(resumed) is CustomL2Trainer and resumed.start_epoch == 1 and resumed.save_dir == run
    assert results_epochs(run) == [1, 2]
    with pytest.raises(InputError, match="holds no training state"):
        make_trainer(TrainOptions(resume=True, project=tmp_path))  # the newest last.pt is now a finished run's


def test_existing_run_directory_is_never_reused_without_exist_ok(dataset: Path, tmp_path: Path) -> None:
    options = TrainOptions(cfg=QAREP_N, data=dataset, project=tmp_path, name="run", **TINY)
    first = make_trainer(options).save_dir
    (first / "results.csv").write_text("kept\n")
    assert make_trainer(options).save_dir == tmp_path / "run-2"
    assert (first / "results.csv").read_text() == "kept\n"
    options.exist_ok = True
    assert make_trainer(options).save_dir == first


@pytest.fixture
def broken(dataset: Path, tmp_path: Path):
    """Copy the dataset, let the test break it, return the copy's data.yaml."""

    def copy(edit) -> Path:
        root = tmp_path / "broken"
        shutil.copytree(dataset.parent, root)
        yaml_path = root / "data.yaml"
        yaml_path.write_text(yaml_path.read_text().replace(str(dataset.parent), str(root)))
        edit(root)
        return yaml_path

    return copy


def _label(root: Path, text: str) -> None:
    (root / "labels" / "train" / "000003.txt").write_text(text)


BAD_DATA = {
    "no_train": (lambda r: (r / "data.yaml").write_text((r / "data.yaml").read_text().replace("train:", "#")),
                 "has no 'train:' entry"),
    "no_val": (lambda r: (r / "data.yaml").write_text((r / "data.yaml").read_text().replace("val:", "#")),
               "has no 'val:' entry"),
    "empty_image_folder": (lambda r: [p.unlink() for p in (r / "images" / "val").iterdir()], "val: no images in"),
    "class_out_of_range": (lambda r: _label(r, "0 0.5 0.5 0.2 0.2\n9 0.5 0.5 0.2 0.2\n"),
                           r"000003.txt' line 2: class 9 is not an integer in 0..5"),
    "wrong_field_count": (lambda r: _label(r, "0 0.5 0.5 0.2\n"), r"000003.txt' line 1: 4 fields"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_dataset_fails_with_one_line_and_writes_nothing(case: str, broken, tmp_path: Path, capsys) -> None:
    edit, message = BAD_DATA[case]
    data = broken(edit)
    argv = ["--cfg", str(QAREP_N), "--data", str(data), "--device", "cpu", "--project", str(tmp_path / "runs")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "runs").exists()


# a --hyp file that sets what it may not (the other bad flags: tests/test_cli.py's BAD_INPUT)
BAD_HYP = {
    "sets_a_flag": ({"epochs": 3}, "--hyp may not set what a flag sets: epochs --epochs"),
    "unknown_key": ({"lr": 0.1}, "unknown Ultralytics setting"),
    "bad_value": ({"lr0": "fast"}, "lr0"),
}


@pytest.mark.parametrize("case", list(BAD_HYP))
def test_a_bad_hyp_file_fails_with_one_line_and_writes_nothing(case: str, dataset: Path, tmp_path: Path, capsys):
    settings, message = BAD_HYP[case]
    hyp = tmp_path / "hyp.yaml"
    hyp.write_text("\n".join(f"{k}: {v}" for k, v in settings.items()))
    argv = ["--cfg", str(QAREP_N), "--data", str(dataset), "--project", str(tmp_path / "runs"), "--hyp", str(hyp)]
    assert main([*argv, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "runs").exists()


def test_cli_reports_bad_input_as_exit_status_in_a_real_process(dataset: Path, tmp_path: Path) -> None:
    argv = ["--cfg", QAREP_N, "--data", dataset, "--device", "gpu", "--project", tmp_path / "runs"]
    result = subprocess.run([sys.executable, TOOL, *map(str, argv)], env=fresh_env(), cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --device 'gpu' is not a device: use 'cpu', a CUDA index "
                                                  "'0' or indices '0,1,2,3'"]  # fmt: skip
    assert not (tmp_path / "runs").exists()


def test_help_shows_defaults_and_recipe(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for expected in ("(default: 300)", "(default: 640)", "(default: 32)", "(default: plain)", "optimizer=SGD",
                     "lr0=0.01", "momentum=0.937", "weight_decay=0.0005", "warmup_epochs=3.0"):  # fmt: skip
        assert expected in " ".join(out.split()), expected


def test_custom_l2_matches_hand_computation() -> None:
    block = randomize_bn(RepVGGBlock(3, 4))
    k3, k1 = block.branch_3x3[0].weight.detach(), block.branch_1x1[0].weight.detach()
    bn3, bn1 = block.branch_3x3[1].requires_grad_(False), block.branch_1x1[1].requires_grad_(False)
    expected = 0.0
    for o in range(4):
        t3 = float(bn3.weight[o] / torch.sqrt(bn3.running_var[o] + bn3.eps))
        t1 = float(bn1.weight[o] / torch.sqrt(bn1.running_var[o] + bn1.eps))
        for i in range(3):
            for u in range(3):
                for v in range(3):
                    if (u, v) != (1, 1):
                        expected += float(k3[o, i, u, v]) ** 2
            expected += (float(k3[o, i, 1, 1]) * t3 + float(k1[o, i, 0, 0]) * t1) ** 2 / (t3**2 + t1**2)
    assert float(block.custom_l2().detach()) == pytest.approx(expected, rel=1e-5)


def test_custom_l2_replaces_weight_decay_on_block_kernels(dataset: Path, tmp_path: Path) -> None:
    trainer = make_trainer(TrainOptions(cfg=REPVGG_N, data=dataset, project=tmp_path, rep_l2="custom", **TINY))
    model = trainer.model = randomize_bn(DetectionModel(str(REPVGG_N), nc=6, verbose=False)).train()
    decay = 5e-4
    optimizer = trainer.build_optimizer(model, name="SGD", lr=0.0, momentum=0.0, decay=decay)
    blocks = rep_blocks(model)
    kernels = {id(w) for b in blocks for w in (b.branch_3x3[0].weight, b.branch_1x1[0].weight)}
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    (l2_group,) = [g for g in optimizer.param_groups if g.get("param_group") == "rep_l2"]
    assert {id(p) for p in l2_group["params"]} == kernels and l2_group["weight_decay"] == 0
    assert not kernels & decayed and decayed  # every other conv weight still decays

    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # lr 0: the parameters stay, the pre-step hook adds the penalty's gradient
    block = blocks[0]
    k3, k1 = block.branch_3x3[0].weight, block.branch_1x1[0].weight
    g3, g1 = torch.autograd.grad(block.custom_l2(), [k3, k1])
    torch.testing.assert_close(k3.grad, 0.5 * decay * g3)
    torch.testing.assert_close(k1.grad, 0.5 * decay * g1)
    ring = torch.ones_like(k3, dtype=torch.bool)
    ring[:, :, 1, 1] = False
    torch.testing.assert_close(k3.grad[ring], decay * k3.detach()[ring])  # plain decay off the centre


def test_offline_amp_check_compares_autocast_with_fp32() -> None:
    model = DetectionModel(str(QAREP_N), nc=2, verbose=False)
    assert qamp.amp_matches_fp32(model, imgsz=64)  # CPU autocast runs FP16 convs too
    overflowing = torch.nn.Conv2d(3, 2, 1)
    torch.nn.init.constant_(overflowing.weight, 1e5)
    assert not qamp.amp_matches_fp32(overflowing, imgsz=64)  # FP16 overflows to inf
    assert not qamp.check_amp_offline(model)  # no AMP on CPU, as in Ultralytics


@pytest.mark.parametrize(
    "cfg", ["yolo_qarepv2_n.yaml", "yolov7_tiny_qarep.yaml", "yolov7_tiny_repvgg.yaml", "yolov7_qarep.yaml",
            "yolov7_repvgg.yaml"],
)  # fmt: skip
def test_new_models_train_fuse_export_and_quantize(cfg: str, dataset: Path, tmp_path: Path) -> None:
    """Each new YAML, by its shipped name: one tiny epoch, then the fused export (checked against the trained model
    on real images) and the simulated INT8 model with its scheme verified."""
    from qarep_det.quant.backends.simulated import quantize_torch
    from qarep_det.quant.calibration import calibration_set
    from qarep_det.quant.recipe import QuantRecipe
    from qarep_det.reparam import reparameterize_model
    from qarep_det.ultralytics.checkpoint import load_detector
    from qarep_det.ultralytics.export import export

    trainer = train(TrainOptions(cfg=Path(cfg), data=dataset, project=tmp_path, **{**TINY, "hyp": {"plots": False}}))
    path, diff = export(trainer.last, "onnx", imgsz=64, data=dataset)
    assert path.is_file() and diff.max_rel < 1e-4
    fused = reparameterize_model(load_detector(trainer.last))
    calib = calibration_set(dataset, 64, n=4, batch_size=4, progress=False)
    quantized = quantize_torch(fused, calib, QuantRecipe(calib_images=4))  # raises if the scheme deviates
    images = next(iter(calib))
    assert torch.isfinite(quantized(images)[0]).all()
