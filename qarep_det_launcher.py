"""The process set-up of qarep_det's own tools: offline Ultralytics and Hugging Face, a local font, no telemetry.

This module lies beside the ``qarep_det`` package, not in it, on purpose. Ultralytics reads ``YOLO_OFFLINE``,
``YOLO_AUTOINSTALL`` and ``YOLO_CONFIG_DIR`` once, when it is first imported (``ultralytics/utils/__init__.py``: with
``YOLO_OFFLINE`` unset that import resolves two public DNS names), and ``import qarep_det`` imports Ultralytics to
register our blocks. So our tools must set the environment before anything under ``qarep_det`` is imported, which
no module inside the package can do (Python runs the package's ``__init__`` first), while a user's own
``import qarep_det`` must leave their process as it was: their downloads keep working. The ``qarep-det`` command,
``python -m qarep_det_launcher``, the scripts in ``tools/`` and the test suite call :func:`configure_offline`; the
package never does.

Ultralytics checks for fonts (Arial.ttf, Arial.Unicode.ttf) on every dataset check and downloads them when missing,
and pip-installs missing packages unless told not to: the environment rules out both, and matplotlib's DejaVuSans
stands in for the fonts. A user's own settings always win (``setdefault``).

Telemetry: NNCF and OpenVINO's converter (``openvino.tools.ovc``) report usage to Google Analytics through the
``openvino_telemetry`` package. Without a consent file they send (NNCF asks for no consent at all), and they stay quiet
only when they detect CI (``CI=true``, ``TF_BUILD``, ``JENKINS_URL``; NNCF also ``NNCF_CI`` or an imported pytest), so a
test suite never notices (tests/test_offline.py runs the tools outside CI under an audit hook). Both import the package
inside ``try/except ImportError`` and fall back to their own no-op stubs, so marking it unimportable
(``sys.modules[name] = None``) turns telemetry off for the tool's process and its forked children, and nothing else.
That is preferred over the documented opt-out (``opt_in_out --opt_out``), which writes the user's global consent file
and so changes other programs too.

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
    """Where our tools keep the Ultralytics config dir when the user set none."""
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
            f"{TELEMETRY_MODULE} was imported before the offline set-up (e.g. by 'import openvino'), so NNCF and "
            "OpenVINO's converter may send usage telemetry from this process",
            stacklevel=3,
        )
        return False
    sys.modules[TELEMETRY_MODULE] = None
    return True


def configure_offline() -> Path:
    """Set the offline variables (unless set), block OpenVINO telemetry and install the local font.

    Returns the Ultralytics config dir in use. Must run before ``ultralytics`` (so before ``qarep_det``), ``openvino``
    or ``nncf`` is imported to take full effect.
    """
    for name, value in OFFLINE_ENV.items():
        os.environ.setdefault(name, value)
    block_telemetry()
    config_dir = Path(os.environ.setdefault("YOLO_CONFIG_DIR", str(default_config_dir())))
    _install_fonts(config_dir)
    return config_dir


def run_tool(command: str | None = None, argv: list[str] | None = None, prog: str | None = None) -> int:
    """Set up this process for our tools, then run ``qarep-det [command] argv`` (``prog``: the name ``--help``
    shows, e.g. ``tools/train.py``); returns the exit status."""
    configure_offline()
    from qarep_det.cli.main import main as cli_main

    argv = sys.argv[1:] if argv is None else list(argv)
    return cli_main([command, *argv] if command else argv, prog=prog)


def main() -> int:
    """The ``qarep-det`` console command."""
    return run_tool()


if __name__ == "__main__":
    sys.exit(main())
