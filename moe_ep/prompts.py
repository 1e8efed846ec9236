"""The job's prompt list: `sampling.prompts` or `sampling.prompts_file`, as one `PromptItem` per
image (prompt, seed, negative prompt, file name under output_dir/images/).

`sampling.prompts_file` is read and checked before any process group starts (`job.preflight`):

    *.jsonl   one JSON object a line: {"prompt": str, "seed": int, "negative_prompt": str,
              "name": str}; only "prompt" is required
    other     plain text, one prompt a line (surrounding white space stripped)

Blank lines are skipped in both. Every bad line is one ConfigError naming `sampling.prompts_file`,
the line number, what is wrong and what is allowed.

Defaults are those of `sampling.prompts`: the i-th prompt (counting kept lines from 0) uses seed
`sampling.seed + i` and the name `NNN` (i, 3 digits or more) -> images/NNN.png.

A name is a file name inside images/: letters, digits, '.', '_', '-'; not starting with '.', no
'..', at most NAME_MAX_LEN characters, unique (ignoring case, so that a case-insensitive file
system keeps them apart), also against the default names of unnamed lines. So no name can reach
outside the output folder or hit a temp file (`moe_ep.atomic`'s '.tmp-' prefix).

Per-line negative prompts: the samplers (moe_ep/models/*) take one negative prompt per batch
(`sampling.negative_prompt`), so a line's "negative_prompt" must equal it; another one is refused
(run one job per negative prompt). Batching by negative prompt would change which prompts share a
batch, and with it the bits of an image until the expert path is batch-invariant.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Optional

from .config import Config, ConfigError, _DuplicateKey, _no_duplicate_keys   # the config's JSON rule

FIELD = "sampling.prompts_file"
JSONL_KEYS = ("prompt", "seed", "negative_prompt", "name")
NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
NAME_MAX_LEN = 100          # + ".json" / ".png" and atomic_write's temp prefix stay far below 255 bytes
SEED_LO, SEED_HI = -2 ** 63, 2 ** 64   # what torch.Generator takes: [lo, hi)


@dataclass(frozen=True)
class PromptItem:
    """One image of the job."""

    index: int               # place in the prompt list (0-based); the work split's prompt index
    prompt: str
    seed: int                # initial noise
    negative_prompt: str     # the unconditional branch (one per job: sampling.negative_prompt)
    name: str                # images/<name>.png and images/<name>.json

    @property
    def png(self) -> str:
        return f"{self.name}.png"


def default_name(index: int) -> str:
    return f"{index:03d}"


def name_problem(name) -> Optional[str]:
    """Why `name` cannot be an image's name, or None."""
    if not isinstance(name, str):
        return f"must be a string, got {type(name).__name__}"
    if not name:
        return "is empty"
    if len(name) > NAME_MAX_LEN:
        return f"has {len(name)} characters, at most {NAME_MAX_LEN} allowed"
    if ".." in name:
        return "contains '..'"
    if not NAME.match(name):
        return "may hold only letters, digits, '.', '_' and '-', and not start with '.'"
    return None


def _bad(path: str, line: int, what: str) -> ConfigError:
    return ConfigError(FIELD, path, f"line {line}: {what}")


def _parse_jsonl_line(path: str, n: int, text: str) -> dict:
    """One JSONL line -> {"prompt", optional "seed", "negative_prompt", "name"} (ConfigError)."""
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as err:
        raise _bad(path, n, f"has the key {err.args[0]!r} twice") from None
    except (ValueError, RecursionError) as err:
        raise _bad(path, n, f"is not valid JSON ({err}); each line must be one JSON object such as "
                            '{"prompt": "a red fox", "seed": 3, "name": "fox"}') from None
    if not isinstance(obj, dict):
        raise _bad(path, n, f"is a JSON {type(obj).__name__}, must be an object with the key 'prompt'")
    unknown = sorted(set(obj) - set(JSONL_KEYS))
    if unknown:
        raise _bad(path, n, f"has the unknown key {unknown[0]!r}; allowed keys: {', '.join(JSONL_KEYS)}")
    if "prompt" not in obj:
        raise _bad(path, n, "has no 'prompt' (a string); it is the one required key")
    if not isinstance(obj["prompt"], str):
        raise _bad(path, n, f"'prompt' must be a string, got {type(obj['prompt']).__name__}")
    if "seed" in obj:
        seed = obj["seed"]
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise _bad(path, n, f"'seed' must be an integer, got {seed!r}")
        if not SEED_LO <= seed < SEED_HI:
            raise _bad(path, n, f"'seed' = {seed} must be >= -2**63 and < 2**64")
    if "negative_prompt" in obj and not isinstance(obj["negative_prompt"], str):
        raise _bad(path, n, f"'negative_prompt' must be a string, got {type(obj['negative_prompt']).__name__}")
    if "name" in obj:
        why = name_problem(obj["name"])
        if why is not None:
            raise _bad(path, n, f"'name' {obj['name']!r} {why}")
    return obj


def read_prompts_file(path: str, cfg: Config) -> list[PromptItem]:
    """`sampling.prompts_file` -> the items, in file order (blank lines skipped). ConfigError
    naming the field and the line for the first bad line."""
    s = cfg.sampling
    try:
        with open(path, "rb") as f:
            raw_lines = f.read().split(b"\n")
    except OSError as err:
        raise ConfigError(FIELD, path, f"cannot be read: {err.strerror or err}") from None
    jsonl = path.lower().endswith(".jsonl")
    items: list[PromptItem] = []
    seen: dict[str, int] = {}     # name, lower-cased -> line that took it
    for n, raw in enumerate(raw_lines, 1):
        try:
            text = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as err:
            raise _bad(path, n, f"is not UTF-8 ({err.reason} at byte {err.start}); the file must be UTF-8 text") from None
        if "\0" in text:
            raise _bad(path, n, "holds a NUL character; prompts are text")
        if not text.strip():
            continue
        i = len(items)
        obj = _parse_jsonl_line(path, n, text) if jsonl else {"prompt": text.strip()}
        neg = obj.get("negative_prompt", s.negative_prompt)
        if neg != s.negative_prompt:
            raise _bad(path, n, f"'negative_prompt' {neg!r} differs from sampling.negative_prompt "
                                f"{s.negative_prompt!r}; the samplers take one negative prompt per batch, so a "
                                "line may only repeat sampling.negative_prompt (run one job per negative prompt)")
        seed = obj.get("seed", s.seed + i)
        if "seed" not in obj and not SEED_LO <= seed < SEED_HI:
            raise _bad(path, n, f"has no 'seed' and sampling.seed + {i} = {seed} is beyond 2**64 - 1; give the "
                                "line a 'seed' or lower sampling.seed")
        name = obj.get("name", default_name(i))
        key = name.lower()
        if key in seen:
            raise _bad(path, n, f"the name {name!r} is taken by line {seen[key]} (names are unique, ignoring case; "
                                "an unnamed line's name is its prompt number, 000, 001, ...)")
        seen[key] = n
        items.append(PromptItem(i, obj["prompt"], seed, neg, name))
    if not items:
        raise ConfigError(FIELD, path, "holds no prompt (only blank lines); give one prompt a line")
    return items


def prompt_items(cfg: Config) -> list[PromptItem]:
    """The job's images: from `sampling.prompts_file` when set, else `sampling.prompts` (prompt i:
    seed sampling.seed + i, name NNN)."""
    s = cfg.sampling
    if s.prompts_file:
        return read_prompts_file(s.prompts_file, cfg)
    return [PromptItem(i, p, s.seed + i, s.negative_prompt, default_name(i)) for i, p in enumerate(s.prompts)]
