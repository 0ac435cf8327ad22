"""generate.py --file docs.jsonl --output out.jsonl: sharded under torchrun, resumable after a kill.

A tiny random PEGASUS with the 40-piece test vocabulary (tiny_checkpoints.py, no ../shared), its
embeddings and cross-attention scaled up so that different documents get different summaries.
Every run is a subprocess with one thread (OMP_NUM_THREADS=1), time-bound; torchrun starts 2 gloo
processes on 127.0.0.1. The reference is a plain `python generate.py` run (one process, no torchrun).
A run is killed for real (SIGKILL, no clean-up) by the hidden GENERATE_KILL_AFTER_BATCHES, at a
known point: after that process has written that many batches.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from tiny_checkpoints import CORPUS, tiny_model, tiny_spiece

import generate
from load_weights import save_model
from resumable import part_path, part_paths
from tokenizer import OFFSET, PegasusTokenizer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "generate.py"
BATCH = 2
# 23 documents of 1 to 12 words (5 to 63 tokens, some lengths twice) in an order unrelated to their
# lengths: 12 length-sorted batches of 2 (the last one of 1), dealt out round-robin to the processes.
WORDS = " ".join(CORPUS[:4]).split()
RECORDS = [{"id": i, "text": " ".join(WORDS[(5 * i) % 11: (5 * i) % 11 + 1 + (7 * i) % 12])} for i in range(23)]

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch build has no torch.distributed with gloo")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    (path / "spiece.model").write_bytes(tiny_spiece())
    tokenizer = PegasusTokenizer.from_spiece(path / "spiece.model")
    model = tiny_model("pegasus", seed=2)
    with torch.no_grad():
        cross = model.decoder.layers[0].encoder_attn  # louder cross-attention: the input shows in the summary
        cross.v_proj.weight.mul_(10)
        cross.out_proj.weight.mul_(10)
        model.final_logits_bias[0, :OFFSET] = -1000.0  # only real pieces, no EOS: 4 tokens per summary
    save_model(model, path, tokenizer)
    return path


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(nproc: int, checkpoint, docs, output, kill_after: int = 0) -> subprocess.CompletedProcess:
    """generate.py on `docs` into `output`: nproc 0 is a plain `python generate.py`, else torchrun."""
    launcher = [] if nproc == 0 else ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                                      "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    cmd = [sys.executable, *launcher, str(SCRIPT), "--model", str(checkpoint), "--file", str(docs),
           "--output", str(output), "--batch-size", str(BATCH)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GENERATE_KILL_AFTER_BATCHES": str(kill_after)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)


def part_rows(output) -> list[dict]:
    """The complete lines of the part files (a line a kill cut short has no newline yet)."""
    return [json.loads(line) for p in part_paths(output) for line in p.read_text().split("\n")[:-1]]


@pytest.fixture(scope="module")
def single(checkpoint, docs, tmp_path_factory):
    """The reference: one plain process, no torchrun. Its file's bytes."""
    output = tmp_path_factory.mktemp("single") / "out.jsonl"
    done = run(0, checkpoint, docs, output)
    assert done.returncode == 0, done.stderr[-3000:]
    return output.read_bytes()


def test_single_process_output(single, checkpoint):
    rows = [json.loads(line) for line in single.decode().splitlines()]
    assert [{k: v for k, v in r.items() if k != "summary"} for r in rows] == RECORDS  # every record, in order
    summaries = [r["summary"] for r in rows]
    assert len(set(summaries)) >= 5  # documents get different summaries: a mix-up would show
    # The same summaries as summarize() on the whole list (the API, in this process).
    assert summaries == generate.summarize([r["text"] for r in RECORDS], generate.load(checkpoint), batch_size=BATCH)


@needs_gloo
def test_two_processes_write_the_single_process_file(single, checkpoint, docs, tmp_path):
    output = tmp_path / "out.jsonl"
    done = run(2, checkpoint, docs, output)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert output.read_bytes() == single
    assert os.listdir(tmp_path) == ["out.jsonl"]  # the parts were merged and removed


