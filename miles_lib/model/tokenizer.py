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
        path = storage.join(uri, "tokenizer.json")
        try:
            tok = HFTokenizer.from_str(storage.read_bytes(path).decode())
        except FileNotFoundError:
            raise CheckpointError(f"{uri}: no tokenizer.json; save the tokenizer next to the model") from None
        except Exception as e:
            raise CheckpointError(f"{path}: cannot parse tokenizer ({e})") from None
        cfg_path = storage.join(uri, "tokenizer_config.json")
        special = json.loads(storage.read_bytes(cfg_path)) if storage.exists(cfg_path) else {}

        def tok_str(v):
            return v.get("content") if isinstance(v, dict) else v

        return cls(tok, tok_str(special.get("eos_token")), tok_str(special.get("pad_token")),
                   tok_str(special.get("bos_token")))
