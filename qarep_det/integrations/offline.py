"""Keep every dependency off the network: offline flags, a local font and no telemetry, set before they load.

Ultralytics checks for fonts (Arial.ttf, Arial.Unicode.ttf) on every dataset check and downloads them when
missing; it also pip-installs missing packages unless told not to. Neither may happen here, so we set the
environment before the first ``import ultralytics`` and give it matplotlib's DejaVuSans under the names it
looks for. A user's own settings always win (``setdefault``).

Telemetry: NNCF and OpenVINO's converter (``openvino.tools.ovc``) report usage to Google Analytics through the
``openvino_telemetry`` package. Without a consent file they send (NNCF asks for no consent at all), and they stay quiet
only when they detect CI (``CI=true``, ``TF_BUILD``, ``JENKINS_URL``; NNCF also ``NNCF_CI`` or an imported pytest), so a
test suite never notices (tests/test_offline.py runs the tools outside CI under an audit hook). Both import the package
inside ``try/except ImportError`` and fall back to their own no-op stubs, so marking it unimportable
(``sys.modules[name] = None``) turns telemetry off for this process and its forked children, and nothing else. That is
preferred over the documented opt-out (``opt_in_out --opt_out``), which writes the user's global consent file and so
changes other programs too. If the package was imported first (``import openvino`` does), it is too late to block, and
we say so with a warning.

ModelOpt imports ``huggingface_hub``, which reaches the Hub (downloads, telemetry) whenever something calls it;
``HF_HUB_OFFLINE=1`` and ``HF_HUB_DISABLE_TELEMETRY=1`` rule both out (again only where the user set nothing).
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from pathlib import Path

FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")
TELEMETRY_MODULE = "openvino_telemetry"  # used by NNCF and OpenVINO's model converter
OFFLINE_ENV = {
    "YOLO_OFFLINE": "1",
    "YOLO_AUTOINSTALL": "0",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


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


def block_telemetry() -> bool:
    """Make ``openvino_telemetry`` unimportable in this process; True if blocked, False (with a warning) when it
    was imported already and NNCF / OpenVINO may have bound it."""
    if sys.modules.get(TELEMETRY_MODULE) is not None:
        warnings.warn(
            f"{TELEMETRY_MODULE} was imported before qarep_det (e.g. by 'import openvino'), so NNCF and OpenVINO's "
            "converter may send usage telemetry from this process; import qarep_det first to prevent it",
            stacklevel=3,
        )
        return False
    sys.modules[TELEMETRY_MODULE] = None
    return True


def configure_offline() -> Path:
    """Set the offline variables (unless set), block OpenVINO telemetry and install the local font.

    Returns the Ultralytics config dir in use. Must run before ``ultralytics``, ``openvino`` or ``nncf`` is
    imported to take full effect.
    """
    for name, value in OFFLINE_ENV.items():
        os.environ.setdefault(name, value)
    block_telemetry()
    config_dir = Path(os.environ.setdefault("YOLO_CONFIG_DIR", str(default_config_dir())))
    _install_fonts(config_dir)
    return config_dir
