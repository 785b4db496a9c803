"""Which sequences each training process takes in each optimizer step. Every step trains on the same global set of
sequences whatever the number of processes (transformers' BatchRebalanceSampler draws them, from the seed); what
differs is how that set is shared out. On N processes the step lasts as long as its busiest process, so how a step
is shared out decides how much of N's speed comes through."""
from __future__ import annotations

from transformers.trainer_pt_utils import BatchRebalanceSampler


class TokenBalancedSampler(BatchRebalanceSampler):
    """transformers' rank-aware sampler, sharing each step out by tokens: the cost of a padding-free micro-batch
    (Unsloth's), where transformers' own split prices padded ones.

    transformers cuts the step's rows, sorted by length, into contiguous runs of equal padded cost (rows x longest
    row, plus 0.001 x rows x longest^2 for attention): right where every row of a micro-batch is padded to its
    longest, but for padding-free batches it overprices long rows and, cutting only between neighbours, can't pair a
    long row with short ones. Here the step's rows, longest first, each go to the micro-batch with the fewest tokens
    so far (each micro-batch of each process gets at least one); the micro-batches are then dealt out by tokens so
    that each accumulation slot holds one per process of about the same size: balanced per process and per slot,
    since the processes also meet inside a step (the trainer gathers metrics per micro-batch).
    """

    def _assign(self, indices, lengths):
        groups = balanced_groups(list(zip(indices, lengths)), self.dp_size * self.grad_accum)
        by_tokens = sorted(groups, key=lambda g: -sum(length for _, length in g))
        return [[[index for index, _ in by_tokens[slot * self.dp_size + rank]] for slot in range(self.grad_accum)]
                for rank in range(self.dp_size)]


def balanced_groups(rows: list[tuple[int, int]], count: int) -> list[list[tuple[int, int]]]:
    """(index, length) rows in `count` non-empty groups of about equal tokens: longest first, each to the lightest
    group (an empty one while there are only as many rows left as empty groups)."""
    groups: list[list[tuple[int, int]]] = [[] for _ in range(count)]
    tokens = [0] * count
    for position, row in enumerate(sorted(rows, key=lambda r: -r[1])):
        empty = [g for g in range(count) if not groups[g]]
        candidates = empty if len(empty) >= len(rows) - position else range(count)
        target = min(candidates, key=lambda g: (tokens[g], len(groups[g]), g))
        groups[target].append(row)
        tokens[target] += row[1]
    return groups


def token_balanced(sampler: BatchRebalanceSampler) -> TokenBalancedSampler:
    """The same draw as `sampler` (lengths, step size, processes, seed, rank), shared out by tokens."""
    balanced = TokenBalancedSampler(
        lengths=sampler.lengths, effective_batch_size=sampler.effective_batch_size, dp_size=sampler.dp_size,
        grad_accum=sampler.grad_accum, shuffle=sampler.shuffle, seed=sampler.seed, rank=sampler.rank,
        drop_last=sampler.drop_last)
    balanced.epoch = sampler.epoch
    return balanced
