"""Keep Ultralytics off the network: offline flags and a local font, set before it is imported.

Ultralytics checks for fonts (Arial.ttf, Arial.Unicode.ttf) on every dataset check and downloads them when
missing; it also pip-installs missing packages unless told not to. Neither may happen here, so we set the
environment before the first ``import ultralytics`` and give it matplotlib's DejaVuSans under the names it
looks for. A user's own settings always win (``setdefault``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")


def default_config_dir() -> Path:
    """Where qarep_det keeps the Ultralytics config dir when the user set none."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "qarep_det" / "yolo_config"


def _install_fonts(config_dir: Path) -> None:
    """Copy a bundled TTF under the names Ultralytics' ``check_font`` looks for, if they are missing."""
    target = config_dir / "Ultralytics"
    if all((target / name).exists() for name in FONT_NAMES):
        return
    import matplotlib  # an Ultralytics dependency that ships DejaVuSans

    source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    target.mkdir(parents=True, exist_ok=True)
    for name in FONT_NAMES:
        if not (target / name).exists():
            tmp = target / f".{name}.{os.getpid()}"
            shutil.copyfile(source, tmp)
            os.replace(tmp, target / name)  # atomic: parallel processes never see half a font


def configure_offline() -> Path:
    """Set YOLO_OFFLINE, YOLO_AUTOINSTALL and YOLO_CONFIG_DIR (unless set) and install the local font.

    Returns the config dir in use. Must run before ``ultralytics`` is imported to take full effect.
    """
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "0")
    config_dir = Path(os.environ.setdefault("YOLO_CONFIG_DIR", str(default_config_dir())))
    _install_fonts(config_dir)
    return config_dir
