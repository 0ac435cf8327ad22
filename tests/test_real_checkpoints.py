"""Opt-in checks against a real published checkpoint on disk.

No checkpoint can be downloaded where the suite runs, so these tests run only when an environment
variable names a local checkpoint directory (Hugging Face layout), e.g.

    PEGASUS_XSUM_DIR=~/ckpt/pegasus-xsum python -m pytest tests/test_real_checkpoints.py

The expectations are the ones the reference library's own integration tests record
(../shared/reference/expected_outputs.md); they are repeated here so the test runs without ../shared.
"""

import os

import pytest
import torch

from generate import generate
from load_weights import load_model

XSUM_DIR = os.environ.get("PEGASUS_XSUM_DIR")
needs_xsum = pytest.mark.skipif(not XSUM_DIR, reason="set PEGASUS_XSUM_DIR to a local google/pegasus-xsum checkpoint")

ARTICLE = (" PG&E stated it scheduled the blackouts in response to forecasts for high winds amid dry conditions. The "
           "aim is to reduce the risk of wildfires. Nearly 800 thousand customers were scheduled to be affected by the "
           "shutoffs which were expected to last through at least midday tomorrow.")
SUMMARY = "California's largest electricity provider has turned off power to hundreds of thousands of customers."


@pytest.fixture(scope="module")
def xsum():
    return load_model(XSUM_DIR)


@needs_xsum
def test_xsum_tokenizer_ids(xsum):
    _, tok = xsum
    assert tok.encode("To ensure a smooth flow of bank resolutions.") == [413, 615, 114, 2291, 1971, 113, 1679, 10710,
                                                                          107, 1]
    assert tok.encode("<mask_1> To ensure a <mask_2> flow of bank resolutions.") == [2, 413, 615, 114, 3, 1971, 113,
                                                                                     1679, 10710, 107, 1]
    assert tok.vocab_size == 96103 and tok.unk_token_id == 105


@needs_xsum
@pytest.mark.parametrize("num_beams", [2, None])  # 2 as in the reference test; None = the checkpoint's default (8)
def test_xsum_summary(xsum, num_beams):
    model, tok = xsum
    ids, mask = tok.batch_encode([ARTICLE])
    with torch.inference_mode():
        out = generate(model, ids, mask, num_beams=num_beams)
    assert tok.decode(out[0]) == SUMMARY
