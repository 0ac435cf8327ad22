"""Summarize a test set and score it with ROUGE the way the PEGASUS paper did.

    python evaluate.py --model google/pegasus-xsum --data test.jsonl --output predictions.jsonl

`--data` is JSON lines with a "text" and a "summary" (the reference) per line. Every text is
summarized (generate.summarize: batched, similar lengths together) and the summaries are scored
against the references with the `rouge-score` package as the authors' evaluation code does
(pegasus/eval/text_eval.py): RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"],
use_stemmer=True), score(reference, prediction), F1 x 100, averaged over the test set.

The conventions that decide whether your numbers can be compared with the paper's:
  * ROUGE-L vs ROUGE-Lsum. "rougeL" is the LCS of the whole texts; "rougeLsum" splits both into
    sentences at newlines and takes the union LCS of each reference sentence with the prediction's
    sentences (summary-level, as the original ROUGE-1.5.5 script). The paper's R-L for multi-sentence
    summaries (CNN/DailyMail, ...) is Lsum; plain L on the same outputs can be 10 points lower. For
    one-sentence summaries (XSum) the two agree.
  * Newlines. Lsum needs them, and the PEGASUS vocabulary has none: the original pipeline encodes
    "\\n" as the piece "<n>" and decodes it back. A checkpoint decoded the reference's way writes a
    literal "<n>" between sentences; both prediction and reference get "<n>" turned into "\\n" here.
  * Stemming (Porter, use_stemmer=True): "cats" matches "cat". Tokens are lowercased [a-z0-9] runs.
  * Averaging: the plain mean over examples. The authors report the mid of rouge-score's
    BootstrapAggregator (a resampled estimate of the same mean), which differs in the second decimal
    at most on a full test set.

With --output, each input record is written back with a "prediction" field, a chunk of batches at a
time, flushed to disk; a rerun with the same --output skips the records already there (matched by
line order) and completes the file, so an interrupted evaluation resumes instead of restarting.
The last line of standard output is the scores as one JSON object, for scripts.
"""

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path

from rouge_score import rouge_scorer
from tqdm import tqdm

from data import read_records
from generate import OneLineParser, add_model_flags, check_model_flags, check_output, load, summarize
from resumable import append_lines, complete_lines, cut_torn_line
from tokenizer import n_to_newline

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
CHUNK_BATCHES = 8  # batches summarized (length-sorted) together, then written: what a crash can lose


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F1 x 100 of predictions against references, the paper's way (see above)."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need as many predictions as references, and some: {len(predictions)} vs {len(references)}")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references):
        # (target, prediction) order, as text_eval.py calls it: precision is measured on the prediction.
        scores = scorer.score(n_to_newline(reference), n_to_newline(prediction))
        for k in ROUGE_TYPES:
            totals[k] += scores[k].fmeasure
    return {k: 100 * totals[k] / len(predictions) for k in ROUGE_TYPES}


def read_done(output: Path, records: list[dict]) -> list[str]:
    """Predictions already in `output` for the first records, checked to be those records in order.
    A last line cut off mid-write (no newline) is dropped from the file: it is generated again."""
    if not output.exists():
        return []
    lines = complete_lines(output)
    if len(lines) > len(records):
        raise ValueError(f"{output} has {len(lines)} lines but the data only {len(records)} records; "
                         "it belongs to other data: delete it or choose another --output")
    done = []
    for n, (line, record) in enumerate(zip(lines, records), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{output}:{n}: not valid JSON ({e.msg}); delete the file to start again") from None
        if not isinstance(row, dict) or not isinstance(row.get("prediction"), str):
            raise ValueError(f"{output}:{n}: no 'prediction' field; delete the file to start again")
        if {k: v for k, v in row.items() if k != "prediction"} != record:
            raise ValueError(f"{output}:{n}: is not data record {n}; it belongs to other data: "
                             "delete it or choose another --output")
        done.append(row["prediction"])
    cut_torn_line(output)  # a half-written last line: generated again
    return done


def evaluate(records: list[dict], model, *, output: Path | None = None, batch_size: int = 8,
             dtype="float32", device="cpu", original: bool = False, quantize: str | None = None,
             **generation_args) -> tuple[list[str], dict[str, float]]:
    """Summaries of every record's "text" and their ROUGE against its "summary". `model` is a hub id,
    a directory or a (model, tokenizer) pair, loaded only if something is left to summarize. With
    `output`, records already there are skipped and new ones appended, one chunk at a time.
    original=True: the checkpoint run as the original code did (generate.summarize)."""
    predictions = read_done(output, records) if output is not None else []
    todo = records[len(predictions):]
    if todo:
        net = model if isinstance(model, tuple) else load(model, dtype, device, original=original, quantize=quantize)
        chunk = batch_size * CHUNK_BATCHES
        with tqdm(total=len(records), initial=len(predictions), unit="summary", file=sys.stderr,
                  disable=None) as bar, \
                (open(output, "a", encoding="utf-8") if output is not None else nullcontext()) as out:
            for start in range(0, len(todo), chunk):
                part = todo[start: start + chunk]
                summaries = summarize([r["text"] for r in part], net, batch_size=batch_size, original=original,
                                      **generation_args)
                if out is not None:  # on disk before the next chunk starts: what is there is complete
                    append_lines(out, [json.dumps(r | {"prediction": s}, ensure_ascii=False)
                                       for r, s in zip(part, summaries)])
                predictions += summaries
                bar.update(len(part))
    return predictions, rouge(predictions, [r["summary"] for r in records])


def table(scores: dict[str, float], n: int) -> str:
    names = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}
    head = f"{'F1 x 100 (' + str(n) + ' summaries)':<28}" + "".join(f"{names[k]:>11}" for k in ROUGE_TYPES)
    return head + "\n" + f"{'':<28}" + "".join(f"{scores[k]:>11.2f}" for k in ROUGE_TYPES)


def main(argv=None) -> int:
    p = OneLineParser(
        description="Summarize a JSON-lines test set and score it with ROUGE as the PEGASUS paper did.",
        epilog="example:\n  python evaluate.py --model google/pegasus-cnn_dailymail --data test.jsonl "
               "--output predictions.jsonl --batch-size 16",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--model", metavar="NAME_OR_DIR", required=True, help="hub id or checkpoint directory")
    add("--data", metavar="PATH", type=Path, required=True,
        help="JSON lines with a 'text' and a reference 'summary' per line")
    add("--output", metavar="PATH", type=Path,
        help="write each record with a 'prediction' field here; a rerun resumes where it stopped")
    add_model_flags(p)
    args = p.parse_args(argv)
    try:  # problems with what was asked: exit status 2, before any model is loaded
        check_model_flags(args)
        records = read_records(args.data, ("text", "summary"))
        if args.output is not None:
            # generate.py's: the input file itself, a missing directory, a directory, no write access
            check_output(args.output, reads=(args.data,))
            read_done(args.output, records)  # a file from other data is refused now, not after the model loads
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:  # problems with the model: exit status 1
        _, scores = evaluate(records, args.model, output=args.output, batch_size=args.batch_size, dtype=args.dtype,
                             device=args.device, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                             length_penalty=args.length_penalty, original=args.original, quantize=args.quantize)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(table(scores, len(records)))
    print(json.dumps({k: round(v, 4) for k, v in scores.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
