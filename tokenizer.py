"""The PEGASUS tokenizer: a SentencePiece unigram model plus PEGASUS's id layout.

The vocabulary has 96,000 SentencePiece pieces but the embedding table 96,103 rows: the original
TensorFlow code reserved the first ids for pretraining. 0 = <pad>, 1 = </s>, 2 = <mask_1> (a
masked *sentence*, the gap-sentence objective), 3 = <mask_2> (a masked *token*, BERT-style), and
4..104 for more masks and experiments that no published checkpoint uses (<unk_2>..<unk_102>, as
Hugging Face names them). So SentencePiece ids are shifted up by 103: its <unk> (2) becomes 105,
its <n> (3) 106. Its own <pad>/</s> (0, 1) are never produced, so 103/104 stay reserved.

encode: cut out special strings like "<mask_1>" -> SentencePiece on the rest (NFKC, " " -> "▁",
Viterbi) -> +103 -> append </s> (no BOS). The reference is Hugging Face's PEGASUS tokenizer.json.
"""

import base64
import json
import re
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

OFFSET = 103  # reserved ids in front of the SentencePiece ids
SPECIAL_TOKENS = ["<pad>", "</s>", "<mask_1>", "<mask_2>"] + [f"<unk_{i}>" for i in range(2, OFFSET)]


class Pieces(Sequence):
    """id -> its token's string (what the reference's convert_ids_to_tokens gives), read from SentencePiece
    when asked: indexed like the list of all 96,103, without holding them (that list took 10 MB of every
    process). Ids below OFFSET + 2 are the reserved names; SentencePiece id j is id j + OFFSET."""

    def __init__(self, sp: spm.SentencePieceProcessor, newline_id: int | None = None):
        self.sp, self.newline_id = sp, newline_id  # newline_to_n: "<n>" decodes to "\n"

    def __len__(self) -> int:
        return OFFSET + self.sp.get_piece_size()

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        i = range(len(self))[i]  # an id (negative ones count from the end); IndexError / TypeError as a list's
        if i == self.newline_id:
            return "\n"
        return SPECIAL_TOKENS[i] if i < len(SPECIAL_TOKENS) else self.sp.id_to_piece(i - OFFSET)