@needs_gloo
def test_killed_two_process_run_resumes_in_one_process(single, checkpoint, docs, tmp_path):
    output = tmp_path / "out.jsonl"
    killed = run(2, checkpoint, docs, output, kill_after=2)  # each process dies after its 2nd batch
    assert killed.returncode != 0 and not output.exists()
    rows = part_rows(output)
    # The process that died first wrote its 2 batches (4 records); torchrun then stopped the other,
    # somewhere up to its own 2 batches; 12 batches were to do.
    assert 4 <= len(rows) <= 8 and len({r["index"] for r in rows}) == len(rows)
    with open(part_path(output, 0), "a") as f:  # and a line torn by the kill, as a kill mid-write leaves
        f.write('{"index": 22, "key": "0123')
    resumed = run(0, checkpoint, docs, output)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming: {len(rows)} of {len(RECORDS)} records are already summarized" in resumed.stderr
    assert output.read_bytes() == single  # each record once, in order, as the uninterrupted run wrote it
    assert os.listdir(tmp_path) == ["out.jsonl"]


@needs_gloo
def test_killed_single_process_run_resumes_in_two_processes(single, checkpoint, docs, tmp_path):
    output = tmp_path / "out.jsonl"
    killed = run(0, checkpoint, docs, output, kill_after=3)
    assert killed.returncode == -9 and not output.exists()  # SIGKILL
    assert sorted(r["index"] for r in part_rows(output)) == sorted(i for b in batches(checkpoint)[:3] for i in b)
    resumed = run(2, checkpoint, docs, output)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming: 6 of {len(RECORDS)} records are already summarized" in resumed.stderr
    assert output.read_bytes() == single
    assert os.listdir(tmp_path) == ["out.jsonl"]


def batches(checkpoint) -> list[list[int]]:
    """The length-sorted batches one process decodes (no truncation: the texts are short)."""
    tok = PegasusTokenizer.from_spiece(checkpoint / "spiece.model")
    return generate.length_batches([len(tok.encode(r["text"])) for r in RECORDS], BATCH)


def main(capsys, *args) -> tuple[int, str, str]:
    try:
        code = generate.main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_resume_summarizes_only_what_is_left(single, checkpoint, docs, tmp_path, capsys, monkeypatch):
    """In this process: a run that fails at its 4th batch keeps the 3 it wrote; a run with other
    settings refuses those parts before loading; the rerun decodes only the other batches."""
    output, real, seen = tmp_path / "out.jsonl", generate.summarize, []

    def failing_4th(texts, *a, **kw):
        if len(seen) == 3:
            raise ValueError("the machine fell over")
        seen.append(list(texts))
        return real(texts, *a, **kw)

    monkeypatch.setattr(generate, "summarize", failing_4th)
    code, _, err = main(capsys, "--model", checkpoint, "--file", docs, "--output", output, "--batch-size", BATCH)
    assert code == 1 and err.endswith("error: the machine fell over\n") and not output.exists()
    order = batches(checkpoint)
    assert seen == [[RECORDS[i]["text"] for i in b] for b in order[:3]]
    assert sorted(r["index"] for r in part_rows(output)) == sorted(i for b in order[:3] for i in b)

    monkeypatch.setattr(generate, "load", lambda *a, **k: pytest.fail("loaded a model to refuse the parts"))
    code, out, err = main(capsys, "--model", checkpoint, "--file", docs, "--output", output, "--batch-size", BATCH,
                          "--num-beams", 1)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "comes from other data or other settings than this run's; delete the" in err
    monkeypatch.undo()

    seen.clear()
    counting = lambda texts, *a, **kw: seen.append(list(texts)) or real(texts, *a, **kw)
    monkeypatch.setattr(generate, "summarize", counting)
    code, _, err = main(capsys, "--model", checkpoint, "--file", docs, "--output", output, "--batch-size", BATCH)
    assert code == 0, err
    assert seen == [[RECORDS[i]["text"] for i in b] for b in order[3:]]  # nothing twice
    assert output.read_bytes() == single and os.listdir(tmp_path) == ["out.jsonl"]


def test_under_torchrun_only_a_jsonl_file_into_an_output(checkpoint, docs, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")  # what torchrun sets; refused before any process group is joined
    for args in (["Some text."], ["--file", docs]):
        code, out, err = main(capsys, "--model", checkpoint, *args)
        assert code == 2 and out == ""
        assert err == "error: under torchrun, give a .jsonl --file and an --output: the processes share its records\n"
