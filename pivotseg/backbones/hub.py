"""Reading transformers models from the hub or a folder without unpickling, with one-line errors.

pivotseg never unpickles a file it did not write. transformers' ``from_pretrained`` falls back to
``pytorch_model.bin`` (a pickle) when a folder has no safetensors, and its keyword arguments can
ask for more (``weights_only=False``, ``trust_remote_code=True``), while those arguments come
from configs and shared run folders (``model.backbone_config``). So :func:`safe_from_pretrained`

* passes on only :data:`FROM_PRETRAINED_OPTIONS` and fields of the model's own config class
  (``drop_path_rate``, ...), refusing :data:`UNSAFE_OPTIONS` by name;
* always asks for safetensors, and refuses a folder whose weights are pickles only, or a
  ``config.json`` / index that points at non-safetensors files.

:func:`source_error` turns transformers' ``OSError`` into a line that says what went wrong: no
such folder, or a hub id that is not in the local cache while the hub cannot be reached.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

from pivotseg.errors import CheckpointError, ConfigError

# What a config may ask of from_pretrained: which revision, where the cache is, whether to go
# online, the dtype and the attention kernel. Nothing that changes how files are read.
FROM_PRETRAINED_OPTIONS = (
    "revision",
    "cache_dir",
    "local_files_only",
    "dtype",
    "attn_implementation",
)
# Options that would let transformers unpickle a file or run code shipped with a checkpoint.
UNSAFE_OPTIONS = (
    "weights_only",
    "use_safetensors",
    "trust_remote_code",
    "code_revision",
    "gguf_file",
    "from_tf",
    "from_flax",
    "state_dict",
    "config",
    "transformers_weights",
    "auto_map",
    "key_mapping",
    "adapter_kwargs",
    "subfolder",
)
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.ckpt", "tf_model.h5")
SAFE_SUFFIXES = (".safetensors", ".safetensors.index.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def refuse_unsafe_options(options: dict, where: str = "backbone_config") -> None:
    """Raise a ConfigError for the first option of :data:`UNSAFE_OPTIONS` in ``options``."""
    for key in options:
        if key in UNSAFE_OPTIONS:
            raise ConfigError(
                f"{where}.{key}: refused; it would let transformers unpickle files or run code "
                "from the checkpoint, and pivotseg reads safetensors weights only; remove it"
            )


def config_fields(config_class: type) -> list[str]:
    """Settings of ``config_class`` itself (not those every transformers config has)."""
    from transformers import PreTrainedConfig

    common = set(inspect.signature(PreTrainedConfig.__init__).parameters)
    own = inspect.signature(config_class.__init__).parameters
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p for p, v in own.items() if p not in common and v.kind in named]


def check_options(options: dict, model_class: type, where: str = "backbone_config") -> dict:
    """``options`` if every key is allowed for ``model_class.from_pretrained``, else ConfigError."""
    refuse_unsafe_options(options, where)
    fields = config_fields(model_class.config_class)
    for key in options:
        if key not in FROM_PRETRAINED_OPTIONS and key not in fields:
            example = next((f for f in fields if "drop" in f), fields[0] if fields else "")
            raise ConfigError(
                f"{where}.{key}: not an option pivotseg passes to from_pretrained; with a "
                f"source it takes {', '.join(FROM_PRETRAINED_OPTIONS)} or a field of "
                f"{model_class.config_class.__name__} (e.g. {example})"
            )
    return dict(options)


def safe_from_pretrained(model_class, source, options: dict | None = None, **fixed):
    """``model_class.from_pretrained(source)`` reading safetensors only.

    Args:
        model_class: a transformers ``PreTrainedModel`` class.
        source: hub id or local folder.
        options: settings from a config, checked by :func:`check_options`.
        **fixed: pivotseg's own arguments (e.g. ``output_loading_info``).

    Raises:
        ConfigError: an option that is refused or unknown.
        CheckpointError: pickled weights only, or the source cannot be read (one line).
    """
    options = check_options(dict(options or {}), model_class)
    require_safetensors(source)
    try:
        return model_class.from_pretrained(
            str(source),
            use_safetensors=True,
            weights_only=True,
            trust_remote_code=False,
            **options,
            **fixed,
        )
    except (OSError, ValueError) as err:
        raise source_error(source, err, "transformers model") from None


def require_safetensors(source) -> None:
    """Refuse a source whose weights would be read from anything but safetensors files."""
    path = Path(source)
    if path.is_dir():
        if not any((path / name).is_file() for name in SAFE_WEIGHTS):
            pickled = [name for name in PICKLED_WEIGHTS if (path / name).exists()]
            held = f" (only {pickled[0]}, which is pickled)" if pickled else ""
            raise CheckpointError(
                f"{source}: holds no model.safetensors{held}; pivotseg never unpickles weights: "
                "convert them once where you trust the file (transformers' save_pretrained "
                "writes safetensors)"
            )
        index = path / SAFE_WEIGHTS[1]
        if index.is_file() and not (path / SAFE_WEIGHTS[0]).is_file():
            _check_index(index)
    try:
        from transformers import PreTrainedConfig

        raw, _ = PreTrainedConfig.get_config_dict(str(source))
    except (OSError, ValueError) as err:
        raise source_error(source, err, "transformers config.json") from None
    named = raw.get("transformers_weights")
    if named is not None and not str(named).endswith(SAFE_SUFFIXES):
        raise CheckpointError(
            f"{source}: its config.json names weights {named!r}, not a .safetensors file; "
            "pivotseg reads safetensors only; remove transformers_weights from config.json"
        )


def _check_index(index: Path) -> None:
    try:
        weight_map = json.loads(index.read_text()).get("weight_map", {})
    except (OSError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{index}: not a readable safetensors index ({err})") from None
    bad = sorted({f for f in weight_map.values() if not str(f).endswith(".safetensors")})
    if bad:
        raise CheckpointError(
            f"{index}: lists shards that are not .safetensors files ({bad[0]}); pivotseg reads "
            "safetensors only"
        )


def require_hub_file(source, names: tuple[str, ...], what: str) -> None:
    """Fetch (or find cached) the first of ``names`` in hub repo ``source``, else a one-line
    CheckpointError. Tokenizers need this: without their files transformers builds an empty
    one instead of failing."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    error: BaseException | None = None
    for name in names:
        try:
            hf_hub_download(str(source), name)
            return
        except (OSError, EntryNotFoundError) as err:
            error = err
    raise source_error(source, error, what)


