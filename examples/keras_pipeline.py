"""Keras -> ONNX -> certonnx, end to end: train a small Keras 3 CNN (TensorFlow backend), export
it with tf2onnx, then certify, certifiably fine-tune and gate it with the certonnx CLI.

    pip install tensorflow-cpu tf2onnx        # best in its own venv, see docs/examples.md
    python examples/keras_pipeline.py [--data mnist.npz] [--out-dir DIR]

The model takes NHWC ``(B, 28, 28, 1)`` images as Keras does; certonnx reshapes the MNIST data to
that layout and measures ε in the same pixel units. Keras 3 models do not go through
``tf2onnx.convert.from_keras``, so the model is wrapped in a ``tf.function`` and converted with
``from_function``. This process never imports torch: the certonnx steps run as child processes.
See docs/examples.md for the numbers and examples/_pipeline.py for the certonnx steps.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _pipeline  # noqa: E402

# A little below what the defaults reach on the bundled 200 images (docs/examples.md); the plain
# export certifies ~0% at L∞ 0.1 and fails them.
REQUIREMENTS = ["clean>=0.60", "linf:0.1>=0.40", "l2:0.75>=0.12", "union>=0.12"]


def build(data: _pipeline.Mnist, out: Path, seed: int) -> _pipeline.Export:
    """Conv2D(8,3,relu)-MaxPooling2D-Flatten-Dense(64,relu)-Dense(10), 20 epochs of Adam."""
    import keras
    import numpy as np
    import onnx
    import tensorflow as tf
    import tf2onnx

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    model = keras.Sequential([
        keras.Input((28, 28, 1), name="image"),
        keras.layers.Conv2D(8, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10),
    ])
    x, xt = data.x_train[..., None], data.x_test[..., None]  # NHWC
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, data.y_train, batch_size=32, epochs=20, shuffle=True, verbose=0)
    logits = model.predict(xt, verbose=0)
    acc = float((logits.argmax(1) == data.y_test).mean())
    spec = (tf.TensorSpec((None, 28, 28, 1), tf.float32, name="image"),)
    fn = tf.function(lambda im: model(im, training=False), input_signature=spec)
    m, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=17)
    onnx.save(m, str(out))
    return _pipeline.Export(
        f"Keras {keras.__version__} CNN (TensorFlow {tf.__version__}, tf2onnx {tf2onnx.__version__}, opset 17)",
        acc, np.asarray(xt[:16]), np.asarray(logits[:16]))


if __name__ == "__main__":
    sys.exit(_pipeline.main("keras", build, doc=__doc__, requirements=REQUIREMENTS, method="ibp", epochs=80))
