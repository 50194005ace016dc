"""Tokenizer: a ``tokenizers.Tokenizer`` (tokenizer.json) plus its special tokens
(tokenizer_config.json: eos_token, pad_token, bos_token), loaded from a folder or URI."""

from __future__ import annotations

import json

from tokenizers import Tokenizer as HFTokenizer

from miles_lib import storage
from miles_lib.errors import CheckpointError


class Tokenizer:
    def __init__(self, tok: HFTokenizer, eos_token: str | None = None, pad_token: str | None = None,
                 bos_token: str | None = None) -> None:
        self.tok = tok
        self.eos_token, self.pad_token, self.bos_token = eos_token, pad_token, bos_token
        for name, t in (("eos_token", eos_token), ("pad_token", pad_token), ("bos_token", bos_token)):
            if t is not None and tok.token_to_id(t) is None:
                raise CheckpointError(f"tokenizer: {name} {t!r} is not in the vocabulary")

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.tok.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.tok.token_to_id(self.pad_token)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.tok.token_to_id(self.bos_token)

    @property
    def stop_token_ids(self) -> list[int]:
        return [] if self.eos_token_id is None else [self.eos_token_id]

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_token_id] if self.bos_token_id is not None else []) + ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def files(self) -> dict[str, bytes]:
        cfg = {"eos_token": self.eos_token, "pad_token": self.pad_token, "bos_token": self.bos_token,
               "tokenizer_class": "PreTrainedTokenizerFast"}
        return {"tokenizer.json": self.tok.to_str().encode(),
                "tokenizer_config.json": json.dumps(cfg, indent=2).encode()}

    def save_pretrained(self, uri: str) -> None:
        for name, data in self.files().items():
            storage.atomic_write_bytes(storage.join(uri, name), data)

    @classmethod
    def from_pretrained(cls, uri: str) -> "Tokenizer":
        """From a HF folder (tokenizer.json [+ tokenizer_config.json]) or a training checkpoint."""
        from miles_lib.checkpoint.training import MANIFEST, load_side_files

        if storage.exists(storage.join(uri, MANIFEST)):
            return cls.from_files(load_side_files(uri), source=uri)
        files = {}
        for name in ("tokenizer.json", "tokenizer_config.json"):
            path = storage.join(uri, name)
            if storage.exists(path):
                files[name] = storage.read_bytes(path)
        return cls.from_files(files, source=uri)

    @classmethod
    def from_files(cls, files: dict[str, bytes], source: str = "<memory>") -> "Tokenizer":
        if "tokenizer.json" not in files:
            raise CheckpointError(f"{source}: no tokenizer.json; save the tokenizer next to the model")
        try:
            tok = HFTokenizer.from_str(files["tokenizer.json"].decode())
        except Exception as e:
            raise CheckpointError(f"{source}/tokenizer.json: cannot parse tokenizer ({e})") from None
        special = json.loads(files["tokenizer_config.json"]) if "tokenizer_config.json" in files else {}

        def tok_str(v):
            return v.get("content") if isinstance(v, dict) else v

        return cls(tok, tok_str(special.get("eos_token")), tok_str(special.get("pad_token")),
                   tok_str(special.get("bos_token")))
