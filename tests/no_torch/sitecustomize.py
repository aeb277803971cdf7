"""Put this folder on PYTHONPATH to make `import torch` (and transformers, which needs it) fail in a process:
tests/test_convert_without_torch.py converts and checks the golden checkpoint that way."""

import sys

BLOCKED = ("torch", "torchaudio", "torchvision", "transformers")


class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{name} is blocked: this process checks that nothing needs torch")


sys.meta_path.insert(0, _Blocker())
