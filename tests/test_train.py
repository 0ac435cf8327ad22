"""train.py: the gap-sentence objective (pure functions) and the training loop.

GSG tests use documents whose answer is known by construction (sentences that share words with the
rest of the document vs sentences of words found nowhere else) and hand-computed ROUGE values.
Training tests fit a tiny model (d_model 64, 2+2 layers, the real 96,103-id vocabulary) on
data/tiny_summaries.jsonl for 20 steps and check the loss, the saved checkpoint (here and in
transformers), exact resumption, evaluation and the command line.
"""

import argparse
import json
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from data import read_documents, read_jsonl
from gsg import make_gsg_example, num_gap_sentences, rouge1_f1, select_gap_sentences, split_sentences
from load_weights import load_model
from train import (
    TrainConfig,
    add_config_flags,
    evaluate,
    init_model,
    main,
    train,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "tiny_summaries.jsonl"
TINY = json.dumps(dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                       decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                       max_position_embeddings=256))
RUN = dict(steps=20, batch_size=4, lr=0.1, label_smoothing=0.0, max_source_len=128, max_target_len=32, seed=0,
           progress=False)

# Sentences 1, 3, 6 share words with each other; every other sentence uses words found nowhere else.
PRINCIPAL = [1, 3, 6]
DOC = [
    "Zebras nap beside purple volcanoes.",
    "The harbour festival brings boats, music and food to the town.",
    "Seven orange kites drift over frozen lakes.",
    "Music and food stalls line the harbour during the festival.",
    "Lonely violinists practise scales at midnight.",
    "Grey owls hunt mice inside abandoned barns.",
    "Boats from the town join the festival parade with music.",
    "Copper kettles whistle within tiny kitchens.",
    "Brave squirrels juggle acorns near still ponds.",
    "Old clocks tick slowly upstairs.",
]


def plain_words(s: str) -> set[str]:
    return set(re.sub(r"[^a-z ]", "", s.lower()).split())


# ----------------------------------------------------------------------------- GSG


def test_split_sentences():
    assert split_sentences("  Hello world. How are you?  Fine!\nThanks.  ") == \
        ["Hello world.", "How are you?", "Fine!", "Thanks."]
    assert split_sentences("No final stop here") == ["No final stop here"]
    assert split_sentences("Wait... what?! Yes.") == ["Wait...", "what?!", "Yes."]
    assert split_sentences("   ") == []


def test_rouge1_f1_by_hand():
    a, b = "the cat sat on the mat".split(), "the cat ate".split()
    # Orig: overlap min(2,1) "the" + "cat" = 2; P = 2/6, R = 2/3, F1 = 4/9.
    assert rouge1_f1(a, b) == pytest.approx(4 / 9)
    assert rouge1_f1(b, a) == pytest.approx(4 / 9)
    # Uniq: sets of 5 and 3 words, overlap 2; P = 2/5, R = 2/3, F1 = 1/2.
    assert rouge1_f1(a, b, unique=True) == pytest.approx(1 / 2)
    assert rouge1_f1(a, ["dog"]) == 0.0 and rouge1_f1([], a) == 0.0


def test_rouge1_f1_matches_rouge_score_package():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    texts = DOC + ["the the the cat", "Cats, dogs & the 3 mice: the end!", "music music and food"]
    for x in texts:
        for y in texts[::2]:
            expected = scorer.score(x, y)["rouge1"].fmeasure
            assert rouge1_f1(re.findall(r"[a-z0-9]+", x.lower()), re.findall(r"[a-z0-9]+", y.lower())) == \
                pytest.approx(expected, rel=1e-6)  # float32, as the original (test_gsg_ties.py)


@pytest.mark.parametrize("n, ratio, expected", [(10, 0.3, 3), (7, 0.3, 2), (20, 0.3, 6), (3, 0.3, 1), (1, 0.3, 1),
                                                (10, 0.45, 4), (4, 1.0, 4), (0, 0.3, 0)])
def test_num_gap_sentences_rounds_down_with_at_least_one(n, ratio, expected):
    assert num_gap_sentences(n, ratio) == expected


def test_ind_orig_selects_principal_sentences():
    for a in PRINCIPAL:  # the construction: principal sentences share words only among themselves
        assert plain_words(DOC[a]) & set.union(*(plain_words(DOC[b]) for b in PRINCIPAL if b != a))
    others = [i for i in range(len(DOC)) if i not in PRINCIPAL]
    for i in others:
        assert not plain_words(DOC[i]) & set.union(*(plain_words(DOC[j]) for j in range(len(DOC)) if j != i))
    for strategy in ("ind-orig", "ind-uniq"):
        assert select_gap_sentences(DOC, 0.3, strategy) == PRINCIPAL


