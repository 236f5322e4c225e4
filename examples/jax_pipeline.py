"""JAX/Flax -> ONNX -> certonnx, end to end: train a small ``flax.nnx`` MLP with optax, export it
with jax2onnx, then certify, certifiably fine-tune and gate it with the certonnx CLI.

    pip install jax flax jax2onnx
    python examples/jax_pipeline.py [--data mnist.npz] [--out-dir DIR]

The model takes NCHW ``(B, 1, 28, 28)`` images like the other examples (it flattens them
first) and is exported with a symbolic batch dimension ``B`` at opset 21. See docs/examples.md
for the numbers and examples/_pipeline.py for the certonnx steps.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _pipeline  # noqa: E402

# A little below what the defaults reach on the bundled 200 images (docs/examples.md); the plain
# export certifies ~0% at L∞ 0.1 and fails them.
REQUIREMENTS = ["clean>=0.60", "linf:0.1>=0.15", "l2:0.75>=0.22", "union>=0.15"]


def build(data: _pipeline.Mnist, out: Path, seed: int) -> _pipeline.Export:
    """784-128-64-10 ReLU MLP in flax.nnx, 20 epochs of Adam (optax) in batches of 32."""
    from importlib.metadata import version

    import flax
    import jax
    import jax.numpy as jnp
    import jax2onnx
    import numpy as np
    import onnx
    import optax
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.fc1 = nnx.Linear(784, 128, rngs=rngs)
            self.fc2 = nnx.Linear(128, 64, rngs=rngs)
            self.fc3 = nnx.Linear(64, 10, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:  # (B, 1, 28, 28) -> (B, 10) logits
            h = jnp.reshape(x, (x.shape[0], -1))
            return self.fc3(nnx.relu(self.fc2(nnx.relu(self.fc1(h)))))

    model = MLP(nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model: MLP, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
        def loss_fn(m: MLP) -> jax.Array:
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    x = data.x_train[:, None]  # NCHW
    xt = data.x_test[:, None]
    rng = np.random.default_rng(seed)
    for _ in range(20):
        perm = rng.permutation(len(x))
        for i in range(0, len(x), 32):
            idx = perm[i:i + 32]
            step(model, optimizer, jnp.asarray(x[idx]), jnp.asarray(data.y_train[idx]))
    logits = np.asarray(model(jnp.asarray(xt)))
    acc = float((logits.argmax(1) == data.y_test).mean())
    m = jax2onnx.to_onnx(model, [("B", 1, 28, 28)], model_name="flax_mlp", opset=21, input_names=["image"],
                         output_names=["logits"])
    onnx.save(m, str(out))
    return _pipeline.Export(
        f"Flax nnx MLP (jax {jax.__version__}, flax {flax.__version__}, jax2onnx "
        f"{version('jax2onnx')}, opset 21)", acc, xt[:16], logits[:16])


if __name__ == "__main__":
    sys.exit(_pipeline.main("jax", build, doc=__doc__, requirements=REQUIREMENTS, method="cure", epochs=30))
