"""Packed rows padded up to a multiple of a token count (train.row_length_multiple), for CUDA graphs.

A CUDA graph replays fixed shapes: a packed row of 8 examples has a new length almost every step, and every new
length would record (and keep) a new graph. Padded up to a multiple of, say, 256 tokens, the post's rows come in a
few lengths. The padding is one more example in every row (a row's count of examples is then fixed too): its own
position ids (0, 1, ...), so that attention keeps it to itself (the varlen kernel's boundaries, or SDPA's block mask,
both built from them), and labels of -100, so the loss and every gradient are the same as without it
(tests/test_row_padding.py). The longest-example length that the varlen kernel takes becomes the row's length, a
bound as valid and the same for every row of that length.
"""

import torch

ROW_PADDING = "row_padding"  # the batch's count of padding tokens: not the model's input, not counted as seen


class PaddedRows:
    """Wraps trl's padding-free collator: each packed row it makes comes out padded up to a multiple of
    ``multiple`` tokens with one dummy example."""

    def __init__(self, collate, multiple: int, pad_token_id: int) -> None:
        self.collate, self.multiple, self.pad_token_id = collate, multiple, pad_token_id

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collate(examples)
        length = batch["input_ids"].shape[1]
        padding = -length % self.multiple or self.multiple  # a row already of such a length gets one too
        batch[ROW_PADDING] = padding
        batch["max_length_q"] = batch["max_length_k"] = length + padding
        batch["input_ids"] = _extend(batch["input_ids"], torch.full((padding,), self.pad_token_id))
        batch["labels"] = _extend(batch["labels"], torch.full((padding,), -100))
        batch["position_ids"] = _extend(batch["position_ids"], torch.arange(padding))
        boundaries = torch.cat([batch["cu_seq_lens_q"], torch.tensor([length + padding], dtype=torch.int32)])
        batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = boundaries
        if "seq_idx" in batch:  # each token's example, for linear-attention layers' convolutions
            examples_in_row = torch.arange(boundaries.numel() - 1, dtype=torch.int32)
            batch["seq_idx"] = torch.repeat_interleave(examples_in_row, boundaries.diff())[None]
        return batch


def _extend(row: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    return torch.cat([row, padding.to(row.dtype)[None]], dim=1)
