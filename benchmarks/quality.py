"""Reduced precision against float32 on the same model, on real text: int8 (quantize.py) and bfloat16.

    python -m benchmarks.quality [--checkpoint DIR] [--no-bf16]

The model is one of the benchmark checkpoints (random weights at the pegasus-xsum shape, written by
common.build_checkpoint) with the real vocabulary (../shared/pegasus/spiece.model): the encoder reads
benchmarks/speed.py's ~500-token article and the decoder is teacher-forced on the article's own
first 128 tokens. Printed: max and mean |dlogit| over all positions and tokens, relative to the
float32 logits' standard deviation, and the top-1 agreement over the decoder positions.

What this does and does not show: the arithmetic is the published model's (shapes, 16 + 16 layers,
real token ids and lengths), so the error that quantization adds and carries through the layers is
measured at full size. But random weights have no trained structure: their logits are nearly flat
(top-1 margins much smaller than a trained model's), which makes top-1 agreement here a pessimistic
figure, and trained weights have outlier rows and activations that random ones lack. The trained toy
models in tests/test_quantize.py and tests/test_int8_model.py measure generated-id agreement.
"""

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks.common import build_checkpoint


def compare(ref: torch.Tensor, out: torch.Tensor) -> str:
    d, spread = (out.float() - ref).abs(), ref.std()
    top1 = (out.float().argmax(-1) == ref.argmax(-1)).float().mean()
    return (f"max |dlogit| {d.max() / spread:.3f}, mean {d.mean() / spread:.4f} (x std of the logits), top-1 "
            f"{top1:.4f} ({ref.argmax(-1).unique().numel()} distinct float32 top-1 tokens)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="a benchmark checkpoint (default: build one)")
    p.add_argument("--no-bf16", action="store_true", help="skip bfloat16 (slow on CPUs without bf16 kernels)")
    args = p.parse_args()
    from benchmarks.speed import ARTICLE
    from load_weights import load_model

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or build_checkpoint("google/pegasus-xsum", Path(tmp) / "model")
        model, tok = load_model(ckpt)
        ids = torch.tensor([tok.encode(ARTICLE)])  # (1, S)
        dec = torch.cat([torch.zeros(1, 1, dtype=torch.long), ids[:, :127]], dim=1)  # (1, 128) teacher forcing
        print(f"{ckpt}: {ids.size(1)} source tokens, {dec.size(1)} decoder positions, real vocabulary")
        with torch.no_grad():
            ref = model(ids, None, dec)  # (1, 128, V) float32
            del model
            q, _ = load_model(ckpt, with_tokenizer=False, quantize="int8")
            print("int8     vs float32:", compare(ref, q(ids, None, dec)))
            del q
            if not args.no_bf16:
                b, _ = load_model(ckpt, with_tokenizer=False, dtype="bfloat16")
                print("bfloat16 vs float32:", compare(ref, b(ids, None, dec)))


if __name__ == "__main__":
    main()
