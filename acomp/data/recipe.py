"""Corpus recipes: block size, tokenizer, and per-domain sources and token budgets, read from YAML.

A recipe names the paper's domain mix once (``preprocess/recipes/6k.yaml``, ``30k.yaml``) so each build is
one command. Sources are paths the user supplies: ``${VAR}`` expands from the environment, a relative path
is taken relative to the recipe file, and ``--domain-source NAME=PATH`` overrides one domain's path.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .sources import EMBEDDED_SOURCES

_SUFFIXES = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
_DOMAIN_KEYS = {"source", "train_tokens", "val_tokens", "text_field", "domain_field", "match", "id_field"}
_RECIPE_KEYS = {
    "name",
    "description",
    "block_size",
    "tokenizer",
    "val_fraction",
    "seed",
    "text_field",
    "domains",
}
_VAR = re.compile(r"\$\{([^}]+)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def parse_count(value: Any, what: str) -> int | None:
    """``"0.5B"`` -> 500_000_000; ints pass through; ``None`` means unlimited."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a token count, got {value!r}")
    if isinstance(value, int):
        count = value
    elif isinstance(value, float) and value.is_integer():
        count = int(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace("_", "").replace(",", "")
        scale = 1
        if text and text[-1] in _SUFFIXES:
            scale, text = _SUFFIXES[text[-1]], text[:-1]
        try:
            count = round(float(text) * scale)
        except (ValueError, OverflowError):  # not a number, or inf
            raise ValueError(
                f"{what}: cannot read {value!r} as a token count (e.g. 5000, '2M', '0.5B')"
            ) from None
    else:
        raise ValueError(f"{what}: expected a token count, got {value!r}")
    if count < 0:
        raise ValueError(f"{what}: token count must be >= 0, got {value!r}")
    return count


@dataclass(frozen=True)
class DomainRecipe:
    """One domain: where its text is and how many tokens each split may take (None = no cap)."""

    name: str
    source: str
    train_tokens: int | None = None
    val_tokens: int | None = None
    text_field: str = "text"
    domain_field: str | None = None
    match: str | None = None
    id_field: str | None = None


@dataclass(frozen=True)
class Recipe:
    """A corpus build: block size, tokenizer, the fraction of documents held out, and the domains."""

    name: str
    block_size: int
    domains: list[DomainRecipe] = field(default_factory=list)
    tokenizer: str | None = None
    val_fraction: float = 0.01
    seed: int = 0
    description: str = ""
    path: str | None = None


def _expand(source: str, where: str, base: Path | None) -> str:
    def sub(m: re.Match) -> str:
        var = m.group(1) or m.group(2)
        if var not in os.environ:
            raise ValueError(
                f"{where}: source {source!r} uses the unset environment variable {var}; "
                f"set it, or pass --domain-source NAME=PATH"
            )
        return os.environ[var]

    expanded = os.path.expanduser(_VAR.sub(sub, source))
    if (
        expanded not in EMBEDDED_SOURCES
        and base is not None
        and not os.path.isabs(expanded)
        and "://" not in expanded
    ):
        expanded = str(base / expanded)
    return expanded


def load_recipe(
    path: str | Path, *, domain_sources: dict[str, str] | None = None, expand: bool = True
) -> Recipe:
    """Parse and validate a recipe file; ``expand=False`` keeps ``${VAR}`` sources as written."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"recipe {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ValueError(f"recipe {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"recipe {path}: expected a mapping at the top level")
    unknown = set(raw) - _RECIPE_KEYS
    if unknown:
        raise ValueError(f"recipe {path}: unknown keys {sorted(unknown)} (allowed: {sorted(_RECIPE_KEYS)})")
    for key in ("block_size", "domains"):
        if key not in raw:
            raise ValueError(f"recipe {path}: missing required key {key!r}")
    block_size = raw["block_size"]
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"recipe {path}: block_size must be a positive integer, got {block_size!r}")
    val_fraction = float(raw.get("val_fraction", 0.01))
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"recipe {path}: val_fraction must be in [0, 1], got {val_fraction}")
    domains_raw = raw["domains"]
    if not isinstance(domains_raw, dict) or not domains_raw:
        raise ValueError(f"recipe {path}: 'domains' must be a non-empty mapping of name -> settings")
    overrides = dict(domain_sources or {})
    unknown_overrides = set(overrides) - set(domains_raw)
    if unknown_overrides:
        raise ValueError(
            f"--domain-source names {sorted(unknown_overrides)} are not domains of recipe {path} "
            f"(its domains: {list(domains_raw)})"
        )
    default_text_field = raw.get("text_field", "text")
    domains = []
    for name, settings in domains_raw.items():
        where = f"recipe {path} domain {name}"
        if not isinstance(settings, dict):
            raise ValueError(f"{where}: expected a mapping, got {settings!r}")
        bad = set(settings) - _DOMAIN_KEYS
        if bad:
            raise ValueError(f"{where}: unknown keys {sorted(bad)} (allowed: {sorted(_DOMAIN_KEYS)})")
        if "source" not in settings and name not in overrides:
            raise ValueError(f"{where}: missing 'source'")
        source = str(overrides.get(name, settings.get("source")))
        if expand:
            source = _expand(source, where, path.parent if name not in overrides else None)
        # A user-supplied path holds this domain only: read all of its records, without the recipe's filter.
        overridden = name in overrides
        domains.append(
            DomainRecipe(
                name=str(name),
                source=source,
                train_tokens=parse_count(settings.get("train_tokens"), f"{where} train_tokens"),
                val_tokens=parse_count(settings.get("val_tokens"), f"{where} val_tokens"),
                text_field=settings.get("text_field", default_text_field),
                domain_field=None if overridden else settings.get("domain_field"),
                match=None if overridden else settings.get("match"),
                id_field=settings.get("id_field"),
            )
        )
    return Recipe(
        name=str(raw.get("name", path.stem)),
        block_size=block_size,
        domains=domains,
        tokenizer=raw.get("tokenizer"),
        val_fraction=val_fraction,
        seed=int(raw.get("seed", 0)),
        description=str(raw.get("description", "")).strip(),
        path=str(path),
    )


def with_overrides(recipe: Recipe, **fields: Any) -> Recipe:
    """A copy of the recipe with the given non-None fields replaced (CLI flags beat the file)."""
    return replace(recipe, **{k: v for k, v in fields.items() if v is not None})
