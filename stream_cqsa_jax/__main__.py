"""``python -m stream_cqsa_jax``: see `stream_cqsa_jax.cli`."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
