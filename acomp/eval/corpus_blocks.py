"""Random access to a corpus split's blocks in stored order, identical on every rank.

The protocol picks blocks by global index (spread evenly over the split, then dealt to ranks), so it needs
`len()` = all blocks of the split and `[i]` = block i, not a rank's streaming share.
"""

from __future__ import annotations

from collections.abc import Sequence


class CorpusBlocks(Sequence):
    """Blocks of `split` of a corpus built by preprocess/build_corpus.py (local directory or remote URI).

    Items are `{"input_ids": LongTensor[block_size], "domain", "doc_id", "block_index"}`. `vocab_size`
    (the model's embedding rows) is checked against the manifest first, so a corpus tokenized for another
    model fails with a message naming both sizes instead of an index error mid-run.
    """

    def __init__(self, path: str, split: str = "val", *, vocab_size: int | None = None, local_cache=None):
        from acomp.data import CorpusDataset

        self.dataset = CorpusDataset(
            path, split, shuffle=False, batch_size=1, vocab_size=vocab_size, local_cache=local_cache
        )
        self.manifest = self.dataset.manifest
        self.path, self.split = str(path), split

    @classmethod
    def of(cls, dataset) -> CorpusBlocks:
        """The blocks of an open CorpusDataset (built with shuffle=False), e.g. the trainer's held-out split."""
        blocks = cls.__new__(cls)
        blocks.dataset, blocks.manifest = dataset, dataset.manifest
        blocks.path, blocks.split = dataset.source, dataset.corpus_split
        return blocks

    @property
    def block_size(self) -> int:
        return int(self.manifest["block_size"])

    def __len__(self) -> int:
        return int(self.dataset.num_samples)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} out of range for a split of {len(self)} blocks")
        return self.dataset[index]
