"""Every bad input gets ONE line naming the problem and the file or flag: exit status 2 for a bad
request (checked before anything is loaded), 1 for a bad checkpoint; never a traceback, a silent wrong
answer or a partial output file. Also the checkpoint formats that must load: legacy (pre-zip) .bin
memory-mapped by default, and float16 / bfloat16 checkpoints in any dtype.

The CLI runs in-process (generate.main) on tiny checkpoints built here (no ../shared needed).
"""

import io
import json
import math
import os
import sys

import pytest
import torch
from tiny_checkpoints import config_json, reference_state, repository, tiny_model, tiny_spiece, torch_bytes, write

import generate
from load_weights import load_model


@pytest.fixture(scope="module")
def spiece():
    return tiny_spiece()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def good(tmp_path_factory, model, spiece):
    """A valid checkpoint directory (pytorch_model.bin layout)."""
    return write(tmp_path_factory.mktemp("good"), repository(model, spiece, "bin"))


@pytest.fixture
def ckpt(tmp_path, model, spiece):
    """A fresh copy of the valid checkpoint, for a test to break."""
    (tmp_path / "ckpt").mkdir()
    return write(tmp_path / "ckpt", repository(model, spiece, "bin"))


def run(argv, capsys, monkeypatch, stdin: bytes | None = None, load_ok: bool = False):
    """generate.main(argv) -> (status, stdout, stderr). Unless load_ok, loading a model fails the test:
    a bad request must be refused before any work."""
    if not load_ok:
        monkeypatch.setattr(generate, "load", lambda *a, **k: pytest.fail("a model was loaded for a bad request"))
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    try:
        code = generate.main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> bool:
    return err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


# ----------------------------------------------------------------------------- bad requests: exit 2


def no_mps():
    return not torch.backends.mps.is_available()


@pytest.mark.parametrize("args, stdin, message", [
    (["--num-beams", "0", "text"], None, "--num-beams must be at least 1 (got 0)"),
    (["--num-beams", "-3", "text"], None, "--num-beams must be at least 1 (got -3)"),
    (["--max-new-tokens", "0", "text"], None, "--max-new-tokens must be at least 1 (got 0)"),
    (["--batch-size", "0", "text"], None, "--batch-size must be at least 1 (got 0)"),
    (["--length-penalty", "nan", "text"], None, "--length-penalty must be a finite number (got nan)"),
    (["--length-penalty", "inf", "text"], None, "--length-penalty must be a finite number (got inf)"),
    (["--length-penalty=-inf", "text"], None, "--length-penalty must be a finite number (got -inf)"),
    (["--num-beams", "four", "text"], None, "argument --num-beams: invalid int value: 'four'"),
    (["--dtype", "int8", "text"], None, "argument --dtype: invalid choice: 'int8'"),
    (["--no-such-flag", "text"], None, "unrecognized arguments: --no-such-flag"),
    (["--dtype", "float16", "text"], None, "float16 is not supported on CPU"),
    (["--device", "banana", "text"], None, "--device 'banana' is not a device"),
    (["--device", "xpu", "text"], None, "--device xpu: only cpu, cuda and mps are supported"),
    (["--device", "{model}", "text"], None, "is not a device"),
    (["text", "--file", "{tmp}/doc.txt"], None, "give the text as an argument or with --file, not both"),
    (["--model", "{tmp}", "--revision", "v1", "text"], None, "--revision 'v1' needs a hub id as --model"),
    ([""], None, "the input text is empty"),
    ([], b"  \n\t", "the input text is empty"),
    ([], b"caf\xe9 au lait", "standard input is not UTF-8 text (byte 0xe9 at offset 3)"),
    (["--file", "{tmp}/latin1.txt"], None, "latin1.txt is not UTF-8 text (byte 0xe9 at offset 3)"),
    (["--file", "{tmp}/missing.txt"], None, "cannot read --file"),
    (["--file", "{tmp}"], None, "a directory"),
    (["--file", "{tmp}/empty.txt"], None, "empty.txt contains no text"),
    (["--file", "{tmp}/missing.jsonl"], None, "data file not found"),
    (["--file", "{tmp}/bad.jsonl"], None, "bad.jsonl:2: missing field 'text'"),
    (["--file", "{tmp}/notjson.jsonl"], None, "notjson.jsonl:1: not valid JSON"),
    (["--file", "{tmp}/array.json"], None, "a .json --file is read as JSON lines"),
    (["--file", "{tmp}/latin1.jsonl"], None, "cannot read"),
    (["--output", "{tmp}/no/such/dir/out.txt", "text"], None, "directory {tmp}/no/such/dir does not exist"),
    (["--output", "{tmp}", "text"], None, "is a directory; give a file name"),
    (["--output", "{tmp}/doc.txt/out.txt", "text"], None, "does not exist"),  # parent is a file
    # the input would be overwritten by its own summary (the same file, also by another path and by a link)
    (["--file", "{tmp}/doc.txt", "--output", "{tmp}/doc.txt"], None, "--output {tmp}/doc.txt is the input file"),
    (["--file", "{tmp}/doc.txt", "--output", "{tmp}/../{tmpname}/doc.txt"], None, "is the input file"),
    (["--file", "{tmp}/doc.txt", "--output", "{tmp}/link.txt"], None, "is the input file"),
])
def test_bad_request_is_one_line_before_loading(args, stdin, message, tmp_path, capsys, monkeypatch):
    (tmp_path / "doc.txt").write_text("A document.")
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 au lait")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    (tmp_path / "notjson.jsonl").write_text("just some text\n")
    (tmp_path / "array.json").write_text(json.dumps([{"text": "one"}, {"text": "two"}], indent=2))
    (tmp_path / "link.txt").symlink_to(tmp_path / "doc.txt")
    args = [a.format(tmp=tmp_path, tmpname=tmp_path.name, model="cuda:x:y") for a in args]
    code, out, err = run(args, capsys, monkeypatch, stdin=stdin if stdin is not None else b"")
    assert (code, out) == (2, ""), err
    assert one_line(err) and message.format(tmp=tmp_path) in err, err


