"""Write a merged state dict: safetensors (byte-reproducible), torch, shards with an index, HF folders.

All outputs go through ``AtomicWrite``: files are written under temporary names in the destination
folder and renamed into place only when complete (an index last); a directory output is built in a
temporary sibling directory and renamed as a whole.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from ..errors import OutputError, one_line
from ..options import dtype_name
from .atomic import AtomicWrite, check_name_length, refuse_existing
from .discovery import hf_weight_file, is_adapter_dir
from .formats.safetensors import ST_DTYPES
from .formats.sharded import indexed_shards
from .hashing import BACKGROUND, remember_sha256, sha256_file
from .jsonschema import load_json

log = logging.getLogger(__name__)

__all__ = ["SIDE_FILES", "TOKENIZER_FILES", "WRITE_SUFFIXES", "check_output", "check_side_outputs", "copy_side_files",
           "save_safetensors", "write_checkpoint"]

# Output suffixes: safetensors, or a torch.save state dict.
WRITE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
# The files a tokenizer is saved as (``save_pretrained``), its chat template included; ``text.TOKENIZER_FILES``
# lists those that change the token ids.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json")
# Named chat templates besides the default one (a folder of ``*.jinja`` files, transformers >= 4.54).
CHAT_TEMPLATES_DIR = "additional_chat_templates"
# What a folder output copies from its source besides the tokenizer: data the model's loaders read, never code.
# Everything else stays behind: *.py (custom code), the source's weights, its model card, and a trainer's state
# (optimizer.pt, scheduler.pt, rng_state*.pth, trainer_state.json, training_args.bin), which describe a training
# run the merge is not.
SIDE_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
              "video_preprocessor_config.json", "feature_extractor_config.json", "image_processor_config.json",
              # A sentence-transformers model: its module list and settings (and, below, its modules' folders).
              "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
# A source folder's weights: never copied, and not worth naming among the files left behind.
_WEIGHT_FILE_SUFFIXES = WRITE_SUFFIXES + (".h5", ".msgpack", ".onnx", ".ot", ".tflite", ".gguf")
# Every dtype we read, we can write.
_SAFETENSORS_DTYPES = {dtype: name for name, dtype in ST_DTYPES.items()}

# A tensor's bytes in parts, in order (see save_safetensors): name -> its parts.
Pieces = Callable[[str], Iterable[torch.Tensor]]


def is_dir_output(out: Path, hf_source_dir: Path | None) -> bool:
    known = out.suffix.lower() in WRITE_SUFFIXES
    return not known and (out.suffix == "" or hf_source_dir is not None)


_SHARD_NAME = re.compile(r"-\d{5}-of-\d{5}$")


def output_names(out: Path, *, is_dir: bool, max_shard_size: int | None = None) -> list[str]:
    """The names a file output at ``out`` may create in its folder (shard names as one of each length)."""
    if is_dir:
        return [out.name]
    names = [out.name, f"{out.name}.index.json"]
    if out.suffix.lower() != ".safetensors":
        names.append(f"{out.name}.metadata.json")
    if max_shard_size is not None:
        names.append(f"{out.stem}-00001-of-00001{out.suffix}")
    return names


def _existing_shards(out: Path) -> list[Path]:
    """Files beside ``out`` named like its shards (``<stem>-0000i-of-0000N<suffix>``)."""
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        return []
    found = []
    for p in folder.glob(f"{glob.escape(out.stem)}-*-of-*{glob.escape(out.suffix)}"):
        middle = p.name[len(out.stem):len(p.name) - len(out.suffix)]
        if _SHARD_NAME.fullmatch(middle):
            found.append(p)
    return sorted(found)


def check_output(out: str | Path, *, force: bool = False, hf_source_dir: Path | None = None,
                 max_shard_size: int | None = None) -> None:
    """Fail early, before any arithmetic, when ``out`` cannot or must not be written.

    Every file the write would create or replace is checked: the output, its index, its metadata
    file, files named like its shards, and (for a folder output) the folder itself.

    Raises:
        OutputError: a destination exists without ``force`` (a symlink included), the name is too long
            or names a folder that is not an output's (``.``, ``..``, the working folder or one above
            it, a folder that is not a model folder), the suffix is unknown, or the folder is not writable.
    """
    out = Path(out)
    if out.name in ("", ".", "..") or any(part == ".." for part in out.parts[-1:]):
        raise OutputError(f"output {str(out)!r} names a folder, not an output; give the output a name of its own")
    is_dir = is_dir_output(out, hf_source_dir)
    if not is_dir and out.suffix.lower() not in WRITE_SUFFIXES:
        raise OutputError(
            f"output {out} has suffix {out.suffix!r}; use .safetensors (default), .pt/.pth/.bin/.ckpt, or a name "
            "without a suffix for a model directory"
        )
    names = output_names(out, is_dir=is_dir, max_shard_size=max_shard_size)
    for name in names:
        check_name_length(out.parent / name)
    try:
        absolute = out.resolve()
        cwd = Path.cwd().resolve()
    except (OSError, RuntimeError) as e:
        raise OutputError(f"cannot resolve the output {out}: {one_line(e)}") from None
    if absolute == cwd or absolute in cwd.parents:
        raise OutputError(f"output {out} is the working folder or a folder above it; choose a new name")
    for existing in [out.parent / n for n in names if n != f"{out.stem}-00001-of-00001{out.suffix}"]:
        refuse_existing(existing, force=force)
    for shard in _existing_shards(out):
        refuse_existing(shard, force=force)
    if os.path.lexists(out) and not out.is_symlink() and out.is_dir() != is_dir:
        raise OutputError(f"{out} exists and is a {'directory' if out.is_dir() else 'file'}; choose another output")
    if is_dir and out.is_dir() and not out.is_symlink() and hf_weight_file(out) is None and not is_adapter_dir(out):
        raise OutputError(f"{out} is a folder that holds no model; twamerge replaces only a model folder "
                          "(choose another output)")
    ancestor = out.parent.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot write {out}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {out}: folder {ancestor} is not writable")


def check_side_outputs(out: Path, sides: Mapping[str, Path | None], *, force: bool = False) -> None:
    """Files written beside the checkpoint ``out`` (a report, a plot), keyed by their option, e.g.
    ``{"--report": path, "--plot": None}`` (None: not written). They are not checkpoints
    (:func:`check_output`): fail before any work when one cannot go where asked: it exists without
    ``force``, is a folder, has a name too long, sits in a missing or unwritable folder, inside the
    output, or is the same file as another output.
    """
    out = Path(out)
    destinations = {os.path.realpath(out): "-o"}
    for p in (out.with_name(out.name + ".index.json"), out.with_name(out.name + ".metadata.json")):
        destinations.setdefault(os.path.realpath(p), "-o")
    for flag, path in sides.items():
        if path is None:
            continue
        path, what = Path(path), flag.lstrip("-")
        check_name_length(path, what)
        real = os.path.realpath(path)
        if real in destinations:
            raise OutputError(f"{flag} {path} is the same file as {destinations[real]} writes; give it its own name")
        if Path(real).is_relative_to(os.path.realpath(out)):
            raise OutputError(f"{flag} {path} is inside the output {out}; put it beside the output")
        destinations[real] = flag
        refuse_existing(path, what, force=force)
        if os.path.isdir(path):
            raise OutputError(f"{path}: the {what} would replace a folder; give it a file name")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise OutputError(f"{path}: the folder {parent} does not exist")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"{path}: the folder {parent} is not writable")


def _prepare_tensors(tensors: Mapping[str, torch.Tensor], clone_views: bool) -> dict[str, torch.Tensor]:
    """The tensors on CPU, contiguous; with ``clone_views`` a view into a larger storage gets its own copy.

    The safetensors serializer writes each tensor's bytes on their own, so tensors may share memory
    (tied weights, or views of one flat buffer holding a whole merge) and nothing is copied.
    ``torch.save`` writes whole storages: a view of a larger buffer would drag all of it into the file.
    """
    out: dict[str, torch.Tensor] = {}
    for k, t in tensors.items():
        if not isinstance(k, str):
            raise TypeError(f"tensor names must be str, got {type(k).__name__} {k!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{k!r} is a {type(t).__name__}, expected a torch.Tensor")
        t = t.detach().to("cpu")
        partial = t.untyped_storage().nbytes() != t.numel() * t.element_size()
        if not t.is_contiguous() or (clone_views and partial):
            t = t.contiguous().clone()
        out[k] = t
    return out


def plan_shards(tensors: dict[str, torch.Tensor], max_shard_size: int | None) -> list[list[str]]:
    if max_shard_size is None:
        return [list(tensors)]
    shards: list[list[str]] = [[]]
    size = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    return shards


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str], *,
                     pieces: Pieces | None = None) -> None:
    """Write the safetensors format byte-for-byte reproducibly.

    ``safetensors.torch.save_file`` keeps the metadata in a hash map whose order changes from call to
    call, so the same merge would get a different file (and SHA-256) each time. Here the header is
    JSON with sorted keys (tensors by name, then ``__metadata__``), padded with spaces to 8 bytes, and
    the data follow in header order: the layout of the format's specification, written in a stable
    order, streamed tensor by tensor without a second copy.

    ``pieces`` is for a tensor whose bytes arrive in parts (a sharded fit receives each tensor's rows
    rank by rank into one reused buffer): name -> its parts, in order; ``tensors`` then give only
    shapes and dtypes (meta tensors will do). Parts are hashed here as they are written, because
    their buffer is refilled with the next part.
    """
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    names = sorted(tensors)
    for name in names:
        t = tensors[name]
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    # The output's SHA-256 (logged, and in `average`'s summary) is computed from the bytes as they are
    # written, instead of reading the file back.
    sha = hashlib.sha256()
    with open(path, "wb") as f:
        for part in (len(blob).to_bytes(8, "little"), blob):
            f.write(part)
            BACKGROUND.submit(sha, part)
        for name in names:
            for t in ([tensors[name]] if pieces is None else pieces(name)):
                t = t.detach().to("cpu").contiguous()
                if not t.numel():
                    continue
                data = memoryview(t.reshape(-1).view(torch.uint8).numpy() if t.dtype != torch.bool else t.numpy())
                f.write(data)
                if pieces is None:
                    # Hashed on the background thread while the next tensor is written; not copied: the
                    # tensors stay alive and unchanged until the wait below (a copy of the queue's 256 MB
                    # would add to the peak memory, which is reached here when the merge is large).
                    BACKGROUND.submit(sha, data, copy=False)
                else:
                    BACKGROUND.wait()
                    sha.update(data)
    BACKGROUND.wait()
    remember_sha256(path, sha.hexdigest())


def _save(tensors: dict[str, torch.Tensor], path: Path, fmt: str, metadata: dict[str, str],
          pieces: Pieces | None) -> None:
    if fmt == "safetensors":
        save_safetensors(tensors, path, metadata, pieces=pieces)
    else:
        torch.save(tensors, path)


def copy_side_files(src: Path | None, dst: Path, *, tokenizer: Path | None = None) -> list[str]:
    """Copy the data-only files a model folder needs besides its weights into ``dst``; returns their names.

    From ``src``: :data:`SIDE_FILES` (config, generation config, processor configs). The tokenizer's
    files (:data:`TOKENIZER_FILES` and the named chat templates) come from ``tokenizer`` when given,
    else from ``src``; never a mix of two tokenizers. Nothing else is copied (see :data:`SIDE_FILES`);
    what was left behind is logged. Symbolic links are copied as the files they point to.
    """
    copied: list[str] = []

    def copy(folder: Path, names: tuple[str, ...], sub: str = "") -> None:
        for name in names:
            if (folder / sub / name).is_file():
                shutil.copyfile(folder / sub / name, dst / sub / name)
                copied.append(f"{sub}/{name}" if sub else name)

    if src is not None:
        copy(src, SIDE_FILES)
        for folder in _module_folders(src):  # e.g. 1_Pooling/config.json: data only, never a module's weights
            names = tuple(sorted(p.name for p in (src / folder).iterdir() if p.is_file() and p.suffix == ".json"))
            if names:
                (dst / folder).mkdir(parents=True, exist_ok=True)
                copy(src, names, folder)
    tok = tokenizer if tokenizer is not None else src
    if tok is not None:
        copy(tok, TOKENIZER_FILES)
        templates = tok / CHAT_TEMPLATES_DIR
        if templates.is_dir():
            names = sorted(p.name for p in templates.iterdir() if p.is_file() and p.suffix == ".jinja")
            if names:
                (dst / CHAT_TEMPLATES_DIR).mkdir()
                for name in names:
                    shutil.copyfile(templates / name, dst / CHAT_TEMPLATES_DIR / name)
                copied.append(CHAT_TEMPLATES_DIR)
    if src is not None:
        known = set(SIDE_FILES) | set(TOKENIZER_FILES) | {CHAT_TEMPLATES_DIR} | set(_module_folders(src))
        left = sorted(p.name for p in src.iterdir() if p.name not in known and not p.name.startswith(".")
                      and not p.name.lower().endswith(_WEIGHT_FILE_SUFFIXES + (".index.json",)))
        if left:
            log.info("not copied from %s (not data-only side files): %s", src, ", ".join(left))
    return copied


def _module_folders(src: Path) -> list[str]:
    """The sub-folders a sentence-transformers ``modules.json`` names (``1_Pooling``), those inside ``src`` only."""
    if not (src / "modules.json").is_file():
        return []
    try:
        modules = load_json(src / "modules.json", "sentence-transformers module list", OutputError)
    except OutputError as e:
        log.warning("%s", e)
        return []
    folders = []
    for m in modules if isinstance(modules, list) else []:
        path = m.get("path") if isinstance(m, dict) else None
        if isinstance(path, str) and path and (src / path).is_dir() and not (src / path).is_symlink():
            if (src / path).resolve().parent == src.resolve():  # one level down: never ".." or a deeper path
                folders.append(path)
    return folders


def set_config_dtype(config_path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Make a copied ``config.json`` name the dtype the merged weights were written in.

    transformers loads with the config's ``torch_dtype`` (``dtype`` since v5) when asked for
    ``"auto"``; a merge written in bfloat16 must not claim float32. Left alone when the floating
    tensors have mixed dtypes or the config names none.
    """
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) != 1 or not config_path.is_file():
        return
    try:
        config = load_json(config_path, "config", OutputError)
    except OutputError as e:
        log.warning("left %s as it is: %s", config_path.name, e)
        return
    if not isinstance(config, dict):
        return
    name = dtype_name(next(iter(dtypes)))
    keys = [k for k in ("torch_dtype", "dtype") if isinstance(config.get(k), str)]
    if keys and any(config[k] != name for k in keys):
        for k in keys:
            config[k] = name
        config_path.write_text(json.dumps(config, indent=2) + "\n")


