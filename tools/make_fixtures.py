"""Regenerate the ONNX test fixtures under ``tests/fixtures/``.

Exporters (onnxscript for the dynamo exporter, skl2onnx, jax2onnx, tensorflow + tf2onnx) are needed
only here, never at test time: the ``.onnx`` outputs are committed. Run from the repository root::

    .venv/bin/python tools/make_fixtures.py            # everything (trains two small MNIST models, ~2 min)
    .venv/bin/python tools/make_fixtures.py --no-train # skip the trained MNIST models
    .venv/bin/python tools/make_fixtures.py --only hand jax   # only some groups
    /tmp/tfvenv/bin/python tools/make_fixtures.py --only keras  # keras_cnn.onnx, from a TensorFlow venv

Every fixture is tiny (a few KB up to ~400 KB) so that the whole folder stays under ~4 MB.
Models are seeded, so re-running gives the same weights (exporters may still change op layout
between versions). See ``tests/fixtures/README.md`` for the list.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

try:
    import torch
    from torch import nn

    _Module = nn.Module
except ImportError:  # `--only keras` runs from a separate TensorFlow venv that has no torch
    torch = nn = None  # type: ignore[assignment]
    _Module = object  # type: ignore[assignment,misc]

warnings.filterwarnings("ignore", category=DeprecationWarning)
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from certonnx.data import find_data  # noqa: E402 - after the sys.path set-up

OUT = ROOT / "tests" / "fixtures"


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------
class MLP(_Module):
    """784-32-16-10 MLP taking MNIST-shaped (B,1,28,28) images."""

    def __init__(self, hidden: tuple[int, ...] = (32, 16)) -> None:
        super().__init__()
        dims = (784, *hidden)
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], 10))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(_Module):
    """Small CNN covering Conv, BatchNorm, ReLU, MaxPool, AvgPool, residual Add, Concat, Flatten,
    Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.c3 = nn.Conv2d(4, 4, 1)
        self.mp = nn.MaxPool2d(2)
        self.ap = nn.AvgPool2d(2)
        self.fc = nn.Linear(8 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(torch.relu(self.c1(x)))  # BN after ReLU: exporters cannot fold it into the conv
        y = y + torch.relu(self.c2(y))  # residual
        y = self.mp(y)
        z = torch.cat([y, self.c3(y)], 1)
        z = self.ap(z)
        return self.fc(torch.flatten(z, 1))


class Normalized(_Module):
    """``(x - 0.1307) / 0.3081`` in front of a model: normalization inside the graph."""

    def __init__(self, inner: nn.Module, mean: float = 0.1307, std: float = 0.3081) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner((x - self.mean) / self.std)


def trained_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10)
    )


def trained_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 4, stride=2),
        nn.ReLU(),
        nn.Conv2d(8, 16, 4, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )


