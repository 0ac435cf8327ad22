"""evaluate.py: ROUGE the paper's way, resumable output, one-line errors.

The checkpoint is a tiny random model with the real PEGASUS vocabulary (../shared/pegasus/spiece.model)
whose output is limited to a dozen words; its cross-attention is scaled up so that different texts get
different summaries. Its summaries are meaningless: the tests check the scoring and the bookkeeping,
with the expected scores recomputed here with `rouge-score` directly.
"""

import json
from pathlib import Path

import pytest
import torch

import evaluate
from load_weights import save_model
from pegasus import Pegasus, PegasusConfig
from tokenizer import OFFSET, PegasusTokenizer, n_to_newline

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

DATA = Path(__file__).resolve().parents[1] / "data" / "tiny_summaries.jsonl"
WORDS = ["▁The", "▁library", "▁will", "▁close", ".", "▁council", "▁town", "▁new", "<n>", "▁bakery", "▁farms"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, spiece_model):
    tokenizer = PegasusTokenizer.from_spiece(spiece_model)
    torch.manual_seed(0)
    model = Pegasus(PegasusConfig(vocab_size=96103, d_model=16, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                  decoder_ffn_dim=32, max_position_embeddings=128))
    with torch.no_grad():
        model.shared.weight.mul_(25)
        cross = model.decoder.layers[0].encoder_attn
        cross.v_proj.weight.mul_(10)
        cross.out_proj.weight.mul_(10)
        model.final_logits_bias.fill_(-1000.0)  # only WORDS and </s> can be written
        for piece in WORDS:
            model.final_logits_bias[0, tokenizer.sp.piece_to_id(piece) + OFFSET] = 0.0
        model.final_logits_bias[0, tokenizer.eos_token_id] = 0.0
    model.generation_config = {"num_beams": 2, "max_length": 12, "length_penalty": 0.6}
    path = tmp_path_factory.mktemp("tiny")
    save_model(model, path, tokenizer)
    return path


def records(path=DATA):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def by_hand(predictions, references):
    """The paper's scoring recomputed with rouge-score: stemming, <n> as a newline, mean F1 x 100."""
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "rougeLsum": 0.0}
    for p, r in zip(predictions, references):
        s = scorer.score(r.replace("<n>", "\n"), p.replace("<n>", "\n"))
        for k in totals:
            totals[k] += s[k].fmeasure
    return {k: 100 * v / len(predictions) for k, v in totals.items()}


