"""The summarization CLI (`python generate.py ...`) and summarize(), on a tiny saved checkpoint.

The checkpoint has the real PEGASUS vocabulary (../shared/pegasus/spiece.model) and a 16-wide
random model whose logit bias makes it write "Summary" until the length limit forces EOS, so the
expected output is known without running the model. Decoding itself is tested in test_generate.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate

SCRIPT = Path(__file__).resolve().parents[1] / "generate.py"
EXPECTED = "Summary Summary Summary Summary"  # max_length 6 = start + 4 tokens + forced EOS


def cli(*args, stdin: str | None = "", env: dict | None = None):
    """Run generate.py; returns (exit status, stdout, stderr)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    r = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], input=stdin, capture_output=True, text=True,
                       env=env, timeout=120)
    return r.returncode, r.stdout, r.stderr


def test_help():
    code, out, _ = cli("--help")
    assert code == 0
    for option in ("--model", "--revision", "--file", "--output", "--num-beams", "--max-new-tokens", "--length-penalty",
                   "--dtype",
                   "--device", "--batch-size", "--verbose", "examples:"):
        assert option in out


def test_text_argument_and_verbose(checkpoint):
    code, out, err = cli("--model", checkpoint, "--verbose", "The council voted on Tuesday to close the old bridge.")
    assert (code, out) == (0, EXPECTED + "\n")
    assert "loaded" in err and "tokens/s" in err and "peak memory" in err


def test_stdin(checkpoint):
    code, out, _ = cli("--model", checkpoint, "--num-beams", "1", stdin="A document arriving on standard input.\n")
    assert (code, out) == (0, EXPECTED + "\n")


def test_max_new_tokens_option(checkpoint):
    code, out, _ = cli("--model", checkpoint, "--max-new-tokens", "3", "Some text.")
    assert (code, out) == (0, "Summary Summary\n")  # 2 tokens, then the forced EOS


def test_text_file_is_one_document(checkpoint, tmp_path):
    src = tmp_path / "docs.txt"
    src.write_text("First paragraph.\n\nSecond paragraph, longer than the first one.\nThird line.\n")
    code, out, _ = cli("--model", checkpoint, "--file", src)
    assert (code, out) == (0, EXPECTED + "\n")  # one summary for the whole file, not one per line
    code, out, _ = cli("--model", checkpoint, "--file", src, "--output", tmp_path / "out.txt")
    assert (code, out) == (0, "")
    assert (tmp_path / "out.txt").read_text() == EXPECTED + "\n"


def test_jsonl_file_with_progress_bar(checkpoint, tmp_path):
    src = tmp_path / "docs.jsonl"
    records = [{"id": i, "text": f"Document number {i} says something."} for i in range(3)]
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    code, out, err = cli("--model", checkpoint, "--file", src, "--output", tmp_path / "out.jsonl", "--batch-size", "1")
    assert code == 0 and "3/3" in err  # tqdm: three batches of one
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert written == [r | {"summary": EXPECTED} for r in records]


def test_long_input_is_truncated_with_a_note(checkpoint):
    code, out, err = cli("--model", checkpoint, " ".join(["word"] * 200))
    assert (code, out) == (0, EXPECTED + "\n")
    assert "truncated to the model's 64" in err


@pytest.mark.parametrize("args, stdin, status, message", [
    (["--model", "nobody/no-such-pegasus", "Some text."], "", 1, "not in the Hugging Face cache"),
    (["--model", "{ckpt}", ""], "", 2, "the input text is empty"),
    (["--model", "{ckpt}"], "  \n", 2, "the input text is empty"),
    (["--model", "{ckpt}", "--file", "{tmp}/missing.txt"], "", 2, "cannot read"),
    (["--model", "{ckpt}", "--file", "{tmp}/bad.jsonl"], "", 2, "bad.jsonl:2: missing field 'text'"),
    (["--model", "{ckpt}", "--file", "{tmp}/missing.jsonl"], "", 2, "data file not found"),
    (["--model", "{ckpt}", "--dtype", "float16", "Some text."], "", 2, "float16 is not supported on CPU"),
    (["--model", "{ckpt}", "--file", "{tmp}/bad.jsonl", "Some text."], "", 2, "not both"),
])
def test_errors_are_one_line(checkpoint, tmp_path, args, stdin, status, message):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    args = [a.format(ckpt=checkpoint, tmp=tmp_path) for a in args]
    code, out, err = cli(*args, stdin=stdin)
    assert code == status and out == ""
    assert err.startswith("error: ") and message in err and "Traceback" not in err


