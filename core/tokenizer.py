"""Locate, load and fingerprint a tokenizer directory (``tokenizer.json`` [+ ``tokenizer_config.json``]).

The fingerprint is the sha256 of ``tokenizer.json``'s bytes: shards and checkpoints record it, and
anything that mixes a dataset or model with a different tokenizer is refused by name.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from core.chat_template import ENDOFTEXT, IM_END, IM_START, REASONING_TAGS
from core.errors import TinyLMError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = REPO_ROOT / "data" / "tokenizer"
REQUIRED_SPECIALS = (ENDOFTEXT, IM_START, IM_END)


class TokenizerError(TinyLMError):
    pass


@dataclass(frozen=True)
class TokenizerInfo:
    path: Path  # the tokenizer.json file
    tokenizer: Tokenizer
    fingerprint: str
    vocab_size: int
    special_ids: dict[str, int]  # every chat / reasoning special token that is a single id

    @property
    def has_reasoning_tags(self) -> bool:
        return all(tag in self.special_ids for tag in REASONING_TAGS)


def tokenizer_file(path: str | Path) -> Path:
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise TokenizerError(f"{file}: no tokenizer here (expected a directory with tokenizer.json)")
    return file


def load_tokenizer(path: str | Path = DEFAULT_TOKENIZER) -> TokenizerInfo:
    """Load a tokenizer and check that the chat special tokens are single ids."""
    file = tokenizer_file(path)
    data = file.read_bytes()
    try:
        tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # the tokenizers library raises plain Exceptions on bad files
        raise TokenizerError(f"{file}: not a valid tokenizers file ({e})") from None
    specials = {}
    for token in (*REQUIRED_SPECIALS, *REASONING_TAGS):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None and tokenizer.encode(token, add_special_tokens=False).ids == [token_id]:
            specials[token] = token_id
    missing = [t for t in REQUIRED_SPECIALS if t not in specials]
    if missing:
        raise TokenizerError(f"{file}: special token(s) {', '.join(missing)} are not single ids in this tokenizer")
    return TokenizerInfo(file, tokenizer, hashlib.sha256(data).hexdigest(),
                         tokenizer.get_vocab_size(with_added_tokens=True), specials)
