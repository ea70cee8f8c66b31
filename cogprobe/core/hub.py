"""Hub model ids (`org/name`, `org/name@revision`) resolved through huggingface_hub's cache.

The same cache and the same switch as transformers: with HF_HUB_OFFLINE=1 (the Makefile's
default) a model comes from the local cache or not at all; without it, huggingface_hub may
download it. cogprobe itself never sets the variable. Only the files a model needs are
fetched (no pickles, no other formats).

Revisions of one model are checkpoints: Pythia and OLMo publish training steps as `stepN`
branches, so `org/name@step1000,step2000` (or `org/name@step*`: every `stepN` branch in the
local cache) is a checkpoint list for sweeps and capture, with N as the step.
"""
from __future__ import annotations

import re
from pathlib import Path

from cogprobe.core.errors import CogprobeError

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./*,-]+))?$")
STEP = re.compile(r"^step(\d+)$")
FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]


def is_hub_id(spec) -> bool:
    """`org/name` or `org/name@rev` that is not an existing local path."""
    text = str(spec)
    return not Path(text).expanduser().exists() and HUB_ID.match(text) is not None


def hub_cache() -> Path:
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def resolve(spec: str) -> Path:
    """The snapshot folder of `org/name[@revision]`: from the cache offline, downloaded online."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    m = HUB_ID.match(str(spec))
    repo, rev = m.group("repo"), m.group("rev") or "main"
    try:
        return Path(snapshot_download(repo, revision=rev, cache_dir=hub_cache(), allow_patterns=FILES,
                                      local_files_only=hub_offline()))
    except LocalEntryNotFoundError:
        how = ("HF_HUB_OFFLINE=1 is set: download it where the network is allowed (`hf download "
               f"{repo} --revision {rev}`), or give a local folder") if hub_offline() else "the hub could not be reached"
        raise CogprobeError(f"{repo}@{rev} is not in the Hugging Face cache {hub_cache()}; {how}") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise CogprobeError(f"cannot get {repo}@{rev} from the hub ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160]}); check the name and revision") from None


def cached_steps(repo: str) -> list[str]:
    """`stepN` branches of `repo` present in the local cache, in step order."""
    refs = hub_cache() / f"models--{repo.replace('/', '--')}" / "refs"
    steps = [p.name for p in refs.iterdir() if STEP.match(p.name)] if refs.is_dir() else []
    if not steps:
        raise CogprobeError(f"no stepN revisions of {repo} in the Hugging Face cache {hub_cache()}; "
                            f"download them first or list them: {repo}@step1000,step2000")
    return sorted(steps, key=lambda s: int(STEP.match(s).group(1)))


def revisions(spec: str) -> list[tuple[int, Path]] | None:
    """(step, snapshot folder) per revision of `org/name@stepA,stepB` or `org/name@step*`;
    None when `spec` is not a list of stepN revisions."""
    m = HUB_ID.match(str(spec))
    if not m or not m.group("rev") or not (m.group("rev") == "step*" or "," in m.group("rev")):
        return None
    repo = m.group("repo")
    revs = cached_steps(repo) if m.group("rev") == "step*" else [r.strip() for r in m.group("rev").split(",")]
    bad = [r for r in revs if not STEP.match(r)]
    if bad:
        raise CogprobeError(f"revisions {bad} of {repo} are not stepN branches; list them as {repo}@step1000,step2000")
    return [(int(STEP.match(r).group(1)), resolve(f"{repo}@{r}")) for r in revs]
