"""Loading and saving model weights: official B-cos teachers, torchvision files, our own checkpoints.

`load_checkpoint` accepts a path or an in-memory object and recognises:

* plain state dicts, as the official B-cos v2 / GoodTeachersExplain teacher files are
  (``densenet_169-7037ee0604.pth``, ``resnet_34-a63425a03e.pth``, ...) and torchvision files;
* this project's checkpoints (`save_checkpoint`: ``{"format": "e2kd-fast/checkpoint", "model": ...}``);
* Lightning-style ``{"state_dict": ...}`` and ``{"model": ...}`` wrappers, and the ``module.``
  (DDP) and ``_orig_mod.`` (torch.compile) key prefixes.

A checkpoint of a run with ``train.ema_decay`` holds two sets of weights: ``model`` (the raw student,
what a resume goes on from) and ``model_ema`` (the exponential moving average, what the run evaluated).
Loading takes the averaged weights by default (``use_ema=True``, as timm's ``load_checkpoint`` does,
which also finds timm's own ``state_dict_ema`` entry); the trainer's resume asks for the raw ones.

Models may define ``convert_state_dict(sd) -> sd`` to map foreign key names (the official ViT's
``0.`` prefix, torchvision's legacy DenseNet names). Files are read with ``weights_only=True``:
nothing in them is executed. All mismatches are reported together and nothing is loaded unless
everything matches. When the mismatched keys are exactly those of the norms, and the file's norms
store the keys of another `make_norm2d` kind than the model's (a file from a ``norm="pn"`` model
into a ``norm="bnu"`` one, say), the error names that kind and the option that builds it.
"""

from __future__ import annotations

import errno
import functools
import inspect
import os
import pickle
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from e2kd_fast._files import ordinary_file_mode
from e2kd_fast.nn.norms import make_norm2d

CHECKPOINT_FORMAT = "e2kd-fast/checkpoint"
EMA_KEY = "model_ema"  # a training checkpoint's averaged weights (`e2kd_fast.engine.ema`), beside "model"
# Where other trainers keep averaged weights: timm's train.py, then timm's ModelEmaV2 callers.
_FOREIGN_EMA_KEYS = ("state_dict_ema", EMA_KEY)
_STRIPPABLE_PREFIXES = ("module.", "_orig_mod.", "model.")
_LIST_LIMIT = 8


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not match the model; the model is left untouched."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (full disk, quota, I/O error); the file it was to replace is unchanged."""


@dataclass(frozen=True)
class LoadReport:
    """What `load_checkpoint` found and loaded."""

    source: str
    kind: str  # "state_dict", "e2kd-fast", "e2kd-fast:model_ema", "wrapped:<key>"
    num_tensors: int
    stripped_prefix: str

    @property
    def ema(self) -> bool:
        """Whether the averaged (EMA) weights were loaded."""
        return self.kind.endswith("_ema")


def has_ema_weights(obj: Any) -> bool:
    """Whether a loaded checkpoint holds averaged (EMA) weights that `load_checkpoint` takes by default."""
    return isinstance(obj, Mapping) and _ema_entry(obj) is not None


def _ema_entry(obj: Mapping) -> str | None:
    """The key of ``obj``'s averaged weights (a state dict of tensors), or None."""
    keys = (EMA_KEY,) if obj.get("format") == CHECKPOINT_FORMAT else _FOREIGN_EMA_KEYS
    for key in keys:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
            return key
    return None


