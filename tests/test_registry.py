"""One registry of YAML modules: exports, Ultralytics' parser and the README table all follow it; import effects."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn
from ultralytics.nn.tasks import DetectionModel

import qarep_det
import qarep_det.nn as qnn
from qarep_det.nn.registry import YAML_MODULES, yaml_module

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_module_names(text: str) -> set[str]:
    """The backticked names in the first column of the table under README's ``## Modules`` heading."""
    section = re.search(r"^## Modules\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert section, "README has no '## Modules' section"
    rows = [line for line in section.group(1).splitlines() if line.startswith("|")][2:]  # header and rule
    assert rows, "README's '## Modules' section has no table"
    return {name for row in rows for name in re.findall(r"`([^`]+)`", row.split("|")[1])}


def test_readme_module_table_lists_exactly_the_registry() -> None:
    assert readme_module_names(README.read_text()) == set(YAML_MODULES)


def test_readme_table_check_sees_a_missing_row() -> None:
    text = README.read_text()
    dropped = re.sub(r"^\|[^\n]*`SPPCSPC`[^\n]*\n", "", text, flags=re.M)
    assert dropped != text and readme_module_names(dropped) == set(YAML_MODULES) - {"SPPCSPC"}


def test_registry_holds_our_yaml_modules_and_the_packages_export_them() -> None:
    assert len(YAML_MODULES) == 18
    stages = {"QARepStage", "QARepStageV2", "RepVGGStage", "QARepCSPStage", "QARepCSPStageV2", "RepVGGCSPStage"}
    stages |= {"RepVGGNoIdBNStage", "RepVGGNoIdBNCSPStage", "QARepNoPostBNStage", "QARepNoPostBNCSPStage"}
    assert {name for name, m in YAML_MODULES.items() if m.repeats} == stages
    for name, module in YAML_MODULES.items():
        assert module.cls.__name__ == name
        assert getattr(qnn, name) is module.cls and getattr(qarep_det, name) is module.cls
        assert name in qnn.__all__ and name in qarep_det.__all__


def test_a_block_registered_in_one_place_scales_like_conv_in_a_yaml() -> None:
    @yaml_module
    class UserBlock(nn.Module):
        def __init__(self, c1: int, c2: int, s: int = 1) -> None:
            super().__init__()
            self.conv = nn.Conv2d(c1, c2, 3, s, 1)

        def forward(self, x):
            return self.conv(x)

    try:
        cfg = {
            "nc": 2,
            "width_multiple": 0.25,
            "depth_multiple": 0.33,
            "backbone": [[-1, 1, "Conv", [64, 3, 2]], [-1, 1, "UserBlock", [128, 2]], [-1, 1, "Conv", [128, 3, 1]]],
            "head": [[[-1], 1, "Detect", ["nc"]]],
        }
        model = DetectionModel(cfg, ch=3, verbose=False)
        block, after = model.model[1], model.model[2]
        assert isinstance(block, UserBlock)
        assert (block.conv.in_channels, block.conv.out_channels) == (16, 32) == (16, after.conv.in_channels)
    finally:
        del YAML_MODULES["UserBlock"]


def test_a_name_means_one_class() -> None:
    with pytest.raises(ValueError, match="'QARepBlock' is taken by qarep_det.nn.blocks.QARepBlock"):
        yaml_module(type("QARepBlock", (nn.Module,), {}))
    assert YAML_MODULES["QARepBlock"].cls is qnn.QARepBlock


def test_importing_nn_does_what_the_architecture_page_says(tmp_path: Path) -> None:
    """docs/architecture.md, 'What importing qarep_det does': any module of the package runs the package init, which
    registers with Ultralytics and changes nothing else (the user's own settings as they were, none added, no font
    written, telemetry not blocked). The user here set YOLO_OFFLINE themselves: this test reaches no network."""
    script = (
        "import json, os, sys\n"
        "import qarep_det.nn\n"
        "from ultralytics.nn import tasks\n"
        "from ultralytics.utils import checks\n"
        "print(json.dumps({\n"
        "  'env': {k: os.environ.get(k) for k in ('YOLO_OFFLINE', 'YOLO_AUTOINSTALL', 'HF_HUB_OFFLINE',\n"
        "                                         'HF_HUB_DISABLE_TELEMETRY', 'YOLO_CONFIG_DIR')},\n"
        "  'ultralytics_loaded': 'ultralytics' in sys.modules,\n"
        "  'telemetry_blocked': 'openvino_telemetry' in sys.modules and sys.modules['openvino_telemetry'] is None,\n"
        "  'wrapped': [hasattr(f, '__qarep_wrapped__') for f in (tasks.parse_model, tasks.BaseModel.fuse,\n"
        "              tasks.BaseModel.is_fused, checks.check_file)],\n"
        "}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YOLO_", "HF_HUB_"))}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), YOLO_OFFLINE="1", YOLO_AUTOINSTALL="1")  # the user's own
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["env"] == {
        "YOLO_OFFLINE": "1",
        "YOLO_AUTOINSTALL": "1",
        "HF_HUB_OFFLINE": None,
        "HF_HUB_DISABLE_TELEMETRY": None,
        "YOLO_CONFIG_DIR": None,
    }
    assert seen["ultralytics_loaded"] and not seen["telemetry_blocked"] and not (tmp_path / "cache").exists()
    assert seen["wrapped"] == [True] * 4