def looks_like_hub_id(source) -> bool:
    return not Path(str(source)).exists() and bool(_HUB_ID.match(str(source)))


def _is_unreachable(err: BaseException) -> bool:
    from huggingface_hub.errors import LocalEntryNotFoundError

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, LocalEntryNotFoundError) or "couldn't connect" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def source_error(source, err: BaseException, what: str) -> CheckpointError:
    """A one-line CheckpointError for a failed read of ``what`` from ``source``."""
    if looks_like_hub_id(source) and _is_unreachable(err):
        from huggingface_hub.constants import HF_HUB_CACHE

        return CheckpointError(
            f"{source}: no such local folder, not in the Hugging Face cache ({HF_HUB_CACHE}) "
            "and the hub cannot be reached (offline); on a machine with network run "
            f"`hf download {source} --local-dir DIR` (or save_pretrained), copy DIR here and "
            "pass DIR in place of the hub id (e.g. --clip DIR, --sam DIR, "
            "model.backbone_source=DIR)"
        )
    first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
    if not Path(str(source)).exists() and not looks_like_hub_id(source):
        return CheckpointError(f"{source}: no such file or folder; give a hub id or a folder")
    return CheckpointError(
        f"{source}: cannot read a {what} ({first}); give a hub id, a transformers "
        "save_pretrained folder or a pivotseg backbone folder"
    )