def read_checkpoint(path: str | os.PathLike) -> Any:
    """Reads a checkpoint file without executing code from it (``torch.load(weights_only=True)``).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is not a PyTorch checkpoint, or it needs code execution to load.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: refused: the file holds Python objects that can only be restored by executing code "
            f"from it, and checkpoints are read with weights_only=True ({first_line}). If you trust the file, "
            "re-save its state dict (torch.save(model.state_dict(), new_path)) and load that."
        ) from None
    except Exception as err:  # corrupt files surface as many types (RuntimeError, EOFError, IndexError, ...)
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None


def extract_state_dict(
    obj: Any, source: str = "checkpoint", prefix: str | None = None, *, use_ema: bool = True
) -> tuple[dict, str, str]:
    """Finds the model state dict inside a loaded checkpoint object.

    Args:
        obj: what `read_checkpoint` returned, or a state dict.
        source: a name for error messages (the file path).
        prefix: keep only keys starting with this prefix, and remove it (e.g. ``"student."``).
        use_ema: take the averaged weights when the checkpoint holds them (``model_ema``; timm's
            ``state_dict_ema``); False: the raw weights.

    Returns:
        (state_dict, kind, stripped_prefix).
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{source}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}"
        )
    kind = "state_dict"
    ema = _ema_entry(obj) if use_ema else None
    if obj.get("format") == CHECKPOINT_FORMAT:
        obj, kind = (obj.get("model"), "e2kd-fast") if ema is None else (obj[ema], f"e2kd-fast:{ema}")
    elif ema is not None:
        obj, kind = obj[ema], f"wrapped:{ema}"
    else:
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                obj, kind = inner, f"wrapped:{key}"
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: the checkpoint's 'model' entry is {type(obj).__name__}, not a state dict")
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(
            f"{source}: not a state dict: {len(bad)} entries are not tensors ({_names(bad)}); "
            f"for wrapped checkpoints the weights are expected under 'state_dict' or 'model'"
        )
    state = dict(obj)
    stripped = ""
    if prefix is not None:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise CheckpointError(f"{source}: no keys start with the prefix {prefix!r}")
        stripped = prefix
    else:
        for candidate in _STRIPPABLE_PREFIXES:
            if state and all(k.startswith(candidate) for k in state):
                state = {k[len(candidate) :]: v for k, v in state.items()}
                stripped += candidate
    return state, kind, stripped