def test_seq_avoids_redundant_sentences_that_ind_takes():
    # Two identical sentences score highest independently (each matches the other), so Ind takes both.
    # Seq (Algorithm 1) scores the selected set against what remains: once one copy is selected, the
    # second copy no longer matches anything left, so it picks one copy and one other sentence.
    doc = ["Copper kettles whistle loudly.", "Copper kettles whistle loudly.", "Owls hunt mice.", "Owls sleep.",
           "Zebras nap.", "Lonely violins."]
    assert select_gap_sentences(doc, 0.34, "ind-orig") == [0, 1]
    for strategy in ("seq-orig", "seq-uniq"):
        chosen = select_gap_sentences(doc, 0.34, strategy)
        assert len(chosen) == 2 and len(set(chosen) & {0, 1}) == 1 and set(chosen) - {0, 1} <= {2, 3}


def test_gsg_example_form():
    source, target = make_gsg_example(" ".join(DOC))
    expected_source = " ".join("<mask_1>" if i in PRINCIPAL else s for i, s in enumerate(DOC))
    assert source == expected_source
    assert source.count("<mask_1>") == len(PRINCIPAL)
    assert target == " ".join(DOC[i] for i in PRINCIPAL)  # document order, space-joined


def test_lead_and_random_strategies():
    sentences = [f"Sentence number {i} is here." for i in range(20)]
    assert select_gap_sentences(sentences, 0.3, "lead") == [0, 1, 2, 3, 4, 5]
    picks = [select_gap_sentences(sentences, 0.3, "random", seed=s) for s in range(5)]
    assert all(p == sorted(set(p)) and len(p) == 6 for p in picks)
    assert picks[0] == select_gap_sentences(sentences, 0.3, "random", seed=0)  # reproducible
    assert len({tuple(p) for p in picks}) > 1  # and not the same for every seed
    text = " ".join(sentences)
    assert make_gsg_example(text, strategy="random", seed=3) == make_gsg_example(text, strategy="random", seed=3)
    assert make_gsg_example(text, strategy="lead")[1] == " ".join(sentences[:6])


def test_mlm_masks_a_fraction_of_unselected_words_only():
    sentences = [f"Word{i}a word{i}b word{i}c word{i}d word{i}e word{i}f word{i}g word{i}h." for i in range(20)]
    text = " ".join(sentences)
    n_unselected_words = 8 * (20 - 6)
    masked = replaced = 0
    for seed in range(30):
        chosen = select_gap_sentences(sentences, 0.3, "random", seed=seed)
        source, target = make_gsg_example(text, 0.3, "random", mlm_prob=0.15, seed=seed)
        assert target == " ".join(sentences[i] for i in chosen)  # targets are never noised
        tokens = source.split()
        assert tokens.count("<mask_1>") == 6
        original = [w for i, s in enumerate(sentences) if i not in chosen for w in s.split()]
        noisy = [w for w in tokens if w != "<mask_1>"]
        assert len(noisy) == len(original)  # same words, in place
        changed = [(o, n) for o, n in zip(original, noisy) if o != n]
        assert len(changed) <= int(n_unselected_words * 0.15)  # 16 words are picked, some stay as they are
        masked += sum(n == "<mask_2>" for _, n in changed)
        replaced += sum(n != "<mask_2>" for _, n in changed)
    # 30 documents x 16 picked words: 80% -> <mask_2> (expected 384), 10% -> another word (<= 48).
    assert 330 <= masked <= 430
    assert 15 <= replaced <= 70


def test_gsg_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown strategy"):
        select_gap_sentences(DOC, 0.3, "best")
    with pytest.raises(ValueError, match="ratio"):
        select_gap_sentences(DOC, 0.0)
    with pytest.raises(ValueError, match="mlm_prob"):
        make_gsg_example("A. B.", mlm_prob=1.0)
    with pytest.raises(ValueError, match="no sentences"):
        make_gsg_example("  ")


# ----------------------------------------------------------------------------- data and config


def test_malformed_lines_name_file_and_line(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"text": "a", "summary": "b"}\n\n{"text": "c", "summary": \n')
    with pytest.raises(ValueError, match=r"train\.jsonl:3: not valid JSON"):
        read_jsonl(bad, ("text", "summary"))
    bad.write_text('{"text": "a", "summary": "b"}\n{"text": "c"}\n')
    with pytest.raises(ValueError, match=r"train\.jsonl:2: missing field 'summary'"):
        read_jsonl(bad, ("text", "summary"))
    bad.write_text('{"text": "a", "summary": 3}\n')
    with pytest.raises(ValueError, match=r"train\.jsonl:1: field 'summary' must be a non-empty string"):
        read_jsonl(bad, ("text", "summary"))
    with pytest.raises(FileNotFoundError):
        read_jsonl(tmp_path / "missing.jsonl", ("text",))


def test_cli_reports_bad_data_in_one_line(tmp_path, spiece_model):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"text": "a", "summary": "b"}\n[1, 2]\n')
    with pytest.raises(SystemExit) as e:
        main(["--init-config", TINY, "--tokenizer", str(spiece_model), "--data", str(bad), "--out",
              str(tmp_path / "out")])
    assert str(e.value.code).startswith("train.py: error: ") and "train.jsonl:2: expected a JSON object" in str(
        e.value.code)


