"""Writing files so that an interruption never leaves a half-written one."""
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Union


def write_json_atomic(path: Union[str, Path], payload: Any) -> None:
    """Writes ``payload`` as JSON to a temporary file beside ``path``, then renames it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                     delete=False) as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(handle.name, path)
