"""Reference trajectories from the real libraries; see README.md. ``cases`` is importable without them."""