@pytest.mark.parametrize("flags, texts, one_row", [
    (["--num-beams", "1"], 1, True),  # greedy, one document: one hypothesis per step
    ([], 1, False),  # the checkpoint's beam 2
    (["--num-beams", "1"], 2, False),  # two documents decoded together
    (["--num-beams", "1", "--batch-size", "1"], 2, True)])
def test_the_cli_packs_the_decoder_for_the_decoding_it_runs(monkeypatch, capsys, checkpoint, tmp_path, flags, texts,
                                                            one_row):
    """float32 on CPU: the decoder's matmuls in oneDNN's one-row layout exactly when every step runs one
    hypothesis (onednn.PACK_ROWS: faster there, slower for several)."""
    from onednn import PACK_ROWS, OneDNNLinear

    monkeypatch.setattr(generate, "_LOADED", {})
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"Document {i} about the bridge."}) + "\n" for i in range(texts)))
    assert generate.main(["--model", str(checkpoint), "--file", str(docs), *flags]) == 0
    assert capsys.readouterr().out.count(EXPECTED) == texts
    (model, _), = generate._LOADED.values()
    if not isinstance(model.decoder.layers[0].fc1, OneDNNLinear):
        pytest.skip("oneDNN is not available in this PyTorch build")
    assert model.decoder.layers[0].fc1.rows == (1 if one_row else PACK_ROWS)
    assert model.encoder.layers[0].fc1.rows == PACK_ROWS


def test_load_caches_one_model_per_packing(monkeypatch, checkpoint):
    """load()'s batch / num_beams hints matter only where they mean one hypothesis per step: hints that
    pack alike share one cached model (each load is a whole checkpoint read and converted)."""
    monkeypatch.setattr(generate, "_LOADED", {})
    model = generate.load(checkpoint)[0]
    for hints in ({"batch": 2}, {"batch": 8, "num_beams": 1}, {"batch": 1, "num_beams": 4}):
        assert generate.load(checkpoint, **hints)[0] is model, hints
    one_row = generate.load(checkpoint, batch=1, num_beams=1)[0]
    assert one_row is not model
    assert generate.load(checkpoint, batch=1, num_beams=1)[0] is one_row
    int8 = generate.load(checkpoint, quantize="int8")[0]  # int8's kernels follow batch x beams (quantize.py)
    assert generate.load(checkpoint, quantize="int8")[0] is int8
    assert generate.load(checkpoint, quantize="int8", batch=4, num_beams=8)[0] is not int8
    assert len(generate._LOADED) == 4


def test_summarize_keeps_order_and_truncates(monkeypatch, tokenizer, checkpoint):
    """summarize() sorts texts by length into batches: with decoding replaced by an echo of the
    input, every summary must come back to its own text, long ones cut to the model's positions."""
    model, tok = generate.load(checkpoint)
    echo = lambda net, ids, mask, **kw: torch.cat([torch.zeros_like(ids[:, :1]), ids], 1)  # start + input
    monkeypatch.setattr(generate, "generate", echo)
    texts = ["a much longer third text than the others, with more words", "short", "a medium text", "x " * 100]
    out = generate.summarize(texts, (model, tok), batch_size=2)
    assert out[:3] == texts[:3]
    assert out[3] == tok.decode(tok.encode(texts[3])[:63])
    assert generate.load(checkpoint)[0] is model  # loaded once per process
    with pytest.raises(ValueError, match="empty"):
        generate.summarize(["fine", " "], (model, tok))