def run(capsys, *args):
    try:
        code = evaluate.main([str(a) for a in args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_scores_are_rouge_score_on_its_own_predictions(checkpoint, tmp_path, capsys):
    output = tmp_path / "predictions.jsonl"
    code, out, err = run(capsys, "--model", checkpoint, "--data", DATA, "--output", output, "--batch-size", 4)
    assert code == 0, err
    scores = json.loads(out.strip().splitlines()[-1])  # the last line is the JSON object
    assert set(scores) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert "ROUGE-Lsum" in out
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    inputs = records()
    assert [{k: v for k, v in r.items() if k != "prediction"} for r in rows] == inputs  # same records, in order
    predictions = [r["prediction"] for r in rows]
    assert len(set(predictions)) > 1  # the texts get different summaries
    expected = by_hand(predictions, [r["summary"] for r in inputs])
    assert scores == pytest.approx(expected, abs=1e-4)  # printed to 4 decimals
    assert 0 < scores["rouge1"] < 100


def test_without_output_scores_the_same(checkpoint, tmp_path, capsys):
    # No --output: nothing is written (this once tried to fsync /dev/null), the scores are the same.
    output = tmp_path / "predictions.jsonl"
    code, out, err = run(capsys, "--model", checkpoint, "--data", DATA, "--output", output, "--batch-size", 4)
    assert code == 0, err
    code, plain, err = run(capsys, "--model", checkpoint, "--data", DATA, "--batch-size", 4)
    assert code == 0, err
    assert json.loads(plain.strip().splitlines()[-1]) == json.loads(out.strip().splitlines()[-1])


def test_lsum_is_summary_level_and_n_is_a_newline():
    reference = "Cats sleep all day.\nDogs bark at night."
    prediction = "Dogs bark at night.<n> Cats sleep all day."
    # Tokens (stemmed): cat sleep all day dog bark at night, and the same two sentences swapped.
    # ROUGE-L: the longest common subsequence of the whole texts is one sentence, 4 of 8 tokens:
    #   P = R = 4/8 -> F1 = 50.
    # ROUGE-Lsum: each reference sentence's LCS with the prediction's sentences covers all of it:
    #   8 of 8 -> F1 = 100. ROUGE-1 = 100; ROUGE-2: 6 of 7 bigrams ("day dog" vs "night cat") -> 600/7.
    scores = evaluate.rouge([prediction], [reference])
    assert scores["rougeL"] == pytest.approx(50.0)
    assert scores["rougeLsum"] == pytest.approx(100.0)
    assert scores["rouge1"] == pytest.approx(100.0)
    assert scores["rouge2"] == pytest.approx(600 / 7)
    # Left as the literal "<n>", the prediction is one "sentence" with an extra token "n" (rouge-score
    # keeps [a-z0-9] runs): Lsum's union LCS still finds all 8 reference tokens, but among 9:
    # P = 8/9, R = 1 -> F1 = 16/17, and ROUGE-1 drops the same way.
    raw = rouge_scorer.RougeScorer(["rouge1", "rougeLsum"], use_stemmer=True).score(reference, prediction)
    assert 100 * raw["rougeLsum"].fmeasure == pytest.approx(1600 / 17) == 100 * raw["rouge1"].fmeasure
    # For display, "<n>" becomes a line break and the spaces around it go.
    assert n_to_newline("Dogs bark.<n> Cats sleep. <n>Birds sing.") == "Dogs bark.\nCats sleep.\nBirds sing."
    # Stemming: "cats" matches "cat".
    assert evaluate.rouge(["two cats"], ["two cat"])["rouge1"] == pytest.approx(100.0)


def test_resume_completes_a_partial_output_without_regenerating(checkpoint, tmp_path, capsys, monkeypatch):
    inputs = records()
    output = tmp_path / "predictions.jsonl"
    done = [json.dumps(r | {"prediction": f"kept {i}"}) + "\n" for i, r in enumerate(inputs[:10])]
    half = json.dumps(inputs[10] | {"prediction": "cut off"})[:25]  # an interrupted write: no newline
    output.write_text("".join(done) + half)
    summarized = []
    real = evaluate.summarize

    def counting(texts, *a, **kw):
        summarized.extend(texts)
        return real(texts, *a, **kw)

    monkeypatch.setattr(evaluate, "summarize", counting)
    code, out, err = run(capsys, "--model", checkpoint, "--data", DATA, "--output", output, "--batch-size", 4)
    assert code == 0, err
    assert summarized == [r["text"] for r in inputs[10:]]  # only the records not yet done, each once
    lines = output.read_text().splitlines(keepends=True)
    assert lines[:10] == done and len(lines) == len(inputs)  # kept as they were, none twice
    rows = [json.loads(line) for line in lines]
    assert [{k: v for k, v in r.items() if k != "prediction"} for r in rows] == inputs
    assert "cut off" not in output.read_text()
    first = json.loads(out.strip().splitlines()[-1])
    # A second run has nothing left to summarize and scores the same file.
    summarized.clear()
    code, out, err = run(capsys, "--model", checkpoint, "--data", DATA, "--output", output)
    assert code == 0 and summarized == [] and json.loads(out.strip().splitlines()[-1]) == first
    assert output.read_text().splitlines(keepends=True) == lines


def test_an_output_from_other_data_is_refused_before_loading(tmp_path, capsys):
    output = tmp_path / "predictions.jsonl"
    output.write_text(json.dumps({"text": "Another text.", "summary": "Other.", "prediction": "x"}) + "\n")
    code, _, err = run(capsys, "--model", tmp_path / "no-such-model", "--data", DATA, "--output", output)
    assert code == 2 and err == f"error: {output}:1: is not data record 1; it belongs to other data: " \
                                 "delete it or choose another --output\n"


def test_the_data_file_as_output_is_refused_before_loading(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(DATA.read_text())
    code, _, err = run(capsys, "--model", tmp_path / "no-such-model", "--data", data, "--output", data)
    assert code == 2 and err == f"error: --output {data} is the input file {data}; write the summaries to " \
                                 "another file\n"
    assert data.read_text() == DATA.read_text()


@pytest.mark.parametrize("line, problem", [
    ('{"text": "A text."', "2: not valid JSON"),
    ('{"text": "A text."}', "2: missing field 'summary'"),
    ('{"text": "A text.", "summary": ""}', "2: field 'summary' must be a non-empty string"),
])
def test_bad_data_lines_name_file_and_line(tmp_path, capsys, line, problem):
    data = tmp_path / "test.jsonl"
    data.write_text('{"text": "Fine.", "summary": "Fine."}\n' + line + "\n")
    # The model does not exist: the data is checked first, so that is never reached.
    code, out, err = run(capsys, "--model", tmp_path / "no-such-model", "--data", data)
    assert code == 2 and out == ""
    assert err.startswith(f"error: {data}:{problem}") and err.count("\n") == 1


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1 (got 0)"),
    (["--num-beams", "0"], "--num-beams must be at least 1 (got 0)"),
    (["--dtype", "float16"], "float16 is not supported on CPU"),
    (["--batch-size", "many"], "argument --batch-size: invalid int value: 'many'"),
])
def test_bad_flags_get_one_line_and_exit_2(tmp_path, capsys, flags, message):
    code, out, err = run(capsys, "--model", tmp_path / "no-such-model", "--data", DATA, *flags)
    assert code == 2 and out == "" and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_missing_model_is_exit_1(tmp_path, capsys):
    code, out, err = run(capsys, "--model", tmp_path / "no-such-model", "--data", DATA)
    assert code == 1 and out == "" and err.startswith("error: ") and err.count("\n") == 1