def previous_output_files(out: Path, base_name: str) -> list[Path]:
    """The files a previous file output at ``out`` consists of: the file, its shards and index, metadata.

    Shards are taken from the old index's weight map only (never by globbing), so files the user put
    beside the output are not touched.
    """
    folder = out.parent
    found = [p for p in (out, folder / f"{base_name}.index.json", folder / f"{base_name}.metadata.json")
             if p.is_file()]
    index = folder / f"{base_name}.index.json"
    if index.is_file():
        found += [p for p in indexed_shards(index) or [] if p.parent == folder and p.is_file()]
    return found


def write_checkpoint(
    tensors: Mapping[str, torch.Tensor],
    out: str | Path,
    *,
    metadata: dict[str, str],
    force: bool = False,
    max_shard_size: int | None = None,
    hf_source_dir: Path | None = None,
    tokenizer_dir: Path | None = None,
    model_card: str | None = None,
    transaction: AtomicWrite | None = None,
    pieces: Pieces | None = None,
) -> list[Path]:
    """Write a state dict atomically and return the paths written (shards first, index last).

    Format from ``out``: ``.safetensors`` (with ``metadata`` in its header), ``.pt/.pth/.bin/.ckpt``
    (a plain ``torch.save`` state dict; ``metadata`` goes to ``<out>.metadata.json`` or the shard
    index), or a directory when ``out`` has no suffix (or an unknown one with ``hf_source_dir``):
    ``model.safetensors`` plus the data-only side files of ``hf_source_dir`` (``copy_side_files``:
    config, generation and processor configs, tokenizer; never code or a trainer's state) and a
    ``README.md`` model card. Past ``max_shard_size``
    bytes the tensors are split into ``<stem>-0000i-of-0000N<suffix>`` shards with a
    ``<name>.index.json`` in the Hugging Face format.

    Args:
        tensors: ``{name: Tensor}``; any device, made contiguous; tensors sharing memory are cloned.
        out: output file or directory.
        metadata: str -> str, stored with the weights (``format: pt`` is added for transformers).
        force: replace an existing output.
        max_shard_size: bytes per shard, or None for one file.
        hf_source_dir: a Hugging Face model directory whose side files are copied into a folder output.
        tokenizer_dir: where a folder output's tokenizer files come from instead (``--tokenizer``).
        model_card: the text of a folder output's ``README.md``; a file output gets none.
        transaction: stage the files into this ``AtomicWrite`` and leave the commit to the caller (a
            fit commits its checkpoint, report and plot together); by default they are committed here.
        pieces: the tensors' bytes come from here, part by part (see :func:`save_safetensors`), and
            ``tensors`` are meta tensors of the whole shapes; safetensors outputs only.

    Raises:
        OutputError: the output exists without ``force`` or cannot be written. Nothing partial is left.
        TypeError: a name or value is not str / Tensor, or metadata is not str -> str.
    """
    out = Path(out)
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in metadata.items()):
        raise TypeError("metadata must be a dict of str -> str (JSON-encode anything else)")
    metadata = {"format": "pt", **metadata}
    check_output(out, force=force, hf_source_dir=hf_source_dir, max_shard_size=max_shard_size)
    is_dir = is_dir_output(out, hf_source_dir)
    fmt = "safetensors" if is_dir or out.suffix.lower() == ".safetensors" else "torch"
    if pieces is not None and fmt != "safetensors":
        raise OutputError(f"output {out}: tensors written part by part need a .safetensors file or a folder")
    prepared = dict(tensors) if pieces is not None else _prepare_tensors(tensors, clone_views=fmt != "safetensors")
    shards = plan_shards(prepared, max_shard_size)
    base = Path("model.safetensors") if is_dir else Path(out.name)
    stem, suffix = base.stem, base.suffix
    names = [base.name] if len(shards) == 1 else [
        f"{stem}-{i + 1:05d}-of-{len(shards):05d}{suffix}" for i in range(len(shards))
    ]

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create folder {out.parent}: {one_line(e)}") from e

    # (path written now, final path), in write order, index last.
    written: list[tuple[Path, Path]] = []
    try:
        with contextlib.ExitStack() as stack:
            aw = transaction if transaction is not None else stack.enter_context(AtomicWrite())
            _stage_checkpoint(aw, written, prepared, out, is_dir, fmt, names, shards, base, metadata, hf_source_dir,
                              tokenizer_dir, model_card, pieces)
            # With --force, what the previous output had and this one lacks (its shards, a single
            # file now sharded or the reverse) goes too, or a loader could pick up stale weights.
            previous = previous_output_files(out, base.name) if force and not is_dir else []
            for stale in set(previous) - {final for _, final in written}:
                aw.obsolete(stale)
                log.info("removing %s, part of the output this one replaces", stale)
            if transaction is None:
                aw.commit()
    except OutputError:
        raise
    except (OSError, RuntimeError) as e:  # a full disk, a file-size limit, torch.save's own write errors
        raise OutputError(f"cannot write {out}: {one_line(e)[:300]}") from None
    return [final for _, final in written]


