"""The tokenizer block of a merge config (`tokenizer:`), parsed from the text alone (no torch).

`tokenizer_source: union` and the block align vocabularies by token string (`vocabulary`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from .errors import MergeError, check_keys
from .refs import ModelRef, shown

RefParser = Callable[[Any, str], ModelRef]


@dataclass(frozen=True)
class TokenSource:
    """Where a token's row comes from (`tokenizer.tokens`): a model's own row for the token, another
    token's row in a model (`token` or `token_id`), or zeros (`model` None)."""

    model: Optional[ModelRef]
    token: Optional[str] = None
    token_id: Optional[int] = None


@dataclass(frozen=True)
class TokenSetting:
    source: Optional[TokenSource] = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    """`tokenizer_source: union` or the `tokenizer:` block: vocabularies aligned by token string."""

    source: Union[str, ModelRef]  # "union", "base" or a model
    tokens: dict[str, TokenSetting] = field(default_factory=dict)
    pad_to_multiple_of: Optional[int] = None


_TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")
_TOKEN_KEYS = ("source", "force")
_TOKEN_SOURCE_KEYS = ("kind", "model", "token", "token_id")


def parse_tokenizer(raw: Any, ref: RefParser) -> TokenizerSpec:
    if not isinstance(raw, dict):
        raise MergeError("tokenizer: must be a mapping with source (union, base or a model), tokens and "
                         "pad_to_multiple_of")
    check_keys(raw, _TOKENIZER_KEYS, "tokenizer.")
    source = raw.get("source", "union")
    source = source if source in ("union", "base") else ref(source, "tokenizer.source")
    pad = raw.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise MergeError(f"tokenizer.pad_to_multiple_of: must be a positive whole number such as 64, got "
                         f"{shown(pad, 40)}")
    tokens = raw.get("tokens") or {}
    if not isinstance(tokens, dict):
        raise MergeError("tokenizer.tokens: must map each token to {source, force}")
    return TokenizerSpec(source, {str(token): _parse_token(setting, ref, f"tokenizer.tokens.{token}")
                                  for token, setting in tokens.items()}, pad)


def _parse_token(raw: Any, ref: RefParser, where: str) -> TokenSetting:
    if raw is None:
        return TokenSetting()
    if not isinstance(raw, dict):
        raise MergeError(f"{where}: must be a mapping with source and force")
    check_keys(raw, _TOKEN_KEYS, f"{where}.")
    force = raw.get("force", False)
    if not isinstance(force, bool):
        raise MergeError(f"{where}.force: must be true or false, got {shown(force, 40)}")
    source = raw.get("source")
    if source is None:
        return TokenSetting(None, force)
    if not isinstance(source, dict):
        return TokenSetting(TokenSource(ref(source, f"{where}.source")), force)
    check_keys(source, _TOKEN_SOURCE_KEYS, f"{where}.source.")
    kind = source.get("kind")
    if kind == "zero":
        return TokenSetting(TokenSource(None), force)
    if kind != "model_token":
        raise MergeError(f"{where}.source.kind: must be model_token or zero, got {shown(kind, 40)}")
    if "model" not in source:
        raise MergeError(f"{where}.source.model: required for a model_token source")
    token, token_id = source.get("token"), source.get("token_id")
    if (token is None) == (token_id is None):
        raise MergeError(f"{where}.source: give exactly one of token and token_id")
    if token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0):
        raise MergeError(f"{where}.source.token_id: must be a token id (a whole number from 0), got "
                         f"{shown(token_id, 40)}")
    return TokenSetting(TokenSource(ref(source["model"], f"{where}.source.model"),
                                    None if token is None else str(token), token_id), force)


def check_token_models(spec: TokenizerSpec, merged: list[ModelRef]) -> None:
    """`tokenizer.tokens` may take rows only from models the merge reads."""
    for token, setting in spec.tokens.items():
        model = setting.source.model if setting.source is not None else None
        if model is not None and model not in merged:
            raise MergeError(f"tokenizer.tokens.{token}.source: {model} is not in the merge; take the row from "
                             f"one of {', '.join(map(str, merged))}")