def _init_bn(model: nn.Module) -> None:
    """Give BatchNorm non-trivial running statistics so the fixture really exercises it."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.1)


# --------------------------------------------------------------------------------------------
# exporters
# --------------------------------------------------------------------------------------------
def export_ts(model: nn.Module, path: Path, shape: tuple[int, ...] = (1, 1, 28, 28)) -> None:
    """TorchScript exporter, opset 17, dynamic batch."""
    model.eval()
    buf = io.BytesIO()
    torch.onnx.export(
        model,
        (torch.rand(2, *shape[1:]),),
        buf,
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    _save(onnx.load_from_string(buf.getvalue()), path)


def export_dynamo(model: nn.Module, path: Path, shape: tuple[int, ...] = (1, 1, 28, 28)) -> None:
    """Dynamo exporter (opset 18+, emits ``Reshape(allowzero=1)``)."""
    model.eval()
    prog = torch.onnx.export(
        model,
        (torch.rand(2, *shape[1:]),),
        dynamo=True,
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        verbose=False,
    )
    _save(prog.model_proto, path)


def _save(model: onnx.ModelProto, path: Path) -> None:
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    print(f"  {path.relative_to(ROOT)}: {path.stat().st_size / 1024:.1f} KB, opset "
          f"{[o.version for o in model.opset_import if o.domain in ('', 'ai.onnx')]}")


# --------------------------------------------------------------------------------------------
# hand-built graphs (patterns some exporters emit)
# --------------------------------------------------------------------------------------------
def _rand(*shape: int, seed: int = 0, scale: float = 0.3) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def make_reshape_allowzero(path: Path) -> None:
    """Conv -> Reshape(allowzero=1, shape=[-1, 72]) -> Gemm. onnx2torch refuses allowzero=1."""
    w = numpy_helper.from_array(_rand(2, 1, 3, 3, seed=1), "conv.w")
    b = numpy_helper.from_array(_rand(2, seed=2), "conv.b")
    shape = numpy_helper.from_array(np.array([-1, 2 * 6 * 6], dtype=np.int64), "shape")
    fw = numpy_helper.from_array(_rand(10, 72, seed=3), "fc.w")
    fb = numpy_helper.from_array(_rand(10, seed=4), "fc.b")
    nodes = [
        helper.make_node("Conv", ["input", "conv.w", "conv.b"], ["c"], strides=[2, 2], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Reshape", ["r", "shape"], ["f"], allowzero=1, name="reshape"),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], transB=1, name="fc"),
    ]
    g = helper.make_graph(
        nodes,
        "reshape_allowzero",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 14, 14])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [w, b, shape, fw, fb],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="certonnx-fixtures")
    m.ir_version = 8
    _save(m, path)


def make_shape_chain(path: Path) -> None:
    """Shape -> Gather -> Unsqueeze -> Concat -> Reshape (``x.view(x.size(0), -1)`` as dynamic
    exporters write it), plus Identity and Dropout nodes, and a Cast in the chain."""
    w1 = numpy_helper.from_array(_rand(196, 16, seed=5), "w1")
    b1 = numpy_helper.from_array(_rand(16, seed=6), "b1")
    w2 = numpy_helper.from_array(_rand(16, 10, seed=7), "w2")
    b2 = numpy_helper.from_array(_rand(10, seed=8), "b2")
    idx0 = numpy_helper.from_array(np.array(0, dtype=np.int64), "idx0")
    minus1 = numpy_helper.from_array(np.array([-1], dtype=np.int64), "minus1")
    axes0 = numpy_helper.from_array(np.array([0], dtype=np.int64), "axes0")
    nodes = [
        helper.make_node("Identity", ["input"], ["x"], name="identity"),
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "idx0"], ["n"], axis=0, name="gather"),
        helper.make_node("Cast", ["n"], ["n64"], to=TensorProto.INT64, name="cast"),
        helper.make_node("Unsqueeze", ["n64", "axes0"], ["n1"], name="unsqueeze"),
        helper.make_node("Concat", ["n1", "minus1"], ["newshape"], axis=0, name="concat"),
        helper.make_node("Reshape", ["x", "newshape"], ["flat"], name="reshape"),
        helper.make_node("MatMul", ["flat", "w1"], ["h0"], name="matmul1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="add1"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
        helper.make_node("Dropout", ["h2"], ["h3"], name="dropout"),
        helper.make_node("MatMul", ["h3", "w2"], ["o0"], name="matmul2"),
        helper.make_node("Add", ["o0", "b2"], ["logits"], name="add2"),
    ]
    g = helper.make_graph(
        nodes,
        "shape_chain",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 14, 14])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [w1, b1, w2, b2, idx0, minus1, axes0],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="certonnx-fixtures")
    m.ir_version = 8
    _save(m, path)


def make_external_data(path: Path) -> None:
    """An MLP whose weights live in ``<name>.data`` next to the model (onnx external data)."""
    model = MLP((16,))
    torch.manual_seed(3)
    buf = io.BytesIO()
    torch.onnx.export(model.eval(), (torch.rand(1, 1, 28, 28),), buf, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    m = onnx.load_from_string(buf.getvalue())
    data_name = path.name + ".data"
    if (path.parent / data_name).exists():
        (path.parent / data_name).unlink()
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=64)
    os.chmod(path.parent / data_name, 0o644)
    print(f"  {path.relative_to(ROOT)} + {data_name}")


def make_sklearn(path: Path) -> bool:
    """sklearn MLPClassifier on the 8x8 digits (shipped with sklearn, pixels scaled to [0, 1]).

    skl2onnx emits ``label`` (ArgMax) and ``probabilities`` (Softmax) outputs. The certifiable
    quantity is the logits, so we cut the graph at the Softmax input and keep that single output
    (names and weights untouched)."""
    try:
        from skl2onnx import to_onnx
        from sklearn.datasets import load_digits
        from sklearn.neural_network import MLPClassifier
    except ImportError as e:
        print(f"  skip sklearn fixture: {e}")
        return False
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = MLPClassifier(hidden_layer_sizes=(32,), max_iter=200, random_state=0).fit(x[:1500], y[:1500])
    print(f"  sklearn MLP digits held-out accuracy: {clf.score(x[1500:], y[1500:]):.3f}")
    m = to_onnx(clf, x[:1], options={id(clf): {"zipmap": False}}, target_opset=17)
    soft = [n for n in m.graph.node if n.op_type == "Softmax"]
    if len(soft) != 1:
        print("  skip sklearn fixture: no single Softmax to cut at")
        return False
    logits = soft[0].input[0]
    m = onnx.shape_inference.infer_shapes(m)
    m = onnx.utils.Extractor(m).extract_model([m.graph.input[0].name], [logits])
    m.graph.output[0].name = logits
    m.producer_name, m.producer_version = "skl2onnx", __import__("skl2onnx").__version__
    _save(m, path)
    return True


def make_jax(path: Path) -> bool:
    """A two-layer MLP written in plain jax.numpy, exported with jax2onnx (opset 23 -> we ask 21)."""
    try:
        import jax.numpy as jnp
        from jax2onnx import to_onnx
    except ImportError as e:
        print(f"  skip jax fixture: {e}")
        return False
    w1, b1 = _rand(784, 24, seed=11, scale=0.05), _rand(24, seed=12)
    w2, b2 = _rand(24, 10, seed=13), _rand(10, seed=14)

    def f(x):  # (B, 1, 28, 28)
        h = jnp.reshape(x, (x.shape[0], -1))
        h = jnp.maximum(h @ w1 + b1, 0.0)
        return h @ w2 + b2

    try:
        m = to_onnx(f, [("B", 1, 28, 28)], opset=21, input_names=["input"], output_names=["logits"])
    except Exception as e:  # noqa: BLE001 - exporter problems only skip the fixture
        print(f"  skip jax fixture: {type(e).__name__}: {e}")
        return False
    _save(m, path)
    return True


def make_keras(path: Path, data: Path = OUT / "mnist_200.npz", epochs: int = 5) -> bool:
    """Keras CNN on NHWC ``(B, 28, 28, 1)`` inputs, exported with tf2onnx at opset 17.

    Conv2D(8, 3, relu) -> MaxPooling2D -> Flatten -> Dense(32, relu) -> Dense(10) logits, seeded,
    with random (non-zero) biases so that tf2onnx keeps the bias inputs/Adds, then trained a few
    epochs on the 200 training images of ``mnist_200.npz``. tf2onnx turns the NHWC layout into a
    Reshape/Transpose in front of the NCHW Conv and a Transpose back before the Flatten, and writes
    the Flatten as a Shape -> Gather -> Cast -> Slice -> Concat -> Reshape chain. Keras 3 models do
    not go through ``tf2onnx.convert.from_keras`` (KeyError on keras tensors), so the model is wrapped
    in a ``tf.function`` and converted with ``from_function``; names (``Identity:0`` output,
    ``unk__N`` batch dims) are kept as tf2onnx writes them."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import keras
        import tensorflow as tf
        import tf2onnx
    except ImportError as e:
        print(f"  skip keras fixture: {e} (see tests/fixtures/README.md for the separate venv)")
        return False
    keras.utils.set_random_seed(0)
    tf.config.experimental.enable_op_determinism()
    bias = keras.initializers.RandomNormal(stddev=0.05, seed=1)
    model = keras.Sequential([
        keras.Input((28, 28, 1), name="input"),
        keras.layers.Conv2D(8, 3, activation="relu", bias_initializer=bias),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(32, activation="relu", bias_initializer=bias),
        keras.layers.Dense(10, bias_initializer=bias),
    ])
    d = np.load(data)
    xtr = (d["x_train"].astype(np.float32) / 255.0)[..., None]
    xte = (d["x_test"].astype(np.float32) / 255.0)[..., None]
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(xtr, d["y_train"], batch_size=32, epochs=epochs, shuffle=True, verbose=0)
    acc = float((model.predict(xte, verbose=0).argmax(1) == d["y_test"]).mean())
    print(f"  keras CNN: accuracy {acc:.3f} on the 200 mnist_200 test images after {epochs} epochs")
    spec = (tf.TensorSpec((None, 28, 28, 1), tf.float32, name="input"),)
    fn = tf.function(lambda x: model(x, training=False), input_signature=spec)
    m, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=17)
    ref = model.predict(xte[:8], verbose=0)
    try:  # parity against Keras itself when onnxruntime is around (it is not a tf2onnx dependency)
        import onnxruntime as ort

        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        out = sess.run(None, {sess.get_inputs()[0].name: xte[:8]})[0]
        print(f"  keras vs onnxruntime max abs diff: {float(np.abs(out - ref).max()):.2e}")
    except ImportError:
        pass
    _save(m, path)
    return True