class PegasusTokenizer:
    pad_token_id, eos_token_id = 0, 1
    mask_sent_token_id, mask_token_id = 2, 3  # <mask_1> (gap sentence), <mask_2> (masked token)
    offset, unk_token_id = OFFSET, OFFSET + 2  # SentencePiece's <unk> is its id 2

    def __init__(self, sp: spm.SentencePieceProcessor, newline_to_n: bool = False, model_max_length: int | None = None):
        self.sp = sp
        # The original PEGASUS pipeline replaced "\n" by the piece "<n>" before encoding and back
        # after decoding (so pegasus-cnn_dailymail writes "<n>" between summary sentences). Hugging
        # Face does not (NFKC makes "\n" a space), so it is off by default, to match the reference.
        self.newline_to_n = newline_to_n
        self.model_max_length = model_max_length  # informational: the longest input the model saw
        self.vocab_size = OFFSET + sp.get_piece_size()  # 96,103 for the published vocabulary
        self.newline_id = OFFSET + sp.piece_to_id("<n>")  # 106
        # id -> token string for decoding, in the reference's order: the 105 special strings, then
        # SentencePiece's pieces from its <unk> on (its <pad>, </s> already are ids 0 and 1).
        self.id_to_token = Pieces(sp, self.newline_id if newline_to_n else None)  # tok.id_to_token[i]: its string
        # Special strings are cut out before SentencePiece sees the text, as in the reference (which
        # counts <unk> as special too). Longest first; the (group) makes re.split keep the matches.
        self.specials = {s: i for i, s in enumerate(SPECIAL_TOKENS)} | {"<unk>": self.unk_token_id}
        longest_first = sorted(self.specials, key=len, reverse=True)
        self.special_re = re.compile(f"({'|'.join(map(re.escape, longest_first))})")

    def __len__(self) -> int:
        return self.vocab_size

    @classmethod
    def from_spiece(cls, path, **kw) -> "PegasusTokenizer":
        """Load a SentencePiece `spiece.model` file."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {path}")
        try:
            sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError):  # sentencepiece's message is about protobuf internals
            raise ValueError(f"{path} is not a valid SentencePiece model (empty, corrupt or truncated?)") from None
        if sp.get_piece_size() < 3 or sp.id_to_piece(2) != "<unk>":
            raise ValueError(f"{path}: expected <unk> at SentencePiece id 2, not the PEGASUS layout")
        return cls(sp, **kw)

    @classmethod
    def from_tokenizer_json(cls, path, **kw) -> "PegasusTokenizer":
        """Rebuild the SentencePiece model in memory from a Hugging Face `tokenizer.json`, which holds
        all it needs: the unigram pieces with their log-probability scores (after the reserved ids)
        and the "precompiled charsmap", SentencePiece's own compiled NFKC table."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"tokenizer.json not found: {path}")
        try:
            return cls._from_tokenizer_json(path, json.loads(Path(path).read_text(encoding="utf-8")), **kw)
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise ValueError(str(e) if str(e).startswith(str(path)) else f"{path} is not valid JSON: {e}") from None
        except (AttributeError, KeyError, TypeError, IndexError, RuntimeError) as e:
            raise ValueError(f"{path} is not a PEGASUS tokenizer.json ({type(e).__name__}: {e})") from None

    @classmethod
    def _from_tokenizer_json(cls, path, tj: dict, **kw) -> "PegasusTokenizer":
        model = tj.get("model", {})
        if model.get("type") != "Unigram":
            raise ValueError(f"{path}: expected a Unigram tokenizer, got {model.get('type')!r}")
        norms = tj.get("normalizer") or {}
        norms = norms.get("normalizers", [norms])  # a single normalizer or a Sequence of them
        charsmap = [n["precompiled_charsmap"] for n in norms if n.get("type") == "Precompiled"]
        if not charsmap:
            raise ValueError(f"{path}: no Precompiled normalizer (SentencePiece charsmap) found")
        proto, Piece = sp_pb2.ModelProto(), sp_pb2.ModelProto.SentencePiece
        # SentencePiece's <pad>, </s> are the JSON's ids 0, 1; its other pieces start at id 105.
        proto.pieces.add(piece="<pad>", score=0.0, type=Piece.CONTROL)
        proto.pieces.add(piece="</s>", score=0.0, type=Piece.CONTROL)
        for piece, score in model["vocab"][OFFSET + 2 :]:
            kind = {"<unk>": Piece.UNKNOWN, "<n>": Piece.USER_DEFINED}.get(piece, Piece.NORMAL)
            proto.pieces.add(piece=piece, score=score, type=kind)  # USER_DEFINED: never split
        if proto.pieces[2].piece != "<unk>":
            raise ValueError(f"{path}: expected <unk> at id {OFFSET + 2}, not the PEGASUS layout")
        spec = proto.trainer_spec  # only what the encoder reads, as in the published spiece.model
        spec.model_type, spec.vocab_size = sp_pb2.TrainerSpec.UNIGRAM, len(proto.pieces)
        spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 2, -1, 1, 0
        ns = proto.normalizer_spec  # NFKC, collapse/strip whitespace, " " -> "▁", leading "▁"
        ns.name, ns.precompiled_charsmap = "nmt_nfkc", base64.b64decode(charsmap[0])
        ns.add_dummy_prefix = ns.remove_extra_whitespaces = ns.escape_whitespaces = True
        return cls(spm.SentencePieceProcessor(model_proto=proto.SerializeToString()), **kw)

    @classmethod
    def from_pretrained(cls, directory, **kw) -> "PegasusTokenizer":
        """Load from a checkpoint directory: spiece.model if present, else tokenizer.json."""
        directory = Path(directory)
        config = directory / "tokenizer_config.json"
        if config.is_file() and "model_max_length" not in kw:
            try:
                n = json.loads(config.read_text(encoding="utf-8")).get("model_max_length")
            except (ValueError, UnicodeDecodeError, AttributeError):
                raise ValueError(f"{config} is not a valid tokenizer config (a JSON object)") from None
            kw["model_max_length"] = n if isinstance(n, int) and n < 10**9 else None  # HF: 1e30 = none
        if (directory / "spiece.model").is_file():
            return cls.from_spiece(directory / "spiece.model", **kw)
        if (directory / "tokenizer.json").is_file():
            return cls.from_tokenizer_json(directory / "tokenizer.json", **kw)
        raise FileNotFoundError(f"no spiece.model or tokenizer.json in {directory}")

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """Ids of `text` then </s> ("" gives [1], as in the reference). max_length keeps the first
        max_length - 1 tokens and still ends with </s>, as the reference's truncation does."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be at least 1 (room for </s>), got {max_length}")
        if self.newline_to_n:
            text = text.replace("\n", "<n>")
        # The reference splits words at every Unicode whitespace character after NFKC, which turns
        # them all into spaces except NEL (U+0085); SentencePiece would keep that as unknown.
        text = text.replace("\x85", " ")
        ids = []
        for i, chunk in enumerate(self.special_re.split(text)):  # text, special, text, special, ...
            if i % 2:
                ids.append(self.specials[chunk])
            elif chunk:
                ids.extend(p + OFFSET for p in self.sp.encode(chunk))
        if max_length is not None:
            ids = ids[: max_length - 1]
        return ids + [self.eos_token_id]

    def batch_encode(self, texts: list[str], max_length: int | None = None):
        """Encode and right-pad with <pad> (0). Returns (input_ids, attention_mask), LongTensors."""
        if isinstance(texts, str) or not texts:
            raise TypeError("batch_encode expects a non-empty list of str; use encode for one text")
        rows = [self.encode(t, max_length) for t in texts]
        width = max(map(len, rows))
        input_ids = torch.tensor([row + [self.pad_token_id] * (width - len(row)) for row in rows])
        # From the lengths, not `!= 0`: a literal "<pad>" in the text is a real token.
        attention_mask = (torch.arange(width) < torch.tensor([[len(row)] for row in rows])).long()
        return input_ids, attention_mask

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of a 1-D list/tensor of ids, as the reference's decode gives it.

        Concatenate the tokens, turn "▁" back into spaces, and drop the space that encoding put in
        front of the first token. skip_special_tokens drops ids 0..105 (the reference counts <unk>
        as special too) *before* that, so the first kept token loses its space. No other clean-up:
        the reference's default is clean_up_tokenization_spaces=False (transformers 5; 4 used True,
        which turns " ." into "."), and PEGASUS pieces already attach punctuation to words.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode expects 1-D ids, got shape {tuple(ids.shape)}; use batch_decode")
            ids = ids.tolist()
        tokens = []
        for i in ids:
            if not isinstance(i, int) or not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i!r} is not an int in [0, {self.vocab_size})")
            if skip_special_tokens and i <= self.unk_token_id:
                continue
            tokens.append(self.id_to_token[i])
        text = "".join(tokens).replace("▁", " ")
        return text[1:] if tokens and tokens[0].startswith("▁") else text

    def batch_decode(self, batch, skip_special_tokens: bool = True) -> list[str]:
        """decode() each row of a list of id lists or of a 2-D tensor."""
        return [self.decode(row, skip_special_tokens) for row in batch]


def n_to_newline(text: str) -> str:
    """Show the "<n>" pieces of a decoded summary as line breaks, as the original pipeline's decode
    did (pegasus/ops/public_parsing_ops.py: regex_replace(text, "<n>", "\\n")); the spaces the
    pieces leave around them go too. pegasus-cnn_dailymail and the Mixed & Stochastic checkpoints
    write "<n>" between summary sentences when decoded without newline_to_n (the reference's way)."""
    return re.sub(r" *<n> *", "\n", text)