def load_checkpoint(
    model: nn.Module,
    src: str | os.PathLike | Mapping[str, Any],
    *,
    prefix: str | None = None,
    use_ema: bool = True,
) -> LoadReport:
    """Loads weights into ``model``, all or nothing.

    Args:
        model: the model to fill (e.g. from `create_model`).
        src: a file path, or an object as ``torch.load`` returns it (a state dict or a wrapper).
        prefix: take only the keys under this prefix (e.g. ``"teacher."`` in a combined checkpoint).
        use_ema: the averaged (EMA) weights of a checkpoint that holds them (the weights a run with
            ``train.ema_decay`` evaluated); False: its raw weights, as a resume needs them.

    Returns:
        A `LoadReport`.

    Raises:
        FileNotFoundError: ``src`` is a path that does not exist.
        CheckpointError: unreadable or unsafe file, or a mismatch: the message names every missing
            and unexpected key and every tensor whose shape differs, with both shapes. The model is
            unchanged when this is raised.
    """
    source = str(src) if isinstance(src, str | os.PathLike) else "<in-memory checkpoint>"
    obj = read_checkpoint(src) if isinstance(src, str | os.PathLike) else src
    state, kind, stripped = extract_state_dict(obj, source, prefix, use_ema=use_ema)
    convert = getattr(model, "convert_state_dict", None)
    if callable(convert):
        state = convert(state)

    expected = model.state_dict()
    for key in expected:  # files older than this buffer (torchvision's DenseNets) lack it; torch allows that
        if key.endswith(".num_batches_tracked") and key not in state:
            state[key] = expected[key]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {list(state[k].shape)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys ({_names(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys ({_names(unexpected)})")
        if shapes:
            problems.append(f"{len(shapes)} shape mismatches ({_names(shapes)})")
        arch = getattr(model, "e2kd_name", type(model).__name__)
        hint = _norm_hint(model, expected, state, missing + unexpected)
        raise CheckpointError(
            f"{source} does not match {arch}: " + "; ".join(problems) + ". " + (hint or "") + "Nothing was loaded."
        )
    model.load_state_dict(state, strict=True)
    return LoadReport(source, kind, len(state), stripped)


def save_checkpoint(model: nn.Module, path: str | os.PathLike, **metadata: Any) -> Path:
    """Writes ``model``'s weights as an e2kd-fast checkpoint, atomically.

    The file is written to a temporary ``.<name>.<random>.tmp`` next to its destination and renamed
    into place, so a crash never leaves a truncated checkpoint, and a failed write leaves the previous
    file as it was and removes the temporary one. A model from `create_model` is described in a
    ``model_spec`` entry (name, ``num_classes``, keyword arguments, input encoding) unless ``metadata``
    gives a fuller one (`e2kd_fast.models.spec`). The file gets the mode an ordinary new file gets
    (0644 at umask 022). ``metadata`` must hold plain values (numbers,
    strings, lists, dicts, tensors) so that the file stays loadable with ``weights_only=True``.

    Returns:
        The path written.

    Raises:
        CheckpointWriteError: the file could not be written; the message names it, the cause (e.g. "No
            space left on device") and the free space of its file system.
    """
    path = Path(path)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": 1,
        "arch": getattr(model, "e2kd_name", None),
        "model": model.state_dict(),
        **metadata,
    }
    if payload.get("model_spec") is None:
        payload.pop("model_spec", None)
        if (built := _built_spec(model)) is not None:
            payload["model_spec"] = built
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, ordinary_file_mode())  # mkstemp's 0600 would hide the file from the user's group
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch's zip writer reports short writes as RuntimeError
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise CheckpointWriteError(_write_failure(path, err)) from err
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _built_spec(model: nn.Module) -> dict[str, Any] | None:
    """The ``model_spec`` entry of a model `create_model` built (it records how), else None."""
    name, build = getattr(model, "e2kd_name", None), getattr(model, "e2kd_build", None)
    if not isinstance(name, str) or not isinstance(build, Mapping):
        return None
    kwargs = {k: v for k, v in build.items() if k != "num_classes"}
    if not _plain(kwargs):  # e.g. a layer class as an argument: the file must stay loadable with weights_only
        return None
    return {
        "name": name,
        "num_classes": int(build["num_classes"]),
        "kwargs": kwargs,
        "encoding": "bcos" if getattr(model, "e2kd_family", None) == "bcos" else "standard",
        "image_size": None,
        "eval_resize": None,
        "classes": None,
    }


def _plain(value: Any) -> bool:
    """Whether ``value`` is made of None, bools, numbers, strings, lists and string-keyed dicts only."""
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _write_failure(path: Path, err: BaseException) -> str:
    """What went wrong writing ``path``: the cause in words, the free space, and what is left on disk."""
    if isinstance(err, OSError) and err.strerror:
        cause = err.strerror + (f" ({errno.errorcode[err.errno]})" if err.errno in errno.errorcode else "")
    else:  # e.g. "unexpected pos 1674496 vs 1674388": the file system took fewer bytes than were written
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        cause = f"{first} (the file could not be written in full)"
    try:
        free = f"{_bytes(shutil.disk_usage(path.parent).free)} free on its file system"
    except OSError:
        free = "free space unknown"
    previous = f"the previous {path.name} is unchanged" if path.is_file() else f"no {path.name} existed before"
    return f"could not write the checkpoint {path}: {cause}; {free}; {previous} and the partial file was removed"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# Norm kinds told apart by their state-dict keys (`make_norm2d`): running statistics, a weight only,
# or nothing. Of kinds with the same keys, the hint proposes the first and names the others.
_NORM_KINDS = ("bnu", "pn", "ln", "gn1", "none")
_NORM_NAMES = {
    "bnu": "uncentred batch norms",
    "pn": "position norms",
    "ln": "layer norms",
    "gn1": "group norms",
    "none": "no norms",
}
_NORM_OPTIONS = {"gn1": "gn<G>"}  # any group count stores the same keys
_OPTIONAL_BUFFERS = frozenset({"num_batches_tracked"})  # older files lack it (see load_checkpoint)


@functools.cache
def _norm_signatures() -> dict[frozenset[str], tuple[str, ...]]:
    """The key names (after the module prefix) each norm kind stores → the kinds storing exactly them.

    Read off the norm layers themselves, so a changed parameter or buffer needs no edit here.
    """
    signatures: dict[frozenset[str], tuple[str, ...]] = {}
    for kind in _NORM_KINDS:
        keys = frozenset(make_norm2d(kind)(4).state_dict()) - _OPTIONAL_BUFFERS
        signatures[keys] = (*signatures.get(keys, ()), kind)
    return signatures


@functools.cache
def _norm_kind_of_class() -> dict[type, str]:
    """The class each norm kind builds → the kind, to name a model's own norm exactly."""
    return {type(make_norm2d(kind)(4)): kind for kind in _NORM_KINDS}


def _keys_text(kind: str) -> str:
    """What a norm kind stores, in words: running statistics, a weight only, or nothing."""
    keys = frozenset(make_norm2d(kind)(4).state_dict())
    if not keys:
        return "no norm keys at all"
    return "with running statistics" if "running_var" in keys else "no running statistics"


def _keys_by_prefix(state: Mapping[str, Tensor]) -> dict[str, set[str]]:
    """``{"layer1.0.bn1": {"weight", "running_var", ...}, ...}``: the key names under each module."""
    grouped: dict[str, set[str]] = {}
    for key in state:
        prefix, _, name = key.rpartition(".")
        grouped.setdefault(prefix, set()).add(name)
    return grouped


def _norm_kind_at(state: Mapping[str, Tensor], grouped: dict[str, set[str]], prefix: str) -> str | None:
    """The first norm kind storing exactly ``state``'s keys under module ``prefix`` (none: no keys), or None.

    Norm tensors are [C]; a module with other shapes (a bias-free linear layer's [out, in]) is no norm.
    """
    names = frozenset(grouped.get(prefix, ())) - _OPTIONAL_BUFFERS
    if any(state[f"{prefix}.{name}"].dim() != 1 for name in names):
        return None
    kinds = _norm_signatures().get(names)
    return kinds[0] if kinds else None


def _norm_hint(
    model: nn.Module, expected: Mapping[str, Tensor], state: Mapping[str, Tensor], mismatched: list[str]
) -> str | None:
    """A sentence naming the norm kind the file was saved with and how to build a model that fits it.

    Args:
        model: the model being loaded.
        expected, state: the model's and the file's state dicts.
        mismatched: the missing and unexpected keys.

    Returns:
        None unless every mismatched key lies in a module of the model that stores the keys of one
        norm kind in the model and of another in the file, the same two kinds everywhere, and no
        norm of the model's kind matches the file (one deleted buffer is not another norm).
    """
    model_keys, file_keys = _keys_by_prefix(expected), _keys_by_prefix(state)
    modules = dict(model.named_modules())
    pairs: set[tuple[str | None, str | None]] = set()
    for prefix in {key.rpartition(".")[0] for key in mismatched}:
        if prefix not in modules:  # the file has a module the model lacks: another architecture
            return None
        pairs.add((_norm_kind_at(expected, model_keys, prefix), _norm_kind_at(state, file_keys, prefix)))
    if len(pairs) != 1:
        return None
    model_kind, file_kind = pairs.pop()
    if model_kind is None or file_kind is None or model_kind == file_kind:
        return None
    if model_kind != "none" and any(
        _norm_kind_at(expected, model_keys, prefix) == model_kind == _norm_kind_at(state, file_keys, prefix)
        for prefix in model_keys
    ):
        return None

    # The keys say only which group of kinds the model's norms are in; their class says which kind.
    model_norm = _norm_kind_of_class().get(type(modules[mismatched[0].rpartition(".")[0]]), model_kind)
    text = (
        f"The file looks saved with {_NORM_NAMES[file_kind]} ({_keys_text(file_kind)}), the model has "
        f"{_NORM_NAMES[model_norm]} ({_keys_text(model_kind)}): "
    )
    parameter = inspect.signature(type(model).__init__).parameters.get("norm")
    if parameter is None:
        return text + f"{type(model).__name__} has no norm option, so the file belongs to another model. "
    name = getattr(model, "e2kd_name", None)
    build = (
        f'create_model("{name}", norm="{file_kind}")' if name else f'{type(model).__name__}(..., norm="{file_kind}")'
    )
    text += (
        f'build the model with norm="{file_kind}"{", the default" if parameter.default == file_kind else ""} '
        f"({build}, or student.kwargs / teacher.kwargs: {{norm: {file_kind}}} in a config). "
    )
    same_keys = next(kinds for kinds in _norm_signatures().values() if kinds[0] == file_kind)[1:]
    if same_keys:
        names = " and ".join(_NORM_NAMES[kind] for kind in same_keys)
        options = ", ".join(f'norm="{_NORM_OPTIONS.get(kind, kind)}"' for kind in same_keys)
        text += f"{names.capitalize()} ({options}) store the same keys; use the norm the file was trained with. "
    return text


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:_LIST_LIMIT])
    return shown + (f", ... and {len(items) - _LIST_LIMIT} more" if len(items) > _LIST_LIMIT else "")