# --------------------------------------------------------------------------------------------
# MNIST data and trained models
# --------------------------------------------------------------------------------------------


def make_mnist_200(src: Path, path: Path) -> None:
    d = np.load(src)
    np.savez_compressed(
        path,
        x_test=d["x_test"][:200], y_test=d["y_test"][:200].astype(np.int64),
        x_train=d["x_train"][:200], y_train=d["y_train"][:200].astype(np.int64),
    )
    print(f"  {path.relative_to(ROOT)}: {path.stat().st_size / 1024:.1f} KB")


def train(model: nn.Module, src: Path, epochs: int, seed: int = 0) -> float:
    """Plain cross-entropy training on the full MNIST train set; returns clean test accuracy."""
    torch.manual_seed(seed)
    d = np.load(src)
    xtr = torch.from_numpy(d["x_train"]).float().div_(255).unsqueeze(1)
    ytr = torch.from_numpy(d["y_train"].astype(np.int64))
    xte = torch.from_numpy(d["x_test"]).float().div_(255).unsqueeze(1)
    yte = torch.from_numpy(d["y_test"].astype(np.int64))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), 128):
            idx = perm[i : i + 128]
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    return acc


# --------------------------------------------------------------------------------------------
GROUPS = ("torch", "hand", "sklearn", "jax", "keras", "mnist")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-train", action="store_true", help="skip the trained MNIST models")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument(
        "--only", nargs="+", choices=GROUPS, metavar="GROUP",
        help=f"regenerate only these groups ({', '.join(GROUPS)}); e.g. `--only keras` from the TensorFlow "
        "venv, which has no torch",
    )
    args = ap.parse_args(argv)
    groups = set(args.only or GROUPS)
    if torch is None and groups & {"torch", "hand", "mnist"}:
        ap.error("torch is not importable here: use the project venv, or --only keras/sklearn/jax")
    OUT.mkdir(parents=True, exist_ok=True)

    if "torch" in groups:
        print("torch exporters")
        torch.manual_seed(0)
        mlp = MLP()
        export_ts(mlp, OUT / "mlp_ts.onnx")
        export_dynamo(mlp, OUT / "mlp_dynamo.onnx")
        torch.manual_seed(1)
        cnn = CNN()
        _init_bn(cnn)
        export_ts(cnn, OUT / "cnn_ts.onnx")
        export_dynamo(cnn, OUT / "cnn_dynamo.onnx")
        torch.manual_seed(2)
        inner = CNN()
        _init_bn(inner)
        export_ts(Normalized(inner), OUT / "cnn_norm_ts.onnx")

    if "hand" in groups:
        print("hand-built graphs")
        make_reshape_allowzero(OUT / "reshape_allowzero.onnx")
        make_shape_chain(OUT / "shape_chain.onnx")
        make_external_data(OUT / "external_data.onnx")

    if groups & {"sklearn", "jax", "keras"}:
        print("other frameworks")
    if "sklearn" in groups:
        make_sklearn(OUT / "sklearn_mlp_digits.onnx")
    if "jax" in groups:
        make_jax(OUT / "jax_mlp.onnx")
    if "keras" in groups:
        make_keras(OUT / "keras_cnn.onnx")

    if "mnist" in groups:
        src = find_data("mnist.npz")
        if src is None:
            print("MNIST not found ($CERTONNX_DATA or ../shared/data): skipping mnist_200.npz and trained models")
            return 0
        print("MNIST")
        make_mnist_200(src, OUT / "mnist_200.npz")
        if not args.no_train:
            torch.set_num_threads(max(1, os.cpu_count() or 1))
            for name, ctor in (("mnist_mlp_trained", trained_mlp), ("mnist_cnn_trained", trained_cnn)):
                torch.manual_seed(0)
                model = ctor()
                acc = train(model, src, args.epochs)
                print(f"  {name}: clean test accuracy {acc:.4f} after {args.epochs} epochs")
                export_ts(model, OUT / f"{name}.onnx")
    total = sum(p.stat().st_size for p in OUT.iterdir() if p.is_file())
    print(f"total fixtures: {total / 1024 / 1024:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
