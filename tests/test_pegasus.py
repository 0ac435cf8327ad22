"""PEGASUS parity with the reference implementation (transformers), through load_weights.load_model.

Each test builds a randomly initialised reference model, randomises the parameters that start as
constants (LayerNorms, final_logits_bias) so that a dropped or misnamed tensor changes the
logits, saves it in the Hugging Face layout, loads it here and compares logits on a padded batch
of real text.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import shared_file
from toy import relative_error as assert_close

from load_weights import load_model, save_model
from pegasus import Pegasus, PegasusConfig, attention_mode, sinusoids
from tokenizer import PegasusTokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "The tower is 324 metres (1,063 ft) tall, about the same height as an 81-storey building, and the tallest "
    "structure in Paris. Its base is square, measuring 125 metres (410 ft) on each side.",
    "PG&E stated it scheduled the blackouts in response to forecasts for high winds amid dry conditions.",
    "Short one.",
]
TINY = dict(d_model=64, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=96, decoder_ffn_dim=128, max_position_embeddings=256)


def reference_model(overrides: dict, seed: int = 0):
    """A transformers PEGASUS with every tensor random (LayerNorms and final_logits_bias too)."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=96103, activation_function="relu", scale_embedding=True, pad_token_id=0, eos_token_id=1,
               decoder_start_token_id=0, forced_eos_token_id=1)
    cfg.update(overrides)
    model = transformers.PegasusForConditionalGeneration(transformers.PegasusConfig(**cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
        model.final_logits_bias.normal_(0, 0.5)
    return model


def save_reference(model, path, tokenizer_file, weights="safetensors"):
    if weights == "bin":  # the legacy pickle format, written by hand (transformers v5 only writes safetensors)
        model.config.save_pretrained(path)
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    else:
        model.save_pretrained(path, max_shard_size="20MB" if weights == "sharded" else "50GB")
    shutil.copy(tokenizer_file, path / tokenizer_file.name)
    return path


def batch(tok):
    ids, mask = tok.batch_encode(TEXTS)
    dec = ids[:, :12].clone()
    dec[:, 0] = 0  # decoder start token
    dec[dec == 1] = 5
    return ids, mask, dec


@pytest.mark.parametrize("weights", ["safetensors", "sharded", "bin"])
@pytest.mark.parametrize("vocab", ["spiece.model", "tokenizer.json"])
def test_tiny_parity(tmp_path, weights, vocab):
    ref = reference_model(TINY)
    path = save_reference(ref, tmp_path, shared_file("pegasus", vocab), weights)
    if weights == "sharded":
        assert (path / "model.safetensors.index.json").exists()
    model, tok = load_model(path)
    ids, mask, dec = batch(tok)
    assert mask.sum(1).unique().numel() == 3, "the batch must be padded to exercise the mask"
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        assert_close(model(ids, mask, dec), expected)
        with attention_mode(model, sdpa=False):  # the plain-math attention path gives the same numbers
            assert_close(model(ids, mask, dec), expected)


@pytest.mark.slow  # writes a 2.3 GB checkpoint (removed once loaded); run with `pytest -m slow`
def test_full_xsum_shape_parity(tmp_path, published_configs, spiece_model):
    published = published_configs["google/pegasus-xsum"]
    cfg = {k: v for k, v in published.items() if k not in ("generation", "architectures")}
    ref = reference_model(cfg)
    path = save_reference(ref, tmp_path, spiece_model)
    model, tok = load_model(path)
    shutil.rmtree(path)  # pytest keeps the last runs' temp dirs: do not leave 2.3 GB behind (Linux keeps
    # the memory-mapped data readable until the model is freed)
    n_ref = sum(p.numel() for n, p in ref.named_parameters() if "embed_positions" not in n)  # tied counted once
    assert sum(p.numel() for p in model.parameters()) == n_ref
    ids, mask, dec = batch(tok)
    with torch.no_grad():
        rel = assert_close(model(ids, mask, dec), ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits)
    print(f"pegasus-xsum shape: relative max |dlogit| = {rel:.2e}")


def test_decoder_only_matches_reference_causal_lm(spiece_model):
    """The decoder alone, without cross-attention, is the reference's PegasusForCausalLM."""
    ref = reference_model(TINY)
    lm = transformers.PegasusForCausalLM(ref.config).eval()
    lm.model.decoder.load_state_dict(ref.model.decoder.state_dict())
    ours = Pegasus(PegasusConfig.from_dict(ref.config.to_dict())).eval()
    ours.load_state_dict({k.removeprefix("model."): v for k, v in ref.state_dict().items()
                          if "embed_tokens" not in k and "embed_positions" not in k and k != "lm_head.weight"})
    ours.final_logits_bias.zero_()  # the causal-LM head has no bias
    ids = PegasusTokenizer.from_spiece(spiece_model).batch_encode(TEXTS[:2])[0]
    with torch.no_grad():
        assert_close(ours.logits(ours.decode(ids)), lm(input_ids=ids, use_cache=False).logits)


def test_sinusoids_match_reference_layout():
    ref = transformers.models.pegasus.modeling_pegasus.PegasusSinusoidalPositionalEmbedding(512, 1024).create_weight()
    assert torch.equal(sinusoids(512, 1024), ref)
    # by hand, dim 8: sines of all four frequencies first, then their cosines (not interleaved)
    angles = torch.tensor([[p / 10000 ** (2 * i / 8) for i in range(4)] for p in range(4)], dtype=torch.float64)
    assert torch.allclose(sinusoids(4, 8), torch.cat([angles.sin(), angles.cos()], 1).float(), atol=1e-7)


def test_loss_matches_reference_and_ignores_minus_100(spiece_model):
    ref = reference_model(TINY)
    ours = Pegasus(PegasusConfig.from_dict(ref.config.to_dict())).eval()
    ours.load_state_dict({k.removeprefix("model."): v for k, v in ref.state_dict().items()
                          if "embed_tokens" not in k and "embed_positions" not in k and k != "lm_head.weight"})
    tok = PegasusTokenizer.from_spiece(spiece_model)
    ids, mask = tok.batch_encode(TEXTS)
    labels, lmask = tok.batch_encode(["A tower.", "Winds caused blackouts in California.", "One."])
    labels[lmask == 0] = -100
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
        assert torch.allclose(ours.loss(ids, mask, labels), expected, atol=1e-5)
        # label smoothing: (1-e) * NLL + e * mean over the vocabulary of -log p
        smooth = ours.loss(ids, mask, labels, label_smoothing=0.1)
        assert smooth > expected


def test_save_model_round_trip_through_reference(tmp_path, spiece_model):
    torch.manual_seed(1)
    ours = Pegasus(PegasusConfig(vocab_size=96103, **TINY)).eval()
    with torch.no_grad():
        ours.final_logits_bias.normal_()
    save_model(ours, tmp_path, PegasusTokenizer.from_spiece(spiece_model))
    # the weights as readable as the config beside them (safetensors 0.8 alone writes them owner-only)
    mode = (tmp_path / "config.json").stat().st_mode & 0o777
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == mode
    back, tok = load_model(tmp_path)
    ref = transformers.PegasusForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids, mask, dec = batch(tok)
    with torch.no_grad():
        logits = ours(ids, mask, dec)
        assert torch.equal(back(ids, mask, dec), logits)
        assert_close(logits, ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits)


def test_bfloat16_load_runs(tmp_path, spiece_model):
    path = save_reference(reference_model(TINY), tmp_path, spiece_model)
    model, tok = load_model(path, dtype="bfloat16")
    assert model.shared.weight.dtype == torch.bfloat16
    ids, mask, dec = batch(tok)
    with torch.no_grad():
        assert torch.isfinite(model(ids, mask, dec).float()).all()


def test_bfloat16_load_converts_by_rows_to_the_same_values(tmp_path, spiece_model, monkeypatch):
    """A float32 checkpoint loaded as bfloat16 is read a block of rows at a time (weight_files.Rows.to),
    never memory-mapped (a mapped matrix would be resident whole beside its converted copy), and gives
    exactly the values that converting the float32 model gives."""
    import weight_files
    path = save_reference(reference_model(TINY), tmp_path, spiece_model)
    exact = {k: v.to(torch.bfloat16) for k, v in load_model(path, with_tokenizer=False)[0].state_dict().items()}
    monkeypatch.setattr(weight_files, "mapped_tensors", None)  # calling it would fail the load
    model, _ = load_model(path, dtype="bfloat16", with_tokenizer=False)
    state = model.state_dict()
    assert list(state) == list(exact) and all(torch.equal(state[k], exact[k]) for k in state)
    # Blocks of 512 KB: 300 rows of 1,000 floats are three blocks, the last one short.
    from safetensors.torch import save_file
    w = torch.randn(300, 1000)
    save_file({"w": w}, str(tmp_path / "w.safetensors"))
    header, begin = weight_files.Rows.header(tmp_path / "w.safetensors")
    rows = weight_files.Rows(tmp_path / "w.safetensors", begin, [300, 1000], torch.float32)
    assert torch.equal(rows.to(torch.bfloat16), w.to(torch.bfloat16)) and torch.equal(rows.to(torch.float32), w)


def test_generation_defaults_come_from_the_checkpoint(tmp_path, spiece_model):
    path = save_reference(reference_model(TINY), tmp_path, spiece_model)
    (path / "generation_config.json").write_text(json.dumps({"num_beams": 8, "length_penalty": 0.6, "max_length": 64}))
    model, _ = load_model(path)
    assert model.generation_config["num_beams"] == 8 and model.generation_config["length_penalty"] == 0.6


# ----------------------------------------------------------------------------- bad input: one clear line


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    return save_reference(reference_model(TINY), path, shared_file("pegasus", "spiece.model"))


def copy_of(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_missing_directory_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        load_model(tmp_path / "nope")


def test_offline_hub_id_says_what_to_download(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache.*download google/pegasus-not-here"):
        load_model("google/pegasus-not-here")


def test_missing_config_and_weights(good_checkpoint, tmp_path):
    path = copy_of(good_checkpoint, tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights in"):
        load_model(path)
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(path)


def test_wrong_model_type(good_checkpoint, tmp_path):
    path = copy_of(good_checkpoint, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "bart"}))
    with pytest.raises(ValueError, match="model_type 'bart'"):
        load_model(path)


def test_truncated_safetensors(good_checkpoint, tmp_path):
    path = copy_of(good_checkpoint, tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_model(path)


def test_vocabulary_mismatch(good_checkpoint, tmp_path):
    path = copy_of(good_checkpoint, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "vocab_size": 50000}))
    with pytest.raises(ValueError, match="tokenizer .* has 96103 ids but the model expects 50000"):
        load_model(path)


def test_shape_mismatch_and_unexpected_and_missing_tensors(good_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file
    path = copy_of(good_checkpoint, tmp_path)
    good = load_file(path / "model.safetensors")

    def write(tensors):
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})

    write({**good, "model.encoder.layers.0.fc1.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="fc1.weight: checkpoint shape"):
        load_model(path)
    write({**good, "model.encoder.extra.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="unexpected tensor 'model.encoder.extra.weight'"):
        load_model(path)
    write({k: v for k, v in good.items() if "encoder.layers.1.fc2" not in k})
    with pytest.raises(ValueError, match="missing 2 tensors"):
        load_model(path)
    write({**good, "lm_head.weight": torch.randn_like(good["model.shared.weight"])})
    with pytest.raises(ValueError, match="lm_head.weight .* does not equal the shared embedding"):
        load_model(path)
    positions = good["model.encoder.embed_positions.weight"]
    write({**good, "model.encoder.embed_positions.weight": positions.roll(1, dims=1)})
    with pytest.raises(ValueError, match="does not equal the sinusoid table"):
        load_model(path)


def test_unsupported_dtype(good_checkpoint):
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        load_model(good_checkpoint, dtype="int8")


def test_too_long_input_is_refused():
    model = Pegasus(PegasusConfig(vocab_size=100, **{**TINY, "max_position_embeddings": 16})).eval()
    with pytest.raises(ValueError, match="input of 17 tokens is longer than max_position_embeddings=16"):
        model.encode(torch.ones(1, 17, dtype=torch.long))


def test_no_meta_tensor_is_left_after_loading(good_checkpoint):
    """The model is built on the meta device; every parameter and buffer must be real afterwards."""
    model, _ = load_model(good_checkpoint)
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    assert torch.equal(model.embed_positions, sinusoids(256, 64))
    unmapped, tok = load_model(good_checkpoint, mmap=False)  # read into ordinary memory: the same model
    ids, mask, dec = batch(tok)
    with torch.no_grad():
        assert torch.equal(unmapped(ids, mask, dec), model(ids, mask, dec))


def _resident_file_pages_mb() -> float:
    """RssFile of this process (file-backed pages it has mapped and touched), in MB; Linux only."""
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile line")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc/self/status")
def test_mapped_tensors_are_copy_on_write_and_let_go_of_their_pages(tmp_path):
    """load_model's default (memory-mapped) tensors: reading one makes its pages resident, freeing it
    gives them back even while another tensor of the same file is alive (what keeps onednn.use_onednn's
    peak at one copy), and writing to one never reaches the file."""
    from safetensors.torch import load_file, save_file

    from weight_files import mapped_tensors
    file = tmp_path / "model.safetensors"
    save_file({"a": torch.arange(16 << 20, dtype=torch.float32).view(4096, -1), "b": torch.ones(3),
               "c": torch.zeros(0, 4), "i": torch.arange(5)}, str(file))  # a is 64 MB
    tensors = dict(mapped_tensors(file))
    assert tensors["i"].dtype == torch.int64 and tensors["c"].shape == (0, 4)
    before = _resident_file_pages_mb()
    assert tensors["a"].double().sum().item() == sum(range(16 << 20))  # every page read once (exact in float64)
    assert _resident_file_pages_mb() - before > 60
    tensors["b"] += 1  # a private copy of its page: the file keeps its ones
    assert torch.equal(tensors["b"], torch.full((3,), 2.0))
    del tensors["a"]
    assert _resident_file_pages_mb() - before < 4, "a's pages stay resident after it was freed"
    assert torch.equal(load_file(str(file))["b"], torch.ones(3)) and torch.equal(tensors["i"], torch.arange(5))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_bin_layout_places_every_tensor_of_a_torch_checkpoint(tmp_path, zip_format):
    """A .bin (the published 2020 checkpoints' format) is read as a safetensors file is: each tensor's
    bytes are found in the file (the tied names' one storage once), in the zip format and in the legacy
    one, matrices come as Rows, and what cannot be placed (strided or overlapping views, a pickle that
    is not a plain state dict) is left to torch.load."""
    import weight_files
    save = lambda state, path: torch.save(state, path, _use_new_zipfile_serialization=zip_format)  # noqa: E731
    a = torch.randn(300, 1000)
    state = {"a": a, "tied": a, "b": torch.arange(7.0), "empty": torch.zeros(0, 4), "i": torch.arange(5),
             "h": torch.randn(4, 6).half(), "part": torch.arange(20.0).view(4, 5)[1:3]}  # a view at an offset
    save(state, tmp_path / "w.bin")
    layout = weight_files.bin_layout(tmp_path / "w.bin")
    data = (tmp_path / "w.bin").read_bytes()
    assert [e[0] for e in layout] == list(state)
    for name, first, last, shape, dtype in layout:  # the bytes it names are the tensor's
        found = torch.frombuffer(bytearray(data[first:last]), dtype=dtype) if last > first else torch.empty(0)
        assert dtype == state[name].dtype and torch.equal(found.view(shape).to(dtype), state[name]), name
    assert layout[0][1:3] == layout[1][1:3]  # tied: the same bytes
    rows = dict(weight_files.file_tensors(tmp_path / "w.bin", mmap=False, rows=True))
    assert isinstance(rows["a"], weight_files.Rows) and weight_files.same_bytes(rows["a"], rows["tied"])
    assert torch.equal(rows["a"].to(torch.float32), a) and torch.equal(rows["b"], state["b"])
    for mmap in (True, False):  # the int8 loader asks for the shared table first (to pack the output head early)
        names = [n for n, _ in weight_files.file_tensors(tmp_path / "w.bin", mmap=mmap, rows=not mmap, first="h")]
        assert names == ["h", *(n for n in state if n != "h")]
    for other in ({"t": a.t()}, {"all": a, "some": a[5:9]}, {"w": a, "step": 3}, {"nested": {"w": a}}):
        save(other, tmp_path / "x.bin")  # strided; some bytes shared; not only tensors; not flat
        assert weight_files.bin_layout(tmp_path / "x.bin") is None, other.keys()
        assert set(torch.load(tmp_path / "x.bin", weights_only=True)) == set(other)  # torch.load's to read


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc/self/status")
def test_a_mapped_bin_lets_go_of_its_pages_when_its_last_name_is_freed(tmp_path):
    """Memory-mapped tensors of a .bin let go of their pages as safetensors' do (what keeps onednn.use_onednn
    and bfloat16 loading at one copy of the weights), tied names holding one tensor until both are freed."""
    from weight_files import bin_layout, mapped_tensors
    torch.save({"a": (a := torch.arange(16 << 20, dtype=torch.float32).view(4096, -1)), "tied": a}, tmp_path / "w.bin")
    tensors = dict(mapped_tensors(tmp_path / "w.bin", bin_layout(tmp_path / "w.bin")))
    assert tensors["a"] is tensors["tied"]
    before = _resident_file_pages_mb()
    assert tensors["a"].double().sum().item() == sum(range(16 << 20))  # every page read once (exact in float64)
    del tensors["a"]
    assert _resident_file_pages_mb() - before > 60  # "tied" still reads them
    del tensors["tied"]
    assert _resident_file_pages_mb() - before < 4, "the pages stay resident after both names were freed"
