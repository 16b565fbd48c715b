"""Shipped teachers, installed with the package (README.md here: the commands that made them).

toy/ring8_teacher.msgpack            the 8-mode ring's EDM teacher (configs/toy_teacher.py)
digits/teacher.msgpack               the digits EDM U-Net teacher (configs/digits_teacher.py)
digits/classifier_teacher.msgpack    the digits classifier (KD teacher, digits FID features)
text/markov_tiny_teacher.msgpack     the CPU MDLM teacher (configs/synthetic_mdlm.py)
"""

import os

ROOT = os.path.dirname(os.path.abspath(__file__))


def path(name: str) -> str:
    """The absolute path of a shipped file, e.g. `path('toy/ring8_teacher.msgpack')`."""
    return os.path.join(ROOT, name)


__all__ = ["ROOT", "path"]