def test_read_documents_splits_on_blank_lines(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("First doc, line one.\nStill first doc.\n\n\nSecond doc.\n  \nThird doc.\n")
    assert read_documents(corpus) == ["First doc, line one. Still first doc.", "Second doc.", "Third doc."]
    assert read_documents(DATA)[0] == read_jsonl(DATA, ("text", "summary"))[0][0]


def test_init_config_specs(tmp_path):
    with torch.device("meta"):  # shapes only: a published-size model costs nothing here
        big = init_model("google/pegasus-xsum")
        x = init_model('{"model_type": "pegasus_x", "d_model": 64, "encoder_attention_heads": 4, '
                       '"decoder_attention_heads": 4, "encoder_layers": 1, "decoder_layers": 1}')
    assert (big.config.d_model, big.config.max_position_embeddings, big.config.encoder_layers) == (1024, 512, 16)
    assert type(x).__name__ == "PegasusX" and x.config.d_model == 64
    tiny = init_model(TINY)
    assert tiny.config.vocab_size == 96103 and tiny.config.d_model == 64 and len(tiny.encoder.layers) == 2
    with pytest.raises(ValueError, match="unknown config fields"):
        init_model('{"d_modle": 64}')
    with pytest.raises(ValueError, match="not valid JSON"):
        init_model('{"d_model": }')
    with pytest.raises(FileNotFoundError, match="not a published name"):
        init_model(str(tmp_path / "nope.json"))


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(tokenizer, tmp_path_factory):
    """A tiny model fine-tuned for 20 steps from random init; checkpoint saved at the end."""
    out = tmp_path_factory.mktemp("full")
    torch.manual_seed(0)
    model = init_model(TINY)
    history = train(model, tokenizer, DATA, out_dir=out, **RUN)
    return model, history, out


def test_finetuning_lowers_the_loss(trained):
    _, history, out = trained
    assert len(history) == 20
    assert history[0] > 11.0  # about ln(96103) = 11.47: random init predicts nothing
    assert sum(history[-3:]) / 3 < history[0] - 3.0
    state = torch.load(out / "trainer_state.pt", weights_only=True)
    assert state["step"] == 20 and state["examples_seen"] == 80 and state["loss_history"] == history


def test_checkpoint_reloads_here_and_in_transformers(trained, tokenizer):
    transformers = pytest.importorskip("transformers")
    model, _, out = trained
    ours, tok = load_model(out)
    for k, v in model.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    ref = transformers.PegasusForConditionalGeneration.from_pretrained(out).eval()
    pairs = read_jsonl(DATA, ("text", "summary"))[:3]
    ids, mask = tok.batch_encode([t for t, _ in pairs], 128)
    labels, _ = tok.batch_encode([s for _, s in pairs], 32)
    decoder_ids = torch.cat([torch.zeros_like(labels[:, :1]), labels[:, :-1]], dim=1)
    with torch.no_grad():
        a = ours(ids, mask, decoder_ids)
        b = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    assert (a - b).abs().max() / b.abs().max() <= 1e-5
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_resume_continues_exactly(trained, tokenizer, tmp_path):
    _, history, _ = trained  # the uninterrupted run is the reference for the first 8 steps
    torch.manual_seed(0)
    first = train(init_model(TINY), tokenizer, DATA, out_dir=tmp_path, **(RUN | {"steps": 4}))
    assert first == pytest.approx(history[:4], rel=1e-6)
    assert torch.load(tmp_path / "trainer_state.pt", weights_only=True)["step"] == 4
    torch.manual_seed(123)  # the fresh weights are replaced by the checkpoint's
    resumed = train(init_model(TINY), tokenizer, DATA, out_dir=tmp_path, resume=tmp_path, **(RUN | {"steps": 8}))
    assert len(resumed) == 8
    assert resumed == pytest.approx(history[:8], rel=1e-6)  # as if never stopped: same batches, dropout, state
    state = torch.load(tmp_path / "trainer_state.pt", weights_only=True)
    assert state["step"] == 8 and state["examples_seen"] == 32


def test_evaluate_scores_greedy_summaries(trained, tokenizer):
    model, _, _ = trained
    model.train()
    pairs = read_jsonl(DATA, ("text", "summary"))[:4]
    scores = evaluate(model, tokenizer, pairs, max_source_len=128, max_target_len=16, batch_size=2)
    assert set(scores) == {"rouge1", "rouge2", "rougeL"}
    assert all(0.0 <= v <= 100.0 for v in scores.values())
    assert scores["rouge1"] > 0  # 20 steps already teach frequent summary words
    assert model.training  # the mode is restored


def test_cli_pretrains_with_gsg_evaluates_and_resumes(tmp_path, spiece_model):
    pairs = read_jsonl(DATA, ("text", "summary"))
    corpus, held_out = tmp_path / "corpus.txt", tmp_path / "val.jsonl"
    corpus.write_text("\n\n".join(t for t, _ in pairs[:8]))
    held_out.write_text("\n".join(json.dumps({"text": t, "summary": s}) for t, s in pairs[-2:]))
    out = tmp_path / "run"
    common = ["--objective", "gsg", "--data", str(corpus), "--batch-size", "2", "--max-source-len", "128",
              "--max-target-len", "16", "--device", "cpu"]
    cmd = [sys.executable, str(ROOT / "train.py"), "--init-config", TINY, "--tokenizer", str(spiece_model),
           "--steps", "3", "--eval-data", str(held_out), "--eval-every", "2", "--out", str(out)] + common
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "step 2: rouge1" in done.stdout and "step 3: rouge1" in done.stdout  # every 2 steps and at the end
    assert "step 3: loss" in done.stdout
    model, _ = load_model(out)
    assert model.config.d_model == 64
    cmd = [sys.executable, str(ROOT / "train.py"), "--resume", str(out), "--steps", "5"] + common
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    state = torch.load(out / "trainer_state.pt", weights_only=True)
    assert state["step"] == 5 and len(state["loss_history"]) == 5 and state["examples_seen"] == 10


# ----------------------------------------------------------------------------- config, command line, memory/speed flags


def test_command_line_is_generated_from_train_config():
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    defaults = parser.parse_args([])
    for f in fields(TrainConfig):  # every field a flag, with the field's default and its comment as help
        assert getattr(defaults, f.name) == f.default, f.name
        action = next(a for a in parser._actions if a.dest == f.name)
        assert action.help and not action.help.startswith(" (default"), f.name
    args = parser.parse_args(["--steps", "7", "--lr", "0.5", "--bf16", "--gsg-strategy", "seq-uniq", "--out", "x",
                              "--no-progress", "--eval-data", "v.jsonl"])
    assert (args.steps, args.lr, args.bf16, args.gsg_strategy, args.out_dir, args.progress, args.eval_data) == \
        (7, 0.5, True, "seq-uniq", "x", False, "v.jsonl")
    with pytest.raises(SystemExit):  # choices come from the Literal type
        parser.parse_args(["--objective", "mlm"])
    with pytest.raises(SystemExit) as e:  # where to start from: exactly one of three
        main(["--model", "m", "--resume", "r", "--data", "d.jsonl"])
    assert e.value.code == 2


def test_config_object_and_keyword_overrides_agree(tokenizer):
    config = TrainConfig(**(RUN | {"steps": 2}))
    histories = []
    for kwargs in ({"config": config}, {"config": TrainConfig(steps=99, lr=3.0), **RUN, "steps": 2}):
        torch.manual_seed(0)
        histories.append(train(init_model(TINY), tokenizer, DATA, **kwargs))
    assert len(histories[0]) == 2 and histories[0] == histories[1]


def test_grad_checkpointing_recomputes_layers_and_keeps_gradients(tokenizer):
    torch.manual_seed(0)
    model = init_model(TINY).train()  # dropout 0.1: recomputation must replay the same masks
    pairs = read_jsonl(DATA, ("text", "summary"))[:2]
    ids, mask = tokenizer.batch_encode([t for t, _ in pairs], 64)
    labels, label_mask = tokenizer.batch_encode([s for _, s in pairs], 16)
    labels = labels.masked_fill(label_mask == 0, -100)
    calls = []
    model.encoder.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))  # recomputation may stop early
    grads = []
    for on in (False, True):
        model.grad_checkpoint, calls[:] = on, []
        model.zero_grad()
        torch.manual_seed(1)
        model.loss(ids, mask, labels).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        assert len(calls) == (2 if on else 1)  # checkpointed: run again in backward
    for k, g in grads[0].items():
        assert torch.allclose(grads[1][k], g, rtol=1e-5, atol=1e-7), k


def test_bf16_autocast_is_opt_in_and_close_to_float32(tokenizer):
    losses = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        model = init_model(TINY)
        losses[bf16] = train(model, tokenizer, DATA, **(RUN | {"steps": 3, "bf16": bf16}))
        assert model.shared.weight.dtype == torch.float32  # the weights stay float32
    assert losses[True] != losses[False]  # autocast did run in bfloat16
    for a, b in zip(losses[True], losses[False]):
        assert abs(a - b) <= 1e-3 * b  # measured: about 1e-5 relative on this model (3 steps)
