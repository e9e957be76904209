"""The generator scripts need Keras/TensorFlow/torch and write files: never collect them (pytest runs --doctest-modules)."""

collect_ignore_glob = ["make_*_refs.py"]
