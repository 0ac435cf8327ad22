"""Reading datasets: JSON-lines records and plain-text corpora, with errors that name the file and line.

One reader serves train.py (fine-tuning pairs, GSG documents) and generate.py (--file input), so a bad
line gets the same one-line message everywhere.
"""

import json
import re
from pathlib import Path


def read_records(path, keys: tuple[str, ...]) -> list[dict]:
    """The JSON objects on the lines of a JSON-lines file (blank lines skipped), each checked to have the
    string fields `keys`. Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    rows = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 etc., which splitlines() cuts at.
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object with fields {', '.join(keys)}")
        for k in keys:
            if k not in row:
                raise ValueError(f"{path}:{n}: missing field {k!r}")
            if not isinstance(row[k], str) or not row[k].strip():
                raise ValueError(f"{path}:{n}: field {k!r} must be a non-empty string")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no examples")
    return rows


def read_jsonl(path, keys: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The string fields `keys` of every line of a JSON-lines file, as tuples."""
    return [tuple(row[k] for k in keys) for row in read_records(path, keys)]


def read_documents(path) -> list[str]:
    """Raw text for GSG: a .jsonl file with a "text" field per line, or a text file in which documents
    are separated by blank lines (the lines of one document are joined with spaces)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return [text for (text,) in read_jsonl(path, ("text",))]
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    docs = [d for d in (" ".join(p.split()) for p in re.split(r"\n\s*\n", path.read_text(encoding="utf-8"))) if d]
    if not docs:
        raise ValueError(f"{path}: no documents")
    return docs
