"""The offline demo world: a small assistant that says unsafe things, and its judges.

`load_demo_world()` returns the world shipped with the package; `safeguard demo`
shows InferenceGuard on it; `safeguard demo --rebuild` retrains it from scratch.
"""

from inference_safeguard.demo.oracle import is_unsafe
from inference_safeguard.demo.world import DemoWorld, load_demo_world

__all__ = ["DemoWorld", "is_unsafe", "load_demo_world"]
