"""The `original` switch: load_model(..., original=True), summarize(..., original=True), `--original` in
generate.py and evaluate.py, and "<n>" shown as a line break by the CLI in every mode.

The TF position formula is transcribed here from pegasus/layers/timing.py, not taken from pegasus.py:
N = D // 2, w_i = exp(-i * log(1e4) / (N - 1)), signal = [sin(p * w) | cos(p * w)].
"""

import copy
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_checkpoints import repository, tiny_model, tiny_spiece, write

import evaluate
import generate
from decoding import generate as generate_ids
from load_weights import load_model
from pegasus import Pegasus, PegasusConfig

SCRIPT = Path(__file__).resolve().parents[1] / "generate.py"


def tf_positions(n_positions: int, d: int) -> np.ndarray:
    n = d // 2
    w = np.exp(np.arange(n) * -math.log(1e4) / (n - 1))
    p = np.arange(n_positions)[:, None] * w[None, :]
    return np.concatenate([np.sin(p), np.cos(p)], axis=1)


def reference_positions(n_positions: int, d: int) -> np.ndarray:
    p = np.arange(n_positions)[:, None] / 10000.0 ** (2 * np.arange(d // 2) / d)[None, :]
    return np.concatenate([np.sin(p), np.cos(p)], axis=1)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    spiece = tiny_spiece()
    dirs = {}
    for kind in ("pegasus", "pegasus_x"):
        model = tiny_model(kind)
        dirs[kind] = write(tmp_path_factory.mktemp(kind), repository(model, spiece))
    return dirs


def test_load_model_original_uses_the_tf_positions_and_n_newlines(tiny_dirs):
    default, tok = load_model(tiny_dirs["pegasus"])
    original, otok = load_model(tiny_dirs["pegasus"], original=True)
    pos = torch.arange(default.config.max_position_embeddings)
    P, D = len(pos), default.config.d_model
    np.testing.assert_allclose(original.positions(pos).double().numpy(), tf_positions(P, D), rtol=0, atol=1e-6)
    np.testing.assert_allclose(default.positions(pos).double().numpy(), reference_positions(P, D), rtol=0, atol=1e-6)
    assert not tok.newline_to_n and otok.newline_to_n
    assert otok.newline_id in otok.encode("a\nb") and tok.newline_id not in tok.encode("a\nb")
    assert otok.decode(otok.encode("a\nb")) == "a\nb"
    assert original.config.zero_first_decoder_input and not default.config.zero_first_decoder_input
    # Everything else is the same checkpoint.
    for (name, a), (_, b) in zip(default.state_dict().items(), original.state_dict().items()):
        assert torch.equal(a, b), name


def test_original_first_decoder_input_is_a_zero_vector():
    # The TF decoder sees no token at position 0, only the position signal (pegasus/models/transformer.py:
    # the targets' embeddings padded with a zero row and shifted in training; `dec_Bx1xD *= (i > 0)` in
    # predict). Stated independently: it is the reference model with the start token's embedding row zeroed.
    torch.manual_seed(0)
    cfg = PegasusConfig(vocab_size=120, d_model=16, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32)
    reference = Pegasus(cfg).eval()
    with torch.no_grad():  # a fresh model's pad row is zero (the reference's init); a trained one's need not be
        reference.shared.weight[cfg.decoder_start_token_id].normal_(0, 0.5)
    original = copy.deepcopy(reference)
    original.config = replace(cfg, zero_first_decoder_input=True)
    zeroed = copy.deepcopy(reference)
    with torch.no_grad():
        zeroed.shared.weight[cfg.decoder_start_token_id] = 0.0
    ids = torch.randint(110, 120, (2, 9))
    dec = torch.cat([torch.zeros(2, 1, dtype=torch.long), torch.randint(110, 120, (2, 4))], 1)  # start token first
    with torch.inference_mode():
        states = {name: m.decode(dec, m.encode(ids)) for name, m in
                  (("reference", reference), ("original", original), ("zeroed", zeroed))}
        assert torch.equal(states["original"], states["zeroed"])
        assert not torch.allclose(states["original"], states["reference"])
        # The cached step-by-step path (input_pos 0, then 1, ...) feeds the same zero vector.
        ours = generate_ids(original, ids, num_beams=1, max_new_tokens=6, use_cache=True)
        assert torch.equal(ours, generate_ids(original, ids, num_beams=1, max_new_tokens=6, use_cache=False))


def test_pegasus_x_original_changes_no_numbers(tiny_dirs):
    default, _ = load_model(tiny_dirs["pegasus_x"])
    original, _ = load_model(tiny_dirs["pegasus_x"], original=True)
    ids = torch.randint(110, default.config.vocab_size, (2, 12))
    with torch.inference_mode():
        a = default.logits(default.decode(ids[:, :5], default.encode(ids)))
        b = original.logits(original.decode(ids[:, :5], original.encode(ids)))
    assert torch.equal(a, b)  # PEGASUS-X's positions are the TF formula in both


def test_summarize_original_wires_positions_newlines_and_search(tiny_dirs, monkeypatch):
    seen = {}

    def fake_generate(model, ids, mask, **options):
        seen.update(options, ids=ids.tolist())
        # start, "a", <n>, "b", EOS: the tiny vocabulary has pieces for single letters
        return torch.tensor([[0] + tok.encode("a\nb")])

    model, tok = load_model(tiny_dirs["pegasus"], original=True)
    monkeypatch.setattr(generate, "generate", fake_generate)
    assert generate.summarize("one\ntwo", (model, tok), original=True) == ["a\nb"]
    assert seen["search"] == "original" and tok.newline_id in seen["ids"][0]
    # A model loaded the reference's way is refused, rather than run half-original.
    with pytest.raises(ValueError, match="load_model"):
        generate.summarize("one\ntwo", load_model(tiny_dirs["pegasus"]), original=True)


def test_cli_original(checkpoint):
    # max_length 6 = start + 5 tokens. The reference forces EOS as the 5th (4 words); the original never
    # forces EOS, and with no finished text returns the alive beam: 5 words.
    for flags, words in (([], 4), (["--original"], 5)):
        r = subprocess.run([sys.executable, str(SCRIPT), "--model", str(checkpoint), *flags, "The council met."],
                           capture_output=True, text=True, timeout=120)
        assert (r.returncode, r.stdout) == (0, " ".join(["Summary"] * words) + "\n"), r.stderr


def test_evaluate_original(checkpoint, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "The council met.", "summary": "Summary"}) + "\n")
    for flags, words in (([], 4), (["--original"], 5)):
        out = tmp_path / f"p{len(flags)}.jsonl"
        assert evaluate.main(["--model", str(checkpoint), "--data", str(data), "--output", str(out), *flags]) == 0
        assert json.loads(out.read_text())["prediction"] == " ".join(["Summary"] * words)
    capsys.readouterr()


