"""hotswap: open, fast ONNX model serving with zero-downtime hot swap.

`hotswap` spans four source roots (protos, control, engine, clients); this pkgutil-style
``__init__`` lets them share the namespace.
"""

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
