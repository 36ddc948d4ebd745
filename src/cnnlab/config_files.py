"""Where the Hydra configs are (inside the package when installed from a wheel, beside `src/` in a checkout), and
the config resolvers they use (`${fast_precision:...}`), registered when this module is imported."""

import re
from pathlib import Path

from omegaconf import OmegaConf

# bfloat16 instructions of x86 CPUs (AVX512-BF16: Intel Cooper Lake and later Xeons, AMD Zen 4 and later; AMX: Intel
# Sapphire Rapids and later), as Linux names them in /proc/cpuinfo's flags.
NATIVE_BF16_FLAGS = re.compile(r"\b(avx512_bf16|amx_bf16)\b")


def config_dir() -> str:
    """The directory holding train.yaml and the config groups.

    A wheel carries the configs inside the package; a source checkout (editable install) keeps them at its root.
    """
    packaged = Path(__file__).parent / "configs"
    if packaged.is_dir():
        return str(packaged)
    return str(Path(__file__).resolve().parents[2] / "configs")


def cpu_precision(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """`bf16-mixed` on a CPU with bfloat16 instructions, else `32-true`.

    With the instructions, LeNet-5's training steps at batch 128 ran 1.8x faster in bfloat16 autocast than in float32
    (AMD EPYC with AVX512-BF16, 2 cores, 2026-12-04); without them PyTorch emulates bfloat16 and is slower than
    float32. Where the flags cannot be read (not Linux), float32.
    """
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return "32-true"
    return "bf16-mixed" if NATIVE_BF16_FLAGS.search(flags) else "32-true"


GPU_PRECISION = "bf16-mixed"  # trainer=gpu's: bfloat16 matmuls and convolutions with float32 weights


def fast_precision(accelerator: str) -> str:
    """The `${fast_precision:${trainer.accelerator}}` resolver: the faster precision where the run trains. On a GPU
    (trainer=gpu, or accelerator auto with one present) trainer=gpu's bf16-mixed; on the CPU, cpu_precision()."""
    import torch

    on_gpu = str(accelerator) in ("gpu", "cuda") or (str(accelerator) == "auto" and torch.cuda.is_available())
    return GPU_PRECISION if on_gpu else cpu_precision()


OmegaConf.register_new_resolver("fast_precision", fast_precision, replace=True)