@pytest.mark.parametrize("as_jsonl", [False, True])
def test_cli_shows_n_as_a_line_break(tmp_path, monkeypatch, capsys, as_jsonl):
    # The reference's pegasus-cnn_dailymail writes a literal "<n>" between sentences.
    # The corpus path (.jsonl + --output) measures token lengths to batch: the fake tokenizer gives some.
    fake = (type("M", (), {"config": PegasusConfig(max_position_embeddings=64)})(),
            type("T", (), {"encode": lambda self, text: [5, 6, 1]})())
    monkeypatch.setattr(generate, "load", lambda *a, **k: fake)

    def fake_summarize(texts, *args, stats=None, **kwargs):
        if stats is not None:
            stats.update(tokens=len(texts), seconds=0.1)
        return ["One.<n>Two. <n> Three."] * len(texts)

    monkeypatch.setattr(generate, "summarize", fake_summarize)
    if as_jsonl:
        src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
        src.write_text(json.dumps({"text": "x"}) + "\n")
        assert generate.main(["--file", str(src), "--output", str(dst)]) == 0
        assert json.loads(dst.read_text())["summary"] == "One.\nTwo.\nThree."
    else:
        assert generate.main(["some text"]) == 0
        assert capsys.readouterr().out == "One.\nTwo.\nThree.\n"