def _stage_checkpoint(aw: AtomicWrite, written: list[tuple[Path, Path]], prepared: dict[str, torch.Tensor],
                      out: Path, is_dir: bool, fmt: str, names: list[str], shards: list[list[str]], base: Path,
                      metadata: dict[str, str], hf_source_dir: Path | None, tokenizer_dir: Path | None,
                      model_card: str | None, pieces: Pieces | None) -> None:
    tmp_dir = aw.directory(out) if is_dir else None

    def stage(final_name: str) -> Path:
        if tmp_dir is not None:
            p = tmp_dir / final_name
            written.append((p, out / final_name))
            return p
        p = aw.file(out.parent / final_name)
        written.append((p, out.parent / final_name))
        return p

    weight_map: dict[str, str] = {}
    for name, keys in zip(names, shards):
        part = {k: prepared[k] for k in keys}
        _save(part, stage(name), fmt, metadata, pieces)
        weight_map.update({k: name for k in keys})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in prepared.values())
        index = {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}
        stage(f"{base.name}.index.json").write_text(json.dumps(index, indent=2))
    elif fmt == "torch":
        stage(f"{base.name}.metadata.json").write_text(json.dumps(metadata, indent=2))
    if tmp_dir is not None and (hf_source_dir is not None or tokenizer_dir is not None):
        src = Path(hf_source_dir) if hf_source_dir is not None else None
        copied = copy_side_files(src, tmp_dir, tokenizer=Path(tokenizer_dir) if tokenizer_dir is not None else None)
        set_config_dtype(tmp_dir / "config.json", prepared)
        log.info("copied %s from %s", ", ".join(copied) or "nothing",
                 " and ".join(str(d) for d in dict.fromkeys((src, tokenizer_dir)) if d is not None))
    if tmp_dir is not None and model_card is not None:
        stage("README.md").write_text(model_card)
    for tmp, final in written:
        log.info("wrote %s (%d bytes, sha256 %s)", final, tmp.stat().st_size, sha256_file(tmp))
