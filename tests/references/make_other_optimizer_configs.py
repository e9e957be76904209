"""Real ``get_config()`` / ``keras.optimizers.serialize`` dicts of Keras 3 optimizers other than Adam.

``adamx.from_keras_config`` must refuse them and name the optimizer it got (several have
Adam-like keys: ``beta_1``, ``beta_2``, ``epsilon``). Run with a Python that has keras==3.15
(any working directory):

    python tests/references/make_other_optimizer_configs.py

Output: ``data/other_optimizer_configs.json``, ``{class name: {"config": get_config(),
"serialized": keras.optimizers.serialize(...)}}``, plus Adam and AdamW (which must be accepted).
"""

from __future__ import annotations

import json
import os

os.environ["KERAS_BACKEND"] = "jax"

import keras  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "other_optimizer_configs.json")
CLASSES = [
    "Adam",
    "AdamW",
    "Nadam",
    "Adamax",
    "Lion",
    "Lamb",
    "Adafactor",
    "Adagrad",
    "Adadelta",
    "RMSprop",
    "SGD",
    "Ftrl",
    "Muon",
]


def _plain(x: object) -> object:
    return json.loads(json.dumps(x, default=float))


def main() -> None:
    out = {}
    for name in CLASSES:
        cls = getattr(keras.optimizers, name, None)
        if cls is None:
            continue
        opt = cls(learning_rate=0.01)
        out[name] = {"config": _plain(opt.get_config()), "serialized": _plain(keras.optimizers.serialize(opt))}
    out["_versions"] = {"keras": keras.__version__}
    with open(OUT, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
    print(f"wrote {OUT}: {sorted(k for k in out if not k.startswith('_'))}")


if __name__ == "__main__":
    main()
