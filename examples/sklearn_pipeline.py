"""scikit-learn -> ONNX -> certonnx, end to end: train an ``MLPClassifier`` on flattened MNIST
pixels, export it with skl2onnx, then certify, certifiably fine-tune and gate it with the
certonnx CLI.

    pip install scikit-learn skl2onnx
    python examples/sklearn_pipeline.py [--data mnist.npz] [--out-dir DIR]

skl2onnx writes two outputs, ``label`` (ArgMax) and ``probabilities`` (Softmax). certonnx bounds
the logits (the Softmax input: same argmax, and Softmax has no bound rule), so the export is cut
there with ``onnx.utils.Extractor``; weights and names stay as skl2onnx wrote them. The
fine-tuned ONNX model is no longer a scikit-learn estimator: deploy it with onnxruntime.
See docs/examples.md for the numbers and examples/_pipeline.py for the certonnx steps.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _pipeline  # noqa: E402

# A little below what the defaults reach on the bundled 200 images (docs/examples.md); the plain
# export certifies ~0% at L∞ 0.1 and fails them.
REQUIREMENTS = ["clean>=0.65", "linf:0.1>=0.22", "l2:0.75>=0.30", "union>=0.22"]


def build(data: _pipeline.Mnist, out: Path, seed: int) -> _pipeline.Export:
    """MLPClassifier(64 hidden ReLU units), Adam, up to 200 iterations; exported at opset 17."""
    import onnx
    import skl2onnx
    import sklearn
    from skl2onnx import to_onnx
    from sklearn.neural_network import MLPClassifier

    x = data.x_train.reshape(len(data.x_train), -1)  # (N, 784) pixels in [0, 1]
    xt = data.x_test.reshape(len(data.x_test), -1)
    with warnings.catch_warnings():  # ConvergenceWarning: a short fit is the point here
        warnings.simplefilter("ignore")
        clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=200, random_state=seed).fit(x, data.y_train)
    if list(clf.classes_) != list(range(10)):
        raise _pipeline.PipelineError(f"the training subset lacks some digits (classes {list(clf.classes_)})")
    acc = float(clf.score(xt, data.y_test))
    # zipmap=False: plain tensors instead of a list of {class: probability} maps
    m = to_onnx(clf, x[:1], options={id(clf): {"zipmap": False}}, target_opset=17)
    outputs = [o.name for o in m.graph.output]
    soft = [n for n in m.graph.node if n.op_type == "Softmax"]
    if len(soft) != 1:
        raise _pipeline.PipelineError(f"expected one Softmax in the skl2onnx graph, found {len(soft)}")
    logits = soft[0].input[0]
    m = onnx.shape_inference.infer_shapes(m)
    m = onnx.utils.Extractor(m).extract_model([m.graph.input[0].name], [logits])
    m.producer_name, m.producer_version = "skl2onnx", skl2onnx.__version__
    onnx.save(m, str(out))
    return _pipeline.Export(
        f"scikit-learn {sklearn.__version__} MLPClassifier(64) (skl2onnx {skl2onnx.__version__}, opset 17)", acc,
        xt[:16], clf.predict_proba(xt[:16]), output_kind="probabilities",
        notes=[f"skl2onnx outputs {outputs}: kept only the Softmax input {logits!r} (the logits)"],
    )


if __name__ == "__main__":
    sys.exit(_pipeline.main("sklearn", build, doc=__doc__, requirements=REQUIREMENTS, method="ibp", epochs=50))
