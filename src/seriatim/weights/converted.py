"""Fast-mode weights converted once, not at every start.

Turning a GGUF file into the fast form (parsing its metadata and vocabulary, regrouping blocks into
int4/int8, packing) takes seconds; the result is saved in PyTorch's own format next to the config and
the tokenizer, keyed by the file's path, size and modification time, the precision, the int4 layout of
the ISA tier in use (quant.pack_int4) and the PyTorch version, and read back on the next load. Each
entry records its source file; writing one removes the entries whose source is gone or has changed
since (a reinstalled package, a deleted checkout), which no load could ever hit again. An entry is written
under a temporary name and renamed whole, so a process killed while writing leaves no half entry, only a
temporary one, which the next write removes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from torch import nn

from ..kernels import library
from ..model.config import ModelConfig
from ..model.quant import Float32Linear, Int4Linear, Int8Embedding, Int8Linear
from ..model.transformer import Transformer
from ..storage import cache_dir
from ..text.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMAT = 3  # bump when the saved form changes
MIN_BYTES = 16 << 20  # smaller files convert about as fast as they would load


def wanted(path: Path) -> bool:
    """Worth caching: a model file large enough that converting it takes a noticeable time."""
    return path.is_file() and path.stat().st_size >= MIN_BYTES


def _source(path: Path) -> dict:
    """What identifies a model file's contents to the cache: its full path, size and modification time."""
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _entry(path: Path, precision_name: str) -> Path:
    src = _source(path)
    layout = library.int4_layout()
    ident = f"{FORMAT}|{src['path']}|{src['size']}|{src['mtime_ns']}|{precision_name}|{layout}|{torch.__version__}"
    return cache_dir() / "converted" / f"{path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def _stale(entry: Path) -> bool:
    """An entry no load can hit: its source file is gone or changed, or it predates source records."""
    try:
        src = json.loads((entry / "source.json").read_text())
        return _source(Path(src["path"])) != src
    except (OSError, ValueError, KeyError, TypeError):
        return True


def _abandoned(tmp: Path) -> bool:
    """A temporary entry (`<entry>.tmp<pid>`) whose writer is gone: killed while writing, it never renamed it."""
    pid = tmp.name.rpartition(".tmp")[2]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    return False


def _prune(keep: Path) -> None:
    """Remove the stale entries beside `keep`, and the temporary ones of writers that died (those of live
    writers are theirs to rename)."""
    for entry in keep.parent.iterdir():
        if entry != keep and entry.is_dir() and (_abandoned(entry) if ".tmp" in entry.name else _stale(entry)):
            shutil.rmtree(entry, ignore_errors=True)


def save(path: Path, precision_name: str, model: Transformer, tokenizer: Tokenizer) -> None:
    """Write the converted model; a failure to write only costs the next start its speed."""
    entry = _entry(path, precision_name)
    modules = model.named_modules(remove_duplicate=False)  # a tied head is both lm_head and embed.table
    forms = {name: form for name, module in modules if (form := _form(module, model))}
    tied = forms.get("embed") == "tied_int8_embedding"  # its rows are lm_head's: saved once
    if tied:
        del forms["embed.table"]
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k.startswith("embed.table."))}
    meta = {"config": dataclasses.asdict(model.cfg), "forms": forms, "tokenizer": {
        "hf": tokenizer.hf.to_str(), "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "eos_token_ids": sorted(tokenizer.eos_token_ids), "chat_template": tokenizer.chat_template}}
    tmp = entry.with_name(entry.name + f".tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save(tensors, tmp / "weights.pt")
        (tmp / "meta.json").write_text(json.dumps(meta))
        (tmp / "source.json").write_text(json.dumps(_source(path)))
        tmp.rename(entry)  # atomic: a reader never sees half an entry
        _prune(entry)
    except OSError as e:
        if not entry.is_dir():  # another process finishing first is no failure
            log.warning("could not cache the converted weights in %s: %s", entry, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load(path: Path, precision_name: str, dtype: torch.dtype) -> tuple[Transformer, Tokenizer] | None:
    """The converted model and tokenizer, if this file was converted before (on the CPU)."""
    entry = _entry(path, precision_name)
    if not (entry / "meta.json").is_file():
        return None
    try:
        return _read(entry, dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # damaged or stale: convert again
        log.warning("ignoring the cached conversion in %s: %s", entry, e)
        shutil.rmtree(entry, ignore_errors=True)  # else it stays in the way of the new conversion's rename
        return None


def _read(entry: Path, dtype: torch.dtype) -> tuple[Transformer, Tokenizer]:
    meta = json.loads((entry / "meta.json").read_text())
    cfg = meta["config"]
    cfg = ModelConfig(**{**cfg, "sliding_layers": tuple(cfg["sliding_layers"])})
    # Mapped, not read: the weights are the file's pages (shared, no copy, ~15 ms). PyTorch's format
    # aligns every tensor to 64 bytes, which the int4/int8 kernels need (safetensors' views are not
    # aligned, and copying them out held the file and the copy at once: ~100 MB more at peak).
    tensors = torch.load(entry / "weights.pt", mmap=True, weights_only=True)
    with torch.device("meta"):
        model = Transformer(cfg)
    forms = meta["forms"]
    for name in sorted(forms, key=lambda n: n != "lm_head"):  # lm_head first: a tied embedding reuses it
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, _module(forms[name], name, tensors, model, dtype))
    built = {*forms, "embed.table"}  # modules made above (a tied embedding's table among them)
    rest = {k: v for k, v in tensors.items() if k.rpartition(".")[0] not in built}
    missing = [k for k in model.load_state_dict(rest, strict=False, assign=True).missing_keys
               if k.rpartition(".")[0] not in built]
    if missing:
        raise KeyError(f"no saved tensor for {missing[0]}")
    tok = meta["tokenizer"]
    tokenizer = Tokenizer(HFTokenizer.from_str(tok["hf"]), tok["bos_token_id"], tok["eos_token_id"],
                          frozenset(tok["eos_token_ids"]), tok["chat_template"])
    return model.eval(), tokenizer


def _form(module: nn.Module, model: Transformer) -> str | None:
    if isinstance(module, Int4Linear):
        return f"int4:{module.layout}"
    if isinstance(module, Int8Linear):
        return "int8"
    if isinstance(module, Int8Embedding):
        return "tied_int8_embedding" if module.table is model.lm_head else "int8_embedding"
    if isinstance(module, (nn.Linear, nn.Embedding)):
        return type(module).__name__
    return None


def _module(form: str, name: str, t: dict[str, torch.Tensor], model: Transformer, dtype: torch.dtype) -> nn.Module:
    if form.startswith("int4:"):
        return Int4Linear(t[f"{name}.weight"], t[f"{name}.scales_zeros"], form.removeprefix("int4:"))
    if form == "int8":
        return Int8Linear(t[f"{name}.weight"], t[f"{name}.scale"], dtype)
    if form == "tied_int8_embedding":
        return Int8Embedding(model.lm_head)
    if form == "int8_embedding":
        return Int8Embedding(Int8Linear(t[f"{name}.table.weight"], t[f"{name}.table.scale"], dtype))
    weight = t[f"{name}.weight"]
    if form == "Embedding":
        return nn.Embedding.from_pretrained(weight)
    module = (Float32Linear if form == "Float32Linear" else nn.Linear)(weight.shape[1], weight.shape[0], bias=False,
                                                                       device="meta")
    module.weight = nn.Parameter(weight, requires_grad=False)
    return module
