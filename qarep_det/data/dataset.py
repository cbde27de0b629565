"""Data YAMLs resolved exactly as Ultralytics resolves them, but never downloading anything."""

from __future__ import annotations

import os
from typing import Any

from ultralytics.data.utils import check_det_dataset


def resolve_dataset(data: str | os.PathLike, split: str = "") -> dict[str, Any]:
    """Ultralytics' ``check_det_dataset`` with its download switched off, for every tool that reads a data YAML.

    A data YAML's ``download:`` entry runs when a split is missing (COCO's is a Python script that fetches about
    20 GB), so a wrong path must fail instead. Ultralytics' not-found message adds a second line about its download
    folder; only the first, which names the missing path, is kept, so tools print one error line.
    """
    try:
        return check_det_dataset(str(data), autodownload=False, split=split)
    except FileNotFoundError as e:
        raise FileNotFoundError(str(e).strip().split("\n", 1)[0]) from e
