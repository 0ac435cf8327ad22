"""Long-input benchmark: PEGASUS-X at the google/pegasus-x-base shape vs transformers.

    python -m benchmarks.long_inputs                              # 4,096 and 16,384 tokens, ours and the reference
    python -m benchmarks.long_inputs --lengths 4096 --impls ours  # one cell
    python -m benchmarks.speed --long 4096 16384                  # the same, from the speed benchmark

For each (implementation, input length) a fresh subprocess loads the same random-weight checkpoint (fp32, CPU),
times the encoder alone, then greedy generation of `--new-tokens` tokens (encoder included, EOS blocked so both
produce exactly that many), and reports its peak resident memory (ru_maxrss / VmHWM, weights and loading included)
and the peak above the loaded model while it runs ("activations"), which is what must grow linearly with the input.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import IMPLS, build_checkpoint, load_ours, serve, spawn, verdict

SHAPE = "google/pegasus-x-base"


def rss_gb(field: str = "VmHWM") -> float:
    """VmRSS: resident memory now; VmHWM: its peak (since start or the last reset_peak). Linux only."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20  # kB -> GB
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak():
    Path("/proc/self/clear_refs").write_text("5")  # restart VmHWM from the current RSS (Linux >= 4.0)


def run_one(impl: str, checkpoint: str, length: int, new_tokens: int) -> dict:
    """One measurement; runs in its own process (common.spawn) so that the peak memory is this cell's alone."""
    torch.manual_seed(1)
    if impl in IMPLS:
        from decoding import generate

        model, argmax = load_ours(impl, checkpoint, step_rows=1)  # one document, greedy: as the CLI packs it
        encode = lambda ids, mask: model.encode(ids, mask)
        greedy = lambda ids, mask: generate(model, ids, mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                            num_beams=1, argmax=argmax)
    else:
        import transformers

        model = transformers.PegasusXForConditionalGeneration.from_pretrained(checkpoint).eval()
        encode = lambda ids, mask: model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        greedy = lambda ids, mask: model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                                                  min_new_tokens=new_tokens, num_beams=1, do_sample=False)
    with torch.no_grad():  # page in memory-mapped weights now, so that they count as "model", not "activations"
        sum(float(p.sum()) for p in model.parameters())
    load_peak = rss_gb("VmHWM")  # not ru_maxrss: it starts at the parent's resident size (common.peak_rss)
    loaded = rss_gb("VmRSS")
    reset_peak()
    ids = torch.randint(2, model.config.vocab_size, (1, length))  # (1, S)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        encode(ids[:, :512], mask[:, :512])  # warm-up (lazy initialisation), as speed.py does; not timed
        t = time.perf_counter()
        encode(ids, mask)
        encoder_s = time.perf_counter() - t
        t = time.perf_counter()
        out = greedy(ids, mask)
        generate_s = time.perf_counter() - t
    run_peak = rss_gb("VmHWM")
    return dict(impl=impl, length=length, encoder_s=encoder_s, generate_s=generate_s, new_tokens=out.size(1) - 1,
                loaded_gb=loaded, peak_gb=max(load_peak, run_peak), activations_gb=run_peak - loaded,
                threads=torch.get_num_threads())


def bench_long(lengths=(4096, 16384), impls=(*IMPLS, "reference"), new_tokens: int = 63,
               checkpoint=None) -> list:
    """Every (length, implementation) cell in a fresh subprocess; returns the rows and prints a table."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if checkpoint is None:
            checkpoint = build_checkpoint(SHAPE, Path(tmp) / "pegasus-x-base-random")
        for length in lengths:
            for impl in impls:
                try:
                    rows.append(spawn("long_inputs", impl=impl, checkpoint=str(checkpoint), length=length,
                                      new_tokens=new_tokens))
                except RuntimeError as e:
                    raise RuntimeError(f"{impl} at {length} tokens failed: {e}") from None
                print_row(rows[-1])
    summarize(rows)
    return rows


def print_row(r: dict):
    print(f"{r['impl']:>9} {r['length']:>6} tokens: encoder {r['encoder_s']:6.1f} s  greedy {r['new_tokens']} new "
          f"tokens {r['generate_s']:6.1f} s  peak RSS {r['peak_gb']:.2f} GB (model {r['loaded_gb']:.2f} + "
          f"activations {r['activations_gb']:.2f})", flush=True)


def summarize(rows: list):
    cell = {(r["impl"], r["length"]): r for r in rows}
    lengths = sorted({r["length"] for r in rows})
    for n, impl in [(n, impl) for n in lengths for impl in IMPLS]:
        ours, ref = cell.get((impl, n)), cell.get(("reference", n))
        if ours and ref:
            greedy = ours['generate_s'] / ref['generate_s']
            # the issue's target: the int8 path (encoder and decoding) at most half transformers' float32 time
            target = f"; target {verdict(greedy, 0.5)}" if impl == "ours+int8" else ""
            print(f"{n:>6} tokens, {impl} / reference: encoder {ours['encoder_s'] / ref['encoder_s']:.2f}x, "
                  f"greedy {greedy:.2f}x, peak RSS {ours['peak_gb'] / ref['peak_gb']:.2f}x" + target)
    for impl in (*IMPLS, "reference"):
        if len(lengths) > 1 and all((impl, n) in cell for n in lengths):
            a, b = cell[(impl, lengths[0])], cell[(impl, lengths[-1])]
            print(f"{impl}: {lengths[-1] / lengths[0]:.0f}x the input -> activations x"
                  f"{b['activations_gb'] / max(a['activations_gb'], 1e-3):.1f}, encoder time x"
                  f"{b['encoder_s'] / a['encoder_s']:.1f}")


if __name__ == "__main__":
    serve(run_one)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--impls", nargs="+", default=[*IMPLS, "reference"], choices=[*IMPLS, "reference"])
    p.add_argument("--new-tokens", type=int, default=63, help="greedy tokens after the start token (EOS blocked)")
    p.add_argument("--checkpoint", help="a pegasus_x checkpoint directory (default: random weights, base shape)")
    args = p.parse_args()
    bench_long(args.lengths, args.impls, args.new_tokens, args.checkpoint)
