"""Resumable, ordered JSON-lines output: what a long job has finished survives a kill at any moment.

generate.py (summarizing a corpus, one process or many under torchrun) and evaluate.py write their
results through these few functions. The rules that make a kill harmless:

  * A result is a line, appended and then flushed and fsynced (append_lines): once the call
    returns, the line is on disk. A kill can only cut the LAST line short (no newline yet):
    complete_lines() ignores such a torn line, and cut_torn_line() removes it before anything is
    appended after it.
  * The final output is replaced in one rename (write_atomically): readers see the old file or the
    whole new one, never half of it.

Several processes cannot append to one file in input order, so a sharded run keeps its progress in
part files beside the output, one per process (`.out.jsonl.part-0`, `.part-1`, ...). Each line of a
part is {"index": i, "key": k, "result": r}: the input record's position, a fingerprint of the record
and the settings (a part from other data or other flags is refused, not merged), and the result.
Every process reads all parts (whatever world size wrote them) to know what is done; each appends
to its own; at the end process 0 merges them in input order into the output and removes them.
"""

import hashlib
import json
import os
import tempfile
from pathlib import Path


def complete_lines(path: Path) -> list[str]:
    """The newline-terminated lines of a UTF-8 file, without their newlines. A last line without its
    newline was cut short by a kill mid-write: it is not one of them."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    complete, newline, _ = data.rpartition(b"\n")  # after the last newline: a torn line, or nothing
    try:  # a torn line may end inside a UTF-8 character; complete lines may not
        return complete.decode("utf-8").split("\n") if newline else []
    except UnicodeDecodeError as e:
        raise ValueError(f"cannot read {path}: not UTF-8 ({e.reason})") from None


def cut_torn_line(path: Path):
    """Remove a torn last line from the file, so that what is appended next starts a line of its own."""
    with open(path, "r+b") as f:
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)  # 0 when there is no complete line at all


def append_lines(f, lines: list[str]):
    """Append lines to the open text file f and make them durable before returning."""
    f.write("".join(line + "\n" for line in lines))
    f.flush()
    os.fsync(f.fileno())


def write_atomically(path: Path, text: str):
    """Write to a temporary file beside `path`, then rename: readers see the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it the output
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------- part files


def record_keys(records: list, settings: dict) -> list[str]:
    """A short fingerprint of each input record together with the settings that shape its result:
    what a part line must match to count as done."""
    flags = json.dumps(settings, sort_keys=True, default=str)
    return [hashlib.sha256(json.dumps(r, sort_keys=True, ensure_ascii=False).encode() + flags.encode())
            .hexdigest()[:16] for r in records]


def part_path(output: Path, rank: int) -> Path:
    return output.parent / f".{output.name}.part-{rank}"


def part_paths(output: Path) -> list[Path]:
    """The part files of `output`, from any earlier world size."""
    return sorted(p for p in output.parent.glob(f".{output.name}.part-*") if p.name.rpartition("-")[2].isdigit())


def read_parts(output: Path, keys: list[str]) -> dict[int, str]:
    """{index: result} of the records the part files of `output` hold, checked against `keys`
    (record_keys of the input). Torn last lines are ignored; a record found twice counts once."""
    done = {}
    for path in part_paths(output):
        for n, line in enumerate(complete_lines(path), start=1):
            try:
                row = json.loads(line)
                i, key, result = row["index"], row["key"], row["result"]
            except (json.JSONDecodeError, TypeError, KeyError):
                raise ValueError(f"{path}:{n}: not a part line of {output.name}; delete it to start again") from None
            if not (isinstance(i, int) and 0 <= i < len(keys) and key == keys[i] and isinstance(result, str)):
                raise ValueError(f"{path}:{n}: comes from other data or other settings than this run's; "
                                 f"delete the {part_path(output, '*').name} files to start again")
            done.setdefault(i, result)
    return done


class PartWriter:
    """This process's part file: results appended as {"index", "key", "result"} lines, durable per call.
    Opened on the first write (a process with nothing to do leaves no file); a torn last line that a
    killed run left in it is cut off first."""

    def __init__(self, output: Path, rank: int, keys: list[str]):
        self.path, self.keys, self.file = part_path(output, rank), keys, None

    def write(self, indices: list[int], results: list[str]):
        if self.file is None:
            if self.path.exists():
                cut_torn_line(self.path)
            self.file = open(self.path, "a", encoding="utf-8")
        append_lines(self.file, [json.dumps({"index": i, "key": self.keys[i], "result": r}, ensure_ascii=False)
                                 for i, r in zip(indices, results)])

    def close(self):
        if self.file is not None:
            self.file.close()


def merge_parts(output: Path, keys: list[str], line) -> None:
    """Write `output` from the parts, line(i, result) for every record in input order, in one
    rename; then remove the parts. A record missing from them is an error (with several machines:
    the output's directory must be one they all share), and nothing is written."""
    done = read_parts(output, keys)
    missing = [i for i in range(len(keys)) if i not in done]
    if missing:
        raise ValueError(f"--output {output}: {len(missing)} of {len(keys)} records are in no part file "
                         f"(the first: record {missing[0] + 1}); with several machines, --output must be on a "
                         "file system they all share")
    write_atomically(output, "".join(line(i, done[i]) + "\n" for i in range(len(keys))))
    for path in part_paths(output):  # after the rename: a kill here leaves parts that merge to the same file
        path.unlink()
