"""Write an example model to an ONNX file: `python -m examples.export NAME PATH`."""

from __future__ import annotations

import sys
from pathlib import Path

from examples import models

EXPORTERS = {"mobilenet_v2_like": models.mobilenet_v2_like, "resnet_like": models.resnet_like,
             "densenet_like": models.densenet_like, "minilm": models.minilm, "multi_io": models.multi_io}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in EXPORTERS:
        print(f"usage: python -m examples.export {{{'|'.join(EXPORTERS)}}} PATH", file=sys.stderr)
        return 2
    path = Path(argv[1])
    path.parent.mkdir(parents=True, exist_ok=True)
    print(EXPORTERS[argv[0]](path))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