@pytest.mark.parametrize("device, available, message", [
    ("cuda", torch.cuda.is_available, "--device cuda: no CUDA GPU is available"),
    ("cuda:0", torch.cuda.is_available, "--device cuda:0: no CUDA GPU is available"),
    ("mps", lambda: torch.backends.mps.is_available(), "--device mps: no Apple MPS GPU is available"),
])
def test_missing_device(device, available, message, capsys, monkeypatch):
    if available():
        pytest.skip(f"this machine has {device}")
    code, out, err = run(["--device", device, "text"], capsys, monkeypatch)
    assert (code, out) == (2, "") and one_line(err) and message in err


def test_output_in_unwritable_directory(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:  # root may write anywhere on an ordinary disk: then use /proc, where nobody can create files
        target = locked / "out.txt" if not os.access(locked, os.W_OK) else "/proc/out.txt"
        code, out, err = run(["--output", target, "text"], capsys, monkeypatch)
        assert (code, out) == (2, "") and one_line(err) and "cannot write in directory" in err, err
    finally:
        locked.chmod(0o700)


# ----------------------------------------------------------------------------- what inputs mean


def test_txt_file_is_one_document(good, tmp_path, capsys, monkeypatch):
    """A .txt of several lines and paragraphs is ONE document: one summary, of the whole text."""
    seen = []
    monkeypatch.setattr(generate, "summarize", lambda texts, *a, **k: seen.extend(texts) or ["S"] * len(texts))
    article = "First paragraph, first line.\nSecond line.\n\nSecond paragraph.\n"
    (tmp_path / "notes.txt").write_text(article)
    code, out, err = run(["--model", good, "--file", tmp_path / "notes.txt"], capsys, monkeypatch, load_ok=True)
    assert (code, out, seen) == (0, "S\n", [article]), err


def test_json_file_of_json_lines_is_read_as_jsonl(good, tmp_path, capsys, monkeypatch):
    seen = []
    monkeypatch.setattr(generate, "summarize", lambda texts, *a, **k: seen.extend(texts) or ["S"] * len(texts))
    (tmp_path / "docs.json").write_text('{"id": 1, "text": "one"}\n{"id": 2, "text": "two"}\n')
    code, out, err = run(["--model", good, "--file", tmp_path / "docs.json"], capsys, monkeypatch, load_ok=True)
    assert code == 0 and seen == ["one", "two"], err
    assert [json.loads(line) for line in out.splitlines()] == [{"id": 1, "text": "one", "summary": "S"},
                                                             {"id": 2, "text": "two", "summary": "S"}]


def test_output_is_written_atomically(good, tmp_path, capsys, monkeypatch):
    """A failure while summarizing leaves no output file and an older one untouched; success replaces it."""
    out_file = tmp_path / "out.txt"
    out_file.write_text("previous results\n")

    def fail(*a, **k):
        raise ValueError("something went wrong while summarizing")
    monkeypatch.setattr(generate, "summarize", fail)
    code, _, err = run(["--model", good, "--output", out_file, "text"], capsys, monkeypatch, load_ok=True)
    assert code == 1 and one_line(err)
    assert out_file.read_text() == "previous results\n" and os.listdir(tmp_path) == ["out.txt"]
    monkeypatch.setattr(generate, "summarize", lambda texts, *a, **k: ["new summary"])
    code, out, err = run(["--model", good, "--output", out_file, "text"], capsys, monkeypatch, load_ok=True)
    assert (code, out) == (0, "") and out_file.read_text() == "new summary\n"
    assert os.listdir(tmp_path) == ["out.txt"]  # no temporary file left behind


def test_max_new_tokens_beyond_the_positions(good, capsys, monkeypatch):
    """Only the checkpoint knows its positions: checked right after loading, before any decoding."""
    monkeypatch.setattr(generate, "summarize", lambda *a, **k: pytest.fail("decoding started"))
    code, out, err = run(["--model", good, "--max-new-tokens", "65", "text"], capsys, monkeypatch, load_ok=True)
    assert (code, out) == (2, "") and one_line(err) and "--max-new-tokens 65 is more than" in err


def test_tiny_checkpoint_summarizes_end_to_end(good, capsys, monkeypatch):
    """The good checkpoint really runs through the CLI (the failures below are not about the setup)."""
    code, out, err = run(["--model", good, "--num-beams", "1", "Some text."], capsys, monkeypatch, load_ok=True)
    assert code == 0 and out.count("\n") == 1, err


# ----------------------------------------------------------------------------- bad checkpoints: exit 1


def refused_pickle() -> bytes:
    class Payload:  # what a malicious checkpoint holds: an object whose unpickling runs code
        def __reduce__(self):
            return (print, ("this ran while loading",))
    return torch_bytes({"model.shared.weight": Payload()})


def edit_config(**changes):
    def apply(ckpt):
        cfg = json.loads((ckpt / "config.json").read_text())
        for k, v in changes.items():
            if v is None:
                del cfg[k]
            else:
                cfg[k] = v
        (ckpt / "config.json").write_text(json.dumps(cfg))
    return apply


def put(name, data: bytes | str):
    return lambda ckpt: (ckpt / name).write_bytes(data.encode() if isinstance(data, str) else data)


def drop(name):
    return lambda ckpt: (ckpt / name).unlink()


def with_state(change):
    """Rewrite pytorch_model.bin after `change(state)`."""
    def apply(ckpt):
        state = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
        change(state)
        (ckpt / "pytorch_model.bin").write_bytes(torch_bytes(state))
    return apply


def shard_index(index: dict):
    def apply(ckpt):
        state = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
        (ckpt / "pytorch_model.bin").unlink()
        (ckpt / "pytorch_model-00001-of-00001.bin").write_bytes(torch_bytes(state))
        (ckpt / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return apply


BAD_CHECKPOINTS = {
    "config is a list": (put("config.json", "[1, 2, 3]"), "config.json: expected a JSON object, got a list"),
    "config not JSON": (put("config.json", "{d_model: 16"), "config.json is not valid JSON"),
    "d_model a string": (edit_config(d_model="32"), "config.json: field 'd_model' must be int, got '32'"),
    "layers a float": (edit_config(encoder_layers=1.5), "field 'encoder_layers' must be int, got 1.5"),
    "flag a string": (edit_config(scale_embedding="yes"), "field 'scale_embedding' must be bool"),
    "heads do not divide": (edit_config(encoder_attention_heads=3),
                            "d_model 16 is not divisible by encoder_attention_heads 3"),
    "zero layers": (edit_config(decoder_layers=0), "field 'decoder_layers' must be at least 1, got 0"),
    "missing d_model": (edit_config(d_model=None), "config.json: missing required field(s) d_model"),
    "eos beyond vocab": (edit_config(eos_token_id=10**6), "field 'eos_token_id' = 1000000 is not a token id"),
    "unknown activation": (edit_config(activation_function="swishy"), "'swishy' is not one of"),
    "unknown model type": (edit_config(model_type="bart"), "only 'pegasus' and 'pegasus_x' can be loaded"),
    "odd PEGASUS-X blocks": (edit_config(model_type="pegasus_x", block_size=7),
                             "config.json: block_size must be a positive even number"),
    "no config": (drop("config.json"), "has no config.json"),
    "generation config not JSON": (put("generation_config.json", "{"), "generation_config.json is not valid JSON"),
    "tokenizer config not JSON": (put("tokenizer_config.json", "nope"), "tokenizer_config.json is not a valid"),
    "corrupt spiece.model": (put("spiece.model", b"\x00garbage" * 50), "is not a valid SentencePiece model"),
    "empty spiece.model": (put("spiece.model", b""), "is not a valid SentencePiece model"),
    "corrupt tokenizer.json": (lambda c: (drop("spiece.model")(c), put("tokenizer.json", "{not json")(c)),
                               "tokenizer.json is not valid JSON"),
    "tokenizer.json a list": (lambda c: (drop("spiece.model")(c), put("tokenizer.json", "[]")(c)),
                              "tokenizer.json is not a PEGASUS tokenizer.json"),
    "no tokenizer": (lambda c: (drop("spiece.model")(c), drop("tokenizer.json")(c)), "no spiece.model or tokenizer"),
    "no weights": (drop("pytorch_model.bin"), "no weights in"),
    "refused pickle": (put("pytorch_model.bin", refused_pickle()), "is refused as unsafe"),
    "corrupt bin": (put("pytorch_model.bin", b"PK\x03\x04 not really a zip"), "is not a valid PyTorch checkpoint"),
    "bin of a list": (put("pytorch_model.bin", torch_bytes([torch.zeros(2)])), "does not hold a state dict"),
    "truncated safetensors": (lambda c: (drop("pytorch_model.bin")(c), put("model.safetensors", b"\x10\x00")(c)),
                              "is not a valid safetensors file"),
    "index without weight_map": (shard_index({"metadata": {}}), "has no weight_map"),
    "index naming a missing file": (shard_index({"weight_map": {"lm_head.weight": "pytorch_model-00002.bin"}}),
                                    "pytorch_model-00002.bin is listed in the shard index"),
    "index naming a path": (shard_index({"weight_map": {"lm_head.weight": "../../etc/passwd"}}),
                            "which is not a file name in the checkpoint directory"),
    "int tensor": (with_state(lambda s: s.update({"model.encoder.layer_norm.weight": torch.ones(16).long()})),
                   "has dtype int64, not a float type"),
    "bool tensor": (with_state(lambda s: s.update({"final_logits_bias": torch.zeros(1, 143, dtype=torch.bool)})),
                    "has dtype bool, not a float type"),
    "missing tensor": (with_state(lambda s: s.pop("model.decoder.layer_norm.bias")), "is missing 1 tensors"),
    "wrong shape": (with_state(lambda s: s.update({"model.decoder.layer_norm.bias": torch.zeros(17)})),
                    "checkpoint shape (17,) != model shape (16,)"),
    "untied head": (with_state(lambda s: s.update({"lm_head.weight": torch.randn(143, 16)})),
                    "lm_head.weight in"),
    "other positions": (with_state(lambda s: s.update({"model.encoder.embed_positions.weight": torch.rand(64, 16)})),
                        "does not equal the sinusoid table"),
    "vocab mismatch": (edit_config(vocab_size=200), "has 143 ids but the model expects 200"),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_bad_checkpoint_is_one_line(case, ckpt, capsys, monkeypatch):
    breaks, message = BAD_CHECKPOINTS[case]
    breaks(ckpt)
    with pytest.raises((ValueError, OSError)) as e:
        load_model(ckpt)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert "weights_only" not in str(e.value)  # never suggest turning the safety off
    code, out, err = run(["--model", ckpt, "text"], capsys, monkeypatch, load_ok=True)
    assert (code, out) == (1, "") and one_line(err) and message in err, err
    assert "this ran while loading" not in out + err


# ----------------------------------------------------------------------------- formats that must load


def test_legacy_bin_loads_memory_mapped_by_default(tmp_path, model, spiece):
    """torch < 1.6 wrote non-zip files, which torch.load(mmap=True) refuses: load_model reads them whole."""
    write(tmp_path, repository(model, spiece, "legacy-bin"))
    loaded, _ = load_model(tmp_path)  # mmap=True is the default
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("wanted", ["float32", "bfloat16"])
def test_half_precision_checkpoints_load(tmp_path, model, spiece, stored, wanted):
    """Stored copies (tied embeddings, the sinusoid table) are rounded to the stored dtype; they are
    compared with a tolerance that fits it, and the weights arrive in the dtype asked for."""
    files = repository(model, spiece, "bin")
    files["pytorch_model.bin"] = torch_bytes(reference_state(model, dtype=stored))
    write(tmp_path, files)
    loaded, _ = load_model(tmp_path, dtype=wanted)
    assert loaded.shared.weight.dtype == getattr(torch, wanted)
    want = model.shared.weight.detach().to(stored).to(getattr(torch, wanted))
    assert torch.equal(loaded.shared.weight, want)


def test_half_precision_does_not_hide_a_wrong_table(tmp_path, model, spiece):
    """The float16 tolerance is one rounding step, not a free pass: a shifted table is still refused."""
    state = reference_state(model, dtype=torch.float16)
    state["model.encoder.embed_positions.weight"] = torch.roll(state["model.encoder.embed_positions.weight"], 1, 0)
    files = repository(model, spiece, "bin") | {"pytorch_model.bin": torch_bytes(state)}
    write(tmp_path, files)
    with pytest.raises(ValueError, match="does not equal the sinusoid table"):
        load_model(tmp_path)


def test_null_config_fields_take_the_default(tmp_path, model, spiece):
    cfg = json.loads(config_json(model)) | {"dropout": None}
    write(tmp_path, repository(model, spiece, "bin") | {"config.json": json.dumps(cfg).encode()})
    loaded, _ = load_model(tmp_path)
    assert math.isclose(loaded.config.dropout, 0.1)
