import pytest
import torch

from lledit.tokens import EncodedPair, collate, encode_pairs, suffix_of


def test_prompt_tokens_are_a_prefix(tokenizer):
    pairs = encode_pairs(tokenizer, ["The capital of France is"], ["Paris"])
    prompt_ids = tokenizer("The capital of France is")["input_ids"]
    assert pairs[0].ids[: pairs[0].target_start] == prompt_ids
    assert tokenizer.decode(pairs[0].target_ids) == " Paris"


def test_boundary_merge_falls_back_to_separate_tokens(tokenizer):
    # With the prompt ending in a space, the whole text tokenises " Paris" as
    # one token, so the prompt's tokens (ending in a bare " ") are no prefix.
    pairs = encode_pairs(tokenizer, ["The capital of France is "], ["Paris"])
    prompt_ids = tokenizer("The capital of France is ")["input_ids"]
    assert pairs[0].ids[: pairs[0].target_start] == prompt_ids
    assert tokenizer.decode(pairs[0].ids) == "The capital of France is Paris"


def test_left_and_right_padding_put_targets_on_the_same_tokens():
    pairs = [EncodedPair([5, 6, 7, 8], 2), EncodedPair([9, 10, 11], 2)]
    for side in ("left", "right"):
        batch = collate(pairs, pad_id=0, padding_side=side)
        picked = batch.input_ids[batch.target_rows, batch.target_positions]
        assert picked.tolist() == [7, 8, 11] == batch.target_ids.tolist()
        assert batch.target_lengths == [2, 1]
        real = batch.attention_mask.bool()
        assert batch.position_ids[1][real[1]].tolist() == [0, 1, 2]
    left = collate(pairs, pad_id=0, padding_side="left")
    assert left.input_ids[1, 0] == 0 and left.attention_mask[1, 0] == 0
    assert torch.equal(left.target_positions, torch.tensor([2, 3, 3]))


def test_aligned_pairs_share_a_column_and_their_suffix_keeps_the_targets():
    pairs = [EncodedPair([5, 6, 7, 8], 2), EncodedPair([9, 10, 11, 12, 13], 3)]
    batch = collate(pairs, pad_id=0, align=[1, 2])
    assert batch.input_ids[:, 2].tolist() == [6, 11]
    assert batch.input_ids.tolist() == [[0, 5, 6, 7, 8], [9, 10, 11, 12, 13]]
    assert batch.position_ids[0, 1:5].tolist() == [0, 1, 2, 3]
    suffix = suffix_of(batch, 2)
    assert suffix.input_ids.tolist() == [[6, 7, 8], [11, 12, 13]]
    assert suffix.attention_mask.shape == batch.attention_mask.shape
    picked = suffix.input_ids[suffix.target_rows, suffix.target_positions]
    assert picked.tolist() == [7, 8, 12, 13] == suffix.target_ids.tolist()
    with pytest.raises(ValueError, match="before column 3"):
        suffix_of(batch, 3)
    with pytest.raises(ValueError, match="1 aligned positions for 2 pairs"):
        collate(pairs, pad_id=0, align=[1])
