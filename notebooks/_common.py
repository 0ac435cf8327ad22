"""Set-up shared by the notebooks: where the code, the reference material and a checkpoint are.

Each notebook's first code cell does `from _common import ...`; Jupyter and the test suite run the
notebooks with notebooks/ as the working directory, so this file is importable from there.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository: pegasus.py, tokenizer.py, ... live here
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the modules are flat files at the root, not an installed package

SHARED = ROOT.parent / "shared"  # reference material beside the repository (not in it): ../shared/README.md

# A published checkpoint on disk, in the Hugging Face layout (config.json, model.safetensors, spiece.model), e.g.
# PEGASUS_CHECKPOINT=~/ckpt/google-pegasus-xsum jupyter lab. Unset: the notebooks use a small random model.
CHECKPOINT = Path(os.environ["PEGASUS_CHECKPOINT"]).expanduser() if os.environ.get("PEGASUS_CHECKPOINT") else None
if CHECKPOINT is not None and not (CHECKPOINT / "config.json").is_file():
    raise FileNotFoundError(f"PEGASUS_CHECKPOINT={CHECKPOINT} is not a checkpoint directory (no config.json in it)")


def shared_file(*parts: str) -> Path:
    """A file in ../shared, or a clear error saying what is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: this notebook needs the reference material that lives beside "
                                f"the repository (../shared), or a checkpoint named by PEGASUS_CHECKPOINT")
    return path
