"""Where a model to import comes from: a local Hugging Face directory, or a hub id downloaded with
huggingface_hub; a mistyped local path is named as such, without asking the network."""

from __future__ import annotations

import re
from pathlib import Path

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Names and suffixes of files, not of hub repositories: a source ending with one is a mistyped path.
_FILE_NAMES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer.model", "pytorch_model.bin")
_FILE_SUFFIXES = (".json", ".jsonl", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".yaml", ".yml",
                  ".txt")
# Exception names (anywhere in the chain) that mean the hub was not reached: offline, DNS, timeout.
_NETWORK = ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError", "ConnectTimeout", "ConnectionError",
            "TimeoutException", "ReadTimeout", "Timeout", "gaierror", "ProxyError", "SSLError")


def looks_like_path(src: str) -> bool:
    """A source meant as a local path, never a hub id: it starts with ./, ../, /, ~ (or a drive), has a
    path separator beyond the one slash of org/name, or ends with a file name (config.json, *.gguf ...)."""
    s = str(src)
    if s.startswith(("./", "../", "/", "~")) or s in (".", "..") or "\\" in s or re.match(r"^[A-Za-z]:", s):
        return True  # (a hub id has no backslash or colon)
    if s.rstrip("/").count("/") > 1:
        return True
    name = s.rstrip("/").rsplit("/", 1)[-1]
    return name in _FILE_NAMES or name.lower().endswith(_FILE_SUFFIXES)


def _unreachable(e: BaseException) -> BaseException | None:
    """The error that says the hub could not be reached (the deepest in the chain: a ConnectError rather
    than the LocalEntryNotFoundError that wraps it), or None when it was (a missing or gated repo...)."""
    seen, found = set(), None
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e).__name__ in _NETWORK or isinstance(e, (ConnectionError, TimeoutError)):
            found = e
        e = e.__cause__ or e.__context__
    return found


def resolve_source(src: str | Path, revision: str | None = None) -> Path:
    """A local Hugging Face directory, or a hub id (`org/name`) downloaded with huggingface_hub. A source
    that looks like a path (looks_like_path) and is not there is said not to exist, without the network."""
    from pretune.interop.hf import InteropError

    p = Path(src).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise InteropError(f"{p} has no config.json; give a Hugging Face model directory or hub id")
        return p
    if p.is_file():
        raise InteropError(f"{src} is a file; give the Hugging Face model directory that holds config.json "
                           f"and the weights (such as {p.parent})")
    if looks_like_path(str(src)) or not _HUB_ID.match(str(src)):
        raise InteropError(f"{src} does not exist: there is no such local directory (check the path)"
                           + ("" if _HUB_ID.match(str(src)) else "; nor is it a hub id (org/name)"))
    missing = f"{src} is not a local directory (there is no such path), and as a hub id"
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise InteropError(f"{missing} downloading it needs huggingface_hub: pip install 'pretune[hf]'") from None
    try:
        path = snapshot_download(str(src), revision=revision, allow_patterns=[
            "*.json", "*.safetensors", "*.jinja", "tokenizer.model"])
    except Exception as e:  # offline, gated, missing: the hub's message says which
        net = _unreachable(e)
        if net is not None:
            why = " ".join(str(net).split())[:200]
            raise InteropError(f"{missing} it could not be fetched: the Hugging Face hub cannot be reached "
                               f"({type(net).__name__}: {why}). Hub ids need network access (or a copy in the "
                               "Hugging Face cache); if you meant a local directory, check the path") from None
        why = " ".join(str(e).split())
        raise InteropError(f"{missing} it could not be fetched from the Hugging Face hub: {why}") from None
    return Path(path)
