#!/usr/bin/env python
"""Converts Flux checkpoints (BFL or diffusers) into dd_jax model folders. See --help."""

import sys

from weights_conversion.convert import main

if __name__ == "__main__":
    sys.exit(main())
