"""Download the official checkpoint with huggingface-hub (its cache, resume and progress bars), then convert it."""

from __future__ import annotations

from pathlib import Path

from edge import constants
from edge.errors import OfflineError

# Only what the converter reads (faster-whisper's allow_patterns idea): no PyTorch code files, no extra weights.
ALLOW_PATTERNS = [
    "config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
    "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json", "model*.safetensors",
    "model.safetensors.index.json", "assets/Vocos.pt", "assets/chattts_tokenizer/*",
]


def download_checkpoint(repo_id: str = constants.OFFICIAL_REPO, *, revision: str | None = None,
                        local_files_only: bool = False) -> Path:
    """Fetch (or find in the HF cache) the checkpoint; fail fast with a clear message when offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS,
                                      local_files_only=local_files_only or constants.hub_offline()))
    except (LocalEntryNotFoundError, ConnectionError, OSError) as e:
        raise OfflineError(
            f"could not download {repo_id}: the Hugging Face Hub is not reachable and the checkpoint is not in the "
            f"local cache ({type(e).__name__}). Connect to the internet and run `minicpmo-edge pull` again, or "
            "copy a downloaded checkpoint here and run `minicpmo-edge convert CHECKPOINT_DIR BUNDLE_DIR`. "
            "Offline, `minicpmo-edge demo` runs on the built-in random-weights bundle.") from e


def pull(repo_id: str = constants.OFFICIAL_REPO, *, llm_quant: str = "q4_k_m", dst: Path | None = None,
         revision: str | None = None, overwrite: bool = False) -> Path:
    from converters.convert import convert

    src = download_checkpoint(repo_id, revision=revision)
    dst = dst or constants.bundles_dir() / f"{repo_id.split('/')[-1]}-{llm_quant}"
    convert(src, dst, llm_quant=llm_quant, name=repo_id, overwrite=overwrite)
    return dst
