"""The corpus as the trainer sees it: manifest + tokenizer, and an endless, resumable stream of batches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from acomp.config import ConfigError, RunConfig


class DataError(ConfigError):
    """The corpus at data.path cannot be used for this run (missing, empty, unreadable, or not the model's);
    the message names the path and the mismatch. Raised before the first training step."""


@dataclass
class Corpus:
    path: Path
    manifest: dict
    tokenizer: object

    @property
    def block_size(self) -> int:
        return int(self.manifest["block_size"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"


def ensure_corpus(cfg: RunConfig, is_main: bool) -> None:
    """Build the corpus at data.path on rank 0 when it is missing and data.build_if_missing says how."""
    from acomp.train.distributed import barrier

    path = Path(cfg.data.path)
    if is_main and not (path / "manifest.json").is_file() and cfg.data.build_if_missing:
        from acomp.data import build_corpus

        print(f"building the corpus at {path} ({cfg.data.build_if_missing})", flush=True)
        try:
            build_corpus(out=path, **cfg.data.build_if_missing)
        except TypeError as e:
            raise ConfigError(f"data.build_if_missing: {e}") from None
    barrier()


def open_corpus(path: str | Path) -> Corpus:
    from transformers import AutoTokenizer

    from acomp.data import read_manifest

    path = Path(path)
    if not path.is_dir():
        raise DataError(f"data.path={str(path)!r}: no such corpus directory (build one with preprocess/)")
    try:
        manifest = read_manifest(path)
    except (OSError, ValueError) as e:
        raise DataError(f"data.path={str(path)!r}: {e}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    except (OSError, ValueError) as e:
        raise DataError(f"data.path={str(path)!r}: cannot load its tokenizer/: {e}") from None
    return Corpus(path=path, manifest=manifest, tokenizer=tokenizer)


def check_corpus_fits(corpus: Corpus, model_config) -> None:
    """The corpus' token ids must index the model's embedding table (clear error instead of an index error)."""
    from acomp.data import check_manifest

    try:
        check_manifest(corpus.manifest, vocab_size=model_config.vocab_size)
    except ValueError as e:
        raise ConfigError(f"data.path={str(corpus.path)!r} does not fit the model: {e}") from None


def train_loader(cfg: RunConfig, corpus: Corpus, micro_batch_size: int):
    """This rank's share of the shuffled training split (streaming partitions it over ranks)."""
    from acomp.data import CorpusDataset, build_dataloader

    try:  # checks the shards (data.verify); a damaged one raises CorruptShardError naming the file
        dataset = CorpusDataset(
            str(corpus.path),
            split="train",
            shuffle=cfg.data.shuffle,
            seed=cfg.train.seed,
            batch_size=micro_batch_size,
            verify=cfg.data.verify,
        )
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"data.path={str(corpus.path)!r}: {e}") from None
    import torch

    # Pinned batches let the loop copy them to the GPU without a host sync (acomp.train.loop.train_step).
    pin = torch.cuda.is_available()
    return build_dataloader(dataset, micro_batch_size, num_workers=cfg.data.num_workers, pin_memory=pin)


def val_dataset(cfg: RunConfig, corpus: Corpus):
    from acomp.data import CorpusDataset

    split, verify = cfg.data.val_split, cfg.data.verify
    return CorpusDataset(str(corpus.path), split=split, shuffle=False, seed=0, batch_size=1, verify=verify)


class Batches:
    """Micro-batches forever: a new epoch starts when the loader runs out. `state_dict()` is the loader's,
    which records the epoch and samples consumed so a resumed run continues mid-epoch exactly."""

    def __init__(self, loader):
        self.loader = loader
        self._it = None

    def __next__(self) -> dict:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None
        raise RuntimeError(
            "the training split yielded no batch (is it smaller than one micro-batch per rank?)"
        )

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._it = None
