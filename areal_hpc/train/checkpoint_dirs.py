"""Which checkpoints of a run are complete, without torch: the run's owner names the one a trainer resumes from."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import List, Optional

log = logging.getLogger(__name__)

LATEST = "latest"
_NAME = re.compile(r"^step_(\d{8,})$")


def complete_checkpoints(root: Path) -> List[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / "meta.json").exists()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The checkpoint named by ``latest``, else the newest complete one, else None."""
    marker = root / LATEST
    if marker.exists():
        path = root / marker.read_text().strip()
        if (path / "meta.json").exists():
            return path
        log.warning("%s names %s, which is incomplete; falling back to the newest complete checkpoint", marker, path)
    done = complete_checkpoints(root)
    return done[-1] if done else None
