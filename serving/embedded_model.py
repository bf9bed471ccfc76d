"""The embedded default model: built offline, deterministically, into a cache directory.

No model can be downloaded here, so kvbm builds its own: a byte-level BPE tokenizer trained
with ``tokenizers`` on Python standard-library sources (text that ships with every install),
and a random-weight Llama model saved with ``save_pretrained``. The same preset and seed give
the same files, byte for byte, and therefore the same greedy output.

Random models have nearly tied logits, so greedy decoding flips on rounding noise. The output
projection is scaled up (``logit_scale``) so the top token wins by a wide margin; that keeps
greedy output stable across batch shapes and kernels, which exact-match tests rely on.

CLI::

    python -m kvbm.serving.embedded_model --preset tiny        # prints the model directory
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

BUILDER_VERSION = 1

# Standard-library modules whose source trains the tokenizer: plain English docstrings
# and code, present on every CPython 3.11 install.
_CORPUS_MODULES = (
    "argparse",
    "asyncio.events",
    "collections",
    "contextlib",
    "dataclasses",
    "email.message",
    "functools",
    "http.client",
    "inspect",
    "json.decoder",
    "logging",
    "pathlib",
    "shutil",
    "subprocess",
    "textwrap",
    "threading",
    "typing",
    "unittest.case",
    "urllib.parse",
    "zipfile",
)


@dataclasses.dataclass(frozen=True)
class Preset:
    """Shape of a Llama-family model and its tokenizer."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    logit_scale: float


PRESETS: dict[str, Preset] = {
    # Tests: starts in seconds, 2 layers x 2 KV heads x 32 head dim = 512 B of bf16 KV a token.
    "tiny": Preset(
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        intermediate_size=256,
        vocab_size=1024,
        max_positions=4096,
        logit_scale=8.0,
    ),
    # Benchmarks: ~100M parameters, prefill far dearer than reading its KV (16 KiB a token).
    "bench": Preset(
        hidden_size=1024,
        num_layers=8,
        num_heads=16,
        num_kv_heads=8,
        head_dim=64,
        intermediate_size=2816,
        vocab_size=2048,
        max_positions=4096,
        logit_scale=8.0,
    ),
}


def default_cache_dir() -> Path:
    """Where models are built unless the caller names a directory."""
    root = os.environ.get("KVBM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kvbm"
    )
    return Path(root) / "models"


def _corpus() -> list[str]:
    import importlib.util

    texts = []
    for name in _CORPUS_MODULES:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin, name
        texts.append(Path(spec.origin).read_text(encoding="utf-8"))
    return texts


def _model_key(preset_name: str, seed: int, corpus: list[str]) -> str:
    digest = hashlib.sha256()
    digest.update(
        json.dumps(
            {"builder": BUILDER_VERSION, "preset": dataclasses.asdict(PRESETS[preset_name]), "seed": seed},
            sort_keys=True,
        ).encode()
    )
    for text in corpus:
        digest.update(text.encode())
    return digest.hexdigest()[:12]


def _build_tokenizer(corpus: list[str], vocab_size: int, out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<unk>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    wrapped.model_max_length = 1 << 20
    wrapped.save_pretrained(out_dir)


def _build_weights(preset: Preset, seed: int, out_dir: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=preset.vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_kv_heads,
        head_dim=preset.head_dim,
        max_position_embeddings=preset.max_positions,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(preset.logit_scale)
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    # Greedy by default and no EOS surprises: vLLM reads generation_config.json.
    GenerationConfig(bos_token_id=0, eos_token_id=1, do_sample=False).save_pretrained(out_dir)


def ensure_model(preset_name: str = "tiny", seed: int = 0, cache_dir: Path | None = None) -> Path:
    """Returns the directory of the preset's model, building it there first if needed.

    Args:
        preset_name: a key of :data:`PRESETS`.
        seed: weight seed; the tokenizer does not depend on it.
        cache_dir: parent directory; :func:`default_cache_dir` when None.

    Raises:
        ValueError: the preset is unknown.
    """
    if preset_name not in PRESETS:
        raise ValueError(f"unknown model preset {preset_name!r}; choose one of {sorted(PRESETS)}")
    corpus = _corpus()
    parent = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = parent / f"{preset_name}-{_model_key(preset_name, seed, corpus)}"
    if (target / "config.json").exists():
        return target
    parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent builders (pytest-xdist, two servers)
    # never see a half-written model.
    staging = Path(tempfile.mkdtemp(prefix=f".{preset_name}-", dir=parent))
    try:
        _build_tokenizer(corpus, PRESETS[preset_name].vocab_size, staging)
        _build_weights(PRESETS[preset_name], seed, staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kvbm.serving.embedded_model",
        description="Build (once) the embedded offline model and print its directory.",
    )
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="parent directory (default: $KVBM_CACHE_DIR/models or ~/.cache/kvbm/models)",
    )
    args = parser.parse_args(argv)
    print(ensure_model(args.preset, args.seed, args.cache_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
