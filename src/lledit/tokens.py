"""Tokenising (prompt, target) pairs and padding them into one batch.

The target is scored as the continuation of the prompt with one leading
space. Prompt and target are tokenised so that the prompt's tokens are an exact
prefix of the whole sequence, and the target's positions start at that
boundary, whatever the padding side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from lledit.data.request import EditRequest


@dataclass
class EncodedPair:
    """Token ids of prompt + target; the target starts at `target_start`."""

    ids: list[int]
    target_start: int

    @property
    def target_ids(self) -> list[int]:
        return self.ids[self.target_start :]


def join(prompt: str, target: str) -> str:
    return prompt + target if prompt[-1:].isspace() else f"{prompt} {target}"


def with_eos(tokenizer, request: EditRequest) -> EditRequest:
    """The request with the tokenizer's EOS after its target, so that editing
    teaches the model to stop after the new answer (LocFT-BF's practice); a
    target that ends with it already is left as it is."""
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no EOS token to append to the targets")
    if request.target_new.endswith(tokenizer.eos_token):
        return request
    return replace(request, target_new=request.target_new + tokenizer.eos_token)


def in_chat_template(tokenizer, request: EditRequest) -> EditRequest:
    """The request with every prompt asked as a user turn of the model's chat
    template, ready for the assistant's answer (for instruct models)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the model's tokenizer has no chat template; leave out --chat-template")

    def ask(text: str) -> str:
        turn = [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)

    return replace(
        request,
        prompt=ask(request.prompt),
        rephrases=[ask(p) for p in request.rephrases],
        locality=[(ask(p), a) for p, a in request.locality],
        portability=[(ask(p), a) for p, a in request.portability],
        generation_prompts=[ask(p) for p in request.generation_prompts],
    )


def encode_pairs(tokenizer, prompts: Sequence[str], targets: Sequence[str]) -> list[EncodedPair]:
    """Tokenise each prompt with its target as a continuation.

    Whole sequences are tokenised at once; where a tokeniser merges text across
    the prompt/target boundary, the pair falls back to the prompt's tokens
    followed by the separately tokenised target.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    prompt_ids = tokenizer(list(prompts))["input_ids"]
    full_ids = tokenizer([join(p, t) for p, t in zip(prompts, targets, strict=True)])["input_ids"]
    pairs = []
    for index, (prefix, full) in enumerate(zip(prompt_ids, full_ids, strict=True)):
        if len(full) > len(prefix) and full[: len(prefix)] == prefix:
            pairs.append(EncodedPair(list(full), len(prefix)))
            continue
        separator = "" if prompts[index][-1:].isspace() else " "
        target = tokenizer(separator + targets[index], add_special_tokens=False)["input_ids"]
        if not target:
            raise ValueError(f"target {targets[index]!r} tokenises to nothing")
        pairs.append(EncodedPair(list(prefix) + list(target), len(prefix)))
    return pairs


@dataclass
class TokenBatch:
    """Padded pairs plus the coordinates of every target token.

    `target_rows[i]`, `target_positions[i]` locate target token `i` (whose id
    is `target_ids[i]`); `target_lengths[j]` is the number of target tokens of
    pair `j`, so per-pair results come from splitting along that.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    target_rows: torch.Tensor
    target_positions: torch.Tensor
    target_ids: torch.Tensor
    target_lengths: list[int]

    @property
    def prompt_ends(self) -> torch.Tensor:
        """Per row, the position of the last prompt token (the one that predicts
        the first target token), in padded coordinates."""
        rows = self.input_ids.shape[0]
        first = torch.full((rows,), self.input_ids.shape[1], device=self.target_positions.device)
        first = first.scatter_reduce(0, self.target_rows, self.target_positions, "amin")
        return first - 1

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            position_ids=self.position_ids.to(device),
            target_rows=self.target_rows.to(device),
            target_positions=self.target_positions.to(device),
            target_ids=self.target_ids.to(device),
            target_lengths=self.target_lengths,
        )


def collate(
    pairs: Sequence[EncodedPair],
    pad_id: int,
    padding_side: str = "right",
    align: Sequence[int] | None = None,
) -> TokenBatch:
    """Pad pairs to one length; position ids count real tokens only.

    With `align`, pair i is padded on the left until its token `align[i]`
    sits in the same column as every other pair's, and on the right after
    that (`padding_side` is then not used): the columns before that one can
    be run once into a KV cache (`ModelHandle.prefix_cache`).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    if not pairs:
        raise ValueError("cannot collate an empty list of pairs")
    if align is not None and len(align) != len(pairs):
        raise ValueError(f"{len(align)} aligned positions for {len(pairs)} pairs")
    if align is not None:
        offsets = [max(align) - position for position in align]
    elif padding_side == "left":
        longest = max(len(pair.ids) for pair in pairs)
        offsets = [longest - len(pair.ids) for pair in pairs]
    else:
        offsets = [0] * len(pairs)
    length = max(offset + len(pair.ids) for offset, pair in zip(offsets, pairs, strict=True))
    input_ids = torch.full((len(pairs), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), length), dtype=torch.long)
    rows, positions, target_ids = [], [], []
    for row, (offset, pair) in enumerate(zip(offsets, pairs, strict=True)):
        input_ids[row, offset : offset + len(pair.ids)] = torch.tensor(pair.ids)
        attention_mask[row, offset : offset + len(pair.ids)] = 1
        start = offset + pair.target_start
        rows.extend([row] * (len(pair.ids) - pair.target_start))
        positions.extend(range(start, offset + len(pair.ids)))
        target_ids.extend(pair.target_ids)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return TokenBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        target_rows=torch.tensor(rows, dtype=torch.long),
        target_positions=torch.tensor(positions, dtype=torch.long),
        target_ids=torch.tensor(target_ids, dtype=torch.long),
        target_lengths=[len(pair.ids) - pair.target_start for pair in pairs],
    )


def suffix_of(batch: TokenBatch, column: int) -> TokenBatch:
    """The batch from `column` on, to run after a KV cache of the columns
    before it (`ModelHandle.prefix_cache`): the attention mask stays whole
    (cache and new tokens), and target positions count from `column`."""
    if len(batch.target_positions) and int(batch.target_positions.min()) <= column:
        raise ValueError(f"a target token is predicted before column {column}")
    return TokenBatch(
        input_ids=batch.input_ids[:, column:],
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids[:, column:],
        target_rows=batch.target_rows,
        target_positions=batch.target_positions - column,
        target_ids=batch.target_ids,
        target_lengths=batch.target_lengths,
    )
